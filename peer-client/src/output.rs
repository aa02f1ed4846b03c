//! What the user sees: chat lines, the status line, the final report, errors and exit codes.
//!
//! Human mode: chat on stdout (`bob: hello`; on stderr when stdout carries received media),
//! status and summaries on stderr.
//! `--json` mode: stdout is JSON lines — `{"event":"chat",...}`, `{"event":"path",...}`, and
//! last `{"event":"report",...}` (or `{"event":"error",...}`); nothing else goes to stdout.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use natcall::Error;
use serde::Serialize;
use serde_json::json;

/// Exit codes: see `natcall --help` and the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The call connected and ended normally (hang-up either side, stdin closed, Ctrl-C, duration).
    Ok = 0,
    /// Anything unexpected.
    Internal = 1,
    /// The rendezvous server cannot be reached, or was lost.
    Server = 3,
    /// The server refused this peer (name taken, bad name, full, version; a room).
    Refused = 4,
    /// The peer is offline, busy, or declined.
    Peer = 5,
    /// No path the policy allows could be established.
    NoPath = 6,
    /// The call connected, then was lost.
    Dropped = 7,
    /// A key did not match the one given or remembered (the server's): nothing was sent.
    KeyChanged = 8,
    /// The peer's key is not the one met before (its contact): the call was refused.
    PeerKeyChanged = 9,
}

/// The exit codes, for `natcall --help` (and the README).
pub const EXIT_CODES: &str = "Exit codes:
  0  the command succeeded (a call ran and ended normally)
  1  anything else
  2  bad usage (an unknown flag, a missing or invalid argument)
  3  the rendezvous server is unreachable or was lost
  4  the server refused you (name taken by another key, bad name, full, version;
     a room you are not invited to, or full)
  5  the peer is offline, busy or declined
  6  no path the policy allows could be established
  7  the call connected, then was lost
  8  the server's key did not match the one given or remembered: nothing was sent
     (`natcall trust-server 'HOST:PORT#SHA256:KEY'` accepts a replaced key)
  9  the peer's key changed since you last met: the call was refused
     (compare `natcall verify NAME --key KEY`, then `natcall contacts accept NAME KEY`)";

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// The exit code for an error.
pub fn classify(e: &anyhow::Error) -> Exit {
    match e.downcast_ref::<Error>() {
        Some(Error::Unreachable { .. } | Error::ServerLost(_)) => Exit::Server,
        Some(Error::Refused { .. } | Error::Room { .. }) => Exit::Refused,
        Some(Error::Offline(_) | Error::Busy(_) | Error::SelfCall | Error::Ended(_)) => Exit::Peer,
        Some(Error::NoPath(_) | Error::Timeout(_)) => Exit::NoPath,
        Some(Error::KeyChanged(_)) => Exit::PeerKeyChanged,
        Some(Error::ServerKeyChanged { .. }) => Exit::KeyChanged,
        _ => Exit::Internal,
    }
}

/// Reports an error and returns its exit code.
pub fn fail(json: bool, exit: Exit, e: &anyhow::Error) -> ExitCode {
    let hint = match e.downcast_ref::<Error>() {
        Some(Error::ServerKeyChanged { server, presented, .. }) => Some(format!(
            "if you know the server's key was replaced, accept the new one with: natcall trust-server '{server}#{presented}'"
        )),
        _ => None,
    };
    if json {
        line(&json!({"event": "error", "error": format!("{e:#}"), "hint": hint, "exit_code": exit as u8}));
    } else {
        eprintln!("natcall: {e:#}");
        if let Some(h) = hint {
            eprintln!("natcall: {h}");
        }
    }
    exit.into()
}

/// Prints one JSON line on stdout.
pub fn line(value: &impl Serialize) {
    let mut out = std::io::stdout().lock();
    if let Ok(s) = serde_json::to_string(value) {
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    }
}

/// A received chat line.
pub fn chat(json: bool, from: &str, text: &str) {
    if json {
        line(&json!({"event": "chat", "from": from, "text": text}));
    } else if MEDIA_ON_STDOUT.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("{from}: {text}");
    } else {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{from}: {text}");
        let _ = out.flush();
    }
}

/// Set when stdout carries received media (`--recv-audio -`, `--recv-video -`): chat lines then
/// go to stderr, so they never land inside the media stream.
pub static MEDIA_ON_STDOUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A one-off notice (connected, path change, ended).
pub fn notice(json: bool, event: serde_json::Value, text: &str) {
    if json {
        line(&event);
    } else {
        status_clear();
        eprintln!("{text}");
    }
}

/// Rewrites the status line on a terminal; silent otherwise.
pub fn status(text: &str) {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K{text}");
    }
}

fn status_clear() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}
