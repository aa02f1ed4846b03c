//! A room's fan-out media on the peer side (see `docs/rooms.md`): this member's sender key,
//! handed to every other member over their pairwise session and replaced when a member leaves;
//! what this member sends to the room's id (one copy, which the server forwards to every other
//! member); and every other member's fan-out media, opened with the keys they handed over.
//!
//! Data flow:
//! - the control connection's reader hands each relay frame addressed to the room's id to this
//!   task ([`crate::driver::Shared::deliver_room`]);
//! - [`crate::room::Room`] hands it each pairwise session as it connects: this task sends the
//!   session our key (a QUIC unidirectional stream carrying one key message) and reads the
//!   member's keys from the streams it opens;
//! - when a member leaves, this task forgets that member's keys, makes a new key, sends it
//!   to the sessions still open and waits (at most [`REKEY_WAIT`]) until they have it, then
//!   seals with it: the member who left cannot open what follows;
//! - frames the application sends in fan-out are paced at the room's fixed rate (nothing
//!   comes back to adapt it: a slow receiver's own buffer at the server thins its video) and
//!   sent as relay frames of class audio or video, so the server's class policy applies.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use natcall_media::room::{KEY_MESSAGE_LEN, fan_out_packet};
use natcall_media::{Frame, ReceiverConfig, RoomReceiver, SendStats, Sender, SenderConfig, SenderKey, Track};
use natcall_proto::relay::{RelayFlags, TrafficClass};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::{mpsc, watch};
use tracing::{debug, trace, warn};

use crate::core::Route;
use crate::driver::Shared;
use crate::media::{MediaReport, TrackReport};

/// How long a rekey waits for the remaining members to have the new key before sealing with
/// it anyway.
pub(crate) const REKEY_WAIT: Duration = Duration::from_secs(1);
/// Fan-out packets queued from the control reader at most; beyond, they are dropped.
const PACKET_QUEUE: usize = 512;
/// How often the jitter buffers and the pacer run.
const TICK: Duration = Duration::from_millis(10);
/// How often the report is published.
const REPORT_EVERY: Duration = Duration::from_millis(250);
/// How long one key message may take to arrive once its stream opened.
const KEY_READ_WAIT: Duration = Duration::from_secs(5);

/// What the room's handle tells the task.
#[derive(Debug)]
pub(crate) enum Ctl {
    /// A pairwise session with `peer` connected.
    Session { peer: String, conn: quinn::Connection },
    /// `peer` joined the room (again, perhaps).
    Joined(String),
    /// `peer` left the room.
    Left(String),
    /// A frame to send in fan-out.
    Frame(Track, Frame),
    /// The rate to send at in fan-out, bit/s.
    Rate(u64),
    /// The server's fan-out budget, bit/s: what the members that take the most drain from
    /// this sender (every other member is a bottleneck).
    Budget(u64),
    /// `from` handed over its key (read from its session).
    Key { from: String, key: SenderKey },
    /// Rekey number `generation` reached the members (or its wait ended): seal with `key`.
    Rekeyed { generation: u32, key: SenderKey },
}

/// Fan-out statistics: what this member sent, and per other member what arrived from it.
#[derive(Debug, Clone, Default)]
pub struct FanOutReport {
    /// What this member sent to the room (audio, video).
    pub sent: [Option<SendStats>; 2],
    /// Per member, what arrived from it by fan-out.
    pub received: BTreeMap<String, MediaReport>,
    /// Keys this member has made (1 + one per rekey).
    pub keys_made: u32,
    /// Fan-out packets under a key this member does not have (a member it has no key from
    /// yet, or one that left).
    pub unknown_key_packets: u64,
}

