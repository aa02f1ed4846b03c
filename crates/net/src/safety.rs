//! [`SafetyNumber`]: 60 digits that two peers read to each other (in person, or on a channel
//! they already trust) to check that each holds the other's real key, in the spirit of
//! Signal's safety numbers. Both sides get the same digits; a different key on either side
//! gives different ones.
//!
//! Computation (version 1), also in `docs/security.md`:
//! 1. for each side, from its name (UTF-8) and its key (the 32-byte certificate fingerprint):
//!    `h = SHA-512("natcall-safety-number/1" ‖ u32be(len(name)) ‖ name ‖ key)`, then 5200
//!    times `h = SHA-512(h ‖ key)` (so trying keys for a look-alike number costs 5200 hashes
//!    each); the first 30 bytes of `h`, as six 5-byte big-endian numbers each taken mod
//!    100000, give that side's 30 digits;
//! 2. the two sides' 30-digit strings, sorted, then concatenated: 60 digits, shown as 12
//!    groups of 5.

use natcall_proto::control::Fingerprint;
use ring::digest::{Context, SHA512};

/// The domain separator and version of the computation.
const LABEL: &[u8] = b"natcall-safety-number/1";
/// SHA-512 rounds per side.
const ITERATIONS: usize = 5200;
/// Digits of one side.
const SIDE_DIGITS: usize = 30;

/// The safety number of two peers, each a name and a key.
#[derive(Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    /// 60 ASCII digits.
    digits: String,
}

impl std::fmt::Debug for SafetyNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SafetyNumber({self})")
    }
}

impl SafetyNumber {
    /// The number of `a` and `b`: the same whichever side is `a`.
    pub fn new(a: (&str, Fingerprint), b: (&str, Fingerprint)) -> Self {
        let mut sides = [side(a.0, &a.1), side(b.0, &b.1)];
        sides.sort();
        Self { digits: sides.concat() }
    }

    /// The 60 digits, without spaces.
    pub fn digits(&self) -> &str {
        &self.digits
    }

    /// The 12 groups of 5 digits.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        // The digits are ASCII: every 5-byte chunk is a whole string.
        self.digits
            .as_bytes()
            .chunks(5)
            .filter_map(|g| std::str::from_utf8(g).ok())
    }
}

impl std::fmt::Display for SafetyNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, g) in self.groups().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(g)?;
        }
        Ok(())
    }
}

/// One side's 30 digits.
fn side(name: &str, key: &Fingerprint) -> String {
    let mut ctx = Context::new(&SHA512);
    ctx.update(LABEL);
    ctx.update(&(name.len() as u32).to_be_bytes());
    ctx.update(name.as_bytes());
    ctx.update(&key.0);
    let mut h = ctx.finish();
    for _ in 0..ITERATIONS {
        let mut ctx = Context::new(&SHA512);
        ctx.update(h.as_ref());
        ctx.update(&key.0);
        h = ctx.finish();
    }
    let mut out = String::with_capacity(SIDE_DIGITS);
    for chunk in h.as_ref()[..SIDE_DIGITS].chunks_exact(5) {
        let n = chunk.iter().fold(0u64, |n, b| n << 8 | u64::from(*b));
        out.push_str(&format!("{:05}", n % 100_000));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Fingerprint {
        Fingerprint([b; 32])
    }

    #[test]
    fn both_sides_get_the_same_twelve_groups_of_five_digits() {
        let alice = SafetyNumber::new(("alice", key(1)), ("bob", key(2)));
        let bob = SafetyNumber::new(("bob", key(2)), ("alice", key(1)));
        assert_eq!(alice, bob);
        assert_eq!(alice.digits().len(), 60);
        assert!(alice.digits().bytes().all(|b| b.is_ascii_digit()));
        let groups: Vec<&str> = alice.groups().collect();
        assert_eq!(groups.len(), 12);
        assert!(groups.iter().all(|g| g.len() == 5));
        assert_eq!(alice.to_string(), groups.join(" "));
    }

    #[test]
    fn another_key_or_name_on_either_side_gives_another_number() {
        let n = SafetyNumber::new(("alice", key(1)), ("bob", key(2)));
        assert_ne!(n, SafetyNumber::new(("alice", key(1)), ("bob", key(3))));
        assert_ne!(n, SafetyNumber::new(("alice", key(4)), ("bob", key(2))));
        assert_ne!(n, SafetyNumber::new(("alice", key(1)), ("carol", key(2))));
        // The halves are per side: changing bob's key keeps alice's 30 digits.
        let other = SafetyNumber::new(("alice", key(1)), ("bob", key(3)));
        let alice_half = side("alice", &key(1));
        assert!(n.digits().contains(&alice_half) && other.digits().contains(&alice_half));
    }

    #[test]
    fn the_computation_is_stable() {
        // Computed by an independent implementation of the steps in the module docs (Python's
        // hashlib), so the digits are the documented ones and a change is noticed: peers on two
        // natcall versions must agree.
        let n = SafetyNumber::new(("alice", key(1)), ("bob", key(2)));
        assert_eq!(n.digits(), PINNED, "{n}");
    }

    const PINNED: &str = "642802061171682030696875813467891694592699713721734589967916";
}
