//! The NAT matrix with the real binaries: one test per pair of kinds, each in its own lab.
//!
//! Needs root (CI runs as root), `nft`, `tc`, `ip`, and the workspace binaries built
//! (`cargo build --workspace --bins`; `tests/run-all.sh` does). Missing any of these fails the
//! test with a sentence saying what to do.

use std::time::Duration;

use natcall_lab::{Binaries, Family, Impairment, Kind, Path, RunOptions, Scenario, V6Case, run_scenario};

/// Runs one scenario and asserts the oracle; on failure prints reports and logs.
async fn run_scenario_checked(scenario: Scenario, expected: Path) {
    run_impaired(scenario, expected, RunOptions::default()).await;
}

async fn run_impaired(scenario: Scenario, expected: Path, opts: RunOptions) {
    assert_eq!(scenario.expected(), expected, "the test name and the oracle disagree");
    if let Err(e) = natcall_lab::preflight() {
        panic!("{e}");
    }
    let bins = Binaries::locate(None).unwrap_or_else(|e| panic!("{e}"));
    let outcome = run_scenario(&bins, scenario, &opts).await;
    assert!(outcome.passed(), "{}", outcome.diagnostics());
}

/// One test per pair (named after the behaviour), plus `PAIRS`, the list of pairs covered.
macro_rules! scenarios {
    ($($name:ident: $a:ident x $b:ident => $path:ident;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                run_scenario_checked(Scenario::pair(Kind::$a, Kind::$b), Path::$path).await;
            }
        )*
        const PAIRS: &[(Kind, Kind)] = &[$((Kind::$a, Kind::$b)),*];
    };
}

