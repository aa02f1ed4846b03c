//! The peer's one UDP socket, shared by STUN, connectivity checks, QUIC and media, and the
//! `quinn::AsyncUdpSocket` adapter that runs QUIC over it (quinn 0.11's trait; keep every use of
//! it in this module).
//!
//! Data flow:
//! - inbound datagrams are demultiplexed by first byte (RFC 9443): STUN (0–3) goes to the
//!   endpoint's STUN router; QUIC (64–127, 192–255) from an address validated for a call goes to
//!   quinn as coming from that call's **fake address**; media (16–63) from such an address goes
//!   to the call's media session; anything else is dropped;
//! - relay frames from the control connection arrive on a channel and reach quinn the same way;
//! - quinn sends to a fake address; the route table says where it goes now: a real UDP address
//!   (LAN or punched), the relay (a relay frame on the TCP control connection), or nowhere.
//! - a control frame can be held until quinn's next packet to a fake address has gone out
//!   ([`MuxSocket::hold`]): a hang-up follows its call's QUIC close, which on the relay the
//!   server forwards only while the call is active.
//!
//! QUIC never sees a path change, so relay → direct and direct → relay switches need no new
//! handshake. Fake addresses are IPv6 ULAs, so quinn's local address is reported as IPv6.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use natcall_proto::frame;
use natcall_proto::relay::{RelayFlags, RelayHeader, TrafficClass};
use natcall_proto::stun::{PacketClass, classify};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::trace;

use crate::control::Outgoing;

/// Where packets for a call's fake address go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Nowhere yet (dropped; QUIC retransmits).
    Void,
    /// A real UDP address: LAN or punched.
    Udp(SocketAddr),
    /// Relay frames for this call id on the control connection.
    Relay(u32),
}

/// The fake address standing for the peer of call `call`.
pub(crate) fn fake_addr(call: u32) -> SocketAddr {
    let mut o = [0u8; 16];
    o[..6].copy_from_slice(&[0xfd, 0x6e, 0x61, 0x74, 0x63, 0x61]); // fd "natca"
    o[12..].copy_from_slice(&call.to_be_bytes());
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(o), 1, 0, 0))
}

/// The call id a fake address stands for.
pub(crate) fn call_of(fake: SocketAddr) -> u32 {
    match fake {
        SocketAddr::V6(v6) => {
            let o = v6.ip().octets();
            u32::from_be_bytes([o[12], o[13], o[14], o[15]])
        }
        SocketAddr::V4(_) => 0,
    }
}

#[derive(Debug, Default)]
struct Routes {
    by_fake: HashMap<SocketAddr, Route>,
    /// Real addresses validated for a call → its fake address.
    by_real: HashMap<SocketAddr, SocketAddr>,
    /// Last QUIC packet from each real address (liveness for the traversal agent).
    last_rx: HashMap<SocketAddr, Instant>,
    /// Control frames waiting for quinn's next packet to a fake address ([`MuxSocket::hold`]).
    held: HashMap<SocketAddr, Bytes>,
}

/// The shared UDP socket with its route table.
pub(crate) struct MuxSocket {
    udp: Arc<UdpSocket>,
    routes: Mutex<Routes>,
    relay_in: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    relay_out: mpsc::Sender<Outgoing>,
    stun_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    /// Media packets (first byte 16–63) from validated addresses, with the call's fake address.
    media_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    /// The rendezvous server's UDP address: never blackholed.
    server: SocketAddr,
    /// Test hook: drop all UDP to and from everyone but the server (a dead direct path).
    blackhole: AtomicBool,
}

