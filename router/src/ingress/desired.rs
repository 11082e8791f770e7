//! The IPVS state the `ingress` section asks for: which services exist (one per virtual
//! address × protocol of every virtual server), which real servers are candidates (every host
//! of a configured network), and — given each real server's health — the destinations and
//! weights to write. Pure: no sockets, no clock, no kernel.
//!
//! Services exist on every router whatever its VRRP role (the VIP decides who receives), and
//! the same inputs give the same services on every router. Quiesced servers (weight 0) stay in
//! the destination list, so an `mh` service's list is fixed by the config alone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use ipvs::{
    DesiredService, Destination, ForwardMethod, Protocol, Service, ServiceFlags, ServiceKey,
};

use crate::config::{self, Gateways, Ingress, OnFailure, SchedulerFlag, VsAddresses};

/// The weight of a healthy real server (the config has no per-server weights).
pub const UP_WEIGHT: u32 = 1;

/// More candidates than this in one virtual server is a config mistake (a /16 is 65534 hosts,
/// each checked every interval); the engine refuses to start.
pub const MAX_CANDIDATES: usize = 4096;

/// A real server of one virtual server: its address (checks and destinations use it with the
/// virtual server's `real_port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct RealServerId {
    /// Index of the virtual server in `ingress.virtual_servers`.
    pub vs: usize,
    pub addr: IpAddr,
}

/// One virtual server as the engine runs it.
#[derive(Debug, Clone)]
pub struct VirtualServerPlan {
    pub name: String,
    /// The services, sorted by key.
    pub services: Vec<Service>,
    /// Candidate real servers, sorted (IPv4 before IPv6, then by address).
    pub candidates: Vec<IpAddr>,
    pub real_port: u16,
    pub on_failure: OnFailure,
    pub check: config::RealServerCheck,
}

/// Every virtual server of the `ingress` section.
#[derive(Debug, Clone)]
pub struct IngressPlan {
    pub virtual_servers: Vec<VirtualServerPlan>,
    /// Addresses the daemon holds (every gateway's ingress VIP, the VRRP virtual IPs) where
    /// services are ours even when no virtual server uses the address any more, so removing a
    /// virtual server from the config removes its services.
    pub also_owned: BTreeSet<IpAddr>,
    /// Addresses of `local_route: true` virtual servers: every router routes them to itself.
    pub local_routes: BTreeSet<Ipv4Addr>,
    /// Whose address is the local routes' source (`gateways.interface`).
    pub local_src_interface: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("ingress.virtual_servers `{vs}`: addresses: gateway_ingress_vips needs a `gateways` section; list the addresses instead")]
    NoGateways { vs: String },
    #[error("ingress.virtual_servers `{vs}`: real_servers name {count} hosts (more than {max}); use smaller networks")]
    TooManyCandidates {
        vs: String,
        count: usize,
        max: usize,
    },
}

/// Every host of `net`: for an IPv4 network without its network and broadcast addresses
/// (a /31 and /32 keep all of theirs), for IPv6 every address but the subnet-router anycast
/// (a /127 and /128 keep all). Stops early past `limit` hosts.
pub fn hosts(net: &IpNet, limit: usize) -> Vec<IpAddr> {
    let mut out = Vec::new();
    match net {
        IpNet::V4(n) => {
            let first = u32::from(n.network());
            let last = u32::from(n.broadcast());
            let (from, to) = if n.prefix_len() >= 31 {
                (first, last)
            } else {
                (first + 1, last - 1)
            };
            let mut a = from;
            while a <= to && out.len() <= limit {
                out.push(IpAddr::V4(a.into()));
                if a == u32::MAX {
                    break;
                }
                a += 1;
            }
        }
        IpNet::V6(n) => {
            let first = u128::from(n.network());
            let last = u128::from(n.broadcast());
            let from = if n.prefix_len() >= 127 {
                first
            } else {
                first + 1
            };
            let mut a = from;
            while a <= last && out.len() <= limit {
                out.push(IpAddr::V6(a.into()));
                if a == u128::MAX {
                    break;
                }
                a += 1;
            }
        }
    }
    out
}

