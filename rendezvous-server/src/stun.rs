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

/// The server's STUN sockets, by index: 0 the main one (IP 1, port 1), 1 the second port
/// (IP 1, port 2), 2 the alternate IP (IP 2, port 1), 3 both (IP 2, port 2). A CHANGE-REQUEST
/// flips the index's bits: bit 1 the IP, bit 0 the port.
#[derive(Debug, Clone, Default)]
pub(crate) struct Layout {
    /// Each socket's address as clients reach it, if the server has that socket.
    pub(crate) addrs: [Option<SocketAddr>; 4],
}

impl Layout {
    /// Whether all four exist: answers carry RESPONSE-ORIGIN and OTHER-ADDRESS (RFC 5780).
    pub(crate) fn rfc5780(&self) -> bool {
        self.addrs.iter().all(Option::is_some)
    }
}

/// Answers STUN on the server's sockets until the task is aborted: one responder per core on
/// the main socket (as coturn runs one UDP thread per core), so a flood is answered by every
/// core, and one on each other socket. Token bindings (main socket only) are looked up in,
/// and recorded into, `registry`; an answer leaves from the socket a CHANGE-REQUEST names.
pub(crate) async fn respond(
    sockets: [Option<Arc<UdpSocket>>; 4],
    layout: Layout,
    registry: Arc<Registry>,
    metrics: Metrics,
) {
    let responders = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sockets = Arc::new(sockets);
    let layout = Arc::new(layout);
    // Aborting this task drops the set, which aborts every responder.
    let mut set = tokio::task::JoinSet::new();
    for me in 0..4 {
        if sockets[me].is_none() {
            continue;
        }
        let count = if me == 0 { responders } else { 1 };
        for _ in 0..count {
            set.spawn(respond_one(
                me,
                sockets.clone(),
                layout.clone(),
                registry.clone(),
                metrics.clone(),
            ));
        }
    }
    while set.join_next().await.is_some() {}
}

async fn respond_one(
    me: usize,
    sockets: Arc<[Option<Arc<UdpSocket>>; 4]>,
    layout: Arc<Layout>,
    registry: Arc<Registry>,
    metrics: Metrics,
) {
    let Some(socket) = sockets[me].clone() else { return };
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
        let registry = (me == 0).then_some(&*registry);
        if let Some((len, from)) = answer_at(me, &layout, registry, &metrics, &buf[..n], peer, &mut out) {
            let Some(from) = sockets[from].as_ref() else { continue };
            metrics.stun_answered();
            if let Err(e) = from.send_to(&out[..len], src).await {
                trace!(%src, error = %e, "udp send failed");
            }
        }
    }
}

/// The response to the datagram `req` from `src` on the main socket of a server with one STUN
/// socket, written into `out`, if it deserves one.
pub(crate) fn answer(
    registry: &Registry,
    metrics: &Metrics,
    req: &[u8],
    src: SocketAddr,
    out: &mut [u8],
) -> Option<usize> {
    let layout = Layout {
        addrs: [Some(SocketAddr::from(([0, 0, 0, 0], 0))), None, None, None],
    };
    answer_at(0, &layout, Some(registry), metrics, req, src, out).map(|(len, _)| len)
}

