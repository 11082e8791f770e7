//! MTU: full-size TCP through a gateway whose tunnel is smaller than the VPN network, with
//! Path MTU Discovery broken on purpose. As root, on the netns lab with the real `vpn-router`
//! and the shipped gluetun gateway (deploy/examples/gateways).
//!
//! The lab runs the VPN gateway network at 1420 and the tunnel at gluetun's `WIREGUARD_MTU`
//! (1320). Every ICMP "fragmentation needed" that the gateway or the provider would send is
//! dropped (a black hole, as behind a firewall that drops ICMP): a segment larger than the
//! tunnel is lost, and retransmitted at the same size, forever. So a transfer completes only
//! when both ends were told a small enough MSS in the handshake:
//!
//! - download (Internet server → client): the client's SYN, clamped by the router
//!   (`gateways.clamp_mss`, forward chain);
//! - upload (client → Internet server): the server's SYN-ACK, which returns from the gateway
//!   straight to the client, clamped by the gateway's post-rules (the example's TCPMSS line);
//! - ingress (Internet → a service on the router's ingress VIP, both ways): the Internet
//!   client's SYN (router, input chain; the gateway's TCPMSS line clamps it too) and the
//!   router's SYN-ACK (router, output chain).
//!
//! The checks can fail: with `clamp_mss: false` reloaded the same download stalls; with the
//! example's TCPMSS line removed the upload stalls, while downloads and ingress, clamped by
//! the router alone, still complete.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::unwrap_used
)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use lab::gluetun_pod::GatewayPodSpec;
use lab::netns::Netns;
use lab::{topo, GatewayKind, Lab, LabBuilder};
use nix::sys::socket::{getsockopt, sockopt};

const LAB_BIN: &str = env!("CARGO_BIN_EXE_vpn-router-lab");
const BOUND: Duration = Duration::from_secs(8);
/// Large enough for hundreds of full-size segments.
const SIZE: usize = 1 << 20;
/// A stalled transfer makes no progress for this long.
const IDLE: Duration = Duration::from_secs(3);
const BULK_PORT: u16 = 5001;
/// `tunnel_mtu - 40` for the lab's tunnel (gluetun's default WIREGUARD_MTU 1320).
const CLAMP: u32 = 1280;

fn builder() -> LabBuilder {
    Lab::builder()
        .lab_bin(LAB_BIN)
        .gateways(1)
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
        "waited {BOUND:?} for {what}; router log:\n{}\ngateway pod:\n{}",
        lab.router_log_tails(20),
        lab.gateway(0).pod_log()
    );
}

fn mss_clamp(lab: &Lab) -> serde_json::Value {
    lab.router(0)
        .status()
        .map(|s| s["components"]["gateways"]["detail"]["return_routing"]["tcp_mss_clamp"].clone())
        .unwrap_or(serde_json::Value::Null)
}

fn ready(lab: &Lab) {
    wait_for(
        lab,
        "the gateway healthy and the router's nft table in force",
        |l| {
            let healthy = l
                .router(0)
                .gateway_states()
                .is_some_and(|g| g.iter().all(|(_, s)| s == "healthy"));
            let st = l.router(0).status().ok();
            healthy
                && st.is_some_and(|s| {
                    s["components"]["gateways"]["detail"]["return_routing"]["nft_in_force"] == true
                })
        },
    );
}

/// Drops every ICMP "fragmentation needed" that `ns` would send: PMTU discovery through it
/// is broken.
fn break_pmtud(ns: &Netns) {
    ns.nft(
        "table ip lab_pmtu {\n chain out {\n  type filter hook output priority 0; policy accept;\n  icmp type destination-unreachable icmp code frag-needed counter drop\n }\n}\n",
    )
    .unwrap();
}

fn break_pmtud_everywhere(lab: &Lab) {
    let g = lab.gateway(0);
    break_pmtud(&g.ns);
    break_pmtud(
        g.provider()
            .expect("a gluetun gateway has a provider namespace"),
    );
}

