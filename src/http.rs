//! The HTTP endpoint: `/metrics`, `/health/live`, `/health/ready`.
//!
//! A deliberately tiny HTTP/1.0 responder: GET only (405 otherwise), request head capped at
//! 8 KiB and due within `REQUEST_TIMEOUT` (408 and closed otherwise); it serves three fixed
//! paths and pulls in no web framework. The merkle endpoint (`crate::http_merkle`) reuses its
//! listener loop, head reading and response writing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::resilience::circuit_breaker::BreakerState;

/// Readiness: set once the worker is connected and consuming.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A circuit breaker's position, as `/health/ready` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerPosition {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerPosition {
    fn as_str(self) -> &'static str {
        match self {
            BreakerPosition::Closed => "closed",
            BreakerPosition::Open => "open",
            BreakerPosition::HalfOpen => "half-open",
        }
    }
}

impl From<BreakerState> for BreakerPosition {
    fn from(state: BreakerState) -> BreakerPosition {
        match state {
            BreakerState::Closed { .. } => BreakerPosition::Closed,
            BreakerState::Open { .. } => BreakerPosition::Open,
            BreakerState::HalfOpen => BreakerPosition::HalfOpen,
        }
    }
}

/// The backend state `/health/ready` lists besides readiness. An open breaker does not make
/// the pod unready: with the WAL it keeps settling, so this is for the operator to read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadyState {
    /// Circuit breaker per backend (`l3`, `l2`, `dlq`).
    pub breakers: Vec<(String, BreakerPosition)>,
    /// Bytes in the local write-ahead log, waiting to drain into L3.
    pub wal_bytes: u64,
    /// Ids whose L2 write failed, waiting for repair from L3.
    pub l2_stale_ids: u64,
    /// The engine's memory pressure level.
    pub backpressure: crate::pressure::BackpressureLevel,
    /// The membership filter's trust, e.g. `trusted` or `untrusted (warm-up failed: …)`
    /// (`None`: no filter, the line is left out).
    pub filter: Option<String>,
}

impl ReadyState {
    fn render(&self) -> String {
        let mut body = String::new();
        for (backend, position) in &self.breakers {
            body.push_str(&format!("circuit {backend} {}\n", position.as_str()));
        }
        body.push_str(&format!("wal_bytes {}\nl2_stale_ids {}\n", self.wal_bytes, self.l2_stale_ids));
        body.push_str(&format!("backpressure {}\n", self.backpressure));
        if let Some(filter) = &self.filter {
            body.push_str(&format!("filter {filter}\n"));
        }
        body
    }
}

/// Reads the live backend state on every `/health/ready` request; whoever runs the worker
/// builds it from the engine and the worker it starts.
pub type ReadyProbe = Arc<dyn Fn() -> ReadyState + Send + Sync>;

/// The whole request head must arrive within this, or the client gets 408 and is closed: a
/// silent or trickling client cannot hold a connection and its task for ever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// A client that never reads its response cannot hold the connection for ever either.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEAD_BYTES: usize = 8192;

/// Metrics rendered by their owner on every scrape instead of through the recorder, whose
/// series never go away (the lag of the partitions a worker owns *now*).
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// What the endpoint needs to answer a request.
#[derive(Clone)]
struct Endpoint {
    handle: PrometheusHandle,
    readiness: Readiness,
    probe: ReadyProbe,
    extra: ExtraMetrics,
}

/// Serves the endpoint until `stop` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    readiness: Readiness,
    probe: ReadyProbe,
    extra: ExtraMetrics,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let endpoint = Endpoint { handle, readiness, probe, extra };
    serve_with(addr, "metrics", stop, move |stream| answer(stream, endpoint.clone())).await
}

/// Binds `addr` and answers every connection with `handler` on a task of its own until `stop`
/// is cancelled; `what` names the listener in logs. Shared by the metrics and merkle endpoints.
pub(crate) async fn serve_with<H, F>(
    addr: SocketAddr,
    what: &'static str,
    stop: CancellationToken,
    handler: H,
) -> std::io::Result<SocketAddr>
where
    H: Fn(TcpStream) -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => { tracing::warn!(%error, endpoint = what, "endpoint accept failed"); continue; }
                },
            };
            tokio::spawn(handler(stream));
        }
    });
    Ok(bound)
}

async fn answer(mut stream: TcpStream, endpoint: Endpoint) {
    let (status, body) = match read_head_within(&mut stream).await {
        Some(head) => endpoint.route(&head),
        None => ("408 Request Timeout", "request timeout\n".to_owned()),
    };
    // 405 must say what is allowed (RFC 9110); it costs nothing on the other answers.
    let head = "content-type: text/plain; version=0.0.4\r\nallow: GET\r\n";
    respond(&mut stream, status, head, &body).await;
}

/// The request head, or `None` when it did not arrive within `REQUEST_TIMEOUT` (answer 408).
pub(crate) async fn read_head_within(stream: &mut TcpStream) -> Option<String> {
    tokio::time::timeout(REQUEST_TIMEOUT, read_head(stream)).await.ok()
}

/// Writes an HTTP/1.0 response and gives up after `RESPONSE_TIMEOUT`. `headers` are extra
/// header lines, each ending in CRLF.
pub(crate) async fn respond(stream: &mut TcpStream, status: &str, headers: &str, body: &str) {
    let response =
        format!("HTTP/1.0 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
    let _ = tokio::time::timeout(RESPONSE_TIMEOUT, stream.write_all(response.as_bytes())).await;
}

/// Reads until the blank line that ends the head, the size cap, or the client's EOF.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = vec![0u8; MAX_HEAD_BYTES];
    let mut read = 0;
    while read < head.len() && !head[..read].windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut head[read..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    String::from_utf8_lossy(&head[..read]).into_owned()
}

impl Endpoint {
    fn route(&self, head: &str) -> (&'static str, String) {
        let mut request_line = head.split_whitespace();
        let (method, path) = (request_line.next().unwrap_or(""), request_line.next().unwrap_or(""));
        if method != "GET" {
            return ("405 Method Not Allowed", "only GET\n".to_owned());
        }
        match path {
            "/metrics" => ("200 OK", self.handle.render() + &(self.extra)()),
            "/health/live" => ("200 OK", "ok\n".to_owned()),
            "/health/ready" if self.readiness.is_ready() => ("200 OK", format!("ready\n{}", (self.probe)().render())),
            "/health/ready" => ("503 Service Unavailable", format!("not ready\n{}", (self.probe)().render())),
            _ => ("404 Not Found", "not found\n".to_owned()),
        }
    }
}
