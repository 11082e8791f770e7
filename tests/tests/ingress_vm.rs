//! Ingress on a real IPVS kernel (run by tests/vm/test-ingress.sh inside the VM; this host's
//! kernel has no IPVS): the lab's whole ingress path — Internet host → gateway i (DNAT of its
//! forwarded port to ingress VIP i) → the real `vpn-router` (IPVS mh over the ingress pods) →
//! ingress pod → reply back through gateway i — for several gateways at once; a real server
//! stopped and restored; DNS through the egress VIP to resolver pods.
//!
//! `#[ignore]`d so that `cargo test` on a host without IPVS does not run it; the VM script runs
//! it with `--ignored`. Prints `RESULT key=value` lines with what it measured.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use lab::config::RouterTuning;
use lab::netns::Netns;
use lab::{topo, Lab};

const LAB_BIN: &str = env!("CARGO_BIN_EXE_vpn-router-lab");
const GATEWAYS: usize = 3;
const PODS: usize = 4;
/// Resolver pods for the DNS virtual server on the egress VIP (192.168.27.128/31).
const RESOLVERS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(192, 168, 27, 128),
    Ipv4Addr::new(192, 168, 27, 129),
];
/// Everything in the VM is 5-10x slower (TCG): generous bounds.
const BOUND: Duration = Duration::from_secs(30);

fn tuning() -> RouterTuning {
    RouterTuning {
        egress_mode: "ecmp".into(),
        checks: vec!["vpn_status".into(), "public_ip".into()],
        health_interval: Duration::from_millis(500),
        health_timeout: Duration::from_millis(300),
        log_level: "info".into(),
        ..RouterTuning::default()
    }
}

const DNS_VS: &str = "    - name: dns
      port: 53
      protocols: [udp]
      addresses: [192.168.26.254]
      scheduler: mh
      scheduler_flags: [fallback, port]
      real_servers: [192.168.27.128/31]
      real_port: 53
      health_check: { type: dns, query: resolver.lab.test, interval: 1s, timeout: 500ms, rise: 1, fall: 2 }
      on_failure: remove
";

fn wait_for<T>(what: &str, lab: &Lab, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, t0.elapsed());
        }
        if t0.elapsed() > BOUND {
            let log = std::fs::read_to_string(&lab.router(0).log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let st = lab
                .router(0)
                .status()
                .map(|s| s.to_string())
                .unwrap_or_default();
            panic!(
                "timed out waiting for {what}\n/status: {st}\nrouter log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `ingress` entry of router 0's /status: real server address → (state, weight) of one
/// virtual server, and whether the engine is ready.
/// Real server `addr:port` → (state, weight), as /status shows them.
type ServerStates = BTreeMap<String, (String, Option<u64>)>;

fn real_servers(lab: &Lab, vs: &str) -> Option<(bool, ServerStates)> {
    real_servers_on(lab, 0, vs)
}

fn real_servers_on(lab: &Lab, k: usize, vs: &str) -> Option<(bool, ServerStates)> {
    let st = lab.router(k).status().ok()?;
    let ing = &st["components"]["ingress"];
    let ready = ing["ready"].as_bool()?;
    let v = ing["detail"]["virtual_servers"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == vs)?;
    let m = v["real_servers"]
        .as_array()?
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap_or("").to_owned(),
                (
                    r["state"].as_str().unwrap_or("").to_owned(),
                    r["weight"].as_u64(),
                ),
            )
        })
        .collect();
    Some((ready, m))
}

fn pod_addr(m: usize) -> String {
    format!("{}:{}", topo::ingress_pod(m), topo::INGRESS_PORT)
}

/// A connection from the Internet host to gateway i's forwarded port, opened but with no
/// request sent yet (the pod's HTTP server waits up to 10 s for it).
fn open_held(inet: &Netns, i: usize) -> std::io::Result<TcpStream> {
    let to = SocketAddr::from((topo::gateway_public(i), topo::gateway_forwarded_port(i)));
    inet.run_in(move || TcpStream::connect_timeout(&to, Duration::from_secs(3)))
        .map_err(std::io::Error::other)?
}

