//! Return routing's desired state: settings + healthy set → per-gateway routing tables, policy
//! rules and the nftables model. Pure.
//!
//! Owns: the numbers (marks, tables, rule priorities, nexthop ids), which kernel objects count
//! as ours ([`ownership`]), and the bucket map contents in consistent mode. It must not do I/O.
//!
//! For every *configured* gateway i (healthy or not — its existing connections still need their
//! way back, and the data-plane probe of an unhealthy gateway must still go through it):
//! - nexthop `nexthop_id_base + i` [2400+i]: gateway i on `interface`;
//! - table `table_base + i` [50+i]: `default nhid <that nexthop>` at metric 0, and an
//!   `unreachable default` at metric 4294967295 so a marked packet never falls through to
//!   another gateway's route (the egress rules come later) when the nexthop is gone;
//! - rule `fwmark mark_base+i lookup table_base+i` at `rule_priority_base + i` [1000+i].

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::consistent::BucketTable;
use crate::egress::{EgressPlan, Ownership, KILL_SWITCH_METRIC, MAX_GATEWAYS, RTPROT_VPN_ROUTER};
use crate::health::HealthyGateways;
use crate::netlink::{Nexthop, NexthopKind, Route, RouteTarget, Rule, RuleTarget};

/// Settings of return routing (mapped from `gateways` and `gateways.return_routing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnRoutingSettings {
    /// `gateways.interface`: the per-gateway routes leave here.
    pub interface: String,
    /// Gateway i is `gateways[i]`.
    pub gateways: Vec<Ipv4Addr>,
    /// Gateway i's ingress VIP (`ingress_vip_start + i`); same length as `gateways`, or empty
    /// for no ingress marking.
    pub ingress_vips: Vec<Ipv4Addr>,
    pub mark_base: u32,
    pub table_base: u32,
    pub rule_priority_base: u32,
    /// Ids of the per-gateway nexthop objects (kept apart from egress's 1800..=2056).
    pub nexthop_id_base: u32,
    /// Tables another component owns inside `table_base..table_base+256` (the egress table):
    /// never touched.
    pub foreign_tables: Vec<u32>,
    /// The nftables table (family `ip`) this component owns.
    pub nft_table: String,
    /// `Some` in `egress.mode: consistent`.
    pub consistent: Option<ConsistentSettings>,
    /// `gateways.clamp_mss`: the largest TCP MSS a SYN through the gateways may carry
    /// (`gateways.tunnel_mtu - 40`); `None` leaves MSS alone.
    pub mss_clamp: Option<u16>,
    /// Periodic resync (repairs hand edits).
    pub resync_interval: Duration,
}

impl Default for ReturnRoutingSettings {
    fn default() -> Self {
        ReturnRoutingSettings {
            interface: "vpn-gw-veth0".to_owned(),
            gateways: Vec::new(),
            ingress_vips: Vec::new(),
            mark_base: 0x1900,
            table_base: 50,
            rule_priority_base: 1000,
            nexthop_id_base: 2400,
            foreign_tables: vec![180],
            nft_table: "vpn_router_return".to_owned(),
            consistent: None,
            mss_clamp: None,
            resync_interval: Duration::from_secs(10),
        }
    }
}

