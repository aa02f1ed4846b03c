//! Plain-UDP checks of the lab itself: what an emulated router does with mappings and
//! unsolicited packets (RFC 4787), and what an impaired link does to round trips and loss.
//!
//! A [`Reflector`] runs on a public device and answers each datagram with
//! `<observed source address>|<payload>`: the observed address shows the NAT's mapping and the
//! echoed payload lets [`echo_stats`] match replies to probes.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use patchbay::{Device, Router};
use serde::Serialize;

use crate::{Error, Kind, topology};

fn lab_err(e: anyhow::Error) -> Error {
    Error::Lab(e)
}

/// A UDP reflector thread in a namespace; stops when dropped.
#[derive(Debug)]
pub struct Reflector {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Reflector {
    /// Starts a reflector on `device` at `addr`.
    pub fn start(device: &Device, addr: SocketAddr) -> Result<Self, Error> {
        let sock = device
            .run_sync(move || Ok(UdpSocket::bind(addr)?))
            .map_err(|e| Error::Lab(e.context(format!("binding a reflector on {addr}"))))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(Error::io("setting a read timeout"))?;
        let (stop, received) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, r) = (stop.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    r.fetch_add(1, Ordering::Relaxed);
                    let mut reply = format!("{from}|").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = sock.send_to(&reply, from);
                }
            }
            Ok(())
        });
        Ok(Self {
            addr,
            stop,
            received,
            thread: Some(thread),
        })
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP socket bound inside `device`'s namespace (it keeps working from any thread).
pub fn udp_socket(device: &Device) -> Result<UdpSocket, Error> {
    device
        .run_sync(|| Ok(UdpSocket::bind("0.0.0.0:0")?))
        .map_err(|e| Error::Lab(e.context("binding a UDP socket")))
}

/// Sends a probe to a reflector and returns the source address it observed (up to 3 tries,
/// 300 ms each; datagrams from anyone else are skipped).
pub fn observed(sock: &UdpSocket, reflector: SocketAddr) -> Option<SocketAddr> {
    sock.set_read_timeout(Some(Duration::from_millis(50))).ok()?;
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        sock.send_to(b"map", reflector).ok()?;
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            if let Ok((n, from)) = sock.recv_from(&mut buf)
                && from == reflector
            {
                let text = String::from_utf8_lossy(&buf[..n]);
                return text.split('|').next()?.parse().ok();
            }
        }
    }
    None
}

/// Waits until a probe from `device` comes back from `reflector` (a probe every 100 ms, for
/// at most `within`), so the path's neighbour (ARP) entries are resolved both ways before a
/// measurement. On a lossy link the first ARP exchange can be lost and the kernel asks again
/// only a second later; datagrams sent meanwhile wait in a short queue or are dropped, which a
/// measurement would count as the link's loss.
pub fn wait_for_echo(device: &Device, reflector: &Reflector, within: Duration) -> Result<(), Error> {
    let sock = udp_socket(device)?;
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let _ = sock.send_to(b"ready?", reflector.addr);
        if receives(&sock, Duration::from_millis(100)) {
            return Ok(());
        }
    }
    Err(Error::InvalidScenario(format!(
        "no echo from {} within {within:?}: the impaired path does not carry traffic",
        reflector.addr
    )))
}

/// Whether anything arrives on `sock` within `wait`; then empties its queue.
fn receives(sock: &UdpSocket, wait: Duration) -> bool {
    let mut buf = [0u8; 2048];
    let _ = sock.set_read_timeout(Some(wait));
    let got = sock.recv_from(&mut buf).is_ok();
    let _ = sock.set_read_timeout(Some(Duration::from_millis(50)));
    for _ in 0..16 {
        if sock.recv_from(&mut buf).is_err() {
            break;
        }
    }
    got
}

/// What a router did in [`nat_behaviour`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Behaviour {
    /// UDP to a public host got an answer.
    pub udp_works: bool,
    /// TCP to a public host connected.
    pub tcp_works: bool,
    /// The reflector saw the device's own address (no translation).
    pub untranslated: bool,
    /// One socket got the same external address:port towards two destinations (EIM).
    pub same_mapping_for_two_destinations: bool,
    /// An unsolicited datagram from the contacted host but another port got in.
    pub admits_same_host_other_port: bool,
    /// An unsolicited datagram from a host never contacted got in.
    pub admits_other_host: bool,
}

