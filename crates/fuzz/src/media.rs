//! `media_open` and `media_receiver`: media packets as the peer's socket hands them over.
//!
//! Both use a fixed secret, so packets sealed by the caller's side (seeds, or the
//! `media_receiver` program's own seal operations) authenticate at the callee's opener.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;
use std::time::Instant;

use natcall_media::{
    Feedback, Flags, HEADER_LEN, Header, MAX_FRAGMENT_PAYLOAD, MAX_FRAME, PacketOpener, PacketSealer, Playout,
    Receiver, ReceiverConfig, Role, TAG_LEN, Track, derive_keys,
};

use crate::epoch;
use crate::input::Input;

/// The secret both sides' keys derive from (in a call: exported from the QUIC session).
pub const SECRET: [u8; 32] = *b"natcall-fuzz-media-secret-32-byt";

/// The caller's sealer: what produces packets the callee opens.
pub fn sealer() -> PacketSealer {
    derive_keys(&SECRET, Role::Caller).0
}

/// The callee's opener.
pub fn opener() -> PacketOpener {
    derive_keys(&SECRET, Role::Callee).1
}

/// The `media_open` target: authenticate and decrypt one packet.
///
/// Invariants: an opened packet's header re-encodes to its first 18 bytes and its payload
/// is the packet less header and tag; a packet whose header decodes, sealed again with the
/// same header and fragment, has the same length and opens to the same header and fragment.
pub fn media_open(packet: &[u8]) {
    static OPENER: OnceLock<PacketOpener> = OnceLock::new();
    let opener = OPENER.get_or_init(opener);
    if let Ok((header, payload)) = opener.open(packet) {
        assert_eq!(&header.encode()[..], &packet[..HEADER_LEN]);
        assert_eq!(payload.len(), packet.len() - HEADER_LEN - TAG_LEN);
    }
    let Ok((header, sealed)) = Header::decode(packet) else {
        return;
    };
    let fragment = &sealed[..sealed.len() - TAG_LEN];
    // A fresh sealer gives every track's first packet sequence 0.
    let header = Header { sequence: 0, ..header };
    let resealed = sealer()
        .seal(header, fragment)
        .expect("a decoded packet's fragment fits");
    assert_eq!(resealed.len(), packet.len());
    let (opened, payload) = opener.open(&resealed).expect("our own packet opens");
    assert_eq!(
        (opened, &payload[..]),
        (header, fragment),
        "media packet does not round-trip"
    );
}

/// `media_receiver` operations (the op byte modulo their count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// `track, timestamp: u32, frame id: u32, index: u16, count: u16, flags, len: u16, fill`:
    /// seal a fragment of `len % 479` bytes and deliver it.
    Seal = 0,
    /// `k`: deliver the `k`-th packet sealed so far (of the last 32) again.
    Replay,
    /// `track, n`: seal `n % 128` empty packets and lose them (moves the sequence on).
    Lose,
    /// `len, bytes`: deliver bytes as they are.
    Raw,
    /// `ms: u16`: advance the clock and run the timers.
    Advance,
    /// Take a receiver report and every track's statistics.
    Report,
    /// `k, offset: u16, xor`: deliver a sealed packet with one byte changed; never accepted.
    Tamper,
    /// Advance the clock to the receiver's deadline (at most 10 s) and run the timers.
    Deadline,
}

impl Op {
    const ALL: [Op; 8] = [
        Op::Seal,
        Op::Replay,
        Op::Lose,
        Op::Raw,
        Op::Advance,
        Op::Report,
        Op::Tamper,
        Op::Deadline,
    ];

    fn from_u8(b: u8) -> Op {
        Self::ALL[usize::from(b) % Self::ALL.len()]
    }
}

struct ReceiverHarness {
    receiver: Receiver,
    sealer: PacketSealer,
    now: Instant,
    sent: Vec<Vec<u8>>,
    delivered: HashMap<Track, u32>,
    max_buffered: usize,
}

impl ReceiverHarness {
    fn new(setup: u8) -> Self {
        let mut config = ReceiverConfig::default();
        if setup & 1 == 1 {
            config.playout = Playout::Arrival;
        }
        if setup & 2 == 2 {
            config.max_frames_per_track = 4;
        }
        if setup & 4 == 4 {
            config.reassembly_timeout = Duration::from_millis(50);
        }
        let max_buffered = config.max_buffered_bytes.max(MAX_FRAME + natcall_media::MAX_PACKET);
        Self {
            receiver: Receiver::new(config, opener(), epoch()),
            sealer: sealer(),
            now: epoch(),
            sent: Vec::new(),
            delivered: HashMap::new(),
            max_buffered,
        }
    }

