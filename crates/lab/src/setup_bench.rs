//! The call-setup benchmark: how long `natcall call` takes to connect and to hear the first
//! audio frame, in the NAT lab, next to the floor the protocol allows at that delay.
//!
//! Topology and delay: a cell is one pair at one one-way delay `D`. The two peers' access
//! links each get `D/2` of added delay in each direction (the lab's [`Impairment`]); the
//! server's link gets none. So peer ↔ peer (direct, or through the relay) is `D` one way, and
//! peer ↔ server is `D/2` one way (RTT `D`).
//!
//! One cell:
//! 1. build the lab, start `natcall-rendezvous` and `natcall listen` (bob, stays up);
//! 2. one warm-up call (not counted: it creates alice's key and binds her name), then `calls`
//!    sequential calls, each a fresh `natcall --json call bob` process (alice);
//! 3. per call: wall time from spawning it to its `connected` line, its in-process
//!    `time_to_connected_ms`, its `first_media` audio `at_ms`, and (policy `auto`) when its
//!    path moved to direct; then alice closes stdin (hangs up) and both must finish the call.
//!
//! Every wait is bounded; a cell stops after [`MAX_ERRORS`] failed calls.

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::time::{Duration, Instant};

use patchbay::Device;
use serde::Serialize;
use serde_json::Value;

use crate::impair::{ImpairGuard, Impairment};
use crate::process::{Binaries, Proc};
use crate::topology::{self, SERVER_PORT};
use crate::{Error, Kind, Scenario};

/// A cell gives up after this many failed calls.
pub const MAX_ERRORS: usize = 3;
/// The callee's jitter-buffer target (`natcall_media::ReceiverConfig::default().target_delay`):
/// the first audio frame is played (and announced) this long after it arrives.
pub const PLAYOUT_DELAY_MS: f64 = 80.0;
const CONNECT_WAIT: Duration = Duration::from_secs(10);
const MEDIA_WAIT: Duration = Duration::from_secs(5);
const DIRECT_WAIT: Duration = Duration::from_secs(3);
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// The pairs the benchmark measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetupPair {
    /// public × public, policy `auto`.
    Public,
    /// port-restricted × port-restricted, policy `auto` (hole punching).
    PortRestricted,
    /// port-restricted × port-restricted, policy `relay-only` (no checks).
    RelayOnly,
}

impl SetupPair {
    /// Every pair, in table order.
    pub const ALL: [SetupPair; 3] = [SetupPair::Public, SetupPair::PortRestricted, SetupPair::RelayOnly];

    fn kinds(self) -> (Kind, Kind) {
        match self {
            SetupPair::Public => (Kind::Public, Kind::Public),
            SetupPair::PortRestricted | SetupPair::RelayOnly => (Kind::PortRestricted, Kind::PortRestricted),
        }
    }

    fn policy(self) -> &'static str {
        match self {
            SetupPair::RelayOnly => "relay-only",
            _ => "auto",
        }
    }

    /// How the pair appears in the table.
    pub fn label(self) -> &'static str {
        match self {
            SetupPair::Public => "public × public",
            SetupPair::PortRestricted => "port-restr. × port-restr.",
            SetupPair::RelayOnly => "relay-only (port-restr. ×2)",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Counted calls per cell.
    pub calls: usize,
    /// One-way delays between the peers, ms (each access link gets half).
    pub delays_ms: Vec<u64>,
    /// The pairs.
    pub pairs: Vec<SetupPair>,
    /// Keep every cell's logs in `DIR/<pair>-<delay>ms/` (failed cells are always kept).
    pub keep_logs: Option<PathBuf>,
}

impl BenchOptions {
    /// 10 calls per cell, 0, 20 and 50 ms, every pair.
    pub fn full() -> Self {
        Self {
            calls: 10,
            delays_ms: vec![0, 20, 50],
            pairs: SetupPair::ALL.to_vec(),
            keep_logs: None,
        }
    }

    /// 2 calls per cell, 0 and 20 ms, every pair.
    pub fn quick() -> Self {
        Self {
            calls: 2,
            delays_ms: vec![0, 20],
            ..Self::full()
        }
    }
}

