//! The peer core's view of its rendezvous server: whether it is registered there, the token
//! binding that learns and keeps alive this peer's public address (its NAT mapping), and the
//! relay's health-check count.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natcall_proto::control::Mapping;
use natcall_proto::stun::{self as wire, TokenCredentials};
use tracing::{debug, info, warn};

use super::Transmit;

/// What a registration gave this peer.
#[derive(Debug, Clone)]
pub(crate) struct Registered {
    /// Where token bindings go.
    pub(crate) stun_addr: SocketAddr,
    /// The STUN token of this registration.
    pub(crate) token: TokenCredentials,
    /// Relay frames read between two health checks (`RelayAck`).
    pub(crate) relay_ack_every: u32,
    /// The server's second STUN address (same IP, another port), if it has one.
    pub(crate) stun_alt: Option<SocketAddr>,
}

#[derive(Debug)]
struct Probe {
    tid: [u8; 12],
    attempt: usize,
    next_at: Instant,
}

/// The server link.
#[derive(Debug)]
pub(crate) struct ServerLink {
    registered: Option<Registered>,
    /// Why the last connection ended, while there is none.
    lost: Option<String>,
    /// Another session of this peer took over the registration (why): final.
    replaced: Option<String>,
    public: Option<SocketAddr>,
    udp_ok: bool,
    /// A first probe since registering has finished (answered or given up).
    probed: bool,
    probe: Option<Probe>,
    refresh_at: Option<Instant>,
    unacked: u32,
    rto: Vec<Duration>,
    refresh: Duration,
    /// The last token binding's sequence number in this registration.
    seq: u64,
    /// The plain binding to the server's second port, while it is unanswered.
    alt: Option<Probe>,
    /// The public address the second port saw.
    alt_public: Option<SocketAddr>,
    /// How this peer's NAT maps ports, once both ports answered.
    mapping: Mapping,
    /// The public address the router mapped for this peer's socket (UPnP-IGD, NAT-PMP, PCP).
    port_mapped: Option<SocketAddr>,
    /// What the server was last told (`NatMapping`) in this registration, if anything.
    reported: Option<(Mapping, Option<SocketAddr>)>,
    /// The main port answered in this registration (`public` is not a previous one's).
    public_fresh: bool,
}

impl ServerLink {
    pub(crate) fn new(rto: Vec<Duration>, refresh: Duration) -> Self {
        Self {
            registered: None,
            lost: Some("not registered yet".into()),
            replaced: None,
            public: None,
            udp_ok: true,
            probed: false,
            probe: None,
            refresh_at: None,
            unacked: 0,
            rto,
            refresh,
            seq: 0,
            alt: None,
            alt_public: None,
            mapping: Mapping::Unknown,
            port_mapped: None,
            reported: None,
            public_fresh: false,
        }
    }

    /// How this peer's NAT maps ports (unknown until both server ports answered).
    pub(crate) fn mapping(&self) -> Mapping {
        self.mapping
    }

    /// The router's port mapping for this peer's socket changed (`None`: gone).
    pub(crate) fn set_port_mapped(&mut self, addr: Option<SocketAddr>) {
        if addr != self.port_mapped {
            info!(mapped = ?addr, "router port mapping changed");
        }
        self.port_mapped = addr;
    }

    pub(crate) fn port_mapped(&self) -> Option<SocketAddr> {
        self.port_mapped
    }

    /// What to tell the server (`NatMapping`) now: once the first probes of a registration are
    /// done, and again whenever the mapping or the router's port mapping changes.
    pub(crate) fn poll_mapping(&mut self) -> Option<(Mapping, Option<SocketAddr>)> {
        if self.registered.is_none() || !self.probed() {
            return None;
        }
        let now = (self.mapping, self.port_mapped);
        if self.reported == Some(now) {
            return None;
        }
        self.reported = Some(now);
        Some(now)
    }

    pub(crate) fn is_up(&self) -> bool {
        self.registered.is_some()
    }

