//! natcall side by side with coturn: every figure for both servers, runs alternating
//! (natcall, coturn, natcall, coturn…), medians with their spread, ratios natcall/coturn.
//! Prints Markdown tables; draws the latency-vs-load chart.
//!
//! 1. the machine (cores, CPU, kernel, coturn version);
//! 2. STUN Binding rate, 1 in flight and saturated;
//! 3. relay at the headline load (`calls` × `rate` packets/s each way): natcall, coturn with
//!    UDP clients, coturn with TCP clients, and the direct baseline (no relay);
//! 4. the raw UDP ceiling;
//! 5. the sweep: latency and loss against offered load, and from it each path's throughput
//!    at < 1 % loss and p99 < 20 ms;
//! 6. memory: per idle registered peer, per idle relayed call, per idle coturn allocation.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::chart::{self, Series};
use crate::load::{Load, Outcome, spread};
use crate::{coturn, direct, peers, relay, server, stun};

/// Where the traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Path {
    /// natcall-rendezvous's relay (TCP relay frames).
    Natcall,
    /// coturn, clients over UDP.
    CoturnUdp,
    /// coturn, clients over TCP.
    CoturnTcp,
    /// No relay: peer to peer over UDP.
    Direct,
}

impl Path {
    pub const ALL: [Path; 4] = [Path::Natcall, Path::CoturnUdp, Path::CoturnTcp, Path::Direct];

    pub fn name(self) -> &'static str {
        match self {
            Path::Natcall => "natcall",
            Path::CoturnUdp => "coturn UDP",
            Path::CoturnTcp => "coturn TCP",
            Path::Direct => "direct (no relay)",
        }
    }

    pub async fn run(self, load: Load) -> Result<Outcome> {
        match self {
            Path::Natcall => relay::run(load).await,
            Path::CoturnUdp => coturn::run(load, false).await,
            Path::CoturnTcp => coturn::run(load, true).await,
            Path::Direct => direct::run(load).await,
        }
    }
}

/// Sizes of a comparison.
#[derive(Debug, Clone)]
pub struct Plan {
    pub runs: usize,
    pub seconds: Duration,
    pub stun_seconds: Duration,
    pub calls: usize,
    pub rate: f64,
    pub sweep_calls: usize,
    pub sweep_seconds: Duration,
    /// Offered packets/s (both directions, all calls) per sweep point.
    pub sweep_offered: Vec<f64>,
    pub idle_peers: usize,
    pub idle_calls: usize,
    pub chart: Option<PathBuf>,
}

impl Plan {
    pub fn full(runs: usize, chart: Option<PathBuf>) -> Self {
        Self {
            runs,
            seconds: Duration::from_secs(4),
            stun_seconds: Duration::from_secs(2),
            calls: 200,
            rate: 50.0,
            sweep_calls: 100,
            sweep_seconds: Duration::from_secs(3),
            sweep_offered: vec![
                5_000.0, 10_000.0, 20_000.0, 40_000.0, 60_000.0, 80_000.0, 100_000.0, 140_000.0, 180_000.0, 220_000.0,
                260_000.0, 320_000.0,
            ],
            idle_peers: 10_000,
            idle_calls: 2_500,
            chart,
        }
    }

    /// Every comparison once with tiny counts: a smoke test, not a measurement.
    pub fn quick(chart: Option<PathBuf>) -> Self {
        Self {
            runs: 1,
            seconds: Duration::from_millis(400),
            stun_seconds: Duration::from_millis(200),
            calls: 4,
            rate: 50.0,
            sweep_calls: 2,
            sweep_seconds: Duration::from_millis(400),
            sweep_offered: vec![400.0, 1_600.0],
            idle_peers: 50,
            idle_calls: 20,
            chart,
        }
    }
}

fn fmt_spread(v: &[f64], digits: usize) -> String {
    let (m, lo, hi) = spread(v);
    if v.len() <= 1 {
        format!("{m:.digits$}")
    } else {
        format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
    }
}

fn ratio(a: &[f64], b: &[f64]) -> String {
    let (a, b) = (spread(a).0, spread(b).0);
    if b == 0.0 || a.is_nan() || b.is_nan() {
        "–".into()
    } else {
        format!("{:.2}", a / b)
    }
}