/// Stateless, flow-stable egress (`egress.mode: consistent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistentSettings {
    /// `egress.destinations`.
    pub destinations: Vec<Ipv4Net>,
    /// `egress.exclude`, plus the reserved ranges when `exclude_reserved`.
    pub exclude: Vec<Ipv4Net>,
    /// `egress.hash_seed`: identical on every router.
    pub hash_seed: u32,
    /// Bucket count ([`crate::consistent::table_size`] of the configured gateways).
    pub buckets: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReturnRoutingSettingsError {
    #[error("{0} gateways configured; at most {MAX_GATEWAYS} are supported")]
    TooManyGateways(usize),
    #[error("gateways.return_routing: {what} {base:#x} + {MAX_GATEWAYS} does not fit in 32 bits; expected a lower base")]
    Overflow { what: &'static str, base: u32 },
    #[error("gateways.return_routing.table_base: table {table} (gateway {index}) is reserved or owned by egress; expected a base that keeps clear of it")]
    TableCollision { table: u32, index: usize },
    #[error("return routing: {vips} ingress VIPs for {gateways} gateways; expected one per gateway or none")]
    VipCount { vips: usize, gateways: usize },
    #[error("gateways.return_routing.mark_base must not be 0 (mark 0 means unmarked)")]
    ZeroMark,
    #[error("egress consistent: {0} buckets; expected 1..=65536")]
    Buckets(u32),
    #[error("egress consistent: destinations is empty")]
    NoDestinations,
}

const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

impl ReturnRoutingSettings {
    pub fn validate(&self) -> Result<(), ReturnRoutingSettingsError> {
        use ReturnRoutingSettingsError as E;
        if self.gateways.len() > MAX_GATEWAYS {
            return Err(E::TooManyGateways(self.gateways.len()));
        }
        if self.mark_base == 0 {
            return Err(E::ZeroMark);
        }
        let span = u32::try_from(MAX_GATEWAYS).unwrap_or(u32::MAX);
        for (what, base) in [
            ("mark_base", self.mark_base),
            ("table_base", self.table_base),
            ("rule_priority_base", self.rule_priority_base),
            ("nexthop id base", self.nexthop_id_base),
        ] {
            if base.checked_add(span).is_none() {
                return Err(E::Overflow { what, base });
            }
        }
        for i in 0..self.gateways.len() {
            let table = self.table(i);
            if RESERVED_TABLES.contains(&table) || self.foreign_tables.contains(&table) {
                return Err(E::TableCollision { table, index: i });
            }
        }
        if !self.ingress_vips.is_empty() && self.ingress_vips.len() != self.gateways.len() {
            return Err(E::VipCount {
                vips: self.ingress_vips.len(),
                gateways: self.gateways.len(),
            });
        }
        if let Some(c) = &self.consistent {
            if c.buckets == 0 || c.buckets > 65536 {
                return Err(E::Buckets(c.buckets));
            }
            if c.destinations.is_empty() {
                return Err(E::NoDestinations);
            }
            if self.scratch_base().checked_add(c.buckets).is_none() {
                return Err(E::Overflow {
                    what: "mark_base (bucket scratch marks)",
                    base: self.mark_base,
                });
            }
        }
        Ok(())
    }

    pub fn mark(&self, index: usize) -> u32 {
        self.mark_base.wrapping_add(index_u32(index))
    }
    pub fn table(&self, index: usize) -> u32 {
        self.table_base.wrapping_add(index_u32(index))
    }
    pub fn rule_priority(&self, index: usize) -> u32 {
        self.rule_priority_base.wrapping_add(index_u32(index))
    }
    pub fn nexthop_id(&self, index: usize) -> u32 {
        self.nexthop_id_base.wrapping_add(index_u32(index))
    }
    /// The marks `mark_base..=mark_base+255` that mean "gateway i" (restored from ct mark).
    pub fn mark_range(&self) -> (u32, u32) {
        (self.mark_base, self.mark(MAX_GATEWAYS - 1))
    }
    /// Consistent mode first writes `scratch_base + bucket` into the packet mark, then maps
    /// it to the gateway's mark (nft 1.0.6's JSON cannot declare a map keyed by `jhash`
    /// directly). Right after the gateway marks, so the two ranges never overlap.
    pub fn scratch_base(&self) -> u32 {
        self.mark(MAX_GATEWAYS)
    }
}

fn index_u32(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
}

/// Everything of the per-gateway range is ours (so a gateway that leaves the config is
/// cleaned up), except tables another component owns.
pub fn ownership(s: &ReturnRoutingSettings) -> Ownership {
    let span = 0..MAX_GATEWAYS;
    Ownership {
        tables: span
            .clone()
            .map(|i| s.table(i))
            .filter(|t| !s.foreign_tables.contains(t) && !RESERVED_TABLES.contains(t))
            .collect(),
        rule_priorities: span.map(|i| s.rule_priority(i)).collect::<BTreeSet<_>>(),
        nexthop_ids: s.nexthop_id_base..=s.nexthop_id(MAX_GATEWAYS - 1),
    }
}

/// Per-gateway nexthops, tables and rules. `oif` is the index of `interface`; `None`
/// (interface missing) plans only the unreachable routes and the rules.
pub fn plan_routes(s: &ReturnRoutingSettings, oif: Option<u32>) -> EgressPlan {
    let mut out = EgressPlan::default();
    let any = Ipv4Net::default();
    for (i, &gateway) in s.gateways.iter().enumerate() {
        let table = s.table(i);
        out.routes.push(Route {
            table,
            dst: any,
            metric: KILL_SWITCH_METRIC,
            protocol: RTPROT_VPN_ROUTER,
            target: RouteTarget::Unreachable,
        });
        if let Some(oif) = oif {
            out.nexthops.push(Nexthop {
                id: s.nexthop_id(i),
                protocol: RTPROT_VPN_ROUTER,
                kind: NexthopKind::Gateway { gateway, oif },
            });
            out.routes.push(Route {
                table,
                dst: any,
                metric: 0,
                protocol: RTPROT_VPN_ROUTER,
                target: RouteTarget::Nexthop(s.nexthop_id(i)),
            });
        }
        out.rules.push(Rule {
            priority: s.rule_priority(i),
            protocol: RTPROT_VPN_ROUTER,
            action: RuleTarget::Lookup(table),
            dst: None,
            src: None,
            iif: None,
            fwmark: Some((s.mark(i), u32::MAX)),
        });
    }
    out.rules.sort();
    out
}

/// The nftables content we want. `buckets: None` = keep whatever bucket map the kernel has
/// (before the first complete healthy set, so a restart does not flap egress).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftModel {
    pub table: String,
    pub mark_range: (u32, u32),
    /// (ingress VIP, mark) per gateway.
    pub ingress: Vec<(Ipv4Addr, u32)>,
    pub egress: Option<EgressNft>,
    pub mss_clamp: Option<MssClamp>,
}

