//! Ingress on a real IPVS kernel (run by tests/vm/test-ingress.sh inside the VM; this host's
//! kernel has no IPVS): the lab's whole ingress path — Internet host → gateway i (DNAT of its
//! forwarded port to ingress VIP i) → the real `vpn-router` (IPVS mh over the ingress pods) →
//! ingress pod → reply back through gateway i — for several gateways at once; a real server
//! stopped and restored; DNS through the egress VIP to resolver pods. And DNS the way the
//! original design does it: on the cluster DNS IP (a `local_route` virtual server) to dnsmasq
//! resolver pods whose upstream queries leave through the gateways.
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
use lab::gluetun_pod::GatewayPodSpec;
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
/// The `hold` virtual server: a line service in every ingress pod (started by this test, no
/// idle timeout) for connections held open across a change.
const HOLD_PORT: u16 = 6667;
/// The gateways also forward this VPN port, to their ingress VIP's HOLD_PORT: one more
/// mapping in the example's PORT_MAPPINGS (the fixed-port kind of port forwarding).
const HOLD_FORWARDED_PORT: u16 = 40100;

/// The example gateways' PORT_MAPPINGS, with the hold mapping added.
fn port_mappings() -> String {
    let spec = GatewayPodSpec::load().unwrap();
    let example = spec.init_env("PORT_MAPPINGS").unwrap_or_default();
    format!("{example} {HOLD_FORWARDED_PORT}:{HOLD_PORT}")
}

/// The VPN port the example forwards to virtual server port-1 (the first of its mappings).
fn forwarded_port() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        let m = port_mappings();
        m.split(':').next().unwrap().trim().parse().unwrap()
    })
}
const HOLD_VS: &str = "    - name: hold
      port: 6667
      protocols: [tcp]
      addresses: gateway_ingress_vips
      scheduler: mh
      scheduler_flags: [fallback, port]
      real_servers: [192.168.27.0/28]
      real_port: 6667
      health_check: { type: tcp, interval: 1s, timeout: 900ms, rise: 2, fall: 2 }
      on_failure: quiesce
";

/// Slower than the lab's defaults: under TCG on a busy 2-core host the guest stalls for
/// hundreds of milliseconds, and 100 ms adverts or 150 ms gluetun timeouts then flap.
fn tuning() -> RouterTuning {
    RouterTuning {
        egress_mode: "ecmp".into(),
        checks: vec!["vpn_status".into(), "public_ip".into()],
        advert_interval: Duration::from_millis(500),
        health_interval: Duration::from_secs(1),
        health_timeout: Duration::from_millis(800),
        fall: 3,
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
      health_check: { type: dns, query: resolver.lab.test, interval: 1s, timeout: 900ms, rise: 1, fall: 2 }
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
    let to = SocketAddr::from((topo::gateway_public(i), forwarded_port()));
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
    /// Their processes (dnsmasq), stopped before the namespaces go.
    children: Vec<std::process::Child>,
}

impl Drop for Resolvers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.ns {
            let _ = n.destroy();
        }
    }
}

fn start_resolvers(lab: &Lab) -> Resolvers {
    let prefix = lab.switch().name().trim_end_matches("-sw").to_owned();
    let mut out = Resolvers {
        ns: Vec::new(),
        children: Vec::new(),
    };
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
            "table inet ingress_test_stop {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    tcp dport {{ {}, {HOLD_PORT} }} tcp flags & (syn | ack) == syn reject with tcp reset\n  }}\n}}\n",
            topo::INGRESS_PORT
        ))
        .unwrap();
    } else {
        ns.nft("delete table inet ingress_test_stop\n").unwrap();
    }
}

/// The Internet host's source address towards gateway i.
fn inet_source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 101 + i as u8)
}

/// One source address per gateway on the Internet host. With a single address the host may
/// use the same source port towards two gateways; both connections then reach the same pod
/// (IPVS behind different VIPs) with the same 4-tuple, and the pod refuses the second while
/// the first is in TIME-WAIT (seen: a connect timing out). A real remote client rarely talks
/// to two gateways of one deployment at once; the test does it all the time.
fn distinct_internet_sources(lab: &Lab) {
    let mut cmds = Vec::new();
    for i in 0..GATEWAYS {
        cmds.push(format!("addr add {}/24 dev wan0", inet_source(i)));
        cmds.push(format!(
            "route add {}/32 dev wan0 src {}",
            topo::gateway_public(i),
            inet_source(i)
        ));
    }
    lab.internet().ip_batch(&cmds).unwrap();
}

