//! The lab itself, as root: setup/teardown leave nothing behind (also after a kill -9 of the
//! lab's owner), the gluetun mock answers every endpoint and break mode, and the gateways'
//! SNAT/DNAT plumbing works with a hand-made route (before vpn-router's engines exist).
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::unwrap_used
)]

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lab::gluetun::GatewayBreak;
use lab::netns::{self, Netns};
use lab::{topo, GluetunAuth, Lab, LabBuilder};

const LAB_BIN: &str = env!("CARGO_BIN_EXE_vpn-router-lab");

/// A lab without routers running (the daemon is not what these tests test).
fn builder() -> LabBuilder {
    Lab::builder().lab_bin(LAB_BIN).start_routers(false)
}

fn build(b: LabBuilder) -> Lab {
    match b.build() {
        Ok(l) => l,
        Err(e) => panic!("building the lab failed: {e}"),
    }
}

fn assert_gone(names: &[String], pids: &[i32], what: &str) {
    let left: Vec<String> = netns::list_namespaces()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "{what}: namespaces left behind: {left:?}");
    let alive: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|p| netns::pid_alive(*p))
        .collect();
    assert!(
        alive.is_empty(),
        "{what}: processes left running: {alive:?}"
    );
}

#[test]
fn build_and_teardown_repeatedly_leaves_nothing() {
    let mut setups = Vec::new();
    let mut teardowns = Vec::new();
    for round in 0..3 {
        let lab = build(
            builder()
                .gateways(4)
                .routers(2)
                .clients(2)
                .ingress_pods(2)
                .dns(round == 0),
        );
        let names = lab.namespace_names();
        let pids = lab.pids();
        let dir = lab.dir.clone();
        // 4 gluetun mocks, Internet echo, intranet echo, 2 ingress services (+ named).
        assert!(
            pids.len() >= 8,
            "round {round}: expected the lab's servers, got {pids:?}"
        );
        for n in &names {
            assert!(netns::list_namespaces().contains(n), "{n} missing");
        }
        // No bridge or veth of the lab leaked into the host namespace.
        let host_links = netns::run(Command::new("ip").args(["-o", "link"])).unwrap();
        let host_links = String::from_utf8_lossy(&host_links.stdout).into_owned();
        for l in ["brgw", "brvrrp", "g-r0", "g-gw0"] {
            assert!(
                !host_links.contains(&format!(": {l}")),
                "{l} found in the host namespace"
            );
        }
        setups.push(lab.setup_time);
        let t = Instant::now();
        drop(lab);
        teardowns.push(t.elapsed());
        assert_gone(&names, &pids, &format!("round {round}"));
        assert!(!dir.exists(), "lab dir {} left behind", dir.display());
    }
    eprintln!("setup times {setups:?}, teardown times {teardowns:?}");
}

