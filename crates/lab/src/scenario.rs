//! One scenario end to end: build the lab, start `natcall-rendezvous` on the public host,
//! `natcall listen --once` as bob and `natcall call bob` as alice, wait for the final path,
//! chat both ways, hang up, and judge the reports against the oracle.
//!
//! 1. the server listens on `<server ip>:3478` (checked by a TCP connect from its namespace);
//! 2. bob registers; alice calls; both print `connected` (on the relay, policy `auto`);
//! 3. wait up to [`FINAL_PATH_WAIT`] for alice's `path` event to `lan` or `direct` (direct
//!    and LAN pairs are selected well under a second; the traversal budget is 5 s), or
//!    [`BIRTHDAY_PATH_WAIT`] when exactly one side is behind a symmetric NAT (birthday
//!    traversal: typically 1–2 s, budget 10 s);
//! 4. a chat line each way; alice closes stdin, which ends the call; both must exit 0;
//! 5. the final `path` of both reports must be the expected one.

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::time::{Duration, Instant};

use patchbay::Device;
use serde::Serialize;
use serde_json::Value;

use crate::impair::{ImpairGuard, Impairment};
use crate::kind::V6Case;
use crate::process::{Binaries, Proc};
use crate::topology::{self, SERVER_PORT};
use crate::{Error, Family, Kind, Path, Scenario};

/// How long to wait after `connected` for a move off the relay (traversal budget 5 s + margin).
pub const FINAL_PATH_WAIT: Duration = Duration::from_secs(7);
/// The same when one side is behind a symmetric NAT: birthday traversal's budget (10 s) +
/// margin.
pub const BIRTHDAY_PATH_WAIT: Duration = Duration::from_secs(12);
const STEP: Duration = Duration::from_secs(20);
const CHAT_A: &str = "hello bob, this is alice";
const CHAT_B: &str = "hello alice, bob here";

/// Options of one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Impairment of alice's uplink.
    pub impair_a: Option<Impairment>,
    /// Impairment of bob's uplink.
    pub impair_b: Option<Impairment>,
    /// Keep the logs in `DIR/<scenario>/` (always); without it they go to a temporary folder
    /// that is kept only when the scenario fails.
    pub keep_logs: Option<PathBuf>,
}

/// What one scenario did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Which scenario.
    pub scenario: Scenario,
    /// The oracle's path.
    pub expected: Path,
    /// The caller's final path.
    pub observed: Option<Path>,
    /// The callee's final path.
    pub observed_b: Option<Path>,
    /// The caller's path when the call connected.
    pub path_at_connect: Option<Path>,
    /// The caller's time from placing the call to connected.
    pub time_to_connected_ms: Option<f64>,
    /// The caller's time from placing the call to the last path change.
    pub time_to_final_path_ms: Option<f64>,
    /// Both chat lines arrived.
    pub chat_both_ways: bool,
    /// Exit codes of alice and bob.
    pub exit_codes: [Option<i32>; 2],
    /// The first thing that went wrong (besides a path mismatch).
    pub error: Option<String>,
    /// Port forwards the routers' miniupnpd still held after both peers exited (symmetric-upnp
    /// only): each peer releases its mapping when it closes.
    pub port_forwards_left: Option<usize>,
    /// The family of the caller's final path (its report's `remote_addr`), when it is direct.
    pub family: Option<Family>,
    /// The caller's and the callee's reports.
    pub reports: [Option<Value>; 2],
    /// The folder with the logs, when kept.
    pub log_dir: Option<PathBuf>,
    /// Wall time of the whole scenario (lab build included).
    pub wall_ms: f64,
}

impl Outcome {
    fn new(scenario: Scenario) -> Self {
        Self {
            scenario,
            expected: scenario.expected(),
            observed: None,
            observed_b: None,
            path_at_connect: None,
            time_to_connected_ms: None,
            time_to_final_path_ms: None,
            chat_both_ways: false,
            exit_codes: [None, None],
            error: None,
            port_forwards_left: None,
            family: None,
            reports: [None, None],
            log_dir: None,
            wall_ms: 0.0,
        }
    }

