//! Wire format of the kernel's "IPVS" generic-netlink family (include/uapi/linux/ip_vs.h,
//! net/netfilter/ipvs/ip_vs_ctl.c): commands, attributes, and their mapping to the `model`
//! types.
//!
//! Pure: no sockets, no I/O. Decoding must never panic on hostile bytes — every length is
//! checked and failures are returned as [`CodecError`]; unknown attributes are skipped so a newer
//! kernel's additions do not break us. Byte order follows the kernel: ports (and the IPv4
//! persistence netmask) are big-endian, every other integer is host order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_packet_core::{
    DecodeError, Emitable, Nla, NlaBuffer, NlasIterator, ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader};

use crate::model::{
    AddressFamily, Destination, DestinationEntry, ForwardMethod, Info, Netmask, Protocol, Service,
    ServiceEntry, ServiceFlags, ServiceKey, Stats, Timeouts, Tunnel, TunnelType,
};

/// Numbers from include/uapi/linux/ip_vs.h.
pub mod consts {
    pub const IPVS_GENL_NAME: &str = "IPVS";
    pub const IPVS_GENL_VERSION: u8 = 0x1;

    pub const IPVS_CMD_NEW_SERVICE: u8 = 1;
    pub const IPVS_CMD_SET_SERVICE: u8 = 2;
    pub const IPVS_CMD_DEL_SERVICE: u8 = 3;
    pub const IPVS_CMD_GET_SERVICE: u8 = 4;
    pub const IPVS_CMD_NEW_DEST: u8 = 5;
    pub const IPVS_CMD_SET_DEST: u8 = 6;
    pub const IPVS_CMD_DEL_DEST: u8 = 7;
    pub const IPVS_CMD_GET_DEST: u8 = 8;
    pub const IPVS_CMD_NEW_DAEMON: u8 = 9;
    pub const IPVS_CMD_DEL_DAEMON: u8 = 10;
    pub const IPVS_CMD_GET_DAEMON: u8 = 11;
    pub const IPVS_CMD_SET_CONFIG: u8 = 12;
    pub const IPVS_CMD_GET_CONFIG: u8 = 13;
    pub const IPVS_CMD_SET_INFO: u8 = 14;
    pub const IPVS_CMD_GET_INFO: u8 = 15;
    pub const IPVS_CMD_ZERO: u8 = 16;
    pub const IPVS_CMD_FLUSH: u8 = 17;

    pub const IPVS_CMD_ATTR_SERVICE: u16 = 1;
    pub const IPVS_CMD_ATTR_DEST: u16 = 2;
    pub const IPVS_CMD_ATTR_DAEMON: u16 = 3;
    pub const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;
    pub const IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
    pub const IPVS_CMD_ATTR_TIMEOUT_UDP: u16 = 6;

    pub const IPVS_SVC_ATTR_AF: u16 = 1;
    pub const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
    pub const IPVS_SVC_ATTR_ADDR: u16 = 3;
    pub const IPVS_SVC_ATTR_PORT: u16 = 4;
    pub const IPVS_SVC_ATTR_FWMARK: u16 = 5;
    pub const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
    pub const IPVS_SVC_ATTR_FLAGS: u16 = 7;
    pub const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
    pub const IPVS_SVC_ATTR_NETMASK: u16 = 9;
    pub const IPVS_SVC_ATTR_STATS: u16 = 10;
    pub const IPVS_SVC_ATTR_PE_NAME: u16 = 11;
    pub const IPVS_SVC_ATTR_STATS64: u16 = 12;

    pub const IPVS_DEST_ATTR_ADDR: u16 = 1;
    pub const IPVS_DEST_ATTR_PORT: u16 = 2;
    pub const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
    pub const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
    pub const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
    pub const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
    pub const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
    pub const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
    pub const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
    pub const IPVS_DEST_ATTR_STATS: u16 = 10;
    pub const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;
    pub const IPVS_DEST_ATTR_STATS64: u16 = 12;
    pub const IPVS_DEST_ATTR_TUN_TYPE: u16 = 13;
    pub const IPVS_DEST_ATTR_TUN_PORT: u16 = 14;
    pub const IPVS_DEST_ATTR_TUN_FLAGS: u16 = 15;

    pub const IPVS_DAEMON_ATTR_STATE: u16 = 1;
    pub const IPVS_DAEMON_ATTR_MCAST_IFN: u16 = 2;
    pub const IPVS_DAEMON_ATTR_SYNC_ID: u16 = 3;
    pub const IPVS_DAEMON_ATTR_SYNC_MAXLEN: u16 = 4;
    pub const IPVS_DAEMON_ATTR_MCAST_GROUP: u16 = 5;
    pub const IPVS_DAEMON_ATTR_MCAST_GROUP6: u16 = 6;
    pub const IPVS_DAEMON_ATTR_MCAST_PORT: u16 = 7;
    pub const IPVS_DAEMON_ATTR_MCAST_TTL: u16 = 8;

    pub const IPVS_STATS_ATTR_CONNS: u16 = 1;
    pub const IPVS_STATS_ATTR_INPKTS: u16 = 2;
    pub const IPVS_STATS_ATTR_OUTPKTS: u16 = 3;
    pub const IPVS_STATS_ATTR_INBYTES: u16 = 4;
    pub const IPVS_STATS_ATTR_OUTBYTES: u16 = 5;
    pub const IPVS_STATS_ATTR_CPS: u16 = 6;
    pub const IPVS_STATS_ATTR_INPPS: u16 = 7;
    pub const IPVS_STATS_ATTR_OUTPPS: u16 = 8;
    pub const IPVS_STATS_ATTR_INBPS: u16 = 9;
    pub const IPVS_STATS_ATTR_OUTBPS: u16 = 10;
    pub const IPVS_STATS_ATTR_PAD: u16 = 11;

    pub const IPVS_INFO_ATTR_VERSION: u16 = 1;
    pub const IPVS_INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

    /// `IP_VS_SCHEDNAME_MAXLEN` / `IP_VS_PENAME_MAXLEN`, including the NUL.
    pub const IP_VS_SCHEDNAME_MAXLEN: usize = 16;
    /// `IP_VS_IFNAME_MAXLEN`, including the NUL.
    pub const IP_VS_IFNAME_MAXLEN: usize = 16;
    /// `sizeof(union nf_inet_addr)`: the kernel always sends 16 address bytes, an IPv4
    /// address in the first four.
    pub const NF_INET_ADDR_LEN: usize = 16;
}

use consts::*;

