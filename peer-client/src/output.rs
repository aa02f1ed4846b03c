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
    /// Bad usage: an unknown flag, a missing or invalid argument, flags that do not go together.
    Usage = 2,
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
  2  bad usage (an unknown flag, a missing or invalid argument or name, flags that
     do not go together)
  3  the rendezvous server is unreachable, is not a natcall server, or was lost
  4  the server refused you (name taken by another key, bad name, full, version;
     a room you are not invited to, or full), or another session took your name
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

/// An error that carries its exit code (usage errors, a bad name of one's own).
#[derive(Debug)]
pub struct Coded {
    pub exit: Exit,
    pub message: String,
}

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Coded {}

/// A usage error (exit code 2).
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Coded {
        exit: Exit::Usage,
        message: message.into(),
    })
}

/// The exit code for an error: the first cause in its chain that says.
pub fn classify(e: &anyhow::Error) -> Exit {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.exit;
        }
        let exit = match cause.downcast_ref::<Error>() {
            Some(Error::Unreachable { .. } | Error::NotAServer { .. } | Error::ServerLost(_)) => Exit::Server,
            Some(Error::Refused { .. } | Error::Room { .. } | Error::Replaced(_)) => Exit::Refused,
            Some(Error::Offline(_) | Error::Busy(_) | Error::SelfCall | Error::Ended(_)) => Exit::Peer,
            Some(Error::NoPath(_) | Error::Timeout(_)) => Exit::NoPath,
            Some(Error::KeyChanged(_)) => Exit::PeerKeyChanged,
            Some(Error::ServerKeyChanged { .. }) => Exit::KeyChanged,
            Some(_) => Exit::Internal,
            None => continue,
        };
        return exit;
    }
    Exit::Internal
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
        say(&format!("natcall: {e:#}"));
        if let Some(h) = hint {
            say(&format!("natcall: {h}"));
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

/// A received chat line: above the status line in the terminal view, else on stdout (stderr
/// when stdout carries received media).
pub fn chat(json: bool, from: &str, text: &str) {
    let shown = format!("{from}: {text}");
    if json {
        line(&json!({"event": "chat", "from": from, "text": text}));
    } else if crate::view::print(&shown) {
        // Shown.
    } else if MEDIA_ON_STDOUT.load(std::sync::atomic::Ordering::Relaxed) {
        say(&shown);
    } else {
        let shown = if std::io::stdout().is_terminal() {
            crate::view::printable(&shown)
        } else {
            shown.as_str().into()
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{shown}");
        let _ = out.flush();
    }
}

/// Set when stdout carries received media (`--recv-audio -`, `--recv-video -`): chat lines then
/// go to stderr, so they never land inside the media stream.
pub static MEDIA_ON_STDOUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A one-off notice (connected, path change, ended): above the status line in the terminal
/// view, else a line on stderr.
pub fn notice(json: bool, event: serde_json::Value, text: &str) {
    if json {
        line(&event);
    } else {
        say(text);
    }
}

/// A line for a person (not with `--json`): above the status line in the terminal view, else on
/// stderr.
pub fn say(text: &str) {
    if !crate::view::print(text) {
        if std::io::stderr().is_terminal() {
            eprintln!("{}", crate::view::printable(text));
        } else {
            eprintln!("{text}");
        }
    }
}

/// Rewrites the status line (in the terminal view; without it there is none).
pub fn status(text: &str) {
    crate::view::status(text);
}

/// An address a person reads: the address, or "unknown" (never `Some(…)`/`None`).
pub fn addr_text(addr: Option<std::net::SocketAddr>) -> String {
    addr.map_or_else(|| "unknown".to_owned(), |a| a.to_string())
}

/// One track of a call for a person: what was sent and what arrived, in frames and bytes.
/// One line on how the direct path was looked for: the two NAT mappings, the candidates
/// checked, birthday traversal, and the candidate that won.
pub fn traversal_text(t: &natcall::TraversalReport) -> String {
    let candidates: Vec<String> = t.candidates.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let birthday = match t.birthday {
        Some("spray") => format!(
            "; birthday traversal: opened {} ports towards the peer",
            t.spray_sockets
        ),
        Some(_) => format!("; birthday traversal: {} probes sent", t.probes_sent),
        None => String::new(),
    };
    let won = t.won.as_deref().map(|w| format!("; won: {w}")).unwrap_or_default();
    format!(
        "traversal: NAT mapping {} here, {} at the peer; candidates [{}]{birthday}{won}",
        t.nat_mapping,
        t.peer_nat_mapping,
        candidates.join(", ")
    )
}

/// One line of a track's figures.
pub fn track_text(name: &str, t: &natcall::TrackReport) -> String {
    let sent = t.sent.as_ref().map_or((0, 0), |s| (s.frames_sent, s.bytes_sent));
    let got = t
        .received
        .as_ref()
        .map_or((0, 0, 0), |s| (s.frames_complete, s.bytes_received, s.packets_lost));
    format!(
        "{name}: {} frames ({}) sent, {} frames ({}) received, {} packets lost",
        sent.0,
        bytes_text(sent.1),
        got.0,
        bytes_text(got.1),
        got.2
    )
}

/// A byte count for a person: B, kB, MB.
pub fn bytes_text(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        _ => format!("{:.1} MB", n as f64 / 1e6),
    }
}
