//! Relay load: N relayed calls between 2N raw protocol clients, each side sending 512-byte
//! relay frames (control class: never dropped by the policy, so loss means the relay lost
//! them) with a sequence number and a send timestamp, reading the other side's frames and
//! acknowledging them as a real client does (the relay engine's health checks).
//!
//! Paced mode sends `rate` frames/s per side in 1 ms slices; saturated mode keeps at most
//! `WINDOW` frames per side unreceived, so the load runs at what the relay can carry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use natcall_proto::codec::decode_control;
use natcall_proto::control::{ClientMsg, Policy, ServerMsg};
use natcall_proto::frame::{self, Frame, FrameDecoder, LEN_PREFIX, MAX_FRAME_LEN};
use natcall_proto::relay::{RELAY_HEADER_LEN, RelayFlags, RelayHeader, TrafficClass};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;

use crate::peers::{Signer, next_msg, register};
use crate::server::Spawned;

/// Relay payload bytes per frame.
pub const PAYLOAD: usize = 512;
/// Saturated mode: frames in flight per side.
const WINDOW: u64 = 256;
/// A client acknowledges every this many relay frames (the server says so at registration; the
/// default is used for the raw clients here).
const ACK_EVERY: u32 = 4;

/// How to load the relay.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub calls: usize,
    /// Frames per second per side; `None` saturates.
    pub rate: Option<f64>,
    pub duration: Duration,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub sent: u64,
    pub received: u64,
    pub elapsed: Duration,
    pub latencies_us: Vec<u32>,
    pub server_cpu: f64,
    pub server_rss: u64,
}

impl Outcome {
    pub fn delivered_rate(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64()
    }

    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            1.0 - self.received as f64 / self.sent as f64
        }
    }

    /// The `q` quantile (0..1) of one-way latency, in ms.
    pub fn latency_ms(&self, q: f64) -> f64 {
        let mut l = self.latencies_us.clone();
        l.sort_unstable();
        let i = ((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1));
        l.get(i).map_or(f64::NAN, |us| f64::from(*us) / 1000.0)
    }
}

struct Side {
    call: u32,
    writer: Arc<Mutex<OwnedWriteHalf>>,
    reader: OwnedReadHalf,
    /// Frames this side has received from its peer.
    received: Arc<AtomicU64>,
}

async fn expect<F: Fn(&ServerMsg) -> bool>(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    what: &str,
    f: F,
) -> Result<ServerMsg> {
    loop {
        let m = next_msg(s, buf).await?;
        if f(&m) {
            return Ok(m);
        }
        if !matches!(m, ServerMsg::Ping { .. }) {
            bail!("expected {what}, got {m:?}");
        }
    }
}

fn control(msg: &ClientMsg) -> Result<BytesMut> {
    let mut b = BytesMut::new();
    frame::encode_control(msg, &mut b)?;
    Ok(b)
}

/// Registers two clients and sets up a relay-only call between them.
async fn pair(addr: SocketAddr, i: usize, signer: &Signer) -> Result<(Side, Side)> {
    let (an, bn) = (format!("relay-a{i}"), format!("relay-b{i}"));
    let mut a = register(addr, an, signer).await?;
    let mut b = register(addr, bn.clone(), signer).await?;
    let (mut abuf, mut bbuf) = (BytesMut::new(), BytesMut::new());
    a.write_all(&control(&ClientMsg::Call {
        callee: bn,
        policy: Policy::RelayOnly,
    })?)
    .await?;
    let ServerMsg::Ringing { call, .. } =
        expect(&mut a, &mut abuf, "ringing", |m| matches!(m, ServerMsg::Ringing { .. })).await?
    else {
        bail!("expected ringing")
    };
    expect(&mut b, &mut bbuf, "incoming", |m| {
        matches!(m, ServerMsg::Incoming { .. })
    })
    .await?;
    b.write_all(&control(&ClientMsg::Answer { call, accept: true })?)
        .await?;
    for (s, buf) in [(&mut a, &mut abuf), (&mut b, &mut bbuf)] {
        expect(s, buf, "start", |m| matches!(m, ServerMsg::Start { .. })).await?;
    }
    let side = |s: TcpStream| {
        let (r, w) = s.into_split();
        Side {
            call,
            writer: Arc::new(Mutex::new(w)),
            reader: r,
            received: Arc::new(AtomicU64::new(0)),
        }
    };
    Ok((side(a), side(b)))
}

fn frame_template(call: u32) -> Result<BytesMut> {
    let header = RelayHeader {
        call,
        class: TrafficClass::Control,
        flags: RelayFlags::default(),
    };
    let mut b = BytesMut::new();
    frame::encode_relay(&header, &[0u8; PAYLOAD], &mut b)?;
    Ok(b)
}

