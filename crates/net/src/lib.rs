//! The natcall peer library: register with a rendezvous server, then place and receive calls
//! that connect along the best path — LAN, hole-punched UDP, or the server's TCP relay — and
//! switch between them mid-call without a new handshake.
//!
//! Main types:
//! - [`Endpoint`]: one UDP socket for everything (STUN, connectivity checks, QUIC, media;
//!   demultiplexed by first byte) and one TCP connection to the server (control and relay);
//! - [`Call`]: a QUIC connection to the peer, mutually authenticated by the key fingerprints
//!   the server handed out, carrying a chat stream and a media session ([`natcall_media`]: sealed
//!   packets of at most 512 bytes on the same path, keys from the QUIC session); its path
//!   changes as the traversal agent ([`natcall_traversal`]) finds, loses and regains direct paths;
//! - [`Identity`]: the peer's certificate and key, kept in its config directory;
//! - [`Contacts`]: the keys of the peers it met (trust on first use; a changed key refuses the
//!   call), and [`SafetyNumber`], which two peers read to each other to compare keys;
//! - [`Room`]: a group call on the server ([`Endpoint::create_room`], [`Endpoint::join_room`]):
//!   who joins and leaves, and a pairwise session ([`Call`]) with each other member.
//!
//! ```no_run
//! # async fn demo() -> Result<(), natcall::Error> {
//! use natcall::{Endpoint, EndpointConfig, Identity, Policy};
//! let identity = Identity::load_or_create(&Identity::default_dir().expect("a config dir"))?;
//! let server = "127.0.0.1:3478".parse().expect("address");
//! let alice = Endpoint::bind(EndpointConfig::new(server, "alice", identity)).await?;
//! let call = alice.call("bob", Policy::Auto).await?;
//! call.send_chat("hello bob").await?;
//! println!("path {}, rtt {:?}", call.path(), call.rtt());
//! call.hangup("bye");
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod call;
mod contacts;
mod control;
mod core;
mod driver;
mod endpoint;
mod error;
mod file;
mod identity;
mod media;
pub mod netcheck;
mod room;
mod room_media;
mod safety;
mod server_trust;
mod socket;
mod spray;
mod tls;

pub use call::{
    Call, CallReport, EndReason, InputsSignal, MAX_CHAT_LINE, Path, PathChange, PathWatch, QuicReport, Role,
};
pub use contacts::{CONTACTS_FILE, Contact, Contacts, ContactsError, KeyChange, Seen, Trust, format_time};
pub use control::{ServerStream, connect_tls};
pub use core::TraversalReport;
pub use endpoint::{Endpoint, EndpointConfig, IncomingCall, ServerState};
pub use error::Error;
pub use identity::Identity;
pub use media::{MediaNotice, MediaRate, MediaReport, TrackReport};
pub use natcall_media::{Frame, RateReason, ReceivedFrame, Stats as MediaStats, Track, Usage};
pub use natcall_proto::PROTOCOL_VERSION;
pub use natcall_proto::control::{Fingerprint, Mapping, NameError, Policy, validate_name};
pub use natcall_proto::control::{RoomMember, RoomRefusal};
pub use natcall_proto::server_key::ServerKey;
pub use room::{FAN_OUT_RATE_BPS, FanOutSender, Room, RoomEvent, Topology, TopologyChooser, TopologyRule, UplinkMeter};
pub use room_media::FanOutReport;
pub use safety::SafetyNumber;
pub use server_trust::{KnownServers, ServerTrust};
