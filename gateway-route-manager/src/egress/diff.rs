//! Desired vs kernel → the minimal ordered list of changes. Pure.
//!
//! Owns: the order of changes, chosen so that client traffic never falls through to the main
//! table: kill-switch routes first, then nexthops and the group, then active routes, then new
//! rules; deletions last (rules, routes, groups, gateway nexthops). It must not do I/O and must
//! never list a deletion of an object [`Ownership`] does not cover.

use std::collections::{BTreeMap, BTreeSet};

use super::plan::{EgressPlan, Ownership};
use crate::netlink::{Nexthop, NexthopKind, Route, RouteTarget, Rule};

/// What the kernel holds (dumps, unfiltered).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    pub nexthops: Vec<Nexthop>,
    pub routes: Vec<Route>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    SetNexthop(Nexthop),
    DeleteNexthop(u32),
    SetRoute(Route),
    DeleteRoute(Route),
    AddRule(Rule),
    DeleteRule(Rule),
}

impl Change {
    /// The metrics label.
    pub fn object(&self) -> &'static str {
        match self {
            Change::SetNexthop(_) | Change::DeleteNexthop(_) => "nexthop",
            Change::SetRoute(_) | Change::DeleteRoute(_) => "route",
            Change::AddRule(_) | Change::DeleteRule(_) => "rule",
        }
    }
}

fn is_group(nh: &Nexthop) -> bool {
    matches!(nh.kind, NexthopKind::Group { .. })
}

/// Whether `current` can become `desired` by an in-place replace (the kernel refuses to turn
/// a single nexthop into a group or back, or to change a group's type or bucket count).
fn replaceable(current: &Nexthop, desired: &Nexthop) -> bool {
    match (&current.kind, &desired.kind) {
        (NexthopKind::Group { group: a, .. }, NexthopKind::Group { group: b, .. }) => {
            a.replaceable_by(b)
        }
        (NexthopKind::Group { .. }, _) | (_, NexthopKind::Group { .. }) => false,
        _ => true,
    }
}