/// Why bytes from the kernel (or anyone) could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("malformed netlink attribute in {context}: {reason}")]
    Nla {
        context: &'static str,
        reason: String,
    },
    #[error("{attr}: expected {expected} bytes, got {got}")]
    Length {
        attr: &'static str,
        expected: &'static str,
        got: usize,
    },
    #[error("{attr}: invalid value {value}")]
    Value { attr: &'static str, value: u64 },
    #[error("{attr}: not UTF-8 text")]
    Text { attr: &'static str },
    #[error("{what}: missing {attr}")]
    Missing {
        what: &'static str,
        attr: &'static str,
    },
    #[error("generic netlink header: {0}")]
    Header(String),
    #[error("unknown IPVS command {0}")]
    UnknownCommand(u8),
    #[error("IPVS {cmd:?} reply carries no {attr}")]
    MissingReplyAttr { cmd: IpvsCmd, attr: &'static str },
    #[error("scheduler or PE name {name:?} is longer than the kernel's {max} bytes")]
    NameTooLong { name: String, max: usize },
}

impl From<CodecError> for DecodeError {
    fn from(e: CodecError) -> Self {
        DecodeError::from(e.to_string())
    }
}

/// Generic-netlink commands of the IPVS family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpvsCmd {
    NewService,
    SetService,
    DelService,
    GetService,
    NewDest,
    SetDest,
    DelDest,
    GetDest,
    NewDaemon,
    DelDaemon,
    GetDaemon,
    SetConfig,
    GetConfig,
    /// Only used as the command of the GET_INFO reply.
    SetInfo,
    GetInfo,
    Zero,
    Flush,
}

impl IpvsCmd {
    pub const fn raw(self) -> u8 {
        match self {
            Self::NewService => IPVS_CMD_NEW_SERVICE,
            Self::SetService => IPVS_CMD_SET_SERVICE,
            Self::DelService => IPVS_CMD_DEL_SERVICE,
            Self::GetService => IPVS_CMD_GET_SERVICE,
            Self::NewDest => IPVS_CMD_NEW_DEST,
            Self::SetDest => IPVS_CMD_SET_DEST,
            Self::DelDest => IPVS_CMD_DEL_DEST,
            Self::GetDest => IPVS_CMD_GET_DEST,
            Self::NewDaemon => IPVS_CMD_NEW_DAEMON,
            Self::DelDaemon => IPVS_CMD_DEL_DAEMON,
            Self::GetDaemon => IPVS_CMD_GET_DAEMON,
            Self::SetConfig => IPVS_CMD_SET_CONFIG,
            Self::GetConfig => IPVS_CMD_GET_CONFIG,
            Self::SetInfo => IPVS_CMD_SET_INFO,
            Self::GetInfo => IPVS_CMD_GET_INFO,
            Self::Zero => IPVS_CMD_ZERO,
            Self::Flush => IPVS_CMD_FLUSH,
        }
    }

    pub const fn from_raw(raw: u8) -> Option<Self> {
        Some(match raw {
            IPVS_CMD_NEW_SERVICE => Self::NewService,
            IPVS_CMD_SET_SERVICE => Self::SetService,
            IPVS_CMD_DEL_SERVICE => Self::DelService,
            IPVS_CMD_GET_SERVICE => Self::GetService,
            IPVS_CMD_NEW_DEST => Self::NewDest,
            IPVS_CMD_SET_DEST => Self::SetDest,
            IPVS_CMD_DEL_DEST => Self::DelDest,
            IPVS_CMD_GET_DEST => Self::GetDest,
            IPVS_CMD_NEW_DAEMON => Self::NewDaemon,
            IPVS_CMD_DEL_DAEMON => Self::DelDaemon,
            IPVS_CMD_GET_DAEMON => Self::GetDaemon,
            IPVS_CMD_SET_CONFIG => Self::SetConfig,
            IPVS_CMD_GET_CONFIG => Self::GetConfig,
            IPVS_CMD_SET_INFO => Self::SetInfo,
            IPVS_CMD_GET_INFO => Self::GetInfo,
            IPVS_CMD_ZERO => Self::Zero,
            IPVS_CMD_FLUSH => Self::Flush,
            _ => return None,
        })
    }

    /// GET_INFO's reply reuses attribute numbers 1 and 2 for `IPVS_INFO_ATTR_*`.
    const fn carries_info(self) -> bool {
        matches!(self, Self::SetInfo | Self::GetInfo)
    }
}

/// `struct ip_vs_flags { __u32 flags; __u32 mask; }`: the kernel applies
/// `flags = (old & ~mask) | (flags & mask)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlagsMask {
    pub flags: u32,
    pub mask: u32,
}

/// The attributes nested in `IPVS_CMD_ATTR_SERVICE`, as on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceAttrs {
    pub af: Option<u16>,
    pub protocol: Option<u16>,
    /// `union nf_inet_addr`, 16 bytes; IPv4 in the first four.
    pub addr: Option<[u8; NF_INET_ADDR_LEN]>,
    /// Host-order value; big-endian on the wire.
    pub port: Option<u16>,
    pub fwmark: Option<u32>,
    pub sched_name: Option<String>,
    pub flags: Option<FlagsMask>,
    pub timeout: Option<u32>,
    /// The four raw bytes: a network-order mask for IPv4, a host-order prefix length for IPv6.
    pub netmask: Option<[u8; 4]>,
    pub pe_name: Option<String>,
    pub stats: Option<Stats>,
    pub stats64: Option<Stats>,
}

/// The attributes nested in `IPVS_CMD_ATTR_DEST`, as on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestAttrs {
    pub addr: Option<[u8; NF_INET_ADDR_LEN]>,
    /// Host-order value; big-endian on the wire.
    pub port: Option<u16>,
    pub fwd_method: Option<u32>,
    pub weight: Option<u32>,
    pub u_thresh: Option<u32>,
    pub l_thresh: Option<u32>,
    pub active_conns: Option<u32>,
    pub inact_conns: Option<u32>,
    pub persist_conns: Option<u32>,
    pub addr_family: Option<u16>,
    pub tun_type: Option<u8>,
    /// Host-order value; big-endian on the wire.
    pub tun_port: Option<u16>,
    pub tun_flags: Option<u16>,
    pub stats: Option<Stats>,
    pub stats64: Option<Stats>,
}

/// The attributes nested in `IPVS_CMD_ATTR_DAEMON` (sync daemon). Decoded so dumps that carry
/// them stay readable; vpn-router does not run the sync daemon.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaemonAttrs {
    pub state: Option<u32>,
    pub mcast_ifn: Option<String>,
    pub sync_id: Option<u32>,
    pub sync_maxlen: Option<u16>,
    pub mcast_group: Option<Ipv4Addr>,
    pub mcast_group6: Option<Ipv6Addr>,
    pub mcast_port: Option<u16>,
    pub mcast_ttl: Option<u8>,
}

