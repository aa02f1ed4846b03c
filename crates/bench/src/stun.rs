//! STUN Binding load: `sockets` UDP sockets, each keeping `window` requests in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use natcall_proto::stun;
use tokio::net::UdpSocket;

/// What one measurement saw.
#[derive(Debug, Default)]
pub struct StunLoad {
    pub answered: u64,
    pub lost: u64,
    pub elapsed: Duration,
    rtts: Vec<Duration>,
}

impl StunLoad {
    pub fn rate(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64()
    }

    pub fn median_rtt(&self) -> Duration {
        let mut r = self.rtts.clone();
        r.sort();
        r.get(r.len() / 2).copied().unwrap_or_default()
    }
}

/// Runs the load for `duration`.
pub async fn load(server: SocketAddr, sockets: usize, window: usize, duration: Duration) -> Result<StunLoad> {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for i in 0..sockets {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        sock.connect(server).await?;
        tasks.push(tokio::spawn(one_socket(sock, window, end, i as u32)));
    }
    let mut total = StunLoad::default();
    for t in tasks {
        let r = t.await??;
        total.answered += r.answered;
        total.lost += r.lost;
        total.rtts.extend(r.rtts);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

fn tid(socket: u32, seq: u64) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..4].copy_from_slice(&socket.to_be_bytes());
    t[4..].copy_from_slice(&seq.to_be_bytes());
    t
}

async fn one_socket(sock: Arc<UdpSocket>, window: usize, end: Instant, id: u32) -> Result<StunLoad> {
    let mut out = StunLoad::default();
    let mut req = [0u8; 64];
    let mut buf = [0u8; 256];
    let mut seq = 0u64;
    let mut sent_at = std::collections::VecDeque::new();
    let send =
        |seq: u64, req: &mut [u8; 64]| -> Result<usize> { Ok(stun::encode_binding_request(&tid(id, seq), None, req)?) };
    for _ in 0..window {
        let n = send(seq, &mut req)?;
        sock.send(&req[..n]).await?;
        sent_at.push_back((seq, Instant::now()));
        seq += 1;
    }
    while Instant::now() < end {
        match tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let got = u64::from_be_bytes(buf[12..20].try_into()?);
                if n >= 20 {
                    while let Some((s, at)) = sent_at.pop_front() {
                        if s == got {
                            out.answered += 1;
                            if out.rtts.len() < 100_000 {
                                out.rtts.push(at.elapsed());
                            }
                            break;
                        }
                        out.lost += 1;
                    }
                }
            }
            Ok(Err(_)) | Err(_) => {
                // Everything in flight is lost; start the window again.
                out.lost += sent_at.len() as u64;
                sent_at.clear();
                for _ in 0..window {
                    let n = send(seq, &mut req)?;
                    sock.send(&req[..n]).await?;
                    sent_at.push_back((seq, Instant::now()));
                    seq += 1;
                }
                continue;
            }
        }
        let n = send(seq, &mut req)?;
        sock.send(&req[..n]).await?;
        sent_at.push_back((seq, Instant::now()));
        seq += 1;
    }
    Ok(out)
}
