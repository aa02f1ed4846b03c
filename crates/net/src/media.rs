//! A call's media session: the sans-IO [`natcall_media`] sender and receiver driven by one task,
//! sending sealed packets (≤ 512 bytes) on the call's current path — UDP datagrams on the
//! peer's socket (direct, LAN), or relay frames whose traffic class (audio / video) and flags the
//! server can see (relay) — and carrying transport feedback over QUIC datagrams.
//!
//! Rate control: the receiver's transport feedback (every 40 ms while media arrives) goes back
//! over a QUIC datagram to the peer's sender, whose rate controller sets the call's target; on
//! the relay path the server's budget for the receiver (`RelayBudget`) caps it. The target is
//! published on a watch ([`MediaRate`]) so sources follow it.
//!
//! Keys come from the call's QUIC session (`export_keying_material`), so media is end-to-end
//! encrypted on every path and bound to the peer QUIC authenticated.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use natcall_media::{
    Feedback, Frame, RateReason, RateState, ReceivedFrame, Receiver, ReceiverConfig, Role, SendStats, Sender,
    SenderConfig, Stats, Track, Usage, derive_keys,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, trace};

use crate::core::{FakeAddr, Route};
use crate::driver::{MediaIn, Shared};

/// Label of the keying material exported from the QUIC session.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-natcall-media";
/// How often the statistics are published.
const REPORT_EVERY: Duration = Duration::from_millis(500);
/// How often the rate controller's clock runs (it notices silent feedback) and the target is
/// published.
const RATE_EVERY: Duration = Duration::from_millis(50);
/// A stream held back by the pacer this share of a window is faster than the path.
const STREAM_LIMITED_SHARE: f64 = 0.9;
/// The window over which a stream's waiting is measured.
const STREAM_WINDOW: Duration = Duration::from_secs(3);
/// Frames queued from the application, and received frames waiting for it.
const QUEUE: usize = 256;
/// Stream pieces handed over ahead of the sender's room (they are stamped when taken, so
/// waiting here costs no measured delay; a deeper hand-over saves a task wake-up per piece).
const STREAM_QUEUE: usize = 64;

/// Sent and received statistics of one track.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrackReport {
    /// What this side sent.
    pub sent: Option<SendStats>,
    /// What this side received.
    pub received: Option<Stats>,
}

/// Media statistics of a call.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MediaReport {
    /// Track 0.
    pub audio: TrackReport,
    /// Track 1.
    pub video: TrackReport,
    /// The sender's current pacing rate: the rate controller's target (bit/s).
    pub send_rate_bps: u64,
}

/// The call's media rate as the sender's controller sets it ([`crate::Call::watch_rate`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MediaRate {
    /// The target for everything this side sends, bit/s (packets, headers and tags included).
    pub target_bps: u64,
    /// What video may use of it now, in frame bytes (audio first, queued video counted): what
    /// an encoder should aim at.
    pub video_bps: u64,
    /// The rate that reached the peer over the last half second, bit/s, once measured.
    pub delivered_bps: Option<u64>,
    /// Loss the peer saw over the last second, 0.0–1.0.
    pub loss: f64,
    /// What the delay detector says of the path.
    pub usage: Usage,
    /// Why the target last changed.
    pub reason: RateReason,
    /// The relay's latest budget for this side, bit/s, while it applies.
    pub relay_budget_bps: Option<u64>,
    /// Video frames are being dropped (here or by the relay) until a key frame: an encoder
    /// should make its next frame one.
    pub key_frame_wanted: bool,
    /// The queue on the path: one-way delay above its base, ms.
    pub queue_delay_ms: f64,
    /// Another flow (a download) keeps the path's queue full: only loss bounds the target.
    pub competing: bool,
}

