//! The HTTP endpoint beside the server: `GET /metrics` (Prometheus text), `GET /health` (one
//! JSON line of counts) and `GET /rooms` (one JSON line: each room's members and what each
//! one's buffer dropped), on hyper's HTTP/1 server.
//!
//! Flow:
//! 1. [`serve`] accepts on its own listener (`metrics_listen`, kept off the public interface)
//!    until its task is aborted, which aborts every connection it serves too;
//! 2. hyper reads each request, with at most [`HEAD_TIMEOUT`] to read its head and at most
//!    8 KiB of buffered request;
//! 3. one request per connection (`Connection: close`): a scraper every few seconds needs no
//!    keep-alive, and nothing idle outlives a scrape;
//! 4. other paths get 404, other methods 405.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

/// The longest a client may take to send a request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The most request bytes buffered per connection (hyper's minimum).
const MAX_BUF: usize = 8192;

/// Makes a JSON document (`/health`, `/rooms`).
type Document = dyn Fn() -> String + Send + Sync;

/// Serves `/metrics`, `/health` and `/rooms` on `listener` until the task is aborted.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: impl Fn() -> String + Send + Sync + 'static,
    rooms: impl Fn() -> String + Send + Sync + 'static,
) {
    let health: Arc<Document> = Arc::new(health);
    let rooms: Arc<Document> = Arc::new(rooms);
    match listener.local_addr() {
        Ok(addr) => info!(%addr, "metrics endpoint listening"),
        Err(_) => info!("metrics endpoint listening"),
    }
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .keep_alive(false);
    // Dropping the set (the task is aborted) aborts every connection still being served.
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Transient (a client gone before accept, descriptors exhausted): wait a little.
                warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (metrics, health, rooms) = (metrics.clone(), health.clone(), rooms.clone());
        let service = service_fn(move |req| {
            let response = answer(&req, &metrics, &*health, &*rooms);
            async move { Ok::<_, Infallible>(response) }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        conns.spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "metrics request failed");
            }
        });
    }
}

fn answer(req: &Request<Incoming>, metrics: &Metrics, health: &Document, rooms: &Document) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, "text/plain; version=0.0.4", metrics.render()),
        (&Method::GET, "/health") => (StatusCode::OK, "application/json", health()),
        (&Method::GET, "/rooms") => (StatusCode::OK, "application/json", rooms()),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /health or /rooms\n".to_owned(),
        ),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET"));
    }
    response
}
