//! `cluster`: two nodes on one Redis beside one single server, measured side by side in one
//! run (the machines are shared and noisy: ratios, not absolutes, are the figures).
//!
//! - **memory per registered peer**: `peers` idle registered peers on the single server, then
//!   on a node (Redis on: the binding and presence go to Redis too);
//! - **call setup**: from `Call` to the caller's `Start`, a relay-only call within one server
//!   and across the two nodes (the caller's node opens a visit link to the callee's node for
//!   each new caller connection: a TCP and TLS handshake on the setup path);
//! - **relay**: saturated 512-byte frames over `calls` relayed calls, within one server and
//!   across the nodes (one more server hop); throughput, one-way latency, server CPU per frame
//!   (both nodes summed);
//! - **failover** (`runs` times, the median reported): two library peers in a relay-only call,
//!   alice homed on n1, bob on n2 (where the call lives), each knowing the other node; n2 is
//!   killed: the time until bob is registered with n1, and until alice's audio reaches bob
//!   again (the call resumed on n1, the QUIC session unbroken).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use natcall::{Endpoint, EndpointConfig, Identity, Policy, ServerState, ServerTrust, Track};

use crate::load::Load;
use crate::peers::Signer;
use crate::relay::{measure, pair_across};
use crate::server::{Spawned, free_port};

/// A `redis-server` of the bench's own on a loopback port, killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Result<Self> {
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, port })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(redis: &Redis, id: &str) -> Result<Spawned> {
    let url = redis.url();
    Spawned::start_args("", &["--cluster", &url, "--node-id", id])
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub peers: usize,
    pub setups: usize,
    pub calls: usize,
    pub seconds: f64,
    pub runs: usize,
}

/// Runs every measurement and prints Markdown.
pub async fn run(plan: Plan) -> Result<()> {
    let redis = Redis::start()?;
    println!("## Cluster: two nodes on one Redis beside one single server (loopback, one run)\n");

    // Memory per registered idle peer.
    {
        let single = Spawned::start()?;
        let n1 = node(&redis, "mem")?;
        let a = crate::peers::idle(&single, plan.peers).await?;
        let b = crate::peers::idle(&n1, plan.peers).await?;
        println!("| registered idle peers | single server | cluster node (Redis on) |");
        println!("|---|---|---|");
        println!(
            "| {} | {:.1} KiB/peer | {:.1} KiB/peer |\n",
            plan.peers,
            a.per_peer() / 1024.0,
            b.per_peer() / 1024.0
        );
    }

    let single = Spawned::start()?;
    let (n1, n2) = (node(&redis, "n1")?, node(&redis, "n2")?);
    let signer = Signer::new()?;

    // Call setup, alternating within / across.
    let (mut within, mut across) = (Vec::new(), Vec::new());
    for i in 0..plan.setups {
        let (_, _, t) = pair_across((single.addr, single.addr), &format!("s{i}"), &signer).await?;
        within.push(t.as_secs_f64() * 1000.0);
        let (_, _, t) = pair_across((n1.addr, n2.addr), &format!("x{i}"), &signer).await?;
        across.push(t.as_secs_f64() * 1000.0);
    }
    println!(
        "| call setup (Call → Start), {} calls each | median | p90 |",
        plan.setups
    );
    println!("|---|---|---|");
    let (w50, w90) = (quantile(&mut within, 0.5), quantile(&mut within, 0.9));
    let (x50, x90) = (quantile(&mut across, 0.5), quantile(&mut across, 0.9));
    println!("| within one server | {w50:.2} ms | {w90:.2} ms |");
    println!("| across two nodes (visit link opened) | {x50:.2} ms | {x90:.2} ms |\n");

    // Relay throughput, within one server and across the nodes.
    let load = Load {
        calls: plan.calls,
        rate: None,
        duration: Duration::from_secs_f64(plan.seconds),
    };
    let w = measure(
        calls((single.addr, single.addr), "rs", plan.calls, &signer).await?,
        load,
        &[&single],
    )
    .await?;
    let x = measure(
        calls((n1.addr, n2.addr), "rx", plan.calls, &signer).await?,
        load,
        &[&n1, &n2],
    )
    .await?;
    println!(
        "| relay, {} calls saturated, 512 B frames | frames/s | latency p50 | p99 | server CPU/frame |",
        plan.calls
    );
    println!("|---|---|---|---|---|");
    for (label, o) in [("within one server", &w), ("across two nodes", &x)] {
        println!(
            "| {label} | {:.0} | {:.2} ms | {:.2} ms | {:.1} µs |",
            o.delivered_rate(),
            o.latency_ms(0.5),
            o.latency_ms(0.99),
            o.server_cpu * 1e6 / o.received.max(1) as f64
        );
    }
    println!(
        "\nacross / within: throughput {:.2}×, latency p50 +{:.2} ms (saturated: queues included)\n",
        x.delivered_rate() / w.delivered_rate().max(1.0),
        x.latency_ms(0.5) - w.latency_ms(0.5)
    );
    // At a call's rate (50 frames/s each way), the latency the extra hop adds.
    let paced = Load {
        rate: Some(50.0),
        ..load
    };
    let pw = measure(
        calls((single.addr, single.addr), "ps", plan.calls, &signer).await?,
        paced,
        &[&single],
    )
    .await?;
    let px = measure(
        calls((n1.addr, n2.addr), "px", plan.calls, &signer).await?,
        paced,
        &[&n1, &n2],
    )
    .await?;
    println!(
        "| relay, {} calls at 50 frames/s each way | latency p50 | p99 | loss |",
        plan.calls
    );
    println!("|---|---|---|---|");
    for (label, o) in [("within one server", &pw), ("across two nodes", &px)] {
        println!(
            "| {label} | {:.3} ms | {:.3} ms | {:.2} % |",
            o.latency_ms(0.5),
            o.latency_ms(0.99),
            o.loss() * 100.0
        );
    }
    println!(
        "\nthe extra hop adds {:.3} ms at the median (loopback: on a real network add the RTT/2 \
         between the two nodes)\n",
        px.latency_ms(0.5) - pw.latency_ms(0.5)
    );
    drop((n1, n2, single));

    // Failover.
    let mut rereg = Vec::new();
    let mut resumed = Vec::new();
    for r in 0..plan.runs {
        let (a, b) = failover_once(&redis, r)
            .await
            .with_context(|| format!("failover run {r}"))?;
        rereg.push(a);
        resumed.push(b);
    }
    println!(
        "| failover: the callee's home killed mid-call, {} runs | median | max |",
        plan.runs
    );
    println!("|---|---|---|");
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let (rm, rx) = (quantile(&mut rereg.clone(), 0.5), max(&rereg));
    let (am, ax) = (quantile(&mut resumed.clone(), 0.5), max(&resumed));
    println!("| registered with the other node | {rm:.0} ms | {rx:.0} ms |");
    println!("| audio flowing again (call resumed) | {am:.0} ms | {ax:.0} ms |");
    Ok(())
}

