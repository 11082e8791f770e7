//! The routes a client NetworkAttachmentDefinition needs so that everything except the
//! excluded ranges goes to the egress VIP (`vpn-router nad-routes`): the CIDR complement of
//! the excludes within 0.0.0.0/0, plus extra destinations, as the smallest list of CIDRs in
//! address order, in the shape CNI ipam `routes` takes.
//!
//! Pure: no I/O. IPv4 only, like `gateways.egress`: the router sends no IPv6 to the gateways,
//! so IPv6 routes to the VIP would go nowhere; IPv6 comes with dual-stack.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;

/// A command-line value that is not an IPv4 CIDR or address we can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NadRoutesError {
    #[error("{value:?} is not a CIDR (expected ADDRESS/PREFIX, like 10.0.0.0/8; one address is ADDRESS/32)")]
    Syntax { value: String },
    #[error("{value:?} has host bits set: did you mean {network}?")]
    HostBits { value: String, network: Ipv4Net },
    #[error("{value:?} is IPv6: nad-routes is IPv4 only, like gateways.egress (IPv6 comes with dual-stack)")]
    Ipv6 { value: String },
    #[error("{value:?} is not an IPv4 address")]
    Address { value: String },
}

/// Parses one IPv4 CIDR, refusing host bits (a typo like 10.0.0.1/8 must not silently mean
/// 10.0.0.0/8).
pub fn parse_cidr(value: &str) -> Result<Ipv4Net, NadRoutesError> {
    let net: IpNet = value.trim().parse().map_err(|_| NadRoutesError::Syntax {
        value: value.to_owned(),
    })?;
    let IpNet::V4(net) = net else {
        return Err(NadRoutesError::Ipv6 {
            value: value.to_owned(),
        });
    };
    if net.trunc() != net {
        return Err(NadRoutesError::HostBits {
            value: value.to_owned(),
            network: net.trunc(),
        });
    }
    Ok(net)
}

/// Parses the `--via` address.
pub fn parse_via(value: &str) -> Result<Ipv4Addr, NadRoutesError> {
    match value.trim().parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(a),
        Ok(IpAddr::V6(_)) => Err(NadRoutesError::Ipv6 {
            value: value.to_owned(),
        }),
        Err(_) => Err(NadRoutesError::Address {
            value: value.to_owned(),
        }),
    }
}

/// One entry of CNI ipam `routes`: `{"dst": "a.b.c.d/n"}`, with `"gw"` when given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NadRoute {
    pub dst: Ipv4Net,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gw: Option<Ipv4Addr>,
}

/// What `nad-routes` prints: `{"routes": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NadRoutes {
    pub routes: Vec<NadRoute>,
}

