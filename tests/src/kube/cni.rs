//! What Multus does for a pod with the NADs of deploy/: parses the pod's
//! `k8s.v1.cni.cncf.io/networks` annotation and each NetworkAttachmentDefinition's CNI config
//! (a `bridge` plugin with `whereabouts` IPAM, optionally followed by `tuning`), allocates the
//! address as whereabouts does (the lowest free one of range_start..range_end, with the
//! range's prefix length), and plugs the pod in: a veth whose pod side has the attachment's
//! interface name, the bridge's MTU on both ends, the address, the IPAM routes (via the route's
//! `gw`, else the IPAM `gateway`, else on-link, as the bridge plugin installs them) and the
//! tuning plugin's sysctls with `IFNAME` replaced by the interface name.
//!
//! A CNI key this does not implement is an error naming it, unless it is one that cannot change
//! what the pod sees on one node (listed in [`IGNORED_BRIDGE_KEYS`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::Value;

use super::manifests::Object;
use super::KubeError;
use crate::netns::Netns;

/// One item of the Multus annotation: `[namespace/]name[@interface]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub namespace: String,
    pub network: String,
    pub interface: String,
}

/// Parses `k8s.v1.cni.cncf.io/networks` (the comma-separated short form). An item without
/// `@interface` gets Multus' default name `net<N>`.
pub fn multus_annotation(text: &str, pod_namespace: &str) -> Result<Vec<Attachment>, KubeError> {
    let mut out = Vec::new();
    for (n, item) in text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
    {
        if item.starts_with('[') {
            return Err(KubeError::Unsupported {
                what: "the JSON form of the Multus annotation".into(),
            });
        }
        let (net, ifname) = match item.split_once('@') {
            Some((a, b)) => (a, b.to_string()),
            None => (item, format!("net{}", n + 1)),
        };
        let (ns, name) = net.split_once('/').unwrap_or((pod_namespace, net));
        out.push(Attachment {
            namespace: ns.to_string(),
            network: name.to_string(),
            interface: ifname,
        });
    }
    Ok(out)
}

/// A route the bridge plugin installs from the IPAM result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gw: Option<Ipv4Addr>,
}

/// The parts of a bridge + whereabouts (+ tuning) attachment that shape the pod's network.
#[derive(Debug, Clone)]
pub struct Network {
    pub name: String,
    pub bridge: String,
    pub mtu: u32,
    /// whereabouts `range`: the prefix length of the pod's address, and the pool's identity.
    pub range: Ipv4Net,
    pub range_start: Ipv4Addr,
    pub range_end: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub routes: Vec<Route>,
    /// tuning plugin's `sysctl`, keys with `IFNAME` still in them.
    pub tuning: BTreeMap<String, String>,
}

/// Bridge keys that only matter across nodes or for features this run does not need; they
/// are accepted and reported as not honoured.
const IGNORED_BRIDGE_KEYS: &[&str] = &["hairpinMode", "promiscMode", "macspoofchk"];
const BRIDGE_KEYS: &[&str] = &["type", "name", "cniVersion", "bridge", "mtu", "ipam"];
const WHEREABOUTS_KEYS: &[&str] = &[
    "type",
    "range",
    "range_start",
    "range_end",
    "gateway",
    "routes",
];

fn bad(o: &Object, msg: impl Into<String>) -> KubeError {
    KubeError::Manifest {
        file: o.source.clone(),
        msg: format!("{}: {}", o.describe(), msg.into()),
    }
}

fn addr(o: &Object, v: &Value, what: &str) -> Result<Ipv4Addr, KubeError> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(o, format!("{what}: {v} is not an IPv4 address")))
}