/// One call's figures (ms).
#[derive(Debug, Clone, Serialize)]
pub struct CallSample {
    /// Spawning `natcall call` → its `connected` line (registration included).
    pub wall_connected_ms: f64,
    /// In-process: placing the call → connected (`time_to_connected_ms`).
    pub connected_ms: f64,
    /// In-process: placing the call → first audio frame played (`first_media` `at_ms`).
    pub first_audio_ms: f64,
    /// In-process: placing the call → the path moved to direct (policy `auto` only).
    pub direct_ms: Option<f64>,
}

/// The protocol's floor at one-way delay `D` between the peers (ms), network time only.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Floor {
    /// TCP connect, hello → Welcome, Register → Registered, token STUN binding: 4 server RTTs.
    pub registration_ms: f64,
    /// Call → server → Incoming, Answer → server → Start (2 peer one-ways), QUIC 1-RTT over
    /// the relay (2 peer one-ways).
    pub connected_ms: f64,
    /// Connected, + client Finished and the chat stream to the callee (1 one-way), + the
    /// callee's first audio packet back (1 one-way), + the jitter buffer's playout delay.
    pub first_audio_ms: f64,
    /// Registration + call → connected.
    pub wall_connected_ms: f64,
}

impl Floor {
    /// The floor at one-way peer ↔ peer delay `d` (peer ↔ server `d/2`).
    pub fn at(d: f64) -> Self {
        let server_rtt = d;
        let registration_ms = 4.0 * server_rtt;
        let connected_ms = 2.0 * d + 2.0 * d;
        Self {
            registration_ms,
            connected_ms,
            first_audio_ms: connected_ms + 2.0 * d + PLAYOUT_DELAY_MS,
            wall_connected_ms: registration_ms + connected_ms,
        }
    }
}

/// Median, 90th percentile (nearest rank) and maximum.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    /// Median.
    pub median: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// Largest.
    pub max: f64,
}

impl Summary {
    /// `None` for no values.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let rank = (0.9 * n as f64).ceil() as usize;
        Some(Self {
            median,
            p90: v[rank.clamp(1, n) - 1],
            max: v[n - 1],
        })
    }
}

/// One pair at one delay.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Which pair.
    pub pair: SetupPair,
    /// One-way delay between the peers, ms.
    pub delay_ms: u64,
    /// The counted calls that completed.
    pub samples: Vec<CallSample>,
    /// What went wrong (one line per failed call, or the cell's setup).
    pub errors: Vec<String>,
    /// The floor at this delay.
    pub floor: Floor,
    /// Where the logs are, when kept.
    pub log_dir: Option<PathBuf>,
}

impl Cell {
    fn new(pair: SetupPair, delay_ms: u64) -> Self {
        Self {
            pair,
            delay_ms,
            samples: Vec::new(),
            errors: Vec::new(),
            floor: Floor::at(delay_ms as f64),
            log_dir: None,
        }
    }

    /// Summaries of (wall → connected, in-process → connected, first audio, direct).
    pub fn summaries(&self) -> [Option<Summary>; 4] {
        let s = &self.samples;
        [
            Summary::of(s.iter().map(|c| c.wall_connected_ms)),
            Summary::of(s.iter().map(|c| c.connected_ms)),
            Summary::of(s.iter().map(|c| c.first_audio_ms)),
            Summary::of(s.iter().filter_map(|c| c.direct_ms)),
        ]
    }
}

/// Runs every cell, one after the other (each in its own lab), pairs outer, delays inner.
pub async fn run(bins: &Binaries, opts: &BenchOptions) -> Vec<Cell> {
    let mut cells = Vec::new();
    for &pair in &opts.pairs {
        for &delay_ms in &opts.delays_ms {
            cells.push(run_cell(bins, pair, delay_ms, opts).await);
        }
    }
    cells
}

