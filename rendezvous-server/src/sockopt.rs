//! Socket set-up, per the seed's advice:
//!
//! - listeners get `SO_REUSEADDR`, so a server killed with peers connected binds its port again
//!   at once instead of failing while the old connections sit in `TIME_WAIT`/`FIN_WAIT`;
//! - peer connections get `TCP_NODELAY` (control and relay frames are small and latency-bound;
//!   the server batches frames into one write itself) and TCP keepalive (dead NAT mappings and
//!   vanished hosts are noticed even when the application is quiet);
//! - peer connections get linear retransmission timeouts while thin (`TCP_THIN_LINEAR_TIMEOUTS`,
//!   `relay.thin_linear_timeouts`): a relayed call is a thin stream, and on a lossy link the
//!   exponential backoff of a lost retransmission stalled it for 0.6 s to 2 s;
//! - a connection shed as abusive is closed with `SO_LINGER = 0` (a reset: no `TIME_WAIT`, no
//!   waiting for the peer); every other close is a graceful half-close.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Keepalive probes start after this much silence.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(20);
/// Interval between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the kernel gives up on the connection.
pub const KEEPALIVE_RETRIES: u32 = 4;

/// The server's sockets: TCP and UDP on one port number, and a second UDP STUN port.
#[derive(Debug)]
pub struct Sockets {
    /// TCP control/relay listener.
    pub tcp: TcpListener,
    /// UDP STUN socket.
    pub udp: UdpSocket,
    /// The second UDP STUN socket (same IP, another port), by which peers learn whether their
    /// NAT maps ports per destination; `None`: off.
    pub udp_alt: Option<UdpSocket>,
    /// With an alternate IP (RFC 5780): the sockets on it, at the main port and at the second
    /// port.
    pub udp_other: Option<(UdpSocket, UdpSocket)>,
}

