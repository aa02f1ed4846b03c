//! Registered idle peers: open `count` TCP connections, register each, measure server RSS.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use natcall::{ServerStream, ServerTrust};
use natcall_proto::PROTOCOL_VERSION;
use natcall_proto::auth::registration_message;
use natcall_proto::codec::decode_control;
use natcall_proto::control::{ClientMsg, ServerMsg};
use natcall_proto::frame::{self, Frame, FrameDecoder, MAX_FRAME_LEN};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::server::Spawned;

#[derive(Debug)]
pub struct IdleResult {
    pub count: usize,
    pub rss_before: u64,
    pub rss_after: u64,
}

impl IdleResult {
    pub fn per_peer(&self) -> f64 {
        (self.rss_after.saturating_sub(self.rss_before)) as f64 / self.count as f64
    }
}

/// One identity signs for every peer: registration cost is the same, keygen is not the
/// thing measured. Names differ, so each peer is its own registry entry.
pub(crate) struct Signer {
    cert: Vec<u8>,
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl Signer {
    pub(crate) fn new() -> Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["natcall.invalid".into()])?.self_signed(&key)?;
        let rng = SystemRandom::new();
        Ok(Self {
            cert: cert.der().to_vec(),
            key: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der(), &rng)
                .map_err(|e| anyhow::anyhow!("key: {e}"))?,
            rng,
        })
    }
}

pub(crate) async fn next_msg(stream: &mut (impl AsyncRead + Unpin), buf: &mut BytesMut) -> Result<ServerMsg> {
    let decoder = FrameDecoder::new(MAX_FRAME_LEN);
    loop {
        if let Some(raw) = decoder.decode(buf)? {
            match raw.parse()? {
                Frame::Control(body) => return Ok(decode_control(body)?),
                Frame::Hello(_) => continue,
                Frame::Error(e) => bail!("server refused: {}", e.message),
                Frame::Relay { .. } => bail!("unexpected relay frame"),
            }
        }
        if stream.read_buf(buf).await? == 0 {
            bail!("server closed the connection");
        }
    }
}

/// A registered raw client over TLS, as natcall clients connect (no Nagle delay on small relay
/// writes; the server's key trusted on first use).
pub(crate) async fn register(addr: SocketAddr, name: String, signer: &Signer) -> Result<ServerStream> {
    let (mut s, binding) = natcall::connect_tls(addr, ServerTrust::first_use(addr.to_string()))
        .await
        .context("connecting")?;
    let mut out = BytesMut::new();
    frame::encode_hello(PROTOCOL_VERSION, &mut out);
    s.write_all(&out).await?;
    s.flush().await?;
    let mut buf = BytesMut::new();
    let ServerMsg::Welcome { challenge, .. } = next_msg(&mut s, &mut buf).await? else {
        bail!("expected welcome")
    };
    let signature = signer
        .key
        .sign(&signer.rng, &registration_message(&challenge, &binding, &name))
        .map_err(|_| anyhow::anyhow!("signing failed"))?;
    let signature = signature.as_ref().to_vec();
    out.clear();
    frame::encode_control(
        &ClientMsg::Register {
            name,
            cert: signer.cert.clone(),
            signature,
            lan_addrs: vec![],
        },
        &mut out,
    )?;
    s.write_all(&out).await?;
    s.flush().await?;
    match next_msg(&mut s, &mut buf).await? {
        ServerMsg::Registered { .. } => Ok(s),
        other => bail!("expected registered, got {other:?}"),
    }
}

/// Registers `count` peers that then stay idle, and measures within the idle timeout.
pub async fn idle(server: &Spawned, count: usize) -> Result<IdleResult> {
    let signer = std::sync::Arc::new(Signer::new()?);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = server.rss()?;
    let mut conns = Vec::with_capacity(count);
    let batch = 200;
    for chunk in (0..count).collect::<Vec<_>>().chunks(batch) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let signer = signer.clone();
            let addr = server.addr;
            set.spawn(async move { register(addr, format!("idle-{i}"), &signer).await });
        }
        while let Some(r) = set.join_next().await {
            conns.push(r??);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = server.rss()?;
    drop(conns);
    Ok(IdleResult {
        count,
        rss_before,
        rss_after,
    })
}
