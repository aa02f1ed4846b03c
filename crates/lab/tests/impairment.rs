//! Link impairment without netem: the measured round trip and loss are close to what was asked.

use std::net::SocketAddr;
use std::time::Duration;

use natcall_lab::impair::DelayBackend;
use natcall_lab::probe::{Reflector, echo_stats};
use natcall_lab::{Impairment, topology};

/// A public server and a public client device; the impairment on the client's uplink.
async fn measure(imp: Impairment, count: u32, interval_ms: u64) -> (natcall_lab::probe::EchoStats, DelayBackend) {
    if let Err(e) = natcall_lab::preflight() {
        panic!("{e}");
    }
    let lab = topology::new_lab().await.expect("lab");
    let dc = lab.add_router("dc").build().await.expect("router");
    let server = topology::add_device(&lab, "server", &dc).await.expect("server");
    let client = topology::add_device(&lab, "client", &dc).await.expect("client");
    let guard = imp.apply(&client).await.expect("impairment applies");
    let backend = guard.backend;
    let stats = tokio::task::spawn_blocking(move || {
        let ip = server.ip().expect("server ip");
        let refl = Reflector::start(&server, SocketAddr::from((ip, 7000))).expect("reflector");
        // Warm-up: the neighbour entries resolved through the forwarder (a lost ARP exchange is
        // retried only a second later and would count as loss), then measure.
        natcall_lab::probe::wait_for_echo(&client, &refl, Duration::from_secs(10)).expect("the path carries traffic");
        echo_stats(&client, &refl, count, Duration::from_millis(interval_ms)).expect("echo")
    })
    .await
    .expect("measurement");
    drop(guard);
    drop(lab);
    eprintln!("asked {imp:?} via {backend:?}: measured {stats:?}");
    (stats, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unimpaired_link_has_a_sub_millisecond_round_trip_and_no_loss() {
    let (s, backend) = measure(Impairment::default(), 100, 2).await;
    assert_eq!(backend, DelayBackend::None);
    assert_eq!(s.replies, s.sent, "{s:?}");
    assert!(s.rtt_mean_ms < 2.0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_adds_twice_the_one_way_delay_to_the_round_trip() {
    let imp = Impairment {
        delay: Duration::from_millis(40),
        ..Impairment::default()
    };
    let (s, _) = measure(imp, 100, 5).await;
    assert_eq!(s.replies, s.sent, "{s:?}");
    assert!(
        (s.rtt_mean_ms - 80.0).abs() < 8.0,
        "mean RTT {:.1} ms, asked 80: {s:?}",
        s.rtt_mean_ms
    );
    assert!(s.rtt_min_ms >= 79.0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_spreads_the_round_trip_around_the_delay() {
    let imp = Impairment {
        delay: Duration::from_millis(30),
        jitter: Duration::from_millis(10),
        seed: 42,
        ..Impairment::default()
    };
    // Probes 25 ms apart: wider than the jitter band, so keeping frames in order (a frame never
    // overtakes the one before) does not push the delays up.
    let (s, _) = measure(imp, 160, 25).await;
    assert_eq!(s.replies, s.sent, "{s:?}");
    assert!((s.rtt_mean_ms - 60.0).abs() < 6.0, "{s:?}");
    // Two draws per round trip from 30 ± 10 ms: between 40 and 80 ms, clearly spread. The
    // floor is physical (nothing arrives before its delay); the ceiling is checked on the 95th
    // percentile, since a shared machine can hold one probe back by tens of milliseconds.
    assert!(s.rtt_min_ms >= 39.0 && s.rtt_p95_ms <= 85.0, "{s:?}");
    assert!(s.rtt_p95_ms - s.rtt_min_ms > 10.0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_drops_about_the_asked_share_each_way() {
    let imp = Impairment {
        loss_pct: 20.0,
        ..Impairment::default()
    };
    let (s, _) = measure(imp, 1000, 1).await;
    let one_way = 1.0 - s.reached as f64 / s.sent as f64;
    let round_trip = 1.0 - s.replies as f64 / s.sent as f64;
    // 1000 Bernoulli(0.2) draws: standard deviation about 1.3 points; allow 5.
    assert!((one_way - 0.20).abs() < 0.05, "one-way loss {one_way:.3}: {s:?}");
    assert!(
        (round_trip - 0.36).abs() < 0.06,
        "round-trip loss {round_trip:.3}, expected 1-0.8²: {s:?}"
    );
}
