//! The v0 configuration contract (see docs/configuration.md): types, defaults, loading and
//! validation. Owns the meaning of every key; must not touch the kernel or the network — a
//! loaded `Config` is plain data that the supervisor hands to the engines.
//!
//! Loading is `parse` (YAML → typed values, one error per bad value, unknown keys refused)
//! then `validate` (cross-field rules: overlaps, references, ranges that depend on each
//! other). Both collect every error, so one `check-config` run shows them all.

mod error;
mod parse;
mod reader;
mod secret;
mod validate;
mod yaml;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;

pub use error::{ConfigError, ConfigErrors, Location};
pub use secret::{Secret, SecretSource};

/// Every mapping of the config file and the keys it accepts, by path (`vrrp[]` is an item of
/// the `vrrp` list, `""` the top level). Read from the same lists the parser checks keys
/// against; the docs test uses it to prove every key is documented.
pub fn key_sets() -> &'static [(&'static str, &'static [&'static str])] {
    parse::KEY_SETS
}

/// Every key the config accepts, in any section (a key used in several sections is listed
/// once per section).
pub fn all_keys() -> Vec<&'static str> {
    key_sets()
        .iter()
        .flat_map(|(_, keys)| keys.iter().copied())
        .collect()
}

/// A loaded, valid config plus the warnings found while loading it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::whole_file(path, format!("cannot read config: {e}")))?;
    load_str(path, &text)
}

/// Parses and validates config text; `path` names the file in messages and anchors relative
/// `*_file` paths.
pub fn load_str(path: &Path, text: &str) -> Result<Loaded, ConfigErrors> {
    let root = yaml::parse_document(text).map_err(|e| ConfigErrors::new(path, vec![e]))?;
    let base_dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut r = reader::Reader::default();
    let config = parse::config(&mut r, &root, base_dir);
    if let Some(config) = &config {
        validate::config(&mut r, config);
    }
    match config {
        Some(config) if r.errors.is_empty() => {
            let warnings = ConfigErrors::new(path, r.warnings).lines();
            Ok(Loaded { config, warnings })
        }
        _ => Err(ConfigErrors::new(path, r.errors)),
    }
}

/// A value and the place in the file it came from, for errors found after parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At<T> {
    pub value: T,
    pub at: Location,
}

/// Shown as the bare value: the location is for error messages, not for /status.
impl<T: Serialize> Serialize for At<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Where the `vrrp` list starts (for errors about instances taken together).
    #[serde(skip)]
    pub vrrp_at: Location,
    pub api: Api,
    pub log: Log,
    pub vrrp: Vec<VrrpInstance>,
    pub gateways: Option<Gateways>,
    pub ingress: Option<Ingress>,
    pub ddns: Option<Ddns>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Api {
    pub listen: SocketAddr,
}

