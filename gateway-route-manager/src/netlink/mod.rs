//! The one place in this crate that talks rtnetlink: links (name → index), nexthop objects,
//! IPv4 routes and IPv4 policy rules.
//!
//! Owns: the NETLINK_ROUTE connection (netlink-proto), the message codecs (netlink-packet-route
//! for routes/rules/links, our own `nexthop` codec for `RTM_*NEXTHOP`, which neither
//! netlink-packet-route 0.34 nor rtnetlink 0.24 has), and the conversion between kernel
//! messages and the plain types below ([`Nexthop`], [`Route`], [`Rule`]). It must not decide
//! what the kernel should hold: the `egress` planner and reconciler do. A breaking release of
//! the netlink crates should touch only this module.
//!
//! One connection carries both message families: [`RtnlMessage`] wraps netlink-packet-route's
//! `RouteNetlinkMessage` and our nexthop messages and dispatches on the message type.

mod nexthop;

use std::net::{IpAddr, Ipv4Addr};

use futures::StreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_core::{
    DecodeError, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_proto::sys::{protocols::NETLINK_ROUTE, SocketAddr};
use netlink_proto::ConnectionHandle;

use crate::error::NetlinkError;
use nexthop::{
    GroupEntry, NexthopAttribute, NexthopMessage, ResGroup, NEXTHOP_GRP_TYPE_MPATH,
    NEXTHOP_GRP_TYPE_RES, RTM_DELNEXTHOP, RTM_GETNEXTHOP, RTM_NEWNEXTHOP,
};

/// Linux's main routing table.
pub const RT_TABLE_MAIN: u32 = 254;
const AF_INET: u8 = 2;
const AF_UNSPEC: u8 = 0;

/// A nexthop object as this crate models it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nexthop {
    pub id: u32,
    pub protocol: u8,
    pub kind: NexthopKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NexthopKind {
    /// An IPv4 gateway on an interface.
    Gateway { gateway: Ipv4Addr, oif: u32 },
    /// A group over other nexthop ids (all weight 1 here).
    Group { members: Vec<u32>, group: GroupType },
    /// Anything else (blackhole nexthop, IPv6, encap, weighted group...): never equal to
    /// what we want, so an owned one is replaced.
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupType {
    /// `type mpath`: hash-threshold.
    HashThreshold,
    /// `type resilient`: hash → bucket → nexthop; timers in clock_t (1/100 s).
    Resilient {
        buckets: u16,
        idle_timer: u32,
        unbalanced_timer: u32,
    },
}

impl GroupType {
    /// Whether the kernel can turn a group of type `self` into `other` with a replace
    /// (it refuses to change the type or the bucket count of an existing group).
    pub fn replaceable_by(&self, other: &GroupType) -> bool {
        match (self, other) {
            (GroupType::HashThreshold, GroupType::HashThreshold) => true,
            (GroupType::Resilient { buckets: a, .. }, GroupType::Resilient { buckets: b, .. }) => {
                a == b
            }
            _ => false,
        }
    }
}

/// An IPv4 route (only tos 0, no source prefix; others are not ours and are not listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub table: u32,
    pub dst: Ipv4Net,
    pub metric: u32,
    pub protocol: u8,
    pub target: RouteTarget,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    Nexthop(u32),
    Blackhole,
    Unreachable,
    /// `local`: delivered to this host (scope host) through interface index `oif` (lo), with
    /// the source address `prefsrc` for the host's own packets to it.
    Local {
        oif: u32,
        prefsrc: Option<Ipv4Addr>,
    },
    /// Any other kind of route (gateway without nexthop object, multipath, local...).
    Other(String),
}

impl Route {
    /// The kernel's identity of an IPv4 route within a table (replace works on this key).
    pub fn key(&self) -> (u32, Ipv4Net, u32) {
        (self.table, self.dst, self.metric)
    }

    /// A blackhole or unreachable route: the last resort that keeps traffic off other tables.
    pub fn is_kill_switch(&self) -> bool {
        matches!(
            self.target,
            RouteTarget::Blackhole | RouteTarget::Unreachable
        )
    }
}

/// An IPv4 policy rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub priority: u32,
    pub protocol: u8,
    pub action: RuleTarget,
    /// `None` = any destination.
    pub dst: Option<Ipv4Net>,
    /// `None` = any source. We never set it; kept so foreign rules compare unequal.
    pub src: Option<Ipv4Net>,
    pub iif: Option<String>,
    /// `(mark, mask)`.
    pub fwmark: Option<(u32, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RuleTarget {
    Lookup(u32),
    Other(u8),
}

/// Messages on our NETLINK_ROUTE connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RtnlMessage {
    Route(RouteNetlinkMessage),
    /// Message type (`RTM_*NEXTHOP`) and body.
    Nexthop(u16, NexthopMessage),
}

impl NetlinkSerializable for RtnlMessage {
    fn message_type(&self) -> u16 {
        match self {
            RtnlMessage::Route(m) => m.message_type(),
            RtnlMessage::Nexthop(t, _) => *t,
        }
    }
    fn buffer_len(&self) -> usize {
        match self {
            RtnlMessage::Route(m) => m.buffer_len(),
            RtnlMessage::Nexthop(_, m) => m.buffer_len(),
        }
    }
    fn serialize(&self, buffer: &mut [u8]) {
        match self {
            RtnlMessage::Route(m) => m.serialize(buffer),
            RtnlMessage::Nexthop(_, m) => m.emit(buffer),
        }
    }
}

impl NetlinkDeserializable for RtnlMessage {
    type Error = DecodeError;
    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Self::Error> {
        match header.message_type {
            RTM_NEWNEXTHOP | RTM_DELNEXTHOP | RTM_GETNEXTHOP => Ok(RtnlMessage::Nexthop(
                header.message_type,
                NexthopMessage::parse(payload)?,
            )),
            _ => Ok(RtnlMessage::Route(RouteNetlinkMessage::deserialize(
                header, payload,
            )?)),
        }
    }
}

/// A NETLINK_ROUTE connection in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct RouteSocket {
    handle: ConnectionHandle<RtnlMessage>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RouteSocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RouteSocket {
    /// Opens the socket and spawns its I/O task on the current tokio runtime.
    pub fn open() -> Result<Self, NetlinkError> {
        let (connection, handle, _unsolicited) =
            netlink_proto::new_connection::<RtnlMessage>(NETLINK_ROUTE)
                .map_err(NetlinkError::Open)?;
        let task = tokio::spawn(connection);
        Ok(RouteSocket { handle, task })
    }

    async fn request(
        &self,
        message: RtnlMessage,
        flags: u16,
        what: &(dyn Fn() -> String + Send + Sync),
    ) -> Result<Vec<RtnlMessage>, NetlinkError> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        request.finalize();
        let mut responses = self
            .handle
            .request(request, SocketAddr::new(0, 0))
            .map_err(|_| NetlinkError::Closed { what: what() })?;
        let mut answers = Vec::new();
        while let Some(message) = responses.next().await {
            match message.payload {
                NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                NetlinkPayload::Error(e) => {
                    if let Some(code) = e.code {
                        let errno = -code.get();
                        return Err(NetlinkError::Kernel {
                            what: what(),
                            errno,
                            message: std::io::Error::from_raw_os_error(errno).to_string(),
                        });
                    }
                }
                NetlinkPayload::Done(_) => break,
                _ => {}
            }
        }
        Ok(answers)
    }

    /// The index of interface `name`.
    pub async fn link_index(&self, name: &str) -> Result<u32, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        let what = || format!("looking up interface {name:?}");
        let answers = match self
            .request(
                RtnlMessage::Route(RouteNetlinkMessage::GetLink(msg)),
                NLM_F_ACK,
                &what,
            )
            .await
        {
            Ok(a) => a,
            Err(NetlinkError::Kernel { errno, .. }) if errno == libc::ENODEV => {
                return Err(NetlinkError::NoSuchInterface {
                    name: name.to_owned(),
                })
            }
            Err(e) => return Err(e),
        };
        answers
            .into_iter()
            .find_map(|m| match m {
                RtnlMessage::Route(RouteNetlinkMessage::NewLink(link)) => Some(link.header.index),
                _ => None,
            })
            .ok_or_else(|| NetlinkError::NoSuchInterface {
                name: name.to_owned(),
            })
    }

    /// The primary (not secondary) IPv4 addresses of interface `index`, in the kernel's order.
    pub async fn primary_ipv4(&self, index: u32) -> Result<Vec<Ipv4Addr>, NetlinkError> {
        let what = || format!("dumping the IPv4 addresses of interface {index}");
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        let answers = self
            .request(
                RtnlMessage::Route(RouteNetlinkMessage::GetAddress(msg)),
                NLM_F_DUMP,
                &what,
            )
            .await?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RtnlMessage::Route(RouteNetlinkMessage::NewAddress(a))
                    if a.header.index == index
                        && !a.header.flags.contains(AddressHeaderFlags::Secondary) =>
                {
                    a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Local(IpAddr::V4(v)) => Some(*v),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Every nexthop object (all families).
    pub async fn dump_nexthops(&self) -> Result<Vec<Nexthop>, NetlinkError> {
        let what = || "dumping nexthops".to_owned();
        let answers = self
            .request(
                RtnlMessage::Nexthop(RTM_GETNEXTHOP, NexthopMessage::default()),
                NLM_F_DUMP,
                &what,
            )
            .await?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RtnlMessage::Nexthop(RTM_NEWNEXTHOP, nh) => nexthop_from_message(&nh),
                _ => None,
            })
            .collect())
    }

    /// Creates or replaces a nexthop object.
    pub async fn set_nexthop(&self, nexthop: &Nexthop) -> Result<(), NetlinkError> {
        let what = || format!("setting nexthop {}", nexthop.id);
        let message = nexthop_to_message(nexthop).ok_or_else(|| NetlinkError::Decode {
            what: what(),
            detail: "cannot encode a nexthop of kind Other".to_owned(),
        })?;
        self.request(
            RtnlMessage::Nexthop(RTM_NEWNEXTHOP, message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &what,
        )
        .await
        .map(drop)
    }

    /// Deletes nexthop `id` (the kernel also removes routes that use it).
    pub async fn delete_nexthop(&self, id: u32) -> Result<(), NetlinkError> {
        let what = || format!("deleting nexthop {id}");
        let message = NexthopMessage {
            attributes: vec![NexthopAttribute::Id(id)],
            ..Default::default()
        };
        self.request(
            RtnlMessage::Nexthop(RTM_DELNEXTHOP, message),
            NLM_F_ACK,
            &what,
        )
        .await
        .map(drop)
    }

    /// Every IPv4 route with tos 0 and no source prefix, in every table.
    pub async fn dump_routes(&self) -> Result<Vec<Route>, NetlinkError> {
        let what = || "dumping IPv4 routes".to_owned();
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let answers = self
            .request(
                RtnlMessage::Route(RouteNetlinkMessage::GetRoute(msg)),
                NLM_F_DUMP,
                &what,
            )
            .await?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RtnlMessage::Route(RouteNetlinkMessage::NewRoute(r)) => route_from_message(&r),
                _ => None,
            })
            .collect())
    }

    /// Creates or replaces the route with `route`'s key (table, dst, metric).
    pub async fn set_route(&self, route: &Route) -> Result<(), NetlinkError> {
        let what = || {
            format!(
                "setting route {} table {} metric {}",
                route.dst, route.table, route.metric
            )
        };
        let message = route_to_message(route).ok_or_else(|| NetlinkError::Decode {
            what: what(),
            detail: "cannot encode a route of kind Other".to_owned(),
        })?;
        self.request(
            RtnlMessage::Route(RouteNetlinkMessage::NewRoute(message)),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &what,
        )
        .await
        .map(drop)
    }

    /// Deletes one route (matched on table, dst, metric, protocol and type).
    pub async fn delete_route(&self, route: &Route) -> Result<(), NetlinkError> {
        let what = || {
            format!(
                "deleting route {} table {} metric {}",
                route.dst, route.table, route.metric
            )
        };
        let mut message = route_key_message(route);
        if let Some(kind) = route_type(&route.target) {
            message.header.kind = kind;
        }
        self.request(
            RtnlMessage::Route(RouteNetlinkMessage::DelRoute(message)),
            NLM_F_ACK,
            &what,
        )
        .await
        .map(drop)
    }

    /// Every IPv4 policy rule.
    pub async fn dump_rules(&self) -> Result<Vec<Rule>, NetlinkError> {
        let what = || "dumping IPv4 rules".to_owned();
        let mut msg = RuleMessage::default();
        msg.header.family = AddressFamily::Inet;
        let answers = self
            .request(
                RtnlMessage::Route(RouteNetlinkMessage::GetRule(msg)),
                NLM_F_DUMP,
                &what,
            )
            .await?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RtnlMessage::Route(RouteNetlinkMessage::NewRule(r)) => rule_from_message(&r),
                _ => None,
            })
            .collect())
    }

    pub async fn add_rule(&self, rule: &Rule) -> Result<(), NetlinkError> {
        let what = || format!("adding rule {}", describe_rule(rule));
        self.request(
            RtnlMessage::Route(RouteNetlinkMessage::NewRule(rule_to_message(rule))),
            NLM_F_ACK | NLM_F_CREATE,
            &what,
        )
        .await
        .map(drop)
    }

    pub async fn delete_rule(&self, rule: &Rule) -> Result<(), NetlinkError> {
        let what = || format!("deleting rule {}", describe_rule(rule));
        self.request(
            RtnlMessage::Route(RouteNetlinkMessage::DelRule(rule_to_message(rule))),
            NLM_F_ACK,
            &what,
        )
        .await
        .map(drop)
    }
}

