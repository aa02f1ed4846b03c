//! The writer of one connection: it drains the connection's [`Outbox`] into the socket.
//!
//! Data flow:
//! 1. [`Outbox::take`] hands a batch: every waiting server frame, then relay frames as far as
//!    the client's window allows;
//! 2. the batch is written with a non-blocking vectored write (the frames are not copied); what
//!    the socket does not take at once is written with a timer of `stall_after`;
//! 3. with nothing to write, the writer waits for the outbox, or, while the client makes no
//!    progress with frames waiting, for at most what is left of `stall_after`;
//! 4. a close asked of the outbox comes after everything queued: a half-close (`shutdown`), or
//!    a reset for a connection being shed.
//!
//! How the writer ended is published on a watch ([`Status`]), which the connection's reader
//! selects on: a stalled client is shed, a peer that reset the connection is counted as such.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::{Outbox, Take};
use crate::sockopt;

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
/// how it went on `status`.
pub(crate) async fn run(wr: OwnedWriteHalf, outbox: Arc<Outbox>, stall_after: Duration, status: watch::Sender<Status>) {
    let end = write_until_closed(wr, &outbox, stall_after, &status).await;
    status.send_replace(end);
}

async fn write_until_closed(
    mut wr: OwnedWriteHalf,
    outbox: &Outbox,
    stall_after: Duration,
    status: &watch::Sender<Status>,
) -> Status {
    let stalled = || {
        status.send_replace(Status::Stalled);
    };
    let mut batch: Vec<Bytes> = Vec::with_capacity(32);
    loop {
        if outbox.overflowed() {
            stalled();
        }
        match outbox.take(Instant::now().into_std(), &mut batch) {
            // Most batches fit in the socket at once: written without arming a timer.
            Take::Frames => match try_write(&wr, &mut batch) {
                Ok(true) => {}
                Ok(false) => match tokio::time::timeout(stall_after, write_all(&mut wr, &mut batch)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return failed(&e),
                    Err(_) => {
                        // The reader sheds the client and closes the outbox with a reset.
                        stalled();
                        return Status::Stalled;
                    }
                },
                Err(e) => return failed(&e),
            },
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
                let _ = sockopt::arm_reset(wr.as_ref());
                // No FIN: the socket closes with a reset when the reader drops its half.
                wr.forget();
                return Status::Closed;
            }
            Take::Close(false) => {
                let _ = wr.shutdown().await;
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

/// Drops the first `n` written bytes from `batch`: whole frames, then the front of a partial one.
fn advance(batch: &mut Vec<Bytes>, mut n: usize) {
    let whole = batch
        .iter()
        .take_while(|b| {
            let fits = n >= b.len();
            if fits {
                n -= b.len();
            }
            fits
        })
        .count();
    batch.drain(..whole);
    if n > 0 {
        if let Some(first) = batch.first_mut() {
            *first = first.slice(n..);
        }
    }
}

/// Writes what the socket takes now without waiting; `Ok(true)` when all of `batch` went out
/// (it is then empty), `Ok(false)` when the rest must wait for the socket.
fn try_write(wr: &OwnedWriteHalf, batch: &mut Vec<Bytes>) -> io::Result<bool> {
    while !batch.is_empty() {
        let slices: Vec<io::IoSlice<'_>> = batch.iter().map(|b| io::IoSlice::new(b)).collect();
        match wr.try_write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => advance(batch, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Writes every frame in `batch` (emptying it) with as few vectored writes as the kernel allows.
async fn write_all(wr: &mut OwnedWriteHalf, batch: &mut Vec<Bytes>) -> io::Result<()> {
    while !batch.is_empty() {
        let n = {
            let slices: Vec<io::IoSlice<'_>> = batch.iter().map(|b| io::IoSlice::new(b)).collect();
            wr.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        advance(batch, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_drops_written_frames_and_the_front_of_a_partial_one() {
        let mut batch = vec![
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"defg"),
            Bytes::from_static(b"h"),
        ];
        advance(&mut batch, 5);
        assert_eq!(batch, vec![Bytes::from_static(b"fg"), Bytes::from_static(b"h")]);
        advance(&mut batch, 3);
        assert!(batch.is_empty());
    }
}
