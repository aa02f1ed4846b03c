//! How a peer knows its rendezvous server, tested against an attacker: a man in the middle
//! that terminates TLS with its own key and relays everything to the real server.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{server as real_server, start, start_on};
use natcall::{Endpoint, EndpointConfig, Error, Identity, KnownServers, ServerKey, ServerTrust};
use natcall_proto::frame::ErrorCode;
use natcall_rendezvous::tls::{ServerTls, TlsSource};
use natcall_rendezvous::{Config, Sockets};
use tokio::net::TcpListener;

/// The name the user knows the server by (its line in `known_servers`).
const LABEL: &str = "rv.test:3478";

/// A TLS-terminating proxy with its own key in front of `real`: it decrypts what the peer
/// sends, re-encrypts it to the real server (taking whatever key that presents), and back.
async fn man_in_the_middle(real: SocketAddr) -> (SocketAddr, ServerKey) {
    let tls = Arc::new(ServerTls::load(TlsSource::SelfSigned { dir: None }).expect("proxy key"));
    let key = tls.key();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(mut victim) = tls.acceptor().accept(tcp).await else {
                    return; // the peer refused our key: nothing to relay
                };
                // Towards the real server the attacker takes whatever key it presents.
                let (mut server, _) = natcall::connect_tls(real, ServerTrust::first_use(real.to_string()))
                    .await
                    .expect("TLS to the real server");
                let _ = tokio::io::copy_bidirectional(&mut victim, &mut server).await;
            });
        }
    });
    (addr, key)
}

fn config(server: SocketAddr, name: &str, trust: ServerTrust) -> EndpointConfig {
    let mut c = EndpointConfig::new(server, name, Identity::generate().expect("identity"));
    c.bind = "127.0.0.1:0".parse().expect("addr");
    c.server_trust = trust;
    c
}

fn remembered(path: &std::path::Path) -> ServerTrust {
    ServerTrust {
        known_servers: Some(path.to_owned()),
        ..ServerTrust::first_use(LABEL)
    }
}

#[tokio::test]
async fn a_man_in_the_middle_with_its_own_key_is_refused_once_the_server_is_known() {
    let real = real_server().await;
    let (proxy, proxy_key) = man_in_the_middle(real.addr).await;
    let dir = tempfile::tempdir().expect("dir");
    let known = dir.path().join("known_servers");
    // First contact, on a clean path: the real key is remembered.
    let alice = Endpoint::bind(config(real.addr, "alice", remembered(&known)))
        .await
        .expect("registers");
    alice.close().await;
    assert_eq!(KnownServers::load(&known).expect("reads").get(LABEL), Some(real.key));
    // Later the path is intercepted: the proxy's key is refused, naming both keys.
    let e = Endpoint::bind(config(proxy, "alice", remembered(&known)))
        .await
        .expect_err("intercepted");
    let Error::ServerKeyChanged {
        server,
        known: k,
        presented,
        given,
    } = &e
    else {
        panic!("{e}")
    };
    assert_eq!(
        (server.as_str(), *k, *presented, *given),
        (LABEL, real.key, proxy_key, false)
    );
    let text = e.to_string();
    assert!(
        text.contains(&real.key.to_string()) && text.contains(&proxy_key.to_string()),
        "{text}"
    );
    // The file still holds the real key.
    assert_eq!(KnownServers::load(&known).expect("reads").get(LABEL), Some(real.key));
}

#[tokio::test]
async fn a_key_given_with_the_server_admits_only_that_server() {
    let real = real_server().await;
    let (proxy, proxy_key) = man_in_the_middle(real.addr).await;
    let ok = Endpoint::bind(config(real.addr, "bob", ServerTrust::pinned(LABEL, real.key)))
        .await
        .expect("the pinned key matches");
    ok.close().await;
    let e = Endpoint::bind(config(proxy, "bob", ServerTrust::pinned(LABEL, real.key)))
        .await
        .expect_err("intercepted");
    assert!(
        matches!(e, Error::ServerKeyChanged { presented, given: true, .. } if presented == proxy_key),
        "{e}"
    );
}

