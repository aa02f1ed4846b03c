//! `resume`: how long a relayed call's media is down when its server goes away and comes back.
//!
//! Each run: a `natcall-rendezvous` process on loopback; two peers in this process (the
//! `natcall` library) in a `relay-only` call, alice sending an audio frame every 20 ms; the
//! server is stopped (SIGTERM: it drains and exits; or SIGKILL) and started again on the same
//! port. Measured: from the new server accepting TCP connections to the first audio frame bob
//! receives after it (the peers register again, re-announce the call, the server re-creates it,
//! QUIC carries on without a new handshake). Also: how long the SIGTERM drain took (it ends as
//! soon as the peers have closed their side after `GoingAway`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use natcall::{Endpoint, EndpointConfig, Frame, Identity, Path, Policy, Track};

use crate::server::{free_port, sibling_binary};

/// How the server is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stop {
    /// SIGTERM: the server tells its peers and drains.
    Term,
    /// SIGKILL: the server vanishes.
    Kill,
}

/// One run's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// From the new server accepting connections to the first audio frame after it.
    pub resume_ms: f64,
    /// From the signal to the old server's exit.
    pub exit_ms: f64,
    /// From the signal to media flowing again (the outage as a user hears it).
    pub outage_ms: f64,
    /// Whether the call was still up (not ended on either side) after it resumed.
    pub call_survived: bool,
}

/// Longest any wait of a run may take.
const WAIT: Duration = Duration::from_secs(20);

/// Starts the server on `addr` with its state (names, TLS key) in `state`: a restart is the
/// same server to the peers, who pinned its key.
fn start_server(addr: SocketAddr, state: &std::path::Path) -> Result<Child> {
    let child = Command::new(sibling_binary("natcall-rendezvous", "natcall-rendezvous")?)
        .args(["--listen", &addr.to_string(), "--log-level", "warn", "--state-dir"])
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting natcall-rendezvous")?;
    Ok(child)
}

/// Waits until `addr` accepts TCP connections; returns when it first did.
async fn accepting(addr: SocketAddr) -> Result<Instant> {
    let deadline = Instant::now() + WAIT;
    loop {
        // Not a self-connect (a probe of a closed loopback port can connect to itself).
        if tokio::net::TcpStream::connect(addr)
            .await
            .is_ok_and(|s| s.local_addr().ok() != Some(addr))
        {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("the server did not accept connections on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn peer(server: SocketAddr, name: &str) -> Result<Endpoint> {
    let mut config = EndpointConfig::new(server, name, Identity::generate()?);
    config.bind = "127.0.0.1:0".parse()?;
    Ok(Endpoint::bind(config).await?)
}

fn signal(child: &Child, stop: Stop) -> Result<()> {
    let sig = match stop {
        Stop::Term => "-TERM",
        Stop::Kill => "-KILL",
    };
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .context("running kill")?
        .success();
    if !ok {
        bail!("kill {sig} failed");
    }
    Ok(())
}

/// Sends an 80-byte audio frame on `call` every 20 ms until the call is gone.
pub(crate) fn audio_source(call: Arc<natcall::Call>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for n in 0u32.. {
            tick.tick().await;
            if call
                .send_frame(Track::AUDIO, Frame::new(n * 20, vec![0x41; 80]))
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

/// `t` as nanoseconds since `origin`.
fn since(origin: Instant, t: Instant) -> u64 {
    t.duration_since(origin).as_nanos() as u64
}

/// One run.
pub async fn run_once(stop: Stop, down: Duration) -> Result<Sample> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let state = tempfile::tempdir().context("a state directory for the server")?;
    let mut server = start_server(addr, state.path())?;
    accepting(addr).await?;
    let (alice, bob) = (peer(addr, "alice").await?, peer(addr, "bob").await?);
    let origin = Instant::now();
    let last_rx = Arc::new(AtomicU64::new(0));
    let listener = {
        let (bob, last_rx) = (bob.clone(), last_rx.clone());
        tokio::spawn(async move {
            let call = bob.accept().await?.accept().await?;
            while let Some(f) = call.recv_frame().await {
                if f.track == Track::AUDIO {
                    last_rx.store(since(origin, Instant::now()), Ordering::Relaxed);
                }
            }
            anyhow::Ok(call.report().path)
        })
    };
    let call = tokio::time::timeout(WAIT, alice.call("bob", Policy::RelayOnly))
        .await
        .context("the call did not connect")??;
    let source = {
        let call = Arc::new(call);
        let task = audio_source(call.clone());
        (call, task)
    };
    // Media flows before the outage.
    let deadline = Instant::now() + WAIT;
    while last_rx.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline {
            bail!("no audio before the outage");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    signal(&server, stop)?;
    let exited = tokio::task::spawn_blocking(move || server.wait().map(|_| Instant::now()))
        .await?
        .context("waiting for the server to exit")?;
    // The server stays down a while, as a real restart would: the peers' registration retries
    // (200 ms doubling to 1 s) are what the resume time then measures.
    tokio::time::sleep(down).await;
    server = start_server(addr, state.path())?;
    let back = accepting(addr).await?;
    let back_ns = since(origin, back);
    let deadline = Instant::now() + WAIT;
    while last_rx.load(Ordering::Relaxed) <= back_ns {
        if Instant::now() > deadline {
            let _ = server.kill();
            bail!("no audio within {WAIT:?} of the server coming back");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let resumed = origin + Duration::from_nanos(last_rx.load(Ordering::Relaxed));
    let (call, task) = source;
    let survived = call.path() == Path::Relay && !listener.is_finished();
    call.hangup("done");
    task.abort();
    let _ = tokio::time::timeout(Duration::from_secs(3), listener).await;
    alice.close().await;
    bob.close().await;
    let _ = server.kill();
    let _ = server.wait();
    Ok(Sample {
        resume_ms: resumed.duration_since(back).as_secs_f64() * 1000.0,
        exit_ms: exited.duration_since(signalled).as_secs_f64() * 1000.0,
        outage_ms: resumed.duration_since(signalled).as_secs_f64() * 1000.0,
        call_survived: survived,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `runs` runs; prints each and the medians (JSON lines with `json`).
pub async fn run(stop: Stop, runs: usize, down: Duration, json: bool) -> Result<()> {
    let mut samples = Vec::new();
    for i in 0..runs.max(1) {
        let s = run_once(stop, down).await.with_context(|| format!("run {}", i + 1))?;
        if json {
            println!(
                "{}",
                serde_json::json!({"event": "run", "stop": format!("{stop:?}").to_lowercase(), "sample": s})
            );
        } else {
            println!(
                "run {}: media again {:.0} ms after the server accepted ({:.0} ms after the signal); old server exited {:.0} ms after the signal; call survived: {}",
                i + 1,
                s.resume_ms,
                s.outage_ms,
                s.exit_ms,
                s.call_survived
            );
        }
        samples.push(s);
    }
    let resume = median(samples.iter().map(|s| s.resume_ms).collect());
    let exit = median(samples.iter().map(|s| s.exit_ms).collect());
    let survived = samples.iter().all(|s| s.call_survived);
    if json {
        println!(
            "{}",
            serde_json::json!({"event": "summary", "runs": samples.len(), "median_resume_ms": resume, "median_exit_ms": exit, "all_survived": survived})
        );
    } else {
        println!(
            "median of {}: media again {resume:.0} ms after the server accepted; exit {exit:.0} ms after the signal; every call survived: {survived}",
            samples.len()
        );
    }
    Ok(())
}