/// The response to `req` from `src`, received on socket `me` of `layout`: its length in `out`
/// and the socket it leaves from. Token bindings are taken only with a `registry` (the main
/// socket); elsewhere a token binding is answered as a plain request and records nothing.
pub(crate) fn answer_at(
    me: usize,
    layout: &Layout,
    registry: Option<&Registry>,
    metrics: &Metrics,
    req: &[u8],
    src: SocketAddr,
    out: &mut [u8],
) -> Option<(usize, usize)> {
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
    if let (Some(user), true, Some(registry)) = (&parsed.username, parsed.has_integrity, registry) {
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
        let len = wire::encode_binding_success(&parsed.transaction_id, src, Some(&password), out).ok()?;
        trace!(%src, "token binding answered");
        return Some((len, me));
    }
    // A plain request: answered from the socket its CHANGE-REQUEST names, or refused (420) when
    // the server has no such socket.
    let flip = (usize::from(parsed.change.ip) << 1) | usize::from(parsed.change.port);
    let from = me ^ flip;
    let limit = AMPLIFICATION_LIMIT * req.len();
    let tid = &parsed.transaction_id;
    if layout.addrs[from].is_none() {
        let len = wire::encode_binding_error(tid, 420, "Unknown Attribute", out).ok()?;
        return (len <= limit).then_some((len, me));
    }
    let origin = if layout.rfc5780() {
        wire::Origin {
            response_origin: layout.addrs[from],
            other_address: layout.addrs[me ^ 3],
        }
    } else {
        wire::Origin::default()
    };
    // The fullest answer within the amplification limit: RFC 5780's attributes before
    // FINGERPRINT (a bare 20-byte request, as RFC 5780 clients send, gets them unfingerprinted).
    for (origin, fingerprint) in [(origin, true), (origin, false), (wire::Origin::default(), true)] {
        let len = wire::encode_binding_success_with(tid, src, &origin, fingerprint, out).ok()?;
        if len <= limit {
            trace!(%src, from, "binding answered");
            return Some((len, from));
        }
    }
    debug!(%src, "response would amplify the request; dropped");
    None
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
        // The in-memory registry answers at once: no runtime is needed to run it.
        let token = futures_util::FutureExt::now_or_never(registry.register(
            Self::PEER,
            Fingerprint([0; 32]),
            Vec::new(),
            tcp,
            1,
            outbox,
        ))?
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

#[cfg(test)]
mod tests {
    use super::*;
    use natcall_proto::stun::Change;

    fn layout(n: usize) -> Layout {
        let addrs = ["192.0.2.1:3478", "192.0.2.1:3479", "192.0.2.2:3478", "192.0.2.2:3479"]
            .map(|a| a.parse::<SocketAddr>().ok());
        let mut l = Layout::default();
        l.addrs[..n].copy_from_slice(&addrs[..n]);
        l
    }

    fn ask(
        layout: &Layout,
        me: usize,
        change: Change,
    ) -> Option<(Result<wire::BindingAnswer, wire::StunError>, usize)> {
        let tid = [9u8; 12];
        let mut req = [0u8; 64];
        let n = wire::encode_change_request(&tid, change, &mut req).expect("encodes");
        let mut out = [0u8; 256];
        let src: SocketAddr = "198.51.100.7:40000".parse().expect("addr");
        let (len, from) = answer_at(me, layout, None, &Metrics::new(), &req[..n], src, &mut out)?;
        Some((wire::parse_binding_answer(&out[..len], &tid), from))
    }

    #[test]
    fn change_requests_are_answered_from_the_socket_they_name_with_rfc5780_attributes() {
        let l = layout(4);
        let both = Change { ip: true, port: true };
        let (a, from) = ask(&l, 0, both).expect("answered");
        assert_eq!(from, 3);
        let a = a.expect("a success");
        assert_eq!(a.origin.response_origin, l.addrs[3]);
        assert_eq!(a.origin.other_address, l.addrs[3], "OTHER-ADDRESS from the main socket");
        let (a, from) = ask(&l, 2, Change { ip: false, port: true }).expect("answered");
        assert_eq!(from, 3);
        assert_eq!(
            a.expect("success").origin.other_address,
            l.addrs[1],
            "relative to where it came in"
        );
        let (a, from) = ask(&l, 0, Change::default()).expect("answered");
        assert_eq!((from, a.expect("success").mapped.port()), (0, 40000));
    }

    #[test]
    fn without_the_socket_a_change_is_refused_420_and_no_rfc5780_attributes_are_sent() {
        let l = layout(2); // main and second port, no alternate IP
        let (a, from) = ask(&l, 0, Change { ip: true, port: false }).expect("answered");
        assert_eq!((a, from), (Err(wire::StunError::Refused(420)), 0));
        let (a, from) = ask(&l, 0, Change { ip: false, port: true }).expect("answered");
        assert_eq!(from, 1, "a port change works with the second port alone");
        assert_eq!(a.expect("success").origin, wire::Origin::default());
    }

    #[test]
    fn a_bare_request_gets_rfc5780_attributes_within_the_amplification_limit() {
        let l = layout(4);
        // The 20-byte request RFC 5780 clients send: 64 bytes with FINGERPRINT would be 3.2×.
        let req = [
            0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ];
        let mut out = [0u8; 256];
        let src: SocketAddr = "198.51.100.7:40000".parse().expect("addr");
        let (len, from) = answer_at(0, &l, None, &Metrics::new(), &req, src, &mut out).expect("answered");
        assert!(len <= AMPLIFICATION_LIMIT * req.len(), "{len}");
        assert_eq!(from, 0);
        let tid: [u8; 12] = req[8..].try_into().expect("12");
        let a = wire::parse_binding_answer(&out[..len], &tid).expect("parses");
        assert_eq!(a.origin.other_address, l.addrs[3]);
        assert_eq!(a.origin.response_origin, l.addrs[0]);
    }
}
