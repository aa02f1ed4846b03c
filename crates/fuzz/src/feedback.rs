//! `media_feedback`: transport feedback as the peer's QUIC datagrams hand it over, decoded and
//! fed to a sender's rate controller along with packets sent, budgets and time.
//!
//! The feedback decoder reads bytes from the network (the peer, or anyone on the path before
//! QUIC authenticates them: never, but the decoder must not care), and the controller's state
//! is steered by what it decodes: a hostile peer can send any counts and times it likes.

use std::time::Duration;

use natcall_media::{Feedback, MAX_FEEDBACK_LEN, RateConfig, RateController, Track};

use crate::epoch;
use crate::input::Input;

/// `media_feedback` operations (the op byte modulo their count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FeedbackOp {
    /// `track, n, size: u16`: `n` packets of `track` (sequence numbers continue) sent now.
    Send = 0,
    /// `len: u16, bytes`: a datagram from the peer, decoded and (if it decodes) fed.
    Datagram,
    /// `ms: u16`: advance the clock and run the controller's timer.
    Advance,
    /// `bps: u32`: the relay's budget.
    Budget,
    /// `bps: u32`: the application's ceiling.
    Max,
}

impl FeedbackOp {
    const ALL: [FeedbackOp; 5] = [
        FeedbackOp::Send,
        FeedbackOp::Datagram,
        FeedbackOp::Advance,
        FeedbackOp::Budget,
        FeedbackOp::Max,
    ];

    fn from_u8(b: u8) -> Self {
        Self::ALL[usize::from(b) % Self::ALL.len()]
    }
}

/// The `media_feedback` target: a program of [`FeedbackOp`]s against one rate controller.
///
/// Invariants: a datagram that decodes re-encodes within [`MAX_FEEDBACK_LEN`] bytes, and its
/// encoding is stable (decode ∘ encode is the identity on what decoded once); the controller's
/// target is always within its configured minimum and ceiling, and its reported loss is a
/// fraction.
pub fn media_feedback(data: &[u8]) {
    let mut input = Input::new(data);
    let config = RateConfig::default();
    let (min, mut max) = (config.min_bps, config.max_bps);
    let mut now = epoch();
    let mut c = RateController::new(config, now);
    let mut next = [0u32; 3];
    while !input.is_empty() {
        match FeedbackOp::from_u8(input.u8()) {
            FeedbackOp::Send => {
                let t = input.u8() % 3;
                let track = Track::new(t).expect("tracks 0..3 exist");
                let (n, size) = (input.u8(), usize::from(input.u16()) % 513);
                for _ in 0..n {
                    c.on_sent(now, track, next[usize::from(t)], size, None);
                    next[usize::from(t)] = next[usize::from(t)].wrapping_add(1);
                }
            }
            FeedbackOp::Datagram => {
                let bytes = input.long_bytes();
                if let Ok(f) = Feedback::decode(bytes) {
                    let wire = f.encode();
                    assert!(wire.len() <= MAX_FEEDBACK_LEN, "{} bytes", wire.len());
                    let once = Feedback::decode(&wire).expect("our own encoding decodes");
                    assert_eq!(
                        Feedback::decode(&once.encode()).expect("decodes"),
                        once,
                        "feedback encoding is not stable"
                    );
                    c.handle_feedback(now, &f);
                }
            }
            FeedbackOp::Advance => {
                now += Duration::from_millis(u64::from(input.u16()));
                c.handle_timeout(now);
            }
            FeedbackOp::Budget => c.handle_budget(now, u64::from(input.u32())),
            FeedbackOp::Max => {
                max = u64::from(input.u32()).max(1);
                c.set_max(max);
            }
        }
        let s = c.state();
        assert!(
            s.target_bps >= min.min(max) && s.target_bps <= max,
            "target {} outside {min}..={max}",
            s.target_bps
        );
        assert!((0.0..=1.0).contains(&s.loss), "loss {}", s.loss);
    }
}
