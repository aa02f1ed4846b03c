//! `natcall-bench`: load generators that drive a real `natcall-rendezvous` process from a
//! separate process over loopback. Every run is bounded in count and time.
//!
//! Side by side with Debian's coturn (`turnserver`, started the same way on loopback) where
//! the figure exists for both.
//!
//! - `compare`: every figure below for natcall, coturn (UDP and TCP clients) and the direct
//!   baseline, runs alternating, medians with spread and ratios natcall/coturn, and the
//!   latency-vs-load chart; `compare --quick` is the smoke test CI runs;
//! - `stun`: Binding requests answered per second, one in flight and saturated;
//! - `relay`: N calls × R packets/s each way through natcall, coturn (`--path`) or direct;
//! - `relay-sweep`: natcall's relay maximum, then latency at 50 % and 90 % of it;
//! - `relay-slow`: delay to a receiver slower than its sender, with the relay engine's bounds
//!   on and off;
//! - `media-crypto`: CPU cost of sealing and opening media packets;
//! - `media-path`: media between two `natcall` processes on the direct path (packets/s, Mbit/s,
//!   loss, CPU per Mbit);
//! - `resume`: how long a relayed call's media is down when its server is stopped and started
//!   again (SIGTERM or SIGKILL), and how long the SIGTERM drain takes;
//! - `idle-peers`: server memory (RSS) per registered idle peer;
//! - `cluster`: two nodes on one Redis beside a single server: memory per peer, call setup
//!   and relay within one server and across nodes, failover times.
//!
//! Modules: [`load`] (pacing, stamping, latency: shared by every path), [`relay`] (natcall
//! clients), [`turn`] (a TURN client), [`coturn`] (the coturn process and its load),
//! [`direct`] (no relay), [`compare`], [`chart`].