/// A line service in every ingress pod on HOLD_PORT: answers each line with the pod's name.
/// Runs on threads of this test process, on sockets bound inside the pods' namespaces. (The
/// gateways forward HOLD_FORWARDED_PORT to it: `port_mappings()`.)
fn start_hold_servers(lab: &Lab) {
    for p in lab.ingress_pods() {
        let l =
            p.ns.run_in(|| std::net::TcpListener::bind(("0.0.0.0", HOLD_PORT)))
                .unwrap()
                .unwrap();
        let name = format!("ingress-pod-{}", p.index);
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let name = name.clone();
                std::thread::spawn(move || {
                    let mut r = std::io::BufReader::new(c.try_clone().unwrap());
                    let mut line = String::new();
                    while std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) > 0 {
                        if c.write_all(format!("{name}\n").as_bytes()).is_err() {
                            return;
                        }
                        line.clear();
                    }
                });
            }
        });
    }
}

/// A connection from the Internet host through gateway i to the `hold` virtual server.
struct Held {
    gateway: usize,
    stream: TcpStream,
    reader: std::io::BufReader<TcpStream>,
    /// The pod that answered when it was opened.
    pod: String,
}

impl Held {
    fn open(inet: &Netns, i: usize) -> Result<Held, String> {
        let to = SocketAddr::from((topo::gateway_public(i), HOLD_FORWARDED_PORT));
        let stream = inet
            .run_in(move || TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("connect via gateway {i}: {e}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let reader = std::io::BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut h = Held {
            gateway: i,
            stream,
            reader,
            pod: String::new(),
        };
        h.pod = h.ask()?;
        Ok(h)
    }

    /// Who answers on this connection now.
    fn ask(&mut self) -> Result<String, String> {
        self.stream
            .write_all(b"who\n")
            .map_err(|e| format!("send: {e}"))?;
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut self.reader, &mut line)
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed".into());
        }
        Ok(line.trim().to_owned())
    }
}

fn open_held_all(lab: &Lab, inet: &Netns, per_gateway: usize) -> Vec<Held> {
    let mut out = Vec::new();
    for i in 0..GATEWAYS {
        for _ in 0..per_gateway {
            out.push(
                Held::open(inet, i).unwrap_or_else(|e| {
                    panic!("hold connection via gateway {i}: {e}\n{}", diag(lab))
                }),
            );
        }
    }
    out
}

/// Asks every held connection again: (answered by the same pod, broken or moved).
fn check_held(held: &mut [Held], skip_pod: Option<&str>) -> (usize, Vec<String>) {
    let mut kept = 0;
    let mut broken = Vec::new();
    for h in held.iter_mut() {
        if skip_pod == Some(h.pod.as_str()) {
            continue;
        }
        match h.ask() {
            Ok(p) if p == h.pod => kept += 1,
            Ok(p) => broken.push(format!("gw {}: {} -> {p}", h.gateway, h.pod)),
            Err(e) => broken.push(format!("gw {} on {}: {e}", h.gateway, h.pod)),
        }
    }
    (kept, broken)
}

/// IPVS writes by op, from a /metrics body.
fn writes(m: &str, op: &str) -> u64 {
    m.lines()
        .find(|l| {
            l.starts_with(&format!(
                "vpn_router_ipvs_changes_total{{op=\"{op}\",result=\"ok\"}}"
            ))
        })
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0)
}

