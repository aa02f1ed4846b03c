//! The relay engine end to end, in-process on loopback: a receiver slower than its sender keeps
//! audio flowing with bounded delay while video is dropped whole frames; a stuck receiver is
//! disconnected and its sender told (the call is suspended); video resumes at a key frame after
//! a burst.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::{Client, Got, Identity, Running, relay_frame_with, test_config};
use natcall_proto::control::{ClientMsg, Policy, ServerMsg};
use natcall_proto::frame::LEN_PREFIX;
use natcall_proto::relay::{RELAY_HEADER_LEN, RelayFlags, TrafficClass};
use natcall_rendezvous::Config;

const AUDIO: u8 = 1;
const VIDEO: u8 = 2;
/// Video: 30 frames/s of 9 packets × 462 bytes ≈ 1 Mbit/s, a key frame every 60 frames.
const VIDEO_PACKETS: u16 = 9;
const KEY_EVERY: u32 = 60;

async fn registered(srv: &Running, name: &str) -> Client {
    Client::register(srv.addr, name, &Identity::generate()).await.0
}

/// Places and accepts a call from `a` to `b` (named `b_name`); returns its id.
async fn call(a: &mut Client, b: &mut Client, b_name: &str) -> u32 {
    a.send(&ClientMsg::Call {
        request: 1,
        callee: b_name.into(),
        policy: Policy::RelayOnly,
    })
    .await;
    let ServerMsg::Ringing { call, .. } = a.next_msg().await else {
        panic!("expected ringing")
    };
    assert!(matches!(b.next_msg().await, ServerMsg::Incoming { .. }));
    b.send(&ClientMsg::Answer { call, accept: true }).await;
    for c in [a, b] {
        assert!(matches!(c.next_msg().await, ServerMsg::Start(_)));
    }
    call
}

/// Payload: kind, frame id, packet index, packet count, send time (µs since `base`), padding.
fn payload(kind: u8, frame: u32, idx: u16, count: u16, base: Instant, len: usize) -> Vec<u8> {
    let mut p = BytesMut::with_capacity(len);
    p.put_u8(kind);
    p.put_u32(frame);
    p.put_u16(idx);
    p.put_u16(count);
    p.put_u64(base.elapsed().as_micros() as u64);
    p.resize(len.max(p.len()), 0xAB);
    p.to_vec()
}

#[derive(Debug)]
struct Parsed {
    kind: u8,
    frame: u32,
    count: u16,
    sent_us: u64,
}

fn parse(wire: &Bytes) -> Parsed {
    let p = &wire[LEN_PREFIX + 1 + RELAY_HEADER_LEN..];
    Parsed {
        kind: p[0],
        frame: u32::from_be_bytes(p[1..5].try_into().expect("4")),
        count: u16::from_be_bytes(p[7..9].try_into().expect("2")),
        sent_us: u64::from_be_bytes(p[9..17].try_into().expect("8")),
    }
}

/// Sends audio (20 ms frames) and, if `video`, video to `call` for `duration`. Returns the number
/// of audio frames and video frames sent.
async fn send_media(c: &mut Client, call: u32, base: Instant, duration: Duration, video: bool) -> (u32, u32) {
    let end = Instant::now() + duration;
    let mut audio_tick = tokio::time::interval(Duration::from_millis(20));
    let mut video_tick = tokio::time::interval(Duration::from_millis(33));
    let (mut audio_n, mut video_n) = (0u32, 0u32);
    while Instant::now() < end {
        tokio::select! {
            _ = audio_tick.tick() => {
                let p = payload(AUDIO, audio_n, 0, 1, base, 120);
                let f = relay_frame_with(call, TrafficClass::Audio, RelayFlags::FRAME_START | RelayFlags::FRAME_END, &p);
                c.send_raw(&f).await;
                audio_n += 1;
            }
            _ = video_tick.tick(), if video => {
                let key = video_n % KEY_EVERY == 0;
                let mut burst = BytesMut::new();
                for i in 0..VIDEO_PACKETS {
                    let mut flags = if key { RelayFlags::KEY_FRAME } else { 0 };
                    if i == 0 { flags |= RelayFlags::FRAME_START; }
                    if i + 1 == VIDEO_PACKETS { flags |= RelayFlags::FRAME_END; }
                    let p = payload(VIDEO, video_n, i, VIDEO_PACKETS, base, 462);
                    burst.extend_from_slice(&relay_frame_with(call, TrafficClass::Video, flags, &p));
                }
                c.send_raw(&burst).await;
                video_n += 1;
            }
        }
    }
    (audio_n, video_n)
}

