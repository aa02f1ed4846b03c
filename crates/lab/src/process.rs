//! The real binaries as processes inside a namespace: start them, feed stdin, read their JSON
//! lines, keep their logs. Every wait is bounded; dropping a [`Proc`] kills its process.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use patchbay::Device;
use serde_json::Value;

use crate::Error;

/// Where `natcall` and `natcall-rendezvous` are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The peer CLI.
    pub natcall: PathBuf,
    /// The server.
    pub rendezvous: PathBuf,
}

impl Binaries {
    /// Finds both binaries in `dir`, or else next to the running executable (`target/<profile>/`,
    /// also from `target/<profile>/deps/` where test executables live).
    pub fn locate(dir: Option<&Path>) -> Result<Self, Error> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => {
                let exe = std::env::current_exe().map_err(Error::io("finding the running executable"))?;
                let here = exe.parent().map(Path::to_path_buf).unwrap_or_default();
                if here.ends_with("deps") {
                    here.parent().map(Path::to_path_buf).unwrap_or(here)
                } else {
                    here
                }
            }
        };
        let natcall = dir.join("natcall");
        let rendezvous = dir.join("natcall-rendezvous");
        for p in [&natcall, &rendezvous] {
            if !p.is_file() {
                return Err(Error::MissingBinary(p.clone()));
            }
        }
        Ok(Self { natcall, rendezvous })
    }
}

/// Runs a short command inside `device`'s namespace and waits for it (at most 10 s).
pub(crate) fn run_in(device: &Device, program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), Error> {
    run_captured(device, program, args, stdin).map(drop)
}

/// Like [`run_in`], returning what the command printed on stdout.
pub(crate) fn run_in_output(device: &Device, program: &str, args: &[&str]) -> Result<String, Error> {
    run_captured(device, program, args, None)
}

fn run_captured(device: &Device, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let line = format!("{program} {}", args.join(" "));
    let path = crate::error::find_tool(program).unwrap_or_else(|| PathBuf::from(program));
    let mut cmd = Command::new(path);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = device.spawn_command_sync(cmd).map_err(|e| Error::Command {
        command: line.clone(),
        stderr: format!("{e:#}"),
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(Error::io(format!("writing to `{line}`")))?;
    }
    // The output of these commands is small: read it after exit (it fits the pipe buffer).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait().map_err(Error::io(format!("waiting for `{line}`")))? {
            Some(status) if status.success() => {
                let mut stdout = String::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = std::io::Read::read_to_string(&mut o, &mut stdout);
                }
                return Ok(stdout);
            }
            Some(_) => {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                }
                return Err(Error::Command { command: line, stderr });
            }
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Command {
                    command: line,
                    stderr: "timed out after 10 s".into(),
                });
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A process of ours inside a namespace, its stdout read as JSON lines, stderr to a log file.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
    pub(crate) seen: Vec<Value>,
}

impl Proc {
    /// Starts `program args` in `device`'s namespace, logging to `dir/<name>.log`.
    pub(crate) fn spawn(
        device: &Device,
        dir: &Path,
        name: &str,
        program: &Path,
        args: &[String],
    ) -> Result<Self, Error> {
        let log = dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).map_err(Error::io(format!("creating {}", log.display())))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("RUST_LOG", "natcall=debug,natcall_peer=debug,natcall_rendezvous=debug")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file);
        let mut child = device.spawn_command_sync(cmd).map_err(|e| Error::Command {
            command: format!("{} {}", program.display(), args.join(" ")),
            stderr: format!("{e:#}"),
        })?;
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Ok(Self {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            seen: Vec::new(),
        })
    }

    /// Types a line on its stdin.
    pub(crate) fn say(&mut self, line: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin already closed")?;
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("{}: writing to stdin: {e}", self.name))
    }

    /// Closes stdin (a caller then finishes the chat and hangs up).
    pub(crate) fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits up to `within` for a JSON line with `"event": event` matching `pred`.
    pub(crate) fn wait_event(
        &mut self,
        event: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
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
                Err(_) => return Err(format!("{}: no {event:?} event within {within:?}", self.name)),
            }
        }
    }

    /// Waits for the process to exit (up to `within`); its exit code.
    pub(crate) fn wait_exit(&mut self, within: Duration) -> Result<i32, String> {
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    while let Ok(v) = self.lines.recv_timeout(Duration::from_millis(200)) {
                        self.seen.push(v);
                    }
                    return Ok(status.code().unwrap_or(-1));
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => return Err(format!("{} did not exit within {within:?}", self.name)),
                Err(e) => return Err(format!("{}: waiting: {e}", self.name)),
            }
        }
    }

    /// Collects what arrived on stdout without waiting.
    pub(crate) fn drain(&mut self) {
        while let Ok(v) = self.lines.try_recv() {
            self.seen.push(v);
        }
    }

    /// The last `report` line, if any.
    pub(crate) fn report(&self) -> Option<Value> {
        self.seen.iter().rev().find(|v| v["event"] == "report").cloned()
    }

    /// Stops the process (SIGKILL) and reaps it.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