/// One top-level attribute of an IPVS message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpvsAttr {
    Service(ServiceAttrs),
    Dest(DestAttrs),
    Daemon(DaemonAttrs),
    TimeoutTcp(u32),
    TimeoutTcpFin(u32),
    TimeoutUdp(u32),
    /// Only in the GET_INFO reply (attribute 1 there).
    InfoVersion(u32),
    /// Only in the GET_INFO reply (attribute 2 there).
    InfoConnTabSize(u32),
}

/// The payload of a generic-netlink message of the IPVS family (after `genlmsghdr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsMessage {
    pub cmd: IpvsCmd,
    pub attrs: Vec<IpvsAttr>,
}

// ---------------------------------------------------------------------------------------------
// Emission

/// One attribute to emit; nested attributes carry their children.
#[derive(Debug)]
enum WireNla {
    U8(u16, u8),
    U16(u16, u16),
    Be16(u16, u16),
    U32(u16, u32),
    U64(u16, u64),
    Bytes(u16, Vec<u8>),
    /// NUL-terminated, as `NLA_NUL_STRING` wants.
    Str(u16, String),
    Nested(u16, Vec<WireNla>),
}

impl Nla for WireNla {
    fn value_len(&self) -> usize {
        match self {
            Self::U8(..) => 1,
            Self::U16(..) | Self::Be16(..) => 2,
            Self::U32(..) => 4,
            Self::U64(..) => 8,
            Self::Bytes(_, b) => b.len(),
            Self::Str(_, s) => s.len() + 1,
            Self::Nested(_, children) => children.as_slice().buffer_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::U8(k, _)
            | Self::U16(k, _)
            | Self::Be16(k, _)
            | Self::U32(k, _)
            | Self::U64(k, _)
            | Self::Bytes(k, _)
            | Self::Str(k, _)
            | Self::Nested(k, _) => *k,
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        // `buffer` is exactly `value_len()` bytes (netlink-packet-core slices it so).
        match self {
            Self::U8(_, v) => buffer[0] = *v,
            Self::U16(_, v) => buffer[..2].copy_from_slice(&v.to_ne_bytes()),
            Self::Be16(_, v) => buffer[..2].copy_from_slice(&v.to_be_bytes()),
            Self::U32(_, v) => buffer[..4].copy_from_slice(&v.to_ne_bytes()),
            Self::U64(_, v) => buffer[..8].copy_from_slice(&v.to_ne_bytes()),
            Self::Bytes(_, b) => buffer[..b.len()].copy_from_slice(b),
            Self::Str(_, s) => {
                buffer[..s.len()].copy_from_slice(s.as_bytes());
                buffer[s.len()] = 0;
            }
            Self::Nested(_, children) => children.as_slice().emit(buffer),
        }
    }
}

fn push_opt<T: Copy>(out: &mut Vec<WireNla>, v: Option<T>, f: impl FnOnce(T) -> WireNla) {
    if let Some(v) = v {
        out.push(f(v));
    }
}

fn stats_nlas(s: &Stats, wide: bool) -> Vec<WireNla> {
    // IPVS_SVC_ATTR_STATS keeps the old `struct ip_vs_stats_user` widths: 32-bit counters and
    // rates, 64-bit byte counters. STATS64 is 64-bit throughout.
    let n = |k: u16, v: u64| {
        if wide {
            WireNla::U64(k, v)
        } else {
            WireNla::U32(k, v as u32)
        }
    };
    vec![
        n(IPVS_STATS_ATTR_CONNS, s.conns),
        n(IPVS_STATS_ATTR_INPKTS, s.in_packets),
        n(IPVS_STATS_ATTR_OUTPKTS, s.out_packets),
        WireNla::U64(IPVS_STATS_ATTR_INBYTES, s.in_bytes),
        WireNla::U64(IPVS_STATS_ATTR_OUTBYTES, s.out_bytes),
        n(IPVS_STATS_ATTR_CPS, s.cps),
        n(IPVS_STATS_ATTR_INPPS, s.in_pps),
        n(IPVS_STATS_ATTR_OUTPPS, s.out_pps),
        n(IPVS_STATS_ATTR_INBPS, s.in_bps),
        n(IPVS_STATS_ATTR_OUTBPS, s.out_bps),
    ]
}

impl ServiceAttrs {
    fn to_nlas(&self) -> Vec<WireNla> {
        let mut o = Vec::new();
        push_opt(&mut o, self.af, |v| WireNla::U16(IPVS_SVC_ATTR_AF, v));
        push_opt(&mut o, self.protocol, |v| {
            WireNla::U16(IPVS_SVC_ATTR_PROTOCOL, v)
        });
        push_opt(&mut o, self.addr, |v| {
            WireNla::Bytes(IPVS_SVC_ATTR_ADDR, v.to_vec())
        });
        push_opt(&mut o, self.port, |v| WireNla::Be16(IPVS_SVC_ATTR_PORT, v));
        push_opt(&mut o, self.fwmark, |v| {
            WireNla::U32(IPVS_SVC_ATTR_FWMARK, v)
        });
        if let Some(s) = &self.sched_name {
            o.push(WireNla::Str(IPVS_SVC_ATTR_SCHED_NAME, s.clone()));
        }
        if let Some(s) = &self.pe_name {
            o.push(WireNla::Str(IPVS_SVC_ATTR_PE_NAME, s.clone()));
        }
        push_opt(&mut o, self.flags, |f| {
            let mut b = f.flags.to_ne_bytes().to_vec();
            b.extend_from_slice(&f.mask.to_ne_bytes());
            WireNla::Bytes(IPVS_SVC_ATTR_FLAGS, b)
        });
        push_opt(&mut o, self.timeout, |v| {
            WireNla::U32(IPVS_SVC_ATTR_TIMEOUT, v)
        });
        push_opt(&mut o, self.netmask, |v| {
            WireNla::Bytes(IPVS_SVC_ATTR_NETMASK, v.to_vec())
        });
        if let Some(s) = &self.stats {
            o.push(WireNla::Nested(IPVS_SVC_ATTR_STATS, stats_nlas(s, false)));
        }
        if let Some(s) = &self.stats64 {
            o.push(WireNla::Nested(IPVS_SVC_ATTR_STATS64, stats_nlas(s, true)));
        }
        o
    }
}

impl DestAttrs {
    fn to_nlas(&self) -> Vec<WireNla> {
        let mut o = Vec::new();
        push_opt(&mut o, self.addr_family, |v| {
            WireNla::U16(IPVS_DEST_ATTR_ADDR_FAMILY, v)
        });
        push_opt(&mut o, self.addr, |v| {
            WireNla::Bytes(IPVS_DEST_ATTR_ADDR, v.to_vec())
        });
        push_opt(&mut o, self.port, |v| WireNla::Be16(IPVS_DEST_ATTR_PORT, v));
        push_opt(&mut o, self.fwd_method, |v| {
            WireNla::U32(IPVS_DEST_ATTR_FWD_METHOD, v)
        });
        push_opt(&mut o, self.weight, |v| {
            WireNla::U32(IPVS_DEST_ATTR_WEIGHT, v)
        });
        push_opt(&mut o, self.tun_type, |v| {
            WireNla::U8(IPVS_DEST_ATTR_TUN_TYPE, v)
        });
        push_opt(&mut o, self.tun_port, |v| {
            WireNla::Be16(IPVS_DEST_ATTR_TUN_PORT, v)
        });
        push_opt(&mut o, self.tun_flags, |v| {
            WireNla::U16(IPVS_DEST_ATTR_TUN_FLAGS, v)
        });
        push_opt(&mut o, self.u_thresh, |v| {
            WireNla::U32(IPVS_DEST_ATTR_U_THRESH, v)
        });
        push_opt(&mut o, self.l_thresh, |v| {
            WireNla::U32(IPVS_DEST_ATTR_L_THRESH, v)
        });
        push_opt(&mut o, self.active_conns, |v| {
            WireNla::U32(IPVS_DEST_ATTR_ACTIVE_CONNS, v)
        });
        push_opt(&mut o, self.inact_conns, |v| {
            WireNla::U32(IPVS_DEST_ATTR_INACT_CONNS, v)
        });
        push_opt(&mut o, self.persist_conns, |v| {
            WireNla::U32(IPVS_DEST_ATTR_PERSIST_CONNS, v)
        });
        if let Some(s) = &self.stats {
            o.push(WireNla::Nested(IPVS_DEST_ATTR_STATS, stats_nlas(s, false)));
        }
        if let Some(s) = &self.stats64 {
            o.push(WireNla::Nested(IPVS_DEST_ATTR_STATS64, stats_nlas(s, true)));
        }
        o
    }
}

impl DaemonAttrs {
    fn to_nlas(&self) -> Vec<WireNla> {
        let mut o = Vec::new();
        push_opt(&mut o, self.state, |v| {
            WireNla::U32(IPVS_DAEMON_ATTR_STATE, v)
        });
        if let Some(s) = &self.mcast_ifn {
            o.push(WireNla::Str(IPVS_DAEMON_ATTR_MCAST_IFN, s.clone()));
        }
        push_opt(&mut o, self.sync_id, |v| {
            WireNla::U32(IPVS_DAEMON_ATTR_SYNC_ID, v)
        });
        push_opt(&mut o, self.sync_maxlen, |v| {
            WireNla::U16(IPVS_DAEMON_ATTR_SYNC_MAXLEN, v)
        });
        push_opt(&mut o, self.mcast_group, |v| {
            WireNla::Bytes(IPVS_DAEMON_ATTR_MCAST_GROUP, v.octets().to_vec())
        });
        push_opt(&mut o, self.mcast_group6, |v| {
            WireNla::Bytes(IPVS_DAEMON_ATTR_MCAST_GROUP6, v.octets().to_vec())
        });
        push_opt(&mut o, self.mcast_port, |v| {
            WireNla::Be16(IPVS_DAEMON_ATTR_MCAST_PORT, v)
        });
        push_opt(&mut o, self.mcast_ttl, |v| {
            WireNla::U8(IPVS_DAEMON_ATTR_MCAST_TTL, v)
        });
        o
    }
}

impl IpvsAttr {
    fn to_nla(&self) -> WireNla {
        match self {
            Self::Service(s) => WireNla::Nested(IPVS_CMD_ATTR_SERVICE, s.to_nlas()),
            Self::Dest(d) => WireNla::Nested(IPVS_CMD_ATTR_DEST, d.to_nlas()),
            Self::Daemon(d) => WireNla::Nested(IPVS_CMD_ATTR_DAEMON, d.to_nlas()),
            Self::TimeoutTcp(v) => WireNla::U32(IPVS_CMD_ATTR_TIMEOUT_TCP, *v),
            Self::TimeoutTcpFin(v) => WireNla::U32(IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, *v),
            Self::TimeoutUdp(v) => WireNla::U32(IPVS_CMD_ATTR_TIMEOUT_UDP, *v),
            Self::InfoVersion(v) => WireNla::U32(IPVS_INFO_ATTR_VERSION, *v),
            Self::InfoConnTabSize(v) => WireNla::U32(IPVS_INFO_ATTR_CONN_TAB_SIZE, *v),
        }
    }
}

impl IpvsMessage {
    fn nlas(&self) -> Vec<WireNla> {
        self.attrs.iter().map(IpvsAttr::to_nla).collect()
    }