mod chart;
mod cluster;
mod compare;
mod coturn;
mod direct;
mod load;
mod media;
mod media_path;
mod peers;
mod relay;
mod resume;
mod room;
mod server;
mod stun;
mod turn;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "natcall load generators (loopback only, bounded in count and time)")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// STUN Binding requests per second the server answers.
    Stun {
        /// Server to load; without it a `natcall-rendezvous` is started on loopback.
        #[arg(long)]
        server: Option<SocketAddr>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Client sockets for the saturated measurement.
        #[arg(long, default_value_t = 8)]
        sockets: usize,
        /// Requests in flight per socket for the saturated measurement.
        #[arg(long, default_value_t = 32)]
        window: usize,
    },
    /// natcall vs coturn side by side: STUN, relay at a call-like load, raw UDP ceiling, a
    /// latency-vs-load sweep with its chart, memory. Prints Markdown.
    Compare {
        /// Every comparison once with tiny counts (a smoke test, well under a minute).
        #[arg(long)]
        quick: bool,
        /// Runs per figure (alternating natcall, coturn, ...).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Where to write the latency-vs-load chart (PNG).
        #[arg(long)]
        chart: Option<PathBuf>,
    },
    /// Relayed 512-byte packets: throughput and one-way latency through a real server.
    Relay {
        /// natcall, coturn-udp, coturn-tcp or direct (no relay).
        #[arg(long, value_enum, default_value = "natcall")]
        path: compare::Path,
        /// Concurrent relayed calls.
        #[arg(long, default_value_t = 1)]
        calls: usize,
        /// Frames per second per side; omit to saturate (a closed loop of 256 frames in flight).
        #[arg(long)]
        rate: Option<f64>,
        /// Seconds of load.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Room fan-out: ROOMS rooms of MEMBERS raw clients, each member sending 512-byte audio
    /// frames to its room at RATE frames/s; copies delivered per second, loss, one-way latency
    /// per copy, server CPU per copy.
    Room {
        /// Members per room.
        #[arg(long, default_value_t = 4)]
        members: usize,
        /// Rooms at once.
        #[arg(long, default_value_t = 1)]
        rooms: usize,
        /// Frames per second each member sends.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// Seconds of load.
        #[arg(long, default_value_t = 4)]
        seconds: u64,
    },
    /// Two cluster nodes on one Redis (started here, redis-server needed) beside one single
    /// server: memory per registered peer, call setup and relay throughput within one server
    /// and across nodes, and failover (a callee's home killed mid-call: time to register
    /// elsewhere and to audio flowing again, median of RUNS). Prints Markdown.
    Cluster {
        /// Idle registered peers for the memory figure.
        #[arg(long, default_value_t = 1000)]
        peers: usize,
        /// Calls set up for the setup-time figure (each way).
        #[arg(long, default_value_t = 20)]
        setups: usize,
        /// Relayed calls for the throughput figure.
        #[arg(long, default_value_t = 10)]
        calls: usize,
        /// Seconds of relay load.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Failover runs.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// The relay's maximum rate, then latency at 50 % and 90 % of it, for 1 and 50 calls.
    RelaySweep {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// A receiver slower than its sender, with the relay's buffer settings as given: audio
    /// delay and video delivered. Compares the default (ack window + bounded kernel send buffer)
    /// with the kernel bound off and with both off.
    RelaySlow {
        /// Seconds of load per configuration.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// The receiver's link, in bytes per second.
        #[arg(long, default_value_t = 40_000.0)]
        link: f64,
    },
    /// CPU cost of sealing and opening media packets (ChaCha20-Poly1305, 512-byte packets).
    MediaCrypto {
        /// Packets to seal and open.
        #[arg(long, default_value_t = 2_000_000)]
        packets: u64,
    },
    /// Media on the direct path between two `natcall` processes: packets/s and Mbit/s at
    /// 512-byte packets, loss and CPU per Mbit, for each media rate ceiling.
    MediaPath {
        /// Rate ceilings to try, Mbit/s.
        #[arg(long, value_delimiter = ',', default_values_t = [25.0, 50.0, 100.0, 200.0, 400.0, 800.0])]
        mbit: Vec<f64>,
        /// Seconds per call.
        #[arg(long, default_value_t = 4)]
        seconds: u64,
    },
    /// How long a relayed call's media is down when its server is stopped (SIGTERM or SIGKILL)
    /// and started again: from the new server accepting to media flowing.
    Resume {
        /// How the server is stopped.
        #[arg(long, value_enum, default_value = "kill")]
        stop: resume::Stop,
        /// Runs (the median is printed).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// How long the server stays down between its exit and its restart, ms.
        #[arg(long, default_value_t = 2000)]
        down_ms: u64,
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Server RSS per registered idle peer.
    IdlePeers {
        /// Peers to register (each a TCP connection).
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // On Ctrl-C or SIGTERM the work future is dropped, and with it every spawned server
    // (their guards kill the processes).
    rt.block_on(async {
        tokio::select! {
            r = work(args.cmd) => r,
            () = interrupted() => anyhow::bail!("interrupted; the servers this run started are stopped"),
        }
    })
}

async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn work(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Stun {
            server: addr,
            seconds,
            sockets,
            window,
        } => {
            let spawned = match addr {
                Some(_) => None,
                None => Some(server::Spawned::start()?),
            };
            let target = addr
                .or(spawned.as_ref().map(|s| s.addr))
                .expect("one of the two is set");
            let d = Duration::from_secs(seconds);
            let one = stun::load(target, 1, 1, d).await?;
            println!(
                "stun 1-in-flight: {:.0} bindings/s, median RTT {:?}",
                one.rate(),
                one.median_rtt()
            );
            let sat = stun::load(target, sockets, window, d).await?;
            println!(
                "stun saturated ({sockets} sockets x {window} in flight): {:.0} bindings/s, lost {}",
                sat.rate(),
                sat.lost
            );
            if let Some(s) = spawned {
                println!("server CPU: {:.2} s", s.cpu_seconds()?);
            }
        }
        Cmd::Resume {
            stop,
            runs,
            down_ms,
            json,
        } => resume::run(stop, runs, Duration::from_millis(down_ms), json).await?,
        Cmd::Compare { quick, runs, chart } => {
            let plan = if quick {
                compare::Plan::quick(chart)
            } else {
                compare::Plan::full(runs.max(1), chart)
            };
            compare::run(plan).await?;
        }
        Cmd::Relay {
            path,
            calls,
            rate,
            seconds,
        } => {
            let o = path
                .run(load::Load {
                    calls,
                    rate,
                    duration: Duration::from_secs(seconds),
                })
                .await?;
            print_relay(calls, rate, &o);
        }
        Cmd::Cluster {
            peers,
            setups,
            calls,
            seconds,
            runs,
        } => {
            cluster::run(cluster::Plan {
                peers,
                setups,
                calls,
                seconds,
                runs,
            })
            .await?;
        }
        Cmd::Room {
            members,
            rooms,
            rate,
            seconds,
        } => {
            let r = room::run(
                rooms,
                members,
                load::Load {
                    calls: 0,
                    rate: Some(rate),
                    duration: Duration::from_secs(seconds),
                },
            )
            .await?;
            let o = &r.outcome;
            if o.received == 0 {
                anyhow::bail!("no copies were delivered ({} frames sent)", o.sent);
            }
            println!(
                "room: {rooms} rooms × {members} members, {rate:.0} frames/s each: sent {} frames, delivered {} of {} copies ({:.0} copies/s), loss {:.3} %, one-way latency per copy p50 {:.3} ms p90 {:.3} ms p99 {:.3} ms p99.9 {:.3} ms; server CPU {:.2} s ({:.1} µs per copy), peak RSS {} KiB",
                o.sent,
                o.received,
                r.expected(),
                o.delivered_rate(),
                r.loss() * 100.0,
                o.latency_ms(0.5),
                o.latency_ms(0.9),
                o.latency_ms(0.99),
                o.latency_ms(0.999),
                o.server_cpu,
                o.cpu_us_per_packet(),
                o.server_rss / 1024
            );
        }
        Cmd::RelaySweep { seconds } => {
            let d = Duration::from_secs(seconds);
            println!(
                "| calls | offered (frames/s) | delivered (frames/s) | loss | p50 ms | p99 ms | server CPU s | server RSS MiB |"
            );
            println!("|---|---|---|---|---|---|---|---|");
            for calls in [1usize, 50] {
                let max = relay::run(load::Load {
                    calls,
                    rate: None,
                    duration: d,
                })
                .await?;
                print_row(calls, "saturated", &max);
                let per_side = max.delivered_rate() / (2 * calls) as f64;
                for share in [0.5, 0.9] {
                    let offered = format!(
                        "{:.0} ({:.0} % of max)",
                        per_side * share * (2 * calls) as f64,
                        share * 100.0
                    );
                    // Past what the clients can read, the relay engine sheds a receiver that
                    // makes no progress: a result of the run, not a failure of the tool.
                    match relay::run(load::Load {
                        calls,
                        rate: Some(per_side * share),
                        duration: d,
                    })
                    .await
                    {
                        Ok(o) => print_row(calls, &offered, &o),
                        Err(e) => println!("| {calls} | {offered} | run ended: {e:#} | | | | | |"),
                    }
                }
            }
        }
        Cmd::RelaySlow { seconds, link } => {
            println!("| relay configuration | audio received | audio delay p50 ms | p99 ms | video packets received |");
            println!("|---|---|---|---|---|");
            for (name, section) in [
                (
                    "default: adaptive ack window, SO_SNDBUF 64 KiB, TCP_NOTSENT_LOWAT 16 KiB",
                    "",
                ),
                (
                    "kernel bound off (SO_SNDBUF and NOTSENT_LOWAT at kernel defaults)",
                    "sndbuf = 0\nnotsent_lowat = 0",
                ),
                (
                    "both off (fixed window of 4096 frames, kernel defaults)",
                    "sndbuf = 0\nnotsent_lowat = 0\nidle_limit = 4096\ntarget_delay_ms = 1000000\nmax_frames = 100000\nmax_bytes = 100000000\nmax_age_ms = 100000\naudio_deadline_ms = 100000",
                ),
            ] {
                let o = relay::slow_receiver(section, link, Duration::from_secs(seconds)).await?;
                println!(
                    "| {name} | {}/{} | {:.0} | {:.0} | {} of {} |",
                    o.audio_delays_ms.len(),
                    o.audio_sent,
                    o.audio_ms(0.5),
                    o.audio_ms(0.99),
                    o.video_packets,
                    o.video_sent * 9
                );
            }
        }
        Cmd::MediaCrypto { packets } => {
            let o = media::run(packets)?;
            println!(
                "media crypto: {} packets of 478 payload bytes; seal {:.0} Mbit/s per core ({:.0} µs CPU per Mbit), open {:.0} Mbit/s per core ({:.0} µs CPU per Mbit)",
                o.packets,
                o.seal_mbit_per_s(),
                o.seal_us_per_mbit(),
                o.open_mbit_per_s(),
                o.open_us_per_mbit()
            );
        }
        Cmd::MediaPath { mbit, seconds } => {
            println!(
                "| ceiling Mbit/s | sent packets/s | received packets/s | received Mbit/s | loss | sender CPU µs/Mbit | receiver CPU µs/Mbit |"
            );
            println!("|---|---|---|---|---|---|---|");
            for m in mbit {
                let o = tokio::task::spawn_blocking(move || media_path::run(m, seconds)).await??;
                let (tx_cpu, rx_cpu) = o.cpu_us_per_mbit();
                println!(
                    "| {:.0} | {:.0} | {:.0} | {:.1} | {:.2} % | {:.0} | {:.0} |",
                    o.ceiling_mbit,
                    o.packets_sent as f64 / o.seconds,
                    o.received_pps(),
                    o.received_mbit(),
                    o.loss_pct(),
                    tx_cpu,
                    rx_cpu
                );
            }
        }
        Cmd::IdlePeers { count } => {
            let s = server::Spawned::start()?;
            let r = peers::idle(&s, count).await?;
            println!(
                "idle peers: {} registered; server RSS {} KiB before, {} KiB after; {:.0} bytes per peer",
                r.count,
                r.rss_before / 1024,
                r.rss_after / 1024,
                r.per_peer()
            );
        }
    }
    Ok(())
}

fn print_relay(calls: usize, rate: Option<f64>, o: &load::Outcome) {
    println!(
        "relay: {calls} calls, {} per side: sent {}, delivered {:.0} frames/s, loss {:.3} %, one-way latency p50 {:.3} ms p90 {:.3} ms p99 {:.3} ms p99.9 {:.3} ms; server CPU {:.2} s, peak RSS {} KiB",
        rate.map_or("saturating".to_owned(), |r| format!("{r:.0} frames/s")),
        o.sent,
        o.delivered_rate(),
        o.loss() * 100.0,
        o.latency_ms(0.5),
        o.latency_ms(0.9),
        o.latency_ms(0.99),
        o.latency_ms(0.999),
        o.server_cpu,
        o.server_rss / 1024
    );
}

fn print_row(calls: usize, offered: &str, o: &load::Outcome) {
    println!(
        "| {calls} | {offered} | {:.0} | {:.3} % | {:.3} | {:.3} | {:.2} | {:.1} |",
        o.delivered_rate(),
        o.loss() * 100.0,
        o.latency_ms(0.5),
        o.latency_ms(0.99),
        o.server_cpu,
        o.server_rss as f64 / (1024.0 * 1024.0)
    );
}