/// `ip rule`-like text for logs and errors.
pub fn describe_rule(rule: &Rule) -> String {
    let mut text = format!("pref {}", rule.priority);
    if let Some(src) = rule.src {
        text.push_str(&format!(" from {src}"));
    }
    if let Some(dst) = rule.dst {
        text.push_str(&format!(" to {dst}"));
    }
    if let Some(iif) = &rule.iif {
        text.push_str(&format!(" iif {iif}"));
    }
    if let Some((mark, mask)) = rule.fwmark {
        text.push_str(&format!(" fwmark {mark:#x}/{mask:#x}"));
    }
    match rule.action {
        RuleTarget::Lookup(t) => text.push_str(&format!(" lookup {t}")),
        RuleTarget::Other(a) => text.push_str(&format!(" action {a}")),
    }
    text.push_str(&format!(" proto {}", rule.protocol));
    text
}

fn nexthop_from_message(msg: &NexthopMessage) -> Option<Nexthop> {
    let mut id = None;
    let mut oif = None;
    let mut gateway = None;
    let mut group: Option<Vec<GroupEntry>> = None;
    let mut group_type = NEXTHOP_GRP_TYPE_MPATH;
    let mut res = ResGroup::default();
    let mut other = Vec::new();
    for attr in &msg.attributes {
        match attr {
            NexthopAttribute::Id(v) => id = Some(*v),
            NexthopAttribute::Oif(v) => oif = Some(*v),
            NexthopAttribute::Gateway(g) => gateway = Some(*g),
            NexthopAttribute::Group(g) => group = Some(g.clone()),
            NexthopAttribute::GroupType(t) => group_type = *t,
            NexthopAttribute::ResGroup(r) => res = *r,
            NexthopAttribute::Blackhole => other.push("blackhole".to_owned()),
            NexthopAttribute::Other(_) => {}
        }
    }
    let id = id?;
    let kind = if let Some(entries) = group {
        if entries.iter().any(|e| e.weight != 1) {
            NexthopKind::Other("weighted group".to_owned())
        } else {
            let members = entries.iter().map(|e| e.id).collect();
            match group_type {
                NEXTHOP_GRP_TYPE_MPATH => NexthopKind::Group {
                    members,
                    group: GroupType::HashThreshold,
                },
                NEXTHOP_GRP_TYPE_RES => NexthopKind::Group {
                    members,
                    group: GroupType::Resilient {
                        buckets: res.buckets.unwrap_or(0),
                        idle_timer: res.idle_timer.unwrap_or(0),
                        unbalanced_timer: res.unbalanced_timer.unwrap_or(0),
                    },
                },
                t => NexthopKind::Other(format!("group type {t}")),
            }
        }
    } else if let (Some(gateway), Some(oif), true, AF_INET) =
        (gateway, oif, other.is_empty(), msg.family)
    {
        NexthopKind::Gateway { gateway, oif }
    } else {
        NexthopKind::Other(format!("family {} {}", msg.family, other.join(" ")))
    };
    Some(Nexthop {
        id,
        protocol: msg.protocol,
        kind,
    })
}