    /// The attribute bytes (without any header), as they follow `genlmsghdr`.
    pub fn to_attr_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0; self.buffer_len()];
        self.emit(&mut buf);
        buf
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.nlas().as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.nlas().as_slice().emit(buffer)
    }
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }

    fn command(&self) -> u8 {
        self.cmd.raw()
    }

    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

fn nlas<'a>(
    buf: &'a [u8],
    context: &'static str,
) -> impl Iterator<Item = Result<NlaBuffer<&'a [u8]>, CodecError>> + 'a {
    NlasIterator::new(buf).map(move |r| {
        r.map_err(|e| CodecError::Nla {
            context,
            reason: e.to_string(),
        })
    })
}

fn fixed<const N: usize>(
    v: &[u8],
    attr: &'static str,
    expected: &'static str,
) -> Result<[u8; N], CodecError> {
    <[u8; N]>::try_from(v).map_err(|_| CodecError::Length {
        attr,
        expected,
        got: v.len(),
    })
}

fn u8_of(v: &[u8], attr: &'static str) -> Result<u8, CodecError> {
    Ok(fixed::<1>(v, attr, "1")?[0])
}

fn u16_of(v: &[u8], attr: &'static str) -> Result<u16, CodecError> {
    Ok(u16::from_ne_bytes(fixed(v, attr, "2")?))
}

fn be16_of(v: &[u8], attr: &'static str) -> Result<u16, CodecError> {
    Ok(u16::from_be_bytes(fixed(v, attr, "2")?))
}

fn u32_of(v: &[u8], attr: &'static str) -> Result<u32, CodecError> {
    Ok(u32::from_ne_bytes(fixed(v, attr, "4")?))
}

/// A counter the kernel sends as u32 in STATS and as u64 in STATS64; accept either width.
fn counter_of(v: &[u8], attr: &'static str) -> Result<u64, CodecError> {
    match v.len() {
        4 => Ok(u64::from(u32_of(v, attr)?)),
        8 => Ok(u64::from_ne_bytes(fixed(v, attr, "8")?)),
        got => Err(CodecError::Length {
            attr,
            expected: "4 or 8",
            got,
        }),
    }
}

