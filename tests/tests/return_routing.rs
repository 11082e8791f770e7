//! Return routing in the daemon, as root, on the netns lab with 8 gateways and one router:
//! connections from the Internet host to each gateway's forwarded port (the gateway DNATs it
//! to ingress VIP i, where a service on the router itself answers — the host kernel has no
//! IPVS) all get their replies through the gateway they came in by, checked on the wire on
//! every gateway; without the mark, the kernel would route those replies elsewhere; and a
//! kill -9 + restart of the daemon keeps the established connections working without a
//! single kernel write (adoption).
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::unwrap_used
)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use lab::config::RouterTuning;
use lab::{topo, Lab};

const LAB_BIN: &str = env!("CARGO_BIN_EXE_vpn-router-lab");
const GATEWAYS: usize = 8;
const PER_GATEWAY: usize = 4;
const BOUND: Duration = Duration::from_secs(15);

fn logs(lab: &Lab) -> String {
    let log = std::fs::read_to_string(&lab.router(0).log_path).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn wait_for(lab: &Lab, what: &str, ok: impl Fn(&Lab) -> bool) {
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        if ok(lab) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("waited {BOUND:?} for {what}\n{}", logs(lab));
}

/// Gateways whose return path /status reports in force.
fn in_force(lab: &Lab) -> usize {
    lab.router(0)
        .status()
        .ok()
        .and_then(|s| {
            s["components"]["gateways"]["detail"]["return_routing"]["gateways"]
                .as_array()
                .map(|g| g.iter().filter(|g| g["in_force"] == true).count())
        })
        .unwrap_or(0)
}

fn holds_ingress_vips(lab: &Lab) -> bool {
    let addrs = lab
        .router(0)
        .ns
        .ip(&["-4", "-o", "addr", "show"])
        .unwrap_or_default();
    (0..GATEWAYS).all(|i| addrs.contains(&format!("inet {}/", topo::ingress_vip(i))))
}

/// An echo service on every address of `ns` (the ingress VIPs included), port 6666.
fn start_service(ns: &lab::netns::Netns) {
    let listener = ns
        .run_in(|| TcpListener::bind(("0.0.0.0", topo::INGRESS_PORT)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut out = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                let mut line = String::new();
                while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                    if out.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
}

/// Packets in a pcap file matching `filter`.
fn count_in(file: &std::path::Path, filter: &str) -> usize {
    let out = std::process::Command::new("tcpdump")
        .arg("-n")
        .arg("-r")
        .arg(file)
        .args(filter.split_whitespace())
        .stderr(std::process::Stdio::null())
        .output()
        .expect("tcpdump (apt-get install tcpdump)");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

struct Conn {
    gateway: usize,
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn echo(&mut self, text: &str) -> bool {
        if self
            .stream
            .write_all(format!("{text}\n").as_bytes())
            .is_err()
        {
            return false;
        }
        let mut line = String::new();
        matches!(self.reader.read_line(&mut line), Ok(n) if n > 0) && line.trim() == text
    }
}

/// From the Internet host: PER_GATEWAY connections to each gateway's forwarded port.
fn connect_all(lab: &Lab) -> Vec<Conn> {
    let ports: Vec<u16> = (0..GATEWAYS)
        .map(|i| lab.gateway(i).forwarded_port().unwrap())
        .collect();
    lab.internet()
        .run_in(|| {
            let mut out = Vec::new();
            for (i, port) in ports.iter().enumerate() {
                for _ in 0..PER_GATEWAY {
                    let to = SocketAddr::from((topo::gateway_public(i), *port));
                    let s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                        .unwrap_or_else(|e| panic!("connect to {to} (gateway {i}): {e}"));
                    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    out.push(Conn {
                        gateway: i,
                        reader: BufReader::new(s.try_clone().unwrap()),
                        stream: s,
                    });
                }
            }
            out
        })
        .unwrap()
}

/// Where the router's kernel sends a reply of `vip:6666 -> peer` with `mark` (0: none).
fn reply_route(lab: &Lab, vip: Ipv4Addr, peer: SocketAddr, mark: u32) -> String {
    let (port, mark) = (peer.port().to_string(), format!("{mark:#x}"));
    let peer_ip = peer.ip().to_string();
    let vip = vip.to_string();
    let sport = topo::INGRESS_PORT.to_string();
    lab.router(0)
        .ns
        .ip(&[
            "-o", "route", "get", &peer_ip, "from", &vip, "ipproto", "tcp", "sport", &sport,
            "dport", &port, "mark", &mark,
        ])
        .unwrap_or_else(|e| format!("error: {e}"))
}

fn lab(mode: &str) -> Lab {
    let lab = Lab::builder()
        .lab_bin(LAB_BIN)
        .gateways(GATEWAYS)
        .routers(1)
        .clients(1)
        .ingress_pods(0)
        .dns(false)
        .tuning(RouterTuning {
            egress_mode: mode.into(),
            checks: vec!["vpn_status".into(), "public_ip".into()],
            log_level: "debug".into(),
            ..RouterTuning::default()
        })
        .build()
        .unwrap_or_else(|e| panic!("building the lab failed: {e}"));
    wait_for(
        &lab,
        "the router to hold the 8 ingress VIPs",
        holds_ingress_vips,
    );
    wait_for(&lab, "return routing in force for 8 gateways", |l| {
        in_force(l) == GATEWAYS
    });
    lab
}

/// Opens the connections of `connect_all`, echoes once on each while every gateway's `lan_if`
/// is captured, and returns how many were answered, the connections, and per gateway
/// (index, replies seen on its wire, of which from its own ingress VIP).
fn echo_through_every_gateway(lab: &Lab) -> (usize, Vec<Conn>, Vec<(usize, usize, usize)>) {
    let captures: Vec<_> = lab
        .gateways()
        .iter()
        .map(|g| lab.capture(&g.ns, g.lan_if(), "tcp src port 6666").unwrap())
        .collect();
    let mut conns = connect_all(lab);
    let answered = conns
        .iter_mut()
        .map(|c| {
            let g = c.gateway;
            c.echo(&format!("hello through {g}"))
        })
        .filter(|ok| *ok)
        .count();
    std::thread::sleep(Duration::from_millis(300));
    let mut on_wire = Vec::new();
    for (i, cap) in captures.into_iter().enumerate() {
        let file = cap.file.clone();
        let total = cap.stop_and_count("").unwrap();
        let own = count_in(&file, &format!("src host {}", topo::ingress_vip(i)));
        on_wire.push((i, total, own));
    }
    (answered, conns, on_wire)
}

#[test]
fn replies_leave_through_the_gateway_they_came_in_by() {
    let lab = lab("ecmp");
    start_service(&lab.router(0).ns);

    let (answered, mut conns, on_wire) = echo_through_every_gateway(&lab);
    eprintln!(
        "per gateway (index, replies seen on its gw0, of which from its own VIP): {on_wire:?}"
    );
    assert_eq!(
        answered,
        GATEWAYS * PER_GATEWAY,
        "every connection gets its echo back"
    );
    for (i, total, own) in &on_wire {
        assert!(*total > 0, "gateway {i} saw no reply at all");
        assert_eq!(
            total, own,
            "gateway {i} carried replies of another gateway's VIP"
        );
    }

    // Without the mark the kernel would have routed every one of these replies elsewhere.
    let mut elsewhere = 0;
    for c in &conns {
        let vip = topo::ingress_vip(c.gateway);
        let peer = c.stream.local_addr().unwrap();
        let gw = topo::gateway(c.gateway).to_string();
        let marked = reply_route(&lab, vip, peer, 0x1900 + u32::try_from(c.gateway).unwrap());
        assert!(marked.contains(&format!("via {gw} ")), "{marked}");
        if !reply_route(&lab, vip, peer, 0).contains(&format!("via {gw} ")) {
            elsewhere += 1;
        }
    }
    eprintln!(
        "unmarked, {elsewhere} of {} replies would not leave through their gateway",
        conns.len()
    );
    assert!(
        elsewhere * 2 > conns.len(),
        "{elsewhere} of {}",
        conns.len()
    );

    // kill -9 and restart: established connections keep working, and the new daemon adopts
    // the kernel state without writing anything.
    lab.router(0).restart().unwrap();
    wait_for(&lab, "the restarted router's return routing", |l| {
        in_force(l) == GATEWAYS
    });
    let metrics = lab.router(0).api_get("/metrics").unwrap().body;
    let writes: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("vpn_router_return_routing_changes_total"))
        .collect();
    assert!(
        writes.is_empty(),
        "the restarted daemon rewrote return routing: {writes:?}"
    );
    let kept = conns
        .iter_mut()
        .map(|c| c.echo("after restart"))
        .filter(|ok| *ok)
        .count();
    eprintln!(
        "after kill -9 + restart: {kept} of {} connections still work",
        conns.len()
    );
    assert_eq!(kept, conns.len());
}

/// Forwarded replies (the IPVS path: the service runs behind the router) in
/// `egress.mode: consistent`: the ingress ct-mark rule must win over the per-packet bucket
/// hashing, or most replies would leave through another gateway. The router DNATs the ingress
/// VIPs to a client pod with conntrack, as IPVS does with `net.ipv4.vs.conntrack=1`; the host
/// kernel has no IPVS.
#[test]
fn forwarded_replies_keep_their_gateway_in_consistent_mode() {
    let lab = lab("consistent");
    wait_for(&lab, "the bucket map", |l| {
        l.router(0).status().ok().and_then(|s| {
            s["components"]["gateways"]["detail"]["return_routing"]["consistent"]["unassigned"]
                .as_u64()
        }) == Some(0)
    });
    let pod = topo::client(0);
    lab.router(0)
        .ns
        .nft(&format!(
            "table ip rrtest {{\n  chain pre {{\n    type nat hook prerouting priority -100;\n    \
             ip daddr {}-{} tcp dport {} dnat to {pod}:{}\n  }}\n}}\n",
            topo::ingress_vip(0),
            topo::ingress_vip(GATEWAYS - 1),
            topo::INGRESS_PORT,
            topo::INGRESS_PORT
        ))
        .unwrap();
    // The NAT stands in for IPVS (not in this kernel). IPVS routes what it sends to a real
    // server with an output lookup without the packet's mark (ip_vs_xmit.c zeroes its flowi4):
    // the main table. The forwarded, DNATed packet would instead be routed by the gateway
    // mark the router gives the connection, back to the gateway.
    lab.router(0)
        .ns
        .ip(&[
            "rule",
            "add",
            "to",
            &format!("{pod}/32"),
            "lookup",
            "main",
            "priority",
            "900",
        ])
        .unwrap();
    start_service(&lab.client(0).ns);
    // The router's NAT has put the VIP back as the source: a reply on gateway i's wire from
    // another gateway's VIP would have been routed by the bucket hash.
    let (answered, _conns, on_wire) = echo_through_every_gateway(&lab);
    eprintln!(
        "consistent mode, forwarded replies per gateway (index, packets, from its own VIP): {on_wire:?}"
    );
    assert_eq!(
        answered,
        GATEWAYS * PER_GATEWAY,
        "every forwarded connection gets its echo back\n{}",
        logs(&lab)
    );
    for (i, total, own) in &on_wire {
        assert!(*total > 0, "gateway {i} carried no reply");
        assert_eq!(
            total, own,
            "gateway {i} carried replies of another gateway's VIP"
        );
    }
    // Client egress is still hashed: the pod's own flows spread over the gateways.
    let flows = lab
        .client(0)
        .open_flows(32, Duration::from_secs(3))
        .unwrap();
    assert_eq!(flows.flows.len(), 32);
    assert!(flows.by_exit().len() > 1, "{:?}", flows.by_exit());
}
