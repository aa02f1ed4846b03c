//! Media on the direct path between two real `natcall` processes on loopback: alice sends an
//! endless byte stream (`--send-video /dev/zero`, cut into 1434-byte frames: three full
//! 512-byte packets each) with the media rate ceiling at R, bob counts what arrives. Reports
//! packets/s and Mbit/s sent and received, loss, and each process's CPU per Mbit (sealing,
//! pacing and sending; receiving, opening and reassembling — the whole stack, not only the
//! cipher).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use natcall_jsonl::{JsonChild, Value};

use crate::server::{Spawned, cpu_seconds, sibling_binary};

/// What one rate measured.
#[derive(Debug)]
pub struct PathOutcome {
    /// The media rate ceiling asked, Mbit/s.
    pub ceiling_mbit: f64,
    pub seconds: f64,
    pub packets_sent: u64,
    pub packets_received: u64,
    pub packets_lost: u64,
    /// UDP payload bytes received (header and tag included).
    pub bytes_received: u64,
    pub sender_cpu_s: f64,
    pub receiver_cpu_s: f64,
}

impl PathOutcome {
    pub fn received_pps(&self) -> f64 {
        self.packets_received as f64 / self.seconds
    }

    pub fn received_mbit(&self) -> f64 {
        self.bytes_received as f64 * 8.0 / self.seconds / 1e6
    }

    pub fn loss_pct(&self) -> f64 {
        let expected = self.packets_received + self.packets_lost;
        if expected == 0 {
            return 0.0;
        }
        self.packets_lost as f64 * 100.0 / expected as f64
    }

    /// CPU µs per Mbit delivered, sender and receiver.
    pub fn cpu_us_per_mbit(&self) -> (f64, f64) {
        let mbit = self.bytes_received as f64 * 8.0 / 1e6;
        if mbit == 0.0 {
            return (0.0, 0.0);
        }
        (self.sender_cpu_s * 1e6 / mbit, self.receiver_cpu_s * 1e6 / mbit)
    }
}

/// A `natcall --json` process ([`JsonChild`]: its JSON lines read on a thread; killed on drop).
struct Peer {
    child: JsonChild,
}

impl Peer {
    fn spawn(bin: &Path, server: &str, home: &Path, name: &str, args: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(["--json", "--server", server, "--name", name, "--home"])
            .arg(home.join(name))
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        let child = JsonChild::spawn(name, &mut cmd)?;
        Ok(Self { child })
    }

    fn wait_event(&mut self, event: &str, within: Duration) -> Result<Value> {
        let got = self.child.wait_event(event, within, |_| true);
        got.map_err(|e| anyhow!("{e}; saw {:?}", self.child.seen))
    }

    /// Waits for exit, sampling CPU time every 50 ms; the last sample before exit.
    fn wait_exit_cpu(&mut self, within: Duration) -> Result<f64> {
        let mut cpu = 0.0;
        self.child
            .wait_exit_sampling(within, Duration::from_millis(50), |pid| {
                cpu = cpu_seconds(pid).unwrap_or(cpu);
            })?;
        Ok(cpu)
    }
}

/// One call of `seconds` with the media rate ceiling at `ceiling_mbit`.
pub fn run(ceiling_mbit: f64, seconds: u64) -> Result<PathOutcome> {
    let bin = sibling_binary("natcall", "natcall-peer")?;
    let server = Spawned::start()?;
    let home = std::env::temp_dir().join(format!("natcall-bench-media-{}", std::process::id()));
    std::fs::create_dir_all(&home).context("creating the peers' homes")?;
    let addr = server.addr.to_string();
    let mut bob = Peer::spawn(&bin, &addr, &home, "bob", &["listen", "--once", "--no-media"])?;
    bob.wait_event("registered", Duration::from_secs(10))?;
    let kbps = ((ceiling_mbit * 1000.0) as u64).max(1).to_string();
    let secs = seconds.to_string();
    let mut alice = Peer::spawn(
        &bin,
        &addr,
        &home,
        "alice",
        &[
            "call",
            "bob",
            "--policy",
            "direct-only",
            "--send-video",
            "/dev/zero",
            "--media-kbps",
            &kbps,
            "--duration",
            &secs,
        ],
    )?;
    let within = Duration::from_secs(seconds + 20);
    let bob_cpu = std::thread::scope(|s| {
        let bob_cpu = s.spawn(|| bob.wait_exit_cpu(within));
        let alice_cpu = alice.wait_exit_cpu(within);
        (alice_cpu, bob_cpu.join())
    });
    let (alice_cpu, bob_cpu) = match bob_cpu {
        (Ok(a), Ok(Ok(b))) => (a, b),
        (Err(e), _) | (_, Ok(Err(e))) => return Err(e),
        (_, Err(_)) => bail!("the CPU sampler panicked"),
    };
    let a = alice.wait_event("report", Duration::from_secs(5))?;
    let b = bob.wait_event("report", Duration::from_secs(5))?;
    let _ = std::fs::remove_dir_all(&home);
    if a["path"] != "direct" {
        bail!("the call was not direct: {a}");
    }
    let sent = &a["media"]["video"]["sent"];
    let got = &b["media"]["video"]["received"];
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    Ok(PathOutcome {
        ceiling_mbit,
        seconds: seconds as f64,
        packets_sent: n(sent, "packets_sent"),
        packets_received: n(got, "packets_received"),
        packets_lost: n(got, "packets_lost"),
        bytes_received: n(got, "bytes_received"),
        sender_cpu_s: alice_cpu,
        receiver_cpu_s: bob_cpu,
    })
}
