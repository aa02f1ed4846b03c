//! `natcall-jsonl`: a child process whose stdout is JSON lines — `natcall --json` and
//! `natcall-rendezvous` events such as `{"event":"connected",…}` — read on a thread and waited
//! for with bounded timeouts. The e2e tests (`tests/support`), the lab (`natcall-lab`, children
//! inside network namespaces) and the bench (`natcall-bench`, with CPU sampling) share it; each
//! builds and spawns its command its own way and hands the [`std::process::Child`] over.
//!
//! Data flow:
//! 1. the caller spawns the child with stdout piped and calls [`JsonChild::new`] (or
//!    [`JsonChild::spawn`] for a plain [`Command`]);
//! 2. a thread reads stdout line by line, parses each line as JSON (a line that is not JSON
//!    becomes a [`Value::String`] holding it, bytes that are not UTF-8 replaced) and sends it
//!    on a channel, until end of file;
//! 3. [`JsonChild::wait_event`] and friends move lines from the channel into
//!    [`JsonChild::seen`] until one matches, or return an [`Error`] when their time is up;
//!    a later wait looks at `seen` first, so a line is never missed by reading it early;
//! 4. [`JsonChild::wait_exit`] polls for the exit, then collects the lines still in flight
//!    (the final `report`);
//! 5. dropping the [`JsonChild`] kills the child (SIGKILL) and reaps it.
//!
//! ```no_run
//! use std::process::{Command, Stdio};
//! use std::time::Duration;
//! use natcall_jsonl::JsonChild;
//!
//! let mut cmd = Command::new("natcall");
//! cmd.args(["--json", "listen", "--once"]).stdin(Stdio::piped());
//! let mut bob = JsonChild::spawn("bob", &mut cmd)?;
//! bob.wait_event("registered", Duration::from_secs(10), |_| true)?;
//! let code = bob.wait_exit(Duration::from_secs(60))?;
//! let report = bob.report(Duration::from_secs(5))?;
//! println!("bob exited with {code}: {report}");
//! # Ok::<(), natcall_jsonl::Error>(())
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod error;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use error::Error;
pub use serde_json::Value;

/// How often [`JsonChild::wait_exit`] looks whether the child has exited.
pub const EXIT_POLL: Duration = Duration::from_millis(20);
/// After the exit, lines are collected until none has come for this long (or stdout closed).
const DRAIN_IDLE: Duration = Duration::from_millis(200);
/// …and for at most this long in all (a grandchild could keep stdout open and busy).
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// A running child whose stdout is read as JSON lines; killed and reaped on drop.
#[derive(Debug)]
pub struct JsonChild {
    /// Names the child in every error (`alice`, `rendezvous`, …).
    pub name: String,
    /// Every line read so far, in order. Callers may clear or filter it: the waits look at
    /// what is left, then at new lines.
    pub seen: Vec<Value>,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
}

impl JsonChild {
    /// Takes over `child`, which must have been spawned with `Stdio::piped()` stdout, and starts
    /// reading it. Its stdin, if piped, is kept for [`say`](Self::say).
    pub fn new(name: &str, mut child: Child) -> Result<Self, Error> {
        let name = name.to_owned();
        let stdout = child.stdout.take();
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        // Built before the checks below so that an early return kills the child (drop).
        let this = Self {
            name,
            seen: Vec::new(),
            child,
            stdin,
            lines,
        };
        let Some(stdout) = stdout else {
            return Err(Error::NoStdout {
                name: this.name.clone(),
            });
        };
        std::thread::Builder::new()
            .name(format!("{}-stdout", this.name))
            .spawn(move || read_lines(stdout, &tx))
            .map_err(|source| Error::Io {
                name: this.name.clone(),
                what: "starting the stdout reader",
                source,
            })?;
        Ok(this)
    }

    /// Spawns `cmd` with stdout piped (stdin and stderr as `cmd` says) and takes it over.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self, Error> {
        let child = cmd.stdout(Stdio::piped()).spawn().map_err(|source| Error::Spawn {
            name: name.to_owned(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        Self::new(name, child)
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Types a line on the child's stdin.
    pub fn say(&mut self, line: &str) -> Result<(), Error> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(Error::StdinClosed {
                name: self.name.clone(),
            });
        };
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|source| Error::Io {
                name: self.name.clone(),
                what: "writing to stdin",
                source,
            })
    }

