//! Cross-field rules of the config: what no single key can say alone — overlaps between
//! address ranges, references between sections, numbering that must not collide in the
//! kernel. Runs after parsing; every rule reports at the key that has to change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use super::reader::Reader;
use super::*;

pub fn config(r: &mut Reader, c: &Config) {
    // With a broken section, rules that look across sections would report its absence as a
    // second, misleading error: check each section alone instead.
    if !r.broken_sections.is_empty() {
        return;
    }
    vrrp(r, c);
    if let Some(g) = &c.gateways {
        gateways(r, c, g);
    }
    if let Some(i) = &c.ingress {
        ingress(r, c, i);
    }
    if let Some(d) = &c.ddns {
        ddns(r, c, d);
    }
}

fn vrrp(r: &mut Reader, c: &Config) {
    let mut names: BTreeMap<&str, Location> = BTreeMap::new();
    let mut vrids: BTreeMap<(&str, u8, bool), &str> = BTreeMap::new();
    let mut vips: BTreeMap<IpAddr, &str> = BTreeMap::new();
    let mut ingress_holders = Vec::new();
    for (i, v) in c.vrrp.iter().enumerate() {
        let p = format!("vrrp[{i}]");
        if let Some(first) = names.insert(&v.name.value, v.name.at) {
            r.error(
                v.name.at,
                format!(
                    "{p}.name: `{}` is already used at line {}; expected unique instance names",
                    v.name.value, first.line
                ),
            );
        }
        let Some(first_vip) = v.virtual_ips.first() else {
            r.error(
                v.name.at,
                format!("{p}.virtual_ips: empty; expected at least one address"),
            );
            continue;
        };
        // RFC 5798 §5.2: an instance protects addresses of one family (IPv4 and IPv6 run as
        // separate instances, even with the same VRID).
        let v6 = first_vip.address.value.addr().is_ipv6();
        for (j, vip) in v.virtual_ips.iter().enumerate() {
            let a = vip.address.value.addr();
            if a.is_ipv6() != v6 {
                r.error(vip.address.at, format!("{p}.virtual_ips[{j}]: {a} mixes IPv4 and IPv6 in one instance; expected one family per instance (use a second instance with the same vrid)"));
            }
            if let Some(other) = vips.insert(a, &v.name.value) {
                r.error(vip.address.at, format!("{p}.virtual_ips[{j}]: {a} is already held by instance `{other}`; expected each VIP in one instance"));
            }
        }
        if v6 && v.version == VrrpVersion::V2 {
            r.error(first_vip.address.at, format!("{p}: VRRPv2 carries IPv4 only (RFC 3768); expected version: 3 for IPv6 addresses"));
        }
        for (j, peer) in v.unicast_peers.iter().enumerate() {
            if peer.is_ipv6() != v6 {
                r.error(
                    v.name.at,
                    format!(
                        "{p}.unicast_peers[{j}]: {peer} is not of the instance's address family"
                    ),
                );
            }
        }
        for (j, peer) in v.allowed_peers.iter().enumerate() {
            let a = peer.value;
            if a.is_ipv6() != v6 {
                r.error(peer.at, format!("{p}.allowed_peers[{j}]: {a} is not of the instance's address family; expected the advert source of a peer router"));
            } else if !v.unicast_peers.is_empty() && !v.unicast_peers.contains(&a) {
                r.error(peer.at, format!("{p}.allowed_peers[{j}]: {a} is not one of unicast_peers, whose adverts are the only ones heard; expected the same addresses as unicast_peers, or no allowed_peers"));
            }
        }
        // With unicast peers the runner drops every other source before decoding, so
        // unicast_peers already is the allowed set; a second list that says something else is
        // a mistake (a peer added to one list only), not a policy.
        if !v.allowed_peers.is_empty() {
            for peer in &v.unicast_peers {
                if !v.allowed_peers.iter().any(|a| a.value == *peer) {
                    r.error(v.allowed_peers_at, format!("{p}.allowed_peers: unicast peer {peer} is missing; expected the same addresses as unicast_peers, or no allowed_peers (unicast_peers alone already limits whose adverts are used)"));
                }
            }
        }
        if let Some(other) = vrids.insert((&v.interface, v.vrid, v6), &v.name.value) {
            r.error(v.name.at, format!("{p}.vrid: {} on {} is already used by instance `{other}`; expected a unique vrid per interface and family", v.vrid, v.interface));
        }
        if v.gateway_ingress_vips {
            if v6 {
                r.error(v.name.at, format!("{p}.gateway_ingress_vips: ingress VIPs are IPv4; expected this on an IPv4 instance"));
            }
            ingress_holders.push(&v.name.value);
        }
        if let Some(t) = &v.track_gateways {
            match &c.gateways {
                None => r.error(v.name.at, format!("{p}.track_gateways: there is no `gateways` section to track")),
                Some(g) if t.min_healthy as usize > g.addresses.value.len() => r.error(
                    v.name.at,
                    format!("{p}.track_gateways.min_healthy: {} is more than the {} configured gateways", t.min_healthy, g.addresses.value.len()),
                ),
                Some(_) => {}
            }
            if i32::from(v.priority) + t.weight < 1 {
                r.warn(v.name.at, format!("{p}.track_gateways.weight: priority {} {:+} is below 1; the advertised priority is clamped to 1", v.priority, t.weight));
            }
        }
        if !v.preempt && !v.preempt_delay.is_zero() {
            r.warn(
                v.name.at,
                format!("{p}.preempt_delay: has no effect with preempt: false"),
            );
        }
    }
    if ingress_holders.len() > 1 {
        r.error(c.vrrp_at, format!("vrrp: instances {} all set gateway_ingress_vips; expected one instance to hold the ingress VIPs", ingress_holders.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")));
    }
    if c.gateways.is_none() && !ingress_holders.is_empty() {
        r.error(c.vrrp_at, "vrrp: gateway_ingress_vips is set but there is no `gateways` section to derive the ingress VIPs from".to_owned());
    }
}

fn gateways(r: &mut Reader, c: &Config, g: &Gateways) {
    let n = g.addresses.value.len() as u32;
    // Ingress VIPs: start .. start+N-1; they must not collide with the gateways themselves or
    // with any VRRP VIP (the egress VIP in particular).
    let start = u32::from(g.ingress_vip_start.value);
    if start.checked_add(n - 1).is_none() {
        r.error(
            g.ingress_vip_start.at,
            "gateways.ingress_vip_start: the range of ingress VIPs runs past 255.255.255.255"
                .to_owned(),
        );
    } else {
        let last = Ipv4Addr::from(start + n - 1);
        let in_range = |a: Ipv4Addr| (start..=start + n - 1).contains(&u32::from(a));
        for a in &g.addresses.value {
            if in_range(*a) {
                r.error(g.ingress_vip_start.at, format!("gateways.ingress_vip_start: the ingress VIPs {}-{last} include gateway address {a}; expected a range apart from the gateways", g.ingress_vip_start.value));
            }
        }
        for v in &c.vrrp {
            for vip in &v.virtual_ips {
                if let IpAddr::V4(a) = vip.address.value.addr() {
                    if in_range(a) {
                        r.error(vip.address.at, format!("vrrp `{}`: virtual IP {a} lies in the ingress VIP range {}-{last}; expected the egress VIP outside it (ingress VIPs are added by gateway_ingress_vips)", v.name.value, g.ingress_vip_start.value));
                    }
                }
            }
        }
    }
    let h = &g.health;
    if h.timeout >= h.interval {
        r.error(h.at, format!("gateways.health.timeout: {} is not shorter than the interval {}; expected timeout < interval", humantime::format_duration(h.timeout), humantime::format_duration(h.interval)));
    }
    if h.checks.is_empty() {
        r.error(h.at, "gateways.health.checks: empty; expected at least one of vpn_status, public_ip, health_server, probe".to_owned());
    }
    let e = &g.egress;
    let rr = &g.return_routing;
    let tables = rr.table_base.value..rr.table_base.value.saturating_add(n);
    if tables.contains(&e.table.value) {
        r.error(e.table.at, format!("gateways.egress.table: {} is one of the return-routing tables {}-{}; expected a different table", e.table.value, tables.start, tables.end - 1));
    }
    if (tables.start..tables.end).any(|t| (253..=255).contains(&t)) {
        r.error(rr.table_base.at, format!("gateways.return_routing.table_base: tables {}-{} include a reserved table (253-255); expected a base that keeps clear of them", tables.start, tables.end - 1));
    }
    // Return routing must win over egress: a reply of an ingress connection carries its
    // gateway's mark and has to hit that gateway's rule before the egress rules see it.
    let last_return_rule = rr.rule_priority_base.value.saturating_add(n - 1);
    if last_return_rule >= e.rule_priority.value.saturating_sub(1) {
        r.error(rr.rule_priority_base.at, format!("gateways.return_routing.rule_priority_base: rules {}-{last_return_rule} are not ahead of the egress rules at {} (which use {} for exclusions); expected a lower base", rr.rule_priority_base.value, e.rule_priority.value, e.rule_priority.value.saturating_sub(1)));
    }
    if e.mode == EgressMode::Consistent {
        // The bucket hash lands in scratch marks mark_base+256 .. mark_base+256+buckets
        // - 1 before the bucket map turns it into a gateway's mark.
        let buckets = gateway_route_manager::consistent::table_size(n as usize);
        if rr.mark_base.value.checked_add(256 + buckets - 1).is_none() {
            r.error(rr.mark_base.at, format!("gateways.return_routing.mark_base: {:#x} leaves no room for the {buckets} bucket marks of egress.mode consistent above mark_base+256; expected at most {:#x}", rr.mark_base.value, u32::MAX - 256 - buckets + 1));
        }
    }
    if e.destinations.is_empty() {
        r.warn(
            e.table.at,
            "gateways.egress.destinations: empty; no client traffic is routed to the gateways"
                .to_owned(),
        );
    }
}

fn ingress(r: &mut Reader, c: &Config, i: &Ingress) {
    let mut names: BTreeMap<&str, Location> = BTreeMap::new();
    let mut services: BTreeMap<(IpAddr, u16, Protocol), &str> = BTreeMap::new();
    let vrrp_vips: BTreeSet<IpAddr> = c
        .vrrp
        .iter()
        .flat_map(|v| v.virtual_ips.iter().map(|x| x.address.value.addr()))
        .collect();
    let holds_ingress = c.vrrp.iter().any(|v| v.gateway_ingress_vips);
    for (k, vs) in i.virtual_servers.iter().enumerate() {
        let p = format!("ingress.virtual_servers[{k}]");
        if let Some(first) = names.insert(&vs.name.value, vs.name.at) {
            r.error(
                vs.name.at,
                format!(
                    "{p}.name: `{}` is already used at line {}; expected unique names",
                    vs.name.value, first.line
                ),
            );
        }
        let local = vs.local_route.value;
        let addresses: Vec<IpAddr> = match &vs.addresses.value {
            VsAddresses::GatewayIngressVips if local => {
                r.error(vs.local_route.at, format!("{p}.local_route: the gateways' ingress VIPs are held by VRRP; expected local_route only with a list of addresses that no router holds"));
                Vec::new()
            }
            VsAddresses::GatewayIngressVips => match &c.gateways {
                Some(g) => {
                    if !holds_ingress {
                        r.warn(vs.addresses.at, format!("{p}.addresses: gateway_ingress_vips, but no vrrp instance sets gateway_ingress_vips: true, so nothing holds these VIPs"));
                    }
                    g.ingress_vips().into_iter().map(IpAddr::V4).collect()
                }
                None => {
                    r.error(vs.addresses.at, format!("{p}.addresses: gateway_ingress_vips needs a `gateways` section; expected a list of addresses instead"));
                    Vec::new()
                }
            },
            VsAddresses::List(list) => {
                if list.is_empty() {
                    r.error(
                        vs.addresses.at,
                        format!("{p}.addresses: empty; expected at least one address"),
                    );
                }
                for a in list {
                    match (local, vrrp_vips.contains(a)) {
                        (true, true) => r.error(vs.local_route.at, format!("{p}.local_route: {a} is a virtual IP of a vrrp instance (VRRP holds it on the master); expected local_route only for addresses no router holds, such as the cluster DNS service IP")),
                        (true, false) if a.is_ipv6() => r.error(vs.local_route.at, format!("{p}.local_route: {a} is IPv6; local routes are IPv4 only until dual-stack")),
                        (false, false) => r.warn(vs.addresses.at, format!("{p}.addresses: {a} is not a virtual IP of any vrrp instance; it must be held by something else (or set local_route: true)")),
                        _ => {}
                    }
                }
                list.clone()
            }
        };
        for a in &addresses {
            for proto in &vs.protocols {
                if let Some(other) = services.insert((*a, vs.port, *proto), &vs.name.value) {
                    r.error(vs.name.at, format!("{p}: {proto:?} {a}:{} is also served by `{other}`; expected each address/port/protocol once", vs.port));
                }
            }
            for rs in &vs.real_servers {
                if rs.addr().is_ipv6() != a.is_ipv6() {
                    r.error(vs.name.at, format!("{p}.real_servers: {rs} and virtual address {a} are of different families; NAT forwarding needs one family"));
                    break;
                }
            }
        }
        if vs.health_check.timeout >= vs.health_check.interval {
            r.error(vs.name.at, format!("{p}.health_check.timeout: not shorter than the interval; expected timeout < interval"));
        }
    }
}

fn ddns(r: &mut Reader, c: &Config, d: &Ddns) {
    if c.gateways.is_none() {
        r.error(d.hostname.at, "ddns: the record set is the healthy gateways' public IPs, but there is no `gateways` section".to_owned());
    }
    if let Some(m) = &d.only_when_master {
        if !c.vrrp.iter().any(|v| v.name.value == m.value) {
            let known: Vec<&str> = c.vrrp.iter().map(|v| v.name.value.as_str()).collect();
            let expected = if known.is_empty() {
                "a vrrp instance, but none is configured".to_owned()
            } else {
                format!("one of: {}", known.join(", "))
            };
            r.error(
                m.at,
                format!(
                    "ddns.only_when_master: no vrrp instance is named `{}`; expected {expected}",
                    m.value
                ),
            );
        }
    } else if !c.vrrp.is_empty() {
        r.warn(d.hostname.at, "ddns.only_when_master: not set, so every router writes the record set; expected the name of the vrrp instance whose master should write".to_owned());
    }
    if let DdnsProvider::Rfc2136 { zone, .. } = &d.provider {
        let h = &d.hostname.value;
        if h != zone && !h.ends_with(&format!(".{zone}")) {
            r.error(d.hostname.at, format!("ddns.hostname: {h} is not inside zone {zone}; expected a name ending in .{zone}"));
        }
    }
}