    pub(crate) fn lost_reason(&self) -> Option<&str> {
        self.lost.as_deref()
    }

    /// Why the registration is gone for good, if another session took it over.
    pub(crate) fn replaced(&self) -> Option<&str> {
        self.replaced.as_deref()
    }

    /// Another session took the registration over: down for good.
    pub(crate) fn replace(&mut self, reason: String) {
        self.down(reason.clone());
        self.replaced = Some(reason);
    }

    pub(crate) fn public(&self) -> Option<SocketAddr> {
        self.public
    }

    pub(crate) fn udp_ok(&self) -> bool {
        self.udp_ok
    }

    /// Whether the first token binding after registering, and the binding to the second port,
    /// have been answered or given up.
    pub(crate) fn probed(&self) -> bool {
        self.probed && self.alt.is_none()
    }

    /// Registered (again): the relay count starts over and the public address is probed at once
    /// (a new server must learn it).
    pub(crate) fn up(&mut self, now: Instant, reg: Registered, tid: [u8; 12], out: &mut Vec<Transmit>) {
        self.registered = Some(reg);
        self.lost = None;
        self.unacked = 0;
        self.probed = false;
        self.seq = 0;
        let tid = self.stamp(tid);
        self.probe = Some(Probe {
            tid,
            attempt: 0,
            next_at: now,
        });
        self.send_probe(now, out);
        // Measured again for this registration (the network or the server may have changed).
        self.mapping = Mapping::Unknown;
        self.public_fresh = false;
        self.alt_public = None;
        self.alt = self.registered.as_ref().and_then(|r| r.stun_alt).map(|_| {
            // A plain binding: its id needs no sequence, only to differ from the token's.
            let mut alt = tid;
            alt[0] ^= 0xa5;
            Probe {
                tid: alt,
                attempt: 0,
                next_at: now,
            }
        });
        self.send_alt(now, out);
    }

    fn send_alt(&mut self, now: Instant, out: &mut Vec<Transmit>) {
        let (Some(dest), Some(alt)) = (self.registered.as_ref().and_then(|r| r.stun_alt), &mut self.alt) else {
            return;
        };
        let mut buf = [0u8; 128];
        match wire::encode_binding_request(&alt.tid, None, &mut buf) {
            Ok(n) => out.push(Transmit {
                destination: dest,
                contents: buf[..n].to_vec(),
            }),
            Err(e) => debug!(error = %e, "cannot encode the second-port binding"),
        }
        let wait = self.rto.get(alt.attempt).copied().unwrap_or(Duration::from_secs(1));
        alt.next_at = now + wait;
    }

    /// Both ports answered: how the NAT maps ports follows (reported once per registration).
    fn learn_mapping(&mut self) {
        let (Some(first), Some(second), true) = (self.public, self.alt_public, self.public_fresh) else {
            return;
        };
        let mapping = Mapping::from_ports(first, second);
        if mapping != self.mapping {
            info!(?mapping, %first, %second, "NAT mapping measured");
        }
        self.mapping = mapping;
        self.alt_public = None; // measured: the next registration measures again
    }

    pub(crate) fn down(&mut self, reason: String) {
        self.registered = None;
        self.reported = None;
        self.lost = Some(reason);
        self.probe = None;
        self.alt = None;
        self.refresh_at = None;
        self.unacked = 0;
    }

    /// A probe's transaction id: the registration's next sequence number (8 bytes, big-endian;
    /// the server takes only newer ones, see `natcall_proto::stun`), then 4 random bytes.
    fn stamp(&mut self, mut tid: [u8; 12]) -> [u8; 12] {
        self.seq += 1;
        tid[..8].copy_from_slice(&self.seq.to_be_bytes());
        tid
    }