/// `union nf_inet_addr`: the kernel sends 16 bytes; a sender may send only the 4 IPv4 bytes.
fn inet_addr_of(v: &[u8], attr: &'static str) -> Result<[u8; NF_INET_ADDR_LEN], CodecError> {
    let mut out = [0; NF_INET_ADDR_LEN];
    match v.len() {
        4 | NF_INET_ADDR_LEN => {
            out[..v.len()].copy_from_slice(v);
            Ok(out)
        }
        got => Err(CodecError::Length {
            attr,
            expected: "4 or 16",
            got,
        }),
    }
}

fn string_of(v: &[u8], attr: &'static str) -> Result<String, CodecError> {
    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
    std::str::from_utf8(&v[..end])
        .map(str::to_owned)
        .map_err(|_| CodecError::Text { attr })
}

fn decode_stats(buf: &[u8], context: &'static str) -> Result<Stats, CodecError> {
    let mut s = Stats::default();
    for nla in nlas(buf, context) {
        let nla = nla?;
        let v = nla.value();
        match nla.kind() {
            IPVS_STATS_ATTR_CONNS => s.conns = counter_of(v, "IPVS_STATS_ATTR_CONNS")?,
            IPVS_STATS_ATTR_INPKTS => s.in_packets = counter_of(v, "IPVS_STATS_ATTR_INPKTS")?,
            IPVS_STATS_ATTR_OUTPKTS => s.out_packets = counter_of(v, "IPVS_STATS_ATTR_OUTPKTS")?,
            IPVS_STATS_ATTR_INBYTES => s.in_bytes = counter_of(v, "IPVS_STATS_ATTR_INBYTES")?,
            IPVS_STATS_ATTR_OUTBYTES => s.out_bytes = counter_of(v, "IPVS_STATS_ATTR_OUTBYTES")?,
            IPVS_STATS_ATTR_CPS => s.cps = counter_of(v, "IPVS_STATS_ATTR_CPS")?,
            IPVS_STATS_ATTR_INPPS => s.in_pps = counter_of(v, "IPVS_STATS_ATTR_INPPS")?,
            IPVS_STATS_ATTR_OUTPPS => s.out_pps = counter_of(v, "IPVS_STATS_ATTR_OUTPPS")?,
            IPVS_STATS_ATTR_INBPS => s.in_bps = counter_of(v, "IPVS_STATS_ATTR_INBPS")?,
            IPVS_STATS_ATTR_OUTBPS => s.out_bps = counter_of(v, "IPVS_STATS_ATTR_OUTBPS")?,
            // IPVS_STATS_ATTR_PAD aligns 64-bit values; it and anything newer are skipped.
            _ => {}
        }
    }
    Ok(s)
}

impl ServiceAttrs {
    pub fn decode(buf: &[u8]) -> Result<Self, CodecError> {
        let mut a = Self::default();
        for nla in nlas(buf, "IPVS_CMD_ATTR_SERVICE") {
            let nla = nla?;
            let v = nla.value();
            match nla.kind() {
                IPVS_SVC_ATTR_AF => a.af = Some(u16_of(v, "IPVS_SVC_ATTR_AF")?),
                IPVS_SVC_ATTR_PROTOCOL => a.protocol = Some(u16_of(v, "IPVS_SVC_ATTR_PROTOCOL")?),
                IPVS_SVC_ATTR_ADDR => a.addr = Some(inet_addr_of(v, "IPVS_SVC_ATTR_ADDR")?),
                IPVS_SVC_ATTR_PORT => a.port = Some(be16_of(v, "IPVS_SVC_ATTR_PORT")?),
                IPVS_SVC_ATTR_FWMARK => a.fwmark = Some(u32_of(v, "IPVS_SVC_ATTR_FWMARK")?),
                IPVS_SVC_ATTR_SCHED_NAME => {
                    a.sched_name = Some(string_of(v, "IPVS_SVC_ATTR_SCHED_NAME")?)
                }
                IPVS_SVC_ATTR_FLAGS => {
                    let b: [u8; 8] = fixed(v, "IPVS_SVC_ATTR_FLAGS", "8")?;
                    a.flags = Some(FlagsMask {
                        flags: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
                        mask: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
                    });
                }
                IPVS_SVC_ATTR_TIMEOUT => a.timeout = Some(u32_of(v, "IPVS_SVC_ATTR_TIMEOUT")?),
                IPVS_SVC_ATTR_NETMASK => a.netmask = Some(fixed(v, "IPVS_SVC_ATTR_NETMASK", "4")?),
                IPVS_SVC_ATTR_STATS => a.stats = Some(decode_stats(v, "IPVS_SVC_ATTR_STATS")?),
                IPVS_SVC_ATTR_PE_NAME => a.pe_name = Some(string_of(v, "IPVS_SVC_ATTR_PE_NAME")?),
                IPVS_SVC_ATTR_STATS64 => {
                    a.stats64 = Some(decode_stats(v, "IPVS_SVC_ATTR_STATS64")?)
                }
                _ => {}
            }
        }
        Ok(a)
    }
}

impl DestAttrs {
    pub fn decode(buf: &[u8]) -> Result<Self, CodecError> {
        let mut a = Self::default();
        for nla in nlas(buf, "IPVS_CMD_ATTR_DEST") {
            let nla = nla?;
            let v = nla.value();
            match nla.kind() {
                IPVS_DEST_ATTR_ADDR => a.addr = Some(inet_addr_of(v, "IPVS_DEST_ATTR_ADDR")?),
                IPVS_DEST_ATTR_PORT => a.port = Some(be16_of(v, "IPVS_DEST_ATTR_PORT")?),
                IPVS_DEST_ATTR_FWD_METHOD => {
                    a.fwd_method = Some(u32_of(v, "IPVS_DEST_ATTR_FWD_METHOD")?)
                }
                IPVS_DEST_ATTR_WEIGHT => a.weight = Some(u32_of(v, "IPVS_DEST_ATTR_WEIGHT")?),
                IPVS_DEST_ATTR_U_THRESH => a.u_thresh = Some(u32_of(v, "IPVS_DEST_ATTR_U_THRESH")?),
                IPVS_DEST_ATTR_L_THRESH => a.l_thresh = Some(u32_of(v, "IPVS_DEST_ATTR_L_THRESH")?),
                IPVS_DEST_ATTR_ACTIVE_CONNS => {
                    a.active_conns = Some(u32_of(v, "IPVS_DEST_ATTR_ACTIVE_CONNS")?)
                }
                IPVS_DEST_ATTR_INACT_CONNS => {
                    a.inact_conns = Some(u32_of(v, "IPVS_DEST_ATTR_INACT_CONNS")?)
                }
                IPVS_DEST_ATTR_PERSIST_CONNS => {
                    a.persist_conns = Some(u32_of(v, "IPVS_DEST_ATTR_PERSIST_CONNS")?)
                }
                IPVS_DEST_ATTR_STATS => a.stats = Some(decode_stats(v, "IPVS_DEST_ATTR_STATS")?),
                IPVS_DEST_ATTR_ADDR_FAMILY => {
                    a.addr_family = Some(u16_of(v, "IPVS_DEST_ATTR_ADDR_FAMILY")?)
                }
                IPVS_DEST_ATTR_STATS64 => {
                    a.stats64 = Some(decode_stats(v, "IPVS_DEST_ATTR_STATS64")?)
                }
                IPVS_DEST_ATTR_TUN_TYPE => a.tun_type = Some(u8_of(v, "IPVS_DEST_ATTR_TUN_TYPE")?),
                IPVS_DEST_ATTR_TUN_PORT => {
                    a.tun_port = Some(be16_of(v, "IPVS_DEST_ATTR_TUN_PORT")?)
                }
                IPVS_DEST_ATTR_TUN_FLAGS => {
                    a.tun_flags = Some(u16_of(v, "IPVS_DEST_ATTR_TUN_FLAGS")?)
                }
                _ => {}
            }
        }
        Ok(a)
    }
}

