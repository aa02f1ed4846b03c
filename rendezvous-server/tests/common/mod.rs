//! A minimal protocol client for the server's tests.
#![allow(dead_code)] // each test binary uses a different part of this helper

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use natcall_proto::PROTOCOL_VERSION;
use natcall_proto::auth::registration_message;
use natcall_proto::codec::decode_control;
use natcall_proto::control::{ClientMsg, ServerMsg};
use natcall_proto::frame::{self, ErrorFrame, Frame, FrameDecoder, MAX_FRAME_LEN};
use natcall_proto::relay::{RelayFlags, RelayHeader, TrafficClass};
use natcall_proto::stun::{self as wire, TokenCredentials};
use natcall_rendezvous::{Config, Server, Sockets};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

pub const STEP: Duration = Duration::from_secs(5);

/// A server running in-process on 127.0.0.1:0.
pub struct Running {
    pub addr: SocketAddr,
    pub server: Server,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    pub async fn start(config: Config) -> Self {
        let sockets = Sockets::bind("127.0.0.1:0".parse().expect("addr")).expect("binds");
        let addr = sockets.local_addr().expect("addr");
        let server = Server::new(config).expect("valid config");
        let (stop, stopped) = oneshot::channel::<()>();
        let s = server.clone();
        let task = tokio::spawn(async move {
            s.run(sockets, async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
        });
        Self {
            addr,
            server,
            stop: Some(stop),
            task,
        }
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.take().expect("running").send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("drains in time")
            .expect("no panic");
    }
}

/// Defaults, but a drain that does not wait long for test clients that never close, and the
/// per-source and lookup limits out of the way (every test client comes from 127.0.0.1, and
/// some tests send bursts of lookups; the limits have their own tests in `tests/limits.rs`).
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.limits.drain_timeout_ms = 1000;
    c.limits.max_connections_per_ip = 10_000;
    c.limits.registrations_per_ip_per_min = 10_000;
    c.limits.new_names_per_ip_per_hour = 10_000;
    c.limits.lookups_per_min = 10_000;
    c
}

/// Polls `f` every 10 ms for up to 2 s.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// One STUN Binding round trip; `None` when no reply comes within 300 ms.
pub async fn stun_round_trip(udp: &UdpSocket, server: SocketAddr, req: &[u8]) -> Option<Vec<u8>> {
    udp.send_to(req, server).await.expect("sends");
    let mut buf = [0u8; 1500];
    match tokio::time::timeout(Duration::from_millis(300), udp.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => {
            assert_eq!(from, server);
            Some(buf[..n].to_vec())
        }
        Ok(Err(e)) => panic!("recv failed: {e}"),
        Err(_) => None,
    }
}

/// A token-authenticated STUN binding from a new UDP socket: the server records the socket's
/// address as the peer's public address. Returns the socket.
pub async fn stun_with_token(server: SocketAddr, token: &TokenCredentials) -> UdpSocket {
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
    let mut req = [0u8; 256];
    let n = wire::encode_binding_request(&[7; 12], Some(token), &mut req).expect("encodes");
    let resp = stun_round_trip(&udp, server, &req[..n]).await.expect("a reply");
    let mapped = wire::parse_binding_success(&resp, &[7; 12], Some(&token.password)).expect("signed reply");
    assert_eq!(mapped, udp.local_addr().expect("addr"));
    udp
}

/// Encodes a control-class relay frame (never dropped by the relay engine).
pub fn relay_frame(call: u32, payload: &[u8]) -> Bytes {
    relay_frame_with(
        call,
        TrafficClass::Control,
        RelayFlags::FRAME_START | RelayFlags::FRAME_END,
        payload,
    )
}

/// Encodes a relay frame of `class` with `flags`.
pub fn relay_frame_with(call: u32, class: TrafficClass, flags: u8, payload: &[u8]) -> Bytes {
    let header = RelayHeader {
        call,
        class,
        flags: RelayFlags(flags),
    };
    let mut b = BytesMut::new();
    frame::encode_relay(&header, payload, &mut b).expect("encodes");
    b.freeze()
}