/// Parses a NetworkAttachmentDefinition's `spec.config`.
pub fn parse_nad(o: &Object) -> Result<Network, KubeError> {
    let text = o.doc["spec"]["config"]
        .as_str()
        .ok_or_else(|| bad(o, "no spec.config"))?;
    let cfg: Value =
        serde_json::from_str(text).map_err(|e| bad(o, format!("spec.config is not JSON: {e}")))?;
    let plugins: Vec<Value> = match cfg.get("plugins") {
        Some(Value::Array(p)) => p.clone(),
        Some(_) => return Err(bad(o, "plugins is not a list")),
        None => vec![cfg.clone()],
    };
    let mut bridge = None;
    let mut tuning = BTreeMap::new();
    for p in &plugins {
        match p["type"].as_str() {
            Some("bridge") => bridge = Some(p.clone()),
            Some("tuning") => {
                for (k, _) in p.as_object().into_iter().flatten() {
                    if !["type", "name", "cniVersion", "sysctl"].contains(&k.as_str()) {
                        return Err(bad(o, format!("tuning key {k:?} is not implemented here")));
                    }
                }
                for (k, v) in p["sysctl"].as_object().into_iter().flatten() {
                    let v = v.as_str().ok_or_else(|| {
                        bad(o, format!("tuning sysctl {k}: the value must be a string"))
                    })?;
                    tuning.insert(k.clone(), v.to_string());
                }
            }
            other => {
                return Err(bad(
                    o,
                    format!("CNI plugin type {other:?} is not implemented here"),
                ))
            }
        }
    }
    let b = bridge.ok_or_else(|| bad(o, "no bridge plugin"))?;
    for k in b.as_object().into_iter().flatten().map(|(k, _)| k.as_str()) {
        if !BRIDGE_KEYS.contains(&k) && !IGNORED_BRIDGE_KEYS.contains(&k) {
            return Err(bad(o, format!("bridge key {k:?} is not implemented here")));
        }
    }
    let ipam = &b["ipam"];
    if ipam["type"] != "whereabouts" {
        return Err(bad(o, "only whereabouts IPAM is implemented here"));
    }
    for k in ipam
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.as_str())
    {
        if !WHEREABOUTS_KEYS.contains(&k) {
            return Err(bad(
                o,
                format!("whereabouts key {k:?} is not implemented here"),
            ));
        }
    }
    let range: Ipv4Net = ipam["range"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(o, "whereabouts range is not an IPv4 CIDR"))?;
    let hosts = (
        Ipv4Addr::from(u32::from(range.network()) + 1),
        Ipv4Addr::from(u32::from(range.broadcast()).saturating_sub(1)),
    );
    let range_start = match ipam.get("range_start") {
        Some(v) => addr(o, v, "range_start")?,
        None => hosts.0,
    };
    let range_end = match ipam.get("range_end") {
        Some(v) => addr(o, v, "range_end")?,
        None => hosts.1,
    };
    let gateway = ipam
        .get("gateway")
        .map(|v| addr(o, v, "gateway"))
        .transpose()?;
    let mut routes = Vec::new();
    for r in ipam["routes"].as_array().into_iter().flatten() {
        let dst = r["dst"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(o, format!("route {r}: dst is not an IPv4 CIDR")))?;
        let gw = r.get("gw").map(|v| addr(o, v, "route gw")).transpose()?;
        routes.push(Route { dst, gw });
    }
    let mtu = b["mtu"]
        .as_u64()
        .and_then(|m| u32::try_from(m).ok())
        .unwrap_or(1500);
    Ok(Network {
        name: o.name.clone(),
        bridge: b["bridge"]
            .as_str()
            .ok_or_else(|| bad(o, "bridge plugin without bridge name"))?
            .to_string(),
        mtu,
        range,
        range_start,
        range_end,
        gateway,
        routes,
        tuning,
    })
}

/// whereabouts' allocations, one pool per `range` (attachments that share a range share the
/// pool, as whereabouts keys its IPPool by range).
#[derive(Debug, Default)]
pub struct Pools {
    used: BTreeMap<Ipv4Net, BTreeSet<Ipv4Addr>>,
}

impl Pools {
    /// The lowest free address of `net`'s range_start..range_end.
    pub fn allocate(&mut self, net: &Network) -> Result<Ipv4Addr, KubeError> {
        let used = self.used.entry(net.range).or_default();
        let (a, b) = (u32::from(net.range_start), u32::from(net.range_end));
        let free = (a..=b)
            .map(Ipv4Addr::from)
            .find(|x| !used.contains(x))
            .ok_or_else(|| KubeError::Unsupported {
                what: format!("{}: whereabouts range exhausted", net.name),
            })?;
        used.insert(free);
        Ok(free)
    }

    pub fn release(&mut self, net: &Network, a: Ipv4Addr) {
        if let Some(u) = self.used.get_mut(&net.range) {
            u.remove(&a);
        }
    }
}