const PAYLOAD_AT: usize = LEN_PREFIX + 1 + RELAY_HEADER_LEN;

/// Sends paced or saturating load until `end`; returns frames sent.
async fn send(
    writer: Arc<Mutex<OwnedWriteHalf>>,
    call: u32,
    base: Instant,
    load: Load,
    end: Instant,
    peer_received: Arc<AtomicU64>,
) -> Result<u64> {
    let template = frame_template(call)?;
    let mut batch = BytesMut::with_capacity(template.len() * 64);
    let mut seq = 0u64;
    let mut owed = 0.0f64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last = Instant::now();
    while Instant::now() < end {
        tick.tick().await;
        let n = match load.rate {
            Some(rate) => {
                let now = Instant::now();
                owed += rate * now.duration_since(last).as_secs_f64();
                last = now;
                let n = owed.floor();
                owed -= n;
                n as u64
            }
            None => (WINDOW.saturating_sub(seq.saturating_sub(peer_received.load(Ordering::Relaxed)))).min(64),
        };
        if n == 0 {
            continue;
        }
        batch.clear();
        for _ in 0..n {
            let start = batch.len();
            batch.extend_from_slice(&template);
            let p = &mut batch[start + PAYLOAD_AT..start + PAYLOAD_AT + 16];
            p[..8].copy_from_slice(&seq.to_be_bytes());
            p[8..].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_be_bytes());
            seq += 1;
        }
        writer
            .lock()
            .await
            .write_all(&batch)
            .await
            .context("sending relay frames")?;
    }
    Ok(seq)
}

