//! The `quinn::AsyncUdpSocket` adapter that runs QUIC over the peer's one UDP socket (quinn
//! 0.11's trait; keep every use of it in this module).
//!
//! Data flow:
//! - inbound: relayed QUIC packets (from the control reader) first, then datagrams from the
//!   socket, each given to the [`PeerCore`](crate::core::PeerCore): QUIC from an address
//!   validated for a call reaches quinn as coming from that call's [`FakeAddr`]; media goes to
//!   the call's media session; STUN is consumed by the core (checks to their call's agent, the
//!   server's answer to the token binding); anything else is dropped;
//! - outbound: quinn sends to a fake address; the core says where it goes now (a real UDP
//!   address, a relay frame on the control connection, or nowhere), and releases a hang-up held
//!   for that call behind it.
//!
//! QUIC never sees a path change, so relay → direct and direct → relay switches need no new
//! handshake. Fake addresses are IPv6 ULAs, so quinn's local address is reported as IPv6.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use natcall_proto::relay::{RelayFlags, TrafficClass};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::trace;

use crate::core::{Datagram, FakeAddr};
use crate::driver::Shared;

/// The shared UDP socket as quinn sees it.
pub(crate) struct MuxSocket {
    shared: Arc<Shared>,
    /// Relayed QUIC packets; quinn polls from one task, so this lock is never contended.
    relay_in: Mutex<mpsc::Receiver<(FakeAddr, Bytes)>>,
}

impl fmt::Debug for MuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxSocket").finish_non_exhaustive()
    }
}

impl MuxSocket {
    pub(crate) fn new(shared: Arc<Shared>, relay_in: mpsc::Receiver<(FakeAddr, Bytes)>) -> Self {
        Self {
            shared,
            relay_in: Mutex::new(relay_in),
        }
    }

    fn udp(&self) -> &Arc<UdpSocket> {
        &self.shared.udp
    }

    /// Fills quinn's buffer with one datagram from `from`.
    fn deliver(buf: &mut IoSliceMut<'_>, meta: &mut RecvMeta, data: &[u8], from: SocketAddr) -> bool {
        if data.len() > buf.len() {
            return false;
        }
        buf[..data.len()].copy_from_slice(data);
        set_meta(meta, from, data.len());
        true
    }
}

fn set_meta(meta: &mut RecvMeta, from: SocketAddr, len: usize) {
    *meta = RecvMeta {
        addr: from,
        len,
        stride: len,
        ecn: None,
        dst_ip: None,
    };
}

impl AsyncUdpSocket for MuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable(self.udp().clone()))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let Some(fake) = FakeAddr::parse(transmit.destination) else {
            return Ok(()); // not a call's address: lost
        };
        let (route, held) = {
            let mut core = self.shared.lock();
            let route = core.route_quic(fake);
            (route, core.has_control())
        };
        let sent = match route {
            crate::core::Route::Udp(real) if !self.shared.blackholed(real) => {
                self.shared.send_udp(transmit.contents, real).map(|_| ())
            }
            other => {
                // The relay (QUIC travels as control class), or no path yet: QUIC retransmits.
                self.shared
                    .send_routed(other, transmit.contents, TrafficClass::Control, RelayFlags::default());
                Ok(())
            }
        };
        if held {
            self.shared.wake(); // a hang-up released behind this packet
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
        {
            let mut relay = self.relay_in.lock().unwrap_or_else(|p| p.into_inner());
            while let Poll::Ready(Some((fake, pkt))) = relay.poll_recv(cx) {
                if Self::deliver(buf, meta, &pkt, fake.socket()) {
                    return Poll::Ready(Ok(1));
                }
            }
        }
        loop {
            let mut rb = ReadBuf::new(buf);
            let src = match self.udp().poll_recv_from(cx, &mut rb) {
                Poll::Ready(Ok(src)) => src,
                // ICMP errors and the like: never stop quinn's driver for them.
                Poll::Ready(Err(e)) => {
                    trace!(error = %e, "udp recv error ignored");
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            };
            let n = rb.filled().len();
            // A dual-stack socket gives IPv4 senders as `::ffff:a.b.c.d`: canonical from here on.
            let src = SocketAddr::new(src.ip().to_canonical(), src.port());
            if self.shared.blackholed(src) {
                continue;
            }
            let what = {
                let mut core = self.shared.lock();
                let what = core.handle_datagram(Instant::now(), src, &buf[..n]);
                if let Datagram::Media(id) = what {
                    Shared::deliver_media(&mut core, id, &buf[..n]);
                }
                what
            };
            match what {
                Datagram::Quic(fake) => {
                    set_meta(meta, fake.socket(), n);
                    return Poll::Ready(Ok(1));
                }
                Datagram::Consumed => self.shared.wake(),
                Datagram::Media(_) | Datagram::Dropped => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        // quinn must see an IPv6 local address to send to the IPv6 fake addresses.
        Ok(match self.udp().local_addr()? {
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