/// A peer identity: self-signed certificate and its signing key.
pub struct Identity {
    pub cert: Vec<u8>,
    key: EcdsaKeyPair,
}

impl Identity {
    /// The key's fingerprint, as the server records it.
    pub fn fingerprint(&self) -> natcall_proto::control::Fingerprint {
        natcall_proto::control::Fingerprint::of_cert(&self.cert)
    }

    pub fn generate() -> Self {
        let key = rcgen::KeyPair::generate().expect("keygen");
        let cert = rcgen::CertificateParams::new(vec!["natcall.invalid".into()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed");
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &key.serialize_der(),
            &SystemRandom::new(),
        )
        .expect("pkcs8");
        Self {
            cert: cert.der().to_vec(),
            key,
        }
    }

    pub fn sign(&self, challenge: &[u8; 32], binding: &[u8; 32], name: &str) -> Vec<u8> {
        self.key
            .sign(&SystemRandom::new(), &registration_message(challenge, binding, name))
            .expect("sign")
            .as_ref()
            .to_vec()
    }
}

/// What came off the wire.
#[derive(Debug)]
pub enum Got {
    Msg(ServerMsg),
    Error(ErrorFrame),
    Hello(u16),
    /// A relay frame: the whole frame as received, length prefix included.
    Relay(Bytes),
    Eof,
}

pub struct Client {
    pub stream: TlsStream<TcpStream>,
    buf: BytesMut,
    pub challenge: [u8; 32],
    /// Exported from this connection's TLS session; registrations sign it.
    pub binding: [u8; 32],
    /// Whether relay frames are acknowledged (the relay engine's health check), as a real
    /// client does every `ack_every` frames read.
    pub acks: bool,
    ack_every: u32,
    unacked: u32,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("connects to the server");
        let stream = tls_connector()
            .connect(rustls::pki_types::ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .expect("TLS handshake with the server");
        let mut binding = [0u8; 32];
        stream
            .get_ref()
            .1
            .export_keying_material(&mut binding, natcall_proto::REGISTER_BINDING_LABEL, None)
            .expect("exporter");
        Self {
            stream,
            buf: BytesMut::new(),
            challenge: [0; 32],
            binding,
            acks: true,
            ack_every: 8,
            unacked: 0,
        }
    }

    /// Connects and exchanges hellos; returns after the Welcome.
    pub async fn hello(addr: SocketAddr) -> Self {
        let mut c = Self::connect(addr).await;
        let mut b = BytesMut::new();
        frame::encode_hello(PROTOCOL_VERSION, &mut b);
        c.send_raw(&b).await;
        match c.next().await {
            Got::Hello(v) => assert_eq!(v, PROTOCOL_VERSION),
            other => panic!("expected hello, got {other:?}"),
        }
        match c.next().await {
            Got::Msg(ServerMsg::Welcome { challenge, .. }) => c.challenge = challenge,
            other => panic!("expected welcome, got {other:?}"),
        }
        c
    }

    /// Connects, says hello and registers `name` with `id`; returns the client and its token.
    pub async fn register(addr: SocketAddr, name: &str, id: &Identity) -> (Self, TokenCredentials) {
        Self::register_with_lan(addr, name, id, vec![]).await
    }

    /// [`Self::register`], reporting `lan_addrs`.
    pub async fn register_with_lan(
        addr: SocketAddr,
        name: &str,
        id: &Identity,
        lan_addrs: Vec<SocketAddr>,
    ) -> (Self, TokenCredentials) {
        let mut c = Self::hello(addr).await;
        c.send_register(name, id, lan_addrs).await;
        match c.next_msg().await {
            ServerMsg::Registered {
                token, relay_ack_every, ..
            } => {
                c.ack_every = relay_ack_every;
                (c, token)
            }
            other => panic!("expected registered, got {other:?}"),
        }
    }

    pub async fn send_register(&mut self, name: &str, id: &Identity, lan_addrs: Vec<SocketAddr>) {
        let signature = id.sign(&self.challenge, &self.binding, name);
        self.send(&ClientMsg::Register {
            name: name.into(),
            cert: id.cert.clone(),
            signature,
            lan_addrs,
        })
        .await;
    }

