//! A minimal TURN client (RFC 8656) on stun-rs, over UDP or TCP, for loading coturn.
//!
//! Flow of one allocation:
//! 1. Allocate (REQUESTED-TRANSPORT UDP) without credentials → 401 with REALM and NONCE;
//! 2. Allocate again with USERNAME, REALM, NONCE and MESSAGE-INTEGRITY (long-term credential,
//!    key = MD5(user:realm:password)) → success with XOR-RELAYED-ADDRESS;
//! 3. CreatePermission and ChannelBind (channel [`CHANNEL`]) for the peer's relayed address;
//! 4. data: ChannelData (`[channel u16][length u16] data`) both ways.
//!
//! Any authenticated request answered 438 (stale nonce) is sent again with the new NONCE (at
//! most three tries). Over TCP, STUN messages are delimited by their header's length and
//! ChannelData is padded to a multiple of 4 bytes. No Refresh is sent: an allocation lives for
//! one bench run (seconds; at most a few minutes), well inside the 600 s allocation and 300 s
//! permission lifetimes.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::{Buf, BytesMut};
use stun_rs::attributes::stun::{MessageIntegrity, Nonce, Realm, UserName};
use stun_rs::attributes::turn::{ChannelNumber, LifeTime, RequestedTrasport, XorPeerAddress};
use stun_rs::methods::{ALLOCATE, CHANNEL_BIND, CREATE_PERMMISSION};
use stun_rs::{
    AlgorithmId, HMACKey, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, MessageMethod, StunAttribute,
    StunMessage, StunMessageBuilder, TransactionId,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// The channel each allocation binds to its peer (the first valid number).
pub const CHANNEL: u16 = 0x4000;
/// ChannelData header: channel number and length.
pub const CHANNEL_HEADER: usize = 4;
/// UDP: retransmit a request after this long, at most [`TRIES`] times.
const RTO: Duration = Duration::from_millis(500);
const TRIES: usize = 5;

/// Client transport to the TURN server.
#[derive(Debug)]
pub enum Conn {
    Udp(UdpSocket),
    Tcp { stream: TcpStream, buf: BytesMut },
}

/// Long-term credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

/// An allocation on the server, with the state to send more authenticated requests.
#[derive(Debug)]
pub struct Allocation {
    pub conn: Conn,
    pub relayed: SocketAddr,
    user: String,
    realm: String,
    nonce: String,
    key: HMACKey,
}

/// A ChannelData message of `data.len()` bytes on `channel`, padded to 4 bytes (the padding
/// is required over TCP and harmless over UDP).
pub fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHANNEL_HEADER + data.len() + 3);
    m.extend_from_slice(&channel.to_be_bytes());
    m.extend_from_slice(&(data.len() as u16).to_be_bytes());
    m.extend_from_slice(data);
    m.resize(m.len().next_multiple_of(4), 0);
    m
}

/// Length on the wire of the message at the start of a TCP stream, if its header is there:
/// ChannelData (first two bits 01) is padded to 4, STUN is 20 + its length field.
pub fn stream_message_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 4 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    Some(match buf[0] >> 6 {
        0b01 => (CHANNEL_HEADER + len).next_multiple_of(4),
        _ => 20 + len,
    })
}

/// The data of a ChannelData message (`None` for anything else).
pub fn channel_payload(msg: &[u8]) -> Option<&[u8]> {
    if msg.len() < CHANNEL_HEADER || msg[0] >> 6 != 0b01 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
    msg.get(CHANNEL_HEADER..CHANNEL_HEADER + len)
}

fn encode(msg: &StunMessage) -> Result<Vec<u8>> {
    let mut buf = [0u8; 512];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, msg)
        .map_err(|e| anyhow::anyhow!("encoding a STUN message: {e}"))?;
    Ok(buf[..n].to_vec())
}

fn decode(data: &[u8]) -> Option<StunMessage> {
    MessageDecoderBuilder::default()
        .build()
        .decode(data)
        .ok()
        .map(|(m, _)| m)
}

