//! A minimal protocol client for the server's tests.
#![allow(dead_code)] // each test binary uses a different part of this helper

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use natcall_proto::PROTOCOL_VERSION;
use natcall_proto::auth::registration_message;
use natcall_proto::codec::decode_control;
use natcall_proto::control::{ClientMsg, ServerMsg};
use natcall_proto::frame::{self, ErrorFrame, Frame, FrameDecoder, MAX_FRAME_LEN};
use natcall_proto::stun::TokenCredentials;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const STEP: Duration = Duration::from_secs(5);

/// A peer identity: self-signed certificate and its signing key.
pub struct Identity {
    pub cert: Vec<u8>,
    key: EcdsaKeyPair,
}

impl Identity {
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

    pub fn sign(&self, challenge: &[u8; 32], name: &str) -> Vec<u8> {
        self.key
            .sign(&SystemRandom::new(), &registration_message(challenge, name))
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
    Eof,
}

pub struct Client {
    pub stream: TcpStream,
    buf: BytesMut,
    pub challenge: [u8; 32],
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connects to the server");
        Self {
            stream,
            buf: BytesMut::new(),
            challenge: [0; 32],
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
        let mut c = Self::hello(addr).await;
        c.send_register(name, id, vec![]).await;
        match c.next_msg().await {
            ServerMsg::Registered { token, .. } => (c, token),
            other => panic!("expected registered, got {other:?}"),
        }
    }

    pub async fn send_register(&mut self, name: &str, id: &Identity, lan_addrs: Vec<SocketAddr>) {
        let signature = id.sign(&self.challenge, name);
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
                    Frame::Relay { .. } => panic!("unexpected relay frame"),
                }
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Got::Eof,
                Ok(_) => {}
                Err(e) => panic!("read failed: {e}"),
            }
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
