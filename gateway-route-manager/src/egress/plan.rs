//! The egress planner: healthy set + settings → the kernel objects we want. Pure.
//!
//! Owns: which nexthops, routes and rules exist and their numbers (ids, metrics, priorities),
//! and which kernel objects count as ours ([`Ownership`]). It must not do I/O.
//!
//! What it builds (defaults in brackets):
//! - one nexthop object per configured gateway, id `nexthop_id_base + i` [1800+i], via the
//!   gateway on `interface`; and, when at least one gateway is healthy, one group
//!   `nexthop_id_base + 256` [2056] over the healthy ones (hash-threshold or resilient);
//! - in `table` [180], for every destination: the active route `metric 0 nhid <group>` while a
//!   gateway is healthy, and ALWAYS a kill-switch route of type blackhole/unreachable at
//!   `metric 4294967295`. Losing every gateway just deletes the active route: the kill switch
//!   is already there, so nothing ever falls through to the main table's default route — even
//!   if the kernel flushes our nexthops itself (interface down);
//! - policy rules at `rule_priority - 1` [10887]: `to <excluded> lookup main` for `exclude`
//!   (plus the reserved ranges if `exclude_reserved`) when they overlap a destination, and
//!   `iif lo lookup main` so the router's *own* traffic (API, DNS, DDNS) keeps using the pod's
//!   routes unless `include_local_traffic`; at `rule_priority` [10888]:
//!   `to <destination> lookup <table>`. Client traffic is selected by destination only (as the
//!   design says), which covers traffic forwarded from any interface;
//! - in [`EgressMode::Consistent`] no group and no active route: client packets are steered
//!   per packet by nftables marks into return routing's per-gateway tables (which also serve
//!   the data-plane probe); what nft leaves unmarked meets the kill switch here.
//!
//! Every route, rule and nexthop carries protocol [`RTPROT_VPN_ROUTER`] (245).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::health::HealthyGateways;
use crate::netlink::{
    GroupType, Nexthop, NexthopKind, Route, RouteTarget, Rule, RuleTarget, RT_TABLE_MAIN,
};

/// `protocol` of every route, rule and nexthop this daemon writes (unused in iproute2's
/// rt_protos; `ip route` shows it as `proto 245`).
pub const RTPROT_VPN_ROUTER: u8 = 245;
/// Metric of the active (gateway) route for a destination.
pub const ACTIVE_METRIC: u32 = 0;
/// Metric of the kill-switch route: the last resort, always present.
pub const KILL_SWITCH_METRIC: u32 = u32::MAX;
/// Gateways per router this planner supports (nexthop ids `base..base+256`).
pub const MAX_GATEWAYS: usize = 256;

/// How traffic is spread over the healthy gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EgressMode {
    /// Hash-threshold group (`type mpath`): plain ECMP.
    Ecmp,
    /// Resilient group: hash → bucket → gateway; removing a gateway moves only its buckets.
    EcmpResilient(ResilientSettings),
    /// Stateless hash → bucket → gateway marking in nftables (`crate::consistent`, installed
    /// by `crate::return_routing`); egress keeps only the kill switch and the rules.
    Consistent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResilientSettings {
    pub buckets: u16,
    /// A bucket idle this long may move to a gateway that has too few.
    pub idle_timer: Duration,
    /// Zero: never force-move busy buckets.
    pub unbalanced_timer: Duration,
}

impl Default for ResilientSettings {
    fn default() -> Self {
        ResilientSettings {
            buckets: 128,
            idle_timer: Duration::from_secs(120),
            unbalanced_timer: Duration::ZERO,
        }
    }
}

/// The kill switch's route type (`egress.when_none_healthy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoneHealthy {
    /// Drop silently.
    Blackhole,
    /// Drop and answer ICMP host unreachable (clients fail fast).
    Unreachable,
}