#[tokio::test]
async fn a_first_contact_through_a_relaying_man_in_the_middle_cannot_register() {
    // With no key known yet the peer takes the proxy's key (trust on first use) — but its
    // registration is bound to the TLS session it signed on, so the real server refuses the
    // relayed copy: the attacker cannot sit between a peer and the real server unnoticed.
    let real = real_server().await;
    let (proxy, _) = man_in_the_middle(real.addr).await;
    let e = Endpoint::bind(config(proxy, "carol", ServerTrust::first_use(LABEL)))
        .await
        .expect_err("refused by the real server");
    assert!(
        matches!(
            e,
            Error::Refused {
                code: ErrorCode::BadSignature,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_server_that_comes_back_with_another_key_is_not_followed() {
    let real = real_server().await;
    let dave = Endpoint::bind(config(real.addr, "dave", ServerTrust::first_use(LABEL)))
        .await
        .expect("registers");
    // The server restarts on the same port with a new (in-memory) key.
    let addr = real.addr;
    drop(real);
    let lost = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            let seen = dave.server_state();
            if let natcall::ServerState::Reconnecting(_) = seen {
                return;
            }
            dave.server_changed(&seen).await;
        }
    });
    lost.await.expect("dave notices the server left");
    let sockets = loop {
        match Sockets::bind(addr) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let again = start_on(sockets, Config::default());
    let new_key = again.key;
    let gone = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let seen = dave.server_state();
            if let natcall::ServerState::Gone(why) = seen {
                return why;
            }
            dave.server_changed(&seen).await;
        }
    })
    .await
    .expect("dave gives up on the new key");
    assert!(
        gone.contains(&new_key.to_string()) && gone.contains("presented key"),
        "{gone}"
    );
}

/// A server with a CA-issued certificate for its DNS name is verified against the roots and
/// pinned nowhere (certificates rotate); the same server seen by a peer that does not trust
/// that CA falls back to first use and remembers the key.
#[tokio::test]
async fn a_ca_certificate_for_the_dns_name_is_verified_and_not_pinned() {
    let dir = tempfile::tempdir().expect("dir");
    let ca_key = rcgen::KeyPair::generate().expect("keygen");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("keygen");
    let leaf = rcgen::CertificateParams::new(vec!["rv.test".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    let (cert, key) = (dir.path().join("fullchain.pem"), dir.path().join("privkey.pem"));
    std::fs::write(&cert, format!("{}{}", leaf.pem(), ca.pem())).expect("cert");
    std::fs::write(&key, leaf_key.serialize_pem()).expect("key");
    let server_config = Config {
        tls_cert: Some(cert),
        tls_key: Some(key),
        ..Config::default()
    };
    let lab = start(server_config).await;
    let addr = lab.addr;
    let known = dir.path().join("known_servers");
    let trusting = ServerTrust {
        ca_roots: vec![ca.der().clone()],
        known_servers: Some(known.clone()),
        ..ServerTrust::first_use("rv.test:3478")
    };
    let ep = Endpoint::bind(config(addr, "erin", trusting))
        .await
        .expect("verified by the CA");
    ep.close().await;
    assert_eq!(
        KnownServers::load(&known).expect("reads").get("rv.test:3478"),
        None,
        "nothing pinned"
    );
    // Another name in the label: the certificate is not for it, so it is not CA-verified.
    let other = ServerTrust {
        ca_roots: vec![ca.der().clone()],
        known_servers: Some(known.clone()),
        ..ServerTrust::first_use("rv.other:3478")
    };
    let ep = Endpoint::bind(config(addr, "frank", other)).await.expect("first use");
    ep.close().await;
    assert!(
        KnownServers::load(&known)
            .expect("reads")
            .get("rv.other:3478")
            .is_some(),
        "pinned on first use"
    );
}
