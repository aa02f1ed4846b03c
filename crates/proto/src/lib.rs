//! Wire types and codecs for natcall. No I/O lives here.
//!
//! The rendezvous server and the peers speak two protocols on the same port number:
//!
//! - **UDP**: standard STUN (RFC 8489) Binding requests and responses. See [`stun`]: a plain
//!   request learns the sender's public address; a request carrying a registration token
//!   ([`stun::TokenCredentials`]) also records that address as the peer's public address.
//! - **TCP**: one long-lived TLS 1.3 connection per peer (ALPN [`ALPN`]; the server is known by
//!   a CA certificate or by its pinned key, [`server_key::ServerKey`]) carrying
//!   length-prefixed [`frame`]s:
//!   a version [`frame::Hello`] first, then bincode [`control`] messages, relay frames
//!   ([`relay::RelayHeader`] + an opaque payload) and terminal [`frame::ErrorFrame`]s.
//!
//! Every `bincode` call lives in [`codec`]. Decoders never panic on bad input: they return a
//! typed error ([`FrameError`], [`stun::StunError`], [`auth::AuthError`]).
//!
//! Protocol flow on the TCP connection:
//! 1. client → server: `Hello { version }`; server → client: `Hello { version }` (a mismatch is an
//!    [`frame::ErrorFrame`] naming both versions, and the connection closes);
//! 2. server → client: [`control::ServerMsg::Welcome`] with a random challenge;
//! 3. client → server: [`control::ClientMsg::Register`] with its certificate and a signature over
//!    the challenge bound to this TLS session ([`auth`]), proving it holds the key whose
//!    fingerprint it claims, on this connection and no other;
//! 4. server → client: [`control::ServerMsg::Registered`] with the STUN token; from then on
//!    lookups, pings/pongs and (later) calls and relay frames.
//!
//! ```
//! use bytes::BytesMut;
//! use natcall_proto::{control::ClientMsg, frame::{Frame, FrameDecoder}};
//!
//! let mut wire = BytesMut::new();
//! natcall_proto::frame::encode_control(&ClientMsg::Lookup { name: "bob".into() }, &mut wire).unwrap();
//! let raw = FrameDecoder::new(16 * 1024).decode(&mut wire).unwrap().expect("one whole frame");
//! match raw.parse().unwrap() {
//!     Frame::Control(body) => {
//!         let msg: ClientMsg = natcall_proto::codec::decode_control(body).unwrap();
//!         assert_eq!(msg, ClientMsg::Lookup { name: "bob".into() });
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod auth;
pub mod codec;
pub mod control;
pub mod frame;
pub mod relay;
pub mod server_key;
pub mod stun;

pub use frame::FrameError;

/// The protocol version spoken on the TCP control channel. Bump it on any incompatible change to
/// [`control`] messages or the [`frame`] layout.
pub const PROTOCOL_VERSION: u16 = 8;

/// The ALPN protocol name of the TLS channel between peers and the rendezvous server.
pub const ALPN: &[u8] = b"natcall";

/// The TLS exporter label of the channel binding a registration signs (see [`auth`]).
pub const REGISTER_BINDING_LABEL: &[u8] = b"EXPORTER-natcall-register";
