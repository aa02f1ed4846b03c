//! An in-process rendezvous server on loopback for the library's tests.
#![allow(dead_code)] // each test binary uses a different part of this helper

use std::net::SocketAddr;

use natcall::{Endpoint, EndpointConfig, Identity, ServerKey};
use natcall_rendezvous::{Config, Server, Sockets};

/// A running server; it stops when this is dropped.
pub struct Lab {
    pub addr: SocketAddr,
    /// The key peers pin.
    pub key: ServerKey,
    /// The server itself (its registry, calls and metrics), for what peers cannot see.
    pub server: Server,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The configuration of a peer `name` with `identity`, on loopback, against `lab`.
pub fn config(lab: &Lab, name: &str, identity: Identity) -> EndpointConfig {
    let mut config = EndpointConfig::new(lab.addr, name, identity);
    config.bind = "127.0.0.1:0".parse().expect("addr");
    config
}

/// A peer `name` with a fresh identity, registered with `lab`.
pub async fn peer(lab: &Lab, name: &str) -> Endpoint {
    let identity = Identity::generate().expect("identity");
    Endpoint::bind(config(lab, name, identity)).await.expect("registers")
}

/// A server with the default configuration on `127.0.0.1:0`.
pub async fn server() -> Lab {
    start(Config::default()).await
}

/// A server with `config` on `127.0.0.1:0`.
pub async fn start(config: Config) -> Lab {
    start_on(
        Sockets::bind("127.0.0.1:0".parse().expect("addr")).expect("binds"),
        config,
    )
}

/// A server with `config` on `sockets` (e.g. the address of one that stopped).
pub fn start_on(sockets: Sockets, config: Config) -> Lab {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let addr = sockets.local_addr().expect("addr");
    let server = Server::new(config).expect("config");
    let key = server.key();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = server.clone();
    tokio::spawn(async move {
        let _ = running
            .run(sockets, async {
                let _ = stopped.await;
            })
            .await;
    });
    Lab {
        addr,
        key,
        server,
        _stop: stop,
    }
}
