//! DDNS: keeps one DNS name pointing at the public IPs of the healthy gateways (issue 10).
//!
//! Owns: the wanted record set ([`records`], pure), the engine task ([`run`]: master gate,
//! debounce, read → compare → write → read back, capped exponential backoff, periodic resync),
//! the providers behind [`Provider`] (`rfc2136`, `cloudflare`, `dynu`) and the `vpn_router_ddns_*`
//! metrics ([`DdnsMetrics`]).
//!
//! Must not: touch any record other than the A/AAAA records of the configured name; write while
//! this router is not the writer (`is_master` false); parse YAML (the router maps its `ddns`
//! section to [`DdnsSettings`]); log secrets.

mod cloudflare;
mod dynu;
mod engine;
mod error;
mod http;
mod metrics;
mod provider;
pub mod records;
mod rfc2136;
mod tls;

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

pub use cloudflare::{Cloudflare, CLOUDFLARE_API_URL};
pub use dynu::{Dynu, DYNU_API_URL};
pub use engine::run;
pub use error::DdnsError;
pub use http::{check_api_url, ApiUrlError, MAX_BODY_BYTES, MAX_RETRY_AFTER};
pub use metrics::DdnsMetrics;
pub use provider::{Provider, ProviderRecord};
pub use records::{wanted_records, RecordType, WantedRecords};
pub use rfc2136::Rfc2136;
pub use tls::{CaCertificates, CaFileError};

/// A credential (API token, API key, TSIG key) that `Debug` never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential(String);

impl Credential {
    pub fn new(value: impl Into<String>) -> Self {
        Credential(value.into())
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

/// TSIG MAC algorithms accepted for RFC 2136 updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsigAlgorithm {
    HmacSha256,
    HmacSha512,
}

impl TsigAlgorithm {
    pub fn as_str(&self) -> &'static str {
        match self {
            TsigAlgorithm::HmacSha256 => "hmac-sha256",
            TsigAlgorithm::HmacSha512 => "hmac-sha512",
        }
    }
}

/// `ddns.provider.rfc2136`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rfc2136Settings {
    /// The primary server that accepts updates for `zone`.
    pub server: SocketAddr,
    /// Zone origin, lower case, no trailing dot.
    pub zone: String,
    pub key_name: String,
    pub key_algorithm: TsigAlgorithm,
    /// The key as the base64 text of a BIND `key` clause.
    pub key_secret_base64: Credential,
}

/// `ddns.provider.cloudflare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudflareSettings {
    /// API v4 base URL without a trailing slash ([`CLOUDFLARE_API_URL`] unless a test points
    /// it at a local server).
    pub api_url: String,
    pub zone_id: String,
    pub api_token: Credential,
    /// `ca_file`: when set, the only CAs trusted for `api_url` (instead of the Mozilla roots).
    pub ca_certificates: Option<CaCertificates>,
}

/// `ddns.provider.dynu`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynuSettings {
    /// API v2 base URL without a trailing slash ([`DYNU_API_URL`] by default).
    pub api_url: String,
    pub api_key: Credential,
    /// `ca_file`: when set, the only CAs trusted for `api_url` (instead of the Mozilla roots).
    pub ca_certificates: Option<CaCertificates>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderSettings {
    Rfc2136(Rfc2136Settings),
    Cloudflare(CloudflareSettings),
    Dynu(DynuSettings),
}

impl ProviderSettings {
    pub fn name(&self) -> &'static str {
        match self {
            ProviderSettings::Rfc2136(_) => "rfc2136",
            ProviderSettings::Cloudflare(_) => "cloudflare",
            ProviderSettings::Dynu(_) => "dynu",
        }
    }
}

/// Settings of the DDNS engine (mapped from the `ddns` section by the router).
#[derive(Debug, Clone, PartialEq)]
pub struct DdnsSettings {
    /// The name to keep updated, lower case, no trailing dot.
    pub hostname: String,
    pub ttl: Duration,
    /// At most this many addresses (A and AAAA together) are published.
    pub max_records: usize,
    pub provider: ProviderSettings,
    /// A burst of healthy-set changes within this window is one write.
    pub debounce: Duration,
    /// First retry delay after a failed update; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// After a success the provider is read again this often, so drift made by hand is
    /// repaired (a read that matches writes nothing).
    pub resync_interval: Duration,
    /// Timeout of one request to the provider.
    pub request_timeout: Duration,
    /// Wall-clock time when the engine starts: `last_success_timestamp_seconds` is this plus
    /// the tokio clock's elapsed time (library code does not read the wall clock).
    pub wall_clock_at_start: SystemTime,
}

impl DdnsSettings {
    /// Settings with the engine's defaults: 250 ms debounce, retries from 1 s up to 60 s,
    /// resync every 5 minutes, 10 s request timeout.
    pub fn new(
        hostname: impl Into<String>,
        ttl: Duration,
        max_records: usize,
        provider: ProviderSettings,
        wall_clock_at_start: SystemTime,
    ) -> Self {
        DdnsSettings {
            hostname: hostname.into().trim_end_matches('.').to_ascii_lowercase(),
            ttl,
            max_records,
            provider,
            debounce: Duration::from_millis(250),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            resync_interval: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
            wall_clock_at_start,
        }
    }

    /// TTL in whole seconds as DNS and the APIs carry it.
    pub fn ttl_secs(&self) -> u32 {
        u32::try_from(self.ttl.as_secs()).unwrap_or(u32::MAX).max(1)
    }
}