async fn run_cell(bins: &Binaries, pair: SetupPair, delay_ms: u64, opts: &BenchOptions) -> Cell {
    let mut cell = Cell::new(pair, delay_ms);
    let slug = format!(
        "{}-{delay_ms}ms",
        serde_json::to_value(pair)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    );
    let (dir, temp) = match &opts.keep_logs {
        Some(base) => {
            let dir = base.join(&slug);
            match std::fs::create_dir_all(&dir) {
                Ok(()) => (dir, None),
                Err(e) => {
                    cell.errors.push(format!("creating {}: {e}", dir.display()));
                    return cell;
                }
            }
        }
        None => match tempfile::Builder::new()
            .prefix(&format!("natcall-setup-{slug}-"))
            .tempdir()
        {
            Ok(t) => (t.path().to_path_buf(), Some(t)),
            Err(e) => {
                cell.errors.push(format!("creating a log folder: {e}"));
                return cell;
            }
        },
    };
    if let Err(e) = run_in_lab(bins, pair, delay_ms, opts.calls, &dir, &mut cell).await {
        cell.errors.push(e.to_string());
    }
    cell.log_dir = match temp {
        Some(t) if !cell.errors.is_empty() => Some(t.keep()),
        Some(_) => None,
        None => Some(dir),
    };
    cell
}

async fn run_in_lab(
    bins: &Binaries,
    pair: SetupPair,
    delay_ms: u64,
    calls: usize,
    dir: &FsPath,
    cell: &mut Cell,
) -> Result<(), Error> {
    let (a, b) = pair.kinds();
    let net = topology::build(Scenario::pair(a, b)).await?;
    let half = Impairment {
        delay: Duration::from_micros(delay_ms * 500),
        seed: 1,
        ..Impairment::default()
    };
    let mut guards: Vec<ImpairGuard> = Vec::new();
    if !half.is_none() {
        for device in [&net.a, &net.b] {
            guards.push(half.apply(device).await?);
        }
    }
    let (bins, dir) = (bins.clone(), dir.to_path_buf());
    let (server, da, db) = (net.server.clone(), net.a.clone(), net.b.clone());
    let mut out = Cell::new(pair, delay_ms);
    out = tokio::task::spawn_blocking(move || {
        if let Err(e) = drive(&bins, &dir, [&server, &da, &db], pair, calls, &mut out) {
            out.errors.push(e);
        }
        out
    })
    .await
    .map_err(|e| Error::InvalidScenario(format!("the benchmark driver panicked: {e}")))?;
    drop(guards);
    drop(net);
    *cell = out;
    Ok(())
}

/// Starts the server and bob, then runs the warm-up and the counted calls.
fn drive(
    bins: &Binaries,
    dir: &FsPath,
    [server, a, b]: [&Device; 3],
    pair: SetupPair,
    calls: usize,
    cell: &mut Cell,
) -> Result<(), String> {
    let ip = server.ip().ok_or("the server device has no IPv4 address")?;
    let addr = SocketAddr::from((ip, SERVER_PORT));
    let _server = crate::scenario::start_server(bins, dir, server, addr)?;
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let peer = |name: &str, cmd: &[&str]| crate::scenario::peer_args(addr, dir, name, &strings(cmd));
    let mut bob = Proc::spawn(b, dir, "bob", &bins.natcall, &peer("bob", &["listen"])).map_err(|e| e.to_string())?;
    bob.wait_event("registered", CONNECT_WAIT, |_| true)?;
    let alice_args = peer("alice", &["call", "bob", "--policy", pair.policy()]);
    for i in 0..=calls {
        // Call 0 is the warm-up: it creates alice's key and binds her name.
        let name = if i == 0 {
            "alice-warmup".to_string()
        } else {
            format!("alice-{i}")
        };
        match one_call(bins, dir, a, &name, &alice_args, pair, &mut bob) {
            Ok(sample) if i > 0 => cell.samples.push(sample),
            Ok(_) => {}
            Err(e) => {
                cell.errors.push(format!("{name}: {e}"));
                if cell.errors.len() >= MAX_ERRORS {
                    return Err(format!("{MAX_ERRORS} calls failed: giving up on this cell"));
                }
            }
        }
    }
    Ok(())
}

