//! Relay load: N relayed calls between 2N raw protocol clients, each side sending 512-byte
//! relay frames (control class: never dropped by the policy, so loss means the relay lost
//! them) with a sequence number and a send timestamp, reading the other side's frames and
//! acknowledging them as a real client does (the relay engine's health checks).
//!
//! Pacing, stamping and latency statistics are shared with the other relays ([`crate::load`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use natcall::ServerStream;
use natcall_proto::codec::decode_control;
use natcall_proto::control::{ClientMsg, Policy, ServerMsg};
use natcall_proto::frame::{self, Frame, FrameDecoder, LEN_PREFIX, MAX_FRAME_LEN};
use natcall_proto::relay::{RELAY_HEADER_LEN, RelayFlags, RelayHeader, TrafficClass};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::io::{ReadHalf, WriteHalf};

type OwnedReadHalf = ReadHalf<ServerStream>;
type OwnedWriteHalf = WriteHalf<ServerStream>;
use tokio::sync::Mutex;

use crate::load::{Load, Out, Outcome, PAYLOAD, Recorder, Sender, Window};
use crate::peers::{Signer, next_msg, register};
use crate::server::Spawned;

/// A client acknowledges every this many relay frames (the server says so at registration; the
/// default is used for the raw clients here).
const ACK_EVERY: u32 = 4;

pub struct Side {
    pub(crate) call: u32,
    pub(crate) writer: Arc<Mutex<OwnedWriteHalf>>,
    pub(crate) reader: OwnedReadHalf,
    /// Frames this side has received from its peer.
    pub(crate) received: Arc<AtomicU64>,
    /// Bytes read during the set-up beyond the last message taken (the next frame's start).
    pub(crate) pending: BytesMut,
}

async fn expect<F: Fn(&ServerMsg) -> bool>(
    s: &mut ServerStream,
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
    pair_across((addr, addr), &format!("relay-{i}"), signer)
        .await
        .map(|(a, b, _)| (a, b))
}

/// Registers a client on `addrs.0` and one on `addrs.1` (two nodes of a cluster, or the same
/// server twice), named `{tag}-a` and `{tag}-b`, and sets up a relay-only call from the first
/// to the second. Also returns how long the call took from `Call` to the caller's `Start`.
pub(crate) async fn pair_across(
    addrs: (SocketAddr, SocketAddr),
    tag: &str,
    signer: &Signer,
) -> Result<(Side, Side, Duration)> {
    let (an, bn) = (format!("{tag}-a"), format!("{tag}-b"));
    let mut a = register(addrs.0, an, signer).await?;
    let mut b = register(addrs.1, bn.clone(), signer).await?;
    let placed = Instant::now();
    let (mut abuf, mut bbuf) = (BytesMut::new(), BytesMut::new());
    a.write_all(&control(&ClientMsg::Call {
        request: 1,
        callee: bn,
        policy: Policy::RelayOnly,
    })?)
    .await?;
    a.flush().await?;
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
    b.flush().await?;
    expect(&mut a, &mut abuf, "start", |m| matches!(m, ServerMsg::Start(_))).await?;
    let setup = placed.elapsed();
    expect(&mut b, &mut bbuf, "start", |m| matches!(m, ServerMsg::Start(_))).await?;
    let side = |s: ServerStream, pending: BytesMut| {
        let (r, w) = tokio::io::split(s);
        Side {
            call,
            writer: Arc::new(Mutex::new(w)),
            reader: r,
            received: Arc::new(AtomicU64::new(0)),
            pending,
        }
    };
    Ok((side(a, abuf), side(b, bbuf), setup))
}

fn frame_template(call: u32) -> Result<Vec<u8>> {
    let header = RelayHeader {
        call,
        class: TrafficClass::Control,
        flags: RelayFlags::default(),
    };
    let mut b = BytesMut::new();
    frame::encode_relay(&header, &[0u8; PAYLOAD], &mut b)?;
    Ok(b.to_vec())
}

const PAYLOAD_AT: usize = LEN_PREFIX + 1 + RELAY_HEADER_LEN;