scenarios! {
    public_x_public_goes_direct: Public x Public => Direct;
    public_x_full_cone_goes_direct: Public x FullCone => Direct;
    public_x_address_restricted_goes_direct: Public x AddressRestricted => Direct;
    public_x_port_restricted_goes_direct: Public x PortRestricted => Direct;
    public_x_symmetric_goes_direct: Public x Symmetric => Direct;
    public_x_cgnat_goes_direct: Public x Cgnat => Direct;
    public_x_udp_blocked_falls_back_to_relay: Public x UdpBlocked => Relay;
    public_x_symmetric_upnp_goes_direct: Public x SymmetricUpnp => Direct;
    full_cone_x_full_cone_goes_direct: FullCone x FullCone => Direct;
    full_cone_x_address_restricted_goes_direct: FullCone x AddressRestricted => Direct;
    full_cone_x_port_restricted_goes_direct: FullCone x PortRestricted => Direct;
    full_cone_x_symmetric_goes_direct: FullCone x Symmetric => Direct;
    full_cone_x_cgnat_goes_direct: FullCone x Cgnat => Direct;
    full_cone_x_udp_blocked_falls_back_to_relay: FullCone x UdpBlocked => Relay;
    full_cone_x_symmetric_upnp_goes_direct: FullCone x SymmetricUpnp => Direct;
    address_restricted_x_address_restricted_goes_direct: AddressRestricted x AddressRestricted => Direct;
    address_restricted_x_port_restricted_goes_direct: AddressRestricted x PortRestricted => Direct;
    address_restricted_x_symmetric_goes_direct: AddressRestricted x Symmetric => Direct;
    address_restricted_x_cgnat_goes_direct: AddressRestricted x Cgnat => Direct;
    address_restricted_x_udp_blocked_falls_back_to_relay: AddressRestricted x UdpBlocked => Relay;
    address_restricted_x_symmetric_upnp_goes_direct: AddressRestricted x SymmetricUpnp => Direct;
    port_restricted_x_port_restricted_goes_direct: PortRestricted x PortRestricted => Direct;
    port_restricted_x_symmetric_goes_direct_by_birthday_probing: PortRestricted x Symmetric => Direct;
    port_restricted_x_cgnat_goes_direct: PortRestricted x Cgnat => Direct;
    port_restricted_x_udp_blocked_falls_back_to_relay: PortRestricted x UdpBlocked => Relay;
    port_restricted_x_symmetric_upnp_goes_direct: PortRestricted x SymmetricUpnp => Direct;
    symmetric_x_symmetric_falls_back_to_relay: Symmetric x Symmetric => Relay;
    symmetric_x_cgnat_goes_direct_by_birthday_probing: Symmetric x Cgnat => Direct;
    symmetric_x_udp_blocked_falls_back_to_relay: Symmetric x UdpBlocked => Relay;
    symmetric_x_symmetric_upnp_goes_direct_through_the_mapped_port: Symmetric x SymmetricUpnp => Direct;
    cgnat_x_cgnat_goes_direct: Cgnat x Cgnat => Direct;
    cgnat_x_udp_blocked_falls_back_to_relay: Cgnat x UdpBlocked => Relay;
    cgnat_x_symmetric_upnp_goes_direct: Cgnat x SymmetricUpnp => Direct;
    udp_blocked_x_udp_blocked_falls_back_to_relay: UdpBlocked x UdpBlocked => Relay;
    udp_blocked_x_symmetric_upnp_falls_back_to_relay: UdpBlocked x SymmetricUpnp => Relay;
    symmetric_upnp_x_symmetric_upnp_goes_direct: SymmetricUpnp x SymmetricUpnp => Direct;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_lan_with_hairpin_stays_on_the_lan() {
    run_scenario_checked(Scenario::SameLan { hairpin: true }, Path::Lan).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_lan_without_hairpin_stays_on_the_lan() {
    run_scenario_checked(Scenario::SameLan { hairpin: false }, Path::Lan).await;
}

/// Hole punching still wins through 30 ± 5 ms each way and 2 % loss on both uplinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_restricted_x_cgnat_goes_direct_over_slow_lossy_links() {
    let imp = Impairment {
        delay: Duration::from_millis(30),
        jitter: Duration::from_millis(5),
        loss_pct: 2.0,
        seed: 7,
        reorder: false,
    };
    let opts = RunOptions {
        impair_a: Some(imp),
        impair_b: Some(Impairment { seed: 8, ..imp }),
        keep_logs: None,
    };
    run_impaired(Scenario::pair(Kind::PortRestricted, Kind::Cgnat), Path::Direct, opts).await;
}

/// Both peers dual-stack with global IPv6 behind stateful firewalls, and symmetric IPv4 NATs
/// that alone would relay: checks from both sides at once open both firewalls, and the call
/// goes direct over IPv6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_behind_stateful_firewalls_goes_direct_over_ipv6() {
    let s = Scenario::V6(V6Case::FirewalledV6);
    assert_eq!(s.expected_family(), Some(Family::V6));
    run_scenario_checked(s, Path::Direct).await;
}

/// Dual-stack peers behind port-restricted IPv4 NATs: both families work, IPv6 wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_peers_prefer_the_ipv6_path() {
    let s = Scenario::V6(V6Case::DualStack);
    assert_eq!(s.expected_family(), Some(Family::V6));
    run_scenario_checked(s, Path::Direct).await;
}

/// A peer on IPv6 only and one on IPv4 only share no family: the relay (the server listens on
/// both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_only_and_ipv4_only_meet_on_the_relay() {
    run_scenario_checked(Scenario::V6(V6Case::V6OnlyToV4Only), Path::Relay).await;
}

/// Every scenario of `natcall-lab matrix` has a test above (8·9/2 pairs, 2 same-lan, 3 IPv6).
#[test]
fn every_matrix_scenario_has_a_test() {
    let mut covered: Vec<Scenario> = PAIRS.iter().map(|&(a, b)| Scenario::pair(a, b)).collect();
    covered.push(Scenario::SameLan { hairpin: true });
    covered.push(Scenario::SameLan { hairpin: false });
    covered.extend(V6Case::ALL.map(Scenario::V6));
    assert_eq!(covered, Scenario::matrix());
}