/// Starts `vpn-router-lab up` as a child, returns it with its prefix, namespaces and pids.
fn start_owner() -> (std::process::Child, String, Vec<String>) {
    let mut child = Command::new(LAB_BIN)
        .args([
            "up",
            "--gateways",
            "2",
            "--routers",
            "1",
            "--clients",
            "1",
            "--ingress-pods",
            "1",
            "--no-routers",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vpn-router-lab up");
    let mut prefix = String::new();
    let mut names = Vec::new();
    let out = child.stdout.take().unwrap();
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        if let Some(p) = line.strip_prefix("prefix ") {
            prefix = p.to_string();
        } else if let Some(n) = line.strip_prefix("ns ") {
            names.push(n.to_string());
        } else if line == "ready" {
            break;
        }
    }
    assert!(
        !prefix.is_empty() && !names.is_empty(),
        "vpn-router-lab up did not report a lab"
    );
    (child, prefix, names)
}

#[test]
fn kill_9_of_the_owner_then_a_new_lab_leaves_nothing() {
    for use_cleanup_command in [false, true] {
        let (mut child, prefix, names) = start_owner();
        let nss: Vec<Netns> = names.iter().map(|n| Netns::named(n)).collect();
        let pids: Vec<i32> = netns::pids_in(&nss).into_iter().map(|(_, p)| p).collect();
        assert!(
            pids.len() >= 4,
            "the child's lab should run servers: {pids:?}"
        );
        child.kill().unwrap(); // SIGKILL: no Drop, no signal handler
        child.wait().unwrap();
        // The crash really left the lab behind...
        assert!(
            netns::list_namespaces().iter().any(|n| names.contains(n)),
            "expected {prefix}'s namespaces to outlive its owner"
        );
        // ...and the next lab (or `vpn-router-lab cleanup`) removes it.
        if use_cleanup_command {
            let out = Command::new(LAB_BIN).arg("cleanup").output().unwrap();
            assert!(out.status.success());
            assert!(
                String::from_utf8_lossy(&out.stdout).contains(&prefix),
                "cleanup did not report {prefix}"
            );
        } else {
            let lab = build(
                builder()
                    .gateways(1)
                    .routers(1)
                    .clients(1)
                    .ingress_pods(0)
                    .dns(false),
            );
            assert_gone(&names, &pids, "after the new lab's sweep");
            let new_names = lab.namespace_names();
            let new_pids = lab.pids();
            drop(lab);
            assert_gone(&new_names, &new_pids, "the new lab");
        }
        assert_gone(&names, &pids, "after the sweep");
        assert!(
            !std::path::Path::new(netns::LAB_ROOT).join(&prefix).exists(),
            "the dead lab's directory was not removed"
        );
    }
}

#[test]
fn gluetun_mock_answers_each_endpoint_and_break_mode() {
    let key = "k-123";
    let lab = build(
        builder()
            .gateways(1)
            .routers(1)
            .clients(1)
            .ingress_pods(0)
            .dns(false)
            .gateway_auth(GluetunAuth::ApiKey { key: key.into() }),
    );
    let g = lab.gateway(0);
    let auth = [("X-API-Key", key)];
    let get = |path: &str| g.control_get(path, &auth).unwrap();
    let json = |path: &str| -> serde_json::Value {
        let r = get(path);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        serde_json::from_str(&r.body).unwrap()
    };

    assert_eq!(json("/v1/vpn/status")["status"], "running");
    assert_eq!(json("/v1/publicip/ip")["public_ip"], "203.0.113.10");
    // The example forwards fixed ports: gluetun's own port forwarding never ran.
    assert_eq!(
        json("/v1/portforward"),
        serde_json::json!({ "port": 0, "ports": null })
    );
    assert_eq!(get("/v1/openvpn/portforwarded").status, 301);
    assert_eq!(g.control_get("/v1/vpn/status", &[]).unwrap().status, 401);
    assert_eq!(g.health_get().unwrap().status, 200);

    // The router reaches the control server across the gateway bridge.
    let r = lab
        .router(0)
        .ns
        .run_in(|| {
            lab::http::request(
                "GET",
                "http://192.168.25.128:8000/v1/vpn/status",
                &auth,
                "",
                Duration::from_secs(2),
            )
        })
        .unwrap()
        .unwrap();
    assert_eq!(r.body, r#"{"status":"running"}"#);

    g.break_as(GatewayBreak::ApiStopped).unwrap();
    assert_eq!(json("/v1/vpn/status")["status"], "stopped");
    assert_eq!(json("/v1/publicip/ip")["public_ip"], "");
    assert_eq!(g.health_get().unwrap().status, 500);
    g.repair().unwrap();

    g.break_as(GatewayBreak::PublicIpEmpty).unwrap();
    assert_eq!(json("/v1/vpn/status")["status"], "running");
    assert_eq!(json("/v1/publicip/ip")["public_ip"], "");
    g.repair().unwrap();

    g.break_as(GatewayBreak::AuthChanged).unwrap();
    assert_eq!(get("/v1/vpn/status").status, 401);
    assert_eq!(get("/v1/publicip/ip").status, 401);
    g.repair().unwrap();
    assert_eq!(get("/v1/vpn/status").status, 200);

    g.break_as(GatewayBreak::TunnelDead).unwrap();
    assert_eq!(json("/v1/vpn/status")["status"], "running");
    assert_eq!(json("/v1/publicip/ip")["public_ip"], "203.0.113.10");
    assert_eq!(
        g.health_get().unwrap().status,
        200,
        "gluetun's health is stale here"
    );
    g.repair().unwrap();

    g.break_as(GatewayBreak::ProcessGone).unwrap();
    assert!(
        g.control_get("/v1/vpn/status", &auth).is_err(),
        "killed mock still answers"
    );
    assert!(g.health_get().is_err());
    g.repair().unwrap();
    assert_eq!(json("/v1/vpn/status")["status"], "running");

    // PUT /v1/vpn/status stops the VPN, as gluetun's does.
    let r =
        g.ns.run_in(|| {
            lab::http::request(
                "PUT",
                "http://192.168.25.128:8000/v1/vpn/status",
                &auth,
                r#"{"status":"stopped"}"#,
                Duration::from_secs(2),
            )
        })
        .unwrap()
        .unwrap();
    assert_eq!(r.body, r#"{"outcome":"stopped"}"#);
    assert_eq!(json("/v1/vpn/status")["status"], "stopped");
}

#[test]
fn hand_made_route_egress_ingress_and_leak_plumbing() {
    let lab = build(
        builder()
            .gateways(3)
            .routers(1)
            .clients(1)
            .ingress_pods(1)
            .dns(false),
    );
    let c = lab.client(0);
    // Nothing holds the VIP yet: requests fail rather than leak.
    assert!(c.exit_ip(Duration::from_millis(300)).is_err());

    for i in 0..3 {
        lab.static_egress(0, i).unwrap();
        let g = lab.gateway(i);
        let before = g.egress_packets().unwrap();
        let seen = c.exit_ip(Duration::from_secs(2)).unwrap();
        assert_eq!(seen, g.public_ip(), "exit through gateway {i}");
        assert!(
            g.egress_packets().unwrap() > before,
            "gateway {i} counted nothing"
        );
        assert!(lab
            .internet_seen()
            .iter()
            .any(|(k, peer, _)| k == "http" && peer.ip() == std::net::IpAddr::V4(g.public_ip())));

        // A silently dead tunnel drops the traffic; repair restores it.
        g.break_as(GatewayBreak::TunnelDead).unwrap();
        assert!(
            c.exit_ip(Duration::from_millis(300)).is_err(),
            "dead tunnel still forwards"
        );
        g.repair().unwrap();
        assert_eq!(c.exit_ip(Duration::from_secs(2)).unwrap(), g.public_ip());

        // Long-lived flows exit where the route says and echo.
        let mut flows = c.open_flows(3, Duration::from_secs(1)).unwrap();
        assert_eq!(flows.flows.len(), 3);
        assert!(flows.flows.iter().all(|f| f.exit_ip == g.public_ip()));
        assert!(flows.check(Duration::from_secs(1)).iter().all(|a| *a));
    }
    // Ingress: the remote client reaches an ingress pod through gateway 2's forwarded port when
    // the pod holds that gateway's ingress VIP by hand; the reply returns through gateway 2.
    let pod = lab.ingress_pod(0);
    pod.ns
        .ip(&[
            "addr",
            "add",
            &format!("{}/32", topo::ingress_vip(2)),
            "dev",
            "gw0",
        ])
        .unwrap();
    let url = format!(
        "http://{}:{}/whoami",
        topo::gateway_public(2),
        lab.gateway(2).forwarded_port().unwrap()
    );
    let r = lab.internet_http_get(&url, Duration::from_secs(2)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["server"], "ingress-pod-0");
    assert_eq!(
        v["local"],
        format!("{}:{}", topo::ingress_vip(2), topo::INGRESS_PORT)
    );
    assert!(
        v["peer"].as_str().unwrap().starts_with("203.0.113.1:"),
        "{v}"
    );

    // Intranet traffic uses the pod network, never a gateway.
    let body = c.http_get("http://10.244.0.1/").unwrap();
    assert_eq!(body.trim(), topo::client_pod(0).to_string());

    // The leak path is observable: with the router's own default route, the node forwards
    // client packets to the Internet and counts them.
    assert_eq!(lab.leaked_packets().unwrap(), 0);
    lab.router(0)
        .ns
        .ip(&[
            "route",
            "replace",
            "default",
            "via",
            "10.244.0.1",
            "dev",
            "eth0",
        ])
        .unwrap();
    let cap = lab.capture(lab.node(), "wan0", "tcp").unwrap();
    let _ = c.exit_ip(Duration::from_millis(300));
    assert!(
        lab.leaked_packets().unwrap() > 0,
        "the leak counter missed a leak"
    );
    // ...and is on the wire: the node's Internet side sent it with the node's own address.
    let n = cap
        .stop_and_count(&format!(
            "src host {} and dst host {}",
            topo::NODE_PUBLIC,
            topo::INTERNET_ECHO
        ))
        .unwrap();
    assert!(n > 0, "tcpdump saw no leaked packet on the node's wan0");
}

#[test]
fn two_labs_side_by_side() {
    let mk = || {
        build(
            builder()
                .gateways(2)
                .routers(1)
                .clients(1)
                .ingress_pods(0)
                .dns(false),
        )
    };
    let (a, b) = std::thread::scope(|s| {
        let ha = s.spawn(mk);
        let hb = s.spawn(mk);
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_ne!(a.prefix, b.prefix);
    a.static_egress(0, 0).unwrap();
    b.static_egress(0, 1).unwrap();
    let ea = a.client(0).exit_ip(Duration::from_secs(2)).unwrap();
    let eb = b.client(0).exit_ip(Duration::from_secs(2)).unwrap();
    assert_eq!(ea, Ipv4Addr::new(203, 0, 113, 10));
    assert_eq!(eb, Ipv4Addr::new(203, 0, 113, 11));
    let a_names = a.namespace_names();
    let a_pids = a.pids();
    drop(a);
    assert_gone(&a_names, &a_pids, "lab a");
    // b is untouched by a's teardown.
    assert_eq!(b.client(0).exit_ip(Duration::from_secs(2)).unwrap(), eb);
}

#[test]
fn measurement_helpers_see_what_happened() {
    use lab::RouterLink;
    use std::net::SocketAddr;
    let lab = build(
        builder()
            .gateways(2)
            .routers(1)
            .clients(1)
            .ingress_pods(0)
            .dns(false),
    );
    lab.static_egress(0, 0).unwrap();
    let c = lab.client(0);

    // A 300 ms cable cut between the client's next hop and the switch shows up as a gap.
    let r = lab.router(0);
    let out = c
        .ping_outage(
            topo::EGRESS_VIP,
            Duration::from_millis(10),
            Duration::from_secs(2),
            Duration::from_millis(300),
            || {
                r.cut_link(RouterLink::Gateway).unwrap();
                std::thread::sleep(Duration::from_millis(300));
                r.restore_link(RouterLink::Gateway).unwrap();
            },
        )
        .unwrap();
    assert!(out.sent > 100, "{out:?}");
    assert!(
        out.lost() >= 15,
        "a 300 ms cut at 10 ms pings lost only {}",
        out.lost()
    );
    assert!(
        out.longest_gap >= Duration::from_millis(250)
            && out.longest_gap < Duration::from_millis(1500),
        "{out:?}"
    );

    // Long-lived flows on gateway 0 die with its tunnel; new connections fail until the
    // route moves to gateway 1 (done by hand here, ~500 ms after the break).
    let mut flows = c.open_flows(5, Duration::from_secs(1)).unwrap();
    assert_eq!(flows.by_exit().get(&topo::gateway_public(0)), Some(&5));
    let g0 = lab.gateway(0);
    let timeline = lab::probe::connection_timeline(
        &c.ns,
        SocketAddr::from((topo::INTERNET_ECHO, 7)),
        Duration::from_millis(20),
        Duration::from_millis(100),
        Duration::from_millis(2000),
        Duration::from_millis(200),
        || {
            g0.break_as(GatewayBreak::TunnelDead).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            lab.static_egress(0, 1).unwrap();
        },
    )
    .unwrap();
    let failed: Vec<_> = timeline.iter().filter(|(_, r)| r.is_none()).collect();
    let last_fail = failed
        .iter()
        .map(|(t, _)| *t)
        .max()
        .expect("no failure seen");
    assert!(
        last_fail > Duration::from_millis(400) && last_fail < Duration::from_millis(1200),
        "last failure at {last_fail:?}"
    );
    assert!(timeline
        .iter()
        .any(|(t, r)| *t > Duration::from_millis(1200) && *r == Some(topo::gateway_public(1))));
    assert!(
        flows.check(Duration::from_millis(300)).iter().all(|a| !a),
        "flows on a dead tunnel still echo"
    );
}

#[test]
fn routers_run_with_the_generated_config() {
    let lab = build(
        Lab::builder()
            .lab_bin(LAB_BIN)
            .gateways(2)
            .routers(2)
            .clients(1)
            .ingress_pods(1)
            .dns(true),
    );
    let router_bin = lab::lab::find_binary("vpn-router", "VPN_ROUTER_BIN");
    for r in lab.routers() {
        let out = Command::new(&router_bin)
            .arg("check-config")
            .arg(&r.config_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "check-config rejects the lab's config: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(r.api_get("/healthz").unwrap().status, 200);
        let st = r.status().unwrap();
        assert!(st["components"].is_object(), "/status: {st}");
        let metrics = r.api_get("/metrics").unwrap();
        assert!(metrics.body.contains("vpn_router_"), "{}", metrics.body);
    }
    // The lab can signal, cut, kill and restart a router.
    let r1 = lab.router(1);
    r1.sighup();
    std::thread::sleep(Duration::from_millis(200));
    assert!(r1.is_running(), "SIGHUP stopped router 1");
    r1.cut_link(lab::RouterLink::Vrrp).unwrap();
    assert!(r1
        .ns
        .ip(&["link", "show", "vrrp0"])
        .unwrap()
        .contains("NO-CARRIER"));
    r1.restore_link(lab::RouterLink::Vrrp).unwrap();
    let st = r1
        .sigterm(Duration::from_secs(5))
        .expect("router 1 ignored SIGTERM");
    assert!(st.contains("exit status: 0"), "router 1 exited with {st}");
    r1.restart().unwrap();
    assert_eq!(r1.api_get("/healthz").unwrap().status, 200);
    r1.kill9();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!r1.is_running());
    r1.start().unwrap();
    // Whatever the daemon does or does not do yet, client traffic never leaks.
    let _ = lab.client(0).exit_ip(Duration::from_millis(300));
    assert_eq!(
        lab.leaked_packets().unwrap(),
        0,
        "client traffic leaked via the node"
    );
}

/// The demo's scenes measure correctly: on a lab with a hand-made route through gateway 0 and
/// no routers running, the tour must report exactly what that lab does.
#[test]
fn demo_tour_reports_what_the_lab_does() {
    let lab = build(
        builder()
            .gateways(2)
            .routers(1)
            .clients(1)
            .ingress_pods(0)
            .dns(true),
    );
    lab.static_egress(0, 0).unwrap();
    let s = lab::demo::tour(&lab, false).unwrap();
    assert_eq!(s.routers_running, 0);
    assert_eq!(s.failed_requests, 0);
    assert_eq!(
        s.exits.get(&topo::gateway_public(0)),
        Some(&40),
        "{:?}",
        s.exits
    );
    assert_eq!(s.leaked_packets, 0);
    assert!(s.failover.is_none(), "no master: scene 2 must be skipped");
    // Gateway 1 breaks but carries nothing here: no flow or connection is affected.
    assert!(!s.gateway_never_left && s.gateway_left_after.is_none());
    assert_eq!(s.flows, Some((40, 40, 40)));
    // No DDNS in this lab: the zone has no records and the tour says so.
    assert!(s.dns_records.is_none());
}

/// A lab whose owner pid is alive but belongs to another process now (pid reuse) is stale:
/// its recorded start time does not match.
#[test]
fn sweep_sees_through_pid_reuse() {
    let prefix = format!("vrl{}x9999", std::process::id());
    let dir = std::path::Path::new(netns::LAB_ROOT).join(&prefix);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(netns::OWNER_FILE), "1").unwrap();
    let ns = Netns::create(&format!("{prefix}-gw0")).unwrap();
    assert!(!netns::lab_owner_alive(&prefix));
    // (A lab built concurrently by another test may sweep it first; either way it goes.)
    netns::sweep_stale();
    assert!(!ns.path().exists());
    assert!(!dir.exists());
}