impl MediaRate {
    fn new(state: RateState, video_bps: u64, key_frame_wanted: bool) -> Self {
        Self {
            key_frame_wanted,
            queue_delay_ms: state.queue_delay_ms,
            competing: state.competing,
            target_bps: state.target_bps,
            video_bps,
            delivered_bps: state.acked_bps,
            loss: state.loss,
            usage: state.usage,
            reason: state.reason,
            relay_budget_bps: state.budget_bps,
        }
    }
}

/// Something the media session tells the application once.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum MediaNotice {
    /// A stream on `track` has been held back by the pacer nearly all of the last 3 s: its
    /// source is faster than the path carries (`target_bps`), so it falls behind real time.
    StreamTooFast {
        /// The stream's track.
        track: u8,
        /// The call's target when this was noticed, bit/s.
        target_bps: u64,
    },
}

/// Requests that must be handled in order with stream frames.
#[derive(Debug)]
enum Ctl {
    /// Stream bytes that must not be dropped for lack of queue room: admitted as a key frame
    /// when there is room, stamped then.
    Stream(Track, Vec<u8>),
    /// Answered once everything queued before it has been sent.
    Flush(oneshot::Sender<()>),
    /// The ceiling of the sender's rate, bit/s.
    Rate(u64),
}

/// The application's side of a call's media session.
#[derive(Debug)]
pub(crate) struct Media {
    frames_in: mpsc::Sender<(Track, Frame)>,
    ctl: mpsc::Sender<Ctl>,
    frames_out: tokio::sync::Mutex<mpsc::Receiver<ReceivedFrame>>,
    report: Arc<Mutex<MediaReport>>,
    rate: watch::Receiver<MediaRate>,
    notices: tokio::sync::Mutex<mpsc::Receiver<MediaNotice>>,
}

impl Media {
    /// Starts the session for a connected call. `packets` carries this call's media packets from
    /// the socket and the relay; `fake` is the call's peer address in the route table.
    pub(crate) fn start(
        conn: &quinn::Connection,
        caller: bool,
        call: u32,
        socket: Arc<Shared>,
        fake: FakeAddr,
        packets: mpsc::Receiver<MediaIn>,
    ) -> Result<Self, crate::Error> {
        let mut secret = [0u8; 32];
        conn.export_keying_material(&mut secret, EXPORTER_LABEL, &call.to_be_bytes())
            .map_err(|_| crate::Error::Quic("cannot export media keys from the QUIC session".into()))?;
        let role = if caller { Role::Caller } else { Role::Callee };
        let (sealer, opener) = derive_keys(&secret, role);
        let now = Instant::now();
        let sender = Sender::new(SenderConfig::default(), sealer, now);
        let receiver = Receiver::new(ReceiverConfig::default(), opener, now);
        let (frames_in, app_rx) = mpsc::channel(QUEUE);
        let (app_tx, frames_out) = mpsc::channel(QUEUE);
        let (ctl, ctl_rx) = mpsc::channel(STREAM_QUEUE);
        let report = Arc::new(Mutex::new(MediaReport::default()));
        let (rate_tx, rate) = watch::channel(MediaRate::new(sender.rate_state(), sender.video_budget_bps(now), false));
        let (notice_tx, notices) = mpsc::channel(4);
        let driver = Driver {
            sender,
            receiver,
            socket,
            fake,
            conn: conn.clone(),
            report: report.clone(),
            rate: rate_tx,
            notices: notice_tx,
            stream_wait: StreamWait::default(),
            route: None,
        };
        tokio::spawn(driver.run(packets, app_rx, ctl_rx, app_tx));
        Ok(Self {
            frames_in,
            ctl,
            frames_out: tokio::sync::Mutex::new(frames_out),
            report,
            rate,
            notices: tokio::sync::Mutex::new(notices),
        })
    }

    pub(crate) fn watch_rate(&self) -> watch::Receiver<MediaRate> {
        self.rate.clone()
    }

    pub(crate) async fn notice(&self) -> Option<MediaNotice> {
        self.notices.lock().await.recv().await
    }