/// Reads until `end`, recording every relay frame; acknowledges and answers pings as a natcall
/// client does. Returns the latencies (µs).
/// The client's health check, as natcall clients send it: a `RelayAck` once `ACK_EVERY`
/// frames have been read since the last one.
async fn ack_if_due(writer: &Mutex<OwnedWriteHalf>, unacked: &mut u32) -> Result<()> {
    if *unacked >= ACK_EVERY {
        let ack = control(&ClientMsg::RelayAck { frames: *unacked })?;
        let mut w = writer.lock().await;
        w.write_all(&ack).await?;
        w.flush().await?;
        *unacked = 0;
    }
    Ok(())
}

pub(crate) async fn receive(
    mut reader: OwnedReadHalf,
    writer: Arc<Mutex<OwnedWriteHalf>>,
    mut rec: Recorder,
    end: Instant,
    pending: BytesMut,
) -> Result<Vec<u32>> {
    let decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut buf = pending;
    buf.reserve(64 * 1024);
    let mut unacked = 0u32;
    let deadline = tokio::time::sleep_until(end.into());
    tokio::pin!(deadline);
    loop {
        while let Some(raw) = decoder.decode(&mut buf)? {
            match raw.parse()? {
                Frame::Relay { payload, .. } => {
                    rec.record(payload);
                    unacked += 1;
                }
                Frame::Control(body) => {
                    if let Ok(ServerMsg::Ping { nonce, .. }) = decode_control::<ServerMsg>(body) {
                        let mut w = writer.lock().await;
                        w.write_all(&control(&ClientMsg::Pong { nonce })?).await?;
                        w.flush().await?;
                    }
                }
                Frame::Error(e) => bail!("the server closed a relay client: {}", e.message),
                Frame::Hello(_) => {}
            }
        }
        ack_if_due(&writer, &mut unacked).await?;
        tokio::select! {
            r = reader.read_buf(&mut buf) => match r {
                Ok(0) => bail!("the server closed a relay client"),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            },
            () = &mut deadline => return Ok(rec.latencies_us),
        }
    }
}

/// Sets up `calls` relayed calls on `server`.
pub async fn setup(addr: SocketAddr, calls: usize) -> Result<Vec<(Side, Side)>> {
    let signer = Signer::new()?;
    let mut pairs = Vec::with_capacity(calls);
    for i in 0..calls {
        pairs.push(pair(addr, i, &signer).await.context("setting up a relayed call")?);
    }
    Ok(pairs)
}

/// Runs one load against a fresh server.
pub async fn run(load: Load) -> Result<Outcome> {
    let server = Spawned::start()?;
    let pairs = setup(server.addr, load.calls).await?;
    let mut o = measure(pairs, load, &[&server]).await?;
    o.server_rss = server.peak_rss()?;
    Ok(o)
}

/// Runs `load` over the relayed calls `pairs`; the CPU of `servers` (summed) is measured.
pub(crate) async fn measure(pairs: Vec<(Side, Side)>, load: Load, servers: &[&Spawned]) -> Result<Outcome> {
    let cpu = || -> Result<f64> { servers.iter().map(|s| s.cpu_seconds()).sum() };
    let cpu0 = cpu()?;
    let w = Window::start(&load)?;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for (a, b) in pairs {
        for (me, peer) in [(&a, &b), (&b, &a)] {
            senders.push(Sender {
                out: Out::Tls(me.writer.clone()),
                template: frame_template(me.call)?,
                payload_at: PAYLOAD_AT,
                peer_received: peer.received.clone(),
            });
        }
        for s in [a, b] {
            let rec = Recorder::new(w.base, s.received);
            receivers.push(tokio::spawn(receive(s.reader, s.writer, rec, w.drain, s.pending)));
        }
    }
    let mut o = w.finish(senders, receivers, load).await?;
    o.server_cpu = cpu()? - cpu0;
    Ok(o)
}

/// Server RSS (bytes) before and one second after setting up `calls` idle relayed calls.
pub async fn idle_calls(calls: usize) -> Result<(u64, u64)> {
    let server = Spawned::start()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss()?;
    let pairs = setup(server.addr, calls).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = server.rss()?;
    drop(pairs);
    Ok((before, after))
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
        let mut w = writer.lock().await;
        w.write_all(&out).await?;
        w.flush().await?;
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
            ack_if_due(&writer, &mut unacked).await?;
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
