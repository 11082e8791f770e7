//! DDNS in the real daemon: two `vpn-router` processes in the netns lab, configured by the lab
//! with `ddns.only_when_master: router` and RFC 2136 to the lab's BIND (203.0.113.53, TSIG key
//! `ddns-key`). The VRRP master writes the name, the backup never does, and after a failover
//! the new master keeps the name current.
//!
//! Needs root, `named`/`dig` (Debian `bind9`, `bind9-dnsutils`) and the binaries
//! (`cargo build -p vpn-router --bins && cargo build -p vpn-router-tests --bins`).
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::unwrap_used
)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use lab::{topo, GatewayBreak, Lab};

fn binary(name: &str, env: &str, build: &str) -> std::path::PathBuf {
    let bin = lab::lab::find_binary(name, env);
    assert!(
        bin.is_file(),
        "{} not found: build it with `{build}` (or set {env})",
        bin.display()
    );
    bin
}

fn publics(idx: &[usize]) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = idx.iter().map(|i| topo::gateway_public(*i)).collect();
    v.sort();
    v
}

fn wait_dns(lab: &Lab, want: &[Ipv4Addr], within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = lab.dns_a_records(topo::DDNS_HOSTNAME).unwrap();
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{} answers {got:?}, expected {want:?} within {within:?}",
            topo::DDNS_HOSTNAME
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sum of a metric's samples in router `k`'s /metrics (0 when absent).
fn metric(lab: &Lab, k: usize, name: &str) -> f64 {
    let body = lab.router(k).api_get("/metrics").unwrap().body;
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn master(lab: &Lab, within: Duration) -> usize {
    let start = Instant::now();
    loop {
        let holders: Vec<usize> = (0..lab.routers().len())
            .filter(|k| lab.router(*k).holds_egress_vip())
            .collect();
        if holders.len() == 1 {
            return holders[0];
        }
        assert!(
            start.elapsed() < within,
            "no single master within {within:?}: {holders:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn daemon_master_writes_backup_never_and_failover_keeps_the_name() {
    let lab = Lab::builder()
        .lab_bin(binary(
            "vpn-router-lab",
            "VPN_ROUTER_LAB_BIN",
            "cargo build -p vpn-router-tests --bins",
        ))
        .router_bin(binary(
            "vpn-router",
            "VPN_ROUTER_BIN",
            "cargo build -p vpn-router --bins",
        ))
        .gateways(3)
        .routers(2)
        .clients(0)
        .ingress_pods(0)
        .dns(true)
        .build()
        .unwrap_or_else(|e| panic!("lab: {e}"));
    let m = master(&lab, Duration::from_secs(10));
    let b = 1 - m;
    wait_dns(&lab, &publics(&[0, 1, 2]), Duration::from_secs(15));
    assert_eq!(metric(&lab, m, "vpn_router_ddns_writer"), 1.0);
    assert_eq!(metric(&lab, b, "vpn_router_ddns_writer"), 0.0);
    assert!(metric(&lab, m, "vpn_router_ddns_updates_total") >= 1.0);
    assert_eq!(
        metric(&lab, b, "vpn_router_ddns_updates_total"),
        0.0,
        "the backup attempted an update"
    );
    let start = Instant::now();
    loop {
        let st = lab.router(m).status().unwrap();
        if st["components"]["ddns"]["detail"]["writer"] == true
            && st["components"]["ddns"]["detail"]["records"]["A"] == 3
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "/status of the master: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A gateway breaks: it leaves the answer (health: interval 200 ms x fall 2, then DDNS).
    let broke = Instant::now();
    lab.gateway(2).break_as(GatewayBreak::ApiStopped).unwrap();
    wait_dns(&lab, &publics(&[0, 1]), Duration::from_secs(5));
    eprintln!(
        "daemon: gateway break -> DNS answer without it: {} ms",
        broke.elapsed().as_millis()
    );
    assert_eq!(
        metric(&lab, b, "vpn_router_ddns_updates_total"),
        0.0,
        "the backup attempted an update"
    );

    // The master dies: the backup takes over and keeps the name current.
    lab.router(m).kill_pod().unwrap();
    let start = Instant::now();
    while !lab.router(b).holds_egress_vip() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "router {b} did not take over"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.gateway(2).repair().unwrap();
    let t = wait_dns(&lab, &publics(&[0, 1, 2]), Duration::from_secs(10));
    eprintln!(
        "daemon: after failover, repaired gateway back in the answer after {} ms",
        t.as_millis()
    );
    assert_eq!(metric(&lab, b, "vpn_router_ddns_writer"), 1.0);
    assert!(metric(&lab, b, "vpn_router_ddns_last_success_timestamp_seconds") > 1.0e9);
}
