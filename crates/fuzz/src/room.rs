//! `room_receiver`: a room member's fan-out receiver ([`natcall_media::RoomReceiver`]) fed a
//! program of key hand-overs, fan-out packets sealed under several senders' keys, replays,
//! tampering, raw bytes, key messages and time.
//!
//! The keys are fixed: six keys, the fifth with the first's id but another secret (a sender
//! reusing an id, or one lying about it), so packets sealed by the program authenticate exactly
//! when the receiver was given the right key.

use std::collections::HashMap;
use std::time::Duration;
use std::time::Instant;

use natcall_media::room::{fan_out_packet, split_fan_out_packet};
use natcall_media::{
    Flags, Header, MAX_FRAGMENT_PAYLOAD, PacketSealer, ReceiverConfig, RoomReceiver, SenderKey, Track,
};

use crate::epoch;
use crate::input::Input;

/// The program's keys: `(id, secret byte)`; the fifth reuses the first's id.
pub const KEYS: [(u32, u8); 6] = [(1, 0x11), (2, 0x22), (3, 0x33), (4, 0x44), (1, 0x55), (6, 0x66)];
/// Senders, by index.
const SENDERS: u8 = 4;

/// `room_receiver` operations (the op byte modulo their count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RoomOp {
    /// `sender, key`: the receiver is given key `key % 6` as `sender % 4`'s.
    Key = 0,
    /// `key, track, timestamp: u32, frame id: u32, index: u16, count: u16, flags, len: u16,
    /// fill`: seal a fragment under key `key % 6` and deliver it as a fan-out packet.
    Seal,
    /// `k`: deliver the `k`-th packet delivered so far (of the last 32) again.
    Replay,
    /// `k, offset: u16, xor`: deliver a delivered packet with one byte changed (the key id
    /// included); never accepted.
    Tamper,
    /// `len, bytes`: deliver bytes as they are.
    Raw,
    /// `len, bytes`: decode bytes as a key message.
    KeyMessage,
    /// `sender`: the sender left.
    Remove,
    /// `ms: u16`: advance the clock and run the timers.
    Advance,
    /// Every sender's statistics, and the frames played out.
    Report,
}

impl RoomOp {
    const ALL: [RoomOp; 9] = [
        RoomOp::Key,
        RoomOp::Seal,
        RoomOp::Replay,
        RoomOp::Tamper,
        RoomOp::Raw,
        RoomOp::KeyMessage,
        RoomOp::Remove,
        RoomOp::Advance,
        RoomOp::Report,
    ];

    fn from_u8(b: u8) -> RoomOp {
        Self::ALL[usize::from(b) % Self::ALL.len()]
    }
}

/// The key `k` of [`KEYS`].
pub fn key(k: usize) -> SenderKey {
    let (id, byte) = KEYS[k % KEYS.len()];
    SenderKey::new(id, [byte; 32])
}

struct Harness {
    rx: RoomReceiver<u8>,
    /// One sealer per key (each key's sequence numbers are its own).
    sealers: Vec<PacketSealer>,
    now: Instant,
    /// Fan-out packets delivered, and as whose each was accepted.
    sent: Vec<(Vec<u8>, Option<u8>)>,
    /// What the receiver should hold: key id → (sender, key index), a sender's ids (oldest
    /// first, at most three).
    owner: HashMap<u32, (u8, usize)>,
    held: HashMap<u8, Vec<u32>>,
    /// A sender's ids it no longer uses (older than its three, or held when it left): the
    /// receiver refuses them from that sender again.
    retired: HashMap<u8, Vec<u32>>,
    unknown: u64,
}

impl Harness {
    fn new() -> Self {
        Self {
            rx: RoomReceiver::new(ReceiverConfig::default()),
            sealers: (0..KEYS.len()).map(|k| key(k).sealer()).collect(),
            now: epoch(),
            sent: Vec::new(),
            owner: HashMap::new(),
            held: HashMap::new(),
            retired: HashMap::new(),
            unknown: 0,
        }
    }

