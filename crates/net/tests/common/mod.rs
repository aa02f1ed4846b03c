//! An in-process rendezvous server on loopback for the library's tests.
#![allow(dead_code)] // each test binary uses a different part of this helper

use std::net::SocketAddr;

use natcall::ServerKey;
use natcall_rendezvous::{Config, Server, Sockets};

/// A running server; it stops when this is dropped.
pub struct Lab {
    pub addr: SocketAddr,
    /// The key peers pin.
    pub key: ServerKey,
    _stop: tokio::sync::oneshot::Sender<()>,
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
    tokio::spawn(async move {
        let _ = server
            .run(sockets, async {
                let _ = stopped.await;
            })
            .await;
    });
    Lab { addr, key, _stop: stop }
}
