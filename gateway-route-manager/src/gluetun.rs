//! HTTP client for gluetun's control server (`/v1/...`, default port 8000) and its health
//! server (default port 9999).
//!
//! Owns: building requests (auth headers), the per-request timeout, decoding the JSON answers
//! and classifying every failure into a [`FailureReason`]. It must not decide health (that is
//! `health`), retry, or log secrets: [`Secret`]'s `Debug`/`Display` print `<redacted>`.
//!
//! Plain HTTP only: the control server listens on the gateway pod's address on the gateway
//! network. Connections are kept alive (one idle connection per gateway) so a check every
//! second does not open a new TCP connection each time.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;

use crate::error::{CheckError, FailureReason};

/// Answers larger than this are refused: gluetun's answers are a few hundred bytes.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest health-server text kept as a reason.
const MAX_REASON_TEXT: usize = 200;

/// A secret loaded by the caller (from a `*_file` or `${ENV}`). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How to authenticate to the control server (gluetun v3.40+ can require it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAuth {
    /// `Authorization: Basic base64(username:password)`.
    Basic { username: String, password: Secret },
    /// `X-API-Key: <key>`.
    ApiKey(Secret),
}

/// Where and how to reach gluetun on each gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GluetunSettings {
    /// Control server port (`gateways.health.control_server.port`, default 8000).
    pub control_port: u16,
    /// Health server port (gluetun's `HEALTH_SERVER_ADDRESS`, default 9999; gluetun binds it to
    /// 127.0.0.1 unless told otherwise, so the gateway must set `HEALTH_SERVER_ADDRESS=:9999`).
    pub health_port: u16,
    pub auth: Option<ControlAuth>,
    /// Whole-request timeout (connect + answer + body).
    pub timeout: Duration,
}

impl Default for GluetunSettings {
    fn default() -> Self {
        GluetunSettings {
            control_port: 8000,
            health_port: 9999,
            auth: None,
            timeout: Duration::from_millis(750),
        }
    }
}

/// `GET /v1/vpn/status` → `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VpnStatus {
    Running,
    Starting,
    Stopping,
    Stopped,
    Crashed,
    Completed,
    /// A status this version does not know; treated as not running.
    Other(String),
}

impl VpnStatus {
    fn parse(s: &str) -> VpnStatus {
        match s {
            "running" => VpnStatus::Running,
            "starting" => VpnStatus::Starting,
            "stopping" => VpnStatus::Stopping,
            "stopped" => VpnStatus::Stopped,
            "crashed" => VpnStatus::Crashed,
            "completed" => VpnStatus::Completed,
            other => VpnStatus::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            VpnStatus::Running => "running",
            VpnStatus::Starting => "starting",
            VpnStatus::Stopping => "stopping",
            VpnStatus::Stopped => "stopped",
            VpnStatus::Crashed => "crashed",
            VpnStatus::Completed => "completed",
            VpnStatus::Other(s) => s,
        }
    }
}

#[derive(Deserialize)]
struct StatusBody {
    status: String,
}

#[derive(Deserialize)]
struct PublicIpBody {
    public_ip: String,
}

/// `/v1/portforward` (v3.41+) answers `{"port":N}` or `{"ports":[...]}`;
/// `/v1/openvpn/portforwarded` answers `{"port":N}`. Port 0 means "none".
#[derive(Deserialize)]
struct PortForwardBody {
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    ports: Option<Vec<u16>>,
}

/// The client. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct GluetunClient {
    http: Client<HttpConnector, Empty<Bytes>>,
    settings: GluetunSettings,
}

impl fmt::Debug for GluetunClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GluetunClient")
            .field("settings", &self.settings)
            .finish()
    }
}

