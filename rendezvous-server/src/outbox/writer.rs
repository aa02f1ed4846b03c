//! The writer of one connection: it drains the connection's [`Outbox`] into the TLS stream.
//!
//! Data flow:
//! 1. [`Outbox::take`] hands a batch: every waiting server frame, then relay frames as far as
//!    the client's window allows;
//! 2. the batch is copied into one buffer, so TLS seals it as few records as its size allows
//!    (one AEAD operation per 16 KiB, not one per frame), and written without waiting; what
//!    the socket does not take at once is written with a timer of `stall_after`;
//! 3. with nothing to write, the writer waits for the outbox, or, while the client makes no
//!    progress with frames waiting, for at most what is left of `stall_after`;
//! 4. a close asked of the outbox comes after everything queued: TLS close_notify and a
//!    half-close, or a reset for a connection being shed.
//!
//! How the writer ended is published on a watch ([`Status`]), which the connection's reader
//! selects on: a stalled client is shed, a peer that reset the connection is counted as such.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::{Outbox, Take};
use crate::sockopt;
use crate::tls::stream::PeerWriter;

/// What the writer is doing, or how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Still writing.
    Writing,
    /// The client made no progress for `stall_after`, or let its queues overflow: it must be
    /// shed. The writer keeps running until the close.
    Stalled,
    /// The peer reset the connection (`ECONNRESET`, `EPIPE`).
    Reset,
    /// Another write error (the peer vanished).
    Failed,
    /// A close was asked for and done: everything queued was written.
    Closed,
}

/// Writes what `outbox` hands out until a close, a stall's close or a write error; publishes
/// how it went on `status`, and hands the write half back (the connection sets `SO_LINGER` 0
/// on the whole stream when it ends with a reset).
pub(crate) async fn run(
    mut wr: PeerWriter,
    outbox: Arc<Outbox>,
    stall_after: Duration,
    status: watch::Sender<Status>,
) -> PeerWriter {
    let end = write_until_closed(&mut wr, &outbox, stall_after, &status).await;
    status.send_replace(end);
    wr
}

async fn write_until_closed(
    wr: &mut PeerWriter,
    outbox: &Outbox,
    stall_after: Duration,
    status: &watch::Sender<Status>,
) -> Status {
    let stalled = || {
        status.send_replace(Status::Stalled);
    };
    let mut batch: Vec<Bytes> = Vec::with_capacity(32);
    let mut plain: Vec<u8> = Vec::new();
    loop {
        if outbox.overflowed() {
            stalled();
        }
        match outbox.take(Instant::now().into_std(), &mut batch) {
            Take::Frames => {
                plain.clear();
                for frame in batch.drain(..) {
                    plain.extend_from_slice(&frame);
                }
                // Most batches fit in the socket at once: written without arming a timer.
                match try_write(wr, &plain) {
                    Ok((_, true)) => {}
                    Ok((n, false)) => match tokio::time::timeout(stall_after, write_all(wr, &plain[n..])).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return failed(&e),
                        Err(_) => {
                            // The reader sheds the client and closes the outbox with a reset.
                            stalled();
                            return Status::Stalled;
                        }
                    },
                    Err(e) => return failed(&e),
                }
                // An idle connection does not keep a large buffer.
                if plain.capacity() > 64 * 1024 {
                    plain = Vec::new();
                }
            }
            Take::Idle => {
                let now = Instant::now();
                match outbox.stalled_for(now.into_std()) {
                    Some(d) if d >= stall_after => {
                        stalled();
                        outbox.wait().await; // the reader closes the outbox: wait for that
                    }
                    Some(d) => {
                        let _ = tokio::time::timeout(stall_after - d, outbox.wait()).await;
                    }
                    None => outbox.wait().await,
                }
            }
            Take::Close(true) => {
                // No close_notify, no FIN: the connection resets the socket once it has this
                // half back.
                return Status::Closed;
            }
            Take::Close(false) => {
                let _ = tokio::time::timeout(stall_after, wr.shutdown()).await;
                return Status::Closed;
            }
        }
    }
}

fn failed(e: &io::Error) -> Status {
    debug!(error = %e, "write failed");
    if sockopt::is_reset(e) {
        Status::Reset
    } else {
        Status::Failed
    }
}

/// Writes what TLS and the socket take now without waiting: how many bytes of `plain` TLS took,
/// and whether that was all of them and TLS handed every record to the socket.
fn try_write(wr: &mut PeerWriter, plain: &[u8]) -> io::Result<(usize, bool)> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut done = 0;
    while done < plain.len() {
        match Pin::new(&mut *wr).poll_write(&mut cx, &plain[done..]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => done += n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok((done, false)),
        }
    }
    match Pin::new(&mut *wr).poll_flush(&mut cx) {
        Poll::Ready(Ok(())) => Ok((done, true)),
        Poll::Ready(Err(e)) => Err(e),
        // Records still wait for the socket: the slow path flushes them.
        Poll::Pending => Ok((done, false)),
    }
}

/// Writes all of `plain` (possibly nothing: what is left) and flushes TLS's records to the
/// socket.
async fn write_all(wr: &mut PeerWriter, plain: &[u8]) -> io::Result<()> {
    if !plain.is_empty() {
        wr.write_all(plain).await?;
    }
    wr.flush().await
}
