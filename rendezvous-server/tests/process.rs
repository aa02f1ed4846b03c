//! The real `natcall-rendezvous` binary: restart on the same port, SIGTERM drain, an external
//! STUN client, config file and flags.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Got, Identity};
use natcall_proto::control::ServerMsg;

const BIN: &str = env!("CARGO_BIN_EXE_natcall-rendezvous");

/// A port free for both TCP and UDP right now.
fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let port = tcp.local_addr().expect("addr").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Proc {
    fn spawn(args: &[&str], addr: SocketAddr, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(BIN);
        // The binary keeps names durably by default; a test that does not choose a state
        // directory runs in memory, so it never writes to the user's home.
        let durable = args.contains(&"--state-dir") || env.iter().any(|(k, _)| *k == "STATE_DIRECTORY");
        if !durable {
            cmd.arg("--ephemeral");
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self {
            child: cmd.spawn().expect("spawns the server binary"),
            addr,
        }
    }

    fn start(addr: SocketAddr) -> Self {
        let p = Self::spawn(&["--listen", &addr.to_string(), "--log-level", "info"], addr, &[]);
        p.wait_ready();
        p
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "server did not start listening on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signals the server");
    }

    /// Waits for exit; returns the status and everything the server logged.
    fn wait(mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("waits") {
                break s;
            }
            assert!(Instant::now() < deadline, "server did not exit in time");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut log = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut log);
        }
        (status, log)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn killed_with_peers_connected_it_binds_the_same_port_again_at_once() {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let server = Proc::start(addr);
    let mut peers = Vec::new();
    for i in 0..5 {
        peers.push(
            Client::register(addr, &format!("peer{i}"), &Identity::generate())
                .await
                .0,
        );
    }
    server.signal(nix::sys::signal::Signal::SIGKILL);
    let (status, _) = server.wait();
    assert!(!status.success());
    // The peers are still open: the dead server's side of each connection lingers in
    // FIN_WAIT. Without SO_REUSEADDR the new listener would fail with "address in use".
    let again = Proc::spawn(&["--listen", &addr.to_string()], addr, &[]);
    again.wait_ready();
    let (mut peer, _) = Client::register(addr, "peer0", &Identity::generate()).await;
    assert!(matches!(
        peer.lookup("peer0").await,
        ServerMsg::Presence { online: true, .. }
    ));
    drop(peers);
}

#[tokio::test]
async fn sigterm_tells_every_peer_then_half_closes_and_exits_cleanly() {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let server = Proc::start(addr);
    let (mut a, _) = Client::register(addr, "a", &Identity::generate()).await;
    let (mut b, _) = Client::register(addr, "b", &Identity::generate()).await;
    server.signal(nix::sys::signal::Signal::SIGTERM);
    for peer in [&mut a, &mut b] {
        match peer.next().await {
            Got::Msg(ServerMsg::GoingAway {
                reason,
                reconnect_after_ms,
            }) => {
                assert_eq!(reason, "server is shutting down");
                assert!(reconnect_after_ms > 0);
            }
            other => panic!("expected going-away, got {other:?}"),
        }
        peer.expect_eof().await;
    }
    // New connections are refused once draining began.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    drop((a, b));
    let (status, log) = server.wait();
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("drained; bye"), "{log}");
}

/// Debian's `turnutils_stunclient` (coturn) is a STUN client we did not write.
#[test]
fn an_external_stun_client_gets_its_true_mapped_address() {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let server = Proc::spawn(
        &["--listen", &addr.to_string()],
        addr,
        &[("RUST_LOG", "natcall_rendezvous::stun=trace")],
    );
    server.wait_ready();
    let out = Command::new("turnutils_stunclient")
        .args(["-p", &addr.port().to_string(), "-L", "127.0.0.1", "127.0.0.1"])
        .output()
        .expect("turnutils_stunclient is installed (Debian package coturn; .ci/run installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mapped: SocketAddr = stdout
        .lines()
        .find_map(|l| l.split("UDP reflexive addr: ").nth(1))
        .unwrap_or_else(|| panic!("no reflexive address in:\n{stdout}"))
        .trim()
        .parse()
        .expect("an address");
    assert_eq!(mapped.ip(), addr.ip());
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let (_, log) = server.wait();
    // The server logged the source address it answered; the client must have been told it.
    assert!(
        log.contains(&format!("src={mapped}")),
        "server did not answer {mapped}:\n{log}"
    );
}

#[test]
fn flags_win_over_the_config_file_and_bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let flag_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = dir.path().join("server.toml");
    std::fs::write(&config, format!("listen = \"{file_addr}\"\nlog_level = \"debug\"\n")).expect("writes");
    let server = Proc::spawn(
        &["-c", config.to_str().expect("utf8"), "--listen", &flag_addr.to_string()],
        flag_addr,
        &[],
    );
    server.wait_ready();
    assert!(
        std::net::TcpStream::connect(file_addr).is_err(),
        "the file's address must not be used"
    );
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = server.wait();
    assert!(status.success());
    assert!(log.contains("DEBUG"), "log_level from the file applies:\n{log}");

    std::fs::write(&config, "[limits]\nmax_frame_len = 1\n").expect("writes");
    let out = Command::new(BIN)
        .args(["--ephemeral", "-c", config.to_str().expect("utf8")])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limits.max_frame_len must be between 64 and 65536, not 1"),
        "{err}"
    );
}