/// Egress settings (mapped from `gateways` and `gateways.egress` by the router).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSettings {
    /// `gateways.interface`.
    pub interface: String,
    /// Gateway i is `gateways[i]` (`gateways.addresses`).
    pub gateways: Vec<Ipv4Addr>,
    pub mode: EgressMode,
    pub table: u32,
    pub rule_priority: u32,
    pub destinations: Vec<Ipv4Net>,
    pub exclude: Vec<Ipv4Net>,
    pub exclude_reserved: bool,
    pub when_none_healthy: NoneHealthy,
    /// Also send traffic the router itself originates through the VPN (default false).
    pub include_local_traffic: bool,
    pub nexthop_id_base: u32,
    /// `gateways.egress.hash_seed` (for the sysctl).
    pub hash_seed: Option<u32>,
    /// Periodic resync (repairs hand edits).
    pub resync_interval: Duration,
}

impl Default for EgressSettings {
    fn default() -> Self {
        EgressSettings {
            interface: "vpn-gw-veth0".to_owned(),
            gateways: Vec::new(),
            mode: EgressMode::Ecmp,
            table: 180,
            rule_priority: 10888,
            destinations: vec![Ipv4Net::default()],
            exclude: Vec::new(),
            exclude_reserved: true,
            when_none_healthy: NoneHealthy::Blackhole,
            include_local_traffic: false,
            nexthop_id_base: 1800,
            hash_seed: None,
            resync_interval: Duration::from_secs(10),
        }
    }
}

/// Settings the planner refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressSettingsError {
    #[error("gateways.egress.table {0} is reserved (0, 253 default, 254 main, 255 local)")]
    ReservedTable(u32),
    #[error("gateways.egress.rule_priority must be at least 1 (exclusions use rule_priority - 1)")]
    ZeroPriority,
    #[error("{0} gateways configured; at most {MAX_GATEWAYS} are supported")]
    TooManyGateways(usize),
    #[error("gateways.egress.destinations is empty: nothing would be routed through the gateways")]
    NoDestinations,
    #[error("nexthop id range {start}..={end} does not fit in u32")]
    NexthopIds { start: u32, end: u64 },
}

impl EgressSettings {
    pub fn validate(&self) -> Result<(), EgressSettingsError> {
        if matches!(self.table, 0 | 253..=255) {
            return Err(EgressSettingsError::ReservedTable(self.table));
        }
        if self.rule_priority == 0 {
            return Err(EgressSettingsError::ZeroPriority);
        }
        if self.gateways.len() > MAX_GATEWAYS {
            return Err(EgressSettingsError::TooManyGateways(self.gateways.len()));
        }
        if self.destinations.is_empty() {
            return Err(EgressSettingsError::NoDestinations);
        }
        let end = u64::from(self.nexthop_id_base) + MAX_GATEWAYS as u64;
        if end > u64::from(u32::MAX) || self.nexthop_id_base == 0 {
            return Err(EgressSettingsError::NexthopIds {
                start: self.nexthop_id_base,
                end,
            });
        }
        Ok(())
    }

    pub fn gateway_nexthop_id(&self, index: usize) -> u32 {
        self.nexthop_id_base + index_u32(index)
    }

    pub fn group_nexthop_id(&self) -> u32 {
        self.nexthop_id_base + index_u32(MAX_GATEWAYS)
    }
}

fn index_u32(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
}

/// Private and reserved IPv4 ranges kept off the VPN when `exclude_reserved` is set
/// (RFC 6890 special-purpose registry, minus the globally reachable ones).
pub fn reserved_ranges() -> Vec<Ipv4Net> {
    [
        "0.0.0.0/8",       // "this network" (RFC 791)
        "10.0.0.0/8",      // private (RFC 1918)
        "100.64.0.0/10",   // shared address space / CGNAT (RFC 6598)
        "127.0.0.0/8",     // loopback
        "169.254.0.0/16",  // link local (RFC 3927)
        "172.16.0.0/12",   // private (RFC 1918)
        "192.0.0.0/24",    // IETF protocol assignments (RFC 6890)
        "192.0.2.0/24",    // TEST-NET-1 (RFC 5737)
        "192.168.0.0/16",  // private (RFC 1918)
        "198.18.0.0/15",   // benchmarking (RFC 2544)
        "198.51.100.0/24", // TEST-NET-2 (RFC 5737)
        "203.0.113.0/24",  // TEST-NET-3 (RFC 5737)
        "224.0.0.0/4",     // multicast
        "240.0.0.0/4",     // reserved (and 255.255.255.255 broadcast)
    ]
    .iter()
    .filter_map(|s| s.parse().ok())
    .collect()
}

