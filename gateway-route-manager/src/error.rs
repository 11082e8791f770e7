//! Error and failure types of this crate.
//!
//! Owns: the classification of a failed gateway check ([`FailureReason`]), the error of one
//! check ([`CheckError`], which names the gateway and the endpoint), and the errors of the kernel
//! side ([`NetlinkError`], [`EgressError`], [`SysctlError`]). It must not log, retry or decide
//! anything: callers do.

use std::fmt;
use std::net::Ipv4Addr;

/// Why one check of one gateway failed. Kept as the gateway's current reason and counted in
/// `vpn_router_gateway_check_failures_total{reason=...}` (see [`FailureReason::label`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureReason {
    /// TCP connection refused: nothing listens (pod down, wrong port).
    ConnectionRefused,
    /// No answer within the per-request timeout.
    Timeout,
    /// Any other transport error (reset, host unreachable, closed mid-response).
    Transport(String),
    /// HTTP 401: the control server requires authentication.
    Unauthorized,
    /// Any other non-success HTTP status.
    HttpStatus(u16),
    /// The body was not the JSON we expected.
    BadJson(String),
    /// gluetun answered but its VPN is not running (`starting`, `stopped`, `crashed`, ...).
    VpnNotRunning(String),
    /// gluetun's public IP is empty: the tunnel is down or not yet up.
    EmptyPublicIp,
    /// The data-plane probe through the gateway failed.
    ProbeFailed(String),
    /// gluetun's health server answered "unhealthy" (HTTP 500 and a text).
    HealthServerUnhealthy(String),
}

impl FailureReason {
    /// A short, stable label for metrics (low cardinality: no free text).
    pub fn label(&self) -> &'static str {
        match self {
            FailureReason::ConnectionRefused => "connection_refused",
            FailureReason::Timeout => "timeout",
            FailureReason::Transport(_) => "transport",
            FailureReason::Unauthorized => "unauthorized",
            FailureReason::HttpStatus(_) => "http_status",
            FailureReason::BadJson(_) => "bad_json",
            FailureReason::VpnNotRunning(_) => "vpn_not_running",
            FailureReason::EmptyPublicIp => "empty_public_ip",
            FailureReason::ProbeFailed(_) => "probe_failed",
            FailureReason::HealthServerUnhealthy(_) => "health_server_unhealthy",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureReason::ConnectionRefused => {
                write!(
                    f,
                    "connection refused (is the gateway up and the port right?)"
                )
            }
            FailureReason::Timeout => write!(f, "timed out"),
            FailureReason::Transport(detail) => write!(f, "transport error: {detail}"),
            FailureReason::Unauthorized => write!(
                f,
                "401 Unauthorized — set gateways.health.control_server.auth \
                 (basic username/password_file or api_key_file)"
            ),
            FailureReason::HttpStatus(code) => write!(f, "unexpected HTTP status {code}"),
            FailureReason::BadJson(detail) => write!(f, "bad JSON: {detail}"),
            FailureReason::VpnNotRunning(status) => {
                write!(f, "VPN is not running (status {status:?})")
            }
            FailureReason::EmptyPublicIp => {
                write!(f, "public IP is empty (tunnel down or not yet up)")
            }
            FailureReason::ProbeFailed(detail) => write!(f, "probe failed: {detail}"),
            FailureReason::HealthServerUnhealthy(text) => {
                write!(f, "health server says unhealthy: {text}")
            }
        }
    }
}

/// One failed request or probe: which gateway, which endpoint, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gateway {gateway}: {endpoint}: {reason}")]
pub struct CheckError {
    pub gateway: Ipv4Addr,
    /// `GET /v1/vpn/status`, `health server :9999`, `probe 1.1.1.1:443`, ...
    pub endpoint: String,
    pub reason: FailureReason,
}

/// A netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a NETLINK_ROUTE socket: {0} (needs CAP_NET_ADMIN for writes)")]
    Open(#[source] std::io::Error),
    #[error("netlink connection closed while {what}")]
    Closed { what: String },
    #[error("{what}: kernel said {errno} ({message})")]
    Kernel {
        what: String,
        errno: i32,
        message: String,
    },
    #[error("{what}: cannot decode kernel answer: {detail}")]
    Decode { what: String, detail: String },
    #[error("interface {name:?} does not exist (gateways.interface)")]
    NoSuchInterface { name: String },
}

impl NetlinkError {
    /// The kernel's errno, if the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// The egress reconciler could not bring the kernel to the desired state.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("egress: reading kernel state failed: {0}")]
    Dump(#[source] NetlinkError),
    #[error("egress: {count} change(s) failed, first: {first}")]
    Apply {
        count: usize,
        #[source]
        first: NetlinkError,
    },
    /// Read back after writing, the kill switch is still incomplete.
    #[error("egress: the kill switch is not in the kernel after writing it: {missing} change(s) still needed, first: {first}")]
    NotInForce { missing: usize, first: String },
}

/// Writing or reading a sysctl failed.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error(
        "sysctl {name} does not exist on this kernel ({kernel}); it needs Linux {needs}+ — \
         ECMP choices will not be identical across routers"
    )]
    Missing {
        name: String,
        kernel: String,
        needs: &'static str,
    },
    #[error("sysctl {name}: cannot write {value:?} to {path}: {source}")]
    Write {
        name: String,
        value: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}
