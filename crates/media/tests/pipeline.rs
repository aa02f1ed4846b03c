//! Sender → (lossy, reordering, duplicating network) → receiver, through the public API.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use natcall_media::{
    Frame, Header, MAX_FRAME, MAX_PACKET, Receiver, ReceiverConfig, Role, Sender, SenderConfig, Track, derive_keys,
};
use proptest::prelude::*;

const SECRET: [u8; 32] = [0x5a; 32];

#[allow(clippy::disallowed_methods)] // the one clock read: the origin of virtual time
fn origin() -> Instant {
    Instant::now()
}

fn pair(rate_bps: u64) -> (Sender, Receiver, Instant) {
    let t0 = origin();
    let (sealer, _) = derive_keys(&SECRET, Role::Callee);
    let (_, opener) = derive_keys(&SECRET, Role::Caller);
    let mut config = SenderConfig::default();
    config.rate_bps = rate_bps;
    config.start_rate_bps = rate_bps;
    (
        Sender::new(config, sealer, t0),
        Receiver::new(ReceiverConfig::default(), opener, t0),
        t0,
    )
}

/// splitmix64: the network's seeded randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() as f64 / u64::MAX as f64) < p
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn data(track: Track, index: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i + index * 7 + usize::from(track.number()) * 13) as u8)
        .collect()
}

#[test]
fn a_maximal_frame_round_trips_in_512_byte_packets() {
    let (mut sender, mut receiver, t0) = pair(u64::MAX / 16);
    let frame = data(Track::VIDEO, 1, MAX_FRAME);
    sender.handle_frame(Track::VIDEO, Frame::key(0, frame.clone())).unwrap();
    let mut packets = 0;
    while let Some(t) = sender.poll_transmit(t0) {
        assert!(t.contents.len() <= MAX_PACKET);
        receiver.handle_packet(t0, &t.contents).unwrap();
        packets += 1;
    }
    assert_eq!(packets, usize::from(natcall_media::MAX_FRAGMENTS));
    assert_eq!(packets, 35_099);
    receiver.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(receiver.poll_frame().unwrap().data, frame);
    assert_eq!(receiver.buffered_bytes(), 0);
}

