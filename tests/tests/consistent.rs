//! `egress.mode: consistent` in the daemon, as root, on the netns lab: 400 long-lived TCP
//! flows from a client pod over 4 gateways and 2 routers. When one gateway dies, exactly the
//! flows on it stop and every other flow keeps working; when the master router is killed, the
//! backup (which computed the same bucket table from the same healthy set) carries every
//! remaining flow on.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::unwrap_used
)]

use std::time::{Duration, Instant};

use lab::config::RouterTuning;
use lab::gluetun::GatewayBreak;
use lab::Lab;

const LAB_BIN: &str = env!("CARGO_BIN_EXE_vpn-router-lab");
const FLOWS: usize = 400;
const BOUND: Duration = Duration::from_secs(15);

fn logs(lab: &Lab) -> String {
    lab.routers()
        .iter()
        .map(|r| {
            let log = std::fs::read_to_string(&r.log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            format!(
                "--- router {}:\n{}",
                r.index,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
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

/// Buckets per gateway address in router k's /status (empty when unknown).
fn shares(lab: &Lab, k: usize) -> Vec<(String, u64)> {
    lab.router(k)
        .status()
        .ok()
        .and_then(|s| {
            s["components"]["gateways"]["detail"]["return_routing"]["gateways"]
                .as_array()
                .map(|g| {
                    g.iter()
                        .map(|g| {
                            (
                                g["gateway"].as_str().unwrap_or_default().to_owned(),
                                g["buckets"].as_u64().unwrap_or(0),
                            )
                        })
                        .collect()
                })
        })
        .unwrap_or_default()
}

fn all_assigned(lab: &Lab, k: usize, healthy: usize) -> bool {
    let s = shares(lab, k);
    s.iter().filter(|(_, b)| *b > 0).count() == healthy
        && s.iter().map(|(_, b)| b).sum::<u64>() == 4093
}

#[test]
fn gateway_loss_moves_only_its_flows_and_router_failover_moves_none() {
    let lab = Lab::builder()
        .lab_bin(LAB_BIN)
        .gateways(4)
        .routers(2)
        .clients(1)
        .ingress_pods(0)
        .dns(false)
        .tuning(RouterTuning {
            egress_mode: "consistent".into(),
            checks: vec!["vpn_status".into(), "public_ip".into()],
            log_level: "debug".into(),
            ..RouterTuning::default()
        })
        .build()
        .unwrap_or_else(|e| panic!("building the lab failed: {e}"));
    for k in 0..2 {
        wait_for(
            &lab,
            "every router to spread the buckets over 4 gateways",
            |l| all_assigned(l, k, 4),
        );
    }
    assert_eq!(
        shares(&lab, 0),
        shares(&lab, 1),
        "same table on both routers"
    );
    wait_for(&lab, "router 0 to hold the egress VIP", |l| {
        l.router(0).holds_egress_vip()
    });

    // One flow first, so a broken data plane fails fast instead of timing out 400 times.
    let one = lab.client(0).open_flows(1, Duration::from_secs(3)).unwrap();
    assert_eq!(
        one.flows.len(),
        1,
        "the client cannot reach the Internet\n{}",
        logs(&lab)
    );
    drop(one);
    let mut flows = lab
        .client(0)
        .open_flows(FLOWS, Duration::from_secs(3))
        .unwrap();
    let by_exit = flows.by_exit();
    eprintln!(
        "opened {} flows ({} failed); per exit IP: {by_exit:?}",
        flows.flows.len(),
        flows.failed_to_open
    );
    assert_eq!(flows.flows.len(), FLOWS);
    assert_eq!(by_exit.len(), 4, "every gateway carries flows");
    assert!(flows.check(Duration::from_secs(2)).iter().all(|a| *a));

    // Gateway 1 dies: exactly its flows stop.
    let dead = lab.gateway(1).public_ip();
    lab.gateway(1).break_as(GatewayBreak::ApiStopped).unwrap();
    for k in 0..2 {
        wait_for(&lab, "every router to drop gateway 1's buckets", |l| {
            all_assigned(l, k, 3)
        });
    }
    assert_eq!(
        shares(&lab, 0),
        shares(&lab, 1),
        "same table on both routers"
    );
    let alive = flows.check(Duration::from_secs(2));
    let on_dead = flows.flows.iter().filter(|f| f.exit_ip == dead).count();
    let mut wrong = Vec::new();
    for (f, a) in flows.flows.iter().zip(&alive) {
        if *a == (f.exit_ip == dead) {
            wrong.push((f.stream.local_addr().unwrap(), f.exit_ip, *a));
        }
    }
    let kept = alive.iter().filter(|a| **a).count();
    eprintln!(
        "gateway 1 lost: {kept} of {FLOWS} flows kept, {on_dead} were on it ({} possible)",
        FLOWS - on_dead
    );
    assert!(wrong.is_empty(), "flows with the wrong fate: {wrong:?}");

    // The master dies: the backup takes the VIP and carries every surviving flow.
    let survivors: Vec<usize> = (0..flows.flows.len()).filter(|&i| alive[i]).collect();
    lab.router(0).kill_pod().unwrap();
    wait_for(&lab, "router 1 to take the egress VIP", |l| {
        l.router(1).holds_egress_vip()
    });
    // A moment for the backup's gratuitous ARP to reach the client.
    std::thread::sleep(Duration::from_millis(300));
    let after = flows.check(Duration::from_secs(3));
    let kept_failover = survivors.iter().filter(|&&i| after[i]).count();
    eprintln!(
        "router failover: {kept_failover} of {} surviving flows kept",
        survivors.len()
    );
    assert_eq!(kept_failover, survivors.len());
    let leaked = lab.leaked_packets().unwrap();
    assert_eq!(leaked, 0, "client packets leaked past the VPN");
}