impl fmt::Debug for MuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxSocket")
            .field("udp", &self.udp)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a few map operations: a panic cannot leave them inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MuxSocket {
    pub(crate) fn new(
        udp: Arc<UdpSocket>,
        server: SocketAddr,
        relay_in: mpsc::Receiver<(SocketAddr, Bytes)>,
        relay_out: mpsc::Sender<Outgoing>,
        stun_tx: mpsc::Sender<(SocketAddr, Bytes)>,
        media_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    ) -> Self {
        Self {
            udp,
            routes: Mutex::default(),
            relay_in: Mutex::new(relay_in),
            relay_out,
            stun_tx,
            media_tx,
            server,
            blackhole: AtomicBool::new(false),
        }
    }

    pub(crate) fn udp(&self) -> &Arc<UdpSocket> {
        &self.udp
    }

    /// Sets where packets for `fake` go.
    pub(crate) fn set_route(&self, fake: SocketAddr, route: Route) {
        lock(&self.routes).by_fake.insert(fake, route);
    }

    pub(crate) fn route(&self, fake: SocketAddr) -> Option<Route> {
        lock(&self.routes).by_fake.get(&fake).copied()
    }

    /// Accepts QUIC from `real` as coming from `fake` (an authenticated, validated address).
    pub(crate) fn allow_remote(&self, real: SocketAddr, fake: SocketAddr) {
        lock(&self.routes).by_real.insert(real, fake);
    }

    /// The last time a QUIC packet arrived from `real`.
    pub(crate) fn last_rx(&self, real: SocketAddr) -> Option<Instant> {
        lock(&self.routes).last_rx.get(&real).copied()
    }

    /// Queues the control frame `frame` right after quinn's next packet to `fake`, or after
    /// `at_most`, whichever comes first. A hang-up waits for the call's CONNECTION_CLOSE this
    /// way: on the relay both share the control connection, and the server forwards relay
    /// frames only while the call is active, so a hang-up sent first would drop the close.
    pub(crate) fn hold(self: &Arc<Self>, fake: SocketAddr, frame: Bytes, at_most: std::time::Duration) {
        if let Some(older) = lock(&self.routes).held.insert(fake, frame) {
            self.queue_control(older);
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let socket = Arc::downgrade(self);
                rt.spawn(async move {
                    tokio::time::sleep(at_most).await;
                    if let Some(socket) = socket.upgrade() {
                        socket.release(fake);
                    }
                });
            }
            Err(_) => self.release(fake),
        }
    }

    /// Queues the frame held for `fake`, if any.
    fn release(&self, fake: SocketAddr) {
        let held = lock(&self.routes).held.remove(&fake);
        if let Some(frame) = held {
            self.queue_control(frame);
        }
    }

    fn queue_control(&self, frame: Bytes) {
        if self.relay_out.try_send(Outgoing::Frame(frame)).is_err() {
            trace!("control queue full: held frame dropped");
        }
    }

    /// Forgets everything about `fake`.
    pub(crate) fn remove(&self, fake: SocketAddr) {
        self.release(fake);
        let mut r = lock(&self.routes);
        r.by_fake.remove(&fake);
        let reals: Vec<SocketAddr> = r
            .by_real
            .iter()
            .filter(|(_, f)| **f == fake)
            .map(|(real, _)| *real)
            .collect();
        for real in reals {
            r.by_real.remove(&real);
            r.last_rx.remove(&real);
        }
    }

    /// Drops all UDP except to and from the server (test hook for a dying direct path).
    pub(crate) fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::Relaxed);
    }

    fn blackholed(&self, addr: SocketAddr) -> bool {
        self.blackhole.load(Ordering::Relaxed) && addr != self.server
    }

    /// Sends a datagram that is not QUIC (STUN, checks) unless blackholed.
    pub(crate) async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        if self.blackholed(to) {
            return Ok(());
        }
        self.udp.send_to(data, to).await.map(|_| ())
    }

    fn send_relay(&self, call: u32, contents: &[u8]) {
        let header = RelayHeader {
            call,
            class: TrafficClass::Control,
            flags: RelayFlags::default(),
        };
        let mut b = BytesMut::with_capacity(contents.len() + 16);
        if frame::encode_relay(&header, contents, &mut b).is_ok() {
            // A full queue drops the packet like a congested link would; QUIC recovers.
            if self.relay_out.try_send(Outgoing::Frame(b.freeze())).is_err() {
                trace!(call, "relay queue full: packet dropped");
            }
        }
    }

    /// Sends a sealed media packet of `track` to the peer at `fake` on the current path: a UDP
    /// datagram, or a relay frame of class audio (track 0) or video whose flags the server sees.
    /// Never blocks: a full socket or queue drops the packet, as a congested link would.
    pub(crate) fn send_media(&self, fake: SocketAddr, contents: &[u8], track: u8, flags: u8) {
        match self.route(fake) {
            Some(Route::Udp(real)) if !self.blackholed(real) => {
                let _ = self.udp.try_send_to(contents, real);
            }
            Some(Route::Relay(call)) => {
                let class = if track == 0 {
                    TrafficClass::Audio
                } else {
                    TrafficClass::Video
                };
                let header = RelayHeader {
                    call,
                    class,
                    flags: RelayFlags(flags),
                };
                let mut b = BytesMut::with_capacity(contents.len() + 16);
                if frame::encode_relay(&header, contents, &mut b).is_ok()
                    && self.relay_out.try_send(Outgoing::Frame(b.freeze())).is_err()
                {
                    trace!(call, "relay queue full: media packet dropped");
                }
            }
            _ => {}
        }
    }

    /// Hands a datagram to quinn; `meta`/`buf` filled as one datagram from `from`.
    fn deliver(buf: &mut IoSliceMut<'_>, meta: &mut RecvMeta, data: &[u8], from: SocketAddr) -> bool {
        if data.len() > buf.len() {
            return false;
        }
        buf[..data.len()].copy_from_slice(data);
        *meta = RecvMeta {
            addr: from,
            len: data.len(),
            stride: data.len(),
            ecn: None,
            dst_ip: None,
        };
        true
    }
}

