//! A gluetun-compatible control server model, written from gluetun's documented behaviour (its
//! wiki's control-server page and DESIGN.md's "External facts"): the state a gateway is in and
//! the pure mapping from a request to the response gluetun would give. The server in
//! `servers.rs` re-reads the state file on every request, so the lab flips a gateway's mode
//! by rewriting one JSON file.
//!
//! Must not do I/O: `respond` and `health` are pure so they are unit-tested without privileges.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::http::{Request, Response};

/// How the control server authenticates (gluetun's `auth = "none" | "basic" | "apikey"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GluetunAuth {
    #[default]
    None,
    Basic {
        username: String,
        password: String,
    },
    ApiKey {
        key: String,
    },
}

/// Everything the mock answers from; the state file holds this as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GluetunState {
    /// running | starting | stopping | stopped | crashed | completed
    pub status: String,
    /// The exit IP while the tunnel is up ("" reports the IP as unknown, as gluetun does while
    /// it has not found it).
    pub public_ip: String,
    pub region: String,
    /// The ports gluetun's port forwarding got from the provider: `None` while it never ran
    /// (`VPN_PORT_FORWARDING=off`, or before the first tunnel), `Some(vec![])` when the
    /// provider gave none.
    pub ports: Option<Vec<u16>>,
    pub auth: GluetunAuth,
    /// What the health server (:9999) reports; gluetun's can be stale, so the lab keeps it
    /// `true` while the tunnel is silently dead.
    pub healthy: bool,
}

impl GluetunState {
    /// A healthy, running gateway.
    pub fn running(public_ip: &str, ports: Option<Vec<u16>>, auth: GluetunAuth) -> Self {
        Self {
            status: "running".into(),
            public_ip: public_ip.into(),
            region: "Lab".into(),
            ports,
            auth,
            healthy: true,
        }
    }
}

/// The realistic ways a gateway breaks, and what the lab does for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayBreak {
    /// The gluetun process is gone (killed): connections to :8000 and :9999 are refused.
    ProcessGone,
    /// The API answers `{"status":"stopped"}`, the public IP is empty and health says 500.
    ApiStopped,
    /// The API says running but `{"public_ip":""}` (tunnel lost, not yet noticed by status).
    PublicIpEmpty,
    /// The API still says running and healthy, but the gateway forwards nothing: the tunnel is
    /// dead. Only a data-plane probe sees this.
    TunnelDead,
    /// The control server's credentials changed: every API call gets 401.
    AuthChanged,
}

impl GatewayBreak {
    pub const ALL: [GatewayBreak; 5] = [
        GatewayBreak::ProcessGone,
        GatewayBreak::ApiStopped,
        GatewayBreak::PublicIpEmpty,
        GatewayBreak::TunnelDead,
        GatewayBreak::AuthChanged,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            GatewayBreak::ProcessGone => "gluetun process killed",
            GatewayBreak::ApiStopped => "API says stopped",
            GatewayBreak::PublicIpEmpty => "public IP empty",
            GatewayBreak::TunnelDead => "tunnel silently dead (API still says running)",
            GatewayBreak::AuthChanged => "credentials changed (401)",
        }
    }

    /// The state file content for this break, from a healthy state (None: the break is not
    /// a state change).
    pub fn apply(self, healthy: &GluetunState) -> Option<GluetunState> {
        let mut s = healthy.clone();
        match self {
            GatewayBreak::ProcessGone | GatewayBreak::TunnelDead => return None,
            GatewayBreak::ApiStopped => {
                s.status = "stopped".into();
                s.healthy = false;
            }
            GatewayBreak::PublicIpEmpty => s.public_ip.clear(),
            GatewayBreak::AuthChanged => {
                s.auth = GluetunAuth::ApiKey {
                    key: "rotated-key-the-router-does-not-know".into(),
                }
            }
        }
        Some(s)
    }
}

