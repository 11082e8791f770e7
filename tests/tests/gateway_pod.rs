//! The shipped gateway example (deploy/examples/gateways) as the lab runs it: gluetun's
//! firewall as gluetun builds it, then the example's init script, post-rules and port
//! forwarding commands, taken from the manifests (tests/src/gluetun_pod.rs). As root, on the
//! netns lab with the real `vpn-router`.
//!
//! - With the example as shipped: clients' egress leaves through the tunnel with the gateway's
//!   public IP, the routers' probes pass, a connection to a forwarded port reaches the
//!   gateway's ingress VIP and the answer returns through the same gateway, nothing leaks.
//! - With the example broken the way a user could break it (the FORWARD accepts gone from the
//!   post-rules), the same lab forwards nothing: the probes fail, clients get no answer, and
//!   still nothing leaks. This is the check that the first test can fail.
//! - Dynamic port forwarding: the provider hands out a port, gluetun runs the example's UP
//!   command, the routers show the port in `/status` and the metrics; a new port replaces it
//!   (DOWN, then UP) and the old one forwards nothing any more.
//!
//! Without IPVS on this kernel the routers' answer on the ingress VIP is a TCP reset (no
//! virtual server); it proves the path both ways. tests/vm/test-ingress.sh runs the whole
//! ingress path through these gateways on an IPVS kernel.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::unwrap_used
)]

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lab::gluetun_pod::GatewayPodSpec;
use lab::{topo, GatewayKind, Lab, LabBuilder, PortForwarding};

const LAB_BIN: &str = env!("CARGO_BIN_EXE_vpn-router-lab");
const GATEWAYS: usize = 2;
const BOUND: Duration = Duration::from_secs(8);

fn builder() -> LabBuilder {
    Lab::builder()
        .lab_bin(LAB_BIN)
        .gateways(GATEWAYS)
        .routers(1)
        .clients(1)
        .ingress_pods(0)
        .dns(false)
}

fn wait_for(lab: &Lab, what: &str, ok: impl Fn(&Lab) -> bool) {
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        if ok(lab) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "waited {BOUND:?} for {what}; router 0 gateways: {:?}\nrouter log:\n{}\ngateway 0 pod:\n{}",
        lab.router(0).gateway_states(),
        lab.router_log_tails(20),
        lab.gateway(0).pod_log()
    );
}

fn states(lab: &Lab) -> Vec<String> {
    lab.router(0)
        .gateway_states()
        .unwrap_or_default()
        .into_iter()
        .map(|(_, s)| s)
        .collect()
}

/// Counts, in gateway `i`, the TCP SYNs it sends to its ingress VIP's virtual server port.
fn count_syns_to_vip(lab: &Lab, i: usize) {
    let g = lab.gateway(i);
    g.ns.nft(&format!(
        "table ip lab {{\n counter tovip {{ }}\n chain post {{\n  type filter hook postrouting priority 0; policy accept;\n  oifname \"{}\" ip daddr {} tcp dport {} tcp flags syn counter name \"tovip\"\n }}\n}}\n",
        g.lan_if(),
        topo::ingress_vip(i),
        topo::INGRESS_PORT
    ))
    .unwrap();
}

fn syns_to_vip(lab: &Lab, i: usize) -> u64 {
    lab::lab::counter_packets(&lab.gateway(i).ns, "tovip").unwrap()
}

/// A connection from the Internet host to gateway `i`'s public IP on `port`: Ok(()) when it
/// was answered (accepted, or reset by the router: no virtual server without IPVS), Err when
/// nothing answered.
fn connect_from_internet(lab: &Lab, i: usize, port: u16) -> Result<(), String> {
    let to = SocketAddr::from((topo::gateway_public(i), port));
    let r = lab
        .internet()
        .run_in(move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))
        .unwrap();
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(format!("{to}: {e}")),
    }
}

#[test]
fn the_example_gateway_carries_egress_probes_and_forwarded_ports() {
    let lab = builder().build().unwrap();
    wait_for(&lab, "both gateways healthy (probes pass)", |l| {
        states(l) == ["healthy", "healthy"]
    });
    let c = lab.client(0);
    let exit = c.exit_ip(Duration::from_secs(3)).unwrap();
    assert!(
        (0..GATEWAYS).any(|i| topo::gateway_public(i) == exit),
        "exit {exit} is no gateway's public IP"
    );
    for i in 0..GATEWAYS {
        count_syns_to_vip(&lab, i);
        let port = lab.gateway(i).forwarded_port().unwrap();
        connect_from_internet(&lab, i, port).unwrap_or_else(|e| {
            panic!(
                "gateway {i}'s forwarded port {port}: {e}\ngateway pod:\n{}",
                lab.gateway(i).pod_log()
            )
        });
        assert_eq!(
            syns_to_vip(&lab, i),
            1,
            "gateway {i} DNATed the forwarded port to its ingress VIP"
        );
    }
    // The fixed-port example: gluetun's own port forwarding is off, nothing to report.
    let st = lab.router(0).status().unwrap();
    for g in st["components"]["gateways"]["detail"]["gateways"]
        .as_array()
        .unwrap()
    {
        assert_eq!(g["forwarded_ports"], serde_json::json!([]), "{g}");
    }
    assert_eq!(lab.leaked_packets().unwrap(), 0, "{}", lab.leaked_flows());
}

