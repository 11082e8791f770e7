//! Errors of the DDNS providers and engine. Each message names the provider, the object
//! (server, zone, name) and what to do; the variant is the `kind` label of
//! `vpn_router_ddns_error`.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DdnsError {
    /// The provider refused our credentials (TSIG BADKEY/BADSIG, HTTP 401/403, Dynu auth).
    #[error("{0}")]
    Auth(String),
    /// HTTP 429: try again after `retry_after`.
    #[error("{message} (retry after {}s)", retry_after.as_secs())]
    RateLimited {
        message: String,
        retry_after: Duration,
    },
    /// No answer: connection refused, timeout, TLS failure.
    #[error("{0}")]
    Transport(String),
    /// The provider answered with an error (API error, DNS REFUSED/NOTZONE, 5xx).
    #[error("{0}")]
    Rejected(String),
    /// The records changed between our read and our write (RFC 2136 prerequisite failed).
    #[error("{0}")]
    Conflict(String),
    /// An answer we cannot read (bad JSON, wrong shape).
    #[error("{0}")]
    Protocol(String),
    /// The write was accepted but reading back shows another set.
    #[error("{0}")]
    Mismatch(String),
    /// The settings cannot work (bad TSIG key encoding, bad URL).
    #[error("{0}")]
    Config(String),
}

impl DdnsError {
    /// Value of the `kind` label.
    pub fn kind(&self) -> &'static str {
        match self {
            DdnsError::Auth(_) => "auth",
            DdnsError::RateLimited { .. } => "rate_limited",
            DdnsError::Transport(_) => "transport",
            DdnsError::Rejected(_) => "rejected",
            DdnsError::Conflict(_) => "conflict",
            DdnsError::Protocol(_) => "protocol",
            DdnsError::Mismatch(_) => "mismatch",
            DdnsError::Config(_) => "config",
        }
    }

    pub const KINDS: [&'static str; 8] = [
        "auth",
        "rate_limited",
        "transport",
        "rejected",
        "conflict",
        "protocol",
        "mismatch",
        "config",
    ];
}