impl DaemonAttrs {
    pub fn decode(buf: &[u8]) -> Result<Self, CodecError> {
        let mut a = Self::default();
        for nla in nlas(buf, "IPVS_CMD_ATTR_DAEMON") {
            let nla = nla?;
            let v = nla.value();
            match nla.kind() {
                IPVS_DAEMON_ATTR_STATE => a.state = Some(u32_of(v, "IPVS_DAEMON_ATTR_STATE")?),
                IPVS_DAEMON_ATTR_MCAST_IFN => {
                    a.mcast_ifn = Some(string_of(v, "IPVS_DAEMON_ATTR_MCAST_IFN")?)
                }
                IPVS_DAEMON_ATTR_SYNC_ID => {
                    a.sync_id = Some(u32_of(v, "IPVS_DAEMON_ATTR_SYNC_ID")?)
                }
                IPVS_DAEMON_ATTR_SYNC_MAXLEN => {
                    a.sync_maxlen = Some(u16_of(v, "IPVS_DAEMON_ATTR_SYNC_MAXLEN")?)
                }
                IPVS_DAEMON_ATTR_MCAST_GROUP => {
                    let b: [u8; 4] = fixed(v, "IPVS_DAEMON_ATTR_MCAST_GROUP", "4")?;
                    a.mcast_group = Some(Ipv4Addr::from(b));
                }
                IPVS_DAEMON_ATTR_MCAST_GROUP6 => {
                    let b: [u8; 16] = fixed(v, "IPVS_DAEMON_ATTR_MCAST_GROUP6", "16")?;
                    a.mcast_group6 = Some(Ipv6Addr::from(b));
                }
                IPVS_DAEMON_ATTR_MCAST_PORT => {
                    a.mcast_port = Some(be16_of(v, "IPVS_DAEMON_ATTR_MCAST_PORT")?)
                }
                IPVS_DAEMON_ATTR_MCAST_TTL => {
                    a.mcast_ttl = Some(u8_of(v, "IPVS_DAEMON_ATTR_MCAST_TTL")?)
                }
                _ => {}
            }
        }
        Ok(a)
    }
}

impl IpvsMessage {
    pub fn new(cmd: IpvsCmd, attrs: Vec<IpvsAttr>) -> Self {
        Self { cmd, attrs }
    }

    /// Decodes the attributes that follow `genlmsghdr`; their meaning depends on the command.
    pub fn decode(cmd: u8, buf: &[u8]) -> Result<Self, CodecError> {
        let cmd = IpvsCmd::from_raw(cmd).ok_or(CodecError::UnknownCommand(cmd))?;
        let mut attrs = Vec::new();
        for nla in nlas(buf, "IPVS message") {
            let nla = nla?;
            let v = nla.value();
            let attr = if cmd.carries_info() {
                match nla.kind() {
                    IPVS_INFO_ATTR_VERSION => {
                        IpvsAttr::InfoVersion(u32_of(v, "IPVS_INFO_ATTR_VERSION")?)
                    }
                    IPVS_INFO_ATTR_CONN_TAB_SIZE => {
                        IpvsAttr::InfoConnTabSize(u32_of(v, "IPVS_INFO_ATTR_CONN_TAB_SIZE")?)
                    }
                    _ => continue,
                }
            } else {
                match nla.kind() {
                    IPVS_CMD_ATTR_SERVICE => IpvsAttr::Service(ServiceAttrs::decode(v)?),
                    IPVS_CMD_ATTR_DEST => IpvsAttr::Dest(DestAttrs::decode(v)?),
                    IPVS_CMD_ATTR_DAEMON => IpvsAttr::Daemon(DaemonAttrs::decode(v)?),
                    IPVS_CMD_ATTR_TIMEOUT_TCP => {
                        IpvsAttr::TimeoutTcp(u32_of(v, "IPVS_CMD_ATTR_TIMEOUT_TCP")?)
                    }
                    IPVS_CMD_ATTR_TIMEOUT_TCP_FIN => {
                        IpvsAttr::TimeoutTcpFin(u32_of(v, "IPVS_CMD_ATTR_TIMEOUT_TCP_FIN")?)
                    }
                    IPVS_CMD_ATTR_TIMEOUT_UDP => {
                        IpvsAttr::TimeoutUdp(u32_of(v, "IPVS_CMD_ATTR_TIMEOUT_UDP")?)
                    }
                    _ => continue,
                }
            };
            attrs.push(attr);
        }
        Ok(Self { cmd, attrs })
    }

    /// Decodes a whole generic-netlink payload: the 4-byte `genlmsghdr` then attributes.
    pub fn decode_genl(buf: &[u8]) -> Result<Self, CodecError> {
        let header = GenlHeader::parse(buf).map_err(|e| CodecError::Header(e.to_string()))?;
        let attrs = buf.get(4..).unwrap_or_default();
        Self::decode(header.cmd, attrs)
    }

    fn service_attrs(&self) -> Option<&ServiceAttrs> {
        self.attrs.iter().find_map(|a| match a {
            IpvsAttr::Service(s) => Some(s),
            _ => None,
        })
    }

