//! Two rendezvous servers on two public hosts, one Redis, peers behind NATs homed on different
//! servers: the call crosses servers (alice's server carries her to bob's over a visit link)
//! and must take the path the oracle gives for the two NATs, or the relay when asked.
//!
//! ```text
//!   dc (public) ── server1 (natcall-rendezvous n1, redis-server)
//!               └─ server2 (natcall-rendezvous n2)
//!   alice ── NAT a ── IX          bob ── NAT b ── IX
//!   alice --server server1        bob --server server2
//! ```
//!
//! Redis listens on server1's lab address only; every process runs in the lab's namespaces.

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use patchbay::Device;
use serde_json::Value;

use crate::process::{Binaries, Proc};
use crate::scenario::{peer_args, start_server_as};
use crate::topology::{self, SERVER_PORT, add_device};
use crate::{Error, Kind, Path, Scenario};

/// Redis's port on server1.
const REDIS_PORT: u16 = 6379;
/// Longest one step (registration, connection, a chat line, an exit) may take.
const STEP: Duration = Duration::from_secs(20);
/// How long a call may take to move from the relay to its final path.
const FINAL_PATH_WAIT: Duration = Duration::from_secs(12);

/// What one call across two servers did.
#[derive(Debug)]
pub struct TwoServers {
    /// The NATs.
    pub a: Kind,
    pub b: Kind,
    /// The policy alice called with.
    pub policy: String,
    /// The path the call must end on.
    pub expected: Path,
    /// alice's and bob's final paths.
    pub observed: [Option<Path>; 2],
    /// Both chat lines arrived.
    pub chat_both_ways: bool,
    /// alice's server opened a visit link to bob's (its log says so).
    pub crossed: bool,
    /// The first thing that went wrong.
    pub error: Option<String>,
    /// The logs (kept).
    pub dir: PathBuf,
}

impl TwoServers {
    /// Path as expected on both sides, chat both ways, across servers, no error.
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && self.chat_both_ways
            && self.crossed
            && self.observed == [Some(self.expected), Some(self.expected)]
    }

    /// One line, then the logs' paths.
    pub fn summary(&self) -> String {
        format!(
            "{} × {} ({}): expected {:?}, observed {:?}, chat {}, crossed servers {}, error {:?}; logs in {}",
            self.a,
            self.b,
            self.policy,
            self.expected,
            self.observed,
            self.chat_both_ways,
            self.crossed,
            self.error,
            self.dir.display()
        )
    }
}

/// `redis-server` in a lab namespace, killed when dropped.
struct RedisProc(Child);

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds the lab, runs the call, tears it down. Logs go to `dir`.
pub async fn run(bins: &Binaries, a: Kind, b: Kind, policy: &str, dir: &FsPath) -> Result<TwoServers, Error> {
    let scenario = Scenario::Pair { a, b };
    let net = topology::build(scenario).await?;
    let server2 = add_device(&net.lab, "server2", &net.dc).await?;
    let expected = if policy == "relay-only" {
        Path::Relay
    } else {
        scenario.expected()
    };
    let mut out = TwoServers {
        a,
        b,
        policy: policy.to_owned(),
        expected,
        observed: [None, None],
        chat_both_ways: false,
        crossed: false,
        error: None,
        dir: dir.to_path_buf(),
    };
    let (bins, dir, policy) = (bins.clone(), dir.to_path_buf(), policy.to_owned());
    let devices = [net.server.clone(), server2, net.a.clone(), net.b.clone()];
    let out = tokio::task::spawn_blocking(move || {
        let mut procs = Vec::new();
        let mut redis = None;
        if let Err(e) = drive(&bins, &dir, &devices, &policy, &mut procs, &mut redis, &mut out) {
            out.error = Some(e);
        }
        for p in &mut procs {
            p.kill();
            p.drain();
        }
        drop(redis);
        let path = |name: &str| {
            procs
                .iter()
                .find(|p| p.name == name)
                .and_then(Proc::report)
                .and_then(|r: Value| r["path"].as_str().and_then(Path::from_report))
        };
        out.observed = [path("alice"), path("bob")];
        out.crossed = std::fs::read_to_string(dir.join("n1.log")).is_ok_and(|l| l.contains("visit link open"));
        out
    })
    .await
    .map_err(|e| Error::InvalidScenario(format!("the two-server driver panicked: {e}")))?;
    drop(net);
    Ok(out)
}

fn drive(
    bins: &Binaries,
    dir: &FsPath,
    [s1, s2, a, b]: &[Device; 4],
    policy: &str,
    procs: &mut Vec<Proc>,
    redis: &mut Option<RedisProc>,
    out: &mut TwoServers,
) -> Result<(), String> {
    let ip1 = s1.ip().ok_or("server1 has no IPv4 address")?;
    let ip2 = s2.ip().ok_or("server2 has no IPv4 address")?;
    let (addr1, addr2) = (
        SocketAddr::from((ip1, SERVER_PORT)),
        SocketAddr::from((ip2, SERVER_PORT)),
    );
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &REDIS_PORT.to_string(),
        "--bind",
        &ip1.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let child = s1
        .spawn_command_sync(cmd)
        .map_err(|e| format!("starting redis-server in the lab (apt-get install redis-server): {e:#}"))?;
    *redis = Some(RedisProc(child));
    let redis_addr = SocketAddr::from((ip1, REDIS_PORT));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s1
        .run_sync(move || Ok(std::net::TcpStream::connect_timeout(&redis_addr, Duration::from_millis(200)).is_ok()))
        .unwrap_or(false)
    {
        if Instant::now() > deadline {
            return Err("redis-server did not listen in the lab".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("redis://{redis_addr}");
    procs.push(start_server_as(
        bins,
        dir,
        "n1",
        s1,
        addr1,
        addr1,
        &["--cluster", &url, "--node-id", "n1"],
    )?);
    procs.push(start_server_as(
        bins,
        dir,
        "n2",
        s2,
        addr2,
        addr2,
        &["--cluster", &url, "--node-id", "n2"],
    )?);
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let bob_args = peer_args(addr2, dir, "bob", &args(&["listen", "--once"]));
    procs.push(Proc::spawn(b, dir, "bob", &bins.natcall, &bob_args).map_err(|e| e.to_string())?);
    procs[2].wait_event("registered", STEP, |_| true)?;
    let alice_args = peer_args(addr1, dir, "alice", &args(&["call", "bob", "--policy", policy]));
    procs.push(Proc::spawn(a, dir, "alice", &bins.natcall, &alice_args).map_err(|e| e.to_string())?);
    let [_, _, bob, alice] = procs.as_mut_slice() else {
        return Err("internal: four processes expected".into());
    };
    alice.wait_event("connected", STEP, |_| true)?;
    bob.wait_event("connected", STEP, |_| true)?;
    if out.expected != Path::Relay {
        let _ = alice.wait_event("path", FINAL_PATH_WAIT, |v| v["to"] == "lan" || v["to"] == "direct");
    }
    alice.say("across servers: hello bob")?;
    bob.wait_event("chat", STEP, |v| v["text"] == "across servers: hello bob")?;
    bob.say("hello alice")?;
    alice.wait_event("chat", STEP, |v| v["text"] == "hello alice")?;
    out.chat_both_ways = true;
    alice.close_stdin();
    alice.wait_exit(STEP)?;
    bob.wait_exit(STEP)?;
    Ok(())
}
