//! A tiny deterministic PRNG (splitmix64) for transaction ids and tie-breakers.
//!
//! Transaction ids only need to be unpredictable to off-path attackers *together with*
//! MESSAGE-INTEGRITY, which already authenticates every response; seed from a real
//! random source in the I/O layer.

use stun_rs::TransactionId;

#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn transaction_id(&mut self) -> TransactionId {
        let mut bytes = [0u8; 12];
        bytes[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        bytes[8..].copy_from_slice(&self.next_u64().to_le_bytes()[..4]);
        TransactionId::from(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_ids_differ() {
        let (mut a, mut b) = (SplitMix64::new(42), SplitMix64::new(42));
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(a.transaction_id(), a.transaction_id());
    }
}