/// Fails when a path delivered nothing: the tool is broken, not slow.
fn check(path: Path, o: &Outcome) -> Result<()> {
    if o.received == 0 {
        bail!("{}: no packet was delivered ({} sent)", path.name(), o.sent);
    }
    Ok(())
}

pub async fn run(plan: Plan) -> Result<()> {
    machine()?;
    stun_rates(&plan).await?;
    headline(&plan).await?;
    ceiling(&plan)?;
    sweep(&plan).await?;
    memory(&plan).await?;
    Ok(())
}

fn machine() -> Result<()> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("## Machine\n");
    println!("- cores: {cores}; CPU: {cpu}; kernel: Linux {}", kernel.trim());
    println!("- coturn: {}", coturn::version()?);
    println!();
    Ok(())
}

async fn stun_rates(plan: &Plan) -> Result<()> {
    let (mut one, mut sat) = ([vec![], vec![]], [vec![], vec![]]);
    for _ in 0..plan.runs {
        for (i, which) in ["natcall", "coturn"].into_iter().enumerate() {
            // The server lives until the end of this iteration.
            let (natcall, turn) = if which == "natcall" {
                (Some(server::Spawned::start()?), None)
            } else {
                (None, Some(coturn::Coturn::start().await?))
            };
            let addr = match (&natcall, &turn) {
                (Some(n), _) => n.addr,
                (_, Some(c)) => c.addr,
                _ => unreachable!("one of the two is started above"),
            };
            let o = stun::load(addr, 1, 1, plan.stun_seconds).await?;
            let s = stun::load(addr, 8, 32, plan.stun_seconds).await?;
            if o.answered == 0 || s.answered == 0 {
                bail!("{which}: no STUN Binding was answered");
            }
            one[i].push(o.rate());
            sat[i].push(s.rate());
        }
    }
    println!(
        "## STUN Binding requests answered per second ({} runs, alternating)\n",
        plan.runs
    );
    println!("| load | natcall | coturn | natcall/coturn |\n|---|---|---|---|");
    println!(
        "| 1 in flight | {} | {} | {} |",
        fmt_spread(&one[0], 0),
        fmt_spread(&one[1], 0),
        ratio(&one[0], &one[1])
    );
    println!(
        "| saturated (8 sockets × 32 in flight) | {} | {} | {} |\n",
        fmt_spread(&sat[0], 0),
        fmt_spread(&sat[1], 0),
        ratio(&sat[0], &sat[1])
    );
    Ok(())
}

/// Per path, the figures of each run.
#[derive(Debug, Default, Clone)]
struct Figures {
    delivered: Vec<f64>,
    loss: Vec<f64>,
    p50: Vec<f64>,
    p90: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    cpu: Vec<f64>,
    cpu_per_packet: Vec<f64>,
    rss_mib: Vec<f64>,
    client_cpu: Vec<f64>,
}

impl Figures {
    fn push(&mut self, o: &Outcome) {
        self.delivered.push(o.delivered_rate());
        self.loss.push(o.loss() * 100.0);
        self.p50.push(o.latency_ms(0.5));
        self.p90.push(o.latency_ms(0.9));
        self.p99.push(o.latency_ms(0.99));
        self.p999.push(o.latency_ms(0.999));
        self.cpu.push(o.server_cpu);
        self.cpu_per_packet.push(o.cpu_us_per_packet());
        self.rss_mib.push(o.server_rss as f64 / (1024.0 * 1024.0));
        self.client_cpu.push(o.client_cpu);
    }
}