/// `n` relayed calls from `addrs.0` to `addrs.1`, named after `tag`.
async fn calls(
    addrs: (std::net::SocketAddr, std::net::SocketAddr),
    tag: &str,
    n: usize,
    signer: &Signer,
) -> Result<Vec<(crate::relay::Side, crate::relay::Side)>> {
    let mut pairs = Vec::with_capacity(n);
    for i in 0..n {
        let (a, b, _) = pair_across(addrs, &format!("{tag}{i}"), signer).await?;
        pairs.push((a, b));
    }
    Ok(pairs)
}

/// Longest any wait of a failover run may take.
const WAIT: Duration = Duration::from_secs(20);

async fn peer(home: std::net::SocketAddr, other: std::net::SocketAddr, name: &str) -> Result<Endpoint> {
    let mut config = EndpointConfig::new(home, name, Identity::generate()?);
    config.bind = "127.0.0.1:0".parse()?;
    config.fallback_servers = vec![(other, ServerTrust::first_use(other.to_string()))];
    Ok(Endpoint::bind(config).await?)
}

/// One failover run: returns (ms to bob's registration with n1, ms to audio at bob again),
/// both from the kill.
async fn failover_once(redis: &Redis, r: usize) -> Result<(f64, f64)> {
    let (n1, n2) = (node(redis, &format!("f1-{r}"))?, node(redis, &format!("f2-{r}"))?);
    let (alice, bob) = (
        peer(n1.addr, n2.addr, &format!("alice{r}")).await?,
        peer(n2.addr, n1.addr, &format!("bob{r}")).await?,
    );
    let origin = Instant::now();
    let last_rx = Arc::new(AtomicU64::new(0));
    let arrivals = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let listener = {
        let (bob, last_rx, arrivals) = (bob.clone(), last_rx.clone(), arrivals.clone());
        tokio::spawn(async move {
            let call = bob.accept().await?.accept().await?;
            while let Some(f) = call.recv_frame().await {
                if f.track == Track::AUDIO {
                    let at = origin.elapsed().as_nanos() as u64;
                    last_rx.store(at, Ordering::Relaxed);
                    arrivals.lock().unwrap_or_else(|p| p.into_inner()).push(at);
                }
            }
            anyhow::Ok(())
        })
    };
    let call = tokio::time::timeout(WAIT, alice.call(&format!("bob{r}"), Policy::RelayOnly))
        .await
        .context("the call did not connect")??;
    let call = Arc::new(call);
    let source = crate::resume::audio_source(call.clone());
    let deadline = Instant::now() + WAIT;
    while last_rx.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline {
            bail!("no audio before the failure");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = bob.server_state();
    let killed = Instant::now();
    drop(n2);
    let killed_ns = origin.elapsed().as_nanos() as u64;
    // bob: lost, then registered again (with n1).
    let mut state = seen;
    let registered = loop {
        state = tokio::time::timeout(WAIT, bob.server_changed(&state))
            .await
            .context("bob did not register again")?;
        if state == ServerState::Up {
            break killed.elapsed();
        }
    };
    if bob.server() != n1.addr {
        bail!("bob registered with {} rather than n1", bob.server());
    }
    // Audio flows again once frames keep coming well after the failure.
    let deadline = Instant::now() + WAIT;
    while last_rx.load(Ordering::Relaxed) <= killed_ns + 1_000_000_000 + registered.as_nanos() as u64 {
        if Instant::now() > deadline {
            bail!("no audio within {WAIT:?} of the failure");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The outage: the first frame after the kill that follows a gap (frames come every
    // 20 ms; a gap of 60 ms or more is the outage) marks the resume.
    let resumed = {
        let a = arrivals.lock().unwrap_or_else(|p| p.into_inner());
        let after: Vec<u64> = a.iter().copied().filter(|&t| t > killed_ns).collect();
        let mut prev = a.iter().copied().rfind(|&t| t <= killed_ns).unwrap_or(killed_ns);
        let mut at = None;
        for t in after {
            if t.saturating_sub(prev) >= 60_000_000 {
                at = Some(t);
                break;
            }
            prev = t;
        }
        Duration::from_nanos(at.map_or(0, |t| t.saturating_sub(killed_ns)))
    };
    call.hangup("done");
    source.abort();
    let _ = tokio::time::timeout(Duration::from_secs(3), listener).await;
    alice.close().await;
    bob.close().await;
    drop(n1);
    Ok((registered.as_secs_f64() * 1000.0, resumed.as_secs_f64() * 1000.0))
}
