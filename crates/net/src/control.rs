//! The TCP control connection to the rendezvous server: hello, registration, then a reader task
//! (pings answered, relay frames to the socket, control messages to the endpoint) and a writer
//! task (one bounded queue, batched writes).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use natcall_proto::PROTOCOL_VERSION;
use natcall_proto::codec::decode_control;
use natcall_proto::control::{ClientMsg, Fingerprint, ServerMsg};
use natcall_proto::frame::{self, ErrorFrame, Frame, FrameDecoder, LEN_PREFIX, MAX_FRAME_LEN};
use natcall_proto::relay::{RELAY_HEADER_LEN, TrafficClass};
use natcall_proto::stun::TokenCredentials;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tracing::{debug, trace};

use crate::Error;
use crate::identity::Identity;
use crate::socket::fake_addr;

/// Frames queued towards the server (relay packets included) before new ones are dropped.
const WRITE_QUEUE: usize = 4096;
/// How long connecting and registering may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server said when registration succeeded.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub(crate) fingerprint: Fingerprint,
    pub(crate) relay_ack_every: u32,
    pub(crate) token: TokenCredentials,
    pub(crate) stun_addr: SocketAddr,
}

/// Where relayed packets go: QUIC packets to the socket adapter (and on to quinn), media packets
/// to the calls' media sessions; each with the call's fake address.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub(crate) quic: mpsc::Sender<(SocketAddr, Bytes)>,
    pub(crate) media: mpsc::Sender<(SocketAddr, Bytes)>,
}

/// What goes to the writer task.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// An encoded frame.
    Frame(Bytes),
    /// Answer once everything queued before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
    /// Write what is queued, then half-close (FIN): the server answers by closing its side.
    Close,
}

/// What the reader passes to the endpoint.
#[derive(Debug)]
pub(crate) enum ServerEvent {
    Msg(ServerMsg),
    /// The connection ended; the reason is for a person.
    Closed(String),
}

/// Encodes a control message as a frame.
pub(crate) fn control_frame(msg: &ClientMsg) -> Result<Bytes, Error> {
    let mut b = BytesMut::new();
    frame::encode_control(msg, &mut b).map_err(|e| Error::Protocol(e.to_string()))?;
    Ok(b.freeze())
}

struct Handshake {
    stream: TcpStream,
    buf: BytesMut,
}

impl Handshake {
    async fn next(&mut self) -> Result<ServerMsg, Error> {
        let decoder = FrameDecoder::new(MAX_FRAME_LEN);
        loop {
            if let Some(raw) = decoder
                .decode(&mut self.buf)
                .map_err(|e| Error::Protocol(e.to_string()))?
            {
                match raw.parse().map_err(|e| Error::Protocol(e.to_string()))? {
                    Frame::Hello(h) => {
                        h.check(PROTOCOL_VERSION).map_err(|e| Error::Protocol(e.to_string()))?;
                        continue;
                    }
                    Frame::Control(body) => return decode_control(body).map_err(|e| Error::Protocol(e.to_string())),
                    Frame::Error(e) => return Err(refused(&e)),
                    Frame::Relay { .. } => return Err(Error::Protocol("relay frame during registration".into())),
                }
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(Error::Protocol(
                    "the server closed the connection during registration".into(),
                ));
            }
        }
    }
}

fn refused(e: &ErrorFrame) -> Error {
    Error::Refused {
        code: e.code,
        message: e.message.clone(),
    }
}