fn nexthop_to_message(nh: &Nexthop) -> Option<NexthopMessage> {
    let mut msg = NexthopMessage {
        protocol: nh.protocol,
        ..Default::default()
    };
    msg.attributes.push(NexthopAttribute::Id(nh.id));
    match &nh.kind {
        NexthopKind::Gateway { gateway, oif } => {
            msg.family = AF_INET;
            msg.attributes.push(NexthopAttribute::Oif(*oif));
            msg.attributes.push(NexthopAttribute::Gateway(*gateway));
        }
        NexthopKind::Group { members, group } => {
            // The kernel wants AF_UNSPEC for groups.
            msg.family = AF_UNSPEC;
            msg.attributes.push(NexthopAttribute::Group(
                members
                    .iter()
                    .map(|&id| GroupEntry { id, weight: 1 })
                    .collect(),
            ));
            match group {
                GroupType::HashThreshold => {
                    msg.attributes
                        .push(NexthopAttribute::GroupType(NEXTHOP_GRP_TYPE_MPATH));
                }
                GroupType::Resilient {
                    buckets,
                    idle_timer,
                    unbalanced_timer,
                } => {
                    msg.attributes
                        .push(NexthopAttribute::GroupType(NEXTHOP_GRP_TYPE_RES));
                    msg.attributes.push(NexthopAttribute::ResGroup(ResGroup {
                        buckets: Some(*buckets),
                        idle_timer: Some(*idle_timer),
                        unbalanced_timer: Some(*unbalanced_timer),
                    }));
                }
            }
        }
        NexthopKind::Other(_) => return None,
    }
    Some(msg)
}