/// Sends `GET /whoami` on an open connection; returns (server name, peer the pod saw).
fn whoami_on(mut s: TcpStream) -> Result<(String, String), String> {
    // Generous: under TCG on a busy host a pod can stall for seconds.
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
    whoami_read(&mut s).map_err(|e| format!("client port {port}: {e}"))
}

fn whoami_read(s: &mut TcpStream) -> Result<(String, String), String> {
    s.write_all(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .ok_or_else(|| format!("no body in {text:?}"))?;
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body:?}"))?;
    Ok((
        v["server"].as_str().unwrap_or("").to_owned(),
        v["peer"].as_str().unwrap_or("").to_owned(),
    ))
}

fn whoami(inet: &Netns, i: usize) -> Result<(String, String), String> {
    whoami_on(open_held(inet, i).map_err(|e| format!("connect via gateway {i}: {e}"))?)
}

/// IPVS connections on router 0: client source port → real server (from `ipvsadm -Lnc`).
fn ipvs_conns(lab: &Lab) -> BTreeMap<u16, String> {
    let out = lab
        .router(0)
        .ns
        .exec("ipvsadm", &["-Lnc"])
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 6 || f[0] != "TCP" {
                return None;
            }
            let src: SocketAddr = f[3].parse().ok()?;
            Some((src.port(), f[5].to_owned()))
        })
        .collect()
}

/// A DNS answer for `resolver.lab.test`-style queries: one A record with the responder's own
/// address, so the client sees which resolver answered.
fn dns_reply(q: &[u8], me: Ipv4Addr) -> Option<Vec<u8>> {
    if q.len() < 17 {
        return None;
    }
    let mut r = q.to_vec();
    r[2] = 0x81;
    r[3] = 0x80;
    r[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
    r.extend_from_slice(&me.octets());
    Some(r)
}

/// Resolver pods: namespaces on the lab's gateway network, each with a tiny DNS responder.
struct Resolvers {
    ns: Vec<Netns>,
}

impl Drop for Resolvers {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = n.destroy();
        }
    }
}

fn start_resolvers(lab: &Lab) -> Resolvers {
    let prefix = lab.switch().name().trim_end_matches("-sw").to_owned();
    let mut out = Resolvers { ns: Vec::new() };
    for (k, addr) in RESOLVERS.iter().enumerate() {
        let ns = Netns::create(&format!("{prefix}-dns{k}")).unwrap();
        out.ns.push(ns.clone());
        lab.switch()
            .ip_batch(&[
                format!(
                    "link add g-dns{k} mtu {m} type veth peer name gw0 mtu {m} netns {}",
                    ns.name(),
                    m = topo::GW_NET_MTU
                ),
                format!("link set g-dns{k} master brgw up"),
            ])
            .unwrap();
        // Replies to clients on the same subnet must go back through the router, which undoes
        // the NAT (a direct reply would come from the resolver's own address).
        ns.ip_batch(&[
            format!("addr add {addr}/{} dev gw0", topo::GW_NET_PREFIX),
            "link set gw0 up".into(),
            "link set lo up".into(),
            format!("route add default via {} dev gw0", topo::EGRESS_VIP),
            format!("route add 192.168.24.0/24 via {} dev gw0", topo::EGRESS_VIP),
        ])
        .unwrap();
        ns.sysctl("net.ipv4.conf.all.accept_redirects", "0")
            .unwrap();
        ns.sysctl("net.ipv4.conf.gw0.accept_redirects", "0")
            .unwrap();
        let sock = ns
            .run_in(|| UdpSocket::bind("0.0.0.0:53"))
            .unwrap()
            .unwrap();
        let me = *addr;
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                if let Some(r) = dns_reply(&buf[..n], me) {
                    let _ = sock.send_to(&r, from);
                }
            }
        });
    }
    out
}