    fn run(&mut self, op: RoomOp, input: &mut Input<'_>) {
        match op {
            RoomOp::Key => {
                let (sender, k) = (input.u8() % SENDERS, usize::from(input.u8()) % KEYS.len());
                let id = KEYS[k].0;
                let result = self.rx.add_key(self.now, sender, &key(k));
                let retired = self.retired.get(&sender).is_some_and(|r| r.contains(&id));
                match self.owner.get(&id) {
                    _ if retired => assert!(result.is_err(), "retired key id {id} taken back by {sender}"),
                    Some((o, _)) if *o != sender => {
                        assert!(result.is_err(), "key id {id} of sender {o} given to {sender}");
                    }
                    Some(_) => assert!(result.is_ok(), "the same sender's id again"),
                    None => {
                        assert!(result.is_ok(), "a fresh key id refused");
                        self.owner.insert(id, (sender, k));
                        let ids = self.held.entry(sender).or_default();
                        ids.push(id);
                        if ids.len() > 3 {
                            let old = ids.remove(0);
                            self.owner.remove(&old);
                            self.retired.entry(sender).or_default().push(old);
                        }
                    }
                }
            }
            RoomOp::Seal => {
                let k = usize::from(input.u8()) % KEYS.len();
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
                let Ok(packet) = self.sealers[k].seal(header, &payload) else {
                    return;
                };
                let wire = fan_out_packet(KEYS[k].0, &packet);
                let result = self.rx.handle_packet(self.now, &wire);
                if let Ok(sender) = result {
                    // Only the sender holding exactly this key (its id and secret) opens it.
                    assert_eq!(
                        self.owner.get(&KEYS[k].0),
                        Some(&(sender, k)),
                        "a packet under key {k} opened as sender {sender}'s"
                    );
                }
                if self.sent.len() == 32 {
                    self.sent.remove(0);
                }
                self.sent.push((wire, result.ok()));
            }
            RoomOp::Replay => {
                if let Some((wire, accepted)) = self.pick(input.u8()) {
                    let again = self.rx.handle_packet(self.now, &wire).ok();
                    // A member may hand over a key whose owner left as its own, and then
                    // replay that owner's packets as its own; never the owner's again.
                    if accepted.is_some() {
                        assert!(
                            again.is_none() || again != accepted,
                            "a replayed fan-out packet was accepted"
                        );
                    }
                }
            }
            RoomOp::Tamper => {
                let (pick, at, xor) = (input.u8(), input.u16(), input.u8());
                if let Some((mut wire, _)) = self.pick(pick) {
                    let at = usize::from(at) % wire.len();
                    wire[at] ^= xor.max(1);
                    let tampered = self.rx.handle_packet(self.now, &wire);
                    assert!(tampered.is_err(), "a tampered fan-out packet was accepted");
                }
            }
            RoomOp::Raw => {
                let bytes = input.short_bytes();
                let _ = self.rx.handle_packet(self.now, bytes);
                if let Ok((id, packet)) = split_fan_out_packet(bytes) {
                    assert_eq!(fan_out_packet(id, packet), bytes);
                }
            }
            RoomOp::KeyMessage => {
                let bytes = input.short_bytes();
                if let Ok(k) = SenderKey::decode(bytes) {
                    assert_eq!(&k.encode()[..], bytes, "a key message does not round-trip");
                }
            }
            RoomOp::Remove => {
                let sender = input.u8() % SENDERS;
                self.rx.remove_sender(&sender);
                for id in self.held.remove(&sender).unwrap_or_default() {
                    self.owner.remove(&id);
                    self.retired.entry(sender).or_default().push(id);
                }
            }
            RoomOp::Advance => {
                self.now += Duration::from_millis(u64::from(input.u16()));
                self.rx.handle_timeout(self.now);
            }
            RoomOp::Report => {
                for sender in 0..SENDERS {
                    for track in 0..Track::COUNT {
                        let track = Track::new(track).expect("below Track::COUNT");
                        let _ = self.rx.stats(&sender, track, self.now);
                    }
                }
            }
        }
        while let Some((sender, frame)) = self.rx.poll_frame() {
            assert!(sender < SENDERS);
            assert!(frame.data.len() <= natcall_media::MAX_FRAME);
        }
        let unknown = self.rx.unknown_key_packets();
        assert!(unknown >= self.unknown, "the unknown-key count went down");
        self.unknown = unknown;
    }

    fn pick(&self, k: u8) -> Option<(Vec<u8>, Option<u8>)> {
        (!self.sent.is_empty()).then(|| self.sent[usize::from(k) % self.sent.len()].clone())
    }
}

/// The `room_receiver` target: a program of [`RoomOp`]s against one member's fan-out receiver.
///
/// Invariants: a packet opens only as the sender holding exactly the key that sealed it (id
/// and secret, among its three latest); a key id is never given to a second sender; a replayed
/// packet is never accepted as the same sender's again, a tampered one never at all; key
/// messages round-trip; the unknown-key count never goes down.
pub fn room_receiver(data: &[u8]) {
    let mut input = Input::new(data);
    let mut harness = Harness::new();
    while !input.is_empty() {
        let op = RoomOp::from_u8(input.u8());
        harness.run(op, &mut input);
    }
}