/// What the planner wants in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPlan {
    pub nexthops: Vec<Nexthop>,
    pub routes: Vec<Route>,
    pub rules: Vec<Rule>,
}

/// Which kernel objects are ours to change or delete. Anything else is never touched, except
/// that a desired route/nexthop replaces whatever sits at its exact key (table/dst/metric, id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    pub tables: BTreeSet<u32>,
    pub rule_priorities: BTreeSet<u32>,
    pub nexthop_ids: RangeInclusive<u32>,
}

impl Ownership {
    pub fn owns_nexthop(&self, nh: &Nexthop) -> bool {
        nh.protocol == RTPROT_VPN_ROUTER && self.nexthop_ids.contains(&nh.id)
    }
    pub fn owns_route(&self, route: &Route) -> bool {
        route.protocol == RTPROT_VPN_ROUTER && self.tables.contains(&route.table)
    }
    pub fn owns_rule(&self, rule: &Rule) -> bool {
        rule.protocol == RTPROT_VPN_ROUTER && self.rule_priorities.contains(&rule.priority)
    }

    /// This ownership plus the tables and rule priorities of `previous` (the settings before a
    /// reload): the first reconcile after a change of `table` or `rule_priority` deletes what the
    /// old settings left, after the new kill switch and rules are in (diff's order). Nexthop ids
    /// are not configurable, so they stay this ownership's.
    pub fn with_retired(&self, previous: &Ownership) -> Ownership {
        Ownership {
            tables: self.tables.union(&previous.tables).copied().collect(),
            rule_priorities: self
                .rule_priorities
                .union(&previous.rule_priorities)
                .copied()
                .collect(),
            nexthop_ids: self.nexthop_ids.clone(),
        }
    }
}

pub fn ownership(settings: &EgressSettings) -> Ownership {
    let tables = BTreeSet::from([settings.table]);
    let rule_priorities = BTreeSet::from([settings.rule_priority - 1, settings.rule_priority]);
    Ownership {
        tables,
        rule_priorities,
        nexthop_ids: settings.nexthop_id_base..=settings.group_nexthop_id(),
    }
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(b) || b.contains(a)
}

fn clock_t(d: Duration) -> u32 {
    // Resilient group timers are in clock_t, USER_HZ = 100.
    u32::try_from(d.as_millis() / 10).unwrap_or(u32::MAX)
}

fn kill_target(settings: &EgressSettings) -> RouteTarget {
    match settings.when_none_healthy {
        NoneHealthy::Blackhole => RouteTarget::Blackhole,
        NoneHealthy::Unreachable => RouteTarget::Unreachable,
    }
}

fn route(table: u32, dst: Ipv4Net, metric: u32, target: RouteTarget) -> Route {
    Route {
        table,
        dst,
        metric,
        protocol: RTPROT_VPN_ROUTER,
        target,
    }
}

fn lookup_rule(priority: u32, table: u32) -> Rule {
    Rule {
        priority,
        protocol: RTPROT_VPN_ROUTER,
        action: RuleTarget::Lookup(table),
        dst: None,
        src: None,
        iif: None,
        fwmark: None,
    }
}

