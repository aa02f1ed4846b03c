//! Room media that the server fans out: each member seals what it sends with its own **sender
//! key**, and every other member opens it with that key, which it got over their pairwise
//! authenticated session (see `docs/rooms.md`). The server forwards packets it cannot read.
//!
//! Wire: a fan-out packet is `key id (u32 BE) ‖ media packet`, the media packet exactly as a
//! 1:1 call's ([`crate::packet`], ≤ 512 bytes) sealed with the key's ChaCha20-Poly1305 key
//! (HKDF of the key's secret, label `"natcall room sender"`). The key id is the sender's choice
//! (random); receivers find the sender and the key by it. A key message, sent over a pairwise
//! session, is `id (u32 BE) ‖ secret (32 bytes)` ([`SenderKey::encode`]).
//!
//! Rekeying: when a member leaves, each remaining sender makes a new key, hands it to the
//! members still in the room, then seals with it ([`crate::Sender::rekey_room`]). Sequence
//! numbers go on across a sender's keys, so a receiver keeps one [`Receiver`] (jitter buffer,
//! replay window, statistics) per sender and opens each packet with the key its id names; it
//! keeps a sender's previous key for the packets already on their way.
//!
//! Keys come from the caller (this crate has no randomness): 4 random bytes of id and 32 of
//! secret.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Instant;

use crate::crypto::{PacketOpener, PacketSealer};
use crate::receiver::{ReceivedFrame, Receiver, ReceiverConfig};
use crate::stats::Stats;
use crate::{Error, Track};

/// Bytes of the key id in front of a fan-out packet.
pub const KEY_ID_LEN: usize = 4;
/// Bytes of a key message.
pub const KEY_MESSAGE_LEN: usize = KEY_ID_LEN + 32;
/// A sender's keys a receiver keeps: the current one and the two before (a second rekey may
/// start before the first is sealing: two members leaving close together).
const KEYS_KEPT: usize = 3;

/// A room sender's key: its id (on every packet) and its secret (only in key messages).
#[derive(Clone, PartialEq, Eq)]
pub struct SenderKey {
    /// The id receivers find the key by.
    pub id: u32,
    secret: [u8; 32],
}

impl std::fmt::Debug for SenderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SenderKey {
    /// A key from random bytes the caller drew.
    pub fn new(id: u32, secret: [u8; 32]) -> Self {
        Self { id, secret }
    }

    /// The key message: `id ‖ secret`.
    pub fn encode(&self) -> [u8; KEY_MESSAGE_LEN] {
        let mut out = [0u8; KEY_MESSAGE_LEN];
        out[..KEY_ID_LEN].copy_from_slice(&self.id.to_be_bytes());
        out[KEY_ID_LEN..].copy_from_slice(&self.secret);
        out
    }

    /// Reads a key message.
    pub fn decode(message: &[u8]) -> Result<Self, Error> {
        if message.len() != KEY_MESSAGE_LEN {
            return Err(Error::Malformed("a room key message is 36 bytes"));
        }
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&message[..KEY_ID_LEN]);
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&message[KEY_ID_LEN..]);
        Ok(Self::new(u32::from_be_bytes(id), secret))
    }

    /// A sealer for what this sender sends with the key.
    pub fn sealer(&self) -> PacketSealer {
        PacketSealer::for_room(&self.secret)
    }

    /// The secret, for [`crate::Sender::rekey_room`].
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    fn opener(&self) -> PacketOpener {
        PacketOpener::for_room(&self.secret)
    }
}

/// A fan-out packet: `key id ‖ packet`.
pub fn fan_out_packet(key_id: u32, packet: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(KEY_ID_LEN + packet.len());
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(packet);
    out
}

/// The key id and the media packet of a fan-out packet.
pub fn split_fan_out_packet(data: &[u8]) -> Result<(u32, &[u8]), Error> {
    if data.len() <= KEY_ID_LEN {
        return Err(Error::Malformed("fan-out packet shorter than its key id"));
    }
    let (id, packet) = data.split_at(KEY_ID_LEN);
    Ok((u32::from_be_bytes([id[0], id[1], id[2], id[3]]), packet))
}