    /// Connected, chatted both ways, both exited 0, and both ended on the expected path.
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && self.chat_both_ways
            && self.exit_codes == [Some(0), Some(0)]
            && self.observed == Some(self.expected)
            && self.observed_b == Some(self.expected)
            && self.port_forwards_left.unwrap_or(0) == 0
            && self.scenario.expected_family().is_none_or(|f| self.family == Some(f))
    }

    /// A one-line verdict.
    pub fn summary(&self) -> String {
        let path = |p: Option<Path>| p.map_or("-".to_string(), |p| p.to_string());
        format!(
            "{}: expected {}, observed {}{} (bob {}), chat both ways {}, exits {:?}{}{}",
            self.scenario,
            self.expected,
            path(self.observed),
            match (self.scenario.expected_family(), self.family) {
                (Some(want), got) => format!(" over {:?} (expected {want:?})", got),
                _ => String::new(),
            },
            path(self.observed_b),
            self.chat_both_ways,
            self.exit_codes,
            self.port_forwards_left
                .filter(|n| *n > 0)
                .map(|n| format!(", {n} port forwards left on the router"))
                .unwrap_or_default(),
            self.error.as_ref().map(|e| format!(", error: {e}")).unwrap_or_default()
        )
    }

    /// The verdict, both reports and the logs of all three processes.
    pub fn diagnostics(&self) -> String {
        let mut out = self.summary();
        for (who, r) in ["alice", "bob"].iter().zip(&self.reports) {
            out.push_str(&format!("\n--- {who}'s report ---\n"));
            out.push_str(&r.as_ref().map_or("(none)".into(), Value::to_string));
        }
        if let Some(dir) = &self.log_dir {
            out.push_str(&format!("\n(logs kept in {})", dir.display()));
            for name in ["rendezvous", "bob", "alice"] {
                let path = dir.join(format!("{name}.log"));
                let text = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("({e})"));
                out.push_str(&format!("\n--- {} ---\n{text}", path.display()));
            }
        }
        out
    }
}

/// Runs one scenario in its own lab. Never panics; failures are in the [`Outcome`].
pub async fn run_scenario(bins: &Binaries, scenario: Scenario, opts: &RunOptions) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome::new(scenario);
    let (dir, temp) = match log_dir(scenario, opts) {
        Ok(d) => d,
        Err(e) => {
            outcome.error = Some(e.to_string());
            return outcome;
        }
    };
    if let Err(e) = run_in_lab(bins, scenario, opts, &dir, &mut outcome).await {
        outcome.error.get_or_insert(e.to_string());
    }
    let keep = opts.keep_logs.is_some() || !outcome.passed();
    outcome.log_dir = match temp {
        Some(t) if keep => Some(t.keep()),
        Some(_) => None,
        None => Some(dir),
    };
    outcome.wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    outcome
}

fn log_dir(scenario: Scenario, opts: &RunOptions) -> Result<(PathBuf, Option<tempfile::TempDir>), Error> {
    match &opts.keep_logs {
        Some(base) => {
            let dir = base.join(scenario.slug());
            std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
            Ok((dir, None))
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix(&format!("natcall-lab-{}-", scenario.slug()))
                .tempdir()
                .map_err(Error::io("creating a log folder"))?;
            Ok((t.path().to_path_buf(), Some(t)))
        }
    }
}