/// One `natcall call bob`: its figures, after both sides finished the call.
fn one_call(
    bins: &Binaries,
    dir: &FsPath,
    a: &Device,
    name: &str,
    args: &[String],
    pair: SetupPair,
    bob: &mut Proc,
) -> Result<CallSample, String> {
    bob.seen.clear();
    let spawned = Instant::now();
    let mut alice = Proc::spawn(a, dir, name, &bins.natcall, args).map_err(|e| e.to_string())?;
    let connected = alice.wait_event("connected", CONNECT_WAIT, |_| true)?;
    let wall_connected_ms = spawned.elapsed().as_secs_f64() * 1000.0;
    let connected_ms = number(&connected, "time_to_connected_ms")?;
    let media = alice.wait_event("first_media", MEDIA_WAIT, |v| v["track"] == "audio")?;
    let first_audio_ms = number(&media, "at_ms")?;
    if pair.policy() == "auto" {
        // Not required: the direct time is reported when the move happens within the wait.
        let _ = alice.wait_event("path", DIRECT_WAIT, |v| v["to"] == "direct");
    }
    alice.close_stdin();
    let code = alice.wait_exit(EXIT_WAIT)?;
    if code != 0 {
        return Err(format!("exited with {code}"));
    }
    bob.wait_event("report", EXIT_WAIT, |_| true)?;
    let direct_ms = alice
        .report()
        .and_then(|r| r["path_changes"].as_array()?.iter().find(|c| c["to"] == "direct")?["at_ms"].as_f64());
    Ok(CallSample {
        wall_connected_ms,
        connected_ms,
        first_audio_ms,
        direct_ms,
    })
}

fn number(v: &Value, key: &str) -> Result<f64, String> {
    v[key].as_f64().ok_or_else(|| format!("no number {key:?} in {v}"))
}

/// The results as a Markdown table: per cell median / p90 / max of each figure, its floor and
/// median − floor.
pub fn table(cells: &[Cell]) -> String {
    let mut out = String::from(
        "| pair | one-way delay | calls | wall → connected | floor | − floor | registration | floor | \
         in-process → connected | floor | − floor | first audio | floor | − floor | → direct |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mpm = |s: Option<Summary>| s.map_or("-".into(), |s| format!("{:.1} / {:.1} / {:.1}", s.median, s.p90, s.max));
    let med = |s: Option<Summary>| s.map_or("-".into(), |s| format!("{:.1}", s.median));
    let diff = |s: Option<Summary>, floor: f64| s.map_or("-".into(), |s| format!("{:+.1}", s.median - floor));
    for c in cells {
        let [wall, conn, audio, direct] = c.summaries();
        let reg = Summary::of(c.samples.iter().map(|s| s.wall_connected_ms - s.connected_ms));
        let f = c.floor;
        let failed = if c.errors.is_empty() {
            String::new()
        } else {
            format!(" ({} failed)", c.errors.len())
        };
        out.push_str(&format!(
            "| {} | {} ms | {}{failed} | {} | {:.0} | {} | {} | {:.0} | {} | {:.0} | {} | {} | {:.0} | {} | {} |\n",
            c.pair.label(),
            c.delay_ms,
            c.samples.len(),
            mpm(wall),
            f.wall_connected_ms,
            diff(wall, f.wall_connected_ms),
            med(reg),
            f.registration_ms,
            mpm(conn),
            f.connected_ms,
            diff(conn, f.connected_ms),
            mpm(audio),
            f.first_audio_ms,
            diff(audio, f.first_audio_ms),
            med(direct),
        ));
    }
    out.push_str(
        "\nms; figures median / p90 / max, \"− floor\" from the median; registration = wall − in-process \
         (median); → direct = placing the call → path direct (median, policy auto).",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_the_nearest_rank_p90() {
        let s = Summary::of((1..=10).map(f64::from)).unwrap();
        assert_eq!((s.median, s.p90, s.max), (5.5, 9.0, 10.0));
        let s = Summary::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.p90, s.max), (2.0, 3.0, 3.0));
        assert!(Summary::of([]).is_none());
    }

    #[test]
    fn floor_counts_round_trips() {
        let f = Floor::at(50.0);
        assert_eq!(f.registration_ms, 200.0);
        assert_eq!(f.connected_ms, 200.0);
        assert_eq!(f.wall_connected_ms, 400.0);
        assert_eq!(f.first_audio_ms, 300.0 + PLAYOUT_DELAY_MS);
        assert_eq!(Floor::at(0.0).connected_ms, 0.0);
    }
}