    fn send_probe(&mut self, now: Instant, out: &mut Vec<Transmit>) {
        let (Some(reg), Some(probe)) = (&self.registered, &mut self.probe) else {
            return;
        };
        let mut buf = [0u8; 256];
        match wire::encode_binding_request(&probe.tid, Some(&reg.token), &mut buf) {
            Ok(n) => out.push(Transmit {
                destination: reg.stun_addr,
                contents: buf[..n].to_vec(),
            }),
            Err(e) => debug!(error = %e, "cannot encode the token binding"),
        }
        let wait = self.rto.get(probe.attempt).copied().unwrap_or(Duration::from_secs(1));
        probe.next_at = now + wait;
    }

    /// Whether `data` from `src` answers the probe; consumes it if so.
    pub(crate) fn handle_answer(&mut self, now: Instant, src: SocketAddr, tid: &[u8; 12], data: &[u8]) -> bool {
        if let (Some(dest), Some(alt)) = (self.registered.as_ref().and_then(|r| r.stun_alt), &self.alt)
            && src == dest
            && alt.tid == *tid
        {
            match wire::parse_binding_success(data, tid, None) {
                Ok(addr) => {
                    self.alt = None;
                    self.alt_public = Some(addr);
                    if self.probe.is_none() {
                        self.learn_mapping();
                    }
                }
                Err(e) => debug!(error = %e, "bad STUN answer from the server's second port"),
            }
            return true;
        }
        let (Some(reg), Some(probe)) = (&self.registered, &self.probe) else {
            return false;
        };
        if src != reg.stun_addr || probe.tid != *tid {
            return false;
        }
        match wire::parse_binding_success(data, tid, Some(&reg.token.password)) {
            Ok(addr) => {
                if self.public.is_some_and(|old| old != addr) {
                    info!(old = ?self.public, new = %addr, "public address changed");
                }
                self.public = Some(addr);
                self.public_fresh = true;
                self.udp_ok = true;
                self.probed = true;
                self.probe = None;
                self.refresh_at = Some(now + self.refresh);
                self.learn_mapping();
            }
            Err(e) => debug!(error = %e, "bad STUN answer from the server"),
        }
        true
    }

    /// Retransmits or gives up the probe, or starts the next refresh. `tid` is a fresh
    /// transaction id in case a probe starts.
    pub(crate) fn handle_timeout(&mut self, now: Instant, tid: [u8; 12], out: &mut Vec<Transmit>) {
        if self.registered.is_none() {
            return;
        }
        if let Some(alt) = &mut self.alt
            && now >= alt.next_at
        {
            alt.attempt += 1;
            if alt.attempt >= self.rto.len() {
                debug!("no answer from the server's second STUN port: NAT mapping unknown");
                self.alt = None;
            } else {
                self.send_alt(now, out);
            }
        }
        if let Some(probe) = &mut self.probe {
            if now < probe.next_at {
                return;
            }
            probe.attempt += 1;
            if probe.attempt >= self.rto.len() {
                if self.udp_ok || !self.probed {
                    warn!(
                        "no STUN answer from the rendezvous server over UDP: UDP looks blocked; calls will use the relay"
                    );
                }
                self.udp_ok = false;
                self.probed = true;
                self.probe = None;
                self.refresh_at = Some(now + self.refresh);
                return;
            }
            return self.send_probe(now, out);
        }
        if self.refresh_at.is_some_and(|t| now >= t) {
            self.refresh_at = None;
            let tid = self.stamp(tid);
            self.probe = Some(Probe {
                tid,
                attempt: 0,
                next_at: now,
            });
            self.send_probe(now, out);
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let main = match &self.probe {
            Some(p) => Some(p.next_at),
            None => self.refresh_at,
        };
        [main, self.alt.as_ref().map(|a| a.next_at)].into_iter().flatten().min()
    }

    /// One relay frame was read: returns the count to acknowledge when one is due.
    pub(crate) fn relay_frame_read(&mut self) -> Option<u32> {
        let every = self.registered.as_ref()?.relay_ack_every.max(1);
        self.unacked += 1;
        if self.unacked >= every {
            return Some(std::mem::take(&mut self.unacked));
        }
        None
    }
}
