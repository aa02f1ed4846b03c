//! The natcall rendezvous server.
//!
//! On one port number it serves:
//! - **UDP**: a standard STUN Binding responder ([`stun`]); a request authenticated with a
//!   peer's registration token records that peer's public address as its NAT maps it;
//! - **TCP**: one long-lived TLS 1.3 connection per peer ([`tls`], [`conn`]): version hello, registration of a
//!   name to a key (proven by a signature), presence lookups, pings with RTT measurement, call
//!   signalling and relaying between the two peers of a call ([`calls`]), rooms whose members'
//!   relay frames fan out to every other member ([`rooms`]), and a graceful drain on shutdown;
//! - the **relay engine**: one [`outbox::Outbox`] per client — `idle_count` and health checks,
//!   class-aware dropping (control never, audio by deadline, video by whole frames to the next
//!   key frame), stalled clients disconnected — and Prometheus [`metrics`] with a health check
//!   on an HTTP port ([`http`]).
//!
//! The binary (`natcall-rendezvous`) only parses flags and the config file and calls
//! [`run`]; tests call the same function with their own sockets and shutdown future:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use natcall_rendezvous::{Config, Sockets, run};
//! let sockets = Sockets::bind("127.0.0.1:0".parse()?)?;
//! run(sockets, Config::default(), async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod calls;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod outbox;
pub mod registry;
pub mod rooms;
mod server;
pub mod sockopt;
pub mod stun;
pub mod tls;

pub use calls::{Calls, RelayCounts, start_delays};
pub use config::{ClusterConfig, Config, Limits, RelayConfig, StateDir};
pub use metrics::Metrics;
pub use rooms::Rooms;
pub use server::{Server, ServerError, run};
pub use sockopt::Sockets;