    pub(crate) async fn send(&self, track: Track, frame: Frame) -> Result<(), crate::Error> {
        self.frames_in
            .send((track, frame))
            .await
            .map_err(|_| crate::Error::Ended("the call ended".into()))
    }

    fn ended() -> crate::Error {
        crate::Error::Ended("the call ended".into())
    }

    pub(crate) async fn send_stream(&self, track: Track, data: Vec<u8>) -> Result<(), crate::Error> {
        if data.len() > natcall_media::MAX_FRAME {
            return Err(crate::Error::Protocol(format!(
                "a stream piece of {} bytes is over the {} bytes of a media frame",
                data.len(),
                natcall_media::MAX_FRAME
            )));
        }
        self.ctl.send(Ctl::Stream(track, data)).await.map_err(|_| Self::ended())
    }

    pub(crate) async fn flush(&self) -> Result<(), crate::Error> {
        let (tx, rx) = oneshot::channel();
        self.ctl.send(Ctl::Flush(tx)).await.map_err(|_| Self::ended())?;
        rx.await.map_err(|_| Self::ended())
    }

    pub(crate) async fn set_rate(&self, bps: u64) -> Result<(), crate::Error> {
        self.ctl.send(Ctl::Rate(bps)).await.map_err(|_| Self::ended())
    }

    pub(crate) async fn recv(&self) -> Option<ReceivedFrame> {
        self.frames_out.lock().await.recv().await
    }

    pub(crate) fn report(&self) -> MediaReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// Bytes a path adds to each media packet: IP and UDP headers on a UDP path; on the relay the
/// frame's length, type and relay header (11), a TLS record's header and tag (22: at call rates
/// most frames travel in a record of their own) and TCP/IP with timestamps (52). `None`: no path.
fn path_overhead(route: Route) -> Option<usize> {
    match route {
        Route::Udp(addr) if addr.ip().to_canonical().is_ipv4() => Some(20 + 8),
        Route::Udp(_) => Some(40 + 8),
        Route::Relay(_) => Some(11 + 22 + 52),
        Route::Void => None,
    }
}

struct Driver {
    sender: Sender,
    receiver: Receiver,
    socket: Arc<Shared>,
    fake: FakeAddr,
    conn: quinn::Connection,
    report: Arc<Mutex<MediaReport>>,
    rate: watch::Sender<MediaRate>,
    notices: mpsc::Sender<MediaNotice>,
    stream_wait: StreamWait,
    /// The route media took at the last look: a new one is a new path for the controller.
    route: Option<Route>,
}

/// How long stream pieces waited for the pacer over the current window: a stream held back
/// nearly all the time is faster than the path (told once).
#[derive(Debug, Default)]
struct StreamWait {
    window_start: Option<Instant>,
    waiting_since: Option<Instant>,
    waited: Duration,
    told: bool,
}

impl StreamWait {
    /// A stream piece of `track` started (`true`) or stopped (`false`) waiting for room;
    /// returns whether the stream has now been held back nearly all of a window.
    fn update(&mut self, now: Instant, waiting: bool) -> bool {
        let start = *self.window_start.get_or_insert(now);
        if let Some(since) = self.waiting_since.take() {
            self.waited += now.saturating_duration_since(since);
        }
        if waiting {
            self.waiting_since = Some(now);
        }
        let span = now.saturating_duration_since(start);
        if span < STREAM_WINDOW {
            return false;
        }
        let limited = self.waited.as_secs_f64() >= STREAM_LIMITED_SHARE * span.as_secs_f64();
        self.window_start = Some(now);
        self.waited = Duration::ZERO;
        if limited && !self.told {
            self.told = true;
            return true;
        }
        false
    }
}

impl Driver {
    /// Runs the session until the call's media ends, then publishes the final statistics (so a
    /// report read after the call has ended is exact, not up to 500 ms old).
    async fn run(
        mut self,
        packets: mpsc::Receiver<MediaIn>,
        app_rx: mpsc::Receiver<(Track, Frame)>,
        ctl_rx: mpsc::Receiver<Ctl>,
        app_tx: mpsc::Sender<ReceivedFrame>,
    ) {
        self.drive(packets, app_rx, ctl_rx, &app_tx).await;
        // Complete frames still in the jitter buffer go to the application now rather than
        // being lost with the call (partial ones are given up).
        let now = Instant::now();
        self.receiver.handle_timeout(now + Duration::from_secs(3600));
        while let Some(f) = self.receiver.poll_frame() {
            let _ = app_tx.try_send(f);
        }
        self.publish(now);
    }

