//! `natcall-lab`: NAT scenarios in Linux network namespaces, with the real `natcall-rendezvous`
//! and `natcall` binaries running behind emulated NAT routers.
//!
//! The namespaces, veth links, routers, nftables NAT and firewalls come from the
//! [`patchbay`] crate; this crate adds the natcall-specific parts:
//!
//! - [`Kind`]: the NAT kinds a peer can sit behind, in RFC 4787 terms, and how each is built
//!   with patchbay ([`topology`]);
//! - [`Scenario`] and its oracle [`Scenario::expected`]: which path (LAN, direct, relay) a call
//!   between two kinds must end on;
//! - [`Impairment`]: delay, jitter and loss on a peer's uplink that work on kernels without
//!   `netem` (a TAP forwarder with delay, jitter, loss and optional reordering, [`impair`]);
//! - [`run_scenario`]: builds one lab, starts the server and two peers in it, calls, chats both
//!   ways, hangs up and returns an [`Outcome`] (reports, times, logs kept on failure);
//! - [`matrix`]: every pair of kinds, run concurrently in separate labs, and the table.
//! - [`trials`]: one scenario many times (success rate, time to the final path).
//! - [`netcheck`]: `natcall netcheck` behind each kind, against our server and coturn's, and
//!   coturn's `turnutils_natdiscovery` against ours: do all agree with the kind built?
//! - [`probe`]: plain-UDP checks that an emulated router really maps and filters as named.
//! - [`call`]: one call with the peers' arguments chosen by the caller (media inputs and
//!   outputs, policy, duration), optionally captured on the caller's interface with
//!   [`capture`] (tcpdump and a pcap reader), for tests of what flows on the wire.
//! - [`setup_bench`]: the call-setup benchmark (time to connected and to first audio, per pair
//!   and delay, next to the protocol's floor).
//! - [`shape`]: rate caps (`tc tbf`) on a peer's downlink and a competing download;
//!   [`quality`]: a call over such a link, direct or relayed, and what arrived in time (the
//!   rate-control tests and `natcall-lab quality`).
//! - [`reap`]: `natcall-lab` killed (SIGINT, SIGTERM, SIGHUP) stops every process it started
//!   before it exits, so none runs on orphaned in a namespace.
//!
//! # Drive loop
//! Everything is async (patchbay builds labs on tokio). The scenario driver runs the peer
//! processes on a blocking thread; every wait is bounded, and dropping the lab removes its
//! namespaces (also when a scenario fails or panics).
//!
//! # Example
//! ```no_run
//! # async fn f() -> Result<(), natcall_lab::Error> {
//! use natcall_lab::{Binaries, Kind, RunOptions, Scenario, run_scenario};
//! natcall_lab::preflight()?;
//! let bins = Binaries::locate(None)?;
//! let scenario = Scenario::pair(Kind::PortRestricted, Kind::Symmetric);
//! let outcome = run_scenario(&bins, scenario, &RunOptions::default()).await;
//! assert!(outcome.passed(), "{}", outcome.diagnostics());
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod call;
pub mod capture;
pub mod cluster;
mod error;
pub mod impair;
mod kind;
pub mod matrix;
pub mod netcheck;
pub mod probe;
mod process;
pub mod quality;
pub mod reap;
pub mod room;
mod scenario;
pub mod setup_bench;
pub mod shape;
pub mod topology;
pub mod trials;

pub use error::{Error, preflight};
pub use impair::Impairment;
pub use kind::{Family, Kind, Path, Scenario, V6Case};
pub use process::Binaries;
pub use scenario::{Outcome, RunOptions, run_scenario};