impl Sockets {
    /// Binds TCP and UDP on `addr`, and the second STUN port as by default (see
    /// [`Sockets::bind_with_alt`] with `None`).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        Self::bind_with_alt(addr, None)
    }

    /// Binds TCP and UDP on `addr`. With port 0 the TCP port is chosen by the kernel and UDP
    /// takes the same number (retrying a few times if another socket holds it).
    ///
    /// The second STUN port (`stun_alt_port` in the configuration): `Some(0)` turns it off,
    /// `Some(p)` binds port `p` (an error if it is taken); `None` binds the main port + 1, or
    /// any free port when the main port is 0, and goes without one (with a warning) when that
    /// port is taken.
    pub fn bind_with_alt(addr: SocketAddr, alt: Option<u16>) -> io::Result<Self> {
        let mut last_err = None;
        for _ in 0..16 {
            let tcp = tcp_listener(addr)?;
            let port = tcp.local_addr()?.port();
            match udp_socket(SocketAddr::new(addr.ip(), port)) {
                Ok(udp) => {
                    let udp_alt = bind_alt(addr, port, alt)?;
                    return Ok(Self {
                        tcp,
                        udp,
                        udp_alt,
                        udp_other: None,
                    });
                }
                Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no free port for both TCP and UDP")))
    }

    /// [`Sockets::bind_with_alt`], and with `alternate_ip` the two STUN sockets of RFC 5780 on
    /// it (the main and the second port numbers): then `addr` must name one IP, of the same
    /// family, and the second port must be on.
    pub fn bind_rfc5780(
        addr: SocketAddr,
        alt: Option<u16>,
        alternate_ip: Option<std::net::IpAddr>,
    ) -> io::Result<Self> {
        let mut s = Self::bind_with_alt(addr, alt)?;
        let Some(ip) = alternate_ip else { return Ok(s) };
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
        if addr.ip().is_unspecified() || addr.is_ipv4() != ip.is_ipv4() || ip == addr.ip() {
            return Err(invalid(
                "alternate_ip needs listen on one IP address of the same family, other than it",
            ));
        }
        let Some(alt) = &s.udp_alt else {
            return Err(invalid(
                "alternate_ip needs the second STUN port (stun_alt_port is 0 or taken)",
            ));
        };
        let (p1, p2) = (s.udp.local_addr()?.port(), alt.local_addr()?.port());
        s.udp_other = Some((
            udp_socket(SocketAddr::new(ip, p1))?,
            udp_socket(SocketAddr::new(ip, p2))?,
        ));
        Ok(s)
    }

    /// The bound address (TCP and UDP share the port).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

fn bind_alt(addr: SocketAddr, port: u16, alt: Option<u16>) -> io::Result<Option<UdpSocket>> {
    match alt {
        Some(0) => Ok(None),
        Some(p) => udp_socket(SocketAddr::new(addr.ip(), p)).map(Some),
        None => {
            let p = if addr.port() == 0 { 0 } else { port.wrapping_add(1) };
            match udp_socket(SocketAddr::new(addr.ip(), p)) {
                Ok(s) => Ok(Some(s)),
                Err(e) => {
                    tracing::warn!(port = p, error = %e, "no second STUN port: peers cannot tell whether their NAT maps ports per destination (set stun_alt_port)");
                    Ok(None)
                }
            }
        }
    }
}

/// `addr` as peers know it: an IPv4 peer that reached a dual-stack (`[::]`) socket shows up as
/// `::ffff:a.b.c.d`, and is recorded, matched and handed to other peers as `a.b.c.d`.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// `[::]` takes IPv4 and IPv6 alike (dual stack), whatever `net.ipv6.bindv6only` says, where
/// the system allows it (some never do: IPv6 only there).
fn dual_stack(s: &Socket, addr: SocketAddr) -> io::Result<()> {
    if let SocketAddr::V6(v6) = addr
        && v6.ip().is_unspecified()
        && let Err(e) = s.set_only_v6(false)
    {
        tracing::warn!(error = %e, "[::] is IPv6 only here: listen on an IPv4 address too for IPv4 peers");
    }
    Ok(())
}

/// A TCP listener with `SO_REUSEADDR` (dual stack on `[::]`).
pub fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    dual_stack(&s, addr)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// The UDP STUN socket, with larger buffers so bursts are not dropped by the kernel.
pub fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    dual_stack(&s, addr)?;
    // The kernel clamps these to net.core.{r,w}mem_max; a smaller buffer is not an error.
    let _ = s.set_recv_buffer_size(1 << 21);
    let _ = s.set_send_buffer_size(1 << 21);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Options for an accepted peer connection: `TCP_NODELAY`, keepalive, linear timeouts while
/// thin (Linux), and the bounded send buffer of the relay engine (`SO_SNDBUF`, `TCP_NOTSENT_LOWAT`), so that a backlog builds in
/// the client's [`crate::outbox::Outbox`], where the class policy can act on it, not in a kernel
/// buffer that auto-tunes to megabytes.
pub fn configure_peer(stream: &TcpStream, relay: &crate::config::RelayConfig) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let s = SockRef::from(stream);
    s.set_tcp_keepalive(&keepalive)?;
    if relay.sndbuf > 0 {
        s.set_send_buffer_size(relay.sndbuf)?;
    }
    if relay.notsent_lowat > 0 {
        // Not every kernel has it; the SO_SNDBUF bound still holds without it.
        let _ = s.set_tcp_notsent_lowat(relay.notsent_lowat);
    }
    // A kernel or sandbox without it: the connection works with the default backoff.
    #[cfg(target_os = "linux")]
    if relay.thin_linear_timeouts {
        let _ = s.set_tcp_thin_linear_timeouts(true);
    }
    Ok(())
}

/// Arms an abortive close: when the last handle to `stream` drops, the kernel sends a reset.
pub fn arm_reset(stream: &TcpStream) -> io::Result<()> {
    SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

/// Whether `e` says the peer reset the connection: `ECONNRESET`, or `EPIPE` (a write after the
/// reset was seen).
pub fn is_reset(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_peer_on_a_dual_stack_socket_is_known_by_its_ipv4_address() {
        let mapped: SocketAddr = "[::ffff:203.0.113.5]:4000".parse().expect("addr");
        assert_eq!(
            canonical(mapped),
            "203.0.113.5:4000".parse::<SocketAddr>().expect("addr")
        );
        let v6: SocketAddr = "[2001:db8::1]:4000".parse().expect("addr");
        assert_eq!(canonical(v6), v6);
    }

    #[tokio::test]
    async fn listeners_reuse_addresses_and_peers_get_nodelay_keepalive_and_thin_timeouts() {
        let sockets = Sockets::bind("127.0.0.1:0".parse().expect("addr")).expect("binds");
        let addr = sockets.local_addr().expect("addr");
        assert_eq!(sockets.udp.local_addr().expect("udp addr").port(), addr.port());
        assert!(SockRef::from(&sockets.tcp).reuse_address().expect("getsockopt"));

        let client = TcpStream::connect(addr).await.expect("connects");
        let (accepted, _) = sockets.tcp.accept().await.expect("accepts");
        let before = SockRef::from(&accepted);
        assert!(!before.tcp_nodelay().expect("getsockopt"));
        let relay = crate::config::RelayConfig::default();
        configure_peer(&accepted, &relay).expect("configures");
        let s = SockRef::from(&accepted);
        assert!(s.tcp_nodelay().expect("getsockopt"));
        assert!(s.keepalive().expect("getsockopt"));
        assert_eq!(s.tcp_keepalive_time().expect("getsockopt"), KEEPALIVE_IDLE);
        assert_eq!(s.tcp_keepalive_interval().expect("getsockopt"), KEEPALIVE_INTERVAL);
        assert_eq!(s.tcp_keepalive_retries().expect("getsockopt"), KEEPALIVE_RETRIES);
        assert_eq!(s.tcp_notsent_lowat().expect("getsockopt"), relay.notsent_lowat);
        // The kernel doubles SO_SNDBUF for its bookkeeping.
        assert_eq!(s.send_buffer_size().expect("getsockopt"), 2 * relay.sndbuf);
        #[cfg(target_os = "linux")]
        assert!(s.tcp_thin_linear_timeouts().expect("getsockopt"));
        drop(client);

        // Turned off in the configuration, the kernel's default (exponential backoff) stays.
        let client = TcpStream::connect(addr).await.expect("connects");
        let (accepted, _) = sockets.tcp.accept().await.expect("accepts");
        let relay = crate::config::RelayConfig {
            thin_linear_timeouts: false,
            ..Default::default()
        };
        configure_peer(&accepted, &relay).expect("configures");
        #[cfg(target_os = "linux")]
        assert!(!SockRef::from(&accepted).tcp_thin_linear_timeouts().expect("getsockopt"));
        drop(client);
    }

    #[tokio::test]
    async fn an_armed_reset_resets_the_peer() {
        use tokio::io::AsyncReadExt;
        let listener = tcp_listener("127.0.0.1:0".parse().expect("addr")).expect("binds");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connects");
        let (accepted, _) = listener.accept().await.expect("accepts");
        arm_reset(&accepted).expect("linger");
        drop(accepted);
        let mut buf = [0u8; 8];
        let err = client.read(&mut buf).await.expect_err("reset, not EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
