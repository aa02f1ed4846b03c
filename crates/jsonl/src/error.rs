//! What can go wrong with a [`JsonChild`](crate::JsonChild).

use std::time::Duration;

/// A wait that ran out, a pipe that broke, or a child that could not be read.
///
/// Every variant names the child (`name`, as given to [`JsonChild::new`](crate::JsonChild::new)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The command could not be started.
    #[error("{name}: starting {program}: {source}")]
    Spawn {
        /// The child's name.
        name: String,
        /// The program that was run.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The child was spawned without `Stdio::piped()` on stdout.
    #[error("{name}: its stdout is not piped")]
    NoStdout {
        /// The child's name.
        name: String,
    },
    /// No line with `"event": event` (matching the caller's predicate) arrived in time.
    #[error("{name}: no {event:?} event within {within:?}")]
    NoEvent {
        /// The child's name.
        name: String,
        /// The event waited for.
        event: String,
        /// How long it was waited for.
        within: Duration,
    },
    /// Fewer than `n` lines with `"event": event` arrived in time.
    #[error("{name}: fewer than {n} {event:?} events within {within:?}")]
    TooFew {
        /// The child's name.
        name: String,
        /// The event counted.
        event: String,
        /// How many were wanted.
        n: usize,
        /// How long they were waited for.
        within: Duration,
    },
    /// The child was still running when the wait for its exit ended.
    #[error("{name} did not exit within {within:?}")]
    NoExit {
        /// The child's name.
        name: String,
        /// How long it was waited for.
        within: Duration,
    },
    /// A line was typed after stdin was closed (or taken, or never piped).
    #[error("{name}: stdin already closed")]
    StdinClosed {
        /// The child's name.
        name: String,
    },
    /// Writing to stdin, starting the reader thread or waiting for the child failed.
    #[error("{name}: {what}: {source}")]
    Io {
        /// The child's name.
        name: String,
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
}
