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
        let log = dir.join(format!("rendezvous-{}.log", rand_suffix()));
        // Name bindings and the TLS key in the test's own directory: runs never share them or
        // leave any in the user's home, and a restart on the same directory keeps them (peers
        // that pinned the server's key meet the same key), as in production.
        let state = dir.join("rendezvous-state");
        let mut child = Command::new(bin("natcall-rendezvous"))
            .args(["--listen", &addr.to_string(), "--log-level", "debug", "--state-dir"])
            .arg(&state)
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
