//! A call's media session: the sans-IO [`natcall_media`] sender and receiver driven by one task,
//! sending sealed packets (≤ 512 bytes) on the call's current path — UDP datagrams on the
//! peer's socket (direct, LAN), or relay frames whose traffic class (audio / video) and flags the
//! server can see (relay) — and carrying receiver reports over QUIC datagrams.
//!
//! Keys come from the call's QUIC session (`export_keying_material`), so media is end-to-end
//! encrypted on every path and bound to the peer QUIC authenticated.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use natcall_media::{
    Frame, ReceivedFrame, Receiver, ReceiverConfig, ReceiverReport, Role, SendStats, Sender, SenderConfig, Stats,
    Track, derive_keys,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, trace};

use crate::core::FakeAddr;
use crate::driver::Shared;

/// Label of the keying material exported from the QUIC session.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-natcall-media";
/// How often a receiver report goes back to the peer's sender.
const REPORT_EVERY: Duration = Duration::from_millis(500);
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
    /// The sender's current pacing rate (bit/s).
    pub send_rate_bps: u64,
}

/// Requests that must be handled in order with stream frames.
#[derive(Debug)]
enum Ctl {
    /// Stream bytes that must not be dropped for lack of queue room: admitted as a key frame
    /// when there is room, stamped then.
    Stream(Track, Vec<u8>),
    /// Answered once everything queued before it has been sent.
    Flush(oneshot::Sender<()>),
    /// The sender's pacing rate and ceiling, bit/s.
    Rate(u64),
}

/// The application's side of a call's media session.
#[derive(Debug)]
pub(crate) struct Media {
    frames_in: mpsc::Sender<(Track, Frame)>,
    ctl: mpsc::Sender<Ctl>,
    frames_out: tokio::sync::Mutex<mpsc::Receiver<ReceivedFrame>>,
    report: Arc<Mutex<MediaReport>>,
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
        packets: mpsc::Receiver<Bytes>,
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
        let driver = Driver {
            sender,
            receiver,
            socket,
            fake,
            conn: conn.clone(),
            report: report.clone(),
        };
        tokio::spawn(driver.run(packets, app_rx, ctl_rx, app_tx));
        Ok(Self {
            frames_in,
            ctl,
            frames_out: tokio::sync::Mutex::new(frames_out),
            report,
        })
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

struct Driver {
    sender: Sender,
    receiver: Receiver,
    socket: Arc<Shared>,
    fake: FakeAddr,
    conn: quinn::Connection,
    report: Arc<Mutex<MediaReport>>,
}

impl Driver {
    /// Runs the session until the call's media ends, then publishes the final statistics (so a
    /// report read after the call has ended is exact, not up to 500 ms old).
    async fn run(
        mut self,
        packets: mpsc::Receiver<Bytes>,
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
        mut packets: mpsc::Receiver<Bytes>,
        mut app_rx: mpsc::Receiver<(Track, Frame)>,
        mut ctl_rx: mpsc::Receiver<Ctl>,
        app_tx: &mpsc::Sender<ReceivedFrame>,
    ) {
        let origin = Instant::now();
        let mut next_report = origin + REPORT_EVERY;
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
            let mut wake = next_report;
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
                        waiting = Some((track, data));
                    }
                    Some(Ctl::Flush(tx)) => flushes.push(tx),
                    Some(Ctl::Rate(bps)) => self.sender.set_rate(Instant::now(), bps),
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
                    Some(p) => {
                        if let Err(e) = self.receiver.handle_packet(Instant::now(), &p) {
                            trace!(error = %e, "media packet dropped");
                        }
                    }
                    None => return,
                },
                d = self.conn.read_datagram() => match d {
                    Ok(d) => {
                        if let Ok(r) = ReceiverReport::decode(&d) {
                            self.sender.handle_feedback(Instant::now(), &r);
                        }
                    }
                    Err(_) => return, // the call's QUIC connection closed
                },
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    self.receiver.handle_timeout(now);
                    if now >= next_report {
                        next_report = now + REPORT_EVERY;
                        let r = self.receiver.report(now);
                        let _ = self.conn.send_datagram(Bytes::copy_from_slice(&r.encode()));
                        self.publish(now);
                    }
                }
            }
        }
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