#[tokio::test]
async fn names_survive_kill_9_by_default_in_the_systemd_state_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let env = [("STATE_DIRECTORY", state.to_str().expect("utf8"))];
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // No state flag at all: the binary is durable by default.
    let server = Proc::spawn(&["--listen", &addr.to_string()], addr, &env);
    server.wait_ready();
    let frank = Identity::generate();
    let (_c, _) = Client::register(addr, "frank", &frank).await;
    server.signal(nix::sys::signal::Signal::SIGKILL);
    let (status, _) = server.wait();
    assert!(!status.success());
    assert!(state.join("names.v2").exists(), "the state is in $STATE_DIRECTORY");

    let again = Proc::spawn(&["--listen", &addr.to_string()], addr, &env);
    again.wait_ready();
    let mut thief = Client::hello(addr).await;
    thief.send_register("frank", &Identity::generate(), vec![]).await;
    match thief.next().await {
        Got::Error(e) => assert_eq!(e.code, natcall_proto::frame::ErrorCode::NameTaken),
        other => panic!("expected NameTaken, got {other:?}"),
    }
    Client::register(addr, "frank", &frank).await;
}

/// A certbot renewal: new certificate files, then SIGHUP; new connections get the new
/// certificate, the connection already open goes on, and a broken renewal keeps the working one.
#[tokio::test]
async fn sighup_reloads_the_tls_certificate_files() {
    use natcall_proto::server_key::ServerKey;
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key) = (dir.path().join("fullchain.pem"), dir.path().join("privkey.pem"));
    let issue = || {
        let k = rcgen::KeyPair::generate().expect("keygen");
        let c = rcgen::CertificateParams::new(vec!["rv.test".to_owned()])
            .expect("params")
            .self_signed(&k)
            .expect("cert");
        std::fs::write(&cert, c.pem()).expect("cert");
        std::fs::write(&key, k.serialize_pem()).expect("key");
        ServerKey::of_cert(c.der()).expect("key")
    };
    let first = issue();
    let conf = dir.path().join("rendezvous.toml");
    std::fs::write(
        &conf,
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .expect("config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let server = Proc::spawn(
        &["--listen", &addr.to_string(), "-c", &conf.display().to_string()],
        addr,
        &[],
    );
    server.wait_ready();
    let presented = |c: &Client| {
        let certs = c.stream.get_ref().1.peer_certificates().expect("a certificate");
        ServerKey::of_cert(&certs[0]).expect("key")
    };
    let mut open = Client::hello(addr).await;
    assert_eq!(presented(&open), first);
    let second = issue();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if presented(&Client::connect(addr).await) == second {
            break;
        }
        assert!(Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The connection made before the reload still works: it registers.
    open.send_register("early", &Identity::generate(), vec![]).await;
    assert!(matches!(open.next_msg().await, ServerMsg::Registered { .. }));
    // A broken renewal: logged, the working certificate stays.
    std::fs::write(&key, "not a key").expect("write");
    server.signal(nix::sys::signal::Signal::SIGHUP);
    // Nothing on the wire says the signal was handled (the log, read at exit, does): give the
    // server a moment so the check below is made after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(presented(&Client::connect(addr).await), second);
    drop(open);
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, log) = server.wait();
    assert!(status.success(), "{log}");
    assert!(log.contains("SIGHUP: TLS certificate reloaded"), "{log}");
    assert!(log.contains("SIGHUP: TLS certificate not reloaded"), "{log}");
}