fn route_from_message(msg: &RouteMessage) -> Option<Route> {
    if msg.header.address_family != AddressFamily::Inet
        || msg.header.tos != 0
        || msg.header.source_prefix_length != 0
    {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let mut dst_addr = Ipv4Addr::UNSPECIFIED;
    let mut metric = 0;
    let mut nh_id = None;
    let mut oif = 0;
    let mut prefsrc = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst_addr = *a,
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::NhId(id) => nh_id = Some(*id),
            RouteAttribute::Oif(i) => oif = *i,
            RouteAttribute::PrefSource(RouteAddress::Inet(a)) => prefsrc = Some(*a),
            _ => {}
        }
    }
    let dst = Ipv4Net::new(dst_addr, msg.header.destination_prefix_length).ok()?;
    let target = match (msg.header.kind, nh_id) {
        (RouteType::Unicast, Some(id)) => RouteTarget::Nexthop(id),
        (RouteType::BlackHole, _) => RouteTarget::Blackhole,
        (RouteType::Unreachable, _) => RouteTarget::Unreachable,
        (RouteType::Local, None) => RouteTarget::Local { oif, prefsrc },
        (kind, _) => RouteTarget::Other(format!("{kind:?}")),
    };
    Some(Route {
        table,
        dst,
        metric,
        protocol: u8::from(msg.header.protocol),
        target,
    })
}

