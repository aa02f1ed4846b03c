//! The traffic both relays (and the direct baseline) carry, and what is measured of it.
//!
//! Flow of one run:
//! 1. each relay sets up its calls and hands over one [`Sender`] per call side: a packet on
//!    the wire as a template (natcall relay frame, TURN ChannelData, or a bare datagram) and the
//!    offset of the 512-byte payload in it;
//! 2. [`send_all`] paces every side at `rate` packets/s from [`SEND_TASKS`] tasks (the sides
//!    are staggered so their packets do not leave in bursts), writing a sequence number and a
//!    send timestamp into each payload; without a rate it keeps [`WINDOW`] packets in flight
//!    per side (closed loop);
//! 3. the relay's receive loop hands every payload to a [`Recorder`], which counts it and
//!    records its one-way latency;
//! 4. [`Outcome`] sums it up with the server's CPU seconds and peak RSS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// Payload bytes per packet (the relayed size: a full natcall media packet).
pub const PAYLOAD: usize = 512;
/// Saturated mode: packets in flight per side.
pub const WINDOW: u64 = 256;
/// Tasks that share the senders (the load generator has the same two cores as the server).
pub const SEND_TASKS: usize = 2;
/// Most packets one side sends per 1 ms tick.
const MAX_BURST: u64 = 128;

/// How to load a relay.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub calls: usize,
    /// Packets per second per side (each call sends both ways); `None` saturates.
    pub rate: Option<f64>,
    pub duration: Duration,
}

impl Load {
    /// Offered packets per second, both directions of every call.
    pub fn offered(&self) -> Option<f64> {
        self.rate.map(|r| r * 2.0 * self.calls as f64)
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub sent: u64,
    pub received: u64,
    pub elapsed: Duration,
    /// Sorted one-way latencies, µs.
    pub latencies_us: Vec<u32>,
    /// Server CPU seconds (user + system, all threads) during the load.
    pub server_cpu: f64,
    /// Server peak RSS (VmHWM), bytes.
    pub server_rss: u64,
    /// CPU seconds of this process (the load generator: every client) during the load.
    pub client_cpu: f64,
}

impl Outcome {
    pub fn new(sent: u64, elapsed: Duration, mut latencies_us: Vec<u32>) -> Self {
        latencies_us.sort_unstable();
        Self {
            sent,
            received: latencies_us.len() as u64,
            elapsed,
            latencies_us,
            ..Self::default()
        }
    }

    pub fn delivered_rate(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64()
    }

    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            (1.0 - self.received as f64 / self.sent as f64).max(0.0)
        }
    }

    /// The `q` quantile (0..1) of one-way latency, in ms.
    pub fn latency_ms(&self, q: f64) -> f64 {
        let l = &self.latencies_us;
        let i = ((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1));
        l.get(i).map_or(f64::NAN, |us| f64::from(*us) / 1000.0)
    }

    /// Server CPU per delivered packet, µs.
    pub fn cpu_us_per_packet(&self) -> f64 {
        self.server_cpu * 1e6 / self.received.max(1) as f64
    }
}

/// Where one side's packets go.
#[derive(Debug, Clone)]
pub enum Out {
    /// A stream: a batch of packets is one write.
    Tcp(Arc<Mutex<OwnedWriteHalf>>),
    /// natcall's TLS channel: a batch of packets is one write (sealed as few TLS records as
    /// its size allows), then a flush.
    Tls(Arc<Mutex<tokio::io::WriteHalf<natcall::ServerStream>>>),
    /// A connected datagram socket: one packet per datagram.
    Udp(Arc<UdpSocket>),
}

/// One side of a call as the load generator sees it.
#[derive(Debug)]
pub struct Sender {
    pub out: Out,
    /// One packet on the wire.
    pub template: Vec<u8>,
    /// Offset of the payload in `template`.
    pub payload_at: usize,
    /// Packets the other side has received (saturated mode keeps [`WINDOW`] in flight).
    pub peer_received: Arc<AtomicU64>,
}

/// Writes sequence number and send time (ns since `base`) at the start of a payload.
fn stamp(payload: &mut [u8], seq: u64, base: Instant) {
    payload[..8].copy_from_slice(&seq.to_be_bytes());
    payload[8..16].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_be_bytes());
}

/// Counts received payloads and their one-way latency.
#[derive(Debug)]
pub struct Recorder {
    base: Instant,
    pub latencies_us: Vec<u32>,
    received: Arc<AtomicU64>,
}

impl Recorder {
    pub fn new(base: Instant, received: Arc<AtomicU64>) -> Self {
        Self {
            base,
            latencies_us: Vec::with_capacity(4096),
            received,
        }
    }