/// Sends `sizes` frames per track every 20 ms over a network with loss, jitter (reordering) and
/// duplication; checks what the receiver delivers.
fn run_network(sizes: &[(bool, usize)], loss: f64, duplicate: f64, jitter_ms: u64, seed: u64) {
    let (mut sender, mut receiver, t0) = pair(100_000_000);
    let mut rng = Rng(seed);
    // (arrival, order, packet)
    let mut network: BTreeMap<(Instant, u64), Vec<u8>> = BTreeMap::new();
    // per (track, frame id): fragments sent, fragments that arrived
    let mut fragments: BTreeMap<(Track, u32), (u16, BTreeSet<u16>)> = BTreeMap::new();
    let mut sent: BTreeMap<(Track, u32), Vec<u8>> = BTreeMap::new();
    let mut order = 0;
    let mut next_id: BTreeMap<Track, u32> = BTreeMap::new();
    for (i, &(video, len)) in sizes.iter().enumerate() {
        let track = if video { Track::VIDEO } else { Track::AUDIO };
        let now = t0 + Duration::from_millis(20 * i as u64);
        let id = next_id.entry(track).or_insert(0);
        sent.insert((track, *id), data(track, i, len));
        *id += 1;
        let frame = Frame::key((20 * i) as u32, data(track, i, len));
        sender.handle_frame(track, frame).unwrap();
        while let Some(t) = sender.poll_transmit(now) {
            assert!(t.contents.len() <= MAX_PACKET);
            let (h, _) = Header::decode(&t.contents).unwrap();
            let entry = fragments
                .entry((h.track, h.frame_id))
                .or_insert((h.fragment_count, BTreeSet::new()));
            let copies = if rng.chance(duplicate) { 2 } else { 1 };
            for _ in 0..copies {
                if rng.chance(loss) {
                    continue;
                }
                entry.1.insert(h.fragment_index);
                let at = now + Duration::from_millis(20 + rng.below(jitter_ms + 1));
                order += 1;
                network.insert((at, order), t.contents.clone());
            }
        }
    }
    let mut delivered = Vec::new();
    for ((at, _), packet) in network {
        receiver.handle_timeout(at);
        delivered.extend(std::iter::from_fn(|| receiver.poll_frame()));
        let _ = receiver.handle_packet(at, &packet);
        delivered.extend(std::iter::from_fn(|| receiver.poll_frame()));
    }
    receiver.handle_timeout(t0 + Duration::from_secs(3600));
    delivered.extend(std::iter::from_fn(|| receiver.poll_frame()));

    let mut last: BTreeMap<Track, u32> = BTreeMap::new();
    for f in &delivered {
        if let Some(prev) = last.insert(f.track, f.frame_id) {
            assert!(f.frame_id > prev, "{:?} frame {} after {prev}", f.track, f.frame_id);
        }
        assert_eq!(
            Some(&f.data),
            sent.get(&(f.track, f.frame_id)),
            "frame {} intact",
            f.frame_id
        );
    }
    let got: BTreeSet<(Track, u32)> = delivered.iter().map(|f| (f.track, f.frame_id)).collect();
    assert_eq!(got.len(), delivered.len(), "every frame at most once");
    let arrived: BTreeSet<(Track, u32)> = fragments
        .iter()
        .filter(|(_, (count, seen))| usize::from(*count) == seen.len())
        .map(|(key, _)| *key)
        .collect();
    assert!(got.is_subset(&arrived));
    for track in [Track::AUDIO, Track::VIDEO] {
        let Some(stats) = receiver.stats(track, t0) else {
            continue;
        };
        let want: BTreeSet<_> = arrived.iter().filter(|(t, _)| *t == track).collect();
        let have: BTreeSet<_> = got.iter().filter(|(t, _)| *t == track).collect();
        assert_eq!(stats.frames_complete, have.len() as u64);
        if stats.packets_too_old == 0 {
            // jitter below the target delay: every frame whose packets all arrived plays
            assert_eq!(have, want, "{track:?}: {stats:?}");
        }
    }
    assert_eq!(receiver.buffered_bytes(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn frames_round_trip(sizes in proptest::collection::vec(
        (any::<bool>(), prop_oneof![0usize..600, 0usize..5_000, 100_000usize..300_000]), 1..12)) {
        run_network(&sizes, 0.0, 0.0, 0, 1);
    }

    #[test]
    fn lossy_reordering_duplicating_network_delivers_complete_frames_once_in_order(
        sizes in proptest::collection::vec((any::<bool>(), 0usize..3_000), 1..60),
        loss in 0.0f64..0.3,
        duplicate in 0.0f64..0.3,
        jitter_ms in 0u64..50,
        seed: u64,
    ) {
        run_network(&sizes, loss, duplicate, jitter_ms, seed);
    }

    #[test]
    fn garbage_never_panics_and_never_plays(
        len in 0usize..3_000,
        cuts in proptest::collection::vec(0usize..600, 1..8),
        flips in proptest::collection::vec(0usize..4_096, 1..8),
        junk in proptest::collection::vec((16u8..64, proptest::collection::vec(any::<u8>(), 0..600)), 0..8),
    ) {
        let (mut sender, mut receiver, t0) = pair(100_000_000);
        sender.handle_frame(Track::VIDEO, Frame::key(0, vec![0xab; len])).unwrap();
        let packets: Vec<Vec<u8>> = std::iter::from_fn(|| sender.poll_transmit(t0)).map(|t| t.contents).collect();
        let mut fed = 0;
        for (i, cut) in cuts.iter().enumerate() {
            let p = &packets[i % packets.len()];
            if *cut < p.len() {
                prop_assert!(receiver.handle_packet(t0, &p[..*cut]).is_err());
                fed += 1;
            }
        }
        for (i, bit) in flips.iter().enumerate() {
            let mut p = packets[i % packets.len()].clone();
            let bit = bit % (p.len() * 8);
            p[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(receiver.handle_packet(t0, &p).is_err());
            fed += 1;
        }
        for (first, mut bytes) in junk {
            bytes.insert(0, first);
            prop_assert!(receiver.handle_packet(t0, &bytes).is_err());
            fed += 1;
        }
        receiver.handle_timeout(t0 + Duration::from_secs(60));
        prop_assert!(receiver.poll_frame().is_none());
        let s = receiver.stats(Track::VIDEO, t0).unwrap_or_default();
        let counted = receiver.malformed_packets() + receiver.tracks()
            .filter_map(|t| receiver.stats(t, t0))
            .map(|s| s.packets_auth_failed + s.packets_duplicated + s.packets_too_old)
            .sum::<u64>();
        prop_assert_eq!(counted, fed);
        prop_assert_eq!(s.packets_received, 0);
    }
}