    async fn drive(
        &mut self,
        mut packets: mpsc::Receiver<MediaIn>,
        mut app_rx: mpsc::Receiver<(Track, Frame)>,
        mut ctl_rx: mpsc::Receiver<Ctl>,
        app_tx: &mpsc::Sender<ReceivedFrame>,
    ) {
        let origin = Instant::now();
        let mut next_report = origin + REPORT_EVERY;
        let mut next_rate = origin + RATE_EVERY;
        let (mut app_open, mut ctl_open) = (true, true);
        // Stream bytes waiting for room in the sender, and who waits for the sender to drain.
        let mut waiting: Option<(Track, Vec<u8>)> = None;
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        loop {
            let now = Instant::now();
            self.flush(now, app_tx);
            if let Some((track, data)) = waiting.take_if(|(t, d)| self.sender.has_room(*t, d.len())) {
                // Stamped when taken, so time spent waiting for room is not mistaken by the
                // receiver for a growing path delay.
                let ts = now.duration_since(origin).as_millis() as u32;
                if let Err(e) = self.sender.handle_frame(track, Frame::key(ts, data)) {
                    debug!(error = %e, "media stream frame refused");
                }
                self.stream_waited(now, track, false);
                self.flush(now, app_tx);
            }
            if waiting.is_none() && !flushes.is_empty() {
                // Frames the application queued before asking are part of what it waits for.
                while let Ok((track, frame)) = app_rx.try_recv() {
                    if let Err(e) = self.sender.handle_frame(track, frame) {
                        debug!(error = %e, "media frame refused");
                    }
                }
                self.flush(now, app_tx);
            }
            if waiting.is_none() && !flushes.is_empty() && self.sender.is_idle() {
                flushes.drain(..).for_each(|f| {
                    let _ = f.send(());
                });
            }
            let mut wake = next_report.min(next_rate);
            if waiting.is_some() {
                wake = wake.min(self.sender.budget_at());
            }
            for t in [self.sender.poll_timeout(), self.receiver.poll_timeout()]
                .into_iter()
                .flatten()
            {
                wake = wake.min(t);
            }
            tokio::select! {
                c = ctl_rx.recv(), if ctl_open && waiting.is_none() => match c {
                    Some(Ctl::Stream(track, data)) => {
                        self.sender.set_lossless(track);
                        if !self.sender.has_room(track, data.len()) {
                            self.stream_waited(Instant::now(), track, true);
                        }
                        waiting = Some((track, data));
                    }
                    Some(Ctl::Flush(tx)) => flushes.push(tx),
                    Some(Ctl::Rate(bps)) => self.sender.set_max_rate(Instant::now(), bps),
                    None => ctl_open = false,
                },
                f = app_rx.recv(), if app_open => match f {
                    Some((track, frame)) => {
                        if let Err(e) = self.sender.handle_frame(track, frame) {
                            debug!(error = %e, "media frame refused");
                        }
                    }
                    None => app_open = false,
                },
                p = packets.recv() => match p {
                    Some(MediaIn::Packet(p)) => {
                        if let Err(e) = self.receiver.handle_packet(Instant::now(), &p) {
                            trace!(error = %e, "media packet dropped");
                        }
                    }
                    Some(MediaIn::Budget { bps, dropped }) => {
                        debug!(bps, dropped, "relay budget");
                        self.sender.handle_budget(Instant::now(), bps);
                        self.sender.handle_path_drops(dropped);
                    }
                    None => return,
                },
                d = self.conn.read_datagram() => match d {
                    Ok(d) => match Feedback::decode(&d) {
                        Ok(f) => self.sender.handle_feedback(Instant::now(), &f),
                        Err(e) => trace!(error = %e, "datagram that is not media feedback ignored"),
                    },
                    Err(_) => return, // the call's QUIC connection closed
                },
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    self.receiver.handle_timeout(now);
                    if now >= next_rate {
                        next_rate = now + RATE_EVERY;
                        self.sender.set_rtt(self.conn.rtt());
                        self.follow_path();
                        self.sender.handle_timeout(now);
                        self.publish_rate(now);
                    }
                    if now >= next_report {
                        next_report = now + REPORT_EVERY;
                        self.publish(now);
                    }
                }
            }
        }
    }

