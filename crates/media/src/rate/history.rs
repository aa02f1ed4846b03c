//! The packets a sender handed to the path, by transport-wide index: what the receiver's
//! feedback (which names packets by track and sequence number) is matched against.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::Track;

/// How long a packet stays matchable.
const KEEP: Duration = Duration::from_secs(5);

/// One packet sent.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sent {
    pub(super) track: Track,
    pub(super) sequence: u32,
    pub(super) at: Instant,
    /// Its size on the wire (with the path's overhead).
    pub(super) size: u32,
    /// The probe cluster it belongs to.
    pub(super) probe: Option<u32>,
}

/// Packets sent, by transport-wide index (bounded in count and age).
#[derive(Debug)]
pub(super) struct History {
    first: u64,
    packets: VecDeque<Sent>,
    index: HashMap<(Track, u32), u64>,
    limit: usize,
}

impl History {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            first: 0,
            packets: VecDeque::new(),
            index: HashMap::new(),
            limit,
        }
    }

    /// Records a packet; returns its transport-wide index.
    pub(super) fn push(&mut self, sent: Sent) -> u64 {
        let next = self.first + self.packets.len() as u64;
        self.index.insert((sent.track, sent.sequence), next);
        self.packets.push_back(sent);
        while self.packets.len() > self.limit
            || self
                .packets
                .front()
                .is_some_and(|p| sent.at.saturating_duration_since(p.at) > KEEP)
        {
            let Some(old) = self.packets.pop_front() else { break };
            if self.index.get(&(old.track, old.sequence)) == Some(&self.first) {
                self.index.remove(&(old.track, old.sequence));
            }
            self.first += 1;
        }
        next
    }

    /// The packet `sequence` of `track`, with its index, if still remembered.
    pub(super) fn get(&self, track: Track, sequence: u32) -> Option<(u64, Sent)> {
        let i = *self.index.get(&(track, sequence))?;
        Some((i, self.at(i)?))
    }

    /// The packet at index `i`, if still remembered.
    pub(super) fn at(&self, i: u64) -> Option<Sent> {
        self.packets
            .get(usize::try_from(i.checked_sub(self.first)?).ok()?)
            .copied()
    }

    /// Wire bytes of the packets with indices in `range` that are still remembered.
    pub(super) fn bytes(&self, range: std::ops::RangeInclusive<u64>) -> u64 {
        range.filter_map(|i| self.at(i)).map(|p| u64::from(p.size)).sum()
    }
}
