//! The receiver's feedback to the sender, carried by the caller over the call's control stream.
//!
//! Compact encoding (14 bytes, big-endian; decoders ignore trailing bytes of later versions):
//!
//! ```text
//! +-----+------+--------------+-------------------+------------------+
//! | 1   | loss | jitter µs u32| delay trend µs i32| received bps u32 |
//! +-----+------+--------------+-------------------+------------------+
//! ```
//!
//! `loss` is the fraction lost since the previous report in 1/256 units, as in RTCP.

use serde::{Deserialize, Serialize};

use crate::Error;

/// Bytes of an encoded [`ReceiverReport`].
pub const REPORT_LEN: usize = 14;
const REPORT_VERSION: u8 = 1;

/// How the path looked to the receiver since its previous report (all tracks together).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ReceiverReport {
    /// Fraction of packets lost since the previous report, 0.0..=1.0.
    pub loss_fraction: f64,
    /// Interarrival jitter in ms (the largest of the tracks).
    pub jitter_ms: f64,
    /// How much the relative one-way delay grew since the previous report, in ms; positive
    /// means queues are building up.
    pub delay_trend_ms: f64,
    /// Bitrate received over the last second, in bit/s.
    pub received_bps: u64,
}

impl ReceiverReport {
    /// The compact wire form.
    pub fn encode(&self) -> [u8; REPORT_LEN] {
        let mut out = [0u8; REPORT_LEN];
        out[0] = REPORT_VERSION;
        out[1] = (self.loss_fraction.clamp(0.0, 1.0) * 256.0).min(255.0) as u8;
        let jitter_us = (self.jitter_ms * 1000.0).round().clamp(0.0, u32::MAX as f64) as u32;
        out[2..6].copy_from_slice(&jitter_us.to_be_bytes());
        let trend_us = (self.delay_trend_ms * 1000.0)
            .round()
            .clamp(i32::MIN as f64, i32::MAX as f64) as i32;
        out[6..10].copy_from_slice(&trend_us.to_be_bytes());
        let bps = u32::try_from(self.received_bps).unwrap_or(u32::MAX);
        out[10..14].copy_from_slice(&bps.to_be_bytes());
        out
    }

    /// Reads the compact wire form; never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let Some(b) = bytes.first_chunk::<REPORT_LEN>() else {
            return Err(Error::Malformed("receiver report shorter than 14 bytes"));
        };
        if b[0] != REPORT_VERSION {
            return Err(Error::Malformed("unknown receiver report version"));
        }
        Ok(Self {
            loss_fraction: f64::from(b[1]) / 256.0,
            jitter_ms: f64::from(u32::from_be_bytes([b[2], b[3], b[4], b[5]])) / 1000.0,
            delay_trend_ms: f64::from(i32::from_be_bytes([b[6], b[7], b[8], b[9]])) / 1000.0,
            received_bps: u64::from(u32::from_be_bytes([b[10], b[11], b[12], b[13]])),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn report_round_trips_to_wire_precision() {
        let r = ReceiverReport {
            loss_fraction: 0.05,
            jitter_ms: 12.345,
            delay_trend_ms: -3.5,
            received_bps: 1_000_000,
        };
        let back = ReceiverReport::decode(&r.encode()).unwrap();
        assert!((back.loss_fraction - 0.05).abs() < 1.0 / 256.0);
        assert_eq!(back.jitter_ms, 12.345);
        assert_eq!(back.delay_trend_ms, -3.5);
        assert_eq!(back.received_bps, 1_000_000);
    }

    proptest! {
        #[test]
        fn encoding_is_stable(loss in 0.0f64..=1.0, jitter in 0.0f64..1e6, trend in -1e6f64..1e6, bps: u32) {
            let r = ReceiverReport { loss_fraction: loss, jitter_ms: jitter, delay_trend_ms: trend,
                                     received_bps: u64::from(bps) };
            let once = ReceiverReport::decode(&r.encode()).unwrap();
            prop_assert_eq!(ReceiverReport::decode(&once.encode()).unwrap(), once);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = ReceiverReport::decode(&bytes);
        }
    }
}
