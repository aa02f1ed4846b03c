//! Trust on first use between endpoints and in-process rendezvous servers on loopback: a key
//! met once is stored, and a later call where a (fresh, or lying) server vouches for another
//! key under the same name is refused on either side.
//!
//! Both servers carry the same contacts label ("lab"), as one server that lost its name
//! bindings (or lies about them) would: the second server lets another key register the name.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Lab, server};
use natcall::{Contacts, Endpoint, EndpointConfig, Error, Identity, Policy, Trust};

const WITHIN: Duration = Duration::from_secs(20);

/// The contacts of a peer whose home is `home`.
fn contacts(home: &Path) -> Contacts {
    Contacts::in_dir(home, "lab")
}

async fn peer(lab: &Lab, name: &str, identity: &Identity, home: &Path) -> Endpoint {
    let mut config = EndpointConfig::new(lab.addr, name, identity.clone());
    config.bind = "127.0.0.1:0".parse().expect("addr");
    config.contacts = Some(contacts(home));
    Endpoint::bind(config).await.expect("registers")
}

/// `callee` accepts one call; the receiver gets what accepting gave, and a connected call is
/// held until the caller ends it.
fn answer(callee: Endpoint) -> tokio::sync::oneshot::Receiver<Result<(), Error>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        match callee.accept().await.expect("offer").accept().await {
            Ok(call) => {
                let _ = tx.send(Ok(()));
                call.ended().await;
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    });
    rx
}

/// alice and bob (each with a home) call once on a first server: both store the other's key.
async fn first_call(alice: &Identity, bob: &Identity, homes: (&Path, &Path)) {
    let lab = server().await;
    let a = peer(&lab, "alice", alice, homes.0).await;
    let b = peer(&lab, "bob", bob, homes.1).await;
    let bob_task = answer(b.clone());
    let call = tokio::time::timeout(WITHIN, a.call("bob", Policy::RelayOnly))
        .await
        .expect("in time")
        .expect("connects");
    bob_task.await.expect("bob").expect("bob connected");
    call.hangup("bye");
    a.close().await;
    b.close().await;
    let stored = |home: &Path, name| contacts(home).get(name).expect("reads").expect("stored");
    assert_eq!(stored(homes.0, "bob").fingerprint, bob.fingerprint());
    assert_eq!(stored(homes.1, "alice").fingerprint, alice.fingerprint());
    assert_eq!(stored(homes.0, "bob").trust, Trust::FirstUse);
}

#[tokio::test]
async fn a_callee_whose_key_changed_is_refused_by_the_caller_until_accepted() {
    let (alice_home, bob_home, new_bob_home) = (tempdir(), tempdir(), tempdir());
    let alice = Identity::generate().expect("identity");
    let bob = Identity::generate().expect("identity");
    first_call(&alice, &bob, (alice_home.path(), bob_home.path())).await;

    // A fresh server lets another key take the name bob.
    let lab = server().await;
    let new_bob = Identity::generate().expect("identity");
    let a = peer(&lab, "alice", &alice, alice_home.path()).await;
    let b = peer(&lab, "bob", &new_bob, new_bob_home.path()).await;
    let bob_task = answer(b.clone());
    let refused = tokio::time::timeout(WITHIN, a.call("bob", Policy::Auto))
        .await
        .expect("in time")
        .expect_err("bob's key changed");
    let Error::KeyChanged(change) = &refused else {
        panic!("expected a key change, got {refused}");
    };
    assert_eq!(change.known.name, "bob");
    assert_eq!(change.known.fingerprint, bob.fingerprint());
    assert_eq!(change.offered, new_bob.fingerprint());
    let text = refused.to_string();
    assert!(
        text.contains(&format!("natcall contacts accept bob {}", new_bob.fingerprint())),
        "{text}"
    );
    // The callee never got a connected call: alice hung up before QUIC.
    let bob_side = tokio::time::timeout(WITHIN, bob_task)
        .await
        .expect("in time")
        .expect("bob");
    assert!(bob_side.is_err(), "bob's side never connects");
    let stored = contacts(alice_home.path()).get("bob").expect("reads").expect("bob");
    assert_eq!(stored.fingerprint, bob.fingerprint(), "a refused key is not stored");

    // Once alice accepts the new key, the call goes through.
    contacts(alice_home.path())
        .accept("bob", new_bob.fingerprint(), std::time::SystemTime::now())
        .expect("accepts");
    let bob_task = answer(b.clone());
    let call = tokio::time::timeout(WITHIN, a.call("bob", Policy::Auto))
        .await
        .expect("in time")
        .expect("connects with the accepted key");
    bob_task.await.expect("bob").expect("bob connected");
    call.hangup("bye");
    let stored = contacts(alice_home.path()).get("bob").expect("reads").expect("bob");
    assert_eq!(
        (stored.fingerprint, stored.trust),
        (new_bob.fingerprint(), Trust::Accepted)
    );
}

#[tokio::test]
async fn a_caller_whose_key_changed_is_declined_by_the_callee() {
    let (alice_home, bob_home, new_alice_home) = (tempdir(), tempdir(), tempdir());
    let alice = Identity::generate().expect("identity");
    let bob = Identity::generate().expect("identity");
    first_call(&alice, &bob, (alice_home.path(), bob_home.path())).await;

    let lab = server().await;
    let new_alice = Identity::generate().expect("identity");
    let a = peer(&lab, "alice", &new_alice, new_alice_home.path()).await;
    let b = peer(&lab, "bob", &bob, bob_home.path()).await;
    let bob_task = tokio::spawn(async move {
        let offer = b.accept().await.expect("offer");
        assert_eq!(offer.fingerprint(), new_alice.fingerprint());
        offer.accept().await.map(|_| ())
    });
    let declined = tokio::time::timeout(WITHIN, a.call("bob", Policy::Auto))
        .await
        .expect("in time: the caller is told, not left ringing")
        .expect_err("declined");
    assert!(
        matches!(&declined, Error::Ended(why) if why.contains("declined")),
        "{declined}"
    );
    let refused = bob_task.await.expect("bob").expect_err("alice's key changed");
    let Error::KeyChanged(change) = &refused else {
        panic!("expected a key change, got {refused}");
    };
    assert_eq!(change.known.name, "alice");
    assert_eq!(change.known.fingerprint, alice.fingerprint());
    let stored = contacts(bob_home.path()).get("alice").expect("reads").expect("alice");
    assert_eq!(stored.fingerprint, alice.fingerprint(), "a refused key is not stored");
}

#[tokio::test]
async fn an_unreadable_contacts_file_refuses_the_call_and_names_the_file() {
    let (alice_home, bob_home) = (tempdir(), tempdir());
    let lab = server().await;
    let alice = Identity::generate().expect("identity");
    let bob = Identity::generate().expect("identity");
    let path = contacts(alice_home.path()).path().to_owned();
    std::fs::write(&path, "not toml [").expect("writes");
    let a = peer(&lab, "alice", &alice, alice_home.path()).await;
    let b = peer(&lab, "bob", &bob, bob_home.path()).await;
    let _bob_task = answer(b);
    let e = tokio::time::timeout(WITHIN, a.call("bob", Policy::Auto))
        .await
        .expect("in time")
        .expect_err("unchecked calls are refused");
    assert!(matches!(e, Error::Contacts(_)), "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}