impl Conn {
    pub async fn connect(server: SocketAddr, tcp: bool) -> Result<Self> {
        if tcp {
            let stream = TcpStream::connect(server)
                .await
                .with_context(|| format!("connecting to the TURN server {server} over TCP"))?;
            stream.set_nodelay(true)?;
            Ok(Self::Tcp {
                stream,
                buf: BytesMut::with_capacity(4096),
            })
        } else {
            Ok(Self::Udp(crate::load::udp_connected(server).await?))
        }
    }

    /// Sends `msg` and waits for the response with its transaction id (UDP: retransmitted).
    async fn transact(&mut self, msg: &StunMessage) -> Result<StunMessage> {
        let wire = encode(msg)?;
        let id = *msg.transaction_id();
        match self {
            Self::Udp(sock) => {
                let mut buf = [0u8; 1500];
                for _ in 0..TRIES {
                    sock.send(&wire).await?;
                    let deadline = tokio::time::Instant::now() + RTO;
                    while let Ok(r) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                        let n = r.context("receiving from the TURN server")?;
                        if let Some(m) = decode(&buf[..n]).filter(|m| *m.transaction_id() == id) {
                            return Ok(m);
                        }
                    }
                }
                bail!("no answer from the TURN server after {TRIES} tries")
            }
            Self::Tcp { stream, buf } => {
                stream.write_all(&wire).await?;
                let read = async {
                    loop {
                        while let Some(len) = stream_message_len(buf).filter(|l| buf.len() >= *l) {
                            let m = buf.split_to(len);
                            if let Some(m) = decode(&m).filter(|m| *m.transaction_id() == id) {
                                return Ok(m);
                            }
                        }
                        if stream.read_buf(buf).await? == 0 {
                            bail!("the TURN server closed the connection");
                        }
                    }
                };
                tokio::time::timeout(RTO * TRIES as u32, read)
                    .await
                    .context("no answer from the TURN server")?
            }
        }
    }
}

fn error_code(m: &StunMessage) -> Option<(u16, String)> {
    let e = m.get::<stun_rs::attributes::stun::ErrorCode>()?.as_error_code().ok()?;
    Some((e.error_code().error_code(), e.error_code().reason().to_owned()))
}

fn nonce_of(m: &StunMessage) -> Option<String> {
    Some(m.get::<Nonce>()?.as_nonce().ok()?.as_str().to_owned())
}

impl Allocation {
    /// Allocates a UDP relay on `server`, authenticating with the long-term credential.
    pub async fn new(server: SocketAddr, tcp: bool, cred: &Credentials) -> Result<Self> {
        let mut conn = Conn::connect(server, tcp).await?;
        let probe = StunMessageBuilder::new(ALLOCATE, MessageClass::Request)
            .with_transaction_id(TransactionId::default())
            .with_attribute(RequestedTrasport::new(stun_rs::protocols::UDP))
            .build();
        let challenge = conn.transact(&probe).await.context("TURN Allocate")?;
        match error_code(&challenge) {
            Some((401, _)) => {}
            other => bail!("TURN Allocate without credentials: expected 401, got {other:?}"),
        }
        let realm = challenge
            .get::<Realm>()
            .and_then(|r| r.as_realm().ok())
            .map(|r| r.as_str().to_owned())
            .context("the 401 carries no REALM")?;
        let nonce = nonce_of(&challenge).context("the 401 carries no NONCE")?;
        let key = HMACKey::new_long_term(
            &cred.user,
            &realm,
            &cred.password,
            stun_rs::Algorithm::from(AlgorithmId::MD5),
        )
        .map_err(|e| anyhow::anyhow!("long-term key: {e}"))?;
        let mut a = Self {
            conn,
            relayed: SocketAddr::from(([0, 0, 0, 0], 0)),
            user: cred.user.clone(),
            realm,
            nonce,
            key,
        };
        let ok = a
            .authenticated(
                ALLOCATE,
                vec![
                    RequestedTrasport::new(stun_rs::protocols::UDP).into(),
                    LifeTime::from(600).into(),
                ],
            )
            .await
            .context("TURN Allocate")?;
        a.relayed = *ok
            .get::<stun_rs::attributes::turn::XorRelayedAddress>()
            .and_then(|r| r.as_xor_relayed_address().ok())
            .context("the Allocate success carries no XOR-RELAYED-ADDRESS")?
            .socket_address();
        Ok(a)
    }