/// The handle the room keeps.
#[derive(Debug)]
pub(crate) struct RoomMedia {
    pub(crate) ctl: mpsc::Sender<Ctl>,
    pub(crate) report: Arc<Mutex<FanOutReport>>,
    /// The rate this member sends at in fan-out now (the rate set, or less under a budget).
    pub(crate) rate: watch::Receiver<u64>,
    room_id: u32,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RoomMedia {
    fn drop(&mut self) {
        self.shared.unregister_room(self.room_id);
        self.task.abort();
    }
}

impl RoomMedia {
    /// Starts the room's fan-out task; `rate_bps` is what this member sends at in fan-out.
    pub(crate) fn start(shared: Arc<Shared>, room_id: u32, rate_bps: u64) -> Self {
        let (packets_tx, packets) = mpsc::channel(PACKET_QUEUE);
        let (rate_tx, rate_rx) = watch::channel(rate_bps);
        let (ctl, ctl_rx) = mpsc::channel(256);
        shared.register_room(room_id, packets_tx, ctl.clone());
        let report = Arc::new(Mutex::new(FanOutReport::default()));
        let now = Instant::now();
        let key = fresh_key();
        let mut config = SenderConfig::default();
        config.rate_bps = rate_bps;
        config.start_rate_bps = rate_bps;
        let mut sender = Sender::new(config, key.sealer(), now);
        // Fan-out goes through the server's TCP connection.
        sender.set_probing(false);
        sender.set_bursty_path(true);
        let task = Task {
            shared: shared.clone(),
            room_id,
            key,
            sender,
            receiver: RoomReceiver::new(ReceiverConfig::default()),
            sessions: HashMap::new(),
            ctl_tx: ctl.clone(),
            report: report.clone(),
            keys_made: 1,
            generation: 1,
            pending: None,
            gone: std::collections::HashSet::new(),
            helpers: tokio::task::JoinSet::new(),
            rate: FanOutRate::new(rate_bps),
            rate_tx,
        };
        let task = tokio::spawn(task.run(packets, ctl_rx));
        Self {
            ctl,
            report,
            rate: rate_rx,
            room_id,
            shared,
            task,
        }
    }

