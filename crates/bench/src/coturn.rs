//! Debian's coturn (`turnserver`) on loopback, and the relay load through it.
//!
//! The server is started with a test user (`bench:bench`, realm `natcall.bench`), the
//! long-term credential mechanism, TLS/DTLS, CLI and quotas off, loopback peers allowed, and
//! one relay thread per core (`-m`, the same cores the natcall server's runtime uses). It is
//! killed on drop; its CPU seconds and peak RSS come from `/proc` as for natcall.
//!
//! A relayed call is two allocations, A and B, each with a permission and channel
//! [`turn::CHANNEL`] bound to the other's relayed address: A sends ChannelData → coturn
//! (A's relay port) → UDP → coturn (B's relay port) → ChannelData to B, and the same back.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;

use crate::load::{Load, Out, Outcome, PAYLOAD, Recorder, Sender, Window, receive_udp};
use crate::server::{cpu_seconds, free_port, status_kib};
use crate::turn::{self, Allocation, CHANNEL, CHANNEL_HEADER, Conn, Credentials};

/// The binary (Debian package coturn).
pub const BINARY: &str = "turnserver";

/// A coturn process on loopback, killed on drop.
#[derive(Debug)]
pub struct Coturn {
    child: Child,
    /// Its pid file and user database, removed on drop.
    files: [std::path::PathBuf; 2],
    pub addr: SocketAddr,
    pub cred: Credentials,
}

/// coturn's version line (`turnserver --version`), for the report.
pub fn version() -> Result<String> {
    let out = Command::new(BINARY)
        .arg("--version")
        .output()
        .context("running turnserver --version (is coturn installed? apt-get install coturn)")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Coturn {
    /// Starts coturn and waits until it answers a STUN Binding.
    pub async fn start() -> Result<Self> {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        // For debugging the bench: NATCALL_BENCH_COTURN_LOG=path keeps coturn's log.
        let log = std::env::var("NATCALL_BENCH_COTURN_LOG").unwrap_or_else(|_| "/dev/null".into());
        // Its pid file and user database go to the temp dir, not the system's paths.
        let tmp = std::env::temp_dir().join(format!("natcall-bench-coturn-{}-{port}", std::process::id()));
        let (pidfile, userdb) = (tmp.with_extension("pid"), tmp.with_extension("db"));
        let child = Command::new(BINARY)
            .args(["-n", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1"])
            .args(["--listening-port", &port.to_string()])
            .args(["--lt-cred-mech", "--user", "bench:bench", "--realm", "natcall.bench"])
            .args(["--no-tls", "--no-dtls", "--no-cli", "--allow-loopback-peers"])
            .args(["--total-quota", "0", "--user-quota", "0"])
            .args(["--relay-threads", &threads.to_string()])
            .args(["--log-file", &log, "--simple-log", "--no-software-attribute"])
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--userdb")
            .arg(&userdb)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting turnserver (is coturn installed? apt-get install coturn)")?;
        let s = Self {
            child,
            files: [pidfile, userdb],
            addr,
            cred: Credentials {
                user: "bench".into(),
                password: "bench".into(),
            },
        };
        s.wait_ready().await?;
        Ok(s)
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let r = crate::stun::load(self.addr, 1, 1, Duration::from_millis(100)).await?;
            if r.answered > 0 {
                return Ok(());
            }
        }
        bail!("coturn did not answer STUN on {} within 10 s", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.pid())
    }

    pub fn rss(&self) -> Result<u64> {
        status_kib(self.pid(), "VmRSS:")
    }

    pub fn peak_rss(&self) -> Result<u64> {
        status_kib(self.pid(), "VmHWM:")
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Sets up `calls` relayed calls (two allocations each, bound to each other).
pub async fn setup(c: &Coturn, calls: usize, tcp: bool) -> Result<Vec<(Allocation, Allocation)>> {
    let mut pairs = Vec::with_capacity(calls);
    let mut set = tokio::task::JoinSet::new();
    for chunk in (0..calls).collect::<Vec<_>>().chunks(64) {
        for _ in chunk {
            let (addr, cred) = (c.addr, c.cred.clone());
            set.spawn(async move {
                let mut a = Allocation::new(addr, tcp, &cred).await?;
                let mut b = Allocation::new(addr, tcp, &cred).await?;
                a.bind(b.relayed).await?;
                b.bind(a.relayed).await?;
                anyhow::Ok((a, b))
            });
        }
        while let Some(r) = set.join_next().await {
            pairs.push(r.context("a TURN setup task failed")??);
        }
    }
    Ok(pairs)
}

/// Runs one load through a fresh coturn, clients over UDP or TCP.
pub async fn run(load: Load, tcp: bool) -> Result<Outcome> {
    let server = Coturn::start().await?;
    let pairs = setup(&server, load.calls, tcp).await?;
    let cpu0 = server.cpu_seconds()?;
    let win = Window::start(&load)?;
    let template = turn::channel_data(CHANNEL, &[0u8; PAYLOAD]);
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let mut keep = Vec::new();
    for (a, b) in pairs {
        let (ra, rb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        for (alloc, mine, peers) in [(a, &ra, &rb), (b, &rb, &ra)] {
            let rec = Recorder::new(win.base, mine.clone());
            let out = match alloc.conn {
                Conn::Udp(sock) => {
                    let sock = Arc::new(sock);
                    receivers.push(tokio::spawn(receive_udp(
                        sock.clone(),
                        rec,
                        win.drain,
                        turn::channel_payload,
                    )));
                    Out::Udp(sock)
                }
                Conn::Tcp { stream, buf } => {
                    let (r, w) = stream.into_split();
                    receivers.push(tokio::spawn(receive_tcp(r, buf, rec, win.drain)));
                    Out::Tcp(Arc::new(tokio::sync::Mutex::new(w)))
                }
            };
            // Dropping a TCP write half sends FIN, and coturn closes the whole connection:
            // keep every sending side open until the receivers have drained.
            keep.push(out.clone());
            senders.push(Sender {
                out,
                template: template.clone(),
                payload_at: CHANNEL_HEADER,
                peer_received: peers.clone(),
            });
        }
    }
    let mut o = win.finish(senders, receivers, load).await?;
    drop(keep);
    o.server_cpu = server.cpu_seconds()? - cpu0;
    o.server_rss = server.peak_rss()?;
    Ok(o)
}

async fn receive_tcp(mut r: OwnedReadHalf, mut buf: BytesMut, mut rec: Recorder, end: Instant) -> Result<Vec<u32>> {
    let deadline = tokio::time::sleep_until(end.into());
    tokio::pin!(deadline);
    loop {
        turn::drain_stream(&mut buf, |p| rec.record(p));
        tokio::select! {
            n = r.read_buf(&mut buf) => {
                if n.context("receiving from coturn")? == 0 {
                    bail!("coturn closed a TCP client");
                }
            }
            () = &mut deadline => return Ok(rec.latencies_us),
        }
    }
}

/// coturn RSS per idle allocation: `calls` calls (2 allocations each, bound to each other).
pub async fn idle_allocations(calls: usize, tcp: bool) -> Result<(u64, u64, usize)> {
    let server = Coturn::start().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss()?;
    let pairs = setup(&server, calls, tcp).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = server.rss()?;
    drop(pairs);
    Ok((before, after, calls * 2))
}
