//! The shipped router Deployment, run as a kubelet runs it (tests/src/kube/): its ConfigMap,
//! Secrets and NADs read from deploy/ as files, two router pods from the image `make image`
//! builds, the kubelet's probes polled throughout. `make test-kubelet` runs these (they need the
//! image, so plain `cargo test` lists them as ignored).
//!
//! What the run does not honour of the spec, and what it changes on this kernel, is printed at
//! the start of each test.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lab::kube::cluster::router_config;
use lab::kube::{Cluster, ClusterOptions, RouterPod, Sandbox};
use lab::probe;

/// The egress VIP (address, prefix) and the VRID, from the shipped config.
fn vip_and_vrid(c: &Cluster) -> (Ipv4Addr, u8) {
    let cfg = router_config(&c.objects).expect("router config");
    let vip = cfg["vrrp"][0]["virtual_ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("vrrp[0].virtual_ips[0].address");
    let vrid = cfg["vrrp"][0]["vrid"]
        .as_u64()
        .and_then(|v| u8::try_from(v).ok())
        .expect("vrrp[0].vrid");
    (vip, vrid)
}

/// `(interface, MAC)` of every interface holding `addr` in the pod.
fn holders(pod: &RouterPod, addr: Ipv4Addr) -> Vec<(String, String)> {
    let out = pod
        .sandbox
        .ns
        .ip(&["-j", "addr", "show"])
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|l| {
            l["addr_info"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["local"].as_str() == Some(&addr.to_string()))
        })
        .map(|l| {
            (
                l["ifname"].as_str().unwrap_or_default().to_string(),
                l["address"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn holds(pod: &RouterPod, addr: Ipv4Addr) -> bool {
    !holders(pod, addr).is_empty()
}

fn logs(c: &Cluster, pods: &[&RouterPod]) -> String {
    pods.iter()
        .map(|p| format!("--- {} log:\n{}", p.plan.container, c.log_tail(p, 25)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{what}: not within {timeout:?}"))
}

/// Both pods Ready and exactly one holding the VIP.
fn wait_settled(c: &Cluster, pods: &[&RouterPod], vip: Ipv4Addr) {
    let r = wait_for(
        "every router Ready and one VIP holder",
        Duration::from_secs(30),
        || {
            pods.iter().all(|p| p.prober.ready())
                && pods.iter().filter(|p| holds(p, vip)).count() == 1
        },
    );
    if let Err(e) = r {
        let state: Vec<String> = pods
            .iter()
            .map(|p| {
                format!(
                    "{}: ready {} holds VIP {}",
                    p.plan.container,
                    p.prober.ready(),
                    holds(p, vip)
                )
            })
            .collect();
        panic!(
            "{e}: {state:?}; probe failures {:?}\n{}",
            pods.iter()
                .flat_map(|p| p.prober.failures())
                .collect::<Vec<_>>(),
            logs(c, pods)
        );
    }
}

/// The exit IPs the Internet saw for `n` new connections from the client.
fn exit_ips(client: &Sandbox, target: Ipv4Addr, n: usize) -> Vec<Option<Ipv4Addr>> {
    client
        .ns
        .run_in(|| {
            (0..n)
                .map(|_| {
                    lab::http::get(&format!("http://{target}/"), Duration::from_secs(2))
                        .ok()
                        .filter(|r| r.status == 200)
                        .and_then(|r| r.body.trim().parse().ok())
                })
                .collect()
        })
        .expect("run in the client")
}

fn assert_no_probe_violations(pods: &[&RouterPod]) {
    let v: Vec<String> = pods.iter().flat_map(|p| p.prober.violations()).collect();
    assert!(
        v.is_empty(),
        "the kubelet's probes failed:\n{}",
        v.join("\n")
    );
}

/// The Deployment's rolling update of every pod (maxSurge 1, maxUnavailable 0): a new pod,
/// Ready for minReadySeconds, then one old pod deleted — the VIP holder first, the worst case.
fn rolling_restart(
    c: &Cluster,
    mut old: Vec<RouterPod>,
    vip: Ipv4Addr,
) -> Result<Vec<RouterPod>, String> {
    let min_ready = c.min_ready();
    let mut new = Vec::new();
    while !old.is_empty() {
        let p = c.start_router().map_err(|e| e.to_string())?;
        wait_for(
            "the new pod available",
            min_ready + Duration::from_secs(30),
            || p.prober.available(min_ready),
        )
        .map_err(|e| {
            format!(
                "{e}; failures {:?}\n{}",
                p.prober.failures(),
                c.log_tail(&p, 20)
            )
        })?;
        let idx = old.iter().position(|r| holds(r, vip)).unwrap_or(0);
        let victim = old.remove(idx);
        let grace = victim.plan.termination_grace;
        let name = victim.plan.container.clone();
        let t = c.delete_router(victim).map_err(|e| e.to_string())?;
        if t.exit_code != Some(0) || t.took >= grace {
            return Err(format!(
                "{name} after SIGTERM: exit {:?} in {:?} (grace {grace:?})",
                t.exit_code, t.took
            ));
        }
        eprintln!(
            "rolling restart: {name} stopped (exit 0) in {} ms after SIGTERM",
            t.took.as_millis()
        );
        new.push(p);
        let all: Vec<&RouterPod> = old.iter().chain(new.iter()).collect();
        wait_for(
            "one VIP holder after the deletion",
            Duration::from_secs(2),
            || all.iter().filter(|r| holds(r, vip)).count() == 1,
        )?;
    }
    Ok(new)
}

#[test]
#[ignore = "needs the image: make test-kubelet"]
fn shipped_deployment_runs_as_a_kubelet_runs_it() {
    let c = Cluster::build(ClusterOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let (vip, vrid) = vip_and_vrid(&c);
    let target = c.internet[0];
    let replicas = c.router_deployment().expect("Deployment").doc["spec"]["replicas"]
        .as_u64()
        .unwrap_or(1);
    let routers: Vec<RouterPod> = (0..replicas)
        .map(|_| c.start_router().unwrap_or_else(|e| panic!("{e}")))
        .collect();
    eprintln!("{}", c.report(&routers[0].plan));
    eprintln!("podman {}", routers[0].plan.podman_run.join(" "));
    let refs: Vec<&RouterPod> = routers.iter().collect();
    wait_settled(&c, &refs, vip);

    // Every component runs on both; `vpn-router status` in the container (kubectl exec) finds
    // the api through the image's config path and the pod's POD_IP.
    for r in &routers {
        let st = c.api_get(r, "/status").expect("/status");
        let v: serde_json::Value = serde_json::from_str(&st.body).expect("status JSON");
        let comps = v["components"].as_object().cloned().unwrap_or_default();
        assert!(!comps.is_empty(), "{}", st.body);
        for (name, comp) in &comps {
            assert_eq!(
                comp["state"],
                "running",
                "{}: component {name}: {comp}\n{}",
                r.plan.container,
                logs(&c, &refs)
            );
        }
        assert_eq!(
            v["daemon"]["egress_hashing"]["same_on_every_router"], true,
            "{}",
            st.body
        );
        let out = c
            .exec(r, &["vpn-router", "status"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.contains("ready: yes"), "{out}");
    }

    // The master holds the egress VIP and one ingress VIP per gateway, on the VMAC.
    let master = routers
        .iter()
        .find(|r| holds(r, vip))
        .expect("a VIP holder");
    let vmac = format!("00:00:5e:00:01:{vrid:02x}");
    for (ifname, mac) in holders(master, vip) {
        assert_eq!(
            mac, vmac,
            "the VIP sits on {ifname} with MAC {mac}, not on the VMAC"
        );
    }
    let cfg = router_config(&c.objects).expect("config");
    let first_ingress: Ipv4Addr = cfg["gateways"]["ingress_vip_start"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("ingress_vip_start");
    for i in 0..c.gateways.len() {
        let a = Ipv4Addr::from(u32::from(first_ingress) + u32::try_from(i).unwrap_or(0));
        assert!(holds(master, a), "the master lacks ingress VIP {a}");
    }

    // A client pod attached as the example client: its traffic reaches the Internet through
    // the gateways, spread over them, and none around them.
    let client = c
        .start_client("egress-client")
        .unwrap_or_else(|e| panic!("{e}"));
    let publics: Vec<Ipv4Addr> = c.gateways.iter().map(|g| g.public_ip).collect();
    let mut seen = std::collections::BTreeSet::new();
    wait_for(
        "the client reaching the Internet",
        Duration::from_secs(10),
        || exit_ips(&client, target, 1)[0].is_some(),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&c, &refs)));
    for ip in exit_ips(&client, target, 24) {
        let ip = ip.expect("every request answered");
        assert!(
            publics.contains(&ip),
            "exit IP {ip} is no gateway's ({publics:?})"
        );
        seen.insert(ip);
    }
    assert!(seen.len() >= 2, "24 connections all left by {seen:?}");
    assert_eq!(
        c.leaked_packets().expect("leak counter"),
        0,
        "client packets went around the VPN"
    );

    // The api listens on the pod IP only: a client on the VPN network cannot reach it on the VIP.
    let reach = client
        .ns
        .run_in(|| {
            TcpStream::connect_timeout(&SocketAddr::from((vip, 9090)), Duration::from_millis(500))
                .is_ok()
        })
        .expect("run in the client");
    assert!(!reach, "the api answers on the VIP {vip}:9090");

    // DDNS: the master wrote the gateways' public IPs to the intranet's DNS server.
    if c.ddns.is_some() {
        let mut want = publics.clone();
        want.sort();
        wait_for(
            "the DDNS name answering the gateways",
            Duration::from_secs(15),
            || c.ddns_records().unwrap_or_default() == want,
        )
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", c.ddns_records(), logs(&c, &refs)));
    }

    // A rolling restart of the Deployment under 10 ms pings through the VIP: no ping lost.
    let min_ready = c.min_ready();
    let window = (min_ready + Duration::from_secs(6)) * u32::try_from(replicas).unwrap_or(2);
    let mut result = Err("did not run".to_string());
    let outage = probe::ping_outage(
        &client.ns,
        target,
        Duration::from_millis(10),
        window,
        Duration::from_secs(1),
        || {
            result = rolling_restart(&c, routers, vip);
        },
    )
    .expect("ping");
    let routers = result.unwrap_or_else(|e| panic!("rolling restart: {e}"));
    eprintln!(
        "rolling restart: {} pings every 10 ms, {} lost, longest gap {} ms",
        outage.sent,
        outage.lost(),
        outage.longest_gap.as_millis()
    );
    let refs: Vec<&RouterPod> = routers.iter().collect();
    assert_eq!(
        outage.lost(),
        0,
        "pings lost during the rolling restart: {outage:?}\n{}",
        logs(&c, &refs)
    );
    assert_eq!(
        c.leaked_packets().expect("leak counter"),
        0,
        "leaked: {}",
        c.leaked_flows()
    );
    assert_no_probe_violations(&refs);
    // In the image as in the lab, a resync that finds everything in place writes nothing: the
    // nft table was created once (an image without /etc/protocols once made nft list protocol
    // numbers, and every 10 s resync rebuilt the table).
    for r in &routers {
        let m = c.api_get(r, "/metrics").expect("/metrics").body;
        let writes = m
            .lines()
            .find(|l| {
                l.starts_with("vpn_router_return_routing_changes_total{object=\"nft_table\"}")
            })
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok());
        assert!(
            r.started.elapsed() > Duration::from_secs(10),
            "{} is younger than a resync",
            r.plan.container
        );
        assert_eq!(
            writes,
            Some(1.0),
            "{}: nft table writes; log:\n{}",
            r.plan.container,
            c.log_tail(r, 30)
        );
    }
    let probes: u64 = refs.iter().map(|p| p.prober.probes_run()).sum();
    eprintln!("kubelet: {probes} probes of the new pods, none failed after Ready");
}

/// The pod dies with its node (container killed, its links gone, no goodbye advert): ping
/// outage through the VIP with the shipped VMAC and with `vmac: false`. A measurement for
/// docs/benchmarks.md, printed; the assertion is only that traffic comes back.
#[test]
#[ignore = "needs the image: make test-kubelet"]
fn crash_failover_through_the_vip_with_and_without_vmac() {
    let mut rows = Vec::new();
    for vmac in [true, false] {
        let c = Cluster::build(ClusterOptions {
            vmac: Some(vmac),
            ..ClusterOptions::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let (vip, _) = vip_and_vrid(&c);
        let target = c.internet[0];
        let mut routers = vec![
            c.start_router().expect("router"),
            c.start_router().expect("router"),
        ];
        let refs: Vec<&RouterPod> = routers.iter().collect();
        wait_settled(&c, &refs, vip);
        let client = c.start_client("egress-client").expect("client");
        wait_for(
            "the client reaching the Internet",
            Duration::from_secs(10),
            || exit_ips(&client, target, 1)[0].is_some(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let idx = routers
            .iter()
            .position(|r| holds(r, vip))
            .expect("a master");
        let master = routers.remove(idx);
        let outage = probe::ping_outage(
            &client.ns,
            target,
            Duration::from_millis(10),
            Duration::from_secs(5),
            Duration::from_secs(1),
            || {
                c.crash_router(master);
            },
        )
        .expect("ping");
        let after = probe::ping_outage(
            &client.ns,
            target,
            Duration::from_millis(10),
            Duration::from_secs(1),
            Duration::ZERO,
            || {},
        )
        .expect("ping");
        assert!(
            after.received > 0 && holds(&routers[0], vip),
            "no traffic after the crash (vmac {vmac}): {after:?}\n{}",
            logs(&c, &[&routers[0]])
        );
        rows.push(format!(
            "vmac {vmac:<5}: {} of {} pings lost, longest gap {} ms",
            outage.lost(),
            outage.sent,
            outage.longest_gap.as_millis()
        ));
    }
    eprintln!(
        "crash failover through the VIP (10 ms pings, 100 ms adverts):\n  {}",
        rows.join("\n  ")
    );
}