    fn dest_attrs(&self) -> Option<&DestAttrs> {
        self.attrs.iter().find_map(|a| match a {
            IpvsAttr::Dest(d) => Some(d),
            _ => None,
        })
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(Self::decode(header.cmd, buf)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Model <-> wire

fn ip_to_inet(ip: IpAddr) -> [u8; NF_INET_ADDR_LEN] {
    let mut out = [0; NF_INET_ADDR_LEN];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

fn inet_to_ip(raw: [u8; NF_INET_ADDR_LEN], af: AddressFamily) -> IpAddr {
    match af {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::from(raw)),
    }
}

fn af_of(raw: u16, attr: &'static str) -> Result<AddressFamily, CodecError> {
    AddressFamily::from_raw(raw).ok_or(CodecError::Value {
        attr,
        value: raw.into(),
    })
}

fn check_name(name: &str) -> Result<(), CodecError> {
    // The kernel's policy is NLA_NUL_STRING with IP_VS_SCHEDNAME_MAXLEN - 1 characters.
    if name.len() >= IP_VS_SCHEDNAME_MAXLEN || name.as_bytes().contains(&0) {
        return Err(CodecError::NameTooLong {
            name: name.to_owned(),
            max: IP_VS_SCHEDNAME_MAXLEN - 1,
        });
    }
    Ok(())
}

/// The attributes that name a service (enough for DEL_SERVICE, GET_SERVICE and the service part
/// of the destination commands).
pub fn service_key_attrs(key: &ServiceKey) -> ServiceAttrs {
    let mut a = ServiceAttrs {
        af: Some(key.af().raw()),
        ..Default::default()
    };
    match key {
        ServiceKey::Addr { protocol, addr } => {
            a.protocol = Some(protocol.raw());
            a.addr = Some(ip_to_inet(addr.ip()));
            a.port = Some(addr.port());
        }
        ServiceKey::Fwmark { mark, .. } => a.fwmark = Some(*mark),
    }
    a
}

/// Everything NEW/SET_SERVICE needs: the kernel requires scheduler, flags, timeout and netmask.
pub fn service_attrs(svc: &Service) -> Result<ServiceAttrs, CodecError> {
    check_name(&svc.scheduler)?;
    if let Some(pe) = &svc.pe_name {
        check_name(pe)?;
    }
    let mut a = service_key_attrs(&svc.key);
    a.sched_name = Some(svc.scheduler.clone());
    a.pe_name = svc.pe_name.clone();
    // mask ~0 like ipvsadm: the service ends up with exactly these flags. HASHED must never be
    // sent: the kernel sets it itself when it hashes the service.
    a.flags = Some(FlagsMask {
        flags: svc.flags.user_visible().bits(),
        mask: u32::MAX,
    });
    a.timeout = Some(svc.timeout);
    a.netmask = Some(match svc.netmask {
        Netmask::V4(mask) => mask.octets(),
        Netmask::V6Prefix(len) => u32::from(len).to_ne_bytes(),
    });
    Ok(a)
}

/// Reads a service (and its statistics, 64-bit preferred) from its attributes.
pub fn service_entry_from_attrs(a: &ServiceAttrs) -> Result<ServiceEntry, CodecError> {
    const WHAT: &str = "service";
    let af = af_of(
        a.af.ok_or(CodecError::Missing {
            what: WHAT,
            attr: "IPVS_SVC_ATTR_AF",
        })?,
        "IPVS_SVC_ATTR_AF",
    )?;
    let key = match a.fwmark {
        Some(mark) if mark != 0 => ServiceKey::Fwmark { af, mark },
        _ => {
            let raw_proto = a.protocol.ok_or(CodecError::Missing {
                what: WHAT,
                attr: "IPVS_SVC_ATTR_PROTOCOL",
            })?;
            let protocol = Protocol::from_raw(raw_proto).ok_or(CodecError::Value {
                attr: "IPVS_SVC_ATTR_PROTOCOL",
                value: raw_proto.into(),
            })?;
            let addr = a.addr.ok_or(CodecError::Missing {
                what: WHAT,
                attr: "IPVS_SVC_ATTR_ADDR",
            })?;
            let port = a.port.ok_or(CodecError::Missing {
                what: WHAT,
                attr: "IPVS_SVC_ATTR_PORT",
            })?;
            ServiceKey::Addr {
                protocol,
                addr: SocketAddr::new(inet_to_ip(addr, af), port),
            }
        }
    };
    let scheduler = a.sched_name.clone().ok_or(CodecError::Missing {
        what: WHAT,
        attr: "IPVS_SVC_ATTR_SCHED_NAME",
    })?;
    let flags = ServiceFlags(a.flags.map(|f| f.flags & f.mask).unwrap_or(0)).user_visible();
    let netmask = match (af, a.netmask) {
        (_, None) => Netmask::host(af),
        (AddressFamily::Inet, Some(raw)) => Netmask::V4(Ipv4Addr::from(raw)),
        (AddressFamily::Inet6, Some(raw)) => {
            let len = u32::from_ne_bytes(raw);
            let len = u8::try_from(len)
                .ok()
                .filter(|l| *l <= 128)
                .ok_or(CodecError::Value {
                    attr: "IPVS_SVC_ATTR_NETMASK",
                    value: len.into(),
                })?;
            Netmask::V6Prefix(len)
        }
    };
    let service = Service {
        key,
        scheduler,
        flags,
        timeout: a.timeout.unwrap_or(0),
        netmask,
        pe_name: a.pe_name.clone().filter(|s| !s.is_empty()),
    };
    let stats = a.stats64.or(a.stats).unwrap_or_default();
    Ok(ServiceEntry { service, stats })
}

/// The attributes that name a destination (enough for DEL_DEST).
pub fn dest_key_attrs(addr: SocketAddr) -> DestAttrs {
    DestAttrs {
        addr_family: Some(AddressFamily::of(&addr.ip()).raw()),
        addr: Some(ip_to_inet(addr.ip())),
        port: Some(addr.port()),
        ..Default::default()
    }
}

/// Everything NEW/SET_DEST needs: the kernel requires forward method, weight and thresholds.
pub fn dest_attrs(d: &Destination) -> DestAttrs {
    let mut a = dest_key_attrs(d.addr);
    a.fwd_method = Some(d.forward.raw());
    a.weight = Some(d.weight);
    a.u_thresh = Some(d.upper_threshold);
    a.l_thresh = Some(d.lower_threshold);
    // Like keepalived, tunnel details only go with tunnel forwarding.
    if let (ForwardMethod::Tunnel, Some(t)) = (d.forward, d.tunnel) {
        a.tun_type = Some(t.kind.raw());
        a.tun_port = Some(t.port);
        a.tun_flags = Some(t.flags);
    }
    a
}

/// Reads a destination; `service_af` is used when the kernel (before mixed-family support) does
/// not send `IPVS_DEST_ATTR_ADDR_FAMILY`.
pub fn dest_entry_from_attrs(
    a: &DestAttrs,
    service_af: AddressFamily,
) -> Result<DestinationEntry, CodecError> {
    const WHAT: &str = "destination";
    let af = match a.addr_family {
        Some(raw) => af_of(raw, "IPVS_DEST_ATTR_ADDR_FAMILY")?,
        None => service_af,
    };
    let addr = a.addr.ok_or(CodecError::Missing {
        what: WHAT,
        attr: "IPVS_DEST_ATTR_ADDR",
    })?;
    let port = a.port.ok_or(CodecError::Missing {
        what: WHAT,
        attr: "IPVS_DEST_ATTR_PORT",
    })?;
    let raw_fwd = a.fwd_method.ok_or(CodecError::Missing {
        what: WHAT,
        attr: "IPVS_DEST_ATTR_FWD_METHOD",
    })?;
    let forward = ForwardMethod::from_raw(raw_fwd).ok_or(CodecError::Value {
        attr: "IPVS_DEST_ATTR_FWD_METHOD",
        value: raw_fwd.into(),
    })?;
    let tunnel = if forward == ForwardMethod::Tunnel {
        let raw = a.tun_type.unwrap_or(0);
        let kind = TunnelType::from_raw(raw).ok_or(CodecError::Value {
            attr: "IPVS_DEST_ATTR_TUN_TYPE",
            value: raw.into(),
        })?;
        Some(Tunnel {
            kind,
            port: a.tun_port.unwrap_or(0),
            flags: a.tun_flags.unwrap_or(0),
        })
    } else {
        None
    };
    let destination = Destination {
        addr: SocketAddr::new(inet_to_ip(addr, af), port),
        forward,
        weight: a.weight.ok_or(CodecError::Missing {
            what: WHAT,
            attr: "IPVS_DEST_ATTR_WEIGHT",
        })?,
        upper_threshold: a.u_thresh.unwrap_or(0),
        lower_threshold: a.l_thresh.unwrap_or(0),
        tunnel,
    };
    Ok(DestinationEntry {
        destination,
        active_conns: a.active_conns.unwrap_or(0),
        inactive_conns: a.inact_conns.unwrap_or(0),
        persist_conns: a.persist_conns.unwrap_or(0),
        stats: a.stats64.or(a.stats).unwrap_or_default(),
    })
}

// ---------------------------------------------------------------------------------------------
// Requests and replies

/// Builders for every request the client sends.
impl IpvsMessage {
    pub fn new_service(svc: &Service) -> Result<Self, CodecError> {
        Ok(Self::new(
            IpvsCmd::NewService,
            vec![IpvsAttr::Service(service_attrs(svc)?)],
        ))
    }

    pub fn set_service(svc: &Service) -> Result<Self, CodecError> {
        Ok(Self::new(
            IpvsCmd::SetService,
            vec![IpvsAttr::Service(service_attrs(svc)?)],
        ))
    }

    pub fn del_service(key: &ServiceKey) -> Self {
        Self::new(
            IpvsCmd::DelService,
            vec![IpvsAttr::Service(service_key_attrs(key))],
        )
    }

    /// With a key: one service (the kernel answers ESRCH when it does not exist). Sent as a
    /// dump without attributes: all services.
    pub fn get_service(key: Option<&ServiceKey>) -> Self {
        let attrs = key
            .map(|k| vec![IpvsAttr::Service(service_key_attrs(k))])
            .unwrap_or_default();
        Self::new(IpvsCmd::GetService, attrs)
    }

    pub fn new_dest(key: &ServiceKey, d: &Destination) -> Self {
        Self::new(
            IpvsCmd::NewDest,
            vec![
                IpvsAttr::Service(service_key_attrs(key)),
                IpvsAttr::Dest(dest_attrs(d)),
            ],
        )
    }

    pub fn set_dest(key: &ServiceKey, d: &Destination) -> Self {
        Self::new(
            IpvsCmd::SetDest,
            vec![
                IpvsAttr::Service(service_key_attrs(key)),
                IpvsAttr::Dest(dest_attrs(d)),
            ],
        )
    }

    pub fn del_dest(key: &ServiceKey, addr: SocketAddr) -> Self {
        Self::new(
            IpvsCmd::DelDest,
            vec![
                IpvsAttr::Service(service_key_attrs(key)),
                IpvsAttr::Dest(dest_key_attrs(addr)),
            ],
        )
    }

    /// Always a dump: the kernel has no single-destination GET.
    pub fn get_dests(key: &ServiceKey) -> Self {
        Self::new(
            IpvsCmd::GetDest,
            vec![IpvsAttr::Service(service_key_attrs(key))],
        )
    }

    pub fn get_info() -> Self {
        Self::new(IpvsCmd::GetInfo, Vec::new())
    }

    pub fn get_config() -> Self {
        Self::new(IpvsCmd::GetConfig, Vec::new())
    }

    pub fn set_config(t: &Timeouts) -> Self {
        Self::new(
            IpvsCmd::SetConfig,
            vec![
                IpvsAttr::TimeoutTcp(t.tcp),
                IpvsAttr::TimeoutTcpFin(t.tcp_fin),
                IpvsAttr::TimeoutUdp(t.udp),
            ],
        )
    }

    pub fn flush() -> Self {
        Self::new(IpvsCmd::Flush, Vec::new())
    }
}

/// Decoders for the kernel's replies.
impl IpvsMessage {
    pub fn to_service_entry(&self) -> Result<ServiceEntry, CodecError> {
        let a = self.service_attrs().ok_or(CodecError::MissingReplyAttr {
            cmd: self.cmd,
            attr: "IPVS_CMD_ATTR_SERVICE",
        })?;
        service_entry_from_attrs(a)
    }

    pub fn to_dest_entry(&self, service_af: AddressFamily) -> Result<DestinationEntry, CodecError> {
        let a = self.dest_attrs().ok_or(CodecError::MissingReplyAttr {
            cmd: self.cmd,
            attr: "IPVS_CMD_ATTR_DEST",
        })?;
        dest_entry_from_attrs(a, service_af)
    }

    pub fn to_info(&self) -> Result<Info, CodecError> {
        let mut version = None;
        let mut conn_tab_size = None;
        for a in &self.attrs {
            match a {
                IpvsAttr::InfoVersion(v) => version = Some(*v),
                IpvsAttr::InfoConnTabSize(v) => conn_tab_size = Some(*v),
                _ => {}
            }
        }
        Ok(Info {
            version: version.ok_or(CodecError::MissingReplyAttr {
                cmd: self.cmd,
                attr: "IPVS_INFO_ATTR_VERSION",
            })?,
            conn_tab_size: conn_tab_size.ok_or(CodecError::MissingReplyAttr {
                cmd: self.cmd,
                attr: "IPVS_INFO_ATTR_CONN_TAB_SIZE",
            })?,
        })
    }

    pub fn to_timeouts(&self) -> Timeouts {
        let mut t = Timeouts::default();
        for a in &self.attrs {
            match a {
                IpvsAttr::TimeoutTcp(v) => t.tcp = *v,
                IpvsAttr::TimeoutTcpFin(v) => t.tcp_fin = *v,
                IpvsAttr::TimeoutUdp(v) => t.udp = *v,
                _ => {}
            }
        }
        t
    }
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
