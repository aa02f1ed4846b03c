//! Fuzz targets for natcall: every decoder that reads bytes from the network, and the sans-IO
//! cores those bytes drive, as plain functions of `&[u8]`.
//!
//! Each target decodes its input and, where a round trip exists, re-encodes what decoded and
//! checks it; it also checks the invariants its module names. A target never panics on any
//! input unless natcall has a bug: a panic (an `assert!` here, or a panic in the code under
//! test) is a finding.
//!
//! | target | what it feeds |
//! |---|---|
//! | `frame` | a TCP byte stream to [`natcall_proto::frame::FrameDecoder`] |
//! | `control_client` | a control body decoded as a `ServerMsg` |
//! | `control_server` | a control body decoded as a `ClientMsg`, registration checks |
//! | `relay_header` | a relay frame body to `RelayHeader::decode` |
//! | `stun_server` | a datagram to the rendezvous server's STUN responder |
//! | `stun_agent` | datagrams and time to a peer's ICE agent |
//! | `media_open` | a packet to the media opener |
//! | `media_receiver` | a program of sealed, replayed, tampered packets and time to the receiver |
//! | `media_feedback` | transport feedback datagrams, packets sent, budgets and time to a sender's rate controller |
//! | `room_receiver` | a program of room keys, fan-out packets under several senders' keys, replays, tampering and time to a member's fan-out receiver |
//!
//! The same functions run three ways:
//! 1. `crates/fuzz/fuzz/` (cargo-fuzz, nightly): each `fuzz_targets/<name>.rs` calls one;
//!    `crates/fuzz/run.sh` runs them all.
//! 2. `tests/replay.rs` (stable, in `cargo test`): every file of `corpus/<name>/` and
//!    `regressions/<name>/`.
//! 3. `cargo run -p natcall-fuzz --bin gen-corpus`: writes the seed corpora from natcall's
//!    own encoders ([`seeds`]).

use std::sync::OnceLock;
use std::time::Instant;

pub mod agent;
pub mod control;
pub mod feedback;
pub mod frame;
pub mod input;
pub mod media;
pub mod relay;
pub mod room;
pub mod seeds;
pub mod stun;

pub use agent::stun_agent;
pub use control::{control_client, control_server};
pub use feedback::media_feedback;
pub use frame::frame;
pub use media::{media_open, media_receiver};
pub use relay::relay_header;
pub use room::room_receiver;
pub use stun::stun_server;

/// A fuzz target.
pub type Target = fn(&[u8]);

/// Every target, by name (the names of `fuzz_targets/*.rs` and the corpus folders).
pub const TARGETS: [(&str, Target); 10] = [
    ("frame", frame),
    ("control_client", control_client),
    ("control_server", control_server),
    ("relay_header", relay_header),
    ("stun_server", stun_server),
    ("stun_agent", stun_agent),
    ("media_open", media_open),
    ("media_receiver", media_receiver),
    ("media_feedback", media_feedback),
    ("room_receiver", room_receiver),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The origin of the targets' virtual time: the sans-IO cores only use differences from it.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}
