//! The UDP STUN responder.
//!
//! Every well-formed Binding request gets a Binding success response with XOR-MAPPED-ADDRESS
//! and FINGERPRINT. A request whose USERNAME is a registration token and whose
//! MESSAGE-INTEGRITY verifies with the token's password also records its source address as
//! that peer's public UDP address; its response is signed with the same password.
//!
//! A token binding's transaction id starts with a sequence number (8 bytes, big-endian) the
//! peer increases with every new binding of a registration; only a newer one moves the
//! recorded address, so a binding captured on the path and replayed from elsewhere is dropped
//! (a retransmission from the same source is answered again).
//!
//! Dropped without a reply: anything that is not a STUN Binding request, anything larger than
//! [`MAX_STUN_MESSAGE`], requests with a bad FINGERPRINT, token requests that do not
//! authenticate, and replayed token bindings. An unauthenticated request never gets a response more than
//! [`AMPLIFICATION_LIMIT`] times its own size.

use std::net::SocketAddr;
use std::sync::Arc;

use natcall_proto::control::Fingerprint;
use natcall_proto::stun::{self as wire, MAX_STUN_MESSAGE, TokenCredentials};
use tokio::net::UdpSocket;
use tracing::{debug, trace};

use crate::config::RelayConfig;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::registry::{Binding, Registry};

/// An unauthenticated response is at most this many times the request's size.
pub const AMPLIFICATION_LIMIT: usize = 3;

/// Answers STUN on `socket` until the task is aborted: one responder per core on the same
/// socket (as coturn runs one UDP thread per core), so a flood is answered by every core.
/// Token bindings are looked up in, and recorded into, `registry`.
pub(crate) async fn respond(socket: Arc<UdpSocket>, registry: Arc<Registry>, metrics: Metrics) {
    let responders = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Aborting this task drops the set, which aborts every responder.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..responders {
        set.spawn(respond_one(socket.clone(), registry.clone(), metrics.clone()));
    }
    while set.join_next().await.is_some() {}
}

async fn respond_one(socket: Arc<UdpSocket>, registry: Arc<Registry>, metrics: Metrics) {
    let mut buf = vec![0u8; 2048];
    let mut out = [0u8; 256];
    loop {
        let (n, src) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            // ICMP errors surface as recv errors on Linux; nothing to do about them.
            Err(e) => {
                trace!(error = %e, "udp recv error");
                continue;
            }
        };
        // Recorded and answered as the peer knows its address (IPv4, not `::ffff:…`, on a
        // dual-stack socket); sent back to the address the datagram came from.
        let peer = crate::sockopt::canonical(src);
        if let Some(len) = answer(&registry, &metrics, &buf[..n], peer, &mut out) {
            metrics.stun_answered();
            if let Err(e) = socket.send_to(&out[..len], src).await {
                trace!(%src, error = %e, "udp send failed");
            }
        }
    }
}

/// The response to the datagram `req` from `src`, written into `out`, if it deserves one.
pub(crate) fn answer(
    registry: &Registry,
    metrics: &Metrics,
    req: &[u8],
    src: SocketAddr,
    out: &mut [u8],
) -> Option<usize> {
    if req.len() > MAX_STUN_MESSAGE {
        trace!(%src, len = req.len(), "oversized datagram dropped");
        return None;
    }
    let parsed = match wire::parse_binding_request(req) {
        Ok(p) => p,
        Err(e) => {
            trace!(%src, error = %e, "not a binding request; dropped");
            return None;
        }
    };
    let password = match (&parsed.username, parsed.has_integrity) {
        (Some(user), true) => {
            let Some(password) = registry.token_password(user) else {
                debug!(%src, "binding with an unknown token dropped");
                return None;
            };
            if wire::verify_integrity(req, &password).is_err() {
                debug!(%src, "binding with a bad integrity dropped");
                return None;
            }
            match registry.record_public_udp(user, src, &parsed.transaction_id) {
                Some(Binding::Recorded(name)) => trace!(peer = %name, public = %src, "public address recorded"),
                Some(Binding::Repeated(_)) | None => {}
                Some(Binding::Replayed(name)) => {
                    debug!(peer = %name, %src, "replayed token binding dropped");
                    metrics.stun_replayed();
                    return None;
                }
            }
            Some(password)
        }
        _ => None,
    };
    let len = wire::encode_binding_success(&parsed.transaction_id, src, password.as_deref(), out).ok()?;
    if password.is_none() && len > AMPLIFICATION_LIMIT * req.len() {
        debug!(%src, "response would amplify the request; dropped");
        return None;
    }
    trace!(%src, authenticated = password.is_some(), "binding answered");
    Some(len)
}

/// [`answer`] over a registry holding one registered peer, for the fuzz targets in
/// `crates/fuzz`: not part of the server's API.
#[doc(hidden)]
#[derive(Debug)]
pub struct FuzzResponder {
    registry: Registry,
    metrics: Metrics,
    token: TokenCredentials,
}

#[doc(hidden)]
impl FuzzResponder {
    /// The peer's name in the registry.
    pub const PEER: &'static str = "fuzz";

    /// A responder whose registry holds [`Self::PEER`] with a fresh token; `None` only if the
    /// in-memory registry refuses the registration.
    pub fn new() -> Option<Self> {
        let metrics = Metrics::new();
        let registry = Registry::new(None, &crate::config::Limits::default(), metrics.clone()).ok()?;
        let outbox = Arc::new(Outbox::new(RelayConfig::default(), metrics.clone(), 8));
        let tcp = SocketAddr::from(([127, 0, 0, 1], 1));
        let token = registry
            .register(Self::PEER, Fingerprint([0; 32]), Vec::new(), tcp, 1, outbox)
            .ok()?
            .token;
        Some(Self {
            registry,
            metrics,
            token,
        })
    }

    /// The registered peer's STUN token.
    pub fn token(&self) -> &TokenCredentials {
        &self.token
    }

    /// The public UDP address recorded for the peer so far.
    pub fn public_udp(&self) -> Option<SocketAddr> {
        self.registry.peer(Self::PEER).and_then(|p| p.public_udp)
    }

    /// What the server's responder answers to `req` from `src`.
    pub fn answer(&self, req: &[u8], src: SocketAddr, out: &mut [u8]) -> Option<usize> {
        answer(&self.registry, &self.metrics, req, src, out)
    }
}
