//! Room fan-out load: `rooms` rooms of `members` raw protocol clients each; every member sends
//! 512-byte audio-class relay frames to its room's id at a call-like rate (with a sequence
//! number and a send timestamp), the server copies each to every other member's buffer, and
//! every member reads, acknowledges (the health checks) and records the copies it gets.
//!
//! Measured: copies delivered per second, loss (copies expected = frames sent × (members − 1)),
//! one-way latency per copy, server CPU per copy. The relay's 1:1 calls at the same delivered
//! rate are the comparison ([`crate::relay`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use natcall_proto::control::{ClientMsg, ServerMsg};
use natcall_proto::frame::{self, LEN_PREFIX};
use natcall_proto::relay::{RELAY_HEADER_LEN, RelayFlags, RelayHeader, TrafficClass};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::load::{Load, Out, Outcome, PAYLOAD, Recorder, Sender, Window};
use crate::peers::{Signer, next_msg, register};
use crate::relay::{Side, receive};
use crate::server::Spawned;

/// What a room load measured.
#[derive(Debug, Clone)]
pub struct RoomOutcome {
    pub members: usize,
    /// `sent` counts frames sent; `received` copies delivered.
    pub outcome: Outcome,
}

impl RoomOutcome {
    /// Copies the server should have delivered.
    pub fn expected(&self) -> u64 {
        self.outcome.sent * (self.members as u64 - 1)
    }

    pub fn loss(&self) -> f64 {
        let e = self.expected();
        if e == 0 {
            0.0
        } else {
            (1.0 - self.outcome.received as f64 / e as f64).max(0.0)
        }
    }
}

fn control(msg: &ClientMsg) -> Result<BytesMut> {
    let mut b = BytesMut::new();
    frame::encode_control(msg, &mut b)?;
    Ok(b)
}

/// Reads messages until one matches `f` (others — pings, other members joining, pairwise
/// sessions — are skipped).
async fn wait_for(
    s: &mut natcall::ServerStream,
    buf: &mut BytesMut,
    what: &str,
    f: impl Fn(&ServerMsg) -> bool,
) -> Result<ServerMsg> {
    for _ in 0..1000 {
        let m = next_msg(s, buf).await?;
        if f(&m) {
            return Ok(m);
        }
        if let ServerMsg::RoomRefused { reason, .. } = &m {
            bail!("expected {what}: refused: {reason}");
        }
    }
    bail!("expected {what}: not in 1000 messages")
}

/// Registers `members` clients; the first creates room `room{r}` inviting the others, who
/// join. Returns the room's id and its members' sides.
async fn room(addr: SocketAddr, r: usize, members: usize, signer: &Signer) -> Result<Vec<Side>> {
    let names: Vec<String> = (0..members).map(|m| format!("room{r}-m{m}")).collect();
    let mut streams = Vec::with_capacity(members);
    for n in &names {
        streams.push((register(addr, n.clone(), signer).await?, BytesMut::new()));
    }
    let room = format!("room{r}");
    let (first, rest) = streams.split_first_mut().context("a room has members")?;
    first
        .0
        .write_all(&control(&ClientMsg::RoomCreate {
            room: room.clone(),
            invite: names[1..].to_vec(),
        })?)
        .await?;
    first.0.flush().await?;
    let ServerMsg::RoomJoined { id, .. } = wait_for(&mut first.0, &mut first.1, "RoomJoined", |m| {
        matches!(m, ServerMsg::RoomJoined { .. })
    })
    .await?
    else {
        bail!("expected RoomJoined")
    };
    for (s, buf) in rest.iter_mut() {
        s.write_all(&control(&ClientMsg::RoomJoin {
            room: room.clone(),
            code: None,
        })?)
        .await?;
        s.flush().await?;
        wait_for(s, buf, "RoomJoined", |m| matches!(m, ServerMsg::RoomJoined { .. })).await?;
    }
    // What else was queued for them (members joining, pairwise sessions) is read and ignored
    // by the receive loop.
    Ok(streams
        .into_iter()
        .map(|(s, pending)| {
            let (r, w) = tokio::io::split(s);
            Side {
                call: id,
                writer: Arc::new(Mutex::new(w)),
                reader: r,
                received: Arc::new(AtomicU64::new(0)),
                pending,
            }
        })
        .collect())
}

fn frame_template(room: u32) -> Result<Vec<u8>> {
    let header = RelayHeader {
        call: room,
        class: TrafficClass::Audio,
        flags: RelayFlags(RelayFlags::FRAME_START | RelayFlags::FRAME_END),
    };
    let mut b = BytesMut::new();
    frame::encode_relay(&header, &[0u8; PAYLOAD], &mut b)?;
    Ok(b.to_vec())
}

/// Runs `rooms` rooms of `members` at `load.rate` frames/s per member (`load.calls` is
/// ignored) against a fresh server.
pub async fn run(rooms: usize, members: usize, load: Load) -> Result<RoomOutcome> {
    if members < 2 {
        bail!("a room needs at least 2 members");
    }
    if load.rate.is_none() {
        bail!("a room load needs --rate (frames/s per member)");
    }
    let server = Spawned::start()?;
    let signer = Signer::new()?;
    let mut all = Vec::with_capacity(rooms);
    for r in 0..rooms {
        all.push(
            room(server.addr, r, members, &signer)
                .await
                .context("setting up a room")?,
        );
    }
    let cpu0 = server.cpu_seconds()?;
    let w = Window::start(&load)?;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for sides in all {
        for s in sides {
            senders.push(Sender {
                out: Out::Tls(s.writer.clone()),
                template: frame_template(s.call)?,
                payload_at: LEN_PREFIX + 1 + RELAY_HEADER_LEN,
                peer_received: s.received.clone(),
            });
            let rec = Recorder::new(w.base, s.received);
            receivers.push(tokio::spawn(receive(s.reader, s.writer, rec, w.drain, s.pending)));
        }
    }
    let mut outcome = w.finish(senders, receivers, load).await?;
    outcome.server_cpu = server.cpu_seconds()? - cpu0;
    outcome.server_rss = server.peak_rss()?;
    Ok(RoomOutcome { members, outcome })
}
