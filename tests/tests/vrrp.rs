//! VRRP in the daemon, as root, on the netns lab with two real `vpn-router` processes: the
//! backup takes over when the master's links die, on kill -9 and on SIGTERM (handoff without
//! a lost ping), gateway tracking moves the VIP away from a router whose gateways are all
//! unreachable, SIGHUP does not move the VIP, and a master restarted after kill -9 adopts its
//! VIPs. Clients always reach the Internet host through the egress VIP afterwards.
//!
//! No timing assertions beyond generous correctness bounds: `make bench` measures outages.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::unwrap_used
)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lab::config::RouterTuning;
use lab::{topo, Lab, RouterLink};

const LAB_BIN: &str = env!("CARGO_BIN_EXE_vpn-router-lab");
/// Generous bound for anything VRRP does at 100 ms adverts (Master_Down is about 0.35 s).
const VRRP_BOUND: Duration = Duration::from_secs(5);

fn tuning() -> RouterTuning {
    RouterTuning {
        // The flow-stable mode is another issue; ecmp carries client traffic here.
        egress_mode: "ecmp".into(),
        checks: vec!["vpn_status".into(), "public_ip".into()],
        log_level: "debug".into(),
        ..RouterTuning::default()
    }
}

fn lab_with(t: RouterTuning) -> Lab {
    let b = Lab::builder()
        .lab_bin(LAB_BIN)
        .gateways(2)
        .routers(2)
        .clients(1)
        .ingress_pods(0)
        .dns(false)
        .tuning(t);
    let lab = match b.build() {
        Ok(l) => l,
        Err(e) => panic!("building the lab failed: {e}"),
    };
    wait_for(&lab, "router 0 (priority 160) to be the only master", |l| {
        holders(l) == [0]
    });
    wait_internet(&lab, "through router 0");
    lab
}

/// Routers (by index) whose namespace holds the egress VIP.
fn holders(lab: &Lab) -> Vec<usize> {
    lab.routers()
        .iter()
        .filter(|r| r.holds_egress_vip())
        .map(|r| r.index)
        .collect()
}

fn logs(lab: &Lab) -> String {
    lab.router_log_tails(40)
}

fn wait_for(lab: &Lab, what: &str, ok: impl Fn(&Lab) -> bool) {
    let deadline = Instant::now() + VRRP_BOUND;
    while Instant::now() < deadline {
        if ok(lab) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "waited {VRRP_BOUND:?} for {what}; VIP holders now {:?}\n{}",
        holders(lab),
        logs(lab)
    );
}

/// The client reaches the Internet host through the egress VIP (retried for the bound).
fn wait_internet(lab: &Lab, what: &str) {
    let deadline = Instant::now() + VRRP_BOUND;
    let mut last = String::new();
    while Instant::now() < deadline {
        match lab.client(0).exit_ip(Duration::from_millis(500)) {
            Ok(ip) => {
                assert!(
                    lab.gateways().iter().any(|g| g.public_ip() == ip),
                    "the Internet saw {ip}, not a gateway's exit IP"
                );
                return;
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "the client did not reach the Internet {what} within {VRRP_BOUND:?}: {last}\n{}",
        logs(lab)
    );
}

/// The `vrrp` instance `router` in a router's /status.
fn instance(lab: &Lab, k: usize) -> serde_json::Value {
    let s = lab.router(k).status().unwrap();
    s["components"]["vrrp"]["detail"]["instances"][0].clone()
}

/// Samples, every few ms while `action` runs and for `after` more, whether at least one
/// router holds the VIP; returns the number of samples where none did.
fn samples_without_holder(lab: &Lab, after: Duration, action: impl FnOnce()) -> (usize, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let stop2 = stop.clone();
        let watcher = s.spawn(move || {
            let (mut n, mut none) = (0, 0);
            while !stop2.load(Ordering::SeqCst) {
                n += 1;
                if holders(lab).is_empty() {
                    none += 1;
                }
            }
            (n, none)
        });
        // Stops the watcher even when `action` panics (the scope would wait for it forever).
        struct StopOnDrop(Arc<AtomicBool>);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let guard = StopOnDrop(stop.clone());
        action();
        std::thread::sleep(after);
        drop(guard);
        watcher.join().unwrap()
    })
}

fn assert_no_leak(lab: &Lab) {
    assert_eq!(
        lab.leaked_packets().unwrap(),
        0,
        "client traffic leaked through the node"
    );
}