/// One sender as a receiver knows it.
#[derive(Debug)]
struct FromSender {
    receiver: Receiver,
    /// Its key ids, oldest first, at most [`KEYS_KEPT`].
    keys: Vec<u32>,
    /// Key ids it no longer uses (older than its [`KEYS_KEPT`] latest, or held when it left),
    /// at most [`RETIRED_KEPT`]: never taken again, so what it sent under them cannot be
    /// replayed when it comes back (its packets then start afresh).
    retired: VecDeque<u32>,
    /// It left the room (and may come back, with a new process: sequence numbers from 0).
    left: bool,
}

/// Key ids a receiver remembers per sender as retired (4 bytes each).
pub const RETIRED_KEPT: usize = 4096;

/// Every other member's fan-out media, as one member receives it: a [`Receiver`] per sender
/// (named by `M`, e.g. its name) and the senders' keys.
#[derive(Debug)]
pub struct RoomReceiver<M> {
    config: ReceiverConfig,
    senders: HashMap<M, FromSender>,
    keys: HashMap<u32, (M, PacketOpener)>,
    unknown_key: u64,
}

impl<M: Clone + Eq + Hash + std::fmt::Debug> RoomReceiver<M> {
    /// A receiver whose per-sender receivers take `config`.
    pub fn new(config: ReceiverConfig) -> Self {
        Self {
            config,
            senders: HashMap::new(),
            keys: HashMap::new(),
            unknown_key: 0,
        }
    }

    /// `sender` now seals with `key`: its packets under it open from now on; its key before
    /// that stays for packets on their way, older ones are forgotten. A key id another sender
    /// already uses is refused (ids are random: a clash is a sender lying).
    pub fn add_key(&mut self, now: Instant, sender: M, key: &SenderKey) -> Result<(), Error> {
        match self.keys.get(&key.id) {
            Some((owner, _)) if *owner != sender => {
                return Err(Error::Malformed("room key id already used by another sender"));
            }
            Some(_) => return Ok(()), // the same key again
            None => {}
        }
        let config = &self.config;
        let from = self.senders.entry(sender.clone()).or_insert_with(|| FromSender {
            receiver: Receiver::new(config.clone(), key.opener(), now),
            keys: Vec::new(),
            retired: VecDeque::new(),
            left: false,
        });
        if from.retired.contains(&key.id) {
            return Err(Error::Malformed(
                "a room key its sender no longer uses, handed over again",
            ));
        }
        if from.left {
            // Back in the room (a new process, perhaps, counting from 0): a fresh receiver.
            // What it sent before is under retired keys, which nothing opens any more.
            from.receiver = Receiver::new(config.clone(), key.opener(), now);
            from.left = false;
        }

        from.keys.push(key.id);
        while from.keys.len() > KEYS_KEPT {
            let old = from.keys.remove(0);
            self.keys.remove(&old);
            from.retired.push_back(old);
        }
        while from.retired.len() > RETIRED_KEPT {
            from.retired.pop_front();
        }
        self.keys.insert(key.id, (sender, key.opener()));
        Ok(())
    }

    /// `sender` left: its keys are retired (nothing it sent or sends under them opens any more,
    /// and they are refused if handed over again). When it comes back with a new key its
    /// packets start afresh (a new process counts from 0).
    pub fn remove_sender(&mut self, sender: &M) {
        if let Some(from) = self.senders.get_mut(sender) {
            for id in from.keys.drain(..) {
                self.keys.remove(&id);
                from.retired.push_back(id);
            }
            while from.retired.len() > RETIRED_KEPT {
                from.retired.pop_front();
            }
            from.left = true;
        }
    }

    /// Feeds one fan-out packet; returns who sent it. A packet under a key this member does
    /// not have (a sender it has no key from yet, or one that left) is dropped and counted.
    pub fn handle_packet(&mut self, now: Instant, data: &[u8]) -> Result<M, Error> {
        let (id, packet) = split_fan_out_packet(data)?;
        let Some((sender, opener)) = self.keys.get(&id) else {
            self.unknown_key += 1;
            return Err(Error::AuthenticationFailed);
        };
        let from = self
            .senders
            .get_mut(sender)
            .ok_or(Error::Malformed("room key of no sender"))?;
        from.receiver.handle_packet_opened_by(now, packet, opener)?;
        Ok(sender.clone())
    }