async fn headline(plan: &Plan) -> Result<()> {
    let load = Load {
        calls: plan.calls,
        rate: Some(plan.rate),
        duration: plan.seconds,
    };
    let mut f = vec![Figures::default(); Path::ALL.len()];
    for _ in 0..plan.runs {
        for (i, p) in Path::ALL.into_iter().enumerate() {
            let o = p.run(load).await?;
            check(p, &o)?;
            f[i].push(&o);
        }
    }
    println!(
        "## Relay: {} calls × {:.0} packets/s each way ({:.0} packets/s offered, 512 B), {} s, {} runs\n",
        plan.calls,
        plan.rate,
        load.offered().unwrap_or(0.0),
        plan.seconds.as_secs_f64(),
        plan.runs
    );
    println!("Median (min–max) over runs; ratios are natcall/coturn of the medians.\n");
    println!(
        "| figure | natcall | coturn UDP | coturn TCP | direct (no relay) | natcall/coturn UDP | natcall/coturn TCP |"
    );
    println!("|---|---|---|---|---|---|---|");
    type Get = fn(&Figures) -> &Vec<f64>;
    let rows: [(&str, Get, usize, bool); 10] = [
        ("delivered packets/s", |f| &f.delivered, 0, false),
        ("loss %", |f| &f.loss, 3, false),
        ("one-way p50 ms", |f| &f.p50, 3, false),
        ("p90 ms", |f| &f.p90, 3, false),
        ("p99 ms", |f| &f.p99, 3, false),
        ("p99.9 ms", |f| &f.p999, 3, false),
        ("server CPU s", |f| &f.cpu, 2, true),
        ("server CPU µs per packet", |f| &f.cpu_per_packet, 1, true),
        ("server peak RSS MiB", |f| &f.rss_mib, 1, true),
        ("load generator CPU s (all clients)", |f| &f.client_cpu, 2, false),
    ];
    for (name, get, d, server_only) in rows {
        let direct = if server_only {
            "–".into()
        } else {
            fmt_spread(get(&f[3]), d)
        };
        println!(
            "| {name} | {} | {} | {} | {direct} | {} | {} |",
            fmt_spread(get(&f[0]), d),
            fmt_spread(get(&f[1]), d),
            fmt_spread(get(&f[2]), d),
            ratio(get(&f[0]), get(&f[1])),
            ratio(get(&f[0]), get(&f[2])),
        );
    }
    let added = |i: usize| -> Vec<f64> { f[i].p99.iter().zip(&f[3].p99).map(|(a, b)| a - b).collect() };
    println!(
        "| relay-added p99 ms (p99 − direct p99, same run) | {} | {} | {} | – | {} | {} |\n",
        fmt_spread(&added(0), 3),
        fmt_spread(&added(1), 3),
        fmt_spread(&added(2), 3),
        ratio(&added(0), &added(1)),
        ratio(&added(0), &added(2)),
    );
    Ok(())
}

fn ceiling(plan: &Plan) -> Result<()> {
    let (mut rate, mut loss) = (vec![], vec![]);
    for _ in 0..plan.runs {
        let (sent, got, elapsed) = direct::ceiling(plan.seconds)?;
        if got == 0 {
            bail!("the raw UDP ceiling delivered nothing");
        }
        rate.push(got as f64 / elapsed.as_secs_f64());
        loss.push(100.0 * (1.0 - got as f64 / sent.max(1) as f64));
    }
    println!(
        "## Raw UDP ceiling (one sender thread → one receiver thread, 512 B, {} runs)\n",
        plan.runs
    );
    println!("| delivered packets/s | loss % |\n|---|---|");
    println!("| {} | {} |\n", fmt_spread(&rate, 0), fmt_spread(&loss, 1));
    Ok(())
}

