//! The lab's address plan: the reference topology of DESIGN.md plus the lab-only pieces
//! (pod network, node, "Internet" on TEST-NET-3). Pure functions, no I/O.

use std::net::Ipv4Addr;

/// Prefix length of the VPN gateway network 192.168.24.0/22.
pub const GW_NET_PREFIX: u8 = 22;
/// MTU of the VPN gateway network (a VXLAN in the real deployment).
pub const GW_NET_MTU: u32 = 1420;
/// The egress VIP: the client pods' next hop.
pub const EGRESS_VIP: Ipv4Addr = Ipv4Addr::new(192, 168, 26, 254);
/// VRRP router id the lab configures.
pub const VRID: u8 = 51;
/// First per-gateway ingress VIP (gateway i owns start+i).
pub const INGRESS_VIP_START: Ipv4Addr = Ipv4Addr::new(192, 168, 26, 128);
/// The Internet echo service (HTTP on :80, TCP echo on :7, UDP echo on :7).
pub const INTERNET_ECHO: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The Internet DNS server (BIND) for DDNS.
pub const INTERNET_DNS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
/// The node's public address: anything the Internet sees from here leaked past the VPN.
pub const NODE_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The node's address on the pod network (routers' and clients' eth0 gateway).
pub const NODE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// Port ingress pods listen on (virtual server `port-1`: port and real_port).
pub const INGRESS_PORT: u16 = 6666;
/// gluetun control server port.
pub const GLUETUN_PORT: u16 = 8000;
/// gluetun health server port.
pub const GLUETUN_HEALTH_PORT: u16 = 9999;
/// vpn-router api port in the lab.
pub const ROUTER_API_PORT: u16 = 9090;
/// Zone the lab's DNS server is primary for; DDNS writes `vpn.<zone>`.
pub const DNS_ZONE: &str = "lab.test";
/// Hostname the routers keep updated.
pub const DDNS_HOSTNAME: &str = "vpn.lab.test";

fn add(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    Ipv4Addr::from(u32::from(base).saturating_add(n))
}

/// Router k on the gateway network.
pub fn router_gw(k: usize) -> Ipv4Addr {
    add(Ipv4Addr::new(192, 168, 26, 1), k)
}
/// Router k on the VRRP advert network.
pub fn router_vrrp(k: usize) -> Ipv4Addr {
    add(Ipv4Addr::new(192, 168, 28, 1), k)
}
/// Router k on the pod network (its own default route: the leak path).
pub fn router_pod(k: usize) -> Ipv4Addr {
    add(Ipv4Addr::new(10, 244, 1, 1), k)
}
/// Gateway i on the gateway network.
pub fn gateway(i: usize) -> Ipv4Addr {
    add(Ipv4Addr::new(192, 168, 25, 128), i)
}
/// Gateway i's "public" address (its VPN exit IP).
pub fn gateway_public(i: usize) -> Ipv4Addr {
    add(Ipv4Addr::new(203, 0, 113, 10), i)
}
/// Gateway i on the pod network (a gluetun pod's eth0).
pub fn gateway_pod(i: usize) -> Ipv4Addr {
    add(Ipv4Addr::new(10, 244, 3, 1), i)
}
/// The port a provider with dynamic port forwarding first hands out to gateway i (and the
/// permissive gateway's forwarded port).
pub fn gateway_forwarded_port(i: usize) -> u16 {
    40000u16.saturating_add(u16::try_from(i).unwrap_or(u16::MAX))
}
/// Gateway i's ingress VIP (held by the master router).
pub fn ingress_vip(i: usize) -> Ipv4Addr {
    add(INGRESS_VIP_START, i)
}
/// Ordinary client pod j on the gateway network.
pub fn client(j: usize) -> Ipv4Addr {
    add(Ipv4Addr::new(192, 168, 24, 1), j)
}
/// Client pod j on the pod network (intranet side).
pub fn client_pod(j: usize) -> Ipv4Addr {
    add(Ipv4Addr::new(10, 244, 2, 1), j)
}
/// Ingress pod m for forwarded port 1 (192.168.27.0/28).
pub fn ingress_pod(m: usize) -> Ipv4Addr {
    add(Ipv4Addr::new(192, 168, 27, 1), m)
}
/// The real-server CIDR of virtual server `port-1`.
pub const INGRESS_POD_CIDR: &str = "192.168.27.0/28";
/// Largest number of ingress pods that fit in the /28 (hosts .1-.14).
pub const MAX_INGRESS_PODS: usize = 14;
/// Largest number of gateways the reference topology names (192.168.25.128-135).
pub const MAX_GATEWAYS: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_matches_design() {
        assert_eq!(gateway(3), Ipv4Addr::new(192, 168, 25, 131));
        assert_eq!(ingress_vip(2), Ipv4Addr::new(192, 168, 26, 130));
        assert_eq!(router_gw(1), Ipv4Addr::new(192, 168, 26, 2));
        assert_eq!(router_vrrp(0), Ipv4Addr::new(192, 168, 28, 1));
        assert_eq!(client(0), Ipv4Addr::new(192, 168, 24, 1));
        assert_eq!(ingress_pod(0), Ipv4Addr::new(192, 168, 27, 1));
        assert_eq!(gateway_public(1), Ipv4Addr::new(203, 0, 113, 11));
        assert_eq!(gateway_forwarded_port(2), 40002);
    }
}
