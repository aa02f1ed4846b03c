//! `natcall-lab`: NAT scenarios in network namespaces with the real natcall binaries.
//! Flags are parsed here; the lab lives in the `natcall_lab` library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use natcall_lab::setup_bench::{self, BenchOptions};
use natcall_lab::{Binaries, Impairment, Kind, RunOptions, Scenario, matrix};

const KINDS_HELP: &str = "\
Kinds (RFC 4787: mapping = which external port a NAT gives one internal socket; filtering = \
which outside senders may use it):
  public              no NAT, no firewall: the peer's own address is public
  full-cone           EIM + EIF: one external port for all destinations (endpoint-independent
                      mapping); anyone may send to it (endpoint-independent filtering)
  address-restricted  EIM + ADF: one external port; only hosts the peer sent to may answer, from
                      any of their ports (address-dependent filtering)
  port-restricted     EIM + APDF: one external port; only the exact address:port the peer sent to
                      may answer (address-and-port-dependent filtering; most home routers)
  symmetric           EDM + APDF: a new random external port per destination (endpoint-dependent
                      mapping); only that destination may answer
  cgnat               a port-restricted home NAT behind a port-restricted carrier NAT
                      (100.64.0.0/10, RFC 6888): two NATs in a row
  udp-blocked         a port-restricted NAT whose firewall drops all UDP: only TCP leaves, so
                      only the relay works
  same-lan            both peers behind one port-restricted router (use as --a and --b), with
                      --hairpin or without: LAN addresses must win

Expected paths: LAN for same-lan; relay when UDP is blocked on either side or when a symmetric
peer meets a port-restricted, cgnat or symmetric one; direct otherwise.

Needs root (or unprivileged user namespaces), nft (Debian package nftables), tc and ip
(iproute2), and the natcall and natcall-rendezvous binaries next to this one (or --bin-dir).";

