//! The TLS stream of one peer connection, split between the connection's reader and the
//! outbox's writer. The writer hands its half back when it ends, so a connection that ends with
//! a reset can be put together again (`ReadHalf::unsplit`) to set `SO_LINGER` 0 on its socket.

/// The TLS stream of a peer connection.
pub type PeerStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
/// Its read half (the connection's reader).
pub type PeerReader = tokio::io::ReadHalf<PeerStream>;
/// Its write half (the outbox's writer).
pub type PeerWriter = tokio::io::WriteHalf<PeerStream>;

/// Splits a TLS stream whose handshake is done into its reader and writer.
///
/// One lock guards the whole stream (`tokio::io::split`), held across the system calls as well
/// as the cryptography. A split that shares only rustls's session, each half doing its own
/// system calls, was built and measured (see docs/BENCHMARKS.md, "What TLS on the server
/// channel costs"): it halved the lock's futex calls but used the same CPU per relayed packet
/// and more memory, so the simple split stays.
pub fn split(stream: PeerStream) -> (PeerReader, PeerWriter) {
    tokio::io::split(stream)
}