/// The destinations to send to the VIP: (0.0.0.0/0 minus `exclude`) plus `extra`, as the
/// smallest list of CIDRs covering exactly those addresses, in address order. Overlapping and
/// duplicate values are fine. An extra inside an excluded range is routed anyway (that is
/// what it is for: the cluster DNS service's /32 inside the intranet); an extra that the
/// complement already covers adds nothing and does not appear.
///
/// When that is every address, the answer is 0.0.0.0/1 and 128.0.0.0/1, never 0.0.0.0/0: a
/// /0 route on the attachment would collide with the pod's default route on its primary
/// network (CNI adds routes exclusively, so the attachment would fail with "file exists").
pub fn destinations(exclude: &[Ipv4Net], extra: &[Ipv4Net]) -> Vec<Ipv4Net> {
    let excluded = merge(exclude.iter().map(span).collect());
    let mut routed = complement(&excluded);
    routed.extend(extra.iter().map(span));
    let routed = merge(routed);
    if routed == [(0, FULL)] {
        return ["0.0.0.0/1", "128.0.0.0/1"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
    }
    routed
        .into_iter()
        .flat_map(|(start, end)| cidrs(start, end))
        .collect()
}

/// [`destinations`] as ipam routes, each with `"gw": via` when given (without it the bridge
/// plugin uses the ipam `gateway`).
pub fn nad_routes(exclude: &[Ipv4Net], extra: &[Ipv4Net], via: Option<Ipv4Addr>) -> NadRoutes {
    NadRoutes {
        routes: destinations(exclude, extra)
            .into_iter()
            .map(|dst| NadRoute { dst, gw: via })
            .collect(),
    }
}

/// One past the last IPv4 address: spans are half-open `[start, end)` in u64 so the whole
/// space has an end.
const FULL: u64 = 1 << 32;

fn span(net: &Ipv4Net) -> (u64, u64) {
    let start = u64::from(u32::from(net.network()));
    (start, start + (1u64 << (32 - net.prefix_len())))
}

/// Sorted, disjoint, non-adjacent spans covering the same addresses.
fn merge(mut spans: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    spans.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// The gaps between merged spans, within the whole space.
fn complement(merged: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut next = 0;
    for &(start, end) in merged {
        if start > next {
            out.push((next, start));
        }
        next = next.max(end);
    }
    if next < FULL {
        out.push((next, FULL));
    }
    out
}

/// The fewest CIDRs covering exactly `[start, end)`: at each step the largest block that is
/// aligned at `start` and fits.
fn cidrs(mut start: u64, end: u64) -> Vec<Ipv4Net> {
    let mut out = Vec::new();
    while start < end {
        let align = if start == 0 {
            32
        } else {
            start.trailing_zeros().min(32)
        };
        let fits = 63 - (end - start).leading_zeros();
        let bits = align.min(fits);
        let addr = Ipv4Addr::from(u32::try_from(start).unwrap_or(u32::MAX));
        // bits <= 32, so the prefix length is valid
        if let Ok(net) = Ipv4Net::new(addr, u8::try_from(32 - bits).unwrap_or(0)) {
            out.push(net);
        }
        start += 1 << bits;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<Ipv4Net> {
        list.iter().map(|s| parse_cidr(s).unwrap()).collect()
    }

    fn strings(list: &[Ipv4Net]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    /// The union of the routes, address by address at every block boundary: the routes
    /// cover exactly what is not excluded, plus the extras.
    fn covers(routes: &[Ipv4Net], addr: Ipv4Addr) -> bool {
        routes.iter().any(|n| n.contains(&addr))
    }

    #[test]
    fn the_intranet_alone_gives_the_shipped_list() {
        assert_eq!(
            strings(&destinations(&nets(&["10.0.0.0/8"]), &[])),
            [
                "0.0.0.0/5",
                "8.0.0.0/7",
                "11.0.0.0/8",
                "12.0.0.0/6",
                "16.0.0.0/4",
                "32.0.0.0/3",
                "64.0.0.0/2",
                "128.0.0.0/1"
            ]
        );
    }

    #[test]
    fn several_overlapping_and_duplicate_excludes_aggregate_first() {
        let one = destinations(&nets(&["10.0.0.0/8", "192.168.0.0/16"]), &[]);
        let messy = destinations(
            &nets(&[
                "192.168.0.0/16",
                "10.0.0.0/8",
                "10.1.0.0/16",
                "192.168.24.0/22",
                "10.0.0.0/8",
            ]),
            &[],
        );
        assert_eq!(one, messy);
        for a in [
            "10.0.0.0",
            "10.255.255.255",
            "192.168.0.0",
            "192.168.255.255",
        ] {
            assert!(!covers(&one, a.parse().unwrap()), "{a} is excluded");
        }
        for a in [
            "9.255.255.255",
            "11.0.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "0.0.0.0",
            "255.255.255.255",
        ] {
            assert!(covers(&one, a.parse().unwrap()), "{a} is routed");
        }
        // address order, no overlaps
        assert!(one.windows(2).all(|w| w[0].broadcast() < w[1].network()));
        // 7 routes below 128.0.0.0 (as for 10/8 alone), 15 for 128.0.0.0/1 minus 192.168/16
        assert_eq!(one.len(), 7 + 15, "{:?}", strings(&one));
    }

    #[test]
    fn adjacent_excludes_merge() {
        // 10.0.0.0/8 and 11.0.0.0/8 are 10.0.0.0/7
        assert_eq!(
            destinations(&nets(&["10.0.0.0/8", "11.0.0.0/8"]), &[]),
            destinations(&nets(&["10.0.0.0/7"]), &[])
        );
    }

    #[test]
    fn the_edges_of_the_address_space() {
        let top = destinations(&nets(&["255.255.255.254/32"]), &[]);
        assert_eq!(top.len(), 32, "{:?}", strings(&top));
        assert_eq!(top[0].to_string(), "0.0.0.0/1");
        assert_eq!(top[31].to_string(), "255.255.255.255/32");
        let bottom = destinations(&nets(&["0.0.0.0/32"]), &[]);
        assert_eq!(bottom.len(), 32, "{:?}", strings(&bottom));
        assert_eq!(bottom[0].to_string(), "0.0.0.1/32");
        assert_eq!(bottom[31].to_string(), "128.0.0.0/1");
    }

    #[test]
    fn excluding_everything_routes_nothing() {
        assert!(destinations(&nets(&["0.0.0.0/0"]), &[]).is_empty());
        assert!(destinations(&nets(&["0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/8"]), &[]).is_empty());
    }

    #[test]
    fn excluding_nothing_routes_two_halves_not_a_default_route() {
        assert_eq!(
            strings(&destinations(&[], &[])),
            ["0.0.0.0/1", "128.0.0.0/1"]
        );
        // an extra that fills the only hole gives the same
        assert_eq!(
            strings(&destinations(
                &nets(&["10.33.0.10/32"]),
                &nets(&["10.33.0.10/32"])
            )),
            ["0.0.0.0/1", "128.0.0.0/1"]
        );
    }

    #[test]
    fn an_extra_inside_the_excludes_is_kept_and_a_covered_one_dropped() {
        let plain = destinations(&nets(&["10.0.0.0/8"]), &[]);
        let with = destinations(
            &nets(&["10.0.0.0/8"]),
            &nets(&["10.33.0.10/32", "1.1.1.1/32"]),
        );
        let mut want = plain.clone();
        want.push(parse_cidr("10.33.0.10/32").unwrap());
        want.sort();
        assert_eq!(with, want);
        assert!(!with.iter().any(|n| n.to_string() == "1.1.1.1/32"));
        // an extra larger than an excluded range routes all of it: only the other remains
        let straddle = destinations(
            &nets(&["10.0.0.0/8", "192.168.0.0/16"]),
            &nets(&["10.0.0.0/7"]),
        );
        assert_eq!(straddle, destinations(&nets(&["192.168.0.0/16"]), &[]));
    }

    #[test]
    fn the_reserved_ranges_complement_leaves_them_all_out() {
        let reserved = gateway_route_manager::egress::reserved_ranges();
        let routes = destinations(&reserved, &[]);
        for r in &reserved {
            assert!(
                !covers(&routes, r.network()) && !covers(&routes, r.broadcast()),
                "{r}"
            );
            // just outside each reserved range is routed unless another reserved range is there
            let after = u32::from(r.broadcast()).checked_add(1).map(Ipv4Addr::from);
            if let Some(a) = after.filter(|a| !reserved.iter().any(|n| n.contains(a))) {
                assert!(covers(&routes, a), "{a}");
            }
        }
        assert!(covers(&routes, "1.1.1.1".parse().unwrap()));
        assert!(routes.windows(2).all(|w| w[0].broadcast() < w[1].network()));
    }

    #[test]
    fn the_list_is_minimal() {
        // no two routes are the halves of one block (those would be one route)
        let routes = destinations(&gateway_route_manager::egress::reserved_ranges(), &[]);
        for w in routes.windows(2) {
            let joined = w[0].supernet().filter(|s| w[1].supernet() == Some(*s));
            assert!(joined.is_none(), "{} and {} make one route", w[0], w[1]);
        }
    }

    #[test]
    fn via_adds_a_gw_to_every_route() {
        let via = parse_via("192.168.26.254").unwrap();
        let json =
            serde_json::to_value(nad_routes(&nets(&["10.0.0.0/8"]), &[], Some(via))).unwrap();
        let routes = json["routes"].as_array().unwrap();
        assert_eq!(routes.len(), 8);
        assert!(routes.iter().all(|r| r["gw"] == "192.168.26.254"));
        assert_eq!(
            routes[0],
            serde_json::json!({"dst": "0.0.0.0/5", "gw": "192.168.26.254"})
        );
        let bare = serde_json::to_value(nad_routes(&nets(&["10.0.0.0/8"]), &[], None)).unwrap();
        assert_eq!(bare["routes"][7], serde_json::json!({"dst": "128.0.0.0/1"}));
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(
            parse_cidr("10.0.0.1/8"),
            Err(NadRoutesError::HostBits {
                value: "10.0.0.1/8".into(),
                network: "10.0.0.0/8".parse().unwrap()
            })
        );
        for v in ["10.0.0.0", "10.0.0.0/33", "ten/8", ""] {
            let e = parse_cidr(v).unwrap_err();
            assert!(matches!(e, NadRoutesError::Syntax { .. }), "{v}: {e}");
            assert!(e.to_string().contains(&format!("{v:?}")), "{e}");
        }
        assert!(matches!(
            parse_cidr("fd00::/8"),
            Err(NadRoutesError::Ipv6 { .. })
        ));
        assert!(matches!(
            parse_via("fe80::1"),
            Err(NadRoutesError::Ipv6 { .. })
        ));
        assert!(matches!(
            parse_via("192.168.26.254/22"),
            Err(NadRoutesError::Address { .. })
        ));
    }
}
