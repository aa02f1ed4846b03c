//! Two rendezvous servers on two public hosts of the lab, one Redis, peers behind NATs homed on
//! different servers: the call crosses servers and ends on the path the two NATs allow (direct
//! by punching, or the relay), or on the relay when asked, with chat both ways.
//!
//! Needs root, `nft`, `ip`, `redis-server` and the workspace binaries (`tests/run-all.sh`
//! installs and builds them).

use natcall_lab::{Binaries, Kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_between_peers_homed_on_two_servers_take_the_path_their_nats_allow() {
    if let Err(e) = natcall_lab::preflight() {
        panic!("{e}");
    }
    let bins = Binaries::locate(None).unwrap_or_else(|e| panic!("{e}"));
    for (a, b, policy) in [
        (Kind::PortRestricted, Kind::PortRestricted, "auto"),
        (Kind::Symmetric, Kind::Symmetric, "auto"),
        (Kind::FullCone, Kind::Cgnat, "relay-only"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = natcall_lab::cluster::run(&bins, a, b, policy, dir.path())
            .await
            .unwrap_or_else(|e| panic!("{a} × {b}: {e}"));
        if !run.passed() {
            let logs = dir.keep();
            panic!("{} (kept in {})", run.summary(), logs.display());
        }
    }
}