    /// Fan-out statistics so far.
    pub(crate) fn report(&self) -> FanOutReport {
        self.report.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn fresh_key() -> SenderKey {
    let mut b = [0u8; KEY_MESSAGE_LEN];
    // SystemRandom only fails when the OS has no randomness at all.
    SystemRandom::new().fill(&mut b).expect("the OS random source works");
    SenderKey::decode(&b).expect("a key message is 36 bytes")
}

struct Task {
    shared: Arc<Shared>,
    room_id: u32,
    key: SenderKey,
    sender: Sender,
    receiver: RoomReceiver<String>,
    sessions: HashMap<String, quinn::Connection>,
    ctl_tx: mpsc::Sender<Ctl>,
    report: Arc<Mutex<FanOutReport>>,
    /// Keys made so far; a rekey's number.
    keys_made: u32,
    /// The number of the key sealing now.
    generation: u32,
    /// The key a rekey under way will switch to.
    pending: Option<SenderKey>,
    /// Members who left (until they join again): a session of theirs that connects late gets
    /// no key.
    gone: std::collections::HashSet<String>,
    /// Key senders and readers, and rekeys: they end with this task (aborted with it), so
    /// none keeps a session's QUIC connection open.
    helpers: tokio::task::JoinSet<()>,
    /// The rate set, the server's budget, and the rate sent at.
    rate: FanOutRate,
    rate_tx: watch::Sender<u64>,
}

/// A budget is followed for this long after the server's last one…
const BUDGET_LIFETIME: Duration = Duration::from_secs(1);
/// …then the rate grows back towards the rate set by this share per second (nothing else comes
/// back from fan-out receivers: growing at once would overrun them again).
const FAN_OUT_GROWTH: f64 = 0.08;

/// The fan-out rate: the rate set ([`Ctl::Rate`]), held to the server's budget while it comes,
/// then grown back slowly.
#[derive(Debug, Clone, Copy)]
struct FanOutRate {
    set: u64,
    now_bps: f64,
    budget_at: Option<Instant>,
    grown_at: Option<Instant>,
}

impl FanOutRate {
    fn new(set: u64) -> Self {
        Self {
            set,
            now_bps: set as f64,
            budget_at: None,
            grown_at: None,
        }
    }

    fn set(&mut self, bps: u64) {
        self.set = bps;
        self.now_bps = self.now_bps.min(bps as f64);
        if self.budget_at.is_none() {
            self.now_bps = bps as f64;
        }
    }

    fn budget(&mut self, now: Instant, bps: u64) {
        self.budget_at = Some(now);
        self.grown_at = None;
        self.now_bps = (bps as f64).min(self.set as f64);
    }

    /// Grows back once the budget is old; returns the rate in bit/s.
    fn tick(&mut self, now: Instant) -> u64 {
        if let Some(at) = self.budget_at {
            if now.duration_since(at) > BUDGET_LIFETIME {
                let from = self.grown_at.unwrap_or(at + BUDGET_LIFETIME);
                let dt = now.saturating_duration_since(from);
                self.now_bps *= 1.0 + FAN_OUT_GROWTH * dt.as_secs_f64();
                self.grown_at = Some(now);
                if self.now_bps >= self.set as f64 {
                    self.now_bps = self.set as f64;
                    self.budget_at = None;
                    self.grown_at = None;
                }
            }
        }
        self.now_bps as u64
    }
}

impl Task {
    async fn run(mut self, mut packets: mpsc::Receiver<Bytes>, mut ctl: mpsc::Receiver<Ctl>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_report = Instant::now();
        loop {
            tokio::select! {
                p = packets.recv() => match p {
                    Some(p) => {
                        if let Err(e) = self.receiver.handle_packet(Instant::now(), &p) {
                            trace!(error = %e, "fan-out packet dropped");
                        }
                    }
                    None => return,
                },
                c = ctl.recv() => match c {
                    Some(c) => self.handle(c),
                    None => return,
                },
                Some(_) = self.helpers.join_next(), if !self.helpers.is_empty() => {}
                _ = tick.tick() => {
                    let now = Instant::now();
                    if self.rate.budget_at.is_some() {
                        self.apply_rate(now);
                    }
                    self.receiver.handle_timeout(now);
                    // Played frames are counted in the statistics; the built-in sources send
                    // test patterns nobody plays.
                    while self.receiver.poll_frame().is_some() {}
                    if now >= next_report {
                        next_report = now + REPORT_EVERY;
                        self.publish(now);
                    }
                }
            }
            self.transmit();
        }
    }

    /// Paces at the fan-out rate now, and says so when it changed.
    fn apply_rate(&mut self, now: Instant) {
        let bps = self.rate.tick(now);
        if bps != self.sender.rate_bps() {
            self.sender.set_rate(now, bps);
        }
        self.rate_tx.send_if_modified(|r| std::mem::replace(r, bps) != bps);
    }

    fn handle(&mut self, c: Ctl) {
        let now = Instant::now();
        match c {
            Ctl::Session { peer, conn } => {
                if self.gone.contains(&peer) {
                    // The session connected after the member left (the two news race): it
                    // gets no key.
                    return debug!(%peer, "session of a member who left: no key for it");
                }
                // Our key, and the one a rekey under way is about to switch to.
                let keys: Vec<SenderKey> = std::iter::once(self.key.clone()).chain(self.pending.clone()).collect();
                let to = conn.clone();
                self.helpers.spawn(async move {
                    for key in keys {
                        send_key(&to, &key).await;
                    }
                });
                self.helpers
                    .spawn(read_keys(peer.clone(), conn.clone(), self.ctl_tx.clone()));
                self.sessions.insert(peer, conn);
            }
            Ctl::Joined(peer) => {
                self.gone.remove(&peer);
            }
            Ctl::Key { from, key } => {
                if !self.sessions.contains_key(&from) {
                    return debug!(%from, "room key from a member no longer in the room ignored");
                }
                if let Err(e) = self.receiver.add_key(now, from.clone(), &key) {
                    warn!(%from, error = %e, "room key refused");
                }
            }
            Ctl::Left(peer) => {
                self.receiver.remove_sender(&peer);
                self.sessions.remove(&peer);
                self.gone.insert(peer);
                self.rekey();
            }
            Ctl::Rekeyed { generation, key } => {
                // A later rekey may have finished first: never go back to an older key.
                if generation > self.generation {
                    self.sender.rekey_room(key.secret());
                    debug!(room = self.room_id, key = key.id, "rekeyed");
                    self.generation = generation;
                    if self.pending.as_ref().is_some_and(|p| p.id == key.id) {
                        self.pending = None;
                    }
                    self.key = key;
                }
            }
            Ctl::Rate(bps) => {
                self.rate.set(bps);
                self.apply_rate(now);
            }
            Ctl::Budget(bps) => {
                debug!(room = self.room_id, bps, "fan-out budget");
                self.rate.budget(now, bps);
                self.apply_rate(now);
            }
            Ctl::Frame(track, frame) => {
                if let Err(e) = self.sender.handle_frame(track, frame) {
                    debug!(error = %e, "fan-out frame refused");
                }
            }
        }
    }

    /// Makes a new key and hands it to every session still open; once they have it (or
    /// [`REKEY_WAIT`] passed) the task seals with it ([`Ctl::Rekeyed`]). Media goes on under
    /// the current key meanwhile.
    fn rekey(&mut self) {
        let key = fresh_key();
        self.keys_made += 1;
        let generation = self.keys_made;
        self.pending = Some(key.clone());
        let conns: Vec<quinn::Connection> = self.sessions.values().cloned().collect();
        let ctl = self.ctl_tx.clone();
        self.helpers.spawn(async move {
            let mut sends = tokio::task::JoinSet::new();
            for conn in conns {
                let key = key.clone();
                sends.spawn(async move { send_key(&conn, &key).await });
            }
            let _ = tokio::time::timeout(REKEY_WAIT, sends.join_all()).await;
            let _ = ctl.send(Ctl::Rekeyed { generation, key }).await;
        });
    }

    fn transmit(&mut self) {
        let now = Instant::now();
        while let Some(t) = self.sender.poll_transmit(now) {
            let class = if t.track == Track::AUDIO {
                TrafficClass::Audio
            } else {
                TrafficClass::Video
            };
            let packet = fan_out_packet(self.key.id, &t.contents);
            self.shared
                .send_routed(Route::Relay(self.room_id), &packet, class, RelayFlags(t.flags.0));
        }
    }

    fn publish(&self, now: Instant) {
        let received = self
            .receiver
            .senders()
            .map(|m| {
                let track = |t| TrackReport {
                    sent: None,
                    received: self.receiver.stats(m, t, now),
                };
                (
                    m.clone(),
                    MediaReport {
                        audio: track(Track::AUDIO),
                        video: track(Track::VIDEO),
                        send_rate_bps: 0,
                    },
                )
            })
            .collect();
        let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        *r = FanOutReport {
            sent: [self.sender.stats(Track::AUDIO), self.sender.stats(Track::VIDEO)],
            received,
            keys_made: self.keys_made,
            unknown_key_packets: self.receiver.unknown_key_packets(),
        };
    }
}

/// Sends `key` on a new unidirectional stream of `conn` and waits until the peer has read it.
async fn send_key(conn: &quinn::Connection, key: &SenderKey) {
    let sent = async {
        let mut s = conn.open_uni().await?;
        s.write_all(&key.encode()).await?;
        s.finish()?;
        s.stopped().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    if let Err(e) = sent.await {
        debug!(error = %e, "room key not delivered (the session ended)");
    }
}

/// Reads the key messages `peer` sends over its session until the session ends. One member
/// sends one per rekey (a rekey per departure), so their number is not capped; each is 36
/// bytes, read within [`KEY_READ_WAIT`], and the receiver keeps at most three keys per member.
async fn read_keys(peer: String, conn: quinn::Connection, ctl: mpsc::Sender<Ctl>) {
    loop {
        let Ok(mut s) = conn.accept_uni().await else { return };
        let message = match tokio::time::timeout(KEY_READ_WAIT, s.read_to_end(KEY_MESSAGE_LEN)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "unreadable room key message ignored");
                continue;
            }
            Err(_) => {
                debug!(%peer, "room key message not finished in time: ignored");
                let _ = s.stop(0u32.into());
                continue;
            }
        };
        match SenderKey::decode(&message) {
            Ok(key) => {
                if ctl
                    .send(Ctl::Key {
                        from: peer.clone(),
                        key,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => debug!(%peer, error = %e, "malformed room key message ignored"),
        }
    }
}