/// Connects to `server`, registers `name`, and starts the reader and writer tasks.
/// Returns the writer queue and what the server said.
pub(crate) async fn connect(
    server: SocketAddr,
    identity: &Identity,
    name: &str,
    lan_addrs: Vec<SocketAddr>,
    relay_in: Inbound,
    events: mpsc::Sender<ServerEvent>,
) -> Result<(mpsc::Sender<Outgoing>, Registration), Error> {
    let fut = async {
        let stream = TcpStream::connect(server)
            .await
            .map_err(|source| Error::Unreachable { addr: server, source })?;
        stream.set_nodelay(true)?;
        let mut hs = Handshake {
            stream,
            buf: BytesMut::new(),
        };
        let mut out = BytesMut::new();
        frame::encode_hello(PROTOCOL_VERSION, &mut out);
        hs.stream.write_all(&out).await?;
        let ServerMsg::Welcome { challenge, .. } = hs.next().await? else {
            return Err(Error::Protocol("expected a welcome from the server".into()));
        };
        let signature = identity.sign_registration(&challenge, name)?;
        let register = ClientMsg::Register {
            name: name.to_owned(),
            cert: identity.cert_der().to_vec(),
            signature,
            lan_addrs,
        };
        hs.stream.write_all(&control_frame(&register)?).await?;
        match hs.next().await? {
            ServerMsg::Registered {
                fingerprint,
                token,
                stun_addr,
                relay_ack_every,
                ..
            } => Ok((
                hs,
                Registration {
                    fingerprint,
                    relay_ack_every,
                    token,
                    stun_addr: stun_addr.unwrap_or(server),
                },
            )),
            other => Err(Error::Protocol(format!("expected registration, got {other:?}"))),
        }
    };
    let (hs, reg) = tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| Error::Protocol(format!("the server at {server} did not complete registration in time")))??;
    let (rd, wr) = hs.stream.into_split();
    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
    tokio::spawn(write_loop(wr, rx));
    tokio::spawn(read_loop(rd, hs.buf, tx.clone(), relay_in, events, reg.relay_ack_every));
    Ok((tx, reg))
}

async fn read_loop(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    tx: mpsc::Sender<Outgoing>,
    relay_in: Inbound,
    events: mpsc::Sender<ServerEvent>,
    ack_every: u32,
) {
    let decoder = FrameDecoder::new(MAX_FRAME_LEN);
    // The relay engine's health check: after every `ack_every` relay frames read, tell the
    // server so it can send more (see the server's outbox).
    let mut unacked = 0u32;
    let reason = loop {
        match decoder.decode(&mut buf) {
            Ok(Some(raw)) => match raw.parse() {
                Ok(Frame::Relay { header, .. }) => {
                    unacked += 1;
                    if unacked >= ack_every.max(1) {
                        if let Ok(f) = control_frame(&ClientMsg::RelayAck { frames: unacked }) {
                            let _ = tx.try_send(Outgoing::Frame(f));
                        }
                        unacked = 0;
                    }
                    let payload = raw.into_wire().slice(LEN_PREFIX + 1 + RELAY_HEADER_LEN..);
                    // QUIC travels as control class; audio and video are the call's media.
                    let queue = if header.class == TrafficClass::Control {
                        &relay_in.quic
                    } else {
                        &relay_in.media
                    };
                    if queue.try_send((fake_addr(header.call), payload)).is_err() {
                        trace!(call = header.call, "relay inbound queue full: packet dropped");
                    }
                }
                Ok(Frame::Control(body)) => match decode_control::<ServerMsg>(body) {
                    Ok(ServerMsg::Ping { nonce, .. }) => {
                        if let Ok(f) = control_frame(&ClientMsg::Pong { nonce }) {
                            let _ = tx.try_send(Outgoing::Frame(f));
                        }
                    }
                    Ok(msg) => {
                        if events.send(ServerEvent::Msg(msg)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => break format!("the server sent a malformed message: {e}"),
                },
                Ok(Frame::Error(e)) => break format!("the server closed the connection: {}", e.message),
                Ok(Frame::Hello(_)) => {}
                Err(e) => break format!("the server sent a bad frame: {e}"),
            },
            Ok(None) => match rd.read_buf(&mut buf).await {
                Ok(0) => break "the server closed the connection".to_owned(),
                Ok(_) => {}
                Err(e) => break format!("lost the connection to the server: {e}"),
            },
            Err(e) => break format!("the server sent a bad frame: {e}"),
        }
    };
    debug!(%reason, "control connection ended");
    let _ = events.send(ServerEvent::Closed(reason)).await;
}

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Outgoing>) {
    let mut batch = BytesMut::new();
    let mut flushed = Vec::new();
    let mut closing = false;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                Outgoing::Frame(f) => batch.extend_from_slice(&f),
                Outgoing::Flush(done) => flushed.push(done),
                Outgoing::Close => closing = true,
            }
            if batch.len() < 64 * 1024 && !closing {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() && wr.write_all(&batch).await.is_err() {
            return;
        }
        batch.clear();
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
        if closing {
            break;
        }
    }
    let _ = wr.shutdown().await;
}