/// Plugs the pod namespace `pod` into `net` as `ifname` with `address`: the veth's other end
/// `port` goes into the bridge in `switch`.
pub fn plug(
    switch: &Netns,
    pod: &Netns,
    port: &str,
    ifname: &str,
    net: &Network,
    address: Ipv4Addr,
) -> Result<(), KubeError> {
    let mtu = net.mtu;
    switch.ip_batch(&[format!(
        "link add {port} mtu {mtu} type veth peer name {ifname} mtu {mtu} netns {}",
        pod.name()
    )])?;
    switch.ip_batch(&[format!("link set {port} master {} up", net.bridge)])?;
    let mut lines = vec![
        format!("addr add {address}/{} dev {ifname}", net.range.prefix_len()),
        format!("link set {ifname} up"),
    ];
    for r in &net.routes {
        match r.gw.or(net.gateway) {
            Some(gw) => lines.push(format!("route add {} via {gw} dev {ifname}", r.dst)),
            None => lines.push(format!("route add {} dev {ifname}", r.dst)),
        }
    }
    pod.ip_batch(&lines)?;
    for (k, v) in &net.tuning {
        pod.sysctl(&k.replace("IFNAME", ifname), v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn annotation_items() {
        let a = multus_annotation(
            "vpn-net-routers@vpn-gw-veth0, other/vpn-net-vrrp",
            "vpn-gateway",
        )
        .unwrap();
        assert_eq!(a[0].namespace, "vpn-gateway");
        assert_eq!(a[0].interface, "vpn-gw-veth0");
        assert_eq!(
            (a[1].namespace.as_str(), a[1].network.as_str()),
            ("other", "vpn-net-vrrp")
        );
        assert_eq!(a[1].interface, "net2");
    }

    #[test]
    fn shipped_nads_parse_and_pools_hand_out_lowest_first() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let objs = super::super::manifests::render(&deploy.join("base")).unwrap();
        let nads: Vec<Network> = objs
            .iter()
            .filter(|o| o.kind == "NetworkAttachmentDefinition")
            .map(|o| parse_nad(o).unwrap())
            .collect();
        let clients = nads.iter().find(|n| n.name == "vpn-net-clients").unwrap();
        assert_eq!(clients.gateway, Some(Ipv4Addr::new(192, 168, 26, 254)));
        assert!(clients
            .routes
            .iter()
            .any(|r| r.dst.contains(&Ipv4Addr::new(1, 1, 1, 1))));
        let routers = nads.iter().find(|n| n.name == "vpn-net-routers").unwrap();
        assert_eq!(
            routers
                .tuning
                .get("net.ipv4.conf.IFNAME.arp_announce")
                .map(String::as_str),
            Some("2")
        );
        let mut pools = Pools::default();
        let a = pools.allocate(routers).unwrap();
        let b = pools.allocate(routers).unwrap();
        assert_eq!(
            (a, b),
            (
                routers.range_start,
                Ipv4Addr::from(u32::from(routers.range_start) + 1)
            )
        );
        pools.release(routers, a);
        assert_eq!(pools.allocate(routers).unwrap(), a);
    }

    /// The resolver example's attachment has no ipam gateway: every route names its `gw` (the
    /// egress VIP), the cluster DNS stays off it, and the tuning plugin's `all.` key is kept
    /// as written (only `IFNAME` is replaced when plugged).
    #[test]
    fn resolver_nad_routes_carry_their_own_gw() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let objs = super::super::manifests::render(&deploy.join("examples/resolver")).unwrap();
        let o = objs
            .iter()
            .find(|o| o.kind == "NetworkAttachmentDefinition" && o.name == "vpn-net-dns")
            .unwrap();
        let dns = parse_nad(o).unwrap();
        let vip = Ipv4Addr::new(192, 168, 26, 254);
        assert_eq!(dns.gateway, None);
        assert!(dns.routes.iter().all(|r| r.gw == Some(vip)));
        let via = |a: Ipv4Addr| dns.routes.iter().any(|r| r.dst.contains(&a));
        assert!(via(Ipv4Addr::new(1, 1, 1, 1)));
        assert!(via(Ipv4Addr::new(192, 168, 24, 5)));
        assert!(!via(Ipv4Addr::new(10, 33, 0, 10)));
        assert!(!via(Ipv4Addr::new(192, 168, 26, 1)));
        assert_eq!(
            (dns.range_start, dns.range_end),
            (
                Ipv4Addr::new(192, 168, 27, 128),
                Ipv4Addr::new(192, 168, 27, 130)
            )
        );
        assert!(dns
            .tuning
            .contains_key("net.ipv4.conf.all.accept_redirects"));
    }
}