fn dns_query_via_vip(client: &Netns, id: u16) -> Result<Ipv4Addr, String> {
    let q = {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in ["resolver", "lab", "test"] {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    };
    client
        .run_in(move || -> Result<Ipv4Addr, String> {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let vip = SocketAddr::from((topo::EGRESS_VIP, 53));
            s.send_to(&q, vip).map_err(|e| e.to_string())?;
            let mut b = [0u8; 512];
            let (n, from) = s.recv_from(&mut b).map_err(|e| format!("no answer: {e}"))?;
            if from != vip {
                return Err(format!("answer from {from}, not from the VIP"));
            }
            if n < 4 || b[0..2] != id.to_be_bytes() {
                return Err("answer to another query".into());
            }
            Ok(Ipv4Addr::new(b[n - 4], b[n - 3], b[n - 2], b[n - 1]))
        })
        .map_err(|e| e.to_string())?
}

/// Return routing by hand (ct mark per ingress VIP → table per gateway), installed only when
/// the daemon does not do it yet (no rule at priority 1000 = rule_priority_base).
fn ensure_return_routing(lab: &Lab) -> bool {
    let r = &lab.router(0).ns;
    let rules = r.ip(&["-4", "rule", "show"]).unwrap_or_default();
    if rules.lines().any(|l| l.starts_with("1000:")) {
        return false;
    }
    let mut nft = String::from(
        "table ip ingress_test_rr {\n  chain pre {\n    type filter hook prerouting priority mangle; policy accept;\n",
    );
    let mut ip = Vec::new();
    for i in 0..GATEWAYS {
        let mark = 0x1900 + i;
        nft.push_str(&format!(
            "    ct state new ip daddr {} ct mark set {mark:#x}\n",
            topo::ingress_vip(i)
        ));
        ip.push(format!(
            "rule add fwmark {mark:#x} table {} priority {}",
            50 + i,
            1000 + i
        ));
        ip.push(format!(
            "route replace default via {} dev gw0 table {}",
            topo::gateway(i),
            50 + i
        ));
    }
    nft.push_str("    ct mark 0x1900-0x1907 meta mark set ct mark\n  }\n}\n");
    r.nft(&nft).unwrap();
    r.ip_batch(&ip).unwrap();
    true
}

/// What the routers, gateway 0 and the pods have, printed when a connection fails.
fn diag(lab: &Lab) -> String {
    let mut out = String::new();
    let mut items: Vec<(String, &Netns, &str, Vec<&str>)> = Vec::new();
    for r in lab.routers() {
        let k = r.index;
        items.push((
            format!("router {k} ip rule"),
            &r.ns,
            "ip",
            vec!["-4", "rule"],
        ));
        items.push((
            format!("router {k} ip addr"),
            &r.ns,
            "ip",
            vec!["-4", "-o", "addr"],
        ));
        items.push((
            format!("router {k} ipvsadm -Lnc"),
            &r.ns,
            "ipvsadm",
            vec!["-Lnc"],
        ));
        items.push((
            format!("router {k} ipvsadm -Ln"),
            &r.ns,
            "ipvsadm",
            vec!["-Ln"],
        ));
        items.push((
            format!("router {k} nft"),
            &r.ns,
            "nft",
            vec!["list", "ruleset"],
        ));
    }
    items.push((
        "gateway 0 nft".into(),
        &lab.gateway(0).ns,
        "nft",
        vec!["list", "ruleset"],
    ));
    for p in lab.ingress_pods() {
        items.push((
            format!("pod {} ss -tan", p.index),
            &p.ns,
            "ss",
            vec!["-tan"],
        ));
    }
    for (what, ns, prog, args) in items {
        let got = ns.exec(prog, &args).unwrap_or_else(|e| format!("({e})"));
        out.push_str(&format!("--- {what}:\n{got}\n"));
    }
    for r in lab.routers() {
        let log = std::fs::read_to_string(&r.log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        out.push_str(&format!(
            "--- router {} log:\n{}\n",
            r.index,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    out
}

fn block_pod(lab: &Lab, m: usize, on: bool) {
    let ns = &lab.ingress_pod(m).ns;
    if on {
        ns.nft(&format!(
            "table inet ingress_test_stop {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    tcp dport {} tcp flags & (syn | ack) == syn reject with tcp reset\n  }}\n}}\n",
            topo::INGRESS_PORT
        ))
        .unwrap();
    } else {
        ns.nft("delete table inet ingress_test_stop\n").unwrap();
    }
}

#[test]
#[ignore = "needs a kernel with IPVS: run tests/vm/test-ingress.sh"]
fn ingress_path_through_gateways_with_ipvs() {
    assert!(
        lab::lab::ipvs_available(),
        "this kernel has no IPVS (no /proc/net/ip_vs): run this test in the VM with tests/vm/test-ingress.sh"
    );
    let router_bin = Path::new(LAB_BIN).with_file_name("vpn-router");
    let t_build = Instant::now();
    let lab = Lab::builder()
        .lab_bin(LAB_BIN)
        .router_bin(&router_bin)
        .gateways(GATEWAYS)
        .routers(2)
        .clients(1)
        .ingress_pods(PODS)
        .dns(false)
        .start_routers(false)
        .tuning(tuning())
        .build()
        .unwrap_or_else(|e| panic!("building the lab failed: {e}"));
    let resolvers = start_resolvers(&lab);
    for r in lab.routers() {
        r.rewrite_config(|y| {
            assert!(y.contains("rise: 1, fall: 2"), "lab config changed:\n{y}");
            let y = y.replace("rise: 1, fall: 2", "rise: 2, fall: 2");
            // The DNS virtual server goes right after port-1 (still inside `ingress:`).
            let at = y
                .find("      on_failure: quiesce\n")
                .expect("port-1 in the lab config")
                + "      on_failure: quiesce\n".len();
            format!("{}{DNS_VS}{}", &y[..at], &y[at..])
        })
        .unwrap();
    }
    for r in lab.routers() {
        r.start().unwrap();
    }
    println!("RESULT lab_setup_s={:.2}", t_build.elapsed().as_secs_f64());

    // Ready: VIPs held, every ingress pod up (weight 1), the two resolvers in.
    let (_, t_ready) = wait_for(
        "router 0 to be master and every real server up",
        &lab,
        || {
            let (ready, m) = real_servers(&lab, "port-1")?;
            let up = (0..PODS).all(|p| {
                m.get(&pod_addr(p))
                    .is_some_and(|s| s.0 == "up" && s.1 == Some(1))
            });
            let (_, d) = real_servers(&lab, "dns")?;
            let dns_up = d.values().filter(|s| s.0 == "up").count() == RESOLVERS.len();
            let backup_ready = real_servers_on(&lab, 1, "port-1")?.0;
            (ready && backup_ready && up && dns_up && lab.router(0).holds_egress_vip())
                .then_some(())
        },
    );
    println!("RESULT ready_after_start_s={:.2}", t_ready.as_secs_f64());
    // The backup router has the same services, destinations, weights and destination order
    // (the order the maglev table is built from) as the master.
    let (_, t_same) = wait_for(
        "the backup's IPVS table to equal the master's",
        &lab,
        || {
            let a = lab.router(0).ns.exec("ipvsadm", &["-Ln"]).ok()?;
            let b = lab.router(1).ns.exec("ipvsadm", &["-Ln"]).ok()?;
            (a == b).then_some(())
        },
    );
    println!(
        "RESULT backup_ipvs_identical_after_s={:.2}",
        t_same.as_secs_f64()
    );
    let (_, m) = real_servers(&lab, "port-1").unwrap();
    // Quiesce keeps every candidate of the /28 (14 hosts) with weight 0 when not up.
    assert_eq!(m.len(), 14, "{m:?}");
    assert_eq!(
        m.values().filter(|s| s.1 == Some(0)).count(),
        14 - PODS,
        "{m:?}"
    );
    let ipvsadm = lab.router(0).ns.exec("ipvsadm", &["-Ln"]).unwrap();
    println!("ipvsadm -Ln on router 0:\n{ipvsadm}");
    assert!(ipvsadm.contains("mh (mh-fallback,mh-port)"), "{ipvsadm}");
    for i in 0..GATEWAYS {
        assert!(
            ipvsadm.contains(&format!("TCP  {}:6666", topo::ingress_vip(i))),
            "no service on ingress VIP {i}:\n{ipvsadm}"
        );
    }

    let hand_rr = ensure_return_routing(&lab);
    println!(
        "RESULT return_routing={}",
        if hand_rr { "by_hand_in_test" } else { "daemon" }
    );

    // 1. New connections through every gateway reach the ingress pods; the pod sees the
    // Internet host's address; the reply comes back through the same gateway (else no answer).
    let inet = lab.internet().clone();
    let per_gateway = 12;
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let t1 = Instant::now();
    for i in 0..GATEWAYS {
        for _ in 0..per_gateway {
            let (server, peer) =
                whoami(&inet, i).unwrap_or_else(|e| panic!("gateway {i}: {e}\n{}", diag(&lab)));
            assert!(
                peer.starts_with(&format!("{}:", topo::INTERNET_ECHO)),
                "pod saw {peer}"
            );
            *served.entry(server).or_default() += 1;
        }
    }
    let n = GATEWAYS * per_gateway;
    println!(
        "RESULT new_connections={n} ok={n} mean_ms={:.1} spread={served:?}",
        t1.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    assert!(
        served.len() >= 2,
        "mh sent everything to one pod: {served:?}"
    );

    // UDP through a gateway too (the pods echo UDP on the same port).
    for i in 0..GATEWAYS {
        let to = SocketAddr::from((topo::gateway_public(i), topo::gateway_forwarded_port(i)));
        let got = inet
            .run_in(move || -> Result<String, String> {
                let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                s.send_to(b"hello-udp", to).map_err(|e| e.to_string())?;
                let mut b = [0u8; 64];
                let (n, from) = s.recv_from(&mut b).map_err(|e| format!("no echo: {e}"))?;
                if from != to {
                    return Err(format!("echo from {from}, expected {to}"));
                }
                Ok(String::from_utf8_lossy(&b[..n]).into_owned())
            })
            .unwrap();
        assert_eq!(got.as_deref(), Ok("hello-udp"), "UDP via gateway {i}");
    }

    // 2. Held connections (opened, no request yet) through every gateway.
    let mut held = Vec::new();
    for i in 0..GATEWAYS {
        for _ in 0..6 {
            let s = open_held(&inet, i).unwrap();
            let sport = s.local_addr().unwrap().port();
            held.push((i, sport, s));
        }
    }
    let conns = ipvs_conns(&lab);
    let owner: Vec<String> = held
        .iter()
        .map(|(_, sport, _)| conns.get(sport).cloned().unwrap_or_default())
        .collect();
    assert!(
        owner.iter().all(|o| !o.is_empty()),
        "held connections missing in ipvsadm -Lnc: {conns:?}"
    );
    // The victim: the pod holding the most held connections (it has at least one).
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &owner {
        *count.entry(o.as_str()).or_default() += 1;
    }
    let victim_addr = count
        .iter()
        .max_by_key(|(_, c)| **c)
        .map(|(a, _)| a.to_string())
        .unwrap();
    let victim = (0..PODS).find(|&p| pod_addr(p) == victim_addr).unwrap();
    let victim_name = format!("ingress-pod-{victim}");

    // 3. Stop the victim (new connections refused, as a stopped server would).
    let t_stop = Instant::now();
    block_pod(&lab, victim, true);
    let (_, t_down) = wait_for("the stopped pod to be quiesced (weight 0)", &lab, || {
        let (_, m) = real_servers(&lab, "port-1")?;
        let s = m.get(&victim_addr)?;
        (s.0 == "down" && s.1 == Some(0)).then_some(())
    });
    // The kernel has it at weight 0 too.
    let ipvsadm = lab.router(0).ns.exec("ipvsadm", &["-Ln"]).unwrap();
    assert!(
        ipvsadm
            .lines()
            .any(|l| l.contains(&format!("-> {victim_addr}")) && l.contains(" 0 ")),
        "{ipvsadm}"
    );
    println!("RESULT stop_to_quiesced_s={:.2}", t_down.as_secs_f64());

    let mut after: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..GATEWAYS {
        for _ in 0..per_gateway {
            let (server, _) = whoami(&inet, i)
                .unwrap_or_else(|e| panic!("after stop, gateway {i}: {e}\n{}", diag(&lab)));
            *after.entry(server).or_default() += 1;
        }
    }
    assert!(
        !after.contains_key(&victim_name),
        "new connections still reach the stopped pod: {after:?}"
    );
    println!("RESULT after_stop_new_connections={n} ok={n} spread={after:?}");

    // Held connections to the other pods: every one still answers, from the pod IPVS gave it
    // at the start. The stopped pod's own connections are not promised anything (the stop
    // here refuses only new connections, so they usually survive).
    let mut on_others = 0;
    let mut victims_answered = 0;
    for ((i, sport, s), o) in held.into_iter().zip(&owner) {
        if *o == victim_addr {
            victims_answered += usize::from(whoami_on(s).is_ok());
            continue;
        }
        let (server, _) = whoami_on(s).unwrap_or_else(|e| {
            panic!(
                "held connection via gateway {i} (port {sport}, on {o}) broke: {e}\n{}",
                diag(&lab)
            )
        });
        let expect = (0..PODS)
            .find(|&p| &pod_addr(p) == o)
            .map(|p| format!("ingress-pod-{p}"))
            .unwrap();
        assert_eq!(server, expect, "held connection moved");
        on_others += 1;
    }
    assert!(
        on_others > 0,
        "no held connection on the other pods: {owner:?}"
    );
    println!(
        "RESULT held_connections_on_other_pods_kept={on_others}/{on_others} on_stopped_pod_answered={victims_answered} held_for_s={:.2}",
        t_stop.elapsed().as_secs_f64()
    );

    // 4. Restore: up again after `rise` (2) good checks at a 1 s interval.
    let t_fix = Instant::now();
    block_pod(&lab, victim, false);
    let (_, t_up) = wait_for("the restored pod to be up again", &lab, || {
        let (_, m) = real_servers(&lab, "port-1")?;
        let s = m.get(&victim_addr)?;
        (s.0 == "up" && s.1 == Some(1)).then_some(())
    });
    println!(
        "RESULT restore_to_up_s={:.2} (rise 2, interval 1s)",
        t_up.as_secs_f64()
    );
    assert!(
        t_fix.elapsed() >= Duration::from_millis(800),
        "came back faster than two checks 1 s apart: {t_up:?}"
    );
    let mut back = false;
    for k in 0..(GATEWAYS * per_gateway * 2) {
        let (server, _) = whoami(&inet, k % GATEWAYS)
            .unwrap_or_else(|e| panic!("after restore: {e}\n{}", diag(&lab)));
        if server == victim_name {
            back = true;
            break;
        }
    }
    assert!(back, "the restored pod gets no new connections");

    // 5. DNS: a client pod asks the egress VIP; one of the resolvers answers (through IPVS).
    let client = lab.client(0).ns.clone();
    let mut answered: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for id in 0..20u16 {
        let a = dns_query_via_vip(&client, 0x4000 + id)
            .unwrap_or_else(|e| panic!("DNS via the egress VIP: {e}"));
        assert!(RESOLVERS.contains(&a), "answer {a}");
        answered.insert(a);
    }
    println!("RESULT dns_queries=20 ok=20 resolvers_seen={answered:?}");

    // 6. Router failover: the master's pod dies; the backup takes the VIPs and serves new
    // connections; connections opened through the old master continue on the same pod (same
    // maglev table on both routers, sloppy_tcp adopts them mid-stream).
    let mut held = Vec::new();
    for i in 0..GATEWAYS {
        for _ in 0..4 {
            let s = open_held(&inet, i).unwrap();
            let sport = s.local_addr().unwrap().port();
            held.push((i, sport, s));
        }
    }
    let conns = ipvs_conns(&lab);
    let owner: Vec<String> = held
        .iter()
        .map(|(_, sport, _)| conns.get(sport).cloned().unwrap_or_default())
        .collect();
    let metrics_before = lab.router(0).api_get("/metrics").unwrap().body;
    let t_kill = Instant::now();
    lab.router(0).kill_pod().unwrap();
    let (_, t_takeover) = wait_for("router 1 to take the VIPs", &lab, || {
        lab.router(1).holds_egress_vip().then_some(())
    });
    println!(
        "RESULT failover_vip_takeover_s={:.2}",
        t_takeover.as_secs_f64()
    );
    let mut kept = 0;
    let mut broken = Vec::new();
    for ((i, sport, s), o) in held.into_iter().zip(&owner) {
        let expect = (0..PODS)
            .find(|&p| &pod_addr(p) == o)
            .map(|p| format!("ingress-pod-{p}"))
            .unwrap_or_default();
        match whoami_on(s) {
            Ok((server, _)) if server == expect => kept += 1,
            Ok((server, _)) => broken.push(format!("gw {i} port {sport}: {expect} -> {server}")),
            Err(e) => broken.push(format!("gw {i} port {sport} on {expect}: {e}")),
        }
    }
    let n_held = owner.len();
    println!(
        "RESULT failover_held_connections_kept={kept}/{n_held} after_s={:.2} broken={broken:?}",
        t_kill.elapsed().as_secs_f64()
    );
    let mut served_new = 0;
    for i in 0..GATEWAYS {
        for _ in 0..per_gateway {
            let (server, _) = whoami(&inet, i)
                .unwrap_or_else(|e| panic!("after failover, gateway {i}: {e}\n{}", diag(&lab)));
            assert!(server.starts_with("ingress-pod-"));
            served_new += 1;
        }
    }
    println!("RESULT failover_new_connections={n} ok={served_new}");
    assert_eq!(
        kept, n_held,
        "connections broken by the router failover: {broken:?}"
    );

    // 7. Reload on the surviving router without the DNS virtual server: its service goes,
    // nothing else is written (the new engine adopts the kernel's state).
    let r1 = lab.router(1);
    let before = r1.api_get("/metrics").unwrap().body;
    let table_before: Vec<String> = r1
        .ns
        .exec("ipvsadm", &["-Ln"])
        .unwrap()
        .lines()
        .filter(|l| !l.contains(":53"))
        .map(str::to_owned)
        .collect();
    r1.rewrite_config(|y| y.replace(DNS_VS, "")).unwrap();
    r1.sighup();
    let (_, t_reload) = wait_for("the DNS service to go after the reload", &lab, || {
        let t = r1.ns.exec("ipvsadm", &["-Ln"]).ok()?;
        (!t.contains("192.168.26.254:53")).then_some(t)
    });
    let after = r1.api_get("/metrics").unwrap().body;
    let table_after: Vec<String> = r1
        .ns
        .exec("ipvsadm", &["-Ln"])
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    // Weights and order of port-1 unchanged (connection counters may differ).
    let strip = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(strip(&table_before), strip(&table_after));
    let writes = |m: &str, op: &str| -> u64 {
        m.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "vpn_router_ipvs_changes_total{{op=\"{op}\",result=\"ok\"}}"
                ))
            })
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0)
    };
    let mut delta = BTreeMap::new();
    for op in [
        "add_service",
        "update_service",
        "delete_service",
        "add_destination",
        "update_destination",
        "delete_destination",
    ] {
        delta.insert(op, writes(&after, op) - writes(&before, op));
    }
    println!(
        "RESULT reload_without_dns_s={:.2} writes={delta:?}",
        t_reload.as_secs_f64()
    );
    assert_eq!(delta["delete_service"], 1, "{delta:?}");
    assert_eq!(
        delta.values().sum::<u64>(),
        1,
        "the reload wrote more than the one delete: {delta:?}"
    );

    // Kernel counters reach /metrics (read before router 0 died).
    let metrics = metrics_before;
    for want in [
        "vpn_router_ipvs_destination_connections_total{virtual_server=\"port-1\"",
        "vpn_router_ingress_real_servers_up{virtual_server=\"port-1\"} 4",
        "vpn_router_ingress_check_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(want), "{want} not in /metrics:\n{metrics}");
    }
    drop(resolvers);
}