/// The ICMP errors the black hole swallowed (gateway, provider): evidence that full-size
/// segments were tried.
fn swallowed(lab: &Lab) -> String {
    let g = lab.gateway(0);
    let count = |ns: &Netns| {
        ns.exec("nft", &["list", "table", "ip", "lab_pmtu"])
            .ok()
            .and_then(|t| {
                t.split("counter packets ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next().map(str::to_owned))
            })
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "frag-needed dropped: gateway {}, provider {}",
        count(&g.ns),
        count(g.provider().unwrap())
    )
}

#[derive(Debug)]
struct Transfer {
    /// Bytes the server received / the client received.
    up: usize,
    down: usize,
    /// TCP_MAXSEG of the server's and the client's socket once connected: at most the MSS
    /// the other end announced.
    server_mss: u32,
    client_mss: u32,
}

impl Transfer {
    fn complete(&self, up: usize, down: usize) -> bool {
        self.up == up && self.down == down
    }
}

fn read_all(s: &mut TcpStream) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return n,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return n,
        }
    }
}

fn write_all(s: &mut TcpStream, mut n: usize) {
    let buf = vec![0x5au8; 64 * 1024];
    while n > 0 {
        match s.write(&buf[..n.min(buf.len())]) {
            Ok(k) => n -= k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn mss_of(s: &TcpStream) -> u32 {
    getsockopt(s, sockopt::TcpMaxSeg).unwrap_or(0)
}

/// One connection from `client_ns` to a server listening at `at` in `server_ns`: the client
/// sends `up` bytes and shuts its side down, the server reads to the end, then sends `down`
/// bytes and closes. Every read and write gives up after `IDLE` without progress.
fn transfer(
    server_ns: &Netns,
    at: SocketAddr,
    client_ns: &Netns,
    to: SocketAddr,
    up: usize,
    down: usize,
) -> Transfer {
    let listener = server_ns
        .run_in(move || TcpListener::bind(at))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + BOUND;
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("no connection to {at}: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(IDLE)).unwrap();
        s.set_write_timeout(Some(IDLE)).unwrap();
        let mss = mss_of(&s);
        let got = read_all(&mut s);
        write_all(&mut s, down);
        let _ = s.shutdown(Shutdown::Write);
        // Let the last segments drain before the socket closes.
        let _ = read_all(&mut s);
        (got, mss)
    });
    let (down_got, client_mss) = client_ns
        .run_in(move || {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("connect {to}: {e}"));
            s.set_read_timeout(Some(IDLE)).unwrap();
            s.set_write_timeout(Some(IDLE)).unwrap();
            let mss = mss_of(&s);
            write_all(&mut s, up);
            let _ = s.shutdown(Shutdown::Write);
            (read_all(&mut s), mss)
        })
        .unwrap();
    let (up_got, server_mss) = server.join().unwrap();
    Transfer {
        up: up_got,
        down: down_got,
        server_mss,
        client_mss,
    }
}

/// Once the router holds the ingress VIP: 1 MiB each way through the forwarded port
/// completes, and each end was told an MSS that fits the tunnel.
fn ingress_fits(lab: &Lab) {
    wait_for(lab, "the router to hold the ingress VIP", holds_ingress_vip);
    let i = ingress(lab);
    assert!(
        i.complete(SIZE, SIZE),
        "ingress through the tunnel stalled: {i:?}; {}",
        swallowed(lab)
    );
    assert!(
        (1..=CLAMP).contains(&i.server_mss) && (1..=CLAMP).contains(&i.client_mss),
        "{i:?}"
    );
}

fn holds_ingress_vip(lab: &Lab) -> bool {
    lab.router(0)
        .ns
        .ip(&["-4", "addr", "show"])
        .is_ok_and(|a| a.contains(&format!("{}/", topo::ingress_vip(0))))
}

/// The client sends `up` bytes to the Internet server, which answers with `down`.
fn client_to_internet(lab: &Lab, up: usize, down: usize) -> Transfer {
    let server = SocketAddr::from((topo::INTERNET_ECHO, BULK_PORT));
    transfer(lab.internet(), server, &lab.client(0).ns, server, up, down)
}

fn download(lab: &Lab) -> Transfer {
    client_to_internet(lab, 0, SIZE)
}

fn upload(lab: &Lab) -> Transfer {
    client_to_internet(lab, SIZE, 0)
}

/// From the Internet host to the gateway's forwarded port, which the gateway DNATs to its
/// ingress VIP's port 6666: a service there on the router, both ways.
fn ingress(lab: &Lab) -> Transfer {
    let at = SocketAddr::from((topo::ingress_vip(0), topo::INGRESS_PORT));
    let port = lab.gateway(0).forwarded_port().unwrap();
    let to = SocketAddr::from((topo::gateway_public(0), port));
    transfer(&lab.router(0).ns, at, lab.internet(), to, SIZE, SIZE)
}

#[test]
fn full_size_tcp_fits_the_tunnel_without_pmtu_discovery() {
    let lab = builder().build().unwrap();
    ready(&lab);
    assert_eq!(
        mss_clamp(&lab),
        serde_json::json!(CLAMP),
        "the default clamp"
    );
    break_pmtud_everywhere(&lab);

    let d = download(&lab);
    assert!(
        d.complete(0, SIZE),
        "download through the tunnel stalled: {d:?}; {}",
        swallowed(&lab)
    );
    assert!(
        (1..=CLAMP).contains(&d.server_mss),
        "the server may send segments of {} bytes: the client's SYN was not clamped",
        d.server_mss
    );
    let u = upload(&lab);
    assert!(
        u.complete(SIZE, 0),
        "upload through the tunnel stalled: {u:?}; {}\ngateway pod:\n{}",
        swallowed(&lab),
        lab.gateway(0).pod_log()
    );
    assert!((1..=CLAMP).contains(&u.client_mss), "{u:?}");
    ingress_fits(&lab);

    // The same download with the router's clamp turned off: the black hole is real.
    lab.router(0)
        .rewrite_config(|c| {
            c.replace(
                "  interface: gw0\n",
                "  interface: gw0\n  clamp_mss: false\n",
            )
        })
        .unwrap();
    lab.router(0).sighup();
    wait_for(&lab, "the reload to drop the clamp", |l| {
        mss_clamp(l).is_null()
    });
    ready(&lab);
    let d = download(&lab);
    assert!(
        !d.complete(0, SIZE),
        "a download completed without the router's clamp: {d:?} (is PMTU discovery really broken? {})",
        swallowed(&lab)
    );
    assert!(d.server_mss > CLAMP, "{d:?}");
    assert_eq!(lab.leaked_packets().unwrap(), 0, "{}", lab.leaked_flows());
}

#[test]
fn without_the_gateways_clamp_uploads_stall() {
    let mut spec = GatewayPodSpec::load().unwrap();
    assert!(
        spec.drop_post_rules(|l| l.contains("-j TCPMSS")),
        "the example mounts no post-rules file"
    );
    let lab = builder()
        .gateway_kind(GatewayKind::GluetunSpec(Box::new(spec)))
        .build()
        .unwrap();
    ready(&lab);
    break_pmtud_everywhere(&lab);
    let d = download(&lab);
    assert!(
        d.complete(0, SIZE),
        "the router's clamp alone carries downloads: {d:?}"
    );
    let u = upload(&lab);
    assert!(
        !u.complete(SIZE, 0),
        "an upload completed without the gateway's clamp: {u:?} ({})",
        swallowed(&lab)
    );
    assert!(u.client_mss > CLAMP, "{u:?}");
    // Ingress is the router's alone now (the gateway clamped its DNATed SYNs too): the input
    // chain clamps the Internet client's SYN, the output chain the router's SYN-ACK.
    ingress_fits(&lab);
}
