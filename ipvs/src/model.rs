//! The IPVS objects as the rest of vpn-router sees them: virtual services, destinations
//! (real servers), statistics and global settings, in plain Rust types.
//!
//! This module owns the vocabulary only. It does not know the wire format (see `codec`), never
//! talks to the kernel (see `client`) and holds no policy (see `reconcile`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Address family of a service or destination (`AF_INET` / `AF_INET6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressFamily {
    Inet,
    Inet6,
}

impl AddressFamily {
    /// `AF_INET` is 2 and `AF_INET6` is 10 on Linux.
    pub const fn raw(self) -> u16 {
        match self {
            Self::Inet => 2,
            Self::Inet6 => 10,
        }
    }

    pub const fn from_raw(raw: u16) -> Option<Self> {
        match raw {
            2 => Some(Self::Inet),
            10 => Some(Self::Inet6),
            _ => None,
        }
    }

    pub const fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::Inet,
            IpAddr::V6(_) => Self::Inet6,
        }
    }
}

impl fmt::Display for AddressFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Inet => "IPv4",
            Self::Inet6 => "IPv6",
        })
    }
}

/// Transport protocol of an address-keyed virtual service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// IANA protocol numbers (`IPPROTO_TCP` 6, `IPPROTO_UDP` 17, `IPPROTO_SCTP` 132).
    pub const fn raw(self) -> u16 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    pub const fn from_raw(raw: u16) -> Option<Self> {
        match raw {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            132 => Some(Self::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// What identifies a virtual service in the kernel: either protocol + address + port, or a
/// firewall mark (per address family). Changing any part of the key makes a different service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceKey {
    Addr {
        protocol: Protocol,
        addr: SocketAddr,
    },
    Fwmark {
        af: AddressFamily,
        mark: u32,
    },
}

impl ServiceKey {
    pub fn tcp(addr: SocketAddr) -> Self {
        Self::Addr {
            protocol: Protocol::Tcp,
            addr,
        }
    }

    pub fn udp(addr: SocketAddr) -> Self {
        Self::Addr {
            protocol: Protocol::Udp,
            addr,
        }
    }

    pub fn af(&self) -> AddressFamily {
        match self {
            Self::Addr { addr, .. } => AddressFamily::of(&addr.ip()),
            Self::Fwmark { af, .. } => *af,
        }
    }
}

/// Formats like `ipvsadm -Ln` names services: `TCP 192.168.26.128:6666`, `UDP [fd00::1]:53`,
/// `FWM 7 (IPv6)`.
impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr { protocol, addr } => write!(f, "{protocol} {addr}"),
            Self::Fwmark { af, mark } => write!(f, "FWM {mark} ({af})"),
        }
    }
}

/// `IP_VS_SVC_F_*` service flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceFlags(pub u32);

impl ServiceFlags {
    /// Persistent service (`ipvsadm -p`); the persistence time is `Service::timeout`.
    pub const PERSISTENT: Self = Self(0x0001);
    /// Set by the kernel on every service it has hashed; never ours to set or compare.
    pub const HASHED: Self = Self(0x0002);
    /// One-packet scheduling (`-o`), UDP only.
    pub const ONE_PACKET: Self = Self(0x0004);
    /// Scheduler flag 1: `sh-fallback` / `mh-fallback`.
    pub const SCHED1: Self = Self(0x0008);
    /// Scheduler flag 2: `sh-port` / `mh-port`.
    pub const SCHED2: Self = Self(0x0010);
    /// Scheduler flag 3 (unused by the in-tree schedulers today).
    pub const SCHED3: Self = Self(0x0020);
    /// mh/sh: pick another destination when the hashed one is unavailable.
    pub const FALLBACK: Self = Self::SCHED1;
    /// mh/sh: include the source port in the hash.
    pub const PORT: Self = Self::SCHED2;

    pub const fn empty() -> Self {
        Self(0)
    }

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The flags as user space sets them: without the kernel-internal `HASHED` bit.
    pub const fn user_visible(self) -> Self {
        Self(self.0 & !Self::HASHED.0)
    }
}

impl std::ops::BitOr for ServiceFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// Persistence granularity (`ipvsadm -M`). The kernel stores it differently per family: an
/// IPv4 service keeps a network-order mask (`255.255.255.255` by default), an IPv6 service a
/// prefix length (1..=128, 128 by default) — see `ip_vs_add_service()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Netmask {
    V4(Ipv4Addr),
    V6Prefix(u8),
}

impl Netmask {
    /// The default ipvsadm uses: one client address per persistence entry.
    pub const fn host(af: AddressFamily) -> Self {
        match af {
            AddressFamily::Inet => Self::V4(Ipv4Addr::BROADCAST),
            AddressFamily::Inet6 => Self::V6Prefix(128),
        }
    }
}

