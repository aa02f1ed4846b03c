//! A call in the lab whose peers run with arguments the caller chooses — media inputs and
//! outputs, a policy, a duration — optionally with a packet capture on the caller's interface.
//! [`crate::run_scenario`] judges paths with a chat; this is for what flows during a call.
//!
//! bob runs `natcall listen --once BOB_ARGS…`, alice `natcall call bob ALICE_ARGS…`; alice's
//! arguments must end the call by themselves (`--duration`, or `--send-*` inputs that end).

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::capture::{Capture, Packet};
use crate::impair::HOST_TAP;
use crate::process::{Binaries, Proc};
use crate::scenario::{peer_args, start_server};
use crate::topology::{self, SERVER_PORT};
use crate::{Error, Impairment, Scenario};

/// What to run.
#[derive(Debug, Clone)]
pub struct CallSpec {
    /// Where alice and bob sit.
    pub scenario: Scenario,
    /// Impairment of alice's uplink.
    pub impair_a: Option<Impairment>,
    /// Arguments after `natcall call bob`.
    pub alice: Vec<String>,
    /// Arguments after `natcall listen --once`.
    pub bob: Vec<String>,
    /// Capture alice's traffic.
    pub capture_a: bool,
    /// How long alice's call may take, from spawning her to her exit.
    pub within: Duration,
}

/// What happened.
#[derive(Debug)]
pub struct CallOutcome {
    /// alice's and bob's final reports.
    pub reports: [Option<Value>; 2],
    /// alice's and bob's exit codes.
    pub exit_codes: [Option<i32>; 2],
    /// The server's address in the lab.
    pub server: SocketAddr,
    /// alice's packets, captured on her interface (before her NAT), when asked.
    pub packets: Vec<Packet>,
    /// The first thing that went wrong.
    pub error: Option<String>,
    /// Where the logs are (`rendezvous.log`, `alice.log`, `bob.log`).
    pub dir: PathBuf,
}

impl CallOutcome {
    /// The error (if any), both reports and the three logs.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("error: {:?}, exits {:?}", self.error, self.exit_codes);
        for (who, r) in ["alice", "bob"].iter().zip(&self.reports) {
            out.push_str(&format!("\n--- {who}'s report ---\n"));
            out.push_str(&r.as_ref().map_or("(none)".into(), Value::to_string));
        }
        for name in ["rendezvous", "bob", "alice"] {
            let path = self.dir.join(format!("{name}.log"));
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("({e})"));
            out.push_str(&format!("\n--- {} ---\n{text}", path.display()));
        }
        out
    }
}

/// Builds the lab, runs the call, tears the lab down. Files (logs, the capture, and whatever
/// the arguments name) live in `dir`.
pub async fn run_call(bins: &Binaries, spec: &CallSpec, dir: &FsPath) -> Result<CallOutcome, Error> {
    let net = topology::build(spec.scenario).await?;
    let guard = match spec.impair_a.filter(|i| !i.is_none()) {
        Some(imp) => Some(imp.apply(&net.a).await?),
        None => None,
    };
    // With the TAP forwarder, alice's address lives on the host-side TAP.
    let iface = match &guard {
        Some(g) if g.backend == crate::impair::DelayBackend::TapForwarder => HOST_TAP.to_owned(),
        _ => net
            .a
            .default_iface()
            .map(|i| i.name().to_owned())
            .ok_or_else(|| Error::InvalidScenario("alice has no interface".into()))?,
    };
    let ip = net
        .server
        .ip()
        .ok_or_else(|| Error::InvalidScenario("the server has no IPv4 address".into()))?;
    let server = SocketAddr::from((ip, SERVER_PORT));
    let (bins, spec, dir) = (bins.clone(), spec.clone(), dir.to_path_buf());
    let devices = (net.server.clone(), net.a.clone(), net.b.clone());
    let outcome = tokio::task::spawn_blocking(move || {
        let mut out = CallOutcome {
            reports: [None, None],
            exit_codes: [None, None],
            server,
            packets: Vec::new(),
            error: None,
            dir: dir.clone(),
        };
        let mut procs = Vec::new();
        let mut capture = None;
        let (srv, a, b) = (&devices.0, &devices.1, &devices.2);
        let result = (|| -> Result<(), String> {
            procs.push(start_server(&bins, &dir, srv, server)?);
            if spec.capture_a {
                let pcap = dir.join("alice.pcap");
                capture = Some(Capture::start(a, &iface, &pcap).map_err(|e| e.to_string())?);
            }
            let mut bob_cmd = vec!["listen".to_string(), "--once".to_string()];
            bob_cmd.extend(spec.bob.iter().cloned());
            let bob_args = peer_args(server, &dir, "bob", &bob_cmd);
            procs.push(Proc::spawn(b, &dir, "bob", &bins.natcall, &bob_args).map_err(|e| e.to_string())?);
            procs[1].wait_event("registered", Duration::from_secs(20), |_| true)?;
            let mut alice_cmd = vec!["call".to_string(), "bob".to_string()];
            alice_cmd.extend(spec.alice.iter().cloned());
            let alice_args = peer_args(server, &dir, "alice", &alice_cmd);
            procs.push(Proc::spawn(a, &dir, "alice", &bins.natcall, &alice_args).map_err(|e| e.to_string())?);
            out.exit_codes[0] = Some(procs[2].wait_exit(spec.within)?);
            out.exit_codes[1] = Some(procs[1].wait_exit(Duration::from_secs(10))?);
            Ok(())
        })();
        out.error = result.err();
        for p in &mut procs {
            p.kill();
            p.drain();
        }
        let report = |name: &str| procs.iter().find(|p| p.name == name).and_then(Proc::report);
        out.reports = [report("alice"), report("bob")];
        if let Some(c) = capture {
            match c.stop() {
                Ok(packets) => out.packets = packets,
                Err(e) => {
                    out.error.get_or_insert(e.to_string());
                }
            }
        }
        out
    })
    .await
    .map_err(|e| Error::InvalidScenario(format!("the call driver panicked: {e}")))?;
    drop(guard);
    drop(net);
    Ok(outcome)
}