#[test]
fn link_cut_of_the_master_moves_the_vip_and_back() {
    let lab = lab_with(tuning());
    let r0 = lab.router(0);
    for l in [RouterLink::Gateway, RouterLink::Vrrp, RouterLink::Pod] {
        r0.cut_link(l).unwrap();
    }
    wait_for(&lab, "router 1 to take the VIP", |l| {
        l.router(1).holds_egress_vip()
    });
    wait_internet(&lab, "through router 1 after router 0's links died");
    assert_eq!(instance(&lab, 1)["state"], "master");
    for l in [RouterLink::Gateway, RouterLink::Vrrp, RouterLink::Pod] {
        r0.restore_link(l).unwrap();
    }
    // Router 0 has the higher priority and preempts; router 1 lets go.
    wait_for(&lab, "router 0 to preempt and router 1 to let go", |l| {
        holders(l) == [0]
    });
    wait_internet(&lab, "through router 0 again");
    assert_no_leak(&lab);

    // /status counts the adverts (read from the metrics with each request): the master's
    // sent count grows and the backup has received them.
    let sent = |l: &Lab| instance(l, 0)["adverts_sent"].as_u64().unwrap_or(0);
    let before = sent(&lab);
    wait_for(&lab, "router 0's /status to count more adverts sent", |l| {
        sent(l) > before
    });
    assert!(
        instance(&lab, 1)["adverts_received"].as_u64().unwrap_or(0) > 0,
        "router 1's /status counts no advert received: {}",
        instance(&lab, 1)
    );
}

#[test]
fn kill_9_of_the_master_moves_the_vip() {
    let lab = lab_with(tuning());
    lab.router(0).kill_pod().unwrap();
    wait_for(&lab, "router 1 to take the VIP", |l| {
        l.router(1).holds_egress_vip()
    });
    wait_internet(&lab, "through router 1 after router 0 was killed");
    assert_no_leak(&lab);
}

#[test]
fn sigterm_hands_over_without_losing_the_vip_or_a_ping() {
    sigterm_handoff(Duration::from_millis(100));
}

#[test]
fn sigterm_hands_over_at_10ms_adverts() {
    sigterm_handoff(Duration::from_millis(10));
}

/// The whole SIGTERM path: signal → priority-0 advert (on the wire) → successor heard (the
/// reason logged) → VIPs released (never a moment without a holder, no ping to the VIP lost)
/// → VMAC deleted → exit 0.
fn sigterm_handoff(advert_interval: Duration) {
    let lab = lab_with(RouterTuning {
        advert_interval,
        ..tuning()
    });
    let cap = lab.capture(lab.switch(), "brvrrp", "ip proto 112").unwrap();
    let mut exit = None;
    let mut ping = None;
    let (samples, none) = samples_without_holder(&lab, Duration::from_millis(500), || {
        ping = Some(lab.client(0).ping_outage(
            topo::EGRESS_VIP,
            Duration::from_millis(10),
            Duration::from_secs(3),
            Duration::from_millis(500),
            || exit = lab.router(0).sigterm(VRRP_BOUND),
        ));
    });
    let out = ping.unwrap().unwrap();
    // VRRP priority is the third byte of the VRRP header (20-byte IPv4 header, no options).
    let prio0 = cap
        .stop_and_count(&format!(
            "ip proto 112 and ip src {} and ip[22] = 0",
            topo::router_vrrp(0)
        ))
        .unwrap();
    assert!(prio0 >= 1, "no priority-0 advert from router 0 on the wire");
    assert_eq!(
        out.lost(),
        0,
        "pings to the VIP lost during the SIGTERM handoff: {out:?}\n{}",
        logs(&lab)
    );
    let exit = exit.unwrap_or_else(|| panic!("router 0 did not exit on SIGTERM\n{}", logs(&lab)));
    assert!(exit.contains("exit status: 0"), "router 0 exited: {exit}");
    assert!(samples > 20, "only {samples} samples of the VIP holders");
    assert_eq!(
        none,
        0,
        "{none} of {samples} samples saw no router holding the VIP\n{}",
        logs(&lab)
    );
    assert_eq!(
        holders(&lab),
        [1],
        "router 1 must hold the VIP, router 0 not"
    );
    assert_eq!(instance(&lab, 1)["state"], "master");
    let log0 = std::fs::read_to_string(&lab.router(0).log_path).unwrap();
    assert!(
        log0.contains("reason=\"shutdown_handed_off\"") && log0.contains("VRRP instance stopped"),
        "router 0 did not hand over to a successor it heard:\n{log0}"
    );
    // The VMAC goes with a clean stop.
    let links = lab.router(0).ns.ip(&["-o", "link"]).unwrap();
    assert!(!links.contains("vrrp4."), "VMAC left behind: {links}");
    wait_internet(&lab, "through router 1 after the handoff");
    assert_no_leak(&lab);
}

