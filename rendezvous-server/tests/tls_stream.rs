//! The server's split TLS stream (`tls::stream`): bytes cross intact both ways at once, a key
//! update and a record that does not open are handled as TLS says, and the reader tells a
//! clean close from a cut connection.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use natcall_rendezvous::tls::stream::{self, PeerReader, PeerWriter};
use natcall_rendezvous::tls::{ServerTls, TlsSource};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

/// A listener whose first connection is accepted with the server's TLS and split.
async fn accept_one() -> (SocketAddr, tokio::task::JoinHandle<(PeerReader, PeerWriter)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let addr = listener.local_addr().expect("addr");
    let tls = ServerTls::load(TlsSource::SelfSigned { dir: None }).expect("identity");
    let accepted = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accepts");
        let stream = tls.acceptor().accept(tcp).await.expect("handshake");
        stream::split(stream)
    });
    (addr, accepted)
}

async fn client(addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connects");
    common::tls_connector()
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .expect("handshake")
}

#[tokio::test]
async fn a_megabyte_each_way_at_once_arrives_intact() {
    let (addr, accepted) = accept_one().await;
    let mut c = client(addr).await;
    let (mut rd, mut wr) = accepted.await.expect("split");
    // The server echoes through its two halves, each in its own task.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let reader = tokio::spawn(async move {
        let mut buf = bytes::BytesMut::with_capacity(4096);
        loop {
            buf.clear();
            match rd.read_buf(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => tx.send(buf.to_vec()).await.expect("writer runs"),
                Err(e) => return Err(e),
            }
        }
    });
    let writer = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            wr.write_all(&chunk).await?;
            wr.flush().await?;
        }
        wr.shutdown().await
    });
    let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let (mut crd, mut cwr) = tokio::io::split(c);
    let out = sent.clone();
    let send = tokio::spawn(async move {
        // Odd-sized writes, so records and reads do not line up.
        for chunk in out.chunks(3_001) {
            cwr.write_all(chunk).await.expect("client writes");
        }
        cwr.flush().await.expect("flush");
        cwr
    });
    let mut back = Vec::with_capacity(sent.len());
    timeout(WAIT, async {
        while back.len() < sent.len() {
            let mut buf = [0u8; 8192];
            let n = crd.read(&mut buf).await.expect("client reads");
            assert!(n > 0, "the echo ended after {} bytes", back.len());
            back.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the echo arrives in time");
    assert!(back == sent, "the bytes that came back differ from those sent");
    // A clean close each way: the client's close_notify ends the server's reader with Ok(0),
    // the server's writer answers with its own.
    let mut cwr = send.await.expect("sender");
    cwr.shutdown().await.expect("client close_notify");
    c = crd.unsplit(cwr);
    timeout(WAIT, reader)
        .await
        .expect("reader ends")
        .expect("task")
        .expect("a clean end, not an error");
    timeout(WAIT, writer)
        .await
        .expect("writer ends")
        .expect("task")
        .expect("shutdown");
    let mut rest = Vec::new();
    let n = timeout(WAIT, c.read_to_end(&mut rest))
        .await
        .expect("server closes")
        .expect("the server's close_notify came");
    assert_eq!(n, 0, "nothing after the echo");
}

#[tokio::test]
async fn the_connection_carries_on_across_a_key_update() {
    let (addr, accepted) = accept_one().await;
    let mut c = client(addr).await;
    let (mut rd, mut wr) = accepted.await.expect("split");
    // The client asks for new keys: a record with no data, which the reader must open without
    // taking it for an end, and whose answer the writer's next record carries.
    c.get_mut().1.refresh_traffic_keys().expect("key update queued");
    c.write_all(b"ping").await.expect("writes");
    c.flush().await.expect("flush");
    let mut buf = [0u8; 16];
    let n = timeout(WAIT, rd.read(&mut buf)).await.expect("in time").expect("opens");
    assert_eq!(&buf[..n], b"ping");
    wr.write_all(b"pong").await.expect("writes");
    wr.flush().await.expect("flush");
    let n = timeout(WAIT, c.read(&mut buf)).await.expect("in time").expect("opens");
    assert_eq!(&buf[..n], b"pong");
    // And again, both sides on their new keys.
    c.write_all(b"again").await.expect("writes");
    c.flush().await.expect("flush");
    let n = timeout(WAIT, rd.read(&mut buf)).await.expect("in time").expect("opens");
    assert_eq!(&buf[..n], b"again");
}

#[tokio::test]
async fn a_record_that_does_not_open_is_refused_and_the_peer_told_why() {
    let (addr, accepted) = accept_one().await;
    let c = client(addr).await;
    let (mut rd, mut wr) = accepted.await.expect("split");
    // An application-data record of 32 bytes no key sealed, as a path that flips bits sends.
    let (mut tcp, mut conn) = c.into_inner();
    let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x20];
    forged.extend_from_slice(&[0x5a; 32]);
    tcp.write_all(&forged).await.expect("sends");
    let mut buf = [0u8; 64];
    let read = timeout(WAIT, rd.read(&mut buf)).await.expect("the reader decides");
    assert_eq!(read.map_err(|e| e.kind()), Err(std::io::ErrorKind::InvalidData));
    // The alert the session made while reading goes out with the writer's close.
    let _ = timeout(WAIT, wr.shutdown()).await.expect("closes");
    let mut raw = Vec::new();
    timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("closes")
        .expect("reads");
    conn.read_tls(&mut &raw[..]).expect("takes the records");
    let err = conn.process_new_packets().expect_err("an alert");
    assert_eq!(
        err,
        rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac),
        "the client is told its record did not open"
    );
}

#[tokio::test]
async fn a_connection_cut_without_close_notify_is_an_error_not_an_end() {
    let (addr, accepted) = accept_one().await;
    let c = client(addr).await;
    let (mut rd, _wr) = accepted.await.expect("split");
    let (tcp, _conn) = c.into_inner();
    drop(tcp); // a FIN with no close_notify: a truncation, as an attacker on the path could make
    let mut buf = [0u8; 64];
    let read = timeout(WAIT, rd.read(&mut buf)).await.expect("the reader sees the end");
    assert_eq!(read.map_err(|e| e.kind()), Err(std::io::ErrorKind::UnexpectedEof));
}
