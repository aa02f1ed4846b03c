//! The real binaries as processes inside a namespace: start them, feed stdin, read their JSON
//! lines ([`natcall_jsonl`]), keep their logs. Every wait is bounded; dropping a [`Proc`] kills
//! its process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use natcall_jsonl::{JsonChild, Value};
use patchbay::Device;

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

/// Like [`run_in_output`], also when the command exits with a failure: its stdout and exit
/// code (at most 20 s).
pub(crate) fn run_in_status(device: &Device, program: &str, args: &[&str]) -> Result<(String, Option<i32>), Error> {
    let spawn = |c| device.spawn_command_sync(c);
    run_waited(spawn, program, args, None, Duration::from_secs(20), true)
}

/// Like [`run_in_output`], in the namespace `spawn` starts commands in (a router's, the IX's).
pub(crate) fn run_spawned(
    spawn: impl FnOnce(Command) -> anyhow::Result<std::process::Child>,
    program: &str,
    args: &[&str],
) -> Result<String, Error> {
    run_waited(spawn, program, args, None, Duration::from_secs(10), false).map(|(out, _)| out)
}

fn run_captured(device: &Device, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let spawn = |c| device.spawn_command_sync(c);
    run_waited(spawn, program, args, stdin, Duration::from_secs(10), false).map(|(out, _)| out)
}

fn run_waited(
    spawn: impl FnOnce(Command) -> anyhow::Result<std::process::Child>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    within: Duration,
    any_status: bool,
) -> Result<(String, Option<i32>), Error> {
    let line = format!("{program} {}", args.join(" "));
    let path = crate::error::find_tool(program).unwrap_or_else(|| PathBuf::from(program));
    let mut cmd = Command::new(path);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(cmd).map_err(|e| Error::Command {
        command: line.clone(),
        stderr: format!("{e:#}"),
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(Error::io(format!("writing to `{line}`")))?;
    }
    // The output of these commands is small: read it after exit (it fits the pipe buffer).
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait().map_err(Error::io(format!("waiting for `{line}`")))? {
            Some(status) if status.success() || any_status => {
                let mut stdout = String::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = std::io::Read::read_to_string(&mut o, &mut stdout);
                }
                return Ok((stdout, status.code()));
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
                    stderr: format!("timed out after {} s", within.as_secs()),
                });
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A process of ours inside a namespace, its stdout read as JSON lines ([`JsonChild`]: its
/// `name`, `seen`, `close_stdin`, `drain` and `kill` through `Deref`), stderr to a log file;
/// errors as the scenario drivers report them, sentences.
#[derive(Debug)]
pub(crate) struct Proc {
    child: JsonChild,
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
        let command = || format!("{} {}", program.display(), args.join(" "));
        if let Some(sig) = crate::reap::signalled() {
            // natcall-lab is stopping what it started (`reap`): nothing new.
            return Err(Error::Command {
                command: command(),
                stderr: format!("not started: natcall-lab is stopping on signal {sig}"),
            });
        }
        let log = dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).map_err(Error::io(format!("creating {}", log.display())))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("RUST_LOG", "natcall=debug,natcall_peer=debug,natcall_rendezvous=debug")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file);
        let child = device.spawn_command_sync(cmd).map_err(|e| Error::Command {
            command: command(),
            stderr: format!("{e:#}"),
        })?;
        let child = JsonChild::new(name, child).map_err(|e| Error::Command {
            command: command(),
            stderr: e.to_string(),
        })?;
        Ok(Self { child })
    }

    /// Types a line on its stdin.
    pub(crate) fn say(&mut self, line: &str) -> Result<(), String> {
        self.child.say(line).map_err(|e| e.to_string())
    }

    /// Waits up to `within` for a JSON line with `"event": event` matching `pred`.
    pub(crate) fn wait_event(
        &mut self,
        event: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        self.child.wait_event(event, within, pred).map_err(|e| e.to_string())
    }

    /// Waits for the process to exit (up to `within`); its exit code.
    pub(crate) fn wait_exit(&mut self, within: Duration) -> Result<i32, String> {
        self.child.wait_exit(within).map_err(|e| e.to_string())
    }

    /// The last `report` line, if any.
    pub(crate) fn report(&self) -> Option<Value> {
        self.child.last_report()
    }
}

impl std::ops::Deref for Proc {
    type Target = JsonChild;
    fn deref(&self) -> &JsonChild {
        &self.child
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut JsonChild {
        &mut self.child
    }
}