#[test]
fn without_the_post_rules_forward_accepts_the_gateway_forwards_nothing() {
    let mut spec = GatewayPodSpec::load().unwrap();
    assert!(
        spec.drop_post_rules(|l| l.starts_with("iptables -A FORWARD")),
        "the example mounts no post-rules file"
    );
    let lab = builder()
        .gateway_kind(GatewayKind::GluetunSpec(Box::new(spec)))
        .build()
        .unwrap();
    wait_for(&lab, "both gateways unhealthy (their probes fail)", |l| {
        states(l) == ["unhealthy", "unhealthy"]
    });
    let st = lab.router(0).status().unwrap();
    for g in st["components"]["gateways"]["detail"]["gateways"]
        .as_array()
        .unwrap()
    {
        assert_eq!(g["last_reason_kind"], "probe_failed", "{g}");
    }
    assert!(
        lab.client(0).exit_ip(Duration::from_secs(1)).is_err(),
        "a client got out through gateways that forward nothing"
    );
    count_syns_to_vip(&lab, 0);
    let port = lab.gateway(0).forwarded_port().unwrap();
    assert!(connect_from_internet(&lab, 0, port).is_err());
    assert_eq!(syns_to_vip(&lab, 0), 0);
    assert_eq!(lab.leaked_packets().unwrap(), 0, "{}", lab.leaked_flows());
}

fn status_ports(lab: &Lab) -> Vec<serde_json::Value> {
    lab.router(0)
        .status()
        .ok()
        .and_then(|s| {
            s["components"]["gateways"]["detail"]["gateways"]
                .as_array()
                .map(|a| a.iter().map(|g| g["forwarded_ports"].clone()).collect())
        })
        .unwrap_or_default()
}

fn metric_lines(lab: &Lab, prefix: &str) -> Vec<String> {
    let r = lab.router(0).api_get("/metrics").unwrap();
    let mut v: Vec<String> = r
        .body
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[test]
fn dynamic_port_forwarding_follows_the_providers_port() {
    let lab = builder()
        .port_forwarding(PortForwarding::Dynamic)
        .build()
        .unwrap();
    let p0 = topo::gateway_forwarded_port(0);
    let p1 = topo::gateway_forwarded_port(1);
    wait_for(&lab, "the routers to read both gateways' ports", |l| {
        status_ports(l) == [serde_json::json!([p0]), serde_json::json!([p1])]
    });
    assert_eq!(
        metric_lines(&lab, "vpn_router_gateway_forwarded_port{"),
        [
            format!(
                "vpn_router_gateway_forwarded_port{{gateway=\"192.168.25.128\",port=\"{p0}\"}} 1"
            ),
            format!(
                "vpn_router_gateway_forwarded_port{{gateway=\"192.168.25.129\",port=\"{p1}\"}} 1"
            ),
        ]
    );
    count_syns_to_vip(&lab, 0);
    connect_from_internet(&lab, 0, p0)
        .unwrap_or_else(|e| panic!("{e}\ngateway pod:\n{}", lab.gateway(0).pod_log()));
    assert_eq!(syns_to_vip(&lab, 0), 1, "the UP command's DNAT");

    // The provider hands out another port: DOWN with the old one, UP with the new one.
    let new = p0 + 1000;
    lab.gateway(0).set_forwarded_ports(&[new]).unwrap();
    wait_for(&lab, "the routers to see the new port", |l| {
        status_ports(l).first() == Some(&serde_json::json!([new]))
    });
    assert_eq!(
        metric_lines(
            &lab,
            "vpn_router_gateway_forwarded_port{gateway=\"192.168.25.128\""
        ),
        [format!(
            "vpn_router_gateway_forwarded_port{{gateway=\"192.168.25.128\",port=\"{new}\"}} 1"
        )]
    );
    connect_from_internet(&lab, 0, new).unwrap();
    assert_eq!(syns_to_vip(&lab, 0), 2, "the new port is DNATed");
    let nat = lab
        .gateway(0)
        .ns
        .exec("iptables", &["-t", "nat", "-S", "PREROUTING"])
        .unwrap();
    assert!(
        !nat.contains(&format!("--dport {p0} ")),
        "the DOWN command left the old port's DNAT:\n{nat}"
    );
    let _ = connect_from_internet(&lab, 0, p0);
    assert_eq!(syns_to_vip(&lab, 0), 2, "the old port reaches nothing");
    assert_eq!(lab.leaked_packets().unwrap(), 0, "{}", lab.leaked_flows());
}
