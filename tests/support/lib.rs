//! Helpers for end-to-end tests: start the real binaries, feed their stdin, read their JSON
//! lines (with [`natcall_jsonl`]), keep their logs. Every wait is bounded.
//!
//! The binaries must be built first (`cargo build --workspace --bins`; `tests/run-all.sh` does).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use natcall_jsonl::{JsonChild, Value};

/// A workspace binary next to the test executable (`target/<profile>/NAME`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (tests/run-all.sh does)",
        path.display()
    );
    path
}

/// A port free for both TCP and UDP on loopback right now.
pub fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let port = tcp.local_addr().expect("addr").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A running `natcall-rendezvous` on loopback.
#[derive(Debug)]
pub struct Rendezvous {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Rendezvous {
    /// Starts on a port the kernel chooses (never one another test or a restarting server
    /// holds) and returns once this very process says it is listening.
    pub fn start(dir: &Path) -> Self {
        Self::start_at(dir, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts on a given address (e.g. again, after a restart; port 0 lets the kernel choose).
    /// Readiness is the server's own "listening" log line, not a TCP probe: a probe can be
    /// answered by another process on the port, or by a self-connect on loopback.
    pub fn start_at(dir: &Path, addr: SocketAddr) -> Self {
        Self::start_with(dir, addr, &[])
    }

    /// [`Rendezvous::start_at`] with more arguments (e.g. `--alternate-ip`).
    pub fn start_with(dir: &Path, addr: SocketAddr, extra: &[&str]) -> Self {
        let log = dir.join(format!("rendezvous-{}.log", rand_suffix()));
        // Name bindings and the TLS key in the test's own directory: runs never share them or
        // leave any in the user's home, and a restart on the same directory keeps them (peers
        // that pinned the server's key meet the same key), as in production.
        let state = dir.join("rendezvous-state");
        let mut child = Command::new(bin("natcall-rendezvous"))
            .args(["--listen", &addr.to_string(), "--log-level", "debug", "--state-dir"])
            .arg(&state)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starts natcall-rendezvous");
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(bound) = listening_addr(&text) {
                break bound;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("natcall-rendezvous on {addr} exited ({status}) before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "natcall-rendezvous did not listen on {addr}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        Self { child, addr, log }
    }
}

impl Rendezvous {
    /// The server's second STUN port, from its log (`None` when it has none).
    pub fn second_port(&self) -> Option<u16> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let line = text.lines().find(|l| l.contains("second STUN port"))?;
        let at = line.find("port=")? + "port=".len();
        line[at..].split_whitespace().next()?.parse().ok()
    }
}

/// The `local=ADDR` of the server's "rendezvous server listening" line, once it is logged.
fn listening_addr(log: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains("rendezvous server listening"))?;
    let at = line.find("local=")? + "local=".len();
    line[at..].split_whitespace().next()?.parse().ok()
}

impl Rendezvous {
    /// Stops the server the hard way (SIGKILL) and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `natcall` process in `--json` mode: a [`JsonChild`] (its `name`, `seen`, `close_stdin`,
/// `drain`, … through `Deref`) whose waits panic with what it printed and logged.
#[derive(Debug)]
pub struct Peer {
    child: JsonChild,
    pub log: PathBuf,
}

impl Peer {
    /// `natcall --json --server S --name NAME --home DIR/NAME ARGS...`
    pub fn spawn(dir: &Path, server: SocketAddr, name: &str, args: &[&str]) -> Self {
        Self::spawn_home(dir, &dir.join(name), server, name, args)
    }

    pub fn spawn_home(dir: &Path, home: &Path, server: SocketAddr, name: &str, args: &[&str]) -> Self {
        let server = server.to_string();
        let mut all = vec!["--server", &server];
        all.extend_from_slice(args);
        Self::spawn_args(dir, home, name, &all)
    }

    /// `natcall --json --name NAME --home HOME ARGS...` (the server among `args`).
    pub fn spawn_args(dir: &Path, home: &Path, name: &str, args: &[&str]) -> Self {
        let log = dir.join(format!("{name}-{}.log", std::process::id() ^ rand_suffix()));
        let mut cmd = Command::new(bin("natcall"));
        cmd.args(["--json", "--name", name, "--home"])
            .arg(home)
            .args(args)
            .env("RUST_LOG", "natcall=debug,natcall_peer=debug")
            .stdin(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let child = JsonChild::spawn(name, &mut cmd).unwrap_or_else(|e| panic!("{e}"));
        Self { child, log }
    }

    /// Types a chat line.
    pub fn say(&mut self, line: &str) {
        self.child.say(line).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Copies `input` to the process's stdin (and to `tee` when given) on a thread, then closes
    /// stdin: a pipe into `natcall`, like `ffmpeg … - | natcall call bob --send-video -`.
    pub fn pipe_stdin(
        &mut self,
        mut input: impl Read + Send + 'static,
        tee: Option<PathBuf>,
    ) -> std::thread::JoinHandle<u64> {
        let mut stdin = self.child.take_stdin().expect("stdin still open");
        std::thread::spawn(move || {
            let mut copy = tee.map(|p| std::fs::File::create(p).expect("tee file"));
            let mut buf = vec![0u8; 32 * 1024];
            let mut total = 0u64;
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => n,
                };
                if let Some(f) = copy.as_mut() {
                    f.write_all(&buf[..n]).expect("writes the tee file");
                }
                if stdin.write_all(&buf[..n]).is_err() {
                    return total;
                }
                total += n as u64;
            }
        })
    }

    /// Waits for a JSON line with `"event": event` (and `pred`), up to `within`.
    pub fn wait_event(&mut self, event: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let got = self.child.wait_event(event, within, pred);
        got.unwrap_or_else(|e| self.fail(&e))
    }

    /// Waits until `n` events named `event` have been seen in all.
    pub fn wait_nth(&mut self, event: &str, n: usize, within: Duration) -> Value {
        let got = self.child.wait_nth(event, n, within);
        got.unwrap_or_else(|e| self.fail(&e))
    }

    /// Waits for a chat line with this text.
    pub fn wait_chat(&mut self, text: &str) -> Value {
        self.wait_event("chat", Duration::from_secs(15), |v| v["text"] == text)
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> i32 {
        let got = self.child.wait_exit(within);
        got.unwrap_or_else(|e| self.fail(&e))
    }

    /// The final report (after exit).
    pub fn report(&mut self) -> Value {
        self.wait_event("report", Duration::from_secs(5), |_| true)
    }

    /// What the process logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn fail(&self, e: &natcall_jsonl::Error) -> ! {
        panic!("{e}; saw {:?}\n--- log ---\n{}", self.child.seen, self.log_text())
    }
}

impl std::ops::Deref for Peer {
    type Target = JsonChild;
    fn deref(&self) -> &JsonChild {
        &self.child
    }
}

impl std::ops::DerefMut for Peer {
    fn deref_mut(&mut self) -> &mut JsonChild {
        &mut self.child
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// A private tmux server (its own socket in the test's directory) whose windows run commands on
/// a terminal of a given size, to test what a person sees. Killed on drop.
#[derive(Debug)]
pub struct Tmux {
    socket: PathBuf,
    cols: u16,
    rows: u16,
}

impl Tmux {
    pub fn new(dir: &Path, cols: u16, rows: u16) -> Self {
        Self {
            socket: dir.join("tmux.sock"),
            cols,
            rows,
        }
    }

    fn tmux(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(&self.socket);
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self
            .tmux()
            .args(args)
            .output()
            .expect("tmux runs (tests/run-all.sh installs it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `command` (a shell command line) in a new session `name`; when it exits the pane
    /// shows `EXIT=<code>` and then `TTY=` with the terminal's `icanon` and `echo` modes
    /// (`TTY=icanon echo` when it was given back sane), and stays, so what it printed can still
    /// be read.
    pub fn spawn(&self, name: &str, command: &str) {
        let line = format!(
            "{command}; echo EXIT=$?; echo TTY=$(stty -a | tr ' ;' '\\n\\n' | grep -x -e '-\\?icanon' -e '-\\?echo' | tr '\\n' ' '); sleep 600"
        );
        let (cols, rows) = (self.cols.to_string(), self.rows.to_string());
        self.run(&["new-session", "-d", "-s", name, "-x", &cols, "-y", &rows, &line]);
    }

    /// The pane's text now, one string per row (trailing spaces removed).
    pub fn capture(&self, name: &str) -> Vec<String> {
        self.run(&["capture-pane", "-p", "-t", name])
            .lines()
            .map(|l| l.trim_end().to_owned())
            .collect()
    }

    /// Types `keys` (tmux key names: text, `Enter`, `C-c`, …) into session `name`.
    pub fn keys(&self, name: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", name];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Waits until the pane shows a row containing `text`; returns the screen.
    pub fn wait_for(&self, name: &str, text: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let screen = self.capture(name);
            if screen.iter().any(|l| l.contains(text)) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{name}'s terminal never showed {text:?}:\n{}",
                screen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux().arg("kill-server").output();
    }
}

/// A `redis-server` of its own on a loopback port (no persistence), stopped when dropped.
#[derive(Debug)]
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
}

impl Redis {
    /// Starts one on a free loopback port; returns once it answers.
    pub fn start(dir: &Path) -> Self {
        let mut r = Self {
            child: None,
            port: free_port(),
            log: dir.join(format!("redis-{}.log", rand_suffix())),
        };
        r.restart();
        r
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGKILL): its data is gone, as after a crash without persistence.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (after [`Redis::stop`]); returns once it answers.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&self.log).expect("log file"))
            .stderr(Stdio::null())
            .spawn()
            .expect("starts redis-server (tests/run-all.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut pong = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut pong).is_ok() && &pong == b"+PONG\r\n" {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Rendezvous {
    /// A node of the cluster on `redis` with id `node`, its state (TLS key) in `dir/node`, on a
    /// port the kernel chooses.
    pub fn start_node(dir: &Path, redis: &Redis, node: &str, extra: &[&str]) -> Self {
        Self::start_node_at(dir, &redis.url(), node, extra)
    }

    /// [`Rendezvous::start_node`] on the Redis `url` names (`redis+cluster://…`, …).
    pub fn start_node_at(dir: &Path, url: &str, node: &str, extra: &[&str]) -> Self {
        let own = dir.join(node);
        std::fs::create_dir_all(&own).expect("node directory");
        let mut args = vec!["--cluster", url, "--node-id", node];
        args.extend_from_slice(extra);
        Self::start_with(&own, SocketAddr::from(([127, 0, 0, 1], 0)), &args)
    }

    /// Stops the server gracefully (SIGTERM) and waits for it to exit.
    pub fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `redis-cli ARGS` (from `redis-tools`, which `redis-server` pulls in); its stdout.
fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(args).output().expect("runs redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Several `redis-server` processes forming a Redis Cluster, or a master with a Sentinel; all
/// on loopback, killed when dropped.
#[derive(Debug)]
pub struct RedisGroup {
    children: Vec<Child>,
    /// The URL a node is given (`redis+cluster://…` or `redis+sentinel://…/natcall`).
    pub url: String,
    /// With a Sentinel: the master's port, its replica's (if any) and the Sentinel's.
    sentinel_ports: Option<(u16, Option<u16>, u16)>,
}

impl Drop for RedisGroup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_redis(dir: &Path, args: &[String]) -> Child {
    Command::new("redis-server")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join(format!("redis-{}.log", rand_suffix()))).expect("log"))
        .stderr(Stdio::null())
        .spawn()
        .expect("starts redis-server (tests/run-all.sh installs it)")
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl RedisGroup {
    /// A Redis Cluster of three masters (no replicas), every slot assigned.
    pub fn cluster(dir: &Path) -> Self {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut children = Vec::new();
        for p in &ports {
            let conf = dir.join(format!("nodes-{p}.conf"));
            children.push(spawn_redis(
                dir,
                &[
                    "--port".into(),
                    p.to_string(),
                    "--bind".into(),
                    "127.0.0.1".into(),
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    conf.display().to_string(),
                    "--save".into(),
                    String::new(),
                    "--appendonly".into(),
                    "no".into(),
                ],
            ));
        }
        for p in &ports {
            let p = p.to_string();
            wait_until("a cluster node did not answer", || {
                redis_cli(&["-p", &p, "ping"]).contains("PONG")
            });
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        redis_cli(&args);
        for p in &ports {
            let p = p.to_string();
            wait_until("the Redis Cluster did not come up", || {
                redis_cli(&["-p", &p, "cluster", "info"]).contains("cluster_state:ok")
            });
        }
        Self {
            children,
            url: format!("redis+cluster://{}", addrs.join(",")),
            sentinel_ports: None,
        }
    }

    /// A Redis master watched by one Sentinel, which names it `natcall`.
    pub fn sentinel(dir: &Path) -> Self {
        Self::sentinel_group(dir, false)
    }

    /// [`RedisGroup::sentinel`] with a replica of the master, which the Sentinel (quorum 1)
    /// promotes about a second after the master stops answering
    /// ([`RedisGroup::kill_master`]).
    pub fn sentinel_with_replica(dir: &Path) -> Self {
        Self::sentinel_group(dir, true)
    }

    fn sentinel_group(dir: &Path, with_replica: bool) -> Self {
        let (master, sentinel) = (free_port(), free_port());
        let quiet = |port: u16| {
            vec![
                "--port".into(),
                port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
            ]
        };
        let mut children = vec![spawn_redis(dir, &quiet(master))];
        let m = master.to_string();
        wait_until("the master did not answer", || {
            redis_cli(&["-p", &m, "ping"]).contains("PONG")
        });
        let replica = with_replica.then(|| {
            let port = free_port();
            let mut args = quiet(port);
            args.extend(["--replicaof".into(), "127.0.0.1".into(), m.clone()]);
            children.push(spawn_redis(dir, &args));
            let r = port.to_string();
            wait_until("the replica did not follow the master", || {
                redis_cli(&["-p", &r, "info", "replication"]).contains("master_link_status:up")
            });
            port
        });
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {sentinel}\nbind 127.0.0.1\nsentinel monitor natcall 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds natcall 1000\nsentinel failover-timeout natcall 5000\n"
            ),
        )
        .expect("sentinel.conf");
        children.push(spawn_redis(dir, &[conf.display().to_string(), "--sentinel".into()]));
        let s = sentinel.to_string();
        wait_until("the Sentinel did not name the master", || {
            redis_cli(&["-p", &s, "sentinel", "get-master-addr-by-name", "natcall"]).contains(&m)
        });
        if let Some(r) = replica {
            let r = r.to_string();
            wait_until("the Sentinel did not find the replica", || {
                redis_cli(&["-p", &s, "sentinel", "replicas", "natcall"]).contains(&r)
            });
        }
        Self {
            children,
            url: format!("redis+sentinel://127.0.0.1:{sentinel}/natcall"),
            sentinel_ports: Some((master, replica, sentinel)),
        }
    }

    /// Waits until the replica holds `key` (replication is asynchronous).
    pub fn wait_replicated(&self, key: &str) {
        let Some((_, Some(replica), _)) = self.sentinel_ports else {
            panic!("no replica in this group");
        };
        let r = replica.to_string();
        wait_until("the key did not reach the replica", || {
            redis_cli(&["-p", &r, "exists", key]).trim() == "1"
        });
    }

    /// Kills the master (SIGKILL) and waits until the Sentinel names the replica instead.
    /// Returns how long the promotion took.
    pub fn kill_master(&mut self) -> Duration {
        let _ = self.children[0].kill();
        let _ = self.children[0].wait();
        self.wait_promoted()
    }

    /// Stops the master (SIGSTOP), as when its host goes silent: connections to it stay open
    /// and nothing answers on them. Waits until the Sentinel names the replica instead; returns
    /// how long the promotion took. (Dropping the group kills it: SIGKILL ends a stopped
    /// process too.)
    pub fn freeze_master(&mut self) -> Duration {
        let pid = nix::unistd::Pid::from_raw(self.children[0].id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP the master");
        self.wait_promoted()
    }

    fn wait_promoted(&self) -> Duration {
        let Some((_, Some(replica), sentinel)) = self.sentinel_ports else {
            panic!("no replica in this group");
        };
        let started = Instant::now();
        let (r, s) = (replica.to_string(), sentinel.to_string());
        wait_until("the Sentinel did not promote the replica", || {
            redis_cli(&["-p", &s, "sentinel", "get-master-addr-by-name", "natcall"]).contains(&r)
        });
        started.elapsed()
    }
}

/// alice and bob, in a call with each other, chat once each way: `hello` from alice, `reply`
/// from bob, each seen by the other.
pub fn chat_both_ways(alice: &mut Peer, bob: &mut Peer, hello: &str, reply: &str) {
    alice.say(hello);
    bob.wait_chat(hello);
    bob.say(reply);
    alice.wait_chat(reply);
}

/// Lets the built-in media source run long enough for a statistics report (every 500 ms),
/// hangs up on alice's side, and checks that both exit 0 (within `within`) having received
/// audio and video ([`assert_media`]). Their reports.
pub fn hang_up_after_media(alice: &mut Peer, bob: &mut Peer, within: Duration) -> (Value, Value) {
    std::thread::sleep(Duration::from_millis(1500));
    alice.close_stdin();
    assert_eq!(alice.wait_exit(within), 0, "alice's log:\n{}", alice.log_text());
    assert_eq!(bob.wait_exit(within), 0, "bob's log:\n{}", bob.log_text());
    let (a, b) = (alice.report(), bob.report());
    assert_media([&a, &b]);
    (a, b)
}

/// Each of the two call reports shows audio and video received (complete frames, none failing
/// authentication).
pub fn assert_media(reports: [&Value; 2]) {
    for r in reports {
        for track in ["audio", "video"] {
            let got = &r["media"][track]["received"];
            assert!(
                got["frames_complete"].as_u64().unwrap_or(0) > 0,
                "{} received no {track}: {r}",
                r["name"]
            );
            assert_eq!(got["packets_auth_failed"], 0, "{r}");
        }
    }
}
