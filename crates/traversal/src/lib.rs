//! Sans-IO NAT traversal agent for natcall: authenticated connectivity checks between
//! two peers, pacing and retransmission, nomination of the best path (LAN > direct),
//! path liveness, and the decision to fall back to the relay.
//!
//! It is a simplified ICE (RFC 8445) with one local candidate — the peer's one UDP
//! socket — and the remote candidates the rendezvous server handed out.
//!
//! # Main types
//! - [`Agent`]: the state machine, one per call attempt.
//! - [`Config`]: pacing, retransmission, budget, nomination and liveness timers.
//! - [`Credentials`]: the per-call password and username fragments.
//! - [`Candidate`] ([`CandidateKind`]): remote addresses to check.
//! - [`Event`]: what the caller acts on ([`Event::Selected`], [`Event::UseRelay`], ...).
//! - [`Transmit`]: a datagram for the caller to send from its socket.
//!
//! # Architecture invariant
//! The crate never touches a socket, a clock, a thread or an OS random source: time
//! comes in as `now: Instant`, randomness from [`Config::rng_seed`], datagrams go out
//! through [`Agent::poll_transmit`]. A `.clippy.toml` bans `Instant::now` and friends.
//!
//! # Drive loop
//! 1. Feed inputs: every datagram whose first byte is 0..=3 to [`Agent::handle_input`],
//!    other authenticated traffic from the peer to [`Agent::handle_activity`], and the
//!    deadline from [`Agent::poll_timeout`] to [`Agent::handle_timeout`].
//! 2. After **every** `handle_*` call (and [`Agent::restart`]), drain
//!    [`Agent::poll_transmit`] and [`Agent::poll_event`], then re-read
//!    [`Agent::poll_timeout`].
//!
//! # Example
//! ```
//! use std::time::{Duration, Instant};
//! use natcall_traversal::{Agent, Candidate, Config, Credentials, Event, Role};
//!
//! # fn main() -> Result<(), natcall_traversal::Error> {
//! let credentials = Credentials::new("per-call-password", "alice", "bob")?;
//! let remote = vec![Candidate::server_reflexive("203.0.113.9:40001".parse().unwrap())];
//! let mut config = Config::default();
//! config.rng_seed = 7; // the I/O layer seeds from a real random source
//! # let start = Instant::now();
//! let mut agent = Agent::new(config, Role::Controlling, credentials, remote, false, start);
//!
//! let mut now = start;
//! loop {
//!     while let Some(transmit) = agent.poll_transmit() {
//!         // socket.send_to(&transmit.contents, transmit.destination)
//!         assert!(transmit.contents.len() < 512);
//!     }
//!     if let Some(event) = agent.poll_event() {
//!         // nobody answers in this example, so the agent gives up after the budget
//!         assert!(matches!(event, Event::UseRelay { .. }));
//!         break;
//!     }
//!     // a real driver waits for the socket or the deadline, whichever comes first
//!     now = agent.poll_timeout().expect("checking agents always have a deadline");
//!     agent.handle_timeout(now);
//! }
//! assert_eq!(now - start, Duration::from_secs(5));
//! # Ok(())
//! # }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod agent;
pub mod birthday;
mod check;
mod config;
mod liveness;
mod pair;
mod rng;
pub mod sim;

use std::net::SocketAddr;
use std::time::Duration;

pub use agent::{Agent, MAX_PROBE_RUNS};
pub use check::looks_like_stun;
pub use config::{Candidate, CandidateKind, Config, Credentials, PathKind, Role};

/// Errors of this crate's API.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The credentials cannot be used for STUN short-term authentication.
    #[error("invalid call credentials: {reason}")]
    InvalidCredentials {
        /// What is wrong with them.
        reason: String,
    },
    /// A datagram is not a well-formed STUN connectivity check or response.
    #[error("malformed STUN message: {reason}")]
    Malformed {
        /// What is wrong with it.
        reason: String,
    },
    /// A STUN message without valid MESSAGE-INTEGRITY and FINGERPRINT.
    #[error("STUN message is not authenticated with this call's password")]
    Unauthenticated,
    /// A message could not be encoded (should not happen with valid credentials).
    #[error("cannot encode STUN message: {reason}")]
    Encode {
        /// The encoder's complaint.
        reason: String,
    },
}

/// A datagram to send from the peer's UDP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub destination: SocketAddr,
    /// The UDP payload (a STUN message, always well under 512 bytes).
    pub contents: Vec<u8>,
    /// A birthday probe ([`Agent::probe`]): a check whose answer nobody waits for.
    pub probe: bool,
}

/// Why the call should go through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayReason {
    /// No pair was validated and selected within the budget.
    NoValidPair {
        /// How long the agent tried.
        after: Duration,
    },
    /// The caller reported that UDP does not work from this host.
    UdpUnusable,
}

/// What the agent reports to its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A pair passed a connectivity check (before selection; informational).
    PairValidated {
        /// The peer's address on this pair.
        remote: SocketAddr,
        /// The kind of path.
        kind: PathKind,
        /// Round-trip time of the check.
        rtt: Duration,
    },
    /// Both sides agreed on this path: send the call's traffic to `remote`.
    Selected {
        /// The peer's address on the selected pair.
        remote: SocketAddr,
        /// The kind of path.
        kind: PathKind,
        /// Round-trip time measured by the check that validated the pair.
        rtt: Duration,
    },
    /// The selected path stopped answering; fall back to the relay, maybe `restart` later.
    PathLost {
        /// The peer's address on the lost path.
        remote: SocketAddr,
    },
    /// Give up on a direct path for now: use the relay.
    UseRelay {
        /// Why.
        reason: RelayReason,
    },
}

/// The origin of virtual time in unit tests (the one permitted clock read).
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
pub(crate) fn test_origin() -> std::time::Instant {
    std::time::Instant::now()
}