    /// Closes the child's stdin (end of input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Takes the child's stdin, e.g. to copy a stream into it on a thread.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.stdin.take()
    }

    /// Waits up to `within` for a line with `"event": event` for which `pred` holds (the first
    /// one in [`seen`](Self::seen), else the next to arrive).
    pub fn wait_event(&mut self, event: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value, Error> {
        if let Some(v) = self.seen.iter().find(|v| v["event"] == event && pred(v)) {
            return Ok(v.clone());
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if v["event"] == event && pred(&v) {
                        return Ok(v);
                    }
                }
                Err(_) => {
                    return Err(Error::NoEvent {
                        name: self.name.clone(),
                        event: event.to_owned(),
                        within,
                    });
                }
            }
        }
    }

    /// Waits up to `within` until `n` (at least 1) lines with `"event": event` have been seen
    /// in all; the `n`th.
    pub fn wait_nth(&mut self, event: &str, n: usize, within: Duration) -> Result<Value, Error> {
        let n = n.max(1);
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = self.seen.iter().filter(|v| v["event"] == event).nth(n - 1) {
                return Ok(v.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => {
                    return Err(Error::TooFew {
                        name: self.name.clone(),
                        event: event.to_owned(),
                        n,
                        within,
                    });
                }
            }
        }
    }

    /// Waits up to `within` for the `report` line (natcall prints it last, before exiting).
    pub fn report(&mut self, within: Duration) -> Result<Value, Error> {
        self.wait_event("report", within, |_| true)
    }

    /// The last `report` line seen so far, without waiting.
    pub fn last_report(&self) -> Option<Value> {
        self.seen.iter().rev().find(|v| v["event"] == "report").cloned()
    }

    /// Moves the lines that have arrived into [`seen`](Self::seen), without waiting.
    pub fn drain(&mut self) {
        while let Ok(v) = self.lines.try_recv() {
            self.seen.push(v);
        }
    }

    /// Waits up to `within` for the child to exit, then collects its last lines; its exit code
    /// (-1 when a signal ended it).
    pub fn wait_exit(&mut self, within: Duration) -> Result<i32, Error> {
        self.wait_exit_sampling(within, EXIT_POLL, |_| {})
    }

    /// Like [`wait_exit`](Self::wait_exit), looking every `every` and calling `sample` with the
    /// child's pid each time it is still running (e.g. to read its CPU time before it is gone).
    pub fn wait_exit_sampling(
        &mut self,
        within: Duration,
        every: Duration,
        mut sample: impl FnMut(u32),
    ) -> Result<i32, Error> {
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.drain_after_exit();
                    return Ok(status.code().unwrap_or(-1));
                }
                Ok(None) if Instant::now() < deadline => {
                    sample(self.child.id());
                    std::thread::sleep(every);
                }
                Ok(None) => {
                    return Err(Error::NoExit {
                        name: self.name.clone(),
                        within,
                    });
                }
                Err(source) => {
                    return Err(Error::Io {
                        name: self.name.clone(),
                        what: "waiting for exit",
                        source,
                    });
                }
            }
        }
    }

    /// After the exit: what the reader still has (it ends at end of file).
    fn drain_after_exit(&mut self) {
        let deadline = Instant::now() + DRAIN_MAX;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(DRAIN_IDLE) {
                Ok(v) => self.seen.push(v),
                Err(_) => return,
            }
        }
    }

    /// Stops the child (SIGKILL) and reaps it; nothing if it has already exited.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends each line of `stdout` on `tx` as JSON (a line that is not, or not UTF-8, as a string)
/// until end of file, a read error, or nobody listening.
fn read_lines(stdout: impl Read, tx: &mpsc::Sender<Value>) {
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.strip_suffix('\n').unwrap_or(&line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let v = serde_json::from_str(line).unwrap_or_else(|_| Value::String(line.to_owned()));
        if tx.send(v).is_err() {
            return;
        }
    }
}