    pub async fn send(&mut self, msg: &ClientMsg) {
        let mut b = BytesMut::new();
        frame::encode_control(msg, &mut b).expect("encodes");
        self.send_raw(&b).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("writes");
        self.stream.flush().await.expect("flushes");
    }

    /// The next frame, answering pings on the way; panics after [`STEP`].
    pub async fn next(&mut self) -> Got {
        tokio::time::timeout(STEP, self.next_inner(true))
            .await
            .expect("a frame within the step time")
    }

    /// The next frame without answering pings (a peer that ignores the server).
    pub async fn next_no_pong(&mut self) -> Got {
        tokio::time::timeout(STEP, self.next_inner(false))
            .await
            .expect("a frame within the step time")
    }

    async fn next_inner(&mut self, pong: bool) -> Got {
        let decoder = FrameDecoder::new(MAX_FRAME_LEN);
        loop {
            if let Some(raw) = decoder.decode(&mut self.buf).expect("server frames decode") {
                match raw.parse().expect("server frames parse") {
                    Frame::Hello(h) => return Got::Hello(h.version),
                    Frame::Error(e) => return Got::Error(e),
                    Frame::Control(body) => {
                        let msg: ServerMsg = decode_control(body).expect("server messages decode");
                        if let (true, ServerMsg::Ping { nonce, .. }) = (pong, &msg) {
                            self.send(&ClientMsg::Pong { nonce: *nonce }).await;
                            continue;
                        }
                        return Got::Msg(msg);
                    }
                    Frame::Relay { .. } => {
                        if self.acks {
                            self.unacked += 1;
                            if self.unacked >= self.ack_every {
                                let frames = std::mem::take(&mut self.unacked);
                                self.send(&ClientMsg::RelayAck { frames }).await;
                            }
                        }
                        return Got::Relay(raw.into_wire());
                    }
                }
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Got::Eof,
                Ok(_) => {}
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// The next frame within `within` (answering pings), or `None` if nothing comes.
    pub async fn try_next(&mut self, within: Duration) -> Option<Got> {
        tokio::time::timeout(within, self.next_inner(true)).await.ok()
    }

    /// Sends a relay frame for `call`; returns its bytes as sent.
    pub async fn send_relay(&mut self, call: u32, payload: &[u8]) -> Bytes {
        let f = relay_frame(call, payload);
        self.send_raw(&f).await;
        f
    }

    /// The next frame, which must be a relay frame; returns its bytes.
    pub async fn expect_relay(&mut self) -> Bytes {
        match self.next().await {
            Got::Relay(b) => b,
            other => panic!("expected a relay frame, got {other:?}"),
        }
    }

    pub async fn next_msg(&mut self) -> ServerMsg {
        match self.next().await {
            Got::Msg(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    pub async fn expect_error(&mut self) -> ErrorFrame {
        match self.next().await {
            Got::Error(e) => e,
            other => panic!("expected an error frame, got {other:?}"),
        }
    }

    pub async fn expect_eof(&mut self) {
        match self.next().await {
            Got::Eof => {}
            other => panic!("expected the server to close, got {other:?}"),
        }
    }

    pub async fn lookup(&mut self, name: &str) -> ServerMsg {
        self.send(&ClientMsg::Lookup { name: name.into() }).await;
        self.next_msg().await
    }
}

/// TLS to the server under test. These tests exercise the server, not how peers trust it
/// (`crates/net` tests pinning against a man in the middle): any key is taken, but the
/// handshake signature is still checked.
pub fn tls_connector() -> tokio_rustls::TlsConnector {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyKey(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![natcall_proto::ALPN.to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

#[derive(Debug)]
struct AnyKey(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyKey {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A GET of `path` on the server's HTTP endpoint at `addr`: the whole response, head and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint listens");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("writes");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("in time")
        .expect("reads");
    out
}

/// A `redis-server` of a test's own on a free loopback port (no persistence), killed when
/// dropped.
pub struct Redis {
    child: std::process::Child,
    pub port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    /// Starts one; returns once it accepts connections.
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (tests/run-all.sh installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}
