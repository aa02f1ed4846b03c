//! Helpers for end-to-end tests: start the real binaries, feed their stdin, read their JSON
//! lines, keep their logs. Every wait is bounded.
//!
//! The binaries must be built first (`cargo build --workspace --bins`; `tests/run-all.sh` does).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

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
    pub fn start(dir: &Path) -> Self {
        Self::start_at(dir, SocketAddr::from(([127, 0, 0, 1], free_port())))
    }

    /// Starts on a given address (e.g. again, after a restart).
    pub fn start_at(dir: &Path, addr: SocketAddr) -> Self {
        let log = dir.join(format!("rendezvous-{}.log", rand_suffix()));
        let child = Command::new(bin("natcall-rendezvous"))
            .args(["--listen", &addr.to_string(), "--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starts natcall-rendezvous");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "natcall-rendezvous did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, addr, log }
    }
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

/// A `natcall` process in `--json` mode.
#[derive(Debug)]
pub struct Peer {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
    pub seen: Vec<Value>,
    pub log: PathBuf,
}

impl Peer {
    /// `natcall --json --server S --name NAME --home DIR/NAME ARGS...`
    pub fn spawn(dir: &Path, server: SocketAddr, name: &str, args: &[&str]) -> Self {
        Self::spawn_home(dir, &dir.join(name), server, name, args)
    }

    pub fn spawn_home(dir: &Path, home: &Path, server: SocketAddr, name: &str, args: &[&str]) -> Self {
        let log = dir.join(format!("{name}-{}.log", std::process::id() ^ rand_suffix()));
        let mut child = Command::new(bin("natcall"))
            .args(["--json", "--server", &server.to_string(), "--name", name, "--home"])
            .arg(home)
            .args(args)
            .env("RUST_LOG", "natcall=debug,natcall_peer=debug")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starts natcall");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let stdin = child.stdin.take();
        Self {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            seen: Vec::new(),
            log,
        }
    }

    /// Types a chat line.
    pub fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("writes to natcall's stdin");
        stdin.flush().expect("flushes");
    }

    /// Copies `input` to the process's stdin (and to `tee` when given) on a thread, then closes
    /// stdin: a pipe into `natcall`, like `ffmpeg … - | natcall call bob --send-video -`.
    pub fn pipe_stdin(
        &mut self,
        mut input: impl Read + Send + 'static,
        tee: Option<PathBuf>,
    ) -> std::thread::JoinHandle<u64> {
        let mut stdin = self.stdin.take().expect("stdin still open");
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

    /// Closes stdin (ends the call after delivering what was typed).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for a JSON line with `"event": event` (and `pred`), up to `within`.
    pub fn wait_event(&mut self, event: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| v["event"] == event && pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if v["event"] == event && pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "{}: no {event:?} event within {within:?}; saw {:?}\n--- log ---\n{}",
                    self.name,
                    self.seen,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            }
        }
    }

    /// Waits until `n` events named `event` have been seen in all.
    pub fn wait_nth(&mut self, event: &str, n: usize, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let seen: Vec<&Value> = self.seen.iter().filter(|v| v["event"] == event).collect();
            if seen.len() >= n {
                return seen[n - 1].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => panic!(
                    "{}: fewer than {n} {event:?} events within {within:?}; saw {:?}\n--- log ---\n{}",
                    self.name,
                    self.seen,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            }
        }
    }

    /// Waits for a chat line with this text.
    pub fn wait_chat(&mut self, text: &str) -> Value {
        self.wait_event("chat", Duration::from_secs(15), |v| v["text"] == text)
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("waits") {
                // Drain what is left on stdout.
                while let Ok(v) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(v);
                }
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}\n--- log ---\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The final report (after exit).
    pub fn report(&mut self) -> Value {
        self.wait_event("report", Duration::from_secs(5), |_| true)
    }

    /// What the process logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