fn authorized(auth: &GluetunAuth, req: &Request) -> bool {
    match auth {
        GluetunAuth::None => true,
        GluetunAuth::ApiKey { key } => req.header("x-api-key") == Some(key.as_str()),
        GluetunAuth::Basic { username, password } => {
            let Some(v) = req.header("authorization") else {
                return false;
            };
            let Some(b64) = v
                .strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
            else {
                return false;
            };
            let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
                return false;
            };
            raw == format!("{username}:{password}").as_bytes()
        }
    }
}

fn status_json(value: &str) -> String {
    serde_json::json!({ "status": value }).to_string()
}

/// The control server's answer to `req` in `state`. `state` is None when the state file
/// could not be read (answered 500, so a broken lab is loud).
pub fn respond(state: &GluetunState, req: &Request) -> Response {
    let path = req.path.split('?').next().unwrap_or("");
    if !authorized(&state.auth, req) {
        let r = Response::text(401, "Unauthorized\n");
        return match state.auth {
            GluetunAuth::Basic { .. } => {
                r.with_header("WWW-Authenticate", "Basic realm=\"gluetun\"")
            }
            _ => r,
        };
    }
    let running = state.status == "running";
    match (req.method.as_str(), path) {
        ("GET", "/v1/vpn/status" | "/v1/openvpn/status") => {
            Response::json(200, status_json(&state.status))
        }
        ("PUT", "/v1/vpn/status" | "/v1/openvpn/status") => {
            // The server persists the change; here we only validate and echo the outcome.
            match serde_json::from_str::<serde_json::Value>(&req.body)
                .ok()
                .and_then(|v| v.get("status").and_then(|s| s.as_str().map(str::to_owned)))
            {
                Some(s) if s == "running" || s == "stopped" => {
                    Response::json(200, serde_json::json!({ "outcome": s }).to_string())
                }
                _ => Response::text(400, "body must be {\"status\":\"running\"|\"stopped\"}\n"),
            }
        }
        ("GET", "/v1/publicip/ip") => {
            let ip = if running {
                state.public_ip.as_str()
            } else {
                ""
            };
            let body = if ip.is_empty() {
                serde_json::json!({ "public_ip": "" })
            } else {
                serde_json::json!({
                    "public_ip": ip,
                    "region": state.region,
                    "country": "Labland",
                    "city": "Netns",
                    "organization": "vpn-router lab",
                })
            };
            Response::json(200, body.to_string())
        }
        // v3.41.2+ (the example's image): `{"port":N,"ports":[N,...]}`, `port` the first;
        // `"ports":null` while port forwarding never started. A stopped VPN has stopped its
        // port forwarding: no ports.
        ("GET", "/v1/portforward") => {
            let ports = match &state.ports {
                Some(p) if running => Some(p.clone()),
                Some(_) => Some(Vec::new()),
                None => None,
            };
            let port = ports.as_ref().and_then(|p| p.first().copied()).unwrap_or(0);
            Response::json(
                200,
                serde_json::json!({ "port": port, "ports": ports }).to_string(),
            )
        }
        ("GET", "/v1/openvpn/portforwarded") => {
            Response::text(301, "").with_header("Location", "/v1/portforward")
        }
        (_, p) if p.starts_with("/v1/") => Response::text(404, "Not Found\n"),
        _ => Response::text(404, "Not Found\n"),
    }
}

/// The state a PUT /v1/vpn/status leaves behind (None: the request changes nothing).
pub fn state_after(state: &GluetunState, req: &Request, resp: &Response) -> Option<GluetunState> {
    if req.method != "PUT" || resp.status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&req.body).ok()?;
    let s = v.get("status")?.as_str()?;
    let mut next = state.clone();
    next.status = s.to_string();
    next.healthy = s == "running";
    Some(next)
}