async fn run_in_lab(
    bins: &Binaries,
    scenario: Scenario,
    opts: &RunOptions,
    dir: &FsPath,
    outcome: &mut Outcome,
) -> Result<(), Error> {
    let net = topology::build(scenario).await?;
    let mut guards: Vec<ImpairGuard> = Vec::new();
    for (device, imp) in [(&net.a, &opts.impair_a), (&net.b, &opts.impair_b)] {
        if let Some(imp) = imp.filter(|i| !i.is_none()) {
            guards.push(imp.apply(device).await?);
        }
    }
    let log_dir = dir.to_path_buf();
    let (bins, dir) = (bins.clone(), dir.to_path_buf());
    let (server, a, b) = (net.server.clone(), net.a.clone(), net.b.clone());
    let mut result = tokio::task::spawn_blocking(move || {
        let mut out = Outcome::new(scenario);
        drive(&bins, &dir, [&server, &a, &b], &mut out);
        out
    })
    .await
    .map_err(|e| Error::InvalidScenario(format!("the scenario driver panicked: {e}")))?;
    for (i, d) in net.daemons.iter().enumerate() {
        let _ = std::fs::write(log_dir.join(format!("miniupnpd-{i}.log")), d.log());
        match d.port_forwards() {
            Ok(n) => *result.port_forwards_left.get_or_insert(0) += n,
            Err(e) => result.error = result.error.take().or(Some(format!("reading miniupnpd's rules: {e}"))),
        }
    }
    drop(guards);
    drop(net);
    result.scenario = scenario;
    *outcome = result;
    Ok(())
}

/// Runs the three processes and fills `out`; all waits bounded.
fn drive(bins: &Binaries, dir: &FsPath, [server, a, b]: [&Device; 3], out: &mut Outcome) {
    let mut procs: Vec<Proc> = Vec::new();
    let symmetric = |k: Kind| matches!(k, Kind::Symmetric | Kind::SymmetricUpnp);
    let wait = match out.scenario {
        Scenario::Pair { a, b } if symmetric(a) || symmetric(b) => BIRTHDAY_PATH_WAIT,
        _ => FINAL_PATH_WAIT,
    };
    if let Err(e) = converse(bins, dir, [server, a, b], &mut procs, out, wait) {
        out.error = Some(e);
    }
    for p in &mut procs {
        p.kill();
        p.drain();
    }
    let report = |name: &str| procs.iter().find(|p| p.name == name).and_then(Proc::report);
    out.reports = [report("alice"), report("bob")];
    let path_of = |r: &Option<Value>, key: &str| r.as_ref().and_then(|r| r[key].as_str()).and_then(Path::from_report);
    out.observed = path_of(&out.reports[0], "path");
    out.observed_b = path_of(&out.reports[1], "path");
    out.path_at_connect = path_of(&out.reports[0], "path_at_connect");
    if let Some(r) = &out.reports[0] {
        out.family = r["remote_addr"]
            .as_str()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| if a.is_ipv4() { Family::V4 } else { Family::V6 });
        out.time_to_connected_ms = r["time_to_connected_ms"].as_f64();
        out.time_to_final_path_ms = r["path_changes"]
            .as_array()
            .and_then(|c| c.last())
            .and_then(|c| c["at_ms"].as_f64());
    }
}

