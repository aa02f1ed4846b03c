//! Name bindings in a cluster's Redis ([`RedisNames`]) keep the embedded store's rules: a name
//! belongs to its first key, quotas per key and in all, the source's consent for a new name,
//! release, and expiry. Each test starts its own `redis-server` on a loopback port.

mod common;

use common::Redis;

use std::sync::Arc;
use std::time::Duration;

use natcall_proto::control::Fingerprint;
use natcall_proto::server_key::ServerKey;
use natcall_rendezvous::ClusterConfig;
use natcall_rendezvous::cluster::{Cluster, RedisNames};
use natcall_rendezvous::registry::RegisterError;
use natcall_rendezvous::registry::backend::NameBackend;
use natcall_rendezvous::registry::store::Claimed;

fn redis() -> Redis {
    Redis::start()
}

async fn names(r: &Redis, node: &str, max: usize, per_key: usize, expiry: u64) -> RedisNames {
    let config = ClusterConfig::new(r.url(), node);
    let advertise = "127.0.0.1:1".parse().expect("addr");
    let cluster: Arc<Cluster> = Cluster::connect(
        &config,
        advertise,
        ServerKey([1; 32]),
        natcall_rendezvous::Metrics::new(),
    )
    .await
    .expect("joins");
    RedisNames::new(cluster, max, per_key, expiry)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

const ALLOW: &(dyn Fn() -> Result<(), RegisterError> + Send + Sync) = &|| Ok(());

#[tokio::test]
async fn a_name_is_its_first_keys_on_every_node_until_released() {
    let r = redis();
    let (n1, n2) = (
        names(&r, "n1", 100, 10, 3600).await,
        names(&r, "n2", 100, 10, 3600).await,
    );
    let (a, b) = (Fingerprint([1; 32]), Fingerprint([2; 32]));
    assert_eq!(n1.claim("alice", a, now(), ALLOW).await.expect("binds"), Claimed::New);
    assert_eq!(n2.claim("alice", a, now(), ALLOW).await.expect("owner"), Claimed::Held);
    assert!(matches!(
        n2.claim("alice", b, now(), ALLOW).await,
        Err(RegisterError::NameTaken(_))
    ));
    assert_eq!(n2.owner("alice").await.expect("answers"), Some(a));
    assert!(!n2.release("alice", b).await.expect("answers"), "not b's to release");
    assert!(n2.release("alice", a).await.expect("answers"));
    assert_eq!(n1.owner("alice").await.expect("answers"), None);
    assert_eq!(
        n1.claim("alice", b, now(), ALLOW).await.expect("free now"),
        Claimed::New
    );
}

#[tokio::test]
async fn quotas_per_key_and_in_all_and_the_sources_consent_hold() {
    let r = redis();
    let n = names(&r, "n1", 3, 2, 3600).await;
    let (a, b) = (Fingerprint([1; 32]), Fingerprint([2; 32]));
    n.claim("a1", a, now(), ALLOW).await.expect("first");
    n.claim("a2", a, now(), ALLOW).await.expect("second");
    assert!(matches!(
        n.claim("a3", a, now(), ALLOW).await,
        Err(RegisterError::KeyQuota(2))
    ));
    n.claim("b1", b, now(), ALLOW).await.expect("third name");
    assert!(matches!(
        n.claim("b2", b, now(), ALLOW).await,
        Err(RegisterError::Full(3))
    ));
    // A source over its hourly quota binds nothing, but may still use the names it holds.
    let refuse: &(dyn Fn() -> Result<(), RegisterError> + Send + Sync) = &|| Err(RegisterError::SourceQuota(1));
    n.release("b1", b).await.expect("released");
    assert!(matches!(
        n.claim("b2", b, now(), refuse).await,
        Err(RegisterError::SourceQuota(1))
    ));
    assert_eq!(n.owner("b2").await.expect("answers"), None);
    assert_eq!(n.claim("a1", a, now(), refuse).await.expect("held"), Claimed::Held);
}

#[tokio::test]
async fn an_unused_name_expires_and_frees_its_keys_quota() {
    let r = redis();
    let n = names(&r, "n1", 100, 1, 1).await;
    let (a, b) = (Fingerprint([1; 32]), Fingerprint([2; 32]));
    n.claim("old", a, now(), ALLOW).await.expect("binds");
    assert!(matches!(
        n.claim("other", a, now(), ALLOW).await,
        Err(RegisterError::KeyQuota(1))
    ));
    // Expiry is one second here: wait it out (the binding's TTL in Redis).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(n.owner("old").await.expect("answers"), None);
    assert_eq!(n.claim("old", b, now(), ALLOW).await.expect("free"), Claimed::New);
    assert_eq!(
        n.claim("other", a, now(), ALLOW).await.expect("quota freed"),
        Claimed::New
    );
}

#[tokio::test]
async fn an_unreachable_redis_is_a_clear_error_at_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let config = ClusterConfig::new(format!("redis://127.0.0.1:{port}"), "n1");
    let e = Cluster::connect(
        &config,
        "127.0.0.1:1".parse().expect("addr"),
        ServerKey([1; 32]),
        natcall_rendezvous::Metrics::new(),
    )
    .await
    .expect_err("nothing listens there");
    let text = e.to_string();
    assert!(text.contains("cannot reach the cluster's Redis"), "{text}");
}
