//! Baselines without a relay: the same call traffic peer to peer over plain UDP sockets, and
//! the raw UDP ceiling of this machine (one sender, one receiver, 512-byte datagrams).

use std::net::UdpSocket as StdUdp;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::load::{Load, Out, Outcome, PAYLOAD, Recorder, Sender, Window, receive_udp, udp_bound};

/// The whole datagram is the payload.
fn whole(d: &[u8]) -> Option<&[u8]> {
    Some(d)
}

/// Runs `load` peer to peer: each call is two connected UDP sockets.
pub async fn run(load: Load) -> Result<Outcome> {
    let w = Window::start(&load)?;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..load.calls {
        let (a, b) = (udp_bound()?, udp_bound()?);
        a.connect(b.local_addr()?).await?;
        b.connect(a.local_addr()?).await?;
        let (a, b) = (Arc::new(a), Arc::new(b));
        let (ra, rb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        for (sock, mine, peers) in [(&a, &ra, &rb), (&b, &rb, &ra)] {
            receivers.push(tokio::spawn(receive_udp(
                sock.clone(),
                Recorder::new(w.base, mine.clone()),
                w.drain,
                whole,
            )));
            senders.push(Sender {
                out: Out::Udp(sock.clone()),
                template: vec![0u8; PAYLOAD],
                payload_at: 0,
                peer_received: peers.clone(),
            });
        }
    }
    w.finish(senders, receivers, load).await
}

/// The raw ceiling: one thread sends 512-byte datagrams as fast as it can for `duration`,
/// another receives. Returns (sent, received, elapsed).
pub fn ceiling(duration: Duration) -> Result<(u64, u64, Duration)> {
    let rx = StdUdp::bind("127.0.0.1:0").context("binding the ceiling's receiver")?;
    let tx = StdUdp::bind("127.0.0.1:0").context("binding the ceiling's sender")?;
    for s in [&rx, &tx] {
        let r = socket2::SockRef::from(s);
        let _ = r.set_recv_buffer_size(4 << 20);
        let _ = r.set_send_buffer_size(4 << 20);
    }
    tx.connect(rx.local_addr()?)?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    let start = Instant::now();
    let end = start + duration;
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut got = 0u64;
        // Bounded: stops at the first 200 ms of silence after the sender's end.
        while let Ok(n) = rx.recv(&mut buf) {
            if n == PAYLOAD {
                got += 1;
            }
        }
        got
    });
    let pkt = [0u8; PAYLOAD];
    let mut sent = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            if tx.send(&pkt).is_ok() {
                sent += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    let got = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the ceiling's receiver panicked"))?;
    Ok((sent, got, elapsed))
}