impl Default for Api {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct Log {
    pub level: LogLevel,
    pub format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            level: LogLevel::Info,
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VrrpVersion {
    #[serde(rename = "2")]
    V2,
    #[serde(rename = "3")]
    V3,
}

#[derive(Debug, Clone, Serialize)]
pub struct VrrpInstance {
    pub name: At<String>,
    pub interface: String,
    pub vrid: u8,
    pub version: VrrpVersion,
    /// 1-254; 255 means this router owns the addresses.
    pub priority: u8,
    #[serde(with = "humantime_serde_compat")]
    pub advert_interval: Duration,
    pub preempt: bool,
    #[serde(with = "humantime_serde_compat")]
    pub preempt_delay: Duration,
    /// Empty: multicast to 224.0.0.18 / ff02::12.
    pub unicast_peers: Vec<IpAddr>,
    pub vmac: bool,
    pub virtual_ips: Vec<VirtualIp>,
    pub gateway_ingress_vips: bool,
    pub track_gateways: Option<TrackGateways>,
    /// keepalived's `v3_checksum_as_v2`: VRRPv3 over IPv4 checksummed without the pseudo-header.
    pub v3_checksum_as_v2: bool,
    /// Gratuitous ARP / unsolicited NA messages sent on becoming master.
    pub garp_master_repeat: u32,
    /// Re-send gratuitous ARP / NA this often while master; `0s` means never.
    #[serde(with = "humantime_serde_compat")]
    pub garp_master_refresh: Duration,
    /// Adverts with a longer Max Adver Int are discarded instead of setting
    /// Master_Adver_Interval. Resolved at parse time: absent, 10 × `advert_interval` (at
    /// most the wire maximum; `vrrp::instance::default_max_peer_advert_interval`).
    #[serde(with = "humantime_serde_compat")]
    pub max_peer_advert_interval: Duration,
    /// Only adverts from these sources are used; empty: any source (with `unicast_peers`:
    /// those, which then must be the same set).
    pub allowed_peers: Vec<At<IpAddr>>,
    /// Where `allowed_peers` is (the instance's position when absent).
    #[serde(skip)]
    pub allowed_peers_at: Location,
}

#[derive(Debug, Clone, Serialize)]
pub struct VirtualIp {
    /// The address with its prefix length (the VIP's subnet on `interface`).
    pub address: At<IpNet>,
    pub interface: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct TrackGateways {
    pub min_healthy: u32,
    /// Added to the priority while fewer than `min_healthy` gateways are healthy (negative).
    pub weight: i32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gateways {
    #[serde(skip)]
    pub at: Location,
    pub interface: String,
    pub addresses: At<Vec<Ipv4Addr>>,
    pub ingress_vip_start: At<Ipv4Addr>,
    /// MTU of the gateways' VPN tunnel (gluetun's `WIREGUARD_MTU`): the smallest on the path.
    pub tunnel_mtu: At<u32>,
    /// Clamp the MSS of TCP SYNs through the gateways to `tunnel_mtu - 40`.
    pub clamp_mss: bool,
    pub health: Health,
    pub egress: Egress,
    pub return_routing: ReturnRouting,
}

impl Gateways {
    /// Gateway i's ingress VIP: `ingress_vip_start + i`. Validation guarantees no overflow.
    pub fn ingress_vip(&self, index: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.ingress_vip_start.value).saturating_add(index as u32))
    }

    /// The MSS that fits `tunnel_mtu` (IPv4 and TCP headers without options, as RFC 879 and
    /// RFC 9293 count it), or `None` when `clamp_mss` is off.
    pub fn mss_clamp(&self) -> Option<u16> {
        self.clamp_mss
            .then(|| u16::try_from(self.tunnel_mtu.value.saturating_sub(40)).unwrap_or(u16::MAX))
    }

