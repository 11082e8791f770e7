//! The processes the lab runs inside its namespaces (as `vpn-router-lab` subcommands): the
//! gluetun-compatible control + health server of a gateway, and the echo service used by the
//! Internet, the node (intranet) and ingress pods.
//!
//! Each runs until killed; the lab kills them by namespace. They log one line per connection
//! to an optional file so the lab can see "who the Internet saw" after the fact.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::gluetun::{self, GluetunState};
use crate::http::{Request, Response};

type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// Failure to start a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Appends one line to a log file (best effort: a full disk must not kill the server).
fn log_line(path: Option<&Path>, line: &str) {
    if let Some(p) = path {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

async fn read_request(s: &mut TcpStream, peer: SocketAddr, local: SocketAddr) -> Option<Request> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut req = Request::parse_head(&head, peer, local)?;
    let mut body = buf[head_end + 4..].to_vec();
    let want = req.content_length().min(1024 * 1024);
    while body.len() < want {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(want);
    req.body = String::from_utf8_lossy(&body).into_owned();
    Some(req)
}

async fn serve_http(listener: TcpListener, handler: Handler) {
    loop {
        let Ok((mut s, peer)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let Ok(local) = s.local_addr() else { return };
            let req =
                tokio::time::timeout(Duration::from_secs(10), read_request(&mut s, peer, local));
            let Ok(Some(req)) = req.await else { return };
            let resp = handler(req);
            let _ = s.write_all(&resp.to_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

fn runtime() -> Result<tokio::runtime::Runtime, ServerError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)
}

/// Reads a state file.
pub fn read_state(path: &Path) -> Result<GluetunState, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes a state file atomically (the server may be reading it).
pub fn write_state(path: &Path, state: &GluetunState) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string_pretty(state).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The gluetun control server on `listen` and health server on `health_listen`, answering
/// from `state_file`, re-read on every request.
pub fn run_gluetun(
    listen: SocketAddr,
    health_listen: SocketAddr,
    state_file: PathBuf,
    log: Option<PathBuf>,
) -> Result<(), ServerError> {
    runtime()?.block_on(async move {
        let control = bind_tcp(listen).await?;
        let health = bind_tcp(health_listen).await?;
        let sf = state_file.clone();
        let lg = log.clone();
        let control_handler: Handler = Arc::new(move |req: Request| {
            let state = match read_state(&sf) {
                Ok(s) => s,
                Err(e) => return Response::text(500, format!("lab: state file: {e}\n")),
            };
            let resp = gluetun::respond(&state, &req);
            if let Some(next) = gluetun::state_after(&state, &req, &resp) {
                if let Err(e) = write_state(&sf, &next) {
                    return Response::text(500, format!("lab: state file: {e}\n"));
                }
            }
            log_line(
                lg.as_deref(),
                &format!(
                    "control {} {} {} -> {}",
                    req.peer, req.method, req.path, resp.status
                ),
            );
            resp
        });
        let sf = state_file.clone();
        let health_handler: Handler = Arc::new(move |_req: Request| match read_state(&sf) {
            Ok(s) => gluetun::health(&s),
            Err(e) => Response::text(500, format!("lab: state file: {e}\n")),
        });
        tokio::spawn(serve_http(health, health_handler));
        serve_http(control, control_handler).await;
        Ok(())
    })
}

/// What the echo service listens on.
#[derive(Debug, Clone, Default)]
pub struct EchoConfig {
    /// Name reported in answers (`X-Lab-Server`, `/whoami`, TCP greeting).
    pub name: String,
    /// HTTP: `GET /` answers the client's address (like ifconfig services); `GET /whoami`
    /// answers JSON with server name, local and peer addresses.
    pub http: Vec<SocketAddr>,
    /// Raw TCP echo: greets with `<name> <peer-ip:port>\n`, then echoes every byte.
    pub tcp_echo: Vec<SocketAddr>,
    /// UDP echo: sends every datagram back.
    pub udp_echo: Vec<SocketAddr>,
    /// One line per connection: `http|tcp <peer> <local>`.
    pub log: Option<PathBuf>,
}

/// Runs the echo service until killed.
pub fn run_echo(cfg: EchoConfig) -> Result<(), ServerError> {
    runtime()?.block_on(async move {
        let name = Arc::new(cfg.name.clone());
        let log = Arc::new(cfg.log.clone());
        for addr in &cfg.http {
            let l = bind_tcp(*addr).await?;
            let name = name.clone();
            let log = log.clone();
            let h: Handler = Arc::new(move |req: Request| {
                log_line(
                    log.as_deref(),
                    &format!("http {} {} {}", req.peer, req.local, req.path),
                );
                let resp = match req.path.as_str() {
                    "/whoami" => Response::json(
                        200,
                        serde_json::json!({
                            "server": name.as_str(),
                            "local": req.local.to_string(),
                            "peer": req.peer.to_string(),
                        })
                        .to_string(),
                    ),
                    _ => Response::text(200, format!("{}\n", req.peer.ip())),
                };
                resp.with_header("X-Lab-Server", name.as_str())
            });
            tokio::spawn(serve_http(l, h));
        }
        for addr in &cfg.tcp_echo {
            let l = bind_tcp(*addr).await?;
            let name = name.clone();
            let log = log.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((mut s, peer)) = l.accept().await else {
                        continue;
                    };
                    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    log_line(log.as_deref(), &format!("tcp {peer} {local}"));
                    let greeting = format!("{} {peer}\n", name);
                    tokio::spawn(async move {
                        if s.write_all(greeting.as_bytes()).await.is_err() {
                            return;
                        }
                        let mut buf = [0u8; 4096];
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                }
            });
        }
        for addr in &cfg.udp_echo {
            let sock = UdpSocket::bind(addr)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: *addr,
                    source,
                })?;
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                loop {
                    if let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                        let _ = sock.send_to(&buf[..n], peer).await;
                    }
                }
            });
        }
        std::future::pending::<()>().await;
        Ok(())
    })
}