/// The full plan. `oif` is the index of `settings.interface`; `None` (interface missing) plans
/// no nexthops and no active routes: only the kill switch and the rules.
pub fn plan(settings: &EgressSettings, healthy: &HealthyGateways, oif: Option<u32>) -> EgressPlan {
    let mut out = EgressPlan::default();

    if let Some(oif) = oif {
        for (i, &gateway) in settings.gateways.iter().enumerate() {
            out.nexthops.push(Nexthop {
                id: settings.gateway_nexthop_id(i),
                protocol: RTPROT_VPN_ROUTER,
                kind: NexthopKind::Gateway { gateway, oif },
            });
        }
    }
    let members: Vec<u32> = if oif.is_some() && settings.mode != EgressMode::Consistent {
        healthy
            .indexes()
            .filter(|&i| i < settings.gateways.len())
            .map(|i| settings.gateway_nexthop_id(i))
            .collect()
    } else {
        Vec::new()
    };
    if !members.is_empty() {
        let group = match settings.mode {
            EgressMode::Ecmp => GroupType::HashThreshold,
            EgressMode::EcmpResilient(r) => GroupType::Resilient {
                buckets: r.buckets,
                idle_timer: clock_t(r.idle_timer),
                unbalanced_timer: clock_t(r.unbalanced_timer),
            },
            // Unreachable: `members` is empty in consistent mode.
            EgressMode::Consistent => GroupType::HashThreshold,
        };
        out.nexthops.push(Nexthop {
            id: settings.group_nexthop_id(),
            protocol: RTPROT_VPN_ROUTER,
            kind: NexthopKind::Group {
                members: members.clone(),
                group,
            },
        });
    }

    let mut destinations = settings.destinations.clone();
    destinations.sort();
    destinations.dedup();
    for &dst in &destinations {
        out.routes.push(route(
            settings.table,
            dst,
            KILL_SWITCH_METRIC,
            kill_target(settings),
        ));
        if !members.is_empty() {
            out.routes.push(route(
                settings.table,
                dst,
                ACTIVE_METRIC,
                RouteTarget::Nexthop(settings.group_nexthop_id()),
            ));
        }
    }

    let mut excluded: Vec<Ipv4Net> = settings.exclude.clone();
    if settings.exclude_reserved {
        excluded.extend(reserved_ranges());
    }
    excluded.retain(|e| destinations.iter().any(|d| overlaps(d, e)));
    excluded.sort();
    excluded.dedup();
    let exclusion_priority = settings.rule_priority - 1;
    for net in excluded {
        out.rules.push(Rule {
            dst: Some(net),
            ..lookup_rule(exclusion_priority, RT_TABLE_MAIN)
        });
    }
    if !settings.include_local_traffic {
        out.rules.push(Rule {
            iif: Some("lo".to_owned()),
            ..lookup_rule(exclusion_priority, RT_TABLE_MAIN)
        });
    }
    for &dst in &destinations {
        let dst = (dst.prefix_len() > 0).then_some(dst);
        out.rules.push(Rule {
            dst,
            ..lookup_rule(settings.rule_priority, settings.table)
        });
    }

    out.rules.sort();
    out
}