/// Run natcall calls through emulated NATs in Linux network namespaces (patchbay).
#[derive(Debug, Parser)]
#[command(version, about, after_help = KINDS_HELP)]
struct Args {
    /// Directory with the natcall and natcall-rendezvous binaries (default: next to natcall-lab).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run every pair of kinds and print a table; exits 1 on any mismatch.
    Matrix {
        /// Print the outcomes as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Scenarios run at once, each in its own lab.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Keep every scenario's logs in DIR/<scenario>/ (failures are always kept).
        #[arg(long)]
        keep_logs: Option<PathBuf>,
    },
    /// Run one scenario and keep its logs.
    Run {
        /// The caller's kind.
        #[arg(long)]
        a: String,
        /// The callee's kind.
        #[arg(long)]
        b: String,
        /// With same-lan: the router hairpins.
        #[arg(long)]
        hairpin: bool,
        /// Added one-way delay on each peer's uplink, each direction, ms.
        #[arg(long, default_value_t = 0)]
        delay: u64,
        /// Delay varies within delay ± jitter, ms.
        #[arg(long, default_value_t = 0)]
        jitter: u64,
        /// Packet loss on each peer's uplink, each direction, percent.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Let packets overtake each other (each keeps its own jitter draw).
        #[arg(long)]
        reorder: bool,
        /// Keep the logs in DIR/<scenario>/ (default: a temporary folder, printed).
        #[arg(long)]
        keep_logs: Option<PathBuf>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One scenario run --count times, each in a fresh lab: how often the call ends on the
    /// expected path, and how long it takes to get there (median, p90, max), with each run's
    /// birthday probes and sockets; a Markdown table. Exits 1 if a run misses the path.
    Trials {
        /// The caller's kind.
        #[arg(long, default_value = "symmetric")]
        a: String,
        /// The callee's kind.
        #[arg(long, default_value = "port-restricted")]
        b: String,
        /// Runs.
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Print the runs as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Two rendezvous servers on two public hosts sharing one Redis, alice behind NAT A homed
    /// on the first, bob behind NAT B on the second: the call crosses servers and must end on
    /// the path the oracle gives for the two NATs (the relay with --policy relay-only), with
    /// chat both ways. Exits 1 otherwise.
    TwoServers {
        /// alice's kind.
        #[arg(long, default_value = "port-restricted")]
        a: String,
        /// bob's kind.
        #[arg(long, default_value = "port-restricted")]
        b: String,
        /// alice's call policy (auto, direct-only, relay-only).
        #[arg(long, default_value = "auto")]
        policy: String,
        /// Keep the logs in DIR (default: a temporary folder, kept only on failure).
        #[arg(long)]
        keep_logs: Option<PathBuf>,
    },
    /// `natcall netcheck` behind each NAT kind against natcall-rendezvous --alternate-ip and
    /// against coturn's turnserver on the same two addresses, and coturn's
    /// turnutils_natdiscovery against natcall-rendezvous: a Markdown table of what each saw
    /// next to what the lab built. Exits 1 on any disagreement.
    Netcheck {
        /// The kinds, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        kinds: Option<Vec<String>>,
        /// Kinds run at once, each in its own lab.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Keep the logs in DIR/<kind>/ (default: a temporary folder, removed).
        #[arg(long)]
        keep_logs: Option<PathBuf>,
        /// Print the rows as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Call quality on slow links: each scenario (a 400 kbit/s downlink, a cap that drops from
    /// 2 Mbit/s to 300 kbit/s and back, 2 % loss and its lossless reference, a download beside
    /// the call) on the direct path and through the relay, one call at a time; a Markdown table,
    /// and with --charts a PNG of the target and what reached the callee over time per run.
    Quality {
        /// Scenarios to run (default: all of cap400, steps, loss2, lossless, bulk).
        #[arg(long, value_delimiter = ',')]
        scenarios: Option<Vec<String>>,
        /// Paths to run them on (default: direct,relay).
        #[arg(long, value_delimiter = ',')]
        paths: Option<Vec<String>>,
        /// Write one chart per run into DIR (<scenario>-<path>.png).
        #[arg(long)]
        charts: Option<PathBuf>,
        /// Keep every run's logs in DIR/<scenario>-<path>/ (failed runs are always kept).
        #[arg(long)]
        keep_logs: Option<PathBuf>,
        /// Print the outcomes as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A room: one peer per kind given (each behind its own router), all in one `natcall room`
    /// with the built-in test source for --seconds; a Markdown table per pair (receiver ←
    /// sender): the session's path and the one expected for those kinds, audio frames on time
    /// and video frames complete and on time. Exits 1 if a path is not the expected one.
    Room {
        /// The members' kinds, comma-separated (default: public,port-restricted,symmetric,udp-blocked).
        #[arg(long, value_delimiter = ',')]
        kinds: Option<Vec<String>>,
        /// Seconds the room runs once everyone is connected.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Every member's `natcall room --topology`: mesh, fan-out or auto.
        #[arg(long, default_value = "mesh")]
        topology: String,
        /// Cap a member's downlink: its position in --kinds (from 1) and kbit/s, e.g. 3:600;
        /// repeatable.
        #[arg(long, value_name = "MEMBER:KBIT")]
        cap: Vec<String>,
        /// Cap a member's uplink the same way, e.g. 1:1200; repeatable.
        #[arg(long, value_name = "MEMBER:KBIT")]
        uplink_cap: Vec<String>,
        /// Keep the logs and reports in DIR.
        #[arg(long)]
        keep_logs: Option<PathBuf>,
    },
    /// Call-setup benchmark: sequential calls per pair (public, port-restricted, relay-only) and
    /// one-way delay; time to connected and to first audio next to the protocol's floor.
    SetupBench {
        /// Counted calls per cell (after one warm-up call).
        #[arg(long)]
        calls: Option<usize>,
        /// One-way delays between the peers, ms (each access link gets half; comma-separated).
        #[arg(long, value_delimiter = ',')]
        delays: Option<Vec<u64>>,
        /// 2 calls per cell, delays 0 and 20 ms (unless --calls/--delays say otherwise).
        #[arg(long)]
        quick: bool,
        /// Print the cells as JSON instead of a Markdown table.
        #[arg(long)]
        json: bool,
        /// Keep every cell's logs in DIR/<pair>-<delay>ms/ (failed cells are always kept).
        #[arg(long)]
        keep_logs: Option<PathBuf>,
    },
}

/// `natcall-lab quality`: the scenarios one after the other, then the table (or JSON).
async fn quality(
    bins: &Binaries,
    scenarios: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    charts: Option<PathBuf>,
    keep_logs: Option<PathBuf>,
    json: bool,
) -> Result<bool> {
    use natcall_lab::quality::{QualityPath, bench, run_quality};
    let names = scenarios.unwrap_or_else(|| bench::PRESETS.map(String::from).to_vec());
    let paths = paths.unwrap_or_else(|| vec!["direct".into(), "relay".into()]);
    let mut specs = Vec::new();
    for name in &names {
        for p in &paths {
            let path = match p.as_str() {
                "direct" => QualityPath::Direct,
                "relay" => QualityPath::Relay,
                other => bail!("unknown path {other:?}: direct or relay"),
            };
            let spec = bench::preset(name, path)
                .with_context(|| format!("unknown scenario {name:?}: one of {}", bench::PRESETS.join(", ")))?;
            specs.push(spec);
        }
    }
    for dir in [&charts, &keep_logs].into_iter().flatten() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for spec in &specs {
        let slug = format!("{}-{}", spec.name, spec.path);
        eprintln!("running {slug} ({} s)…", spec.duration.as_secs());
        let (dir, temp) = match &keep_logs {
            Some(base) => (base.join(&slug), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix(&format!("natcall-quality-{slug}-"))
                    .tempdir()
                    .context("creating a log folder")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let outcome = run_quality(bins, spec, &dir).await?;
        if let Some(e) = &outcome.error {
            eprintln!("{slug} failed: {e} (logs in {})", dir.display());
            if let Some(t) = temp {
                let _ = t.keep();
            }
        }
        if let Some(out) = &charts {
            let png = out.join(format!("{slug}.png"));
            match bench::chart(&outcome, &png) {
                Ok(()) => eprintln!("chart: {}", png.display()),
                Err(e) => eprintln!("no chart for {slug}: {e:#}"),
            }
        }
        outcomes.push(outcome);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
    } else {
        println!("{}", bench::table(&outcomes));
        println!("wall time {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(outcomes.iter().all(|o| o.error.is_none()))
}

fn scenario(a: &str, b: &str, hairpin: bool) -> Result<Scenario> {
    match (a, b) {
        ("same-lan", "same-lan") => Ok(Scenario::SameLan { hairpin }),
        ("v6-firewalled", "v6-firewalled") => Ok(Scenario::V6(natcall_lab::V6Case::FirewalledV6)),
        ("dual-stack", "dual-stack") => Ok(Scenario::V6(natcall_lab::V6Case::DualStack)),
        ("v6-only", "v4-only") => Ok(Scenario::V6(natcall_lab::V6Case::V6OnlyToV4Only)),
        ("same-lan", _) | (_, "same-lan") => {
            bail!("same-lan puts both peers behind one router: use --a same-lan --b same-lan")
        }
        _ => Ok(Scenario::pair(a.parse::<Kind>()?, b.parse::<Kind>()?)),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let outcome = run(args);
    // Killed: the signal's thread exits with its status once the children are stopped.
    natcall_lab::reap::wait_if_signalled();
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("natcall-lab: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<bool> {
    // Unprivileged: enter a user namespace before any thread exists (the runtime's included).
    if !natcall_lab::topology::is_root() {
        patchbay::init_userns().context("entering a user namespace (or run as root)")?;
    }
    natcall_lab::preflight()?;
    // Killed, it stops what it started (see `reap`).
    natcall_lab::reap::stop_children_on_signal().context("handling SIGINT, SIGTERM and SIGHUP")?;
    let bins = Binaries::locate(args.bin_dir.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        match args.cmd {
            Cmd::Matrix { json, jobs, keep_logs } => {
                let started = Instant::now();
                let opts = RunOptions {
                    keep_logs,
                    ..RunOptions::default()
                };
                let outcomes = matrix::run(&bins, Scenario::matrix(), jobs, &opts).await;
                for o in outcomes.iter().filter(|o| !o.passed()) {
                    eprintln!("{}\n", o.diagnostics());
                }
                if json {
                    println!("{}", serde_json::to_string_pretty(&outcomes)?);
                } else {
                    println!("{}", matrix::table(&outcomes));
                    println!("wall time {:.1} s", started.elapsed().as_secs_f64());
                }
                Ok(outcomes.iter().all(|o| o.passed()))
            }
            Cmd::Run {
                a,
                b,
                hairpin,
                delay,
                jitter,
                loss,
                reorder,
                keep_logs,
                json,
            } => {
                let imp = Impairment {
                    delay: Duration::from_millis(delay),
                    jitter: Duration::from_millis(jitter),
                    loss_pct: loss,
                    seed: 1,
                    reorder,
                };
                let opts = RunOptions {
                    impair_a: Some(imp),
                    impair_b: Some(imp),
                    keep_logs,
                };
                let outcome = natcall_lab::run_scenario(&bins, scenario(&a, &b, hairpin)?, &opts).await;
                if json {
                    println!("{}", serde_json::to_string_pretty(&outcome)?);
                } else if outcome.passed() {
                    println!("{}", matrix::table(std::slice::from_ref(&outcome)));
                    if let Some(dir) = &outcome.log_dir {
                        println!("logs in {}", dir.display());
                    }
                } else {
                    println!("{}", outcome.diagnostics());
                }
                Ok(outcome.passed())
            }
            Cmd::Netcheck {
                kinds,
                jobs,
                keep_logs,
                json,
            } => {
                let kinds = match kinds {
                    Some(k) => k.iter().map(|k| k.parse::<Kind>()).collect::<Result<Vec<_>, _>>()?,
                    None => Kind::ALL.to_vec(),
                };
                let tmp = tempfile::tempdir().context("a temporary folder for the logs")?;
                let dir = keep_logs.unwrap_or_else(|| tmp.path().to_path_buf());
                let rows = natcall_lab::netcheck::run(&bins, &kinds, jobs, &dir).await;
                for r in rows.iter().filter(|r| r.error.is_some()) {
                    eprintln!("{}: {}", r.kind, r.error.as_deref().unwrap_or_default());
                }
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    println!("{}", natcall_lab::netcheck::table(&rows));
                }
                Ok(rows.iter().all(|r| r.agrees()))
            }
            Cmd::TwoServers {
                a,
                b,
                policy,
                keep_logs,
            } => {
                let (a, b) = (a.parse::<Kind>()?, b.parse::<Kind>()?);
                let temp = tempfile::Builder::new().prefix("natcall-lab-two-servers-").tempdir()?;
                let dir = keep_logs.unwrap_or_else(|| temp.path().to_path_buf());
                std::fs::create_dir_all(&dir)?;
                let run = natcall_lab::cluster::run(&bins, a, b, &policy, &dir).await?;
                println!("{}", run.summary());
                if !run.passed() {
                    let _ = temp.keep();
                }
                Ok(run.passed())
            }
            Cmd::Trials { a, b, count, json } => {
                let trials =
                    natcall_lab::trials::run(&bins, scenario(&a, &b, false)?, count, &RunOptions::default()).await;
                if json {
                    println!("{}", serde_json::to_string_pretty(&trials)?);
                } else {
                    println!("{}", natcall_lab::trials::table(&trials));
                }
                Ok(trials.on_expected_path == trials.runs.len())
            }
            Cmd::Quality {
                scenarios,
                paths,
                charts,
                keep_logs,
                json,
            } => quality(&bins, scenarios, paths, charts, keep_logs, json).await,
            Cmd::Room {
                kinds,
                seconds,
                topology,
                cap,
                uplink_cap,
                keep_logs,
            } => room(&bins, kinds, seconds, &topology, &cap, &uplink_cap, keep_logs).await,
            Cmd::SetupBench {
                calls,
                delays,
                quick,
                json,
                keep_logs,
            } => {
                let mut opts = if quick {
                    BenchOptions::quick()
                } else {
                    BenchOptions::full()
                };
                opts.calls = calls.unwrap_or(opts.calls).clamp(1, 1000);
                opts.delays_ms = delays.unwrap_or(opts.delays_ms);
                opts.keep_logs = keep_logs;
                let started = Instant::now();
                let cells = setup_bench::run(&bins, &opts).await;
                for c in cells.iter().filter(|c| !c.errors.is_empty()) {
                    eprintln!("{} at {} ms: {}", c.pair.label(), c.delay_ms, c.errors.join("; "));
                    if let Some(dir) = &c.log_dir {
                        eprintln!("  (logs kept in {})", dir.display());
                    }
                }
                if json {
                    println!("{}", serde_json::to_string_pretty(&cells)?);
                } else {
                    println!("{}", setup_bench::table(&cells));
                    println!("wall time {:.1} s", started.elapsed().as_secs_f64());
                }
                Ok(cells.iter().all(|c| c.errors.is_empty()))
            }
        }
    })
}

/// `natcall-lab room`: one room of the given kinds; prints the per-pair table.
async fn room(
    bins: &Binaries,
    kinds: Option<Vec<String>>,
    seconds: f64,
    topology: &str,
    caps: &[String],
    uplink_caps: &[String],
    keep_logs: Option<PathBuf>,
) -> Result<bool> {
    if !["mesh", "fan-out", "auto"].contains(&topology) {
        bail!("--topology: mesh, fan-out or auto, not {topology:?}");
    }
    let names = kinds.unwrap_or_else(|| {
        ["public", "port-restricted", "symmetric", "udp-blocked"]
            .map(String::from)
            .to_vec()
    });
    let mut members = Vec::new();
    for (i, k) in names.iter().enumerate() {
        let kind: Kind = k.parse().map_err(|e| anyhow::anyhow!("--kinds: {e}"))?;
        members.push((format!("m{}-{k}", i + 1), kind));
    }
    if !(2..=8).contains(&members.len()) {
        bail!("--kinds: a room of 2 to 8 members");
    }
    let (dir, _tmp) = match keep_logs {
        Some(d) => {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            (d, None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("natcall-lab-room-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let mut options = natcall_lab::room::RoomOptions {
        topology: topology.to_owned(),
        ..Default::default()
    };
    let parse = |flag: &str, c: &str| {
        c.split_once(':')
            .and_then(|(m, k)| Some((m.parse::<usize>().ok()?, k.parse::<u32>().ok()?)))
            .filter(|(m, k)| (1..=members.len()).contains(m) && *k > 0)
            .map(|(m, k)| (m - 1, k))
            .ok_or_else(|| anyhow::anyhow!("{flag} {c}: MEMBER:KBIT, MEMBER from 1 to {}", members.len()))
    };
    for c in caps {
        options.caps.push(parse("--cap", c)?);
    }
    for c in uplink_caps {
        options.uplink_caps.push(parse("--uplink-cap", c)?);
    }
    let refs: Vec<(&str, Kind)> = members.iter().map(|(n, k)| (n.as_str(), *k)).collect();
    let out = natcall_lab::room::run_room_with(bins, &refs, seconds, &options, &dir).await?;
    if out.error.is_some() {
        println!("{}", out.diagnostics());
        return Ok(false);
    }
    if topology != "mesh" {
        // Fan-out media (and mesh media, for members that stayed in mesh), per pair.
        println!("| receiver ← sender | session audio / video on time | fan-out audio / video on time |");
        println!("|---|---|---|");
        for (r, _) in &refs {
            for (s, _) in refs.iter().filter(|(s, _)| s != r) {
                let pct = |g: Option<natcall_lab::room::Received>| {
                    g.map_or("–".to_owned(), |g| {
                        format!("{:.1} % / {:.1} %", g.audio_on_time * 100.0, g.video_on_time * 100.0)
                    })
                };
                println!(
                    "| {r} ← {s} | {} | {} |",
                    pct(out.received(r, s)),
                    pct(out.received_fan_out(r, s))
                );
            }
        }
        for (name, _) in &refs {
            let changes = out.reports[*name]
                .as_ref()
                .and_then(|r| r["topology"].as_array().cloned())
                .unwrap_or_default();
            for c in changes {
                println!(
                    "{name}: {} at {:.1} s: {}",
                    c["mode"].as_str().unwrap_or("?"),
                    c["at_ms"].as_f64().unwrap_or(0.0) / 1000.0,
                    c["why"].as_str().unwrap_or("?")
                );
            }
        }
        return Ok(out.exit_codes.values().all(|c| *c == Some(0)));
    }
    println!("| receiver ← sender | path | expected | audio on time | video complete, on time |");
    println!("|---|---|---|---|---|");
    let mut ok = true;
    for (r, _) in &refs {
        for (s, _) in refs.iter().filter(|(s, _)| s != r) {
            let expected = out.expected_path(r, s);
            match out.received(r, s) {
                Some(got) => {
                    ok &= got.path == expected;
                    let name = |p: Option<natcall_lab::Path>| p.map_or("?", |p| p.name());
                    println!(
                        "| {r} ← {s} | {} | {} | {:.1} % | {:.1} % |",
                        name(got.path),
                        name(expected),
                        got.audio_on_time * 100.0,
                        got.video_on_time * 100.0
                    );
                }
                None => {
                    ok = false;
                    println!(
                        "| {r} ← {s} | no session | {} | – | – |",
                        expected.map_or("?", |p| p.name())
                    );
                }
            }
        }
    }
    Ok(ok)
}