/// The changes that turn `kernel` into `plan`, touching only what `own` covers.
pub fn diff(plan: &EgressPlan, own: &Ownership, kernel: &KernelState) -> Vec<Change> {
    let mut changes = Vec::new();

    let kernel_nh: BTreeMap<u32, &Nexthop> = kernel.nexthops.iter().map(|n| (n.id, n)).collect();
    let kernel_routes: BTreeMap<(u32, ipnet::Ipv4Net, u32), &Route> = kernel
        .routes
        .iter()
        .filter(|r| own.tables.contains(&r.table))
        .map(|r| (r.key(), r))
        .collect();

    let is_kill = |r: &Route| matches!(r.target, RouteTarget::Blackhole | RouteTarget::Unreachable);

    // 1. Kill switch.
    for r in plan.routes.iter().filter(|r| is_kill(r)) {
        if kernel_routes.get(&r.key()) != Some(&r) {
            changes.push(Change::SetRoute(r.clone()));
        }
    }

    // 2. Nexthops: gateways before groups (a group needs its members).
    let mut recreated: BTreeSet<u32> = BTreeSet::new();
    let (groups, singles): (Vec<&Nexthop>, Vec<&Nexthop>) =
        plan.nexthops.iter().partition(|n| is_group(n));
    for nh in singles.into_iter().chain(groups) {
        match kernel_nh.get(&nh.id) {
            Some(current) if *current == nh => {}
            Some(current) if !replaceable(current, nh) => {
                // Deleting it also deletes the routes using it; they are re-added below.
                changes.push(Change::DeleteNexthop(nh.id));
                changes.push(Change::SetNexthop(nh.clone()));
                recreated.insert(nh.id);
            }
            _ => changes.push(Change::SetNexthop(nh.clone())),
        }
    }

    // 3. Active routes.
    for r in plan.routes.iter().filter(|r| !is_kill(r)) {
        let forced = matches!(r.target, RouteTarget::Nexthop(id) if recreated.contains(&id));
        if forced || kernel_routes.get(&r.key()) != Some(&r) {
            changes.push(Change::SetRoute(r.clone()));
        }
    }

    // 4. New rules, in priority order (exclusions before the egress lookup).
    let desired_rules: BTreeSet<&Rule> = plan.rules.iter().collect();
    let kernel_rules: BTreeSet<&Rule> = kernel.rules.iter().collect();
    for rule in &desired_rules {
        if !kernel_rules.contains(rule) {
            changes.push(Change::AddRule((*rule).clone()));
        }
    }

    // 5. Deletions, only of what we own.
    let mut seen_rules = BTreeSet::new();
    for rule in &kernel.rules {
        // A rule listed twice is deleted down to one only if desired; extra copies go.
        let keep = desired_rules.contains(rule) && seen_rules.insert(rule);
        if own.owns_rule(rule) && !keep {
            changes.push(Change::DeleteRule(rule.clone()));
        }
    }
    let desired_keys: BTreeSet<_> = plan.routes.iter().map(Route::key).collect();
    for r in &kernel.routes {
        if own.owns_route(r) && !desired_keys.contains(&r.key()) {
            changes.push(Change::DeleteRoute(r.clone()));
        }
    }
    let desired_ids: BTreeSet<u32> = plan.nexthops.iter().map(|n| n.id).collect();
    let (old_groups, old_singles): (Vec<&Nexthop>, Vec<&Nexthop>) = kernel
        .nexthops
        .iter()
        .filter(|n| own.owns_nexthop(n) && !desired_ids.contains(&n.id))
        .partition(|n| is_group(n));
    for nh in old_groups.into_iter().chain(old_singles) {
        changes.push(Change::DeleteNexthop(nh.id));
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::plan::{ownership, plan, EgressSettings, RTPROT_VPN_ROUTER};
    use crate::health::{HealthyGateway, HealthyGateways};
    use crate::netlink::{GroupType, RuleTarget};
    use std::net::Ipv4Addr;

    fn settings() -> EgressSettings {
        EgressSettings {
            gateways: (0..3)
                .map(|i| Ipv4Addr::new(192, 168, 25, 128 + i))
                .collect(),
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
                            address: Ipv4Addr::LOCALHOST,
                            public_ip: None,
                        },
                    )
                })
                .collect(),
        }
    }

    fn apply(kernel: &mut KernelState, changes: &[Change]) {
        for c in changes {
            match c {
                Change::SetNexthop(n) => {
                    kernel.nexthops.retain(|k| k.id != n.id);
                    kernel.nexthops.push(n.clone());
                }
                Change::DeleteNexthop(id) => {
                    kernel.nexthops.retain(|k| k.id != *id);
                    kernel
                        .routes
                        .retain(|r| r.target != RouteTarget::Nexthop(*id));
                }
                Change::SetRoute(r) => {
                    kernel.routes.retain(|k| k.key() != r.key());
                    kernel.routes.push(r.clone());
                }
                Change::DeleteRoute(r) => kernel.routes.retain(|k| k != r),
                Change::AddRule(r) => kernel.rules.push(r.clone()),
                Change::DeleteRule(r) => {
                    if let Some(pos) = kernel.rules.iter().position(|k| k == r) {
                        kernel.rules.remove(pos);
                    }
                }
            }
        }
    }

    fn converge(kernel: &mut KernelState, plan: &EgressPlan, own: &Ownership) {
        let changes = diff(plan, own, kernel);
        apply(kernel, &changes);
    }

    fn foreign() -> KernelState {
        KernelState {
            nexthops: vec![Nexthop {
                id: 1801,
                protocol: 4,
                kind: NexthopKind::Other("someone's".into()),
            }],
            routes: vec![Route {
                table: 180,
                dst: "8.8.8.0/24".parse().unwrap(),
                metric: 5,
                protocol: 4,
                target: RouteTarget::Blackhole,
            }],
            rules: vec![Rule {
                priority: 10888,
                protocol: 4,
                action: RuleTarget::Lookup(99),
                dst: None,
                src: None,
                iif: None,
                fwmark: None,
            }],
        }
    }

    #[test]
    fn converges_and_then_changes_nothing() {
        let s = settings();
        let own = ownership(&s);
        let mut kernel = foreign();
        for set in [&[0, 1, 2][..], &[1], &[], &[2, 0], &[0, 1, 2]] {
            let p = plan(&s, &healthy(set), Some(4));
            let changes = diff(&p, &own, &kernel);
            apply(&mut kernel, &changes);
            assert_eq!(diff(&p, &own, &kernel), vec![], "second pass after {set:?}");
        }
        // The foreign route and rule were never touched; the foreign nexthop at our id was
        // replaced because we need that id.
        assert!(kernel.routes.iter().any(|r| r.protocol == 4));
        assert!(kernel.rules.iter().any(|r| r.protocol == 4));
        assert!(kernel
            .nexthops
            .iter()
            .all(|n| n.protocol == RTPROT_VPN_ROUTER));
    }

    #[test]
    fn losing_every_gateway_deletes_only_the_active_route_and_group() {
        let s = settings();
        let own = ownership(&s);
        let mut kernel = KernelState::default();
        converge(&mut kernel, &plan(&s, &healthy(&[0, 1]), Some(4)), &own);
        let changes = diff(&plan(&s, &healthy(&[]), Some(4)), &own, &kernel);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(matches!(&changes[0], Change::DeleteRoute(r) if r.metric == 0));
        assert_eq!(changes[1], Change::DeleteNexthop(s.group_nexthop_id()));
    }

    #[test]
    fn kill_switch_comes_first_and_deletions_last() {
        let s = settings();
        let changes = diff(
            &plan(&s, &healthy(&[0]), Some(4)),
            &ownership(&s),
            &foreign(),
        );
        assert!(matches!(&changes[0], Change::SetRoute(r) if r.target == RouteTarget::Blackhole));
        let first_delete = changes.iter().position(|c| {
            matches!(
                c,
                Change::DeleteRule(_) | Change::DeleteRoute(_) | Change::DeleteNexthop(_)
            )
        });
        assert_eq!(first_delete, None, "nothing of ours to delete: {changes:?}");
    }

    #[test]
    fn group_type_change_recreates_group_and_readds_its_route() {
        let s = settings();
        let own = ownership(&s);
        let mut kernel = KernelState::default();
        converge(&mut kernel, &plan(&s, &healthy(&[0, 1]), Some(4)), &own);
        let resilient = EgressSettings {
            mode: crate::egress::EgressMode::EcmpResilient(Default::default()),
            ..s.clone()
        };
        let changes = diff(&plan(&resilient, &healthy(&[0, 1]), Some(4)), &own, &kernel);
        let gid = s.group_nexthop_id();
        assert_eq!(changes[0], Change::DeleteNexthop(gid));
        assert!(
            matches!(&changes[1], Change::SetNexthop(n) if matches!(n.kind, NexthopKind::Group { group: GroupType::Resilient { .. }, .. }))
        );
        assert!(
            matches!(&changes[2], Change::SetRoute(r) if r.target == RouteTarget::Nexthop(gid))
        );
        apply(&mut kernel, &changes);
        assert_eq!(
            diff(&plan(&resilient, &healthy(&[0, 1]), Some(4)), &own, &kernel),
            vec![]
        );
    }

    #[test]
    fn member_change_is_one_replace() {
        let s = settings();
        let own = ownership(&s);
        let mut kernel = KernelState::default();
        converge(&mut kernel, &plan(&s, &healthy(&[0, 1, 2]), Some(4)), &own);
        let changes = diff(&plan(&s, &healthy(&[0, 2]), Some(4)), &own, &kernel);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(matches!(&changes[0], Change::SetNexthop(n) if n.id == s.group_nexthop_id()));
    }

    #[test]
    fn duplicate_owned_rule_is_removed() {
        let s = settings();
        let own = ownership(&s);
        let mut kernel = KernelState::default();
        let p = plan(&s, &healthy(&[0]), Some(4));
        converge(&mut kernel, &p, &own);
        let dup = p.rules[0].clone();
        kernel.rules.push(dup.clone());
        assert_eq!(diff(&p, &own, &kernel), vec![Change::DeleteRule(dup)]);
    }
}