    /// Advances time for every sender's jitter buffer.
    pub fn handle_timeout(&mut self, now: Instant) {
        for from in self.senders.values_mut() {
            from.receiver.handle_timeout(now);
        }
    }

    /// The next frame played out, and whose it is.
    pub fn poll_frame(&mut self) -> Option<(M, ReceivedFrame)> {
        self.senders
            .iter_mut()
            .find_map(|(m, from)| from.receiver.poll_frame().map(|f| (m.clone(), f)))
    }

    /// When [`Self::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.senders.values().filter_map(|f| f.receiver.poll_timeout()).min()
    }

    /// What arrived from `sender` on `track`.
    pub fn stats(&self, sender: &M, track: Track, now: Instant) -> Option<Stats> {
        self.senders.get(sender)?.receiver.stats(track, now)
    }

    /// The senders heard of (with a key), in no order.
    pub fn senders(&self) -> impl Iterator<Item = &M> {
        self.senders.keys()
    }

    /// Packets dropped because no key of this member's has their key id.
    pub fn unknown_key_packets(&self) -> u64 {
        self.unknown_key
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Frame, Sender, SenderConfig};

    fn key(id: u32, byte: u8) -> SenderKey {
        SenderKey::new(id, [byte; 32])
    }

    /// Sends `frames` audio frames from `sender` (sealing with its current key) to `rx` as
    /// `who`'s; returns how many opened.
    fn send_audio(
        sender: &mut Sender,
        key_id: u32,
        rx: &mut RoomReceiver<&'static str>,
        now: &mut Instant,
        frames: u32,
    ) -> usize {
        let mut opened = 0;
        for i in 0..frames {
            sender
                .handle_frame(Track::AUDIO, Frame::new(i * 20, vec![7; 80]))
                .expect("queued");
            while let Some(t) = sender.poll_transmit(*now) {
                if rx.handle_packet(*now, &fan_out_packet(key_id, &t.contents)).is_ok() {
                    opened += 1;
                }
            }
            *now += Duration::from_millis(20);
            rx.handle_timeout(*now);
        }
        opened
    }

    #[test]
    fn a_key_message_round_trips_and_hides_its_secret_from_debug() {
        let k = key(0xdead_beef, 171);
        assert_eq!(SenderKey::decode(&k.encode()).expect("decodes"), k);
        assert!(SenderKey::decode(&k.encode()[..35]).is_err());
        assert!(!format!("{k:?}").contains("171"), "{k:?}");
    }

    #[test]
    fn packets_open_under_the_senders_key_and_after_a_rekey_only_under_the_kept_ones() {
        let start = crate::test_origin();
        let mut now = start;
        let (k1, k2, k3) = (key(1, 1), key(2, 2), key(3, 3));
        let mut alice = Sender::new(SenderConfig::default(), k1.sealer(), now);
        let mut bob = RoomReceiver::new(ReceiverConfig::default());
        bob.add_key(now, "alice", &k1).expect("key");
        assert_eq!(send_audio(&mut alice, k1.id, &mut bob, &mut now, 10), 10);
        // Alice rekeys; bob has the new key: her packets go on opening, in one receiver.
        alice.rekey_room(k2.secret());
        bob.add_key(now, "alice", &k2).expect("key");
        assert_eq!(send_audio(&mut alice, k2.id, &mut bob, &mut now, 10), 10);
        let stats = bob.stats(&"alice", Track::AUDIO, now).expect("stats");
        assert_eq!((stats.packets_received, stats.packets_lost), (20, 0));
        // A packet sealed with the new key but labelled with the old id does not open.
        alice
            .handle_frame(Track::AUDIO, Frame::new(999, vec![1; 10]))
            .expect("queued");
        let t = alice.poll_transmit(now).expect("packet");
        assert!(bob.handle_packet(now, &fan_out_packet(k1.id, &t.contents)).is_err());
        // After a fourth key, the first is forgotten (three are kept).
        bob.add_key(now, "alice", &k3).expect("key");
        bob.add_key(now, "alice", &key(4, 4)).expect("key");
        let mut old = Sender::new(SenderConfig::default(), k1.sealer(), now);
        assert_eq!(send_audio(&mut old, k1.id, &mut bob, &mut now, 3), 0);
        assert!(bob.unknown_key_packets() >= 3);
    }

    #[test]
    fn a_member_without_the_new_key_cannot_open_what_follows() {
        let start = crate::test_origin();
        let mut now = start;
        let (k1, k2) = (key(10, 1), key(11, 2));
        let mut alice = Sender::new(SenderConfig::default(), k1.sealer(), now);
        let mut carol = RoomReceiver::new(ReceiverConfig::default());
        carol.add_key(now, "alice", &k1).expect("key");
        assert_eq!(send_audio(&mut alice, k1.id, &mut carol, &mut now, 5), 5);
        // Carol left; alice rekeyed and gave the new key only to those still in the room.
        alice.rekey_room(k2.secret());
        assert_eq!(send_audio(&mut alice, k2.id, &mut carol, &mut now, 5), 0);
        // Even labelled with the id carol knows, the new packets do not open with the old key.
        assert_eq!(send_audio(&mut alice, k1.id, &mut carol, &mut now, 5), 0);
        let stats = carol.stats(&"alice", Track::AUDIO, now).expect("stats");
        assert!(stats.packets_auth_failed >= 5, "{stats:?}");
    }

    #[test]
    fn a_member_back_with_a_new_process_is_heard_at_once_and_its_old_packets_stay_dead() {
        let start = crate::test_origin();
        let mut now = start;
        let (k1, k2) = (key(20, 1), key(21, 2));
        let mut bob = RoomReceiver::new(ReceiverConfig::default());
        bob.add_key(now, "alice", &k1).expect("key");
        // Alice's first process sends a while; bob keeps copies of its packets.
        let mut first = Sender::new(SenderConfig::default(), k1.sealer(), now);
        let mut old_packets = Vec::new();
        for i in 0..200u32 {
            first
                .handle_frame(Track::AUDIO, Frame::new(i * 20, vec![7; 40]))
                .expect("queued");
            while let Some(t) = first.poll_transmit(now) {
                let p = fan_out_packet(k1.id, &t.contents);
                bob.handle_packet(now, &p).expect("opens");
                old_packets.push(p);
            }
            now += Duration::from_millis(20);
        }
        // Alice's process dies; she comes back with a new one, a new key and sequence
        // numbers from 0: heard at once, not refused as too old.
        bob.remove_sender(&"alice");
        bob.add_key(now, "alice", &k2).expect("the new key");
        let mut second = Sender::new(SenderConfig::default(), k2.sealer(), now);
        assert_eq!(send_audio(&mut second, k2.id, &mut bob, &mut now, 5), 5);
        // What the first process sent does not open again, and its key is not taken back.
        for p in &old_packets[..20] {
            assert!(bob.handle_packet(now, p).is_err());
        }
        assert!(bob.add_key(now, "alice", &k1).is_err(), "a retired key is refused");
        for p in &old_packets[..20] {
            assert!(bob.handle_packet(now, p).is_err());
        }
    }

    #[test]
    fn a_key_id_taken_by_another_sender_is_refused_and_a_removed_sender_is_not_heard() {
        let now = crate::test_origin();
        let mut rx = RoomReceiver::new(ReceiverConfig::default());
        rx.add_key(now, "alice", &key(5, 1)).expect("key");
        assert!(rx.add_key(now, "mallory", &key(5, 2)).is_err());
        let mut alice = Sender::new(SenderConfig::default(), key(5, 1).sealer(), now);
        alice
            .handle_frame(Track::AUDIO, Frame::new(0, vec![1; 10]))
            .expect("queued");
        let t = alice.poll_transmit(now).expect("packet");
        rx.remove_sender(&"alice");
        assert!(rx.handle_packet(now, &fan_out_packet(5, &t.contents)).is_err());
        assert!(rx.handle_packet(now, &[0, 0, 0]).is_err(), "too short");
    }
}