/// Destination addresses of one service in kernel order, as `ipvsadm -Ln -t` lists them.
fn dests_of(r: &lab::lab::RouterNode, vip: Ipv4Addr, port: u16) -> Vec<String> {
    let t =
        r.ns.exec("ipvsadm", &["-Ln", "-t", &format!("{vip}:{port}")])
            .unwrap_or_default();
    t.lines()
        .filter(|l| l.trim_start().starts_with("-> 192."))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
        .collect()
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
        .port_mappings(port_mappings())
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
    start_hold_servers(&lab);
    distinct_internet_sources(&lab);
    for r in lab.routers() {
        r.rewrite_config(|y| {
            let lab_check = "interval: 1s, timeout: 500ms, rise: 1, fall: 2";
            assert!(y.contains(lab_check), "lab config changed:\n{y}");
            let y = y.replace(lab_check, "interval: 1s, timeout: 900ms, rise: 2, fall: 2");
            // More virtual servers right after port-1 (still inside `ingress:`).
            let at = y
                .find("      on_failure: quiesce\n")
                .expect("port-1 in the lab config")
                + "      on_failure: quiesce\n".len();
            format!("{}{HOLD_VS}{DNS_VS}{}", &y[..at], &y[at..])
        })
        .unwrap();
    }
    for r in lab.routers() {
        r.start().unwrap();
    }
    println!("RESULT lab_setup_s={:.2}", t_build.elapsed().as_secs_f64());

    // Ready: VIPs held, every ingress pod up (weight 1), the two resolvers in.
    let all_up = |k: usize, vs: &str| -> Option<bool> {
        let (ready, m) = real_servers_on(&lab, k, vs)?;
        Some(
            ready
                && (0..PODS).all(|p| {
                    m.values().filter(|s| s.0 == "up").count() == PODS
                        && m.get(&format!(
                            "{}:{}",
                            topo::ingress_pod(p),
                            if vs == "hold" {
                                HOLD_PORT
                            } else {
                                topo::INGRESS_PORT
                            }
                        ))
                        .is_some_and(|s| s.0 == "up" && s.1 == Some(1))
                }),
        )
    };
    let (_, t_ready) = wait_for(
        "router 0 to be master and every real server up on both routers",
        &lab,
        || {
            let dns_up = real_servers(&lab, "dns")?
                .1
                .values()
                .filter(|s| s.0 == "up")
                .count()
                == RESOLVERS.len();
            let ok = (0..2)
                .all(|k| all_up(k, "port-1") == Some(true) && all_up(k, "hold") == Some(true));
            (ok && dns_up && lab.router(0).holds_egress_vip()).then_some(())
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
    assert!(ipvsadm.contains("mh (mh-fallback,mh-port)"), "{ipvsadm}");
    for i in 0..GATEWAYS {
        for port in [topo::INGRESS_PORT, HOLD_PORT] {
            assert!(
                ipvsadm.contains(&format!("TCP  {}:{port}", topo::ingress_vip(i))),
                "no service {port} on ingress VIP {i}:\n{ipvsadm}"
            );
        }
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
    let n = GATEWAYS * per_gateway;
    let new_round = |what: &str| -> BTreeMap<String, usize> {
        let mut served: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..GATEWAYS {
            for _ in 0..per_gateway {
                let (server, peer) = whoami(&inet, i)
                    .unwrap_or_else(|e| panic!("{what}, gateway {i}: {e}\n{}", diag(&lab)));
                assert!(
                    peer.starts_with(&format!("{}:", inet_source(i))),
                    "pod saw {peer}"
                );
                *served.entry(server).or_default() += 1;
            }
        }
        served
    };
    let t1 = Instant::now();
    let served = new_round("new connections");
    println!(
        "RESULT new_connections={n} ok={n} mean_ms={:.1} spread={served:?}",
        t1.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    assert!(
        served.len() >= 2,
        "mh sent everything to one pod: {served:?}"
    );

    // UDP through every gateway too (the pods echo UDP on the same port).
    for i in 0..GATEWAYS {
        let to = SocketAddr::from((topo::gateway_public(i), forwarded_port()));
        let got = inet
            .run_in(move || -> Result<String, String> {
                let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
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

    // 2. Connections held open through every gateway (each answered once: we know its pod).
    let mut held = open_held_all(&lab, &inet, 6);
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for h in &held {
        *count.entry(h.pod.clone()).or_default() += 1;
    }
    // The victim: the pod holding the most held connections.
    let victim_name = count
        .iter()
        .max_by_key(|(_, c)| **c)
        .map(|(p, _)| p.clone())
        .unwrap();
    let victim: usize = victim_name
        .trim_start_matches("ingress-pod-")
        .parse()
        .unwrap();
    let victim_addr = pod_addr(victim);

    // 3. Stop the victim (new connections refused, as a stopped server would).
    let t_stop = Instant::now();
    block_pod(&lab, victim, true);
    let (_, t_down) = wait_for("the stopped pod to be quiesced (weight 0)", &lab, || {
        let (_, m) = real_servers(&lab, "port-1")?;
        let s = m.get(&victim_addr)?;
        (s.0 == "down" && s.1 == Some(0)).then_some(())
    });
    println!("RESULT stop_to_quiesced_s={:.2}", t_down.as_secs_f64());
    let ipvsadm = lab.router(0).ns.exec("ipvsadm", &["-Ln"]).unwrap();
    assert!(
        ipvsadm
            .lines()
            .any(|l| l.contains(&format!("-> {victim_addr}")) && l.contains(" 0 ")),
        "{ipvsadm}"
    );
    // Held connections to the other pods: every one still answers, from its pod.
    let (kept, broken) = check_held(&mut held, Some(&victim_name));
    println!(
        "RESULT held_connections_on_other_pods_kept={kept}/{} held_for_s={:.2}",
        kept + broken.len(),
        t_stop.elapsed().as_secs_f64()
    );
    assert!(
        broken.is_empty() && kept > 0,
        "held connections broken by the stop: {broken:?}"
    );
    let after = new_round("after the stop");
    assert!(
        !after.contains_key(&victim_name),
        "new connections still reach the stopped pod: {after:?}"
    );
    println!("RESULT after_stop_new_connections={n} ok={n} spread={after:?}");

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
    let (kept, broken) = check_held(&mut held, None);
    assert!(
        broken.is_empty(),
        "held connections broken by the restore: {broken:?}"
    );
    println!("RESULT held_connections_after_restore_kept={kept}/{kept}");
    drop(held);

    // 5. DNS: a client pod asks the egress VIP; one of the resolvers answers (through IPVS).
    let client = lab.client(0).ns.clone();
    let mut answered: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for id in 0..20u16 {
        let a = dns_query_via_vip(&client, 0x4000 + id)
            .unwrap_or_else(|e| panic!("DNS via the egress VIP: {e}\n{}", diag(&lab)));
        assert!(RESOLVERS.contains(&a), "answer {a}");
        answered.insert(a);
    }
    println!("RESULT dns_queries=20 ok=20 resolvers_seen={answered:?}");

    // Kernel counters and check metrics reach /metrics.
    let metrics = lab.router(0).api_get("/metrics").unwrap().body;
    for want in [
        "vpn_router_ipvs_destination_connections_total{virtual_server=\"port-1\"",
        "vpn_router_ingress_real_servers_up{virtual_server=\"port-1\"} 4",
        "vpn_router_ingress_check_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(want), "{want} not in /metrics:\n{metrics}");
    }

    // 6. Router failover: the master's pod dies; the backup takes the VIPs and serves new
    // connections; connections opened through the old master continue on the same pod (same
    // maglev table on both routers, sloppy_tcp adopts them mid-stream).
    // Both routers must see the same servers up first: each checks on its own, so right
    // after a restore one may still have a server at weight 0 that the other has at 1, and
    // the two maglev tables then differ for that server's flows (seen: 3 of 12 reset).
    wait_for(
        "both routers to see every pod up in both virtual servers",
        &lab,
        || {
            (0..2)
                .all(|k| all_up(k, "port-1") == Some(true) && all_up(k, "hold") == Some(true))
                .then_some(())
        },
    );
    let mut held = open_held_all(&lab, &inet, 4);
    let t_kill = Instant::now();
    lab.router(0).kill_pod().unwrap();
    let (_, t_takeover) = wait_for("router 1 to take the VIPs", &lab, || {
        lab.router(1).holds_egress_vip().then_some(())
    });
    println!(
        "RESULT failover_vip_takeover_s={:.2}",
        t_takeover.as_secs_f64()
    );
    let (kept, broken) = check_held(&mut held, None);
    println!(
        "RESULT failover_held_connections_kept={kept}/{} after_s={:.2} broken={broken:?}",
        held.len(),
        t_kill.elapsed().as_secs_f64()
    );
    let failover_new = new_round("after the failover");
    println!("RESULT failover_new_connections={n} ok={n} spread={failover_new:?}");
    if !broken.is_empty() {
        let hold = real_servers_on(&lab, 1, "hold");
        println!(
            "failover: broken {broken:?}; router 1 hold states: {hold:?}\n{}",
            diag(&lab)
        );
    }
    // All of them: the same maglev table on both routers puts every adopted flow on its pod.
    // (One reset in ~10 runs before each gateway got its own client address: two held
    // connections through two gateways from one source port met at one pod.)
    assert!(
        broken.is_empty(),
        "connections broken by the router failover: {broken:?}"
    );
    drop(held);

    // 7. Reload on the surviving router without the DNS virtual server: its service goes,
    // nothing else is written (the new engine adopts the kernel's state).
    let r1 = lab.router(1);
    let before = r1.api_get("/metrics").unwrap().body;
    let strip = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.contains(":53"))
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect()
    };
    let table_before = strip(&r1.ns.exec("ipvsadm", &["-Ln"]).unwrap());
    r1.rewrite_config(|y| y.replace(DNS_VS, "")).unwrap();
    r1.sighup();
    let (_, t_reload) = wait_for("the DNS service to go after the reload", &lab, || {
        let t = r1.ns.exec("ipvsadm", &["-Ln"]).ok()?;
        (!t.contains("192.168.26.254:53")).then_some(())
    });
    let after = r1.api_get("/metrics").unwrap().body;
    // Weights and order of the other services unchanged (connection counters may differ).
    assert_eq!(
        table_before,
        strip(&r1.ns.exec("ipvsadm", &["-Ln"]).unwrap())
    );
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

    // 8. `on_failure: remove` with mh: a server that comes back sorts before the others, so
    // they are re-inserted behind it (delete + add in one batch) to keep the list in
    // fresh-build order. The list must read back as before, and connections to the
    // re-inserted servers must go on (the kernel restores them from its trash).
    r1.rewrite_config(|y| y.replace("      on_failure: quiesce\n", "      on_failure: remove\n"))
        .unwrap();
    r1.sighup();
    let vip0 = topo::ingress_vip(0);
    let (order_before, _) = wait_for(
        "remove mode: only the 4 live pods as destinations",
        &lab,
        || {
            let a = dests_of(r1, vip0, topo::INGRESS_PORT);
            let b = dests_of(r1, vip0, HOLD_PORT);
            (a.len() == PODS && b.len() == PODS).then_some((a, b))
        },
    );
    let m0 = r1.api_get("/metrics").unwrap().body;
    block_pod(&lab, 0, true);
    wait_for("pod 0 removed", &lab, || {
        (dests_of(r1, vip0, topo::INGRESS_PORT).len() == PODS - 1
            && dests_of(r1, vip0, HOLD_PORT).len() == PODS - 1)
            .then_some(())
    });
    let mut held = open_held_all(&lab, &inet, 4);
    block_pod(&lab, 0, false);
    let (order_after, t_back) = wait_for("pod 0 added back", &lab, || {
        let a = dests_of(r1, vip0, topo::INGRESS_PORT);
        let b = dests_of(r1, vip0, HOLD_PORT);
        (a.len() == PODS && b.len() == PODS).then_some((a, b))
    });
    let m1 = r1.api_get("/metrics").unwrap().body;
    let re_added = writes(&m1, "add_destination") - writes(&m0, "add_destination");
    let re_deleted = writes(&m1, "delete_destination") - writes(&m0, "delete_destination");
    assert_eq!(
        order_after, order_before,
        "destination order changed by the churn"
    );
    let (kept, broken) = check_held(&mut held, None);
    println!(
        "RESULT remove_mode_churn order_kept=true back_after_s={:.2} writes: delete_destination={re_deleted} add_destination={re_added} (9 services) connections_on_reinserted_servers_kept={kept}/{}",
        t_back.as_secs_f64(),
        held.len()
    );
    assert!(
        broken.is_empty(),
        "connections broken by the re-insertion: {broken:?}"
    );
    // 9 services (3 VIPs × tcp/udp port-1, 3 hold): 9 deletes when pod 0 left; coming back,
    // pods 1-3 (sorting after it) are re-inserted: 27 deletes and 36 adds.
    assert_eq!((re_deleted, re_added), (9 + 27, 36));
    drop(held);

    // 9. The whole `ingress` section removed: the services it built go with it.
    r1.rewrite_config(without_ingress).unwrap();
    r1.sighup();
    let (_, t_gone) = wait_for("no IPVS service left after removing ingress", &lab, || {
        let t = r1.ns.exec("ipvsadm", &["-Ln"]).ok()?;
        (!t.lines()
            .any(|l| l.starts_with("TCP") || l.starts_with("UDP")))
        .then_some(())
    });
    println!(
        "RESULT ingress_removed services_gone_after_s={:.2}",
        t_gone.as_secs_f64()
    );
    drop(resolvers);
}

/// The config without its top-level `ingress:` section.
fn without_ingress(yaml: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in yaml.lines() {
        if line.starts_with("ingress:") {
            skipping = true;
            continue;
        }
        if skipping && !line.is_empty() && !line.starts_with([' ', '#']) {
            skipping = false;
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// What the lab's cluster DNS answers for the one cluster name it knows.
const KUBERNETES_SVC: Ipv4Addr = Ipv4Addr::new(10, 33, 0, 1);
/// Resolver pods the test runs (of the shipped NAD's three addresses): two, as the example's
/// Deployment.
const RESOLVER_PODS: usize = 2;
/// A resolver pod's `eth0` (the pod network): 10.244.4.1 + k.
fn resolver_pod_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 4, 1)) + k as u32)
}

/// The DNS path as deploy/ ships it, read from the files (never a copy kept here): the router
/// config's `local_route` virtual server, the resolver example's NAD (addresses, routes,
/// tuning) and the client NAD's route to the cluster DNS IP.
struct ShippedDns {
    /// The virtual server as one flow-style YAML list item for the lab config, its health
    /// check's timeout raised for TCG.
    vs_item: String,
    /// The cluster DNS service IP (the virtual server's address).
    cluster_dns: Ipv4Addr,
    /// The port the resolvers listen on (`real_port`).
    real_port: u16,
    /// The name the health check asks (the lab's cluster DNS knows it).
    query: String,
    resolver: lab::kube::cni::Network,
    /// vpn-net-clients' route to the cluster DNS IP.
    client_route: lab::kube::cni::Route,
}

fn shipped_dns() -> ShippedDns {
    use lab::kube::{cluster, cni, manifests};
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let base = manifests::render(&deploy.join("base")).unwrap();
    let cfg = cluster::router_config(&base).unwrap();
    let mut vs = cfg["ingress"]["virtual_servers"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["local_route"] == true))
        .expect("a local_route virtual server in deploy/base/router-config.yaml")
        .clone();
    let cluster_dns: Ipv4Addr = vs["addresses"][0].as_str().unwrap().parse().unwrap();
    let real_port = vs["real_port"]
        .as_u64()
        .or(vs["port"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .unwrap();
    let query = vs["health_check"]["query"].as_str().unwrap().to_owned();
    vs["health_check"]["timeout"] = serde_json::json!("900ms");
    let resolver_objs = manifests::render(&deploy.join("examples/resolver")).unwrap();
    let resolver = resolver_objs
        .iter()
        .filter(|o| o.kind == "NetworkAttachmentDefinition")
        .map(|o| cni::parse_nad(o).unwrap())
        .next()
        .expect("the resolver example's NAD");
    let clients = cni::parse_nad(
        manifests::find(
            &base,
            "NetworkAttachmentDefinition",
            "vpn-gateway",
            "vpn-net-clients",
        )
        .unwrap(),
    )
    .unwrap();
    let client_route = clients
        .routes
        .iter()
        .find(|r| r.dst.contains(&cluster_dns) && r.dst.prefix_len() == 32)
        .expect("vpn-net-clients routes the cluster DNS IP")
        .clone();
    ShippedDns {
        vs_item: format!("    - {}\n", serde_json::to_string(&vs).unwrap()),
        cluster_dns,
        real_port,
        query,
        resolver,
        client_route,
    }
}

impl ShippedDns {
    fn resolver_addr(&self, k: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.resolver.range_start) + k as u32)
    }
}

/// dnsmasq in `ns`, in the foreground (the namespace's teardown kills it), logging every query
/// to `log`.
fn dnsmasq(ns: &Netns, listen: Ipv4Addr, args: &[String], log: &Path) -> std::process::Child {
    let mut cmd = ns.command("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        "--user=root",
        "--group=root",
        "--pid-file",
        "--cache-size=0",
        "--log-queries",
    ])
    .arg(format!("--listen-address={listen}"))
    .arg(format!("--log-facility={}", log.display()))
    .args(args)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    cmd.spawn().expect("dnsmasq (Debian package dnsmasq-base)")
}

/// The resolver example's pods, with dnsmasq standing in for CoreDNS: `cluster.local` to the
/// cluster DNS out of `eth0` (the pod network), everything else to the Internet's DNS through
/// the VPN network. Their VPN-network addresses, routes and tuning sysctls are the shipped
/// NAD's, so the answers to clients go back through the router (IPVS undoes its NAT there)
/// exactly as the example routes them. One addition: the lab's Internet is TEST-NET-3, which
/// the shipped routes leave out as reserved (the lab's router config sets
/// `exclude_reserved: false`), so it gets a route via the egress VIP too.
fn start_dnsmasq_resolvers(lab: &Lab, dns: &ShippedDns, dir: &Path) -> Resolvers {
    let prefix = lab.switch().name().trim_end_matches("-sw").to_owned();
    let mut out = Resolvers {
        ns: Vec::new(),
        children: Vec::new(),
    };
    let nad = &dns.resolver;
    for k in 0..RESOLVER_PODS {
        let (addr, pod) = (dns.resolver_addr(k), resolver_pod_ip(k));
        let ns = Netns::create(&format!("{prefix}-res{k}")).unwrap();
        out.ns.push(ns.clone());
        lab.switch()
            .ip_batch(&[
                format!(
                    "link add g-res{k} mtu {m} type veth peer name gw0 mtu {m} netns {}",
                    ns.name(),
                    m = nad.mtu
                ),
                format!("link set g-res{k} master brgw up"),
                format!(
                    "link add p-res{k} type veth peer name eth0 netns {}",
                    ns.name()
                ),
                format!("link set p-res{k} master brpod up"),
            ])
            .unwrap();
        let mut cmds = vec![
            format!("addr add {addr}/{} dev gw0", nad.range.prefix_len()),
            format!("addr add {pod}/16 dev eth0"),
            "link set gw0 up".into(),
            "link set eth0 up".into(),
            "link set lo up".into(),
            // The pod's primary network: the cluster DNS and the intranet.
            format!("route add 10.0.0.0/8 via {} dev eth0", topo::NODE_POD),
            format!("route add 203.0.113.0/24 via {} dev gw0", topo::EGRESS_VIP),
        ];
        for r in &nad.routes {
            let via =
                r.gw.or(nad.gateway)
                    .expect("a resolver route with its gateway");
            cmds.push(format!("route add {} via {via} dev gw0", r.dst));
        }
        ns.ip_batch(&cmds).unwrap();
        for (key, value) in &nad.tuning {
            ns.sysctl(&key.replace("IFNAME", "gw0"), value).unwrap();
        }
        let child = dnsmasq(
            &ns,
            addr,
            &[
                format!("--port={}", dns.real_port),
                format!("--server=/cluster.local/{}", dns.cluster_dns),
                format!("--server={}", topo::INTERNET_DNS),
            ],
            &dir.join(format!("resolver{k}.log")),
        );
        out.children.push(child);
    }
    out
}

/// The node serves the cluster DNS (10.33.0.10: one name, no recursion) and counts the DNS
/// packets it receives by source: resolver pods, router pods, anyone else (a client's query
/// that went around the VPN). The returned dnsmasq is the caller's to stop.
fn start_cluster_dns(lab: &Lab, dns: &ShippedDns, dir: &Path) -> std::process::Child {
    let node = lab.node();
    node.ip(&[
        "addr",
        "add",
        &format!("{}/32", dns.cluster_dns),
        "dev",
        "lo",
    ])
    .unwrap();
    let resolvers: Vec<String> = (0..RESOLVER_PODS)
        .map(|k| resolver_pod_ip(k).to_string())
        .collect();
    node.nft(&format!(
        "table ip lab {{\n counter resolvers {{ }}\n counter routers {{ }}\n counter others {{ }}\n chain input {{\n  type filter hook input priority 0; policy accept;\n  meta l4proto {{ tcp, udp }} th dport 53 ip saddr {{ {} }} counter name \"resolvers\" accept\n  meta l4proto {{ tcp, udp }} th dport 53 ip saddr 10.244.1.0/24 counter name \"routers\" accept\n  meta l4proto {{ tcp, udp }} th dport 53 counter name \"others\"\n }}\n}}\n",
        resolvers.join(", ")
    ))
    .unwrap();
    dnsmasq(
        node,
        dns.cluster_dns,
        &[format!("--host-record={},{KUBERNETES_SVC}", dns.query)],
        &dir.join("cluster-dns.log"),
    )
}

/// `dig` in `ns` at the cluster DNS IP: the A records of `name` (empty: no answer).
fn dig(ns: &Netns, server: Ipv4Addr, name: &str, tcp: bool) -> Result<Vec<Ipv4Addr>, String> {
    let server = format!("@{server}");
    let mut args = vec![server.as_str(), "+short", "+tries=1", "+time=3", name, "A"];
    if tcp {
        args.push("+tcp");
    }
    let out = ns.exec("dig", &args).map_err(|e| e.to_string())?;
    Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn local_routes_in_force(lab: &Lab, k: usize, addr: Ipv4Addr) -> Option<bool> {
    let st = lab.router(k).status().ok()?;
    let routes = st["components"]["ingress"]["detail"]["local_routes"]["routes"]
        .as_array()?
        .clone();
    Some(
        routes.len() == 1
            && routes[0]["address"] == addr.to_string()
            && routes[0]["in_force"] == true,
    )
}

fn kernel_local_routes(lab: &Lab, k: usize) -> String {
    lab.router(k)
        .ns
        .ip(&["-4", "route", "show", "table", "local", "proto", "245"])
        .unwrap_or_default()
}

/// DNS the way the original design does it, on a real IPVS kernel: clients keep the cluster
/// DNS IP, their NAD routes it to the egress VIP, both routers accept it as local (the
/// daemon's `local_route`) and IPVS hands it to resolver pods (dnsmasq for CoreDNS), whose
/// upstream queries leave through the gateways; `cluster.local` goes to the cluster DNS.
#[test]
#[ignore = "needs IPVS: run in the VM (tests/vm/test-ingress.sh)"]
fn dns_through_the_vpn_on_the_cluster_dns_ip() {
    assert!(
        lab::lab::ipvs_available(),
        "this kernel has no IPVS (no /proc/net/ip_vs): run this test in the VM with tests/vm/test-ingress.sh"
    );
    let router_bin = Path::new(LAB_BIN).with_file_name("vpn-router");
    let lab = Lab::builder()
        .lab_bin(LAB_BIN)
        .router_bin(&router_bin)
        .gateways(2)
        .routers(2)
        .clients(1)
        .ingress_pods(0)
        .dns(true)
        .start_routers(false)
        .tuning(tuning())
        .build()
        .unwrap_or_else(|e| panic!("building the lab failed: {e}"));
    let dir = std::env::temp_dir().join(format!("vpn-router-dns-vm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dns = shipped_dns();
    let cluster_dns = dns.cluster_dns;
    let cluster_dns_server = start_cluster_dns(&lab, &dns, &dir);
    let mut resolvers = start_dnsmasq_resolvers(&lab, &dns, &dir);
    resolvers.children.push(cluster_dns_server);
    for g in lab.gateways() {
        g.ns.nft("table ip lab {\n counter upstream { }\n chain post {\n  type filter hook postrouting priority 0; policy accept;\n  oifname \"tun0\" meta l4proto { tcp, udp } th dport 53 counter name \"upstream\"\n }\n}\n")
            .unwrap();
    }
    // The client NAD's extra route: the cluster DNS IP via the egress VIP (nad-routes --extra).
    let client = lab.client(0).ns.clone();
    let via = dns.client_route.gw.unwrap_or(topo::EGRESS_VIP);
    client
        .ip(&[
            "route",
            "add",
            &dns.client_route.dst.to_string(),
            "via",
            &via.to_string(),
            "dev",
            "gw0",
        ])
        .unwrap();
    for r in lab.routers() {
        r.rewrite_config(|y| {
            assert!(
                !y.contains("\ningress:"),
                "the lab config has an ingress section:\n{y}"
            );
            format!("{y}ingress:\n  virtual_servers:\n{}", dns.vs_item)
        })
        .unwrap();
    }
    for r in lab.routers() {
        r.start().unwrap();
    }
    let (_, t_ready) = wait_for(
        "both resolvers up and the local route in force on both routers",
        &lab,
        || {
            let up = (0..2).all(|k| {
                real_servers_on(&lab, k, "dns").is_some_and(|(_, m)| {
                    m.values().filter(|s| s.0 == "up").count() == RESOLVER_PODS
                })
            });
            let local = (0..2).all(|k| local_routes_in_force(&lab, k, cluster_dns) == Some(true));
            (up && local && lab.router(0).holds_egress_vip()).then_some(())
        },
    );
    println!("RESULT dns_ready_s={:.2}", t_ready.as_secs_f64());
    for k in 0..2 {
        let routes = kernel_local_routes(&lab, k);
        assert!(
            routes.contains(&format!("local {cluster_dns} dev lo")),
            "router {k}: {routes}"
        );
    }

    let upstream = |lab: &Lab| -> u64 {
        lab.gateways()
            .iter()
            .map(|g| lab::lab::counter_packets(&g.ns, "upstream").unwrap())
            .sum()
    };
    let node_dns = |name: &str| lab::lab::counter_packets(lab.node(), name).unwrap();
    let before = upstream(&lab);
    // An Internet name: the resolver asks the Internet's DNS through a gateway.
    for tcp in [false, true] {
        let a = dig(&client, cluster_dns, "ns1.lab.test", tcp)
            .unwrap_or_else(|e| panic!("dig (tcp {tcp}): {e}\n{}", diag(&lab)));
        assert_eq!(
            a,
            [topo::INTERNET_DNS],
            "ns1.lab.test over tcp={tcp}\n{}",
            diag(&lab)
        );
    }
    let up = upstream(&lab) - before;
    assert!(
        up >= 2,
        "the resolvers' upstream queries did not leave through a gateway ({up})"
    );
    // A cluster name: the resolver asks the cluster DNS out of its own eth0.
    let resolvers_before = node_dns("resolvers");
    for tcp in [false, true] {
        let a = dig(&client, cluster_dns, &dns.query, tcp).unwrap();
        assert_eq!(
            a,
            [KUBERNETES_SVC],
            "cluster.local over tcp={tcp}\n{}",
            diag(&lab)
        );
    }
    assert!(node_dns("resolvers") > resolvers_before);
    assert_eq!(
        node_dns("others"),
        0,
        "a DNS packet from a client reached the node's network"
    );
    println!(
        "RESULT dns_upstream_via_gateways={up} dns_at_node_from_resolvers={} from_clients=0",
        node_dns("resolvers")
    );

    // The routers' own lookups (their resolv.conf names the same IP): IPVS takes locally
    // generated packets too, and the local route's source (the router's address on the VPN
    // network) brings the resolver's answer back to it. Without that source the answer went
    // to 10.33.0.10 itself and the lookup failed.
    let routers_before = node_dns("routers");
    for k in 0..2 {
        let own = dig(&lab.router(k).ns, cluster_dns, "ns1.lab.test", false);
        assert_eq!(
            own,
            Ok(vec![topo::INTERNET_DNS]),
            "router {k}'s own lookup of an Internet name"
        );
    }
    assert_eq!(
        node_dns("routers"),
        routers_before,
        "the routers' own lookups went to the cluster DNS, not through the VPN"
    );
    println!("RESULT router_own_lookups_via=resolvers");

    // Deleted by hand on the master: repaired at the next resync.
    lab.router(0)
        .ns
        .ip(&[
            "route",
            "del",
            "local",
            &cluster_dns.to_string(),
            "dev",
            "lo",
            "table",
            "local",
        ])
        .unwrap();
    let (_, t_repair) = wait_for("the deleted local route to come back", &lab, || {
        kernel_local_routes(&lab, 0)
            .contains(&cluster_dns.to_string())
            .then_some(())
    });
    println!(
        "RESULT local_route_repaired_s={:.2}",
        t_repair.as_secs_f64()
    );

    // A reload without the ingress section: its local route goes on both routers.
    for r in lab.routers() {
        r.rewrite_config(without_ingress).unwrap();
        r.sighup();
    }
    wait_for("the local routes to go after the reload", &lab, || {
        (0..2)
            .all(|k| kernel_local_routes(&lab, k).trim().is_empty())
            .then_some(())
    });
    assert_eq!(lab.leaked_packets().unwrap(), 0, "{}", lab.leaked_flows());
    drop(resolvers);
    let _ = std::fs::remove_dir_all(&dir);
}