/// Probes the router(s) of `kind` with plain UDP (and one TCP connect) in a fresh lab:
/// `refl1` and `refl2` are reflectors on two public hosts.
pub async fn nat_behaviour(kind: Kind) -> Result<Behaviour, Error> {
    let lab = topology::new_lab().await?;
    let dc = lab.add_router("dc").build().await.map_err(lab_err)?;
    let h1 = topology::add_device(&lab, "host1", &dc).await?;
    let h2 = topology::add_device(&lab, "host2", &dc).await?;
    let routers = topology::add_uplink(&lab, kind, "p", 1).await?;
    let last: &Router = routers
        .last()
        .ok_or_else(|| Error::InvalidScenario("no router".into()))?;
    let dev = topology::add_device(&lab, "peer", last).await?;
    tokio::task::spawn_blocking(move || behaviour_of(&h1, &h2, &dev))
        .await
        .map_err(|e| Error::InvalidScenario(format!("probe panicked: {e}")))?
}

fn behaviour_of(h1: &Device, h2: &Device, dev: &Device) -> Result<Behaviour, Error> {
    let ip = |d: &Device| {
        d.ip()
            .ok_or_else(|| Error::InvalidScenario("device without IPv4".into()))
    };
    let r1 = Reflector::start(h1, SocketAddr::from((ip(h1)?, 9001)))?;
    let r2 = Reflector::start(h2, SocketAddr::from((ip(h2)?, 9002)))?;
    let tcp_target = SocketAddr::from((ip(h1)?, 9003));
    let listener = h1
        .run_sync(move || Ok(std::net::TcpListener::bind(tcp_target)?))
        .map_err(lab_err)?;
    let tcp_works = dev
        .run_sync(move || Ok(std::net::TcpStream::connect_timeout(&tcp_target, Duration::from_secs(2)).is_ok()))
        .map_err(lab_err)?;
    drop(listener);
    let sock = udp_socket(dev)?;
    let local_port = sock.local_addr().map_err(Error::io("local address"))?.port();
    let m1 = observed(&sock, r1.addr);
    let Some(mapped) = m1 else {
        return Ok(Behaviour {
            udp_works: false,
            tcp_works,
            untranslated: false,
            same_mapping_for_two_destinations: false,
            admits_same_host_other_port: false,
            admits_other_host: false,
        });
    };
    // Unsolicited packets first from host2, never contacted yet, then from host1 (contacted)
    // at another port; only then does the socket contact host2, for the mapping check.
    let admits_other_host = unsolicited(h2, 9006, mapped, &sock)?;
    let admits_same_host_other_port = unsolicited(h1, 9005, mapped, &sock)?;
    let m2 = observed(&sock, r2.addr);
    Ok(Behaviour {
        udp_works: true,
        tcp_works,
        untranslated: dev.ip()
            == Some(match mapped.ip() {
                std::net::IpAddr::V4(v4) => v4,
                std::net::IpAddr::V6(_) => return Err(Error::InvalidScenario("IPv6 mapping".into())),
            })
            && mapped.port() == local_port,
        same_mapping_for_two_destinations: Some(mapped) == m2,
        admits_same_host_other_port,
        admits_other_host,
    })
}

/// Sends one datagram (three, 20 ms apart) from `host:port` to `target`; whether `sock` got one.
fn unsolicited(host: &Device, port: u16, target: SocketAddr, sock: &UdpSocket) -> Result<bool, Error> {
    let ip = host
        .ip()
        .ok_or_else(|| Error::InvalidScenario("host without IPv4".into()))?;
    let from = SocketAddr::from((ip, port));
    let s = host.run_sync(move || Ok(UdpSocket::bind(from)?)).map_err(lab_err)?;
    for _ in 0..3 {
        let _ = s.send_to(b"unsolicited", target);
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(receives(sock, Duration::from_millis(400)))
}

/// Round trips through a [`Reflector`]: what [`echo_stats`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EchoStats {
    /// Probes sent.
    pub sent: u64,
    /// Probes the reflector received (one-way delivery, device → reflector).
    pub reached: u64,
    /// Replies received back.
    pub replies: u64,
    /// Mean round-trip time of the replies.
    pub rtt_mean_ms: f64,
    /// Smallest round trip.
    pub rtt_min_ms: f64,
    /// Largest round trip.
    pub rtt_max_ms: f64,
    /// The 95th percentile of the round trips: unlike the maximum, one probe the scheduler held
    /// back on a loaded machine does not move it.
    pub rtt_p95_ms: f64,
}