#[derive(Debug, Default)]
struct Received {
    audio_delays: Vec<Duration>,
    /// video frame id → packets received, in order of first arrival
    video: BTreeMap<u32, u16>,
    video_order: Vec<u32>,
    video_counts: BTreeMap<u32, u16>,
}

impl Received {
    fn p99_audio(&self) -> Duration {
        let mut d = self.audio_delays.clone();
        d.sort();
        d.get((d.len() * 99 / 100).min(d.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }

    /// Every video frame that arrived arrived whole.
    fn assert_whole_frames(&self) {
        for (frame, got) in &self.video {
            assert_eq!(
                Some(got),
                self.video_counts.get(frame),
                "video frame {frame} arrived cut"
            );
        }
    }

    /// After every gap in the video frame ids, the next frame is a key frame.
    fn assert_resumes_at_key_frames(&self) {
        for w in self.video_order.windows(2) {
            if w[1] != w[0] + 1 {
                assert_eq!(
                    w[1] % KEY_EVERY,
                    0,
                    "after frame {} video resumed at frame {}, not a key frame",
                    w[0],
                    w[1]
                );
            }
        }
    }
}

/// Reads relay frames for `duration`, at most `rate(elapsed)` bytes per second (`None`: as fast as
/// they come), acknowledging as a client does.
async fn receive(
    c: &mut Client,
    base: Instant,
    duration: Duration,
    rate: impl Fn(Duration) -> Option<f64>,
) -> Received {
    let start = Instant::now();
    let end = start + duration;
    let mut r = Received::default();
    let mut paced_until = Instant::now();
    while Instant::now() < end {
        let left = end.saturating_duration_since(Instant::now());
        let Some(got) = c.try_next(left).await else { break };
        let Got::Relay(wire) = got else { continue };
        if let Some(bps) = rate(start.elapsed()) {
            // Model a link of `bps`: this frame occupies it for len/bps seconds.
            paced_until = paced_until.max(Instant::now()) + Duration::from_secs_f64(wire.len() as f64 / bps);
            tokio::time::sleep_until(paced_until.into()).await;
        }
        let m = parse(&wire);
        match m.kind {
            AUDIO => r
                .audio_delays
                .push(base.elapsed().saturating_sub(Duration::from_micros(m.sent_us))),
            VIDEO => {
                if !r.video.contains_key(&m.frame) {
                    r.video_order.push(m.frame);
                }
                *r.video.entry(m.frame).or_default() += 1;
                r.video_counts.insert(m.frame, m.count);
            }
            _ => {}
        }
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_keeps_audio_flowing_while_video_is_dropped_whole_frames() {
    let srv = Running::start(test_config()).await;
    let max_frames = test_config().relay.max_frames;
    let (mut alice, mut bob) = (registered(&srv, "alice").await, registered(&srv, "bob").await);
    let (mut carol, mut dave) = (registered(&srv, "carol").await, registered(&srv, "dave").await);
    let ab = call(&mut alice, &mut bob, "bob").await;
    let cd = call(&mut carol, &mut dave, "dave").await;
    let base = Instant::now();
    let secs = Duration::from_secs(6);
    let bob_outbox = srv.server.registry().peer("bob").expect("bob").outbox;
    let monitor = tokio::spawn(async move {
        let mut worst = 0;
        for _ in 0..60 {
            worst = worst.max(bob_outbox.waiting());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        worst
    });
    // bob's link carries 40 kB/s; alice sends ~130 kB/s (1 Mbit/s video + audio).
    let ((sent_audio, sent_video), bob_got, _, dave_got) = tokio::join!(
        send_media(&mut alice, ab, base, secs, true),
        receive(&mut bob, base, secs + Duration::from_millis(500), |_| Some(40_000.0)),
        send_media(&mut carol, cd, base, secs, false),
        receive(&mut dave, base, secs + Duration::from_millis(500), |_| None),
    );
    let worst_queue = monitor.await.expect("monitor");

    let received_audio = bob_got.audio_delays.len() as u32;
    assert!(
        received_audio * 10 >= sent_audio * 9,
        "audio keeps arriving: {received_audio} of {sent_audio}"
    );
    assert!(
        bob_got.p99_audio() < Duration::from_millis(200),
        "audio p99 one-way delay {:?}",
        bob_got.p99_audio()
    );
    assert!(
        (bob_got.video.len() as u32) < sent_video,
        "video had to be dropped: {} of {sent_video}",
        bob_got.video.len()
    );
    bob_got.assert_whole_frames();
    bob_got.assert_resumes_at_key_frames();
    assert!(
        worst_queue <= max_frames + VIDEO_PACKETS as usize,
        "bob's buffer stayed bounded: {worst_queue}"
    );
    // The other pair saw no extra delay.
    assert!(dave_got.audio_delays.len() as u32 * 10 >= sent_audio * 9);
    assert!(
        dave_got.p99_audio() < Duration::from_millis(30),
        "dave's p99 {:?}",
        dave_got.p99_audio()
    );
    let metrics = srv.server.metrics().render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("natcall_relay_dropped_frames_total{class=\"video\"") && !l.ends_with(" 0")),
        "video drops are counted:\n{metrics}"
    );
    println!(
        "bob: audio {received_audio}/{sent_audio} p99 {:?}; video frames {}/{sent_video}; worst queue {worst_queue}; dave p99 {:?}",
        bob_got.p99_audio(),
        bob_got.video.len(),
        dave_got.p99_audio()
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_stops_reading_is_disconnected_and_its_sender_told() {
    let mut config: Config = test_config();
    config.relay.overload_timeout_ms = 1000;
    let srv = Running::start(config).await;
    let (mut alice, mut bob) = (registered(&srv, "alice").await, registered(&srv, "bob").await);
    let ab = call(&mut alice, &mut bob, "bob").await;
    bob.acks = false; // and bob never reads again
    let base = Instant::now();
    let started = Instant::now();
    let mut suspended = None;
    for _ in 0..100 {
        send_media(&mut alice, ab, base, Duration::from_millis(100), true).await;
        if let Some(Got::Msg(ServerMsg::CallSuspended { call })) = alice.try_next(Duration::from_millis(1)).await {
            suspended = Some((call, started.elapsed()));
            break;
        }
    }
    let (call, after) = suspended.expect("alice is told within 10 s");
    assert_eq!(call, ab);
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(4),
        "after {after:?}"
    );
    assert!(srv.server.registry().peer("bob").is_none(), "bob was disconnected");
    let metrics = srv.server.metrics().render();
    assert!(
        metrics.contains("natcall_disconnects_total{reason=\"stalled\"} 1"),
        "{metrics}"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_the_receiver_recovers_and_video_resumes_at_a_key_frame() {
    let srv = Running::start(test_config()).await;
    let (mut alice, mut bob) = (registered(&srv, "alice").await, registered(&srv, "bob").await);
    let ab = call(&mut alice, &mut bob, "bob").await;
    let base = Instant::now();
    // bob's link: 20 kB/s for 2 s, then unconstrained.
    let slow = Duration::from_secs(2);
    let (_, got) = tokio::join!(
        send_media(&mut alice, ab, base, Duration::from_secs(6), true),
        receive(&mut bob, base, Duration::from_millis(6500), |t| (t < slow)
            .then_some(20_000.0)),
    );
    got.assert_whole_frames();
    got.assert_resumes_at_key_frames();
    let gap = got.video_order.windows(2).any(|w| w[1] != w[0] + 1);
    assert!(gap, "the slow phase dropped video: {:?}", got.video_order);
    // After recovery every frame arrives: the last 2 s of frames are all there, in order.
    let last = *got.video_order.last().expect("video arrived");
    let tail: Vec<u32> = got.video_order.iter().copied().filter(|f| *f + 60 > last).collect();
    assert_eq!(
        tail.len(),
        60.min(last as usize + 1),
        "after recovery nothing is dropped: {tail:?}"
    );
    // The call goes on: a hang-up still reaches bob.
    alice
        .send(&ClientMsg::Hangup {
            call: ab,
            reason: "done".into(),
        })
        .await;
    let reason = loop {
        match bob.next().await {
            Got::Relay(_) => continue,
            Got::Msg(ServerMsg::CallEnded { reason, .. }) => break reason,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(reason, "alice hung up: done");
    srv.shutdown().await;
}