impl AsyncUdpSocket for MuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable(self.udp.clone()))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let (route, held) = {
            let mut r = lock(&self.routes);
            let held = if r.held.is_empty() {
                None
            } else {
                r.held.remove(&transmit.destination)
            };
            (r.by_fake.get(&transmit.destination).copied(), held)
        };
        let sent = match route {
            Some(Route::Udp(real)) if !self.blackholed(real) => {
                self.udp.try_send_to(transmit.contents, real).map(|_| ())
            }
            Some(Route::Relay(call)) => {
                self.send_relay(call, transmit.contents);
                Ok(())
            }
            // No path yet, blackholed, or unknown: the packet is lost; QUIC retransmits.
            _ => Ok(()),
        };
        if let Some(frame) = held {
            self.queue_control(frame);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let (Some(buf), Some(meta)) = (bufs.first_mut(), meta.first_mut()) else {
            return Poll::Ready(Ok(0));
        };
        while let Poll::Ready(Some((fake, pkt))) = lock(&self.relay_in).poll_recv(cx) {
            if Self::deliver(buf, meta, &pkt, fake) {
                return Poll::Ready(Ok(1));
            }
        }
        loop {
            let mut rb = ReadBuf::new(buf);
            let src = match self.udp.poll_recv_from(cx, &mut rb) {
                Poll::Ready(Ok(src)) => src,
                // ICMP errors and the like: never stop quinn's driver for them.
                Poll::Ready(Err(e)) => {
                    trace!(error = %e, "udp recv error ignored");
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            };
            let n = rb.filled().len();
            if self.blackholed(src) {
                continue;
            }
            match classify(&buf[..n]) {
                PacketClass::Stun => {
                    let _ = self.stun_tx.try_send((src, Bytes::copy_from_slice(&buf[..n])));
                }
                PacketClass::Quic => {
                    let mut r = lock(&self.routes);
                    let Some(fake) = r.by_real.get(&src).copied() else {
                        trace!(%src, "QUIC from an unvalidated address dropped");
                        continue;
                    };
                    r.last_rx.insert(src, Instant::now());
                    drop(r);
                    *meta = RecvMeta {
                        addr: fake,
                        len: n,
                        stride: n,
                        ecn: None,
                        dst_ip: None,
                    };
                    return Poll::Ready(Ok(1));
                }
                PacketClass::Media => {
                    let fake = lock(&self.routes).by_real.get(&src).copied();
                    match fake {
                        Some(fake) => {
                            let _ = self.media_tx.try_send((fake, Bytes::copy_from_slice(&buf[..n])));
                        }
                        None => trace!(%src, "media from an unvalidated address dropped"),
                    }
                }
                PacketClass::Unknown => trace!(%src, "datagram dropped"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        // quinn must see an IPv6 local address to send to the IPv6 fake addresses.
        Ok(match self.udp.local_addr()? {
            SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
            v6 => v6,
        })
    }
}

/// quinn's writability poller over the tokio socket.
#[derive(Debug)]
struct Writable(Arc<UdpSocket>);

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_send_ready(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> (Arc<MuxSocket>, mpsc::Receiver<Outgoing>) {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind on loopback");
        udp.set_nonblocking(true).expect("non-blocking");
        let udp = Arc::new(UdpSocket::from_std(udp).expect("tokio socket"));
        let (_relay_in_tx, relay_in) = mpsc::channel(8);
        let (relay_out, out) = mpsc::channel(8);
        let (stun_tx, _) = mpsc::channel(8);
        let (media_tx, _) = mpsc::channel(8);
        let server = SocketAddr::from(([127, 0, 0, 1], 9));
        let s = MuxSocket::new(udp, server, relay_in, relay_out, stun_tx, media_tx);
        (Arc::new(s), out)
    }

    fn frame(o: Option<Outgoing>) -> Bytes {
        match o {
            Some(Outgoing::Frame(f)) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_held_hangup_follows_the_next_relayed_packet() {
        let (s, mut out) = socket();
        let fake = fake_addr(7);
        s.set_route(fake, Route::Relay(7));
        s.hold(fake, Bytes::from_static(b"hangup"), std::time::Duration::from_secs(5));
        assert!(out.try_recv().is_err(), "held until quinn sends");
        let close = [0x40u8; 40];
        let t = Transmit {
            destination: fake,
            ecn: None,
            contents: &close,
            segment_size: None,
            src_ip: None,
        };
        s.try_send(&t).expect("relayed");
        let relayed = frame(out.try_recv().ok());
        assert!(relayed.ends_with(&close), "the close goes first");
        assert_eq!(frame(out.try_recv().ok()), Bytes::from_static(b"hangup"));
    }

    #[tokio::test]
    async fn a_held_frame_is_released_after_the_deadline_without_a_packet() {
        let (s, mut out) = socket();
        let fake = fake_addr(8);
        s.hold(
            fake,
            Bytes::from_static(b"hangup"),
            std::time::Duration::from_millis(50),
        );
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        assert_eq!(frame(out.recv().await), Bytes::from_static(b"hangup"));
    }
}
