//! The api server on `api.listen`: `/metrics` (OpenMetrics text), `/healthz` (the process
//! serves), `/readyz` (every running component has done its first reconcile) and `/status`
//! (JSON of every component). Read-only: nothing here changes daemon state.
//!
//! Whoever reaches the address can connect, so what a connection may cost is bounded: the
//! request head must arrive within [`HEADER_READ_TIMEOUT`] and fit in [`MAX_HEAD_BYTES`]; a
//! connection lives at most [`CONNECTION_LIFETIME`] (keep-alive included); at most
//! [`MAX_CONNECTIONS`] are open, and when they are, the oldest is closed for a new one, so slow
//! clients cannot keep the kubelet's probes and Prometheus out; one address has at most
//! [`MAX_CONNECTIONS_PER_ADDRESS`]. Both limits are logged once per [`REFUSAL_LOG_INTERVAL`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::status::StatusBoard;

#[derive(Debug)]
pub struct ApiState {
    pub registry: Registry,
    pub board: Arc<StatusBoard>,
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Routes one request. `openmetrics`: the client's Accept header asks for OpenMetrics.
pub fn route(
    state: &ApiState,
    method: &Method,
    path: &str,
    openmetrics: bool,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n",
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match path {
        "/metrics" => match metrics::encode(&state.registry) {
            Ok(text) if openmetrics => {
                reply(StatusCode::OK, metrics::OPENMETRICS_CONTENT_TYPE, text)
            }
            Ok(text) => reply(
                StatusCode::OK,
                metrics::PROMETHEUS_CONTENT_TYPE,
                metrics::to_prometheus_text(&text),
            ),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("encoding metrics failed: {e}\n"),
            ),
        },
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let report = state.board.report();
            if report.ready {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                let waiting: Vec<&str> = report
                    .components
                    .iter()
                    .filter(|(_, c)| !c.ready && c.state != crate::status::ComponentState::NotBuilt)
                    .map(|(n, _)| n.as_str())
                    .collect();
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: waiting for {}\n", waiting.join(", ")),
                )
            }
        }
        "/status" => match serde_json::to_vec_pretty(&state.board.report()) {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("encoding status failed: {e}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics /healthz /readyz /status\n",
        ),
    }
}

/// Binds `addr`, with an error that names it (a taken port is the usual start-up failure).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("api.listen {addr}: {e}")))
}

/// A request head (request line and headers) must be complete this soon after the connection
/// opened or the previous response was sent.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head read (hyper's read buffer; a larger head is answered 431).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Headers in one request.
pub const MAX_HEADERS: usize = 32;
/// A connection is closed (gracefully, between requests) this long after it was accepted.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Open connections in all.
pub const MAX_CONNECTIONS: usize = 128;
/// Open connections from one source address.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 16;
/// How often a refused connection is logged at most (with the count since the last line).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One open connection.
#[derive(Debug)]
struct Open {
    address: IpAddr,
    /// Cancelled to close the connection at once (it is the oldest and a slot is needed).
    evict: CancellationToken,
}

/// The open connections. Ids grow with the accept order, so the smallest is the oldest.
#[derive(Debug, Default)]
struct Slots {
    next_id: u64,
    open: std::collections::BTreeMap<u64, Open>,
    by_address: HashMap<IpAddr, usize>,
    refused: u64,
    evicted: u64,
    last_logged: Option<tokio::time::Instant>,
}

impl Slots {
    fn forget(&mut self, id: u64) {
        if let Some(o) = self.open.remove(&id) {
            if let Some(n) = self.by_address.get_mut(&o.address) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.by_address.remove(&o.address);
                }
            }
        }
    }
}

/// One taken slot; dropping it gives the slot back.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    id: u64,
    evict: CancellationToken,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(self.id);
    }
}

/// Takes a slot for a connection from `peer`. All slots taken: the oldest connection is closed
/// to make room — a slow client's connection is always older than a probe that just arrived,
/// and a real client reconnects. One address at its own limit: the new connection is refused.
/// Both are counted and logged now and then.
fn take_slot(slots: &Arc<Mutex<Slots>>, peer: SocketAddr) -> Option<Slot> {
    let mut s = slots.lock().unwrap_or_else(|e| e.into_inner());
    let address = peer.ip();
    let from_peer = s.by_address.get(&address).copied().unwrap_or(0);
    let slot = if from_peer >= MAX_CONNECTIONS_PER_ADDRESS {
        s.refused += 1;
        None
    } else {
        if s.open.len() >= MAX_CONNECTIONS {
            if let Some((&oldest, _)) = s.open.iter().next() {
                if let Some(o) = s.open.get(&oldest) {
                    o.evict.cancel();
                }
                s.forget(oldest);
                s.evicted += 1;
            }
        }
        let id = s.next_id;
        s.next_id += 1;
        let evict = CancellationToken::new();
        s.open.insert(
            id,
            Open {
                address,
                evict: evict.clone(),
            },
        );
        *s.by_address.entry(address).or_insert(0) += 1;
        Some(Slot {
            slots: slots.clone(),
            id,
            evict,
        })
    };
    let now = tokio::time::Instant::now();
    if (s.refused > 0 || s.evicted > 0)
        && s.last_logged
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL)
    {
        tracing::warn!(
            %peer,
            open = s.open.len(),
            refused = s.refused,
            evicted = s.evicted,
            limit = MAX_CONNECTIONS,
            limit_per_address = MAX_CONNECTIONS_PER_ADDRESS,
            "api: connection limit reached: the oldest connections were closed to make room (evicted), connections from addresses at their own limit refused (counts since the last line)"
        );
        s.refused = 0;
        s.evicted = 0;
        s.last_logged = Some(now);
    }
    slot
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<ApiState>, shutdown: CancellationToken) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "api: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = take_slot(&slots, peer) else {
            drop(stream);
            continue;
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let evict = slot.evict.clone();
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let openmetrics = req
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                let resp = route(&state, req.method(), req.uri().path(), openmetrics);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .max_headers(MAX_HEADERS)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let lifetime = tokio::time::sleep(CONNECTION_LIFETIME);
            tokio::pin!(lifetime);
            let mut closing = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "api: connection ended with an error");
                        }
                        break;
                    }
                    _ = shutdown.cancelled(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    () = &mut lifetime, if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    () = evict.cancelled() => break,
                }
            }
        });
    }
}

/// A tiny GET client for `vpn-router status` and tests: returns status code and body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(StatusCode, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot reach the api at {addr}: {e} (is `vpn-router run` running, and is api.listen {addr}?)"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("api at {addr}: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("api at {addr}: {e}"))?;
    let status = resp.status();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| format!("api at {addr}: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