fn protocol(p: config::Protocol) -> Protocol {
    match p {
        config::Protocol::Tcp => Protocol::Tcp,
        config::Protocol::Udp => Protocol::Udp,
        config::Protocol::Sctp => Protocol::Sctp,
    }
}

/// The virtual addresses of a virtual server.
pub fn virtual_addresses(
    vs: &config::VirtualServer,
    gateways: Option<&Gateways>,
) -> Result<Vec<IpAddr>, PlanError> {
    let mut out: Vec<IpAddr> = match &vs.addresses.value {
        VsAddresses::GatewayIngressVips => gateways
            .ok_or_else(|| PlanError::NoGateways {
                vs: vs.name.value.clone(),
            })?
            .ingress_vips()
            .into_iter()
            .map(IpAddr::V4)
            .collect(),
        VsAddresses::List(l) => l.clone(),
    };
    out.sort();
    out.dedup();
    Ok(out)
}

/// Maps the config to the plan the engine runs.
pub fn plan(ingress: &Ingress, gateways: Option<&Gateways>) -> Result<IngressPlan, PlanError> {
    let mut virtual_servers = Vec::new();
    let mut local_routes = BTreeSet::new();
    for vs in &ingress.virtual_servers {
        let name = vs.name.value.clone();
        let mut flags = ServiceFlags::empty();
        for f in &vs.scheduler_flags {
            flags = flags
                | match f {
                    SchedulerFlag::Fallback => ServiceFlags::FALLBACK,
                    SchedulerFlag::Port => ServiceFlags::PORT,
                };
        }
        let mut services = Vec::new();
        for addr in virtual_addresses(vs, gateways)? {
            if let (true, IpAddr::V4(a)) = (vs.local_route.value, addr) {
                local_routes.insert(a);
            }
            for p in &vs.protocols {
                let key = ServiceKey::Addr {
                    protocol: protocol(*p),
                    addr: SocketAddr::new(addr, vs.port),
                };
                services.push(Service::new(key, vs.scheduler.clone()).with_flags(flags));
            }
        }
        services.sort_by_key(|s| s.key);
        services.dedup_by_key(|s| s.key);
        let mut candidates = BTreeSet::new();
        for net in &vs.real_servers {
            for h in hosts(net, MAX_CANDIDATES) {
                candidates.insert(h);
            }
            if candidates.len() > MAX_CANDIDATES {
                return Err(PlanError::TooManyCandidates {
                    vs: name,
                    count: candidates.len(),
                    max: MAX_CANDIDATES,
                });
            }
        }
        virtual_servers.push(VirtualServerPlan {
            name,
            services,
            candidates: candidates.into_iter().collect(),
            real_port: vs.real_port,
            on_failure: vs.on_failure,
            check: vs.health_check.clone(),
        });
    }
    let also_owned = gateways
        .map(|g| g.ingress_vips().into_iter().map(IpAddr::V4).collect())
        .unwrap_or_default();
    Ok(IngressPlan {
        virtual_servers,
        also_owned,
        local_routes,
        local_src_interface: gateways.map(|g| g.interface.clone()),
    })
}

impl IngressPlan {
    /// Every real server to check, in a stable order.
    pub fn real_servers(&self) -> Vec<RealServerId> {
        self.virtual_servers
            .iter()
            .enumerate()
            .flat_map(|(vs, v)| {
                v.candidates
                    .iter()
                    .map(move |&addr| RealServerId { vs, addr })
            })
            .collect()
    }

    /// Adds addresses whose services are ours (the VRRP virtual IPs).
    pub fn with_owned(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.also_owned.extend(addrs);
        self
    }