/// The part of the plan that must exist before the first healthy set is known (at start-up):
/// the kill-switch routes and the rules. Adding these never disturbs adopted state.
pub fn bootstrap_plan(settings: &EgressSettings) -> EgressPlan {
    let mut full = plan(settings, &HealthyGateways::default(), None);
    full.routes.retain(|r| r.metric == KILL_SWITCH_METRIC);
    full
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthyGateway;

    fn gw(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 25, 128 + i)
    }

    fn settings() -> EgressSettings {
        EgressSettings {
            interface: "vpn-gw-veth0".into(),
            gateways: (0..4).map(gw).collect(),
            exclude: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        }
    }

    fn healthy(indexes: &[usize]) -> HealthyGateways {
        HealthyGateways {
            complete: true,
            gateways: indexes
                .iter()
                .map(|&i| {
                    (
                        i,
                        HealthyGateway {
                            address: gw(u8::try_from(i).unwrap()),
                            public_ip: None,
                        },
                    )
                })
                .collect(),
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn healthy_gateways_form_the_group_and_the_active_route() {
        let s = settings();
        let p = plan(&s, &healthy(&[0, 2, 3]), Some(7));
        let gateways: Vec<_> = p
            .nexthops
            .iter()
            .filter(|n| matches!(n.kind, NexthopKind::Gateway { .. }))
            .collect();
        assert_eq!(
            gateways.len(),
            4,
            "one nexthop per configured gateway, healthy or not"
        );
        assert_eq!(gateways[1].id, 1801);
        assert_eq!(
            gateways[1].kind,
            NexthopKind::Gateway {
                gateway: gw(1),
                oif: 7
            }
        );
        let group = p.nexthops.iter().find(|n| n.id == 2056).unwrap();
        assert_eq!(
            group.kind,
            NexthopKind::Group {
                members: vec![1800, 1802, 1803],
                group: GroupType::HashThreshold
            }
        );
        assert_eq!(
            p.routes,
            vec![
                route(
                    180,
                    net("0.0.0.0/0"),
                    KILL_SWITCH_METRIC,
                    RouteTarget::Blackhole
                ),
                route(180, net("0.0.0.0/0"), 0, RouteTarget::Nexthop(2056)),
            ]
        );
        assert!(p
            .nexthops
            .iter()
            .chain(p.nexthops.iter())
            .all(|n| n.protocol == 245));
    }

    #[test]
    fn none_healthy_leaves_only_the_kill_switch() {
        let s = settings();
        let p = plan(&s, &healthy(&[]), Some(7));
        assert!(
            p.nexthops.iter().all(|n| n.id != s.group_nexthop_id()),
            "no empty group"
        );
        assert_eq!(
            p.routes,
            vec![route(
                180,
                net("0.0.0.0/0"),
                u32::MAX,
                RouteTarget::Blackhole
            )]
        );
        let unreachable = EgressSettings {
            when_none_healthy: NoneHealthy::Unreachable,
            ..s
        };
        let p = plan(&unreachable, &healthy(&[]), Some(7));
        assert_eq!(p.routes[0].target, RouteTarget::Unreachable);
        // The rules still send the destinations to the egress table.
        assert!(p
            .rules
            .iter()
            .any(|r| r.priority == 10888 && r.action == RuleTarget::Lookup(180)));
    }

    #[test]
    fn missing_interface_plans_the_kill_switch_only() {
        let p = plan(&settings(), &healthy(&[0, 1]), None);
        assert!(p.nexthops.is_empty());
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.routes[0].metric, KILL_SWITCH_METRIC);
    }

    #[test]
    fn exclusions_go_to_main_before_the_egress_rule() {
        let p = plan(&settings(), &healthy(&[0]), Some(7));
        let excl: Vec<_> = p.rules.iter().filter(|r| r.priority == 10887).collect();
        assert!(excl.iter().all(|r| r.action == RuleTarget::Lookup(254)));
        let dsts: Vec<_> = excl.iter().filter_map(|r| r.dst).collect();
        for must in [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "192.0.0.0/24",
            "192.0.2.0/24",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "198.18.0.0/15",
            "224.0.0.0/4",
            "240.0.0.0/4",
        ] {
            assert!(dsts.contains(&net(must)), "{must} missing from {dsts:?}");
        }
        assert!(excl
            .iter()
            .any(|r| r.iif.as_deref() == Some("lo") && r.dst.is_none()));
        let egress: Vec<_> = p.rules.iter().filter(|r| r.priority == 10888).collect();
        assert_eq!(egress.len(), 1);
        assert_eq!(egress[0].dst, None, "0.0.0.0/0 is 'to all'");
        assert_eq!(egress[0].action, RuleTarget::Lookup(180));
        // Sorted by priority: exclusions are evaluated first.
        assert!(p.rules.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn exclude_reserved_false_keeps_test_nets_on_the_vpn() {
        let s = EgressSettings {
            exclude_reserved: false,
            include_local_traffic: true,
            destinations: vec![net("198.51.100.0/24"), net("203.0.113.0/24")],
            exclude: vec![net("10.0.0.0/8"), net("203.0.113.128/25")],
            ..settings()
        };
        let p = plan(&s, &healthy(&[1]), Some(3));
        let excl: Vec<_> = p.rules.iter().filter(|r| r.priority == 10887).collect();
        assert_eq!(
            excl.len(),
            1,
            "10/8 does not overlap any destination; no iif lo rule: {excl:?}"
        );
        assert_eq!(excl[0].dst, Some(net("203.0.113.128/25")));
        let egress: Vec<_> = p
            .rules
            .iter()
            .filter(|r| r.priority == 10888)
            .filter_map(|r| r.dst)
            .collect();
        assert_eq!(egress, vec![net("198.51.100.0/24"), net("203.0.113.0/24")]);
        assert_eq!(
            p.routes.len(),
            4,
            "kill switch + active route per destination"
        );
    }

    #[test]
    fn resilient_mode_builds_a_resilient_group() {
        let s = EgressSettings {
            mode: EgressMode::EcmpResilient(ResilientSettings {
                buckets: 64,
                idle_timer: Duration::from_secs(30),
                unbalanced_timer: Duration::from_secs(0),
            }),
            ..settings()
        };
        let p = plan(&s, &healthy(&[3, 1]), Some(7));
        let group = p.nexthops.iter().find(|n| n.id == 2056).unwrap();
        assert_eq!(
            group.kind,
            NexthopKind::Group {
                members: vec![1801, 1803],
                group: GroupType::Resilient {
                    buckets: 64,
                    idle_timer: 3000,
                    unbalanced_timer: 0
                }
            }
        );
    }

    #[test]
    fn consistent_mode_keeps_only_the_kill_switch_and_rules() {
        let s = EgressSettings {
            mode: EgressMode::Consistent,
            ..settings()
        };
        let p = plan(&s, &healthy(&[0, 1, 2, 3]), Some(7));
        assert!(p.nexthops.iter().all(|n| n.id != s.group_nexthop_id()));
        assert_eq!(
            p.routes,
            vec![route(
                180,
                net("0.0.0.0/0"),
                KILL_SWITCH_METRIC,
                RouteTarget::Blackhole
            )]
        );
        assert!(p
            .rules
            .iter()
            .any(|r| r.priority == 10888 && r.action == RuleTarget::Lookup(180)));
        let own = ownership(&s);
        assert_eq!(own.tables, BTreeSet::from([180]));
        assert_eq!(own.nexthop_ids, 1800..=2056);
    }

    #[test]
    fn same_inputs_same_plan() {
        // Every router must build the same objects from the same inputs.
        let a = plan(&settings(), &healthy(&[2, 0]), Some(7));
        let b = plan(&settings(), &healthy(&[0, 2]), Some(7));
        assert_eq!(a, b);
    }

    #[test]
    fn bootstrap_has_kill_switch_and_rules_only() {
        let b = bootstrap_plan(&settings());
        assert!(b.nexthops.is_empty());
        assert!(b.routes.iter().all(|r| r.metric == KILL_SWITCH_METRIC));
        assert!(!b.rules.is_empty());
    }

    #[test]
    fn validation() {
        assert_eq!(
            EgressSettings {
                table: 254,
                ..settings()
            }
            .validate(),
            Err(EgressSettingsError::ReservedTable(254))
        );
        assert_eq!(
            EgressSettings {
                rule_priority: 0,
                ..settings()
            }
            .validate(),
            Err(EgressSettingsError::ZeroPriority)
        );
        assert_eq!(
            EgressSettings {
                destinations: vec![],
                ..settings()
            }
            .validate(),
            Err(EgressSettingsError::NoDestinations)
        );
        assert_eq!(settings().validate(), Ok(()));
    }
}