    pub fn ingress_vips(&self) -> Vec<Ipv4Addr> {
        (0..self.addresses.value.len())
            .map(|i| self.ingress_vip(i))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    VpnStatus,
    PublicIp,
    HealthServer,
    Probe,
}

#[derive(Debug, Clone, Serialize)]
pub struct Health {
    #[serde(skip)]
    pub at: Location,
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub control_server: ControlServer,
    /// gluetun's health server port (`HEALTH_SERVER_ADDRESS`); used by the `health_server` check.
    pub health_server_port: u16,
    pub checks: Vec<HealthCheckKind>,
    pub probe: Probe,
}

#[derive(Debug, Clone, Serialize)]
pub struct ControlServer {
    pub port: u16,
    pub auth: Option<ControlServerAuth>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlServerAuth {
    Basic { username: String, password: Secret },
    ApiKey(Secret),
}

#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub target: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    Ecmp,
    EcmpResilient,
    Consistent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoneHealthy {
    Blackhole,
    Unreachable,
}

#[derive(Debug, Clone, Serialize)]
pub struct Egress {
    pub mode: EgressMode,
    pub table: At<u32>,
    pub rule_priority: At<u32>,
    pub destinations: Vec<Ipv4Net>,
    pub exclude: Vec<Ipv4Net>,
    pub exclude_reserved: bool,
    pub hash_seed: u32,
    pub when_none_healthy: NoneHealthy,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReturnRouting {
    pub mark_base: At<u32>,
    pub table_base: At<u32>,
    pub rule_priority_base: At<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ingress {
    pub sloppy_tcp: bool,
    pub virtual_servers: Vec<VirtualServer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VsAddresses {
    GatewayIngressVips,
    List(Vec<IpAddr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerFlag {
    Fallback,
    Port,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    Quiesce,
    Remove,
}

#[derive(Debug, Clone, Serialize)]
pub struct VirtualServer {
    pub name: At<String>,
    pub port: u16,
    pub protocols: Vec<Protocol>,
    pub addresses: At<VsAddresses>,
    pub scheduler: String,
    pub scheduler_flags: Vec<SchedulerFlag>,
    /// Addresses and networks; every host of a network is a candidate real server.
    pub real_servers: Vec<IpNet>,
    pub real_port: u16,
    pub health_check: RealServerCheck,
    pub on_failure: OnFailure,
    /// Every router routes `addresses` to itself (a `local` route in table local) so IPVS
    /// receives packets for an address no interface holds, e.g. the cluster DNS service IP.
    pub local_route: At<bool>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum RealServerCheckKind {
    Tcp,
    Http {
        path: String,
        expect_status: u16,
    },
    Udp {
        send: String,
        expect: Option<String>,
    },
    Dns {
        query: String,
    },
    None,
}

#[derive(Debug, Clone, Serialize)]
pub struct RealServerCheck {
    pub kind: RealServerCheckKind,
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TsigAlgorithm {
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    #[serde(rename = "hmac-sha512")]
    HmacSha512,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DdnsProvider {
    Rfc2136 {
        server: SocketAddr,
        zone: String,
        key_name: String,
        key_algorithm: TsigAlgorithm,
        /// The decoded key bytes are derived from this base64 text when used.
        key_secret: Secret,
    },
    Cloudflare {
        zone_id: String,
        api_token: Secret,
        /// API v4 base URL; `None`: the real API. Tests point it at a local server.
        #[serde(skip_serializing_if = "Option::is_none")]
        api_url: Option<String>,
        /// `None`: the Mozilla roots.
        #[serde(skip_serializing_if = "Option::is_none")]
        ca_file: Option<CaFile>,
    },
    Dynu {
        api_key: Secret,
        /// API v2 base URL; `None`: the real API.
        #[serde(skip_serializing_if = "Option::is_none")]
        api_url: Option<String>,
        /// `None`: the Mozilla roots.
        #[serde(skip_serializing_if = "Option::is_none")]
        ca_file: Option<CaFile>,
    },
}

/// `ca_file` of an API provider: the CA certificates read from the PEM file when the config
/// is loaded, the only ones that provider's HTTPS client then trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile {
    pub path: std::path::PathBuf,
    pub certificates: gateway_route_manager::ddns::CaCertificates,
}

/// The path, the number of certificates and a fingerprint of their bytes: the engines compare
/// sections as JSON on reload, so a CA file replaced in place restarts DDNS (certificates
/// are public, the fingerprint hides nothing).
impl Serialize for CaFile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::hash::DefaultHasher::new();
        for der in self.certificates.der() {
            der.hash(&mut h);
        }
        s.serialize_str(&format!(
            "{} ({} certificate(s), fingerprint {:016x})",
            self.path.display(),
            self.certificates.len(),
            h.finish()
        ))
    }
}

impl DdnsProvider {
    pub fn name(&self) -> &'static str {
        match self {
            DdnsProvider::Rfc2136 { .. } => "rfc2136",
            DdnsProvider::Cloudflare { .. } => "cloudflare",
            DdnsProvider::Dynu { .. } => "dynu",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Ddns {
    pub hostname: At<String>,
    #[serde(with = "humantime_serde_compat")]
    pub ttl: Duration,
    pub only_when_master: Option<At<String>>,
    pub max_records: u32,
    pub provider: DdnsProvider,
}

/// Durations in /status and `Debug` read as humantime text (`100ms`), like the config.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests;