/// Reads until `end`, recording one-way latency of every relay frame; acknowledges and answers
/// pings. Returns the latencies (µs).
async fn receive(
    mut reader: OwnedReadHalf,
    writer: Arc<Mutex<OwnedWriteHalf>>,
    base: Instant,
    end: Instant,
    received: Arc<AtomicU64>,
) -> Result<Vec<u32>> {
    let decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut lat = Vec::with_capacity(1 << 16);
    let mut unacked = 0u32;
    loop {
        while let Some(raw) = decoder.decode(&mut buf)? {
            match raw.parse()? {
                Frame::Relay { payload, .. } => {
                    let sent = u64::from_be_bytes(payload[8..16].try_into()?);
                    let now = base.elapsed().as_nanos() as u64;
                    lat.push((now.saturating_sub(sent) / 1000) as u32);
                    received.fetch_add(1, Ordering::Relaxed);
                    unacked += 1;
                }
                Frame::Control(body) => {
                    if let Ok(ServerMsg::Ping { nonce, .. }) = decode_control::<ServerMsg>(body) {
                        writer
                            .lock()
                            .await
                            .write_all(&control(&ClientMsg::Pong { nonce })?)
                            .await?;
                    }
                }
                Frame::Error(e) => bail!("the server closed a relay client: {}", e.message),
                Frame::Hello(_) => {}
            }
        }
        if unacked >= ACK_EVERY {
            writer
                .lock()
                .await
                .write_all(&control(&ClientMsg::RelayAck { frames: unacked })?)
                .await?;
            unacked = 0;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(lat);
        }
        match tokio::time::timeout(left, reader.read_buf(&mut buf)).await {
            Ok(Ok(0)) => bail!("the server closed a relay client"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Ok(lat),
        }
    }
}

/// Runs one load against a fresh server.
pub async fn run(load: Load) -> Result<Outcome> {
    let server = Spawned::start()?;
    let signer = Signer::new()?;
    let mut pairs = Vec::with_capacity(load.calls);
    for i in 0..load.calls {
        pairs.push(pair(server.addr, i, &signer).await?);
    }
    let base = Instant::now();
    let cpu0 = server.cpu_seconds()?;
    let started = Instant::now();
    let end = started + load.duration;
    let drain = end + Duration::from_millis(500);
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for (a, b) in pairs {
        for (me, peer) in [(&a, &b), (&b, &a)] {
            senders.push(tokio::spawn(send(
                me.writer.clone(),
                me.call,
                base,
                load,
                end,
                peer.received.clone(),
            )));
        }
        for s in [a, b] {
            receivers.push(tokio::spawn(receive(s.reader, s.writer, base, drain, s.received)));
        }
    }
    let mut sent = 0;
    for s in senders {
        sent += s.await??;
    }
    let elapsed = started.elapsed();
    let mut latencies_us = Vec::new();
    for r in receivers {
        latencies_us.extend(r.await??);
    }
    Ok(Outcome {
        sent,
        received: latencies_us.len() as u64,
        elapsed,
        latencies_us,
        server_cpu: server.cpu_seconds()? - cpu0,
        server_rss: server.rss()?,
    })
}

/// What a slow receiver saw.
#[derive(Debug)]
pub struct SlowOutcome {
    pub audio_sent: u64,
    pub audio_delays_ms: Vec<f64>,
    pub video_sent: u64,
    pub video_packets: u64,
}

impl SlowOutcome {
    pub fn audio_ms(&self, q: f64) -> f64 {
        let mut d = self.audio_delays_ms.clone();
        d.sort_by(f64::total_cmp);
        d.get(((d.len() as f64 * q) as usize).min(d.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    }
}

/// One call: the sender sends audio (120-byte frames every 20 ms) and ~1 Mbit/s of video
/// (30 frames/s of 9 × 462 bytes) for `duration`; the receiver reads at `link` bytes/s.
pub async fn slow_receiver(relay_section: &str, link: f64, duration: Duration) -> Result<SlowOutcome> {
    let server = Spawned::start_with(relay_section)?;
    let signer = Signer::new()?;
    let (a, b) = pair(server.addr, 0, &signer).await?;
    let base = Instant::now();
    let end = Instant::now() + duration;
    let sender = tokio::spawn(media(a.writer.clone(), a.call, base, end));
    let got = read_paced(b.reader, b.writer, base, end + Duration::from_secs(1), link).await?;
    let (audio_sent, video_sent) = sender.await??;
    Ok(SlowOutcome {
        audio_sent,
        video_sent,
        audio_delays_ms: got.0,
        video_packets: got.1,
    })
}

async fn media(writer: Arc<Mutex<OwnedWriteHalf>>, call: u32, base: Instant, end: Instant) -> Result<(u64, u64)> {
    let mut audio = tokio::time::interval(Duration::from_millis(20));
    let mut video = tokio::time::interval(Duration::from_millis(33));
    let (mut na, mut nv) = (0u64, 0u64);
    while Instant::now() < end {
        let mut out = BytesMut::new();
        tokio::select! {
            _ = audio.tick() => {
                let h = RelayHeader { call, class: TrafficClass::Audio, flags: RelayFlags(RelayFlags::FRAME_START | RelayFlags::FRAME_END) };
                let mut p = vec![0u8; 120];
                p[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_be_bytes());
                frame::encode_relay(&h, &p, &mut out)?;
                na += 1;
            }
            _ = video.tick() => {
                let key = if nv % 60 == 0 { RelayFlags::KEY_FRAME } else { 0 };
                for i in 0..9u8 {
                    let mut flags = key;
                    if i == 0 { flags |= RelayFlags::FRAME_START; }
                    if i == 8 { flags |= RelayFlags::FRAME_END; }
                    let h = RelayHeader { call, class: TrafficClass::Video, flags: RelayFlags(flags) };
                    frame::encode_relay(&h, &[0u8; 462], &mut out)?;
                }
                nv += 1;
            }
        }
        writer.lock().await.write_all(&out).await?;
    }
    Ok((na, nv))
}

/// Reads at `link` bytes/s (a model of a slow downlink); returns audio delays (ms) and video
/// packets received.
async fn read_paced(
    mut reader: OwnedReadHalf,
    writer: Arc<Mutex<OwnedWriteHalf>>,
    base: Instant,
    end: Instant,
    link: f64,
) -> Result<(Vec<f64>, u64)> {
    let decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut buf = BytesMut::new();
    let (mut delays, mut video) = (Vec::new(), 0u64);
    let mut unacked = 0u32;
    let mut paced = Instant::now();
    while Instant::now() < end {
        while let Some(raw) = decoder.decode(&mut buf)? {
            paced = paced.max(Instant::now()) + Duration::from_secs_f64(raw.wire().len() as f64 / link);
            tokio::time::sleep_until(paced.into()).await;
            if let Frame::Relay { header, payload } = raw.parse()? {
                unacked += 1;
                match header.class {
                    TrafficClass::Audio => {
                        let sent = u64::from_be_bytes(payload[..8].try_into()?);
                        delays.push((base.elapsed().as_nanos() as u64).saturating_sub(sent) as f64 / 1e6);
                    }
                    TrafficClass::Video => video += 1,
                    TrafficClass::Control => {}
                }
            }
            if unacked >= ACK_EVERY {
                writer
                    .lock()
                    .await
                    .write_all(&control(&ClientMsg::RelayAck { frames: unacked })?)
                    .await?;
                unacked = 0;
            }
        }
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, reader.read_buf(&mut buf)).await {
            Ok(Ok(0)) => bail!("the server closed the slow receiver"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => break,
        }
    }
    Ok((delays, video))
}
