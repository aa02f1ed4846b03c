//! Errors of the natcall library, each a sentence a user can act on.

use std::net::SocketAddr;

use natcall_proto::frame::ErrorCode;

use crate::contacts::{ContactsError, KeyChange};

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The rendezvous server cannot be reached.
    #[error("cannot reach the rendezvous server at {addr}: {cause} (is it running? check --server)")]
    Unreachable { addr: SocketAddr, cause: std::io::Error },
    /// Something answers at the server's address, but not a natcall rendezvous server (an HTTP
    /// server, or one that never completes the handshake).
    #[error("{server} is not a natcall rendezvous server: {why} (check --server)")]
    NotAServer { server: String, why: String },
    /// The server refused us (name taken, bad name, full, version mismatch, …).
    #[error("the rendezvous server refused: {message}")]
    Refused { code: ErrorCode, message: String },
    /// The server broke the protocol or closed during a request.
    #[error("rendezvous protocol error: {0}")]
    Protocol(String),
    /// The connection to the server was lost.
    #[error("lost the rendezvous server: {0}")]
    ServerLost(String),
    /// Nobody is registered under that name.
    #[error("{0} is not online")]
    Offline(String),
    /// Calling oneself.
    #[error("you cannot call yourself")]
    SelfCall,
    /// The callee is in another call: it said so ([`crate::IncomingCall::busy`]), or it has as
    /// many calls as the server allows.
    #[error("{0} is busy (in another call)")]
    Busy(String),
    /// The server refused to ring the callee now (already ringing it, or it was rung too often).
    #[error("{0}")]
    CallRefused(String),
    /// The callee declined, or the call ended before it connected.
    #[error("{0}")]
    Ended(String),
    /// No path the call's policy allows could be established, or the two sides' policies
    /// cannot both hold (the callee allows only another one).
    #[error("{0}")]
    NoPath(String),
    /// Another session of this peer (same name and key) registered with the server and took
    /// over: this endpoint does not register again, and its calls ended. The sentence says
    /// from where.
    #[error("{0}")]
    Replaced(String),
    /// The identity could not be loaded, created or used.
    #[error("identity: {0}")]
    Identity(String),
    /// TLS configuration failed.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// QUIC failed.
    #[error("QUIC: {0}")]
    Quic(String),
    /// The peer presented another key than the server vouched for.
    #[error("the peer's key does not match the one the server gave for {0}")]
    WrongPeerKey(String),
    /// Local socket failure.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The server vouches for another key than the one this peer met the other side with
    /// before ([`crate::Contacts`]): the call was refused.
    #[error("{0}")]
    KeyChanged(Box<KeyChange>),
    /// The contacts file could not be used (the call is refused rather than go unchecked).
    #[error("contacts: {0}")]
    Contacts(#[from] ContactsError),
    /// The server presented another key than the one given or remembered for it: someone may
    /// be intercepting the connection, or the server's key was replaced.
    #[error(
        "the rendezvous server {server} presented key {presented}, but {} {known}: someone may be intercepting the connection, or the server's key was replaced",
        if *given { "the key given for it is" } else { "the key remembered for it is" }
    )]
    ServerKeyChanged {
        server: String,
        known: natcall_proto::server_key::ServerKey,
        presented: natcall_proto::server_key::ServerKey,
        /// The known key was given explicitly (`#SHA256:…`), not remembered from a first use.
        given: bool,
    },
    /// Timed out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The server refused to create or join a room.
    #[error("{reason}")]
    Room {
        /// Why, as the protocol says it.
        refusal: natcall_proto::control::RoomRefusal,
        /// Why, for a person.
        reason: String,
    },
}

impl From<quinn::ConnectionError> for Error {
    fn from(e: quinn::ConnectionError) -> Self {
        Self::Quic(e.to_string())
    }
}