fn route_type(target: &RouteTarget) -> Option<RouteType> {
    match target {
        RouteTarget::Nexthop(_) => Some(RouteType::Unicast),
        RouteTarget::Blackhole => Some(RouteType::BlackHole),
        RouteTarget::Unreachable => Some(RouteType::Unreachable),
        RouteTarget::Local { .. } => Some(RouteType::Local),
        RouteTarget::Other(_) => None,
    }
}

/// Table, destination, metric and protocol: enough to name one route.
fn route_key_message(route: &Route) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = route.dst.prefix_len();
    // Tables above 255 only fit in RTA_TABLE; the header then says RT_TABLE_UNSPEC.
    msg.header.table = u8::try_from(route.table).unwrap_or(0);
    msg.header.protocol = RouteProtocol::from(route.protocol);
    // The kernel matches a deletion on scope too: a local route is scope host.
    msg.header.scope = match route.target {
        RouteTarget::Local { .. } => RouteScope::Host,
        _ => RouteScope::Universe,
    };
    msg.attributes.push(RouteAttribute::Table(route.table));
    if route.dst.prefix_len() > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                route.dst.network(),
            )));
    }
    msg.attributes.push(RouteAttribute::Priority(route.metric));
    msg
}

fn route_to_message(route: &Route) -> Option<RouteMessage> {
    let mut msg = route_key_message(route);
    msg.header.kind = route_type(&route.target)?;
    match route.target {
        RouteTarget::Nexthop(id) => msg.attributes.push(RouteAttribute::NhId(id)),
        RouteTarget::Local { oif, prefsrc } => {
            msg.attributes.push(RouteAttribute::Oif(oif));
            if let Some(a) = prefsrc {
                msg.attributes
                    .push(RouteAttribute::PrefSource(RouteAddress::Inet(a)));
            }
        }
        _ => {}
    }
    Some(msg)
}