fn converse(
    bins: &Binaries,
    dir: &FsPath,
    [server, a, b]: [&Device; 3],
    procs: &mut Vec<Proc>,
    out: &mut Outcome,
    final_path_wait: Duration,
) -> Result<(), String> {
    let ip = server.ip().ok_or("the server device has no IPv4 address")?;
    let addr = SocketAddr::from((ip, SERVER_PORT));
    // IPv6 scenarios: the server listens dual-stack; a peer on IPv6 only reaches it over IPv6.
    let (listen, alice_server) = match out.scenario {
        Scenario::V6(case) => {
            let ip6 = server.ip6().ok_or("the server device has no IPv6 address")?;
            let alice = match case {
                V6Case::V6OnlyToV4Only => SocketAddr::from((ip6, SERVER_PORT)),
                _ => addr,
            };
            (SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, SERVER_PORT)), alice)
        }
        _ => (addr, addr),
    };
    procs.push(start_server_on(bins, dir, server, listen, addr)?);
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let peer = |name: &str, to: SocketAddr, cmd: &[&str]| peer_args(to, dir, name, &args(cmd));
    procs.push(
        Proc::spawn(b, dir, "bob", &bins.natcall, &peer("bob", addr, &["listen", "--once"]))
            .map_err(|e| e.to_string())?,
    );
    procs[1].wait_event("registered", STEP, |_| true)?;
    procs.push(
        Proc::spawn(
            a,
            dir,
            "alice",
            &bins.natcall,
            &peer("alice", alice_server, &["call", "bob"]),
        )
        .map_err(|e| e.to_string())?,
    );
    let [_, bob, alice] = procs.as_mut_slice() else {
        return Err("internal: three processes expected".into());
    };
    alice.wait_event("connected", STEP, |_| true)?;
    bob.wait_event("connected", STEP, |_| true)?;
    // The final path: a move to LAN or direct, or none within the budget (then the relay).
    let _ = alice.wait_event("path", final_path_wait, |v| v["to"] == "lan" || v["to"] == "direct");
    alice.say(CHAT_A)?;
    bob.wait_event("chat", STEP, |v| v["text"] == CHAT_A)?;
    bob.say(CHAT_B)?;
    alice.wait_event("chat", STEP, |v| v["text"] == CHAT_B)?;
    out.chat_both_ways = true;
    alice.close_stdin();
    out.exit_codes[0] = Some(alice.wait_exit(STEP)?);
    out.exit_codes[1] = Some(bob.wait_exit(STEP)?);
    Ok(())
}

/// Starts `natcall-rendezvous` on `addr` in `device`'s namespace (logging to
/// `dir/rendezvous.log`) and waits until it accepts TCP.
pub(crate) fn start_server(bins: &Binaries, dir: &FsPath, device: &Device, addr: SocketAddr) -> Result<Proc, String> {
    start_server_on(bins, dir, device, addr, addr)
}

/// [`start_server`] listening on `listen` (e.g. `[::]:3478`), ready when `addr` accepts TCP.
pub(crate) fn start_server_on(
    bins: &Binaries,
    dir: &FsPath,
    device: &Device,
    listen: SocketAddr,
    addr: SocketAddr,
) -> Result<Proc, String> {
    start_server_as(bins, dir, "rendezvous", device, listen, addr, &[])
}

/// [`start_server_on`] under log name `name` (`dir/<name>.log`, state in
/// `dir/<name>-state`), with more arguments (`--cluster …`).
pub(crate) fn start_server_as(
    bins: &Binaries,
    dir: &FsPath,
    name: &str,
    device: &Device,
    listen: SocketAddr,
    addr: SocketAddr,
    extra: &[&str],
) -> Result<Proc, String> {
    let state = dir.join(format!("{name}-state")).display().to_string();
    let mut args: Vec<String> = [
        "--listen",
        &listen.to_string(),
        "--log-level",
        "debug",
        "--state-dir",
        &state,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let server = Proc::spawn(device, dir, name, &bins.rendezvous, &args).map_err(|e| e.to_string())?;
    wait_listening(device, addr)?;
    Ok(server)
}

/// `natcall`'s arguments for `name` in `--json` mode against the server at `addr`, its home in
/// `dir`, then `cmd`.
pub(crate) fn peer_args(addr: SocketAddr, dir: &FsPath, name: &str, cmd: &[String]) -> Vec<String> {
    let home = dir.join(format!("{name}-home"));
    let mut v: Vec<String> = ["--json", "--server", &addr.to_string(), "--name", name, "--home"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push(home.display().to_string());
    v.extend_from_slice(cmd);
    v
}

/// Waits (at most 10 s) until the server accepts TCP, connecting from its own namespace.
pub(crate) fn wait_listening(server: &Device, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = server
            .run_sync(move || Ok(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()))
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("natcall-rendezvous did not listen on {addr} within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
