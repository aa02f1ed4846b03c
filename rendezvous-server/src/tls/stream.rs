//! The TLS stream of one peer connection, split between the connection's reader and the
//! outbox's writer. The writer hands its half back when it ends, so a connection that ends with
//! a reset can be put together again (`ReadHalf::unsplit`) to set `SO_LINGER` 0 on its socket.

/// The TLS stream of a peer connection.
pub type PeerStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
/// Its read half (the connection's reader).
pub type PeerReader = tokio::io::ReadHalf<PeerStream>;
/// Its write half (the outbox's writer).
pub type PeerWriter = tokio::io::WriteHalf<PeerStream>;