    /// Records one payload (anything shorter than a stamp is ignored).
    pub fn record(&mut self, payload: &[u8]) {
        let Some(sent) = payload.get(8..16) else { return };
        let sent = u64::from_be_bytes(sent.try_into().expect("8 bytes by the range above"));
        let now = self.base.elapsed().as_nanos() as u64;
        self.latencies_us.push((now.saturating_sub(sent) / 1000) as u32);
        self.received.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sends until `end` from [`SEND_TASKS`] tasks; returns packets sent.
pub async fn send_all(senders: Vec<Sender>, load: Load, base: Instant, end: Instant) -> Result<u64> {
    let n = senders.len();
    let per_task = n.div_ceil(SEND_TASKS).max(1);
    let mut groups: Vec<Vec<(usize, Sender)>> = Vec::new();
    for (i, s) in senders.into_iter().enumerate() {
        if i % per_task == 0 {
            groups.push(Vec::with_capacity(per_task));
        }
        groups.last_mut().expect("pushed above").push((i, s));
    }
    let mut tasks = Vec::new();
    for g in groups {
        tasks.push(tokio::spawn(send_group(g, n, load, base, end)));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await.context("a sender task failed")??;
    }
    Ok(sent)
}

async fn send_group(group: Vec<(usize, Sender)>, sides: usize, load: Load, base: Instant, end: Instant) -> Result<u64> {
    // Stagger: side i starts owing i/sides of a packet, so sides cross whole packets at
    // different ticks instead of all at once.
    let mut state: Vec<(Sender, f64, u64, Vec<u8>)> = group
        .into_iter()
        .map(|(i, s)| {
            let batch = Vec::with_capacity(s.template.len() * MAX_BURST as usize);
            (s, i as f64 / sides as f64, 0u64, batch)
        })
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last = Instant::now();
    let mut total = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64();
        last = now;
        for (s, owed, seq, batch) in &mut state {
            let n = match load.rate {
                Some(rate) => {
                    // What a tick cannot send is owed to the next ones, up to a bound: past it the
                    // client cannot send the offered rate, and `sent` shows what it did send.
                    *owed = (*owed + rate * dt).min(8.0 * MAX_BURST as f64);
                    let n = owed.floor().min(MAX_BURST as f64);
                    *owed -= n;
                    n as u64
                }
                None => WINDOW
                    .saturating_sub(seq.saturating_sub(s.peer_received.load(Ordering::Relaxed)))
                    .min(MAX_BURST),
            };
            if n == 0 {
                continue;
            }
            batch.clear();
            let len = s.template.len();
            for _ in 0..n {
                let start = batch.len();
                batch.extend_from_slice(&s.template);
                stamp(&mut batch[start + s.payload_at..start + len], *seq, base);
                *seq += 1;
            }
            match &s.out {
                Out::Tcp(w) => w.lock().await.write_all(batch).await.context("sending over TCP")?,
                Out::Tls(w) => {
                    let mut w = w.lock().await;
                    w.write_all(batch).await.context("sending over TLS")?;
                    w.flush().await.context("sending over TLS")?;
                }
                Out::Udp(sock) => {
                    for p in batch.chunks(len) {
                        // A full socket buffer drops the datagram: that is loss, counted.
                        let _ = sock.try_send(p);
                    }
                }
            }
            total += n;
        }
    }
    Ok(total)
}

/// Records every datagram on `sock` until `end`; `payload` finds the payload in a datagram
/// (`None`: not a data packet).
pub async fn receive_udp(
    sock: Arc<UdpSocket>,
    mut rec: Recorder,
    end: Instant,
    payload: fn(&[u8]) -> Option<&[u8]>,
) -> Result<Vec<u32>> {
    let mut buf = vec![0u8; 2048];
    let deadline = tokio::time::sleep_until(end.into());
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = sock.recv(&mut buf) => {
                let n = r.context("receiving a datagram")?;
                if let Some(p) = payload(&buf[..n]) {
                    rec.record(p);
                }
            }
            () = &mut deadline => return Ok(rec.latencies_us),
        }
    }
}

/// The clock of one run, started just before the load: receivers record latency against
/// `base`, senders stop at `end`, receivers at `drain` (half a second later, for the packets
/// still on their way).
pub struct Window {
    pub base: Instant,
    pub end: Instant,
    pub drain: Instant,
    cpu0: f64,
}

impl Window {
    pub fn start(load: &Load) -> Result<Self> {
        let cpu0 = self_cpu()?;
        let base = Instant::now();
        let end = base + load.duration;
        Ok(Self {
            base,
            end,
            drain: end + Duration::from_millis(500),
            cpu0,
        })
    }

    /// Sends from `senders` until the end, waits for every receiver, and measures (this
    /// process's CPU as the clients'; the server's figures are the caller's to add).
    pub async fn finish(
        self,
        senders: Vec<Sender>,
        receivers: Vec<JoinHandle<Result<Vec<u32>>>>,
        load: Load,
    ) -> Result<Outcome> {
        let sent = send_all(senders, load, self.base, self.end).await?;
        let elapsed = self.base.elapsed();
        let mut latencies_us = Vec::new();
        for r in receivers {
            latencies_us.extend(r.await??);
        }
        let mut o = Outcome::new(sent, elapsed, latencies_us);
        o.client_cpu = self_cpu()? - self.cpu0;
        Ok(o)
    }
}

/// CPU seconds this process has used so far (all threads).
pub fn self_cpu() -> Result<f64> {
    crate::server::cpu_seconds(std::process::id())
}

/// Median, minimum and maximum of `v` (NaN for an empty slice).
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

/// A UDP socket on loopback connected to `peer`, with room for bursts.
pub async fn udp_connected(peer: SocketAddr) -> Result<UdpSocket> {
    let sock = udp_bound()?;
    sock.connect(peer)
        .await
        .with_context(|| format!("connecting a UDP socket to {peer}"))?;
    Ok(sock)
}

/// A UDP socket on a free loopback port with 1 MiB buffers (so a burst is not lost in the
/// client's own socket).
pub fn udp_bound() -> Result<UdpSocket> {
    let std = std::net::UdpSocket::bind("127.0.0.1:0").context("binding a UDP socket on loopback")?;
    std.set_nonblocking(true)?;
    let sock = UdpSocket::from_std(std)?;
    let s = socket2::SockRef::from(&sock);
    let _ = s.set_recv_buffer_size(1 << 20);
    let _ = s.set_send_buffer_size(1 << 20);
    Ok(sock)
}