    /// A stream piece on `track` started or stopped waiting for room; tells the application
    /// once when the stream is faster than the path.
    fn stream_waited(&mut self, now: Instant, track: Track, waiting: bool) {
        if self.stream_wait.update(now, waiting) {
            let target_bps = self.sender.rate_bps();
            info!(
                track = track.number(),
                target_bps, "a media stream is faster than the path"
            );
            let _ = self.notices.try_send(MediaNotice::StreamTooFast {
                track: track.number(),
                target_bps,
            });
        }
    }

    /// Tells the sender what the call's current path adds to each packet, whether it may be
    /// probed, and whether it delivers in bursts (the relay's TCP connection does).
    fn follow_path(&mut self) {
        let route = self.socket.lock().route(self.fake);
        if self.route.replace(route).is_some_and(|r| r != route) {
            // What arrived on the old path says nothing of stalls on the new one.
            self.sender.path_changed();
        }
        if let Some(bytes) = path_overhead(route) {
            self.sender.set_overhead(bytes);
        }
        match route {
            Route::Udp(_) => {
                self.sender.set_probing(true);
                self.sender.set_bursty_path(false);
            }
            Route::Relay(_) => {
                self.sender.set_probing(false);
                self.sender.set_bursty_path(true);
            }
            Route::Void => {}
        }
    }

    fn publish_rate(&self, now: Instant) {
        let rate = MediaRate::new(
            self.sender.rate_state(),
            self.sender.video_budget_bps(now),
            self.sender.needs_key_frame(Track::VIDEO),
        );
        self.rate.send_if_modified(|r| {
            let changed = *r != rate;
            *r = rate;
            changed
        });
    }

    fn flush(&mut self, now: Instant, app_tx: &mpsc::Sender<ReceivedFrame>) {
        while let Some(t) = self.sender.poll_transmit(now) {
            self.socket
                .send_media(self.fake, &t.contents, t.track.number(), t.flags.0);
        }
        while let Some(f) = self.receiver.poll_frame() {
            // An application that does not read loses frames, like a slow decoder would.
            let _ = app_tx.try_send(f);
        }
        while let Some(f) = self.receiver.poll_feedback(now) {
            // Feedback that does not fit or finds QUIC's datagram queue full is lost like a
            // packet: the next one carries the cumulative counts.
            let _ = self.conn.send_datagram(Bytes::from(f.encode()));
        }
    }

    fn publish(&self, now: Instant) {
        let track = |t: Track| TrackReport {
            sent: self.sender.stats(t),
            received: self.receiver.stats(t, now),
        };
        let r = MediaReport {
            audio: track(Track::AUDIO),
            video: track(Track::VIDEO),
            send_rate_bps: self.sender.rate_bps(),
        };
        if let Ok(mut slot) = self.report.lock() {
            *slot = r;
        }
    }
}
