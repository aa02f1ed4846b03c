//! The TLS stream of one peer connection, split between the connection's reader and the
//! outbox's writer.
//!
//! rustls runs over [`SharedTcp`], a TCP stream both halves and the connection itself can
//! reach: the socket options that shed an abusive client with a reset (`SO_LINGER` 0) are set
//! on the socket underneath TLS, whichever half decides it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The TLS stream of a peer connection.
pub type PeerStream = tokio_rustls::server::TlsStream<SharedTcp>;
/// Its read half (the connection's reader).
pub type PeerReader = tokio::io::ReadHalf<PeerStream>;
/// Its write half (the outbox's writer).
pub type PeerWriter = tokio::io::WriteHalf<PeerStream>;

/// A TCP stream shared by reference count; reads and writes go through its readiness.
#[derive(Debug, Clone)]
pub struct SharedTcp(pub Arc<TcpStream>);

impl SharedTcp {
    /// The socket underneath.
    pub fn socket(&self) -> &TcpStream {
        &self.0
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            // rustls reads into its own initialised buffer: initialising is free here.
            let unfilled = buf.initialize_unfilled();
            match self.0.try_read(unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale: `try_read` cleared it, poll again to register the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Half-close (FIN); the socket itself closes when the last holder drops it.
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}