    /// CreatePermission and ChannelBind ([`CHANNEL`]) for `peer`.
    pub async fn bind(&mut self, peer: SocketAddr) -> Result<()> {
        self.authenticated(CREATE_PERMMISSION, vec![XorPeerAddress::from(peer).into()])
            .await
            .context("TURN CreatePermission")?;
        self.authenticated(
            CHANNEL_BIND,
            vec![ChannelNumber::new(CHANNEL).into(), XorPeerAddress::from(peer).into()],
        )
        .await
        .context("TURN ChannelBind")?;
        Ok(())
    }

    /// Sends a request with USERNAME, REALM, NONCE and MESSAGE-INTEGRITY; on 438 (stale
    /// nonce) takes the new NONCE and tries again.
    async fn authenticated(&mut self, method: MessageMethod, attrs: Vec<StunAttribute>) -> Result<StunMessage> {
        for _ in 0..3 {
            let mut b =
                StunMessageBuilder::new(method, MessageClass::Request).with_transaction_id(TransactionId::default());
            for a in &attrs {
                b = b.with_attribute(a.clone());
            }
            let msg = b
                .with_attribute(UserName::new(&self.user).map_err(|e| anyhow::anyhow!("USERNAME: {e}"))?)
                .with_attribute(Realm::new(&self.realm).map_err(|e| anyhow::anyhow!("REALM: {e}"))?)
                .with_attribute(Nonce::new(&self.nonce).map_err(|e| anyhow::anyhow!("NONCE: {e}"))?)
                .with_attribute(MessageIntegrity::new(self.key.clone()))
                .build();
            let resp = self.conn.transact(&msg).await?;
            match (resp.class(), error_code(&resp)) {
                (MessageClass::SuccessResponse, _) => return Ok(resp),
                (_, Some((438, _))) => {
                    self.nonce = nonce_of(&resp).context("a 438 without a NONCE")?;
                }
                (_, e) => bail!("the TURN server refused: {e:?}"),
            }
        }
        bail!("the TURN server kept answering 438 (stale nonce)")
    }
}

/// Reads ChannelData from a TCP stream buffer: calls `f` with every complete message's data
/// and consumes it (STUN messages are skipped).
pub fn drain_stream(buf: &mut BytesMut, mut f: impl FnMut(&[u8])) {
    while let Some(len) = stream_message_len(buf).filter(|l| buf.len() >= *l) {
        if let Some(p) = channel_payload(&buf[..len]) {
            f(p);
        }
        buf.advance(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_data_is_padded_and_framed_on_a_stream() {
        let m = channel_data(CHANNEL, &[7u8; 5]);
        assert_eq!(m.len(), 12);
        assert_eq!(stream_message_len(&m), Some(12));
        assert_eq!(channel_payload(&m), Some(&[7u8; 5][..]));
        let mut buf = BytesMut::from(&[m.clone(), m][..].concat()[..]);
        buf.extend_from_slice(&[0x40, 0x00]); // a partial header stays
        let mut got = 0;
        drain_stream(&mut buf, |p| {
            assert_eq!(p.len(), 5);
            got += 1;
        });
        assert_eq!((got, buf.len()), (2, 2));
    }

    #[test]
    fn stun_message_length_comes_from_its_header() {
        let mut m = [0u8; 28];
        m[3] = 8;
        assert_eq!(stream_message_len(&m), Some(28));
        assert_eq!(channel_payload(&m), None);
    }
}