/// Sends `count` probes `interval` apart from `device` to `reflector`, waits up to 2 s for the
/// last replies, and measures round trips and loss. Bounded: at most `count × interval + 2 s`.
pub fn echo_stats(device: &Device, reflector: &Reflector, count: u32, interval: Duration) -> Result<EchoStats, Error> {
    let sock = udp_socket(device)?;
    let before = reflector.received();
    let rx = sock.try_clone().map_err(Error::io("cloning a socket"))?;
    let start = Instant::now();
    let deadline = start + interval * count + Duration::from_secs(2);
    let receiver = std::thread::spawn(move || {
        let mut rtts = Vec::new();
        let mut buf = [0u8; 2048];
        let _ = rx.set_read_timeout(Some(Duration::from_millis(50)));
        while Instant::now() < deadline {
            if let Ok((n, _)) = rx.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]);
                let sent_us = text.rsplit('|').next().and_then(|t| t.parse::<u64>().ok());
                if let Some(us) = sent_us {
                    let now = start.elapsed().as_micros() as u64;
                    rtts.push(now.saturating_sub(us) as f64 / 1000.0);
                }
            }
        }
        rtts
    });
    for _ in 0..count {
        let stamp = start.elapsed().as_micros().to_string();
        let _ = sock.send_to(stamp.as_bytes(), reflector.addr);
        std::thread::sleep(interval);
    }
    let mut rtts = receiver.join().unwrap_or_default();
    rtts.sort_by(f64::total_cmp);
    let p95 = rtts
        .get((rtts.len() * 95 / 100).min(rtts.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    let replies = rtts.len() as u64;
    let mean = if rtts.is_empty() {
        0.0
    } else {
        rtts.iter().sum::<f64>() / replies as f64
    };
    Ok(EchoStats {
        sent: u64::from(count),
        reached: reflector.received() - before,
        replies,
        rtt_mean_ms: mean,
        rtt_min_ms: rtts.iter().copied().fold(f64::INFINITY, f64::min),
        rtt_max_ms: rtts.iter().copied().fold(0.0, f64::max),
        rtt_p95_ms: p95,
    })
}

/// Whether the same-lan router forwards a datagram from one LAN device to another's public
/// mapping (hairpinning), built with `hairpin` on or off.
pub async fn hairpin_works(hairpin: bool) -> Result<bool, Error> {
    let lab = topology::new_lab().await?;
    let dc = lab.add_router("dc").build().await.map_err(lab_err)?;
    let host = topology::add_device(&lab, "host", &dc).await?;
    let lan = lab
        .add_router("lan")
        .nat(topology::same_lan_nat(hairpin)?)
        .build()
        .await
        .map_err(lab_err)?;
    let a = topology::add_device(&lab, "alice", &lan).await?;
    let b = topology::add_device(&lab, "bob", &lan).await?;
    tokio::task::spawn_blocking(move || {
        let ip = host
            .ip()
            .ok_or_else(|| Error::InvalidScenario("host without IPv4".into()))?;
        let refl = Reflector::start(&host, SocketAddr::from((ip, 9001)))?;
        let sa = udp_socket(&a)?;
        let mapped = observed(&sa, refl.addr).ok_or_else(|| Error::InvalidScenario("no mapping for alice".into()))?;
        let sb = udp_socket(&b)?;
        // Patient on a loaded machine: up to 10 tries over about 2 s.
        for _ in 0..10 {
            let _ = sb.send_to(b"hairpin", mapped);
            if receives(&sa, Duration::from_millis(200)) {
                return Ok(true);
            }
        }
        Ok(false)
    })
    .await
    .map_err(|e| Error::InvalidScenario(format!("probe panicked: {e}")))?
}