/// TCP MSS clamping of the connections through the gateways: SYNs forwarded out of
/// `interface` (clients' egress, real servers' answers to ingress connections) and SYNs of
/// ingress connections delivered to the router (IPVS or a local service) get an MSS option no
/// larger than `mss`, so neither end sends segments that do not fit the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MssClamp {
    pub interface: String,
    pub mss: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressNft {
    pub destinations: Vec<Ipv4Net>,
    pub exclude: Vec<Ipv4Net>,
    pub seed: u32,
    pub size: u32,
    pub scratch_base: u32,
    /// `scratch_base + bucket` → gateway mark, for buckets that have a healthy gateway.
    pub buckets: Option<BTreeMap<u32, u32>>,
}

/// The bucket table for `healthy` (consistent mode only).
pub fn bucket_table(s: &ReturnRoutingSettings, healthy: &HealthyGateways) -> Option<BucketTable> {
    let c = s.consistent.as_ref()?;
    let members: Vec<(usize, Ipv4Addr)> = healthy
        .indexes()
        .filter_map(|i| s.gateways.get(i).map(|a| (i, *a)))
        .collect();
    Some(BucketTable::build(c.buckets, c.hash_seed, &members))
}

pub fn nft_model(s: &ReturnRoutingSettings, table: Option<&BucketTable>) -> NftModel {
    let ingress = s
        .ingress_vips
        .iter()
        .enumerate()
        .map(|(i, vip)| (*vip, s.mark(i)))
        .collect();
    let egress = s.consistent.as_ref().map(|c| EgressNft {
        destinations: Ipv4Net::aggregate(&c.destinations),
        exclude: Ipv4Net::aggregate(&c.exclude),
        seed: c.hash_seed,
        size: c.buckets,
        scratch_base: s.scratch_base(),
        buckets: table.map(|t| {
            t.buckets
                .iter()
                .enumerate()
                .filter_map(|(b, g)| {
                    let g = (*g)?;
                    Some((s.scratch_base().wrapping_add(index_u32(b)), s.mark(g)))
                })
                .collect()
        }),
    });
    NftModel {
        table: s.nft_table.clone(),
        mark_range: s.mark_range(),
        ingress,
        egress,
        mss_clamp: s.mss_clamp.map(|mss| MssClamp {
            interface: s.interface.clone(),
            mss,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthyGateway;

    fn gw(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 25, 128 + u8::try_from(i).unwrap())
    }

    fn settings(n: usize) -> ReturnRoutingSettings {
        ReturnRoutingSettings {
            interface: "gw0".into(),
            gateways: (0..n).map(gw).collect(),
            ingress_vips: (0..n)
                .map(|i| Ipv4Addr::new(192, 168, 26, 128 + u8::try_from(i).unwrap()))
                .collect(),
            ..Default::default()
        }
    }

    fn healthy(idx: &[usize]) -> HealthyGateways {
        HealthyGateways {
            complete: true,
            gateways: idx
                .iter()
                .map(|&i| {
                    (
                        i,
                        HealthyGateway {
                            address: gw(i),
                            public_ip: None,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn one_table_and_rule_per_configured_gateway() {
        let s = settings(8);
        let p = plan_routes(&s, Some(9));
        assert_eq!(p.nexthops.len(), 8);
        assert_eq!(p.routes.len(), 16);
        assert_eq!(p.rules.len(), 8);
        let r3 = p.rules.iter().find(|r| r.priority == 1003).unwrap();
        assert_eq!(r3.fwmark, Some((0x1903, u32::MAX)));
        assert_eq!(r3.action, RuleTarget::Lookup(53));
        assert!(p.routes.contains(&Route {
            table: 53,
            dst: Ipv4Net::default(),
            metric: 0,
            protocol: 245,
            target: RouteTarget::Nexthop(2403)
        }));
        assert!(p.nexthops.contains(&Nexthop {
            id: 2403,
            protocol: 245,
            kind: NexthopKind::Gateway {
                gateway: gw(3),
                oif: 9
            }
        }));
    }

    #[test]
    fn missing_interface_keeps_rules_and_unreachable_routes() {
        let p = plan_routes(&settings(2), None);
        assert!(p.nexthops.is_empty());
        assert_eq!(p.rules.len(), 2);
        assert!(p
            .routes
            .iter()
            .all(|r| r.target == RouteTarget::Unreachable && r.metric == u32::MAX));
    }

    #[test]
    fn ownership_covers_the_whole_range_but_not_egress() {
        let s = settings(2);
        let own = ownership(&s);
        assert!(own.tables.contains(&50) && own.tables.contains(&305));
        assert!(!own.tables.contains(&180), "egress's table");
        assert!(!own.tables.contains(&254));
        assert!(own.rule_priorities.contains(&1255) && !own.rule_priorities.contains(&1256));
        assert_eq!(own.nexthop_ids, 2400..=2655);
    }

    #[test]
    fn validation() {
        assert_eq!(settings(8).validate(), Ok(()));
        let s = ReturnRoutingSettings {
            table_base: 175,
            ..settings(8)
        };
        assert_eq!(
            s.validate(),
            Err(ReturnRoutingSettingsError::TableCollision {
                table: 180,
                index: 5
            })
        );
        let s = ReturnRoutingSettings {
            ingress_vips: vec![gw(0)],
            ..settings(2)
        };
        assert!(matches!(
            s.validate(),
            Err(ReturnRoutingSettingsError::VipCount { .. })
        ));
        let s = ReturnRoutingSettings {
            mark_base: u32::MAX - 10,
            ..settings(2)
        };
        assert!(matches!(
            s.validate(),
            Err(ReturnRoutingSettingsError::Overflow { .. })
        ));
    }

    #[test]
    fn nft_model_maps_vips_and_buckets() {
        let mut s = settings(4);
        s.consistent = Some(ConsistentSettings {
            destinations: vec!["0.0.0.0/0".parse().unwrap()],
            exclude: vec![
                "10.0.0.0/8".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
            hash_seed: 7,
            buckets: 4093,
        });
        let t = bucket_table(&s, &healthy(&[0, 2])).unwrap();
        let m = nft_model(&s, Some(&t));
        assert_eq!(m.ingress[1], (Ipv4Addr::new(192, 168, 26, 129), 0x1901));
        assert_eq!(m.mark_range, (0x1900, 0x19ff));
        let e = m.egress.unwrap();
        assert_eq!(e.exclude, vec!["10.0.0.0/8".parse::<Ipv4Net>().unwrap()]);
        assert_eq!(e.scratch_base, 0x1a00);
        let buckets = e.buckets.unwrap();
        assert_eq!(buckets.len(), 4093);
        assert!(buckets.values().all(|m| *m == 0x1900 || *m == 0x1902));
        assert!(buckets.keys().all(|k| (0x1a00..0x1a00 + 4093).contains(k)));
        // None healthy: an empty map (unmarked packets meet egress's kill switch).
        let t = bucket_table(&s, &healthy(&[])).unwrap();
        assert!(nft_model(&s, Some(&t))
            .egress
            .unwrap()
            .buckets
            .unwrap()
            .is_empty());
    }
}