    fn run(&mut self, op: Op, input: &mut Input<'_>) {
        match op {
            Op::Seal => {
                let track = Track::new(input.u8() % Track::COUNT).expect("below Track::COUNT");
                let header = Header {
                    track,
                    sequence: 0,
                    timestamp: input.u32(),
                    frame_id: input.u32(),
                    fragment_index: input.u16(),
                    fragment_count: input.u16(),
                    flags: Flags(input.u8()),
                };
                let len = usize::from(input.u16()) % (MAX_FRAGMENT_PAYLOAD + 1);
                let fill = input.u8();
                let payload: Vec<u8> = (0..len).map(|i| fill ^ i as u8).collect();
                if let Ok(packet) = self.sealer.seal(header, &payload) {
                    let _ = self.receiver.handle_packet(self.now, &packet);
                    if self.sent.len() == 32 {
                        self.sent.remove(0);
                    }
                    self.sent.push(packet);
                }
            }
            Op::Replay => {
                if let Some(packet) = self.pick(input.u8()) {
                    let replayed = self.receiver.handle_packet(self.now, &packet);
                    assert!(replayed.is_err(), "a replayed packet was accepted");
                }
            }
            Op::Lose => {
                let track = Track::new(input.u8() % Track::COUNT).expect("below Track::COUNT");
                let header = Header {
                    track,
                    sequence: 0,
                    timestamp: 0,
                    frame_id: 0,
                    fragment_index: 0,
                    fragment_count: 1,
                    flags: Flags(Flags::FRAME_START | Flags::FRAME_END),
                };
                for _ in 0..input.u8() % 128 {
                    let _ = self.sealer.seal(header, &[]);
                }
            }
            Op::Raw => {
                let _ = self.receiver.handle_packet(self.now, input.short_bytes());
            }
            Op::Advance => {
                self.now += Duration::from_millis(u64::from(input.u16()));
                self.receiver.handle_timeout(self.now);
            }
            Op::Report => {
                if let Some(f) = self.receiver.poll_feedback(self.now) {
                    let wire = f.encode();
                    assert!(wire.len() <= natcall_media::MAX_FEEDBACK_LEN);
                    assert_eq!(Feedback::decode(&wire).map(|d| d.counts), Ok(f.counts));
                }
                let tracks: Vec<_> = self.receiver.tracks().collect();
                for track in tracks {
                    let _ = self.receiver.stats(track, self.now).expect("a track seen has stats");
                }
            }
            Op::Tamper => {
                let (pick, at, xor) = (input.u8(), input.u16(), input.u8());
                if let Some(mut packet) = self.pick(pick) {
                    let at = usize::from(at) % packet.len();
                    packet[at] ^= xor.max(1);
                    let tampered = self.receiver.handle_packet(self.now, &packet);
                    assert!(tampered.is_err(), "a tampered packet was accepted");
                }
            }
            Op::Deadline => {
                if let Some(at) = self.receiver.poll_timeout() {
                    self.now = self.now.max(at.min(self.now + Duration::from_secs(10)));
                }
                self.receiver.handle_timeout(self.now);
            }
        }
        self.check();
    }

    fn pick(&self, k: u8) -> Option<Vec<u8>> {
        (!self.sent.is_empty()).then(|| self.sent[usize::from(k) % self.sent.len()].clone())
    }

    fn check(&mut self) {
        while let Some(frame) = self.receiver.poll_frame() {
            assert!(frame.data.len() <= MAX_FRAME);
            if let Some(&last) = self.delivered.get(&frame.track) {
                assert!(frame.frame_id > last, "frame {} after frame {last}", frame.frame_id);
            }
            self.delivered.insert(frame.track, frame.frame_id);
        }
        assert!(self.receiver.buffered_bytes() <= self.max_buffered);
    }
}

/// The `media_receiver` target: a program of [`Op`]s against one receiver.
///
/// Input: one setup byte (bit 0: arrival playout, bit 1: 4 frames per track, bit 2: 50 ms
/// reassembly timeout), then operations. Invariants: replayed and tampered packets are never
/// accepted; frames come out at most once, in frame-id order per track; the buffers stay
/// within their cap.
pub fn media_receiver(data: &[u8]) {
    let mut input = Input::new(data);
    let mut harness = ReceiverHarness::new(input.u8());
    while !input.is_empty() {
        let op = Op::from_u8(input.u8());
        harness.run(op, &mut input);
    }
}