#[test]
fn track_gateways_moves_the_vip_off_a_router_whose_gateways_are_all_broken() {
    let lab = lab_with(tuning());
    let r0 = lab.router(0);
    // Every gateway's control server becomes unreachable from router 0 only (router 1 still
    // sees them healthy): 160 - 50 = 110 < 150.
    r0.ns
        .nft(&format!(
            "table ip vrrptest {{\n chain out {{\n  type filter hook output priority 0;\n  tcp dport {} drop\n }}\n}}\n",
            topo::GLUETUN_PORT
        ))
        .unwrap();
    wait_for(&lab, "router 1 to take the VIP from router 0", |l| {
        holders(l) == [1]
    });
    let st = instance(&lab, 0);
    assert_eq!(st["state"], "backup", "{st}");
    assert_eq!(st["effective_priority"], 110, "{st}");
    wait_internet(&lab, "through router 1");
    // Router 0's gateways come back: it preempts again.
    r0.ns.nft("delete table ip vrrptest\n").unwrap();
    wait_for(&lab, "router 0 to take the VIP back", |l| holders(l) == [0]);
    wait_internet(&lab, "through router 0 again");
    assert_no_leak(&lab);
}

#[test]
fn sighup_does_not_move_the_vip() {
    let lab = lab_with(tuning());
    let transitions = |k| instance(&lab, k)["transitions"].as_u64().unwrap();
    let before = (transitions(0), transitions(1));
    let vip2 = format!("inet {}/", topo::ingress_vip(2));
    assert!(!lab
        .router(0)
        .ns
        .ip(&["-4", "-o", "addr"])
        .unwrap()
        .contains(&vip2));
    let (samples, none) = samples_without_holder(&lab, Duration::from_millis(1500), || {
        for r in lab.routers() {
            // Applied in place: a lower priority (still above router 1's) ...
            r.rewrite_config(|y| y.replace("priority: 160", "priority: 155"))
                .unwrap();
            // ... and a restart-in-place: one more gateway, so one more ingress VIP.
            r.rewrite_config(|y| {
                y.replace(
                    &format!("    - {}\n", topo::gateway(1)),
                    &format!("    - {}\n    - {}\n", topo::gateway(1), topo::gateway(2)),
                )
            })
            .unwrap();
            r.sighup();
        }
    });
    assert_eq!(
        none,
        0,
        "{none} of {samples} samples saw no VIP holder\n{}",
        logs(&lab)
    );
    assert_eq!(
        holders(&lab),
        [0],
        "the VIP moved on SIGHUP\n{}",
        logs(&lab)
    );
    wait_for(&lab, "router 0 to announce priority 155", |l| {
        instance(l, 0)["effective_priority"] == 155
    });
    wait_for(&lab, "router 0 to hold the new ingress VIP", |l| {
        l.router(0)
            .ns
            .ip(&["-4", "-o", "addr"])
            .unwrap()
            .contains(&vip2)
    });
    assert!(
        !lab.router(1)
            .ns
            .ip(&["-4", "-o", "addr"])
            .unwrap()
            .contains(&vip2),
        "the backup holds an ingress VIP"
    );
    let st1 = instance(&lab, 1);
    assert_eq!(st1["state"], "backup", "{st1}");
    // Router 1 restarted its instance (new VIP set) and went straight back to backup;
    // router 0 kept being master (its new instance adopted the VIPs).
    assert_eq!(instance(&lab, 0)["state"], "master");
    let after = (transitions(0), transitions(1));
    assert!(
        after.0 <= 1 && after.1 <= 1,
        "before {before:?}, after {after:?}"
    );
    for r in lab.routers() {
        let s = r.status().unwrap();
        assert_eq!(s["daemon"]["reloads_ok"], 1, "{s}");
    }
    wait_internet(&lab, "after the reload");
}

#[test]
fn restart_of_the_master_adopts_its_vips() {
    let lab = lab_with(tuning());
    let backup_before = instance(&lab, 1)["transitions"].as_u64().unwrap();
    let out = lab
        .client(0)
        .ping_outage(
            topo::EGRESS_VIP,
            Duration::from_millis(10),
            Duration::from_secs(2),
            Duration::from_millis(300),
            || lab.router(0).restart().unwrap(),
        )
        .unwrap();
    assert_eq!(
        holders(&lab),
        [0],
        "the VIP moved on restart\n{}",
        logs(&lab)
    );
    let st0 = instance(&lab, 0);
    assert_eq!(st0["state"], "master", "{st0}");
    assert_eq!(
        instance(&lab, 1)["transitions"].as_u64().unwrap(),
        backup_before,
        "router 1 changed state while router 0 restarted\n{}",
        logs(&lab)
    );
    assert_eq!(out.lost(), 0, "pings to the VIP lost: {out:?}");
    let log0 = std::fs::read_to_string(&lab.router(0).log_path).unwrap();
    assert!(
        log0.contains("vips_present=true"),
        "no adoption in the log:\n{log0}"
    );
    wait_internet(&lab, "after the restart");
}