fn rule_from_message(msg: &RuleMessage) -> Option<Rule> {
    if msg.header.family != AddressFamily::Inet {
        return None;
    }
    let mut rule = Rule {
        priority: 0,
        protocol: 0,
        action: RuleTarget::Other(u8::from(msg.header.action)),
        dst: None,
        src: None,
        iif: None,
        fwmark: None,
    };
    let mut table = u32::from(msg.header.table);
    let mut mark = None;
    let mut mask = None;
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Protocol(p) => rule.protocol = u8::from(*p),
            RuleAttribute::Destination(IpAddr::V4(a)) => {
                rule.dst = Ipv4Net::new(*a, msg.header.dst_len).ok()
            }
            RuleAttribute::Source(IpAddr::V4(a)) => {
                rule.src = Ipv4Net::new(*a, msg.header.src_len).ok()
            }
            RuleAttribute::Iifname(name) => rule.iif = Some(name.clone()),
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            _ => {}
        }
    }
    if msg.header.action == RuleAction::ToTable {
        rule.action = RuleTarget::Lookup(table);
    }
    if mark.is_some() || mask.is_some() {
        rule.fwmark = Some((mark.unwrap_or(0), mask.unwrap_or(u32::MAX)));
    }
    Some(rule)
}

fn rule_to_message(rule: &Rule) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = AddressFamily::Inet;
    match rule.action {
        RuleTarget::Lookup(table) => {
            msg.header.action = RuleAction::ToTable;
            msg.header.table = u8::try_from(table).unwrap_or(0);
            msg.attributes.push(RuleAttribute::Table(table));
        }
        RuleTarget::Other(a) => msg.header.action = RuleAction::from(a),
    }
    msg.attributes.push(RuleAttribute::Priority(rule.priority));
    msg.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(rule.protocol)));
    if let Some(dst) = rule.dst {
        msg.header.dst_len = dst.prefix_len();
        msg.attributes
            .push(RuleAttribute::Destination(IpAddr::V4(dst.network())));
    }
    if let Some(src) = rule.src {
        msg.header.src_len = src.prefix_len();
        msg.attributes
            .push(RuleAttribute::Source(IpAddr::V4(src.network())));
    }
    if let Some(iif) = &rule.iif {
        msg.attributes.push(RuleAttribute::Iifname(iif.clone()));
    }
    if let Some((mark, mask)) = rule.fwmark {
        msg.attributes.push(RuleAttribute::FwMark(mark));
        msg.attributes.push(RuleAttribute::FwMask(mask));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_round_trips_through_messages() {
        let rule = Rule {
            priority: 10887,
            protocol: 245,
            action: RuleTarget::Lookup(RT_TABLE_MAIN),
            dst: Some("10.0.0.0/8".parse().unwrap()),
            src: None,
            iif: None,
            fwmark: None,
        };
        assert_eq!(rule_from_message(&rule_to_message(&rule)), Some(rule));
        let marked = Rule {
            priority: 1000,
            protocol: 245,
            action: RuleTarget::Lookup(50),
            dst: None,
            src: None,
            iif: Some("lo".into()),
            fwmark: Some((0x1900, u32::MAX)),
        };
        assert_eq!(rule_from_message(&rule_to_message(&marked)), Some(marked));
    }

    #[test]
    fn route_round_trips_through_messages() {
        for target in [
            RouteTarget::Nexthop(2056),
            RouteTarget::Blackhole,
            RouteTarget::Unreachable,
        ] {
            let route = Route {
                table: 1180,
                dst: "0.0.0.0/0".parse().unwrap(),
                metric: u32::MAX,
                protocol: 245,
                target,
            };
            let msg = route_to_message(&route).unwrap();
            assert_eq!(msg.header.table, 0, "table > 255 goes in RTA_TABLE only");
            assert_eq!(route_from_message(&msg), Some(route));
        }
    }

    #[test]
    fn nexthop_round_trips_through_messages() {
        let group = Nexthop {
            id: 2056,
            protocol: 245,
            kind: NexthopKind::Group {
                members: vec![1800, 1801],
                group: GroupType::Resilient {
                    buckets: 64,
                    idle_timer: 100,
                    unbalanced_timer: 0,
                },
            },
        };
        let msg = nexthop_to_message(&group).unwrap();
        assert_eq!(msg.family, AF_UNSPEC);
        assert_eq!(nexthop_from_message(&msg), Some(group));
        let gw = Nexthop {
            id: 1800,
            protocol: 245,
            kind: NexthopKind::Gateway {
                gateway: Ipv4Addr::new(192, 168, 25, 128),
                oif: 3,
            },
        };
        assert_eq!(
            nexthop_from_message(&nexthop_to_message(&gw).unwrap()),
            Some(gw)
        );
    }

    #[test]
    fn resilient_groups_replace_only_with_same_buckets() {
        let r = |buckets| GroupType::Resilient {
            buckets,
            idle_timer: 1,
            unbalanced_timer: 0,
        };
        assert!(r(64).replaceable_by(&r(64)));
        assert!(!r(64).replaceable_by(&r(128)));
        assert!(!GroupType::HashThreshold.replaceable_by(&r(64)));
        assert!(GroupType::HashThreshold.replaceable_by(&GroupType::HashThreshold));
    }
}