async fn sweep(plan: &Plan) -> Result<()> {
    // per path, per point, the figures of each run
    let mut f = vec![vec![Figures::default(); plan.sweep_offered.len()]; Path::ALL.len()];
    for (k, &offered) in plan.sweep_offered.iter().enumerate() {
        let load = Load {
            calls: plan.sweep_calls,
            rate: Some(offered / (2.0 * plan.sweep_calls as f64)),
            duration: plan.sweep_seconds,
        };
        for _ in 0..plan.runs {
            for (i, p) in Path::ALL.into_iter().enumerate() {
                let o = p.run(load).await?;
                check(p, &o)?;
                f[i][k].push(&o);
            }
        }
    }
    println!(
        "## Sweep: latency and loss against offered load ({} calls, {} s per point, {} runs, medians)\n",
        plan.sweep_calls,
        plan.sweep_seconds.as_secs_f64(),
        plan.runs
    );
    println!("| offered packets/s | path | delivered packets/s | loss % | p50 ms | p99 ms | server CPU µs/packet |");
    println!("|---|---|---|---|---|---|---|");
    for (k, offered) in plan.sweep_offered.iter().enumerate() {
        for (i, p) in Path::ALL.into_iter().enumerate() {
            let x = &f[i][k];
            let cpu = if p == Path::Direct {
                "–".into()
            } else {
                format!("{:.1}", spread(&x.cpu_per_packet).0)
            };
            println!(
                "| {offered:.0} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {cpu} |",
                p.name(),
                spread(&x.delivered).0,
                spread(&x.loss).0,
                spread(&x.p50).0,
                spread(&x.p99).0,
            );
        }
    }
    // Throughput at < 1 % loss and p99 < 20 ms: per run, the highest delivered rate of a point
    // meeting both; then median and spread over runs.
    let good: Vec<Vec<f64>> = (0..Path::ALL.len())
        .map(|i| {
            (0..plan.runs)
                .map(|r| {
                    f[i].iter()
                        .filter(|x| x.loss[r] < 1.0 && x.p99[r] < 20.0)
                        .map(|x| x.delivered[r])
                        .fold(0.0, f64::max)
                })
                .collect()
        })
        .collect();
    let top = plan.sweep_offered.last().copied().unwrap_or(0.0);
    println!(
        "\nThroughput at < 1 % loss and p99 < 20 ms (highest sweep point meeting both; the sweep stops at {top:.0} offered):\n"
    );
    println!(
        "| natcall | coturn UDP | coturn TCP | direct | natcall/coturn UDP | natcall/coturn TCP |\n|---|---|---|---|---|---|"
    );
    // A path that still met both at the top point has a limit above the sweep: "≥".
    let capped = |i: usize| {
        let at_top = f[i]
            .last()
            .is_some_and(|x| (0..plan.runs).any(|r| x.loss[r] < 1.0 && x.p99[r] < 20.0));
        let v = fmt_spread(&good[i], 0);
        if at_top { format!("≥ {v}") } else { v }
    };
    println!(
        "| {} | {} | {} | {} | {} | {} |\n",
        capped(0),
        capped(1),
        capped(2),
        capped(3),
        ratio(&good[0], &good[1]),
        ratio(&good[0], &good[2]),
    );
    if let Some(out) = &plan.chart {
        let mut series = Vec::new();
        for (i, p) in Path::ALL.into_iter().enumerate() {
            for (q, thin) in [("p99", false), ("p50", true)] {
                let points = plan
                    .sweep_offered
                    .iter()
                    .zip(&f[i])
                    .map(|(o, x)| (*o, spread(if thin { &x.p50 } else { &x.p99 }).0))
                    .collect();
                series.push(Series {
                    label: format!("{} {q}", p.name()),
                    points,
                    color: i,
                    thin,
                });
            }
        }
        let title = format!(
            "One-way latency vs offered load, {} calls, 512-byte packets, loopback",
            plan.sweep_calls
        );
        match chart::latency_vs_load(out, &title, &series) {
            Ok(()) => println!("Chart: {}\n", out.display()),
            Err(e) => eprintln!("no chart: {e:#}"),
        }
    }
    Ok(())
}

async fn memory(plan: &Plan) -> Result<()> {
    let s = server::Spawned::start()?;
    let peers = peers::idle(&s, plan.idle_peers).await?;
    drop(s);
    let (nb, na) = relay::idle_calls(plan.idle_calls).await?;
    let (cb, ca, allocs) = coturn::idle_allocations(plan.idle_calls, false).await?;
    let per = |b: u64, a: u64, n: usize| a.saturating_sub(b) as f64 / n.max(1) as f64;
    let natcall_call = per(nb, na, plan.idle_calls);
    let coturn_call = per(cb, ca, plan.idle_calls);
    println!("## Memory (RSS growth of the server process; one run each)\n");
    println!("| what | count | RSS before KiB | after KiB | per item |\n|---|---|---|---|---|");
    println!(
        "| natcall: idle registered peer | {} | {} | {} | {:.0} B |",
        peers.count,
        peers.rss_before / 1024,
        peers.rss_after / 1024,
        peers.per_peer()
    );
    println!(
        "| natcall: idle relayed call (2 registered peers + the call) | {} | {} | {} | {natcall_call:.0} B |",
        plan.idle_calls,
        nb / 1024,
        na / 1024
    );
    println!(
        "| coturn: idle allocation (UDP client, permission + channel) | {allocs} | {} | {} | {:.0} B |",
        cb / 1024,
        ca / 1024,
        per(cb, ca, allocs)
    );
    println!(
        "| coturn: idle relayed call (2 allocations) | {} | | | {coturn_call:.0} B |",
        plan.idle_calls
    );
    println!(
        "\nnatcall/coturn per relayed call: {:.2}\n",
        natcall_call / coturn_call.max(1.0)
    );
    if peers.rss_after == 0 || na == 0 || ca == 0 {
        bail!("a memory figure is missing");
    }
    Ok(())
}