impl Drop for JsonChild {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sh -c script`, stdin piped, stdout read as JSON lines.
    fn sh(name: &str, script: &str) -> JsonChild {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]).stdin(Stdio::piped()).stderr(Stdio::null());
        JsonChild::spawn(name, &mut cmd).unwrap()
    }

    const SECS_5: Duration = Duration::from_secs(5);

    #[test]
    fn events_are_found_in_order_and_kept_for_later_waits() {
        let mut p = sh(
            "three",
            r#"echo '{"event":"a","n":1}'; echo '{"event":"b"}'; echo '{"event":"a","n":2}'"#,
        );
        assert_eq!(p.wait_event("b", SECS_5, |_| true).unwrap()["event"], "b");
        // Seen before the wait for "b" returned or after: either way it is found.
        assert_eq!(p.wait_event("a", SECS_5, |v| v["n"] == 2).unwrap()["n"], 2);
        assert_eq!(p.wait_event("a", SECS_5, |_| true).unwrap()["n"], 1);
        assert_eq!(p.wait_nth("a", 2, SECS_5).unwrap()["n"], 2);
        assert_eq!(p.wait_exit(SECS_5).unwrap(), 0);
        assert_eq!(p.seen.len(), 3);
        assert!(matches!(
            p.wait_nth("a", 3, Duration::from_millis(50)),
            Err(Error::TooFew { n: 3, .. })
        ));
    }

    #[test]
    fn a_silent_child_times_out_and_is_killed_on_drop() {
        let mut p = sh("silent", "sleep 30");
        let started = Instant::now();
        let err = p
            .wait_event("registered", Duration::from_millis(300), |_| true)
            .unwrap_err();
        let waited = started.elapsed();
        assert!(matches!(err, Error::NoEvent { .. }), "{err:?}");
        assert_eq!(err.to_string(), "silent: no \"registered\" event within 300ms");
        assert!(waited >= Duration::from_millis(300) && waited < SECS_5, "{waited:?}");
        let err = p.wait_exit(Duration::from_millis(100)).unwrap_err();
        assert_eq!(err.to_string(), "silent did not exit within 100ms");
        let proc_dir = std::path::PathBuf::from(format!("/proc/{}", p.id()));
        assert!(proc_dir.exists());
        drop(p);
        // Killed and reaped: the pid is gone (not a zombie).
        assert!(!proc_dir.exists(), "{} still exists", proc_dir.display());
    }

    #[test]
    fn malformed_lines_are_kept_as_strings_and_skipped_by_waits() {
        let mut p = sh(
            "garbled",
            r#"echo 'not json'; echo '{"event":'; printf '\377\n'; echo '{"event":"ok"}'"#,
        );
        assert_eq!(
            p.wait_event("ok", SECS_5, |_| true).unwrap(),
            serde_json::json!({"event": "ok"})
        );
        assert_eq!(p.seen[0], Value::String("not json".into()));
        assert_eq!(p.seen[1], Value::String("{\"event\":".into()));
        assert_eq!(p.seen[2], Value::String("\u{fffd}".into()));
        assert_eq!(p.seen.len(), 4, "{:?}", p.seen);
    }

    #[test]
    fn the_report_and_exit_code_are_read_after_exit() {
        let mut p = sh("reporter", r#"echo '{"event":"report","calls":1}'; exit 3"#);
        assert_eq!(p.wait_exit(SECS_5).unwrap(), 3);
        assert_eq!(p.last_report().unwrap()["calls"], 1);
        assert_eq!(p.report(Duration::ZERO).unwrap()["calls"], 1);
    }

    #[test]
    fn lines_typed_on_stdin_reach_the_child_until_it_is_closed() {
        let mut p = sh(
            "echo",
            r#"while read l; do echo "{\"event\":\"echo\",\"text\":\"$l\"}"; done; echo '{"event":"bye"}'"#,
        );
        p.say("hello").unwrap();
        assert_eq!(p.wait_event("echo", SECS_5, |_| true).unwrap()["text"], "hello");
        p.close_stdin();
        assert!(matches!(p.say("again"), Err(Error::StdinClosed { .. })));
        p.wait_event("bye", SECS_5, |_| true).unwrap();
        assert_eq!(p.wait_exit(SECS_5).unwrap(), 0);
    }

    #[test]
    fn waiting_for_exit_samples_the_running_child() {
        let mut p = sh("sampled", "sleep 0.3");
        let pid = p.id();
        let mut samples = Vec::new();
        let code = p
            .wait_exit_sampling(SECS_5, Duration::from_millis(50), |id| samples.push(id))
            .unwrap();
        assert_eq!(code, 0);
        assert!(samples.len() >= 2 && samples.iter().all(|&id| id == pid), "{samples:?}");
    }

    #[test]
    fn drain_takes_what_has_arrived_without_waiting() {
        let mut p = sh("quick", r#"echo '{"event":"a"}'; echo '{"event":"b"}'; sleep 30"#);
        p.wait_event("a", SECS_5, |_| true).unwrap();
        std::thread::sleep(Duration::from_millis(300)); // "b" is in the channel by now
        let started = Instant::now();
        p.drain();
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(
            p.seen.iter().map(|v| v["event"].clone()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn a_child_without_piped_stdout_is_refused() {
        let child = Command::new("sh")
            .args(["-c", "sleep 30"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let err = JsonChild::new("unpiped", child).unwrap_err();
        assert_eq!(err.to_string(), "unpiped: its stdout is not piped");
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "not killed");
    }
}
