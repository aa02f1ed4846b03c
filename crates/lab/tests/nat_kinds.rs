//! The lab itself: each emulated router maps and filters as its kind's name says (RFC 4787),
//! checked with plain UDP sockets and reflectors in the namespaces.

use natcall_lab::Kind;
use natcall_lab::probe::{Behaviour, nat_behaviour};

async fn behaviour(kind: Kind) -> Behaviour {
    if let Err(e) = natcall_lab::preflight() {
        panic!("{e}");
    }
    nat_behaviour(kind).await.unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// mapping: the same external address:port towards two destinations (EIM) or not (EDM);
/// filtering: what gets in unsolicited from the contacted host's other port / another host.
fn expect(kind: Kind, b: Behaviour, eim: bool, same_host_other_port: bool, other_host: bool) {
    assert!(b.udp_works && b.tcp_works, "{kind}: {b:?}");
    assert_eq!(b.same_mapping_for_two_destinations, eim, "{kind} mapping: {b:?}");
    assert_eq!(
        b.admits_same_host_other_port, same_host_other_port,
        "{kind} filtering (port): {b:?}"
    );
    assert_eq!(b.admits_other_host, other_host, "{kind} filtering (address): {b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_peer_is_untranslated_and_unfiltered() {
    let b = behaviour(Kind::Public).await;
    assert!(b.untranslated, "{b:?}");
    expect(Kind::Public, b, true, true, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cone_maps_independently_and_filters_nothing() {
    let b = behaviour(Kind::FullCone).await;
    assert!(!b.untranslated, "{b:?}");
    expect(Kind::FullCone, b, true, true, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_restricted_admits_other_ports_of_contacted_hosts_only() {
    expect(
        Kind::AddressRestricted,
        behaviour(Kind::AddressRestricted).await,
        true,
        true,
        false,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_restricted_admits_only_the_contacted_address_and_port() {
    expect(
        Kind::PortRestricted,
        behaviour(Kind::PortRestricted).await,
        true,
        false,
        false,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_maps_a_new_port_per_destination() {
    expect(Kind::Symmetric, behaviour(Kind::Symmetric).await, false, false, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgnat_maps_independently_through_both_nats_and_filters_by_port() {
    expect(Kind::Cgnat, behaviour(Kind::Cgnat).await, true, false, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_blocked_lets_tcp_out_but_no_udp() {
    let b = behaviour(Kind::UdpBlocked).await;
    assert!(b.tcp_works, "{b:?}");
    assert!(!b.udp_works, "{b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_lan_router_hairpins_only_when_asked() {
    if let Err(e) = natcall_lab::preflight() {
        panic!("{e}");
    }
    assert!(
        natcall_lab::probe::hairpin_works(true).await.expect("probe"),
        "hairpin on"
    );
    assert!(
        !natcall_lab::probe::hairpin_works(false).await.expect("probe"),
        "hairpin off"
    );
}