/// The health server's answer (gluetun: 200 when healthy, 500 and a reason otherwise).
pub fn health(state: &GluetunState) -> Response {
    if state.healthy && state.status == "running" {
        Response::text(200, "")
    } else if state.status != "running" {
        Response::text(500, format!("VPN is {}\n", state.status))
    } else {
        Response::text(500, "healthcheck failed: lookup timed out\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: String::new(),
            peer: "192.168.26.1:5555".parse().unwrap(),
            local: "192.168.25.128:8000".parse().unwrap(),
        }
    }

    #[test]
    fn running_gateway_answers_every_endpoint() {
        let s = GluetunState::running("203.0.113.10", Some(vec![40000]), GluetunAuth::None);
        assert_eq!(
            respond(&s, &req("GET", "/v1/vpn/status", &[])).body,
            r#"{"status":"running"}"#
        );
        let ip: serde_json::Value =
            serde_json::from_str(&respond(&s, &req("GET", "/v1/publicip/ip", &[])).body).unwrap();
        assert_eq!(ip["public_ip"], "203.0.113.10");
        assert_eq!(
            respond(&s, &req("GET", "/v1/portforward", &[])).body,
            r#"{"port":40000,"ports":[40000]}"#
        );
        let moved = respond(&s, &req("GET", "/v1/openvpn/portforwarded", &[]));
        assert_eq!(moved.status, 301);
        let off = GluetunState::running("203.0.113.10", None, GluetunAuth::None);
        assert_eq!(
            respond(&off, &req("GET", "/v1/portforward", &[])).body,
            r#"{"port":0,"ports":null}"#
        );
        assert_eq!(health(&s).status, 200);
        assert_eq!(respond(&s, &req("GET", "/v1/nope", &[])).status, 404);
    }

    #[test]
    fn breaks_change_answers() {
        let ok = GluetunState::running("203.0.113.10", Some(vec![40000]), GluetunAuth::None);
        let stopped = GatewayBreak::ApiStopped.apply(&ok).unwrap();
        assert_eq!(
            respond(&stopped, &req("GET", "/v1/vpn/status", &[])).body,
            r#"{"status":"stopped"}"#
        );
        assert_eq!(
            respond(&stopped, &req("GET", "/v1/publicip/ip", &[])).body,
            r#"{"public_ip":""}"#
        );
        assert_eq!(health(&stopped).status, 500);
        assert_eq!(
            respond(&stopped, &req("GET", "/v1/portforward", &[])).body,
            r#"{"port":0,"ports":[]}"#
        );
        let noip = GatewayBreak::PublicIpEmpty.apply(&ok).unwrap();
        assert_eq!(
            respond(&noip, &req("GET", "/v1/publicip/ip", &[])).body,
            r#"{"public_ip":""}"#
        );
        let auth = GatewayBreak::AuthChanged.apply(&ok).unwrap();
        assert_eq!(
            respond(&auth, &req("GET", "/v1/vpn/status", &[])).status,
            401
        );
        assert!(GatewayBreak::TunnelDead.apply(&ok).is_none());
    }

    #[test]
    fn auth_methods() {
        let basic = GluetunState::running(
            "203.0.113.10",
            None,
            GluetunAuth::Basic {
                username: "router".into(),
                password: "pw".into(),
            },
        );
        let good = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("router:pw")
        );
        assert_eq!(
            respond(&basic, &req("GET", "/v1/vpn/status", &[])).status,
            401
        );
        assert_eq!(
            respond(
                &basic,
                &req("GET", "/v1/vpn/status", &[("Authorization", &good)])
            )
            .status,
            200
        );
        let key = GluetunState::running(
            "203.0.113.10",
            None,
            GluetunAuth::ApiKey { key: "k1".into() },
        );
        assert_eq!(
            respond(&key, &req("GET", "/v1/vpn/status", &[("X-API-Key", "k1")])).status,
            200
        );
        assert_eq!(
            respond(&key, &req("GET", "/v1/vpn/status", &[("X-API-Key", "k2")])).status,
            401
        );
    }

    #[test]
    fn put_status_stops_and_starts() {
        let ok = GluetunState::running("203.0.113.10", None, GluetunAuth::None);
        let mut r = req("PUT", "/v1/vpn/status", &[]);
        r.body = r#"{"status":"stopped"}"#.into();
        let resp = respond(&ok, &r);
        assert_eq!(resp.body, r#"{"outcome":"stopped"}"#);
        let next = state_after(&ok, &r, &resp).unwrap();
        assert_eq!(next.status, "stopped");
        assert!(!next.healthy);
    }
}