impl GluetunClient {
    pub fn new(settings: GluetunSettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.timeout));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(connector);
        GluetunClient { http, settings }
    }

    pub fn settings(&self) -> &GluetunSettings {
        &self.settings
    }

    /// `GET /v1/vpn/status`. Ok only if the status is `running`.
    pub async fn vpn_status(&self, gateway: Ipv4Addr) -> Result<VpnStatus, CheckError> {
        const PATH: &str = "/v1/vpn/status";
        let body = self.get_ok_json::<StatusBody>(gateway, PATH).await?;
        match VpnStatus::parse(&body.status) {
            VpnStatus::Running => Ok(VpnStatus::Running),
            other => Err(check_error(
                gateway,
                format!("GET {PATH}"),
                FailureReason::VpnNotRunning(other.as_str().to_owned()),
            )),
        }
    }

    /// `GET /v1/publicip/ip`. An empty `public_ip` (tunnel down) is a failure.
    pub async fn public_ip(&self, gateway: Ipv4Addr) -> Result<IpAddr, CheckError> {
        const PATH: &str = "/v1/publicip/ip";
        let body = self.get_ok_json::<PublicIpBody>(gateway, PATH).await?;
        let text = body.public_ip.trim();
        if text.is_empty() {
            return Err(check_error(
                gateway,
                format!("GET {PATH}"),
                FailureReason::EmptyPublicIp,
            ));
        }
        text.parse::<IpAddr>().map_err(|e| {
            check_error(
                gateway,
                format!("GET {PATH}"),
                FailureReason::BadJson(format!("public_ip {text:?} is not an IP address: {e}")),
            )
        })
    }

    /// Forwarded ports: `GET /v1/portforward`, falling back to the pre-v3.41
    /// `GET /v1/openvpn/portforwarded` when the new route answers 404. Empty when none.
    pub async fn forwarded_ports(&self, gateway: Ipv4Addr) -> Result<Vec<u16>, CheckError> {
        const NEW: &str = "/v1/portforward";
        const OLD: &str = "/v1/openvpn/portforwarded";
        let port = self.settings.control_port;
        let (status, body) = self.get(gateway, port, NEW, true).await?;
        let (path, status, body) = if status == StatusCode::NOT_FOUND {
            let (status, body) = self.get(gateway, port, OLD, true).await?;
            (OLD, status, body)
        } else {
            (NEW, status, body)
        };
        let parsed: PortForwardBody = decode_ok_json(gateway, path, status, &body)?;
        // `"port":0` (alone, or next to an empty or null list) is gluetun's "none"; a 0 in
        // the list is not a port.
        let listed = parsed.ports.unwrap_or_default();
        if listed.contains(&0) {
            return Err(check_error(
                gateway,
                format!("GET {path}"),
                FailureReason::BadJson(format!("port 0 in \"ports\": {listed:?}")),
            ));
        }
        let mut ports: Vec<u16> = listed
            .into_iter()
            .chain(parsed.port)
            .filter(|p| *p != 0)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        Ok(ports)
    }

    /// gluetun's health server: 200 healthy, 500 with a text explaining why not.
    pub async fn health_server(&self, gateway: Ipv4Addr) -> Result<(), CheckError> {
        let port = self.settings.health_port;
        let endpoint = format!("health server :{port}");
        let (status, body) = self.get(gateway, port, "/", false).await.map_err(|mut e| {
            e.endpoint.clone_from(&endpoint);
            e
        })?;
        if status.is_success() {
            return Ok(());
        }
        let reason = if status == StatusCode::INTERNAL_SERVER_ERROR {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.trim().chars().take(MAX_REASON_TEXT).collect();
            FailureReason::HealthServerUnhealthy(text)
        } else if status == StatusCode::UNAUTHORIZED {
            FailureReason::Unauthorized
        } else {
            FailureReason::HttpStatus(status.as_u16())
        };
        Err(check_error(gateway, endpoint, reason))
    }

    async fn get_ok_json<T: serde::de::DeserializeOwned>(
        &self,
        gateway: Ipv4Addr,
        path: &str,
    ) -> Result<T, CheckError> {
        let (status, body) = self
            .get(gateway, self.settings.control_port, path, true)
            .await?;
        decode_ok_json(gateway, path, status, &body)
    }

    /// One GET with the whole exchange (connect, headers, body) under the timeout.
    async fn get(
        &self,
        gateway: Ipv4Addr,
        port: u16,
        path: &str,
        with_auth: bool,
    ) -> Result<(StatusCode, Bytes), CheckError> {
        let endpoint = format!("GET {path}");
        let fail = |reason| check_error(gateway, endpoint.clone(), reason);
        let uri = format!("http://{}{path}", SocketAddr::from((gateway, port)));
        let mut builder =
            Request::get(uri.as_str()).header(hyper::header::USER_AGENT, "vpn-router");
        if with_auth {
            match &self.settings.auth {
                Some(ControlAuth::Basic { username, password }) => {
                    let token = base64::engine::general_purpose::STANDARD
                        .encode(format!("{username}:{}", password.expose()));
                    builder =
                        builder.header(hyper::header::AUTHORIZATION, format!("Basic {token}"));
                }
                Some(ControlAuth::ApiKey(key)) => {
                    builder = builder.header("X-API-Key", key.expose());
                }
                None => {}
            }
        }
        let request = builder.body(Empty::<Bytes>::new()).map_err(|e| {
            fail(FailureReason::Transport(format!(
                "cannot build request: {e}"
            )))
        })?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| classify_transport(&e))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| FailureReason::Transport(format!("reading body: {e}")))?
                .to_bytes();
            Ok::<_, FailureReason>((status, body))
        };
        match tokio::time::timeout(self.settings.timeout, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(reason)) => Err(fail(reason)),
            Err(_elapsed) => Err(fail(FailureReason::Timeout)),
        }
    }
}

fn check_error(gateway: Ipv4Addr, endpoint: String, reason: FailureReason) -> CheckError {
    CheckError {
        gateway,
        endpoint,
        reason,
    }
}

fn decode_ok_json<T: serde::de::DeserializeOwned>(
    gateway: Ipv4Addr,
    path: &str,
    status: StatusCode,
    body: &[u8],
) -> Result<T, CheckError> {
    let endpoint = format!("GET {path}");
    if status == StatusCode::UNAUTHORIZED {
        return Err(check_error(gateway, endpoint, FailureReason::Unauthorized));
    }
    if !status.is_success() {
        return Err(check_error(
            gateway,
            endpoint,
            FailureReason::HttpStatus(status.as_u16()),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| check_error(gateway, endpoint, FailureReason::BadJson(e.to_string())))
}

/// Walks the error chain to the underlying `io::Error` to tell "refused" from "timed out"
/// from anything else.
fn classify_transport(error: &(dyn std::error::Error + 'static)) -> FailureReason {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => FailureReason::ConnectionRefused,
                std::io::ErrorKind::TimedOut => FailureReason::Timeout,
                _ => FailureReason::Transport(io.to_string()),
            };
        }
        current = e.source();
    }
    FailureReason::Transport(error_chain(error))
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        text.push_str(": ");
        text.push_str(&e.to_string());
        current = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted() {
        let auth = ControlAuth::Basic {
            username: "router".into(),
            password: Secret::new("hunter2"),
        };
        let printed = format!("{auth:?} {}", Secret::new("hunter2"));
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("<redacted>"));
        let key = ControlAuth::ApiKey(Secret::new("k3y"));
        assert!(!format!("{key:?}").contains("k3y"));
    }

    #[test]
    fn unknown_status_is_kept() {
        assert_eq!(VpnStatus::parse("weird"), VpnStatus::Other("weird".into()));
        assert_eq!(VpnStatus::parse("crashed").as_str(), "crashed");
    }
}
