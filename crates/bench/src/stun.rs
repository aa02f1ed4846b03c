//! STUN Binding load: `sockets` UDP sockets, each keeping `window` requests in flight
//! (answers matched by transaction id, in any order).

use std::collections::HashMap;
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
        tasks.push(tokio::spawn(one_socket(sock, window, end, i as u64)));
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

/// A request unanswered this long is lost (and replaced, keeping the window full).
const LOST_AFTER: Duration = Duration::from_millis(200);

/// Keeps `window` requests in flight on `sock` until `end`. Answers are matched by transaction
/// id, in any order (a server answering from several threads may reorder them).
async fn one_socket(sock: Arc<UdpSocket>, window: usize, end: Instant, id: u64) -> Result<StunLoad> {
    let mut out = StunLoad::default();
    let mut req = [0u8; 64];
    let mut buf = [0u8; 256];
    let mut seq = 0u64;
    let mut in_flight: HashMap<u64, Instant> = HashMap::with_capacity(window * 2);
    let mut last_sweep = Instant::now();
    while Instant::now() < end {
        while in_flight.len() < window {
            let n = stun::encode_binding_request(&tid(id as u32, seq), None, &mut req)?;
            sock.send(&req[..n]).await?;
            in_flight.insert(seq, Instant::now());
            seq += 1;
        }
        if let Ok(Ok(n)) = tokio::time::timeout(LOST_AFTER, sock.recv(&mut buf)).await {
            if n >= 20 {
                let got = u64::from_be_bytes(buf[12..20].try_into()?);
                if let Some(at) = in_flight.remove(&got) {
                    out.answered += 1;
                    if out.rtts.len() < 100_000 {
                        out.rtts.push(at.elapsed());
                    }
                }
            }
        }
        if last_sweep.elapsed() >= LOST_AFTER {
            last_sweep = Instant::now();
            let before = in_flight.len();
            in_flight.retain(|_, at| at.elapsed() < LOST_AFTER);
            out.lost += (before - in_flight.len()) as u64;
        }
    }
    Ok(out)
}