    /// The virtual addresses of every service plus [`Self::also_owned`]: IPVS services on
    /// these addresses are ours (a service not configured any more is deleted); services on
    /// any other address are left alone.
    pub fn owned_addresses(&self) -> BTreeSet<IpAddr> {
        self.virtual_servers
            .iter()
            .flat_map(|v| v.services.iter())
            .filter_map(|s| match s.key {
                ServiceKey::Addr { addr, .. } => Some(addr.ip()),
                ServiceKey::Fwmark { .. } => None,
            })
            .chain(self.also_owned.iter().copied())
            .collect()
    }

    /// The services and destinations for the given health: `up(server)` is true when the
    /// server passes its checks. A server that is not up gets weight 0 (`quiesce`) or is left
    /// out (`remove`).
    pub fn desired(&self, up: impl Fn(RealServerId) -> bool) -> Vec<DesiredService> {
        let mut out = Vec::new();
        for (vs, v) in self.virtual_servers.iter().enumerate() {
            let mut dests = Vec::new();
            for &addr in &v.candidates {
                let healthy = up(RealServerId { vs, addr });
                let weight = match (healthy, v.on_failure) {
                    (true, _) => UP_WEIGHT,
                    (false, OnFailure::Quiesce) => 0,
                    (false, OnFailure::Remove) => continue,
                };
                dests.push(Destination::new(
                    SocketAddr::new(addr, v.real_port),
                    ForwardMethod::Masquerade,
                    weight,
                ));
            }
            for s in &v.services {
                out.push(DesiredService {
                    service: s.clone(),
                    destinations: dests.clone(),
                });
            }
        }
        out
    }
}