/// A virtual service's configuration, as written with NEW/SET_SERVICE and read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    /// Scheduler module name without the `ip_vs_` prefix: `mh`, `sh`, `rr`, `wlc`, ...
    pub scheduler: String,
    pub flags: ServiceFlags,
    /// Persistence timeout in seconds (only meaningful with `ServiceFlags::PERSISTENT`).
    pub timeout: u32,
    pub netmask: Netmask,
    /// Persistence engine (`sip`), rarely used.
    pub pe_name: Option<String>,
}

impl Service {
    /// A service with ipvsadm's defaults: no flags, no persistence, host netmask.
    pub fn new(key: ServiceKey, scheduler: impl Into<String>) -> Self {
        Self {
            key,
            scheduler: scheduler.into(),
            flags: ServiceFlags::empty(),
            timeout: 0,
            netmask: Netmask::host(key.af()),
            pe_name: None,
        }
    }

    pub fn with_flags(mut self, flags: ServiceFlags) -> Self {
        self.flags = flags;
        self
    }
}

/// How IPVS forwards packets to a destination (`IP_VS_CONN_F_FWD_MASK` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ForwardMethod {
    /// NAT (`-m`).
    Masquerade,
    /// The destination is a local address.
    Local,
    /// IP-in-IP / GUE / GRE tunnel (`-i`).
    Tunnel,
    /// Direct routing (`-g`).
    Route,
    /// Cache bypass.
    Bypass,
}

impl ForwardMethod {
    pub const fn raw(self) -> u32 {
        match self {
            Self::Masquerade => 0,
            Self::Local => 1,
            Self::Tunnel => 2,
            Self::Route => 3,
            Self::Bypass => 4,
        }
    }

    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Masquerade),
            1 => Some(Self::Local),
            2 => Some(Self::Tunnel),
            3 => Some(Self::Route),
            4 => Some(Self::Bypass),
            _ => None,
        }
    }
}

impl fmt::Display for ForwardMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The names ipvsadm -Ln prints in its "Forward" column.
        f.write_str(match self {
            Self::Masquerade => "Masq",
            Self::Local => "Local",
            Self::Tunnel => "Tunnel",
            Self::Route => "Route",
            Self::Bypass => "Bypass",
        })
    }
}

/// Encapsulation of a tunnel-forwarded destination (`IP_VS_CONN_F_TUNNEL_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TunnelType {
    Ipip,
    Gue,
    Gre,
}

impl TunnelType {
    pub const fn raw(self) -> u8 {
        match self {
            Self::Ipip => 0,
            Self::Gue => 1,
            Self::Gre => 2,
        }
    }

    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(Self::Ipip),
            1 => Some(Self::Gue),
            2 => Some(Self::Gre),
            _ => None,
        }
    }
}

/// Tunnel parameters; only sent and compared when the forward method is `Tunnel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tunnel {
    pub kind: TunnelType,
    /// UDP port for GUE.
    pub port: u16,
    /// `IP_VS_TUNNEL_ENCAP_FLAG_*` (checksum options).
    pub flags: u16,
}

/// A destination's configuration, as written with NEW/SET_DEST and read back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    /// Address and port of the real server. Its family may differ from the service's only with
    /// tunnel forwarding (the kernel refuses other mixed-family destinations).
    pub addr: SocketAddr,
    pub forward: ForwardMethod,
    /// 0 quiesces the destination: no new connections, but mh keeps its table slots.
    pub weight: u32,
    pub upper_threshold: u32,
    pub lower_threshold: u32,
    pub tunnel: Option<Tunnel>,
}

impl Destination {
    pub fn new(addr: SocketAddr, forward: ForwardMethod, weight: u32) -> Self {
        Self {
            addr,
            forward,
            weight,
            upper_threshold: 0,
            lower_threshold: 0,
            tunnel: None,
        }
    }
}

/// Per-service or per-destination counters and rate estimates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub conns: u64,
    pub in_packets: u64,
    pub out_packets: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
    /// Connections per second (estimator).
    pub cps: u64,
    pub in_pps: u64,
    pub out_pps: u64,
    /// Bytes per second in (the kernel calls it `inbps` although it counts bytes).
    pub in_bps: u64,
    pub out_bps: u64,
}

/// A service as dumped from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub service: Service,
    pub stats: Stats,
}

/// A destination as dumped from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationEntry {
    pub destination: Destination,
    pub active_conns: u32,
    pub inactive_conns: u32,
    pub persist_conns: u32,
    pub stats: Stats,
}

/// `IPVS_CMD_GET_INFO`: version of the IPVS code and size of its connection table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    /// `IP_VS_VERSION_CODE`, e.g. 0x010201 for 1.2.1.
    pub version: u32,
    pub conn_tab_size: u32,
}

impl Info {
    pub fn version_string(&self) -> String {
        format!(
            "{}.{}.{}",
            (self.version >> 16) & 0xff,
            (self.version >> 8) & 0xff,
            self.version & 0xff
        )
    }
}

/// Connection timeouts in seconds (`ipvsadm --set tcp tcpfin udp`). On SET_CONFIG the kernel
/// leaves a timeout unchanged when it is 0 or absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}