/// The weights of one desired state, by service then destination (for /status and tests).
pub fn weights(desired: &[DesiredService]) -> BTreeMap<ServiceKey, BTreeMap<SocketAddr, u32>> {
    desired
        .iter()
        .map(|d| {
            (
                d.service.key,
                d.destinations.iter().map(|x| (x.addr, x.weight)).collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::path::Path;

    fn load(yaml: &str) -> crate::config::Config {
        match crate::config::load_str(Path::new("t.yaml"), yaml) {
            Ok(l) => l.config,
            Err(e) => panic!("{}", e.lines().join("\n")),
        }
    }

    const BASE: &str = "
gateways:
  interface: gw0
  addresses: 192.168.25.128-192.168.25.131
  ingress_vip_start: 192.168.26.128
ingress:
  virtual_servers:
    - name: port-1
      port: 6666
      protocols: [tcp, udp]
      addresses: gateway_ingress_vips
      scheduler: mh
      scheduler_flags: [fallback, port]
      real_servers: [192.168.27.0/28]
      real_port: 7777
    - name: dns
      port: 53
      protocols: [udp]
      addresses: [192.168.26.254]
      scheduler: rr
      real_servers: [192.168.27.130, 192.168.27.128/32, 192.168.27.129]
      health_check: { type: dns, query: example.com }
      on_failure: remove
";

    fn the_plan() -> IngressPlan {
        let c = load(BASE);
        plan(c.ingress.as_ref().unwrap(), c.gateways.as_ref()).unwrap()
    }

    #[test]
    fn hosts_of_networks() {
        let h = hosts(&"192.168.27.0/28".parse().unwrap(), 100);
        assert_eq!(h.len(), 14);
        assert_eq!(h[0], "192.168.27.1".parse::<IpAddr>().unwrap());
        assert_eq!(h[13], "192.168.27.14".parse::<IpAddr>().unwrap());
        assert_eq!(
            hosts(&"10.0.0.7/32".parse().unwrap(), 100),
            vec!["10.0.0.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(hosts(&"10.0.0.6/31".parse().unwrap(), 100).len(), 2);
        assert_eq!(hosts(&"fd00::/126".parse().unwrap(), 100).len(), 3);
        assert_eq!(hosts(&"fd00::5/128".parse().unwrap(), 100).len(), 1);
        // The limit bounds the work on a huge network.
        assert_eq!(hosts(&"10.0.0.0/8".parse().unwrap(), 10).len(), 11);
        assert_eq!(hosts(&"255.255.255.254/31".parse().unwrap(), 10).len(), 2);
    }

    #[test]
    fn one_service_per_address_and_protocol_with_mh_flags() {
        let p = the_plan();
        let v = &p.virtual_servers[0];
        assert_eq!(v.services.len(), 8);
        let s = &v.services[0];
        assert_eq!(s.scheduler, "mh");
        assert_eq!(s.flags.bits(), 0x18);
        let keys: Vec<String> = v.services.iter().map(|s| s.key.to_string()).collect();
        assert!(
            keys.contains(&"TCP 192.168.26.128:6666".to_owned()),
            "{keys:?}"
        );
        assert!(
            keys.contains(&"UDP 192.168.26.131:6666".to_owned()),
            "{keys:?}"
        );
        assert_eq!(v.candidates.len(), 14);
        let dns = &p.virtual_servers[1];
        assert_eq!(dns.services.len(), 1);
        assert_eq!(dns.services[0].flags.bits(), 0);
        assert_eq!(dns.services[0].key.to_string(), "UDP 192.168.26.254:53");
        // Sorted whatever the config order.
        let c: Vec<String> = dns.candidates.iter().map(|a| a.to_string()).collect();
        assert_eq!(c, ["192.168.27.128", "192.168.27.129", "192.168.27.130"]);
        let owned = p.owned_addresses();
        assert_eq!(owned.len(), 5);
        let more = the_plan().with_owned(["192.168.26.253".parse().unwrap()]);
        assert_eq!(more.owned_addresses().len(), 6);
        assert!(owned.contains(&IpAddr::V4(Ipv4Addr::new(192, 168, 26, 254))));
        assert_eq!(p.real_servers().len(), 17);
    }

    #[test]
    fn health_sets_weights_quiesce_and_remove() {
        let p = the_plan();
        let down: Vec<IpAddr> = ["192.168.27.3", "192.168.27.129"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let d = p.desired(|id| !down.contains(&id.addr));
        assert_eq!(d.len(), 9);
        let w = weights(&d);
        let tcp = &w[&ServiceKey::tcp("192.168.26.130:6666".parse().unwrap())];
        assert_eq!(tcp.len(), 14, "quiesce keeps every candidate");
        assert_eq!(tcp[&"192.168.27.3:7777".parse().unwrap()], 0);
        assert_eq!(tcp[&"192.168.27.4:7777".parse().unwrap()], UP_WEIGHT);
        let dns = &w[&ServiceKey::udp("192.168.26.254:53".parse().unwrap())];
        assert_eq!(dns.len(), 2, "remove leaves the failed server out");
        assert!(!dns.contains_key(&"192.168.27.129:53".parse().unwrap()));
        for s in &d {
            for x in &s.destinations {
                assert_eq!(x.forward, ForwardMethod::Masquerade);
            }
            let addrs: Vec<SocketAddr> = s.destinations.iter().map(|x| x.addr).collect();
            let mut sorted = addrs.clone();
            sorted.sort();
            assert_eq!(addrs, sorted, "destinations in sorted order");
        }
        // Same inputs, same output: every router computes the same state.
        assert_eq!(d, the_plan().desired(|id| !down.contains(&id.addr)));
    }

    #[test]
    fn too_many_candidates_is_refused() {
        let c = load(&BASE.replace(
            "[192.168.27.0/28]",
            "[10.0.0.0/22, 10.0.4.0/22, 10.0.8.0/22, 10.0.12.0/22, 10.0.16.0/22]",
        ));
        let e = plan(c.ingress.as_ref().unwrap(), c.gateways.as_ref()).unwrap_err();
        assert!(e.to_string().contains("port-1"), "{e}");
    }
}
