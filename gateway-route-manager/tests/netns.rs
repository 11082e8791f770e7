//! Egress reconciler against the real kernel, in throwaway network namespaces (root needed).
//!
//! Each test builds a "router" namespace: `gwnet` (veth, 192.168.26.1/22, the gateway network;
//! gateways are 192.168.25.128+i) and `wan` (veth, 203.0.113.1/24) carrying the main table's
//! default route — the pod's own way out that client traffic must never take. Nothing is sent
//! except in `probe_leaves_through_its_own_gateway`, and only between namespaces created here;
//! every other check is a route lookup (`ip route get`).

// Test harness helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use gateway_route_manager::egress::{
    apply_sysctls, desired_sysctls, EgressManager, EgressMode, EgressSettings, NoneHealthy,
    ResilientSettings,
};
use gateway_route_manager::health::{
    probe_through, CheckKind, GatewayState, HealthChecker, HealthSettings, HealthyGateway,
    ProbeSettings,
};
use gateway_route_manager::{HealthyGateways, Metrics};
use serde_json::Value;

fn gw(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 25, 128 + u8::try_from(i).unwrap())
}

/// A network namespace deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        assert!(
            nix::unistd::geteuid().is_root(),
            "namespace tests need root (CAP_SYS_ADMIN + CAP_NET_ADMIN): run them as root, e.g. \
             via `make test`"
        );
        let name = format!("grm-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run `ip` ({e}): install iproute2 (apt-get install iproute2)")
            });
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS args...`, must succeed; returns stdout.
    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip -n NS args...` → (success, stdout + stderr).
    fn try_ip(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn json(&self, args: &[&str]) -> Vec<Value> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let text = self.ip(&full);
        if text.trim().is_empty() {
            return Vec::new();
        }
        serde_json::from_str::<Vec<Value>>(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    fn sysctl(&self, name: &str, value: &str) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-qw",
                &format!("{name}={value}"),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sysctl {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `f` on a thread inside this namespace, on its own current-thread runtime: sockets
    /// (netlink, TCP) opened there belong to the namespace.
    fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the test namespace (needs CAP_SYS_ADMIN)");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The router namespace described in the module doc.
fn router(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.ip(&[
        "link", "add", "gwnet", "type", "veth", "peer", "name", "gwpeer",
    ]);
    ns.ip(&["addr", "add", "192.168.26.1/22", "dev", "gwnet"]);
    ns.ip(&[
        "link", "add", "wan", "type", "veth", "peer", "name", "wanpeer",
    ]);
    ns.ip(&["addr", "add", "203.0.113.1/24", "dev", "wan"]);
    for dev in ["gwnet", "gwpeer", "wan", "wanpeer"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "203.0.113.254",
        "dev",
        "wan",
    ]);
    ns.sysctl("net.ipv4.ip_forward", "1");
    ns.sysctl("net.ipv4.conf.all.rp_filter", "0");
    ns.sysctl("net.ipv4.conf.gwnet.rp_filter", "0");
    ns
}

fn settings() -> EgressSettings {
    EgressSettings {
        interface: "gwnet".into(),
        gateways: (0..3).map(gw).collect(),
        exclude: vec!["10.0.0.0/8".parse().unwrap()],
        hash_seed: Some(0xdeadbeef),
        ..Default::default()
    }
}

fn healthy(indexes: &[usize]) -> HealthyGateways {
    HealthyGateways {
        complete: true,
        gateways: indexes
            .iter()
            .map(|&i| {
                (
                    i,
                    HealthyGateway {
                        address: gw(i),
                        public_ip: None,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
    }
}

/// What a client at 192.168.24.5 sending to `dst` would get (input-path lookup).
fn client_route(ns: &Netns, dst: &str) -> (bool, String) {
    ns.try_ip(&["route", "get", dst, "from", "192.168.24.5", "iif", "gwnet"])
}

fn group_members(ns: &Netns, id: u64) -> Option<Vec<u64>> {
    ns.json(&["nexthop", "show"])
        .into_iter()
        .find(|n| n["id"] == id)
        .map(|n| {
            n["group"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_u64().unwrap())
                .collect()
        })
}

fn table(ns: &Netns, t: &str) -> Vec<Value> {
    ns.json(&["route", "show", "table", t])
}

#[test]
fn plan_applies_and_second_pass_is_a_no_op() {
    let ns = router("apply");
    let report = {
        let s = settings();
        ns.run(move || async move {
            let metrics = Metrics::new();
            let mut m = EgressManager::new(s, metrics.clone()).unwrap();
            let first = m.reconcile(&healthy(&[0, 2])).await.unwrap();
            let second = m.reconcile(&healthy(&[0, 2])).await.unwrap();
            let counted: u64 = ["nexthop", "route", "rule"]
                .iter()
                .map(|o| {
                    let labels = gateway_route_manager::metrics::ObjectLabels {
                        object: (*o).into(),
                    };
                    metrics.egress_changes.get_or_create(&labels).get()
                })
                .sum();
            assert_eq!(
                counted, first.writes as u64,
                "route changes metric counts every write"
            );
            (first, second)
        })
    };
    assert!(report.0.writes > 0);
    assert_eq!(
        report.1.writes, 0,
        "second pass changed: {:?}",
        report.1.changes
    );

    let nexthops = ns.json(&["nexthop", "show"]);
    for i in 0..3u64 {
        let nh = nexthops
            .iter()
            .find(|n| n["id"] == 1800 + i)
            .expect("gateway nexthop");
        assert_eq!(nh["gateway"], gw(i as usize).to_string());
        assert_eq!(nh["dev"], "gwnet");
        assert_eq!(nh["protocol"], "245");
    }
    assert_eq!(group_members(&ns, 2056), Some(vec![1800, 1802]));

    let routes = table(&ns, "180");
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert!(routes
        .iter()
        .any(|r| r["dst"] == "default" && r["nhid"] == 2056));
    assert!(routes.iter().any(|r| r["type"] == "blackhole"
        && r["dst"] == "default"
        && r["metric"] == 4294967295u64));

    let rules = ns.json(&["rule", "show"]);
    assert!(rules
        .iter()
        .any(|r| r["priority"] == 10888 && r["table"] == "180" && r["src"] == "all"));
    assert!(rules
        .iter()
        .any(|r| r["priority"] == 10887 && r["dst"] == "10.0.0.0" && r["table"] == "main"));
    assert!(rules
        .iter()
        .any(|r| r["priority"] == 10887 && r["iif"] == "lo"));

    let (ok, text) = client_route(&ns, "8.8.8.8");
    assert!(
        ok && text.contains("dev gwnet") && text.contains("table 180"),
        "{text}"
    );
    assert!(
        text.contains("via 192.168.25.128") || text.contains("via 192.168.25.130"),
        "{text}"
    );
    let (ok, text) = client_route(&ns, "10.1.2.3");
    assert!(
        ok && text.contains("via 203.0.113.254 dev wan"),
        "intranet stays on main: {text}"
    );
    // The router's own traffic keeps the pod's routes.
    let (ok, text) = ns.try_ip(&["route", "get", "8.8.8.8"]);
    assert!(ok && text.contains("dev wan"), "{text}");
}

#[test]
fn hand_edits_are_repaired_and_foreign_objects_left_alone() {
    let ns = router("repair");
    let s = settings();
    let ns_name = ns.name.clone();
    let (repair, after) = ns.run(move || async move {
        let ns = Netns { name: ns_name };
        let mut m = EgressManager::new(s, Metrics::new()).unwrap();
        m.reconcile(&healthy(&[0, 1, 2])).await.unwrap();
        // Hand edits: our active route deleted, an exclusion rule deleted, the group shrunk.
        ns.ip(&["route", "del", "default", "table", "180", "metric", "0"]);
        ns.ip(&["rule", "del", "pref", "10887", "to", "10.0.0.0/8"]);
        ns.ip(&[
            "nexthop", "replace", "id", "2056", "group", "1800", "proto", "245",
        ]);
        // Someone else's objects in our table and at our priority.
        ns.ip(&[
            "route",
            "add",
            "8.8.4.0/24",
            "via",
            "192.168.25.200",
            "table",
            "180",
            "proto",
            "static",
        ]);
        ns.ip(&[
            "rule",
            "add",
            "pref",
            "10888",
            "from",
            "192.168.24.99",
            "lookup",
            "99",
        ]);
        let repair = m.reconcile(&healthy(&[0, 1, 2])).await.unwrap();
        let after = m.reconcile(&healthy(&[0, 1, 2])).await.unwrap();
        std::mem::forget(ns); // the outer guard deletes it
        (repair, after)
    });
    assert_eq!(repair.writes, 3, "{:?}", repair.changes);
    assert_eq!(after.writes, 0, "{:?}", after.changes);
    assert_eq!(group_members(&ns, 2056), Some(vec![1800, 1801, 1802]));
    assert!(table(&ns, "180").iter().any(|r| r["nhid"] == 2056));
    assert!(
        table(&ns, "180").iter().any(|r| r["dst"] == "8.8.4.0/24"),
        "foreign route kept"
    );
    let rules = ns.json(&["rule", "show"]);
    assert!(rules
        .iter()
        .any(|r| r["priority"] == 10887 && r["dst"] == "10.0.0.0"));
    assert!(
        rules.iter().any(|r| r["src"] == "192.168.24.99"),
        "foreign rule kept"
    );
}

#[test]
fn no_healthy_gateway_means_blackhole_never_main() {
    let ns = router("kill");
    let s = settings();
    let reports = ns.run(move || async move {
        let mut m = EgressManager::new(s, Metrics::new()).unwrap();
        m.reconcile(&healthy(&[1])).await.unwrap();
        m.reconcile(&healthy(&[])).await.unwrap()
    });
    assert_eq!(
        reports.writes, 2,
        "active route + group removed: {:?}",
        reports.changes
    );
    let routes = table(&ns, "180");
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["type"], "blackhole");
    assert_eq!(group_members(&ns, 2056), None);
    // The kernel refuses the lookup (blackhole: EINVAL) instead of using main's default route.
    let (ok, text) = client_route(&ns, "8.8.8.8");
    assert!(!ok && text.contains("Invalid argument"), "{text}");
    assert!(!text.contains("wan"), "{text}");
    let (ok, text) = client_route(&ns, "10.1.2.3");
    assert!(
        ok && text.contains("dev wan"),
        "intranet stays on main: {text}"
    );

    // Unreachable variant.
    let s = EgressSettings {
        when_none_healthy: NoneHealthy::Unreachable,
        ..settings()
    };
    let r = ns.run(move || async move {
        EgressManager::new(s, Metrics::new())
            .unwrap()
            .reconcile(&healthy(&[]))
            .await
            .unwrap()
    });
    assert_eq!(
        r.writes, 1,
        "kill switch replaced in place: {:?}",
        r.changes
    );
    assert_eq!(table(&ns, "180")[0]["type"], "unreachable");
    let (ok, text) = client_route(&ns, "8.8.8.8");
    assert!(!ok && text.contains("No route to host"), "{text}");
}

#[test]
fn interface_down_leaves_the_kill_switch() {
    let ns = router("down");
    let s = settings();
    ns.run(move || async move {
        EgressManager::new(s, Metrics::new())
            .unwrap()
            .reconcile(&healthy(&[0, 1]))
            .await
            .unwrap()
    });
    // The kernel flushes nexthops (and the routes using them) on a link going down.
    ns.ip(&["link", "set", "gwnet", "down"]);
    ns.ip(&["link", "set", "gwnet", "up"]);
    let routes = table(&ns, "180");
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["type"], "blackhole");
    let (ok, text) = client_route(&ns, "8.8.8.8");
    assert!(!ok && !text.contains("wan"), "{text}");
    // The next resync restores everything.
    let s = settings();
    let r = ns.run(move || async move {
        EgressManager::new(s, Metrics::new())
            .unwrap()
            .reconcile(&healthy(&[0, 1]))
            .await
            .unwrap()
    });
    assert!(r.writes >= 5, "{:?}", r.changes);
    assert_eq!(group_members(&ns, 2056), Some(vec![1800, 1801]));
}

#[test]
fn restart_adopts_with_zero_writes() {
    for (tag, mode) in [
        ("adopt-ecmp", EgressMode::Ecmp),
        (
            "adopt-res",
            EgressMode::EcmpResilient(ResilientSettings {
                buckets: 32,
                idle_timer: Duration::from_secs(30),
                unbalanced_timer: Duration::ZERO,
            }),
        ),
    ] {
        let ns = router(tag);
        let s = EgressSettings { mode, ..settings() };
        let s2 = s.clone();
        let first = ns.run(move || async move {
            let mut m = EgressManager::new(s, Metrics::new()).unwrap();
            m.bootstrap().await.unwrap();
            m.reconcile(&healthy(&[0, 1, 2])).await.unwrap()
        });
        assert!(first.writes > 0);
        let (boot, again, ready) = ns.run(move || async move {
            let mut m = EgressManager::new(s2, Metrics::new()).unwrap();
            let ready = m.first_reconcile_done();
            assert!(!*ready.borrow());
            let boot = m.bootstrap().await.unwrap();
            let again = m.reconcile(&healthy(&[0, 1, 2])).await.unwrap();
            let done = *ready.borrow();
            (boot, again, done)
        });
        assert_eq!(boot.writes, 0, "{tag}: {:?}", boot.changes);
        assert_eq!(again.writes, 0, "{tag}: {:?}", again.changes);
        assert!(ready, "first_reconcile_done set");
        if tag == "adopt-res" {
            let nh = ns.json(&["nexthop", "show", "id", "2056"]);
            assert_eq!(nh[0]["type"], "resilient");
            assert_eq!(nh[0]["resilient_args"]["buckets"], 32);
        }
    }
}

#[test]
fn mode_change_recreates_the_group_without_falling_through() {
    let ns = router("mode");
    let s = settings();
    ns.run(move || async move {
        EgressManager::new(s, Metrics::new())
            .unwrap()
            .reconcile(&healthy(&[0, 1]))
            .await
            .unwrap()
    });
    let s = EgressSettings {
        mode: EgressMode::EcmpResilient(ResilientSettings::default()),
        ..settings()
    };
    let r = ns.run(move || async move {
        EgressManager::new(s, Metrics::new())
            .unwrap()
            .reconcile(&healthy(&[0, 1]))
            .await
            .unwrap()
    });
    assert_eq!(
        r.writes, 3,
        "delete group, create resilient group, re-add route: {:?}",
        r.changes
    );
    assert_eq!(
        ns.json(&["nexthop", "show", "id", "2056"])[0]["type"],
        "resilient"
    );
    assert!(table(&ns, "180").iter().any(|r| r["nhid"] == 2056));
}

#[test]
fn multipath_sysctls_are_set_in_the_namespace() {
    let ns = router("sysctl");
    let errors = ns.run(|| async {
        apply_sysctls(&desired_sysctls(&settings()))
            .into_iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
    });
    let policy = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "sysctl",
            "-n",
            "net.ipv4.fib_multipath_hash_policy",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&policy.stdout).trim(), "1");
    let has_seed = std::path::Path::new("/proc/sys/net/ipv4/fib_multipath_hash_seed").exists();
    if has_seed {
        assert!(errors.is_empty(), "{errors:?}");
    } else {
        // Kernels before 6.11: a clear error naming the sysctl and the version it needs.
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("fib_multipath_hash_seed") && errors[0].contains("6.11"));
    }
}

/// The data-plane probe of gateway i leaves through gateway i only: a "gateway" namespace at
/// 192.168.25.128 owns the probe target 198.51.100.10:443; gateway 1 (.129) does not exist.
/// The router's own default route (a "node" that also reaches the target, like a pod's
/// primary network) is never taken, not even before the fwmark rules exist.
#[test]
fn probe_leaves_through_its_own_gateway() {
    let r = Netns::new("probe-r");
    let g = Netns::new("probe-g");
    let n = Netns::new("probe-n");
    r.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "nodepeer",
    ]);
    r.ip(&["link", "set", "nodepeer", "netns", &n.name]);
    r.ip(&["addr", "add", "10.42.1.5/16", "dev", "eth0"]);
    r.ip(&["link", "set", "eth0", "up"]);
    r.ip(&["route", "add", "default", "via", "10.42.0.1"]);
    n.ip(&["addr", "add", "10.42.0.1/16", "dev", "nodepeer"]);
    n.ip(&["addr", "add", "198.51.100.10/32", "dev", "lo"]);
    n.ip(&["link", "set", "nodepeer", "up"]);
    let _around = n.run(|| async { std::net::TcpListener::bind("198.51.100.10:443").unwrap() });
    r.ip(&[
        "link", "add", "gwnet", "type", "veth", "peer", "name", "gwpeer",
    ]);
    r.ip(&["link", "set", "gwpeer", "netns", &g.name]);
    r.ip(&["addr", "add", "192.168.26.1/22", "dev", "gwnet"]);
    r.ip(&["link", "set", "gwnet", "up"]);
    g.ip(&["addr", "add", "192.168.25.128/22", "dev", "gwpeer"]);
    g.ip(&["addr", "add", "198.51.100.10/32", "dev", "lo"]);
    g.ip(&["link", "set", "gwpeer", "up"]);
    // Like a real gateway: the target is not on the segment, so nobody answers ARP for it
    // (a socket bound to a device with no route assumes the destination is on-link).
    g.sysctl("net.ipv4.conf.all.arp_ignore", "1");

    let listener = g.run(|| async { std::net::TcpListener::bind("198.51.100.10:443").unwrap() });
    let target: SocketAddr = "198.51.100.10:443".parse().unwrap();
    let s = EgressSettings {
        interface: "gwnet".into(),
        gateways: vec![gw(0), gw(1)],
        exclude_reserved: false,
        destinations: vec!["203.0.113.0/24".parse().unwrap()],
        ..Default::default()
    };
    // Return routing owns the per-gateway tables and fwmark rules the probe uses.
    let rr = gateway_route_manager::ReturnRoutingSettings {
        interface: "gwnet".into(),
        gateways: vec![gw(0), gw(1)],
        nft_table: format!("grm_probe_{}", std::process::id()),
        ..Default::default()
    };
    let (through_0, through_1, unmarked, before_rules, status) = r.run(move || async move {
        let t = Duration::from_millis(500);
        // Before return routing: unbound, the marked probe would leave by the default route
        // and succeed around the gateway; bound to the gateways' interface it finds no route.
        let before_rules = (
            probe_through(target, 0x1900, None, t).await,
            probe_through(target, 0x1900, Some("gwnet"), t).await,
        );
        let mut m = EgressManager::new(s, Metrics::new()).unwrap();
        m.reconcile(&healthy(&[])).await.unwrap();
        let mut rr = gateway_route_manager::ReturnRoutingManager::new(
            rr,
            gateway_route_manager::ReturnRoutingMetrics::new(),
        )
        .unwrap();
        rr.reconcile(&healthy(&[])).await.unwrap();
        let probes = (
            probe_through(target, 0x1900, Some("gwnet"), t).await,
            probe_through(target, 0x1901, Some("gwnet"), t).await,
            probe_through(target, 0, Some("gwnet"), t).await,
        );
        // The health checker with only the probe check: gateway 0 healthy, gateway 1 not.
        let settings = HealthSettings {
            gateways: vec![gw(0), gw(1)],
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
            checks: vec![CheckKind::Probe],
            probe: Some(ProbeSettings {
                target,
                mark_base: 0x1900,
                interface: "gwnet".into(),
            }),
            fetch_forwarded_ports: false,
            ..Default::default()
        };
        let (checker, mut set) = HealthChecker::new(settings, Metrics::new()).unwrap();
        let status = checker.status();
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(checker.run(cancel.clone()));
        let set = tokio::time::timeout(Duration::from_secs(3), set.wait_for(|s| s.complete))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert_eq!(set.indexes().collect::<Vec<_>>(), vec![0]);
        cancel.cancel();
        task.await.unwrap();
        let status = status.borrow().clone();
        (probes.0, probes.1, probes.2, before_rules, status)
    });
    before_rules
        .0
        .expect("unbound, the probe reaches the target by the default route");
    let e = before_rules
        .1
        .expect_err("bound to the gateways' interface, no route before the rules exist");
    assert!(e.contains("unreachable") || e.contains("timed out"), "{e}");
    assert_eq!(status[0].state, GatewayState::Healthy);
    assert!(status[0].probe_rtt_seconds.is_some());
    assert_eq!(status[1].state, GatewayState::Unhealthy);
    assert_eq!(status[1].last_reason_kind, Some("probe_failed"));
    drop(listener);
    let rtt = through_0.expect("probe through gateway 0 reaches the target");
    assert!(rtt < Duration::from_millis(500));
    let e1 = through_1.expect_err("gateway 1 does not exist");
    assert!(e1.contains("0x1901"), "{e1}");
    let e = unmarked.expect_err("without a mark there is no route to the target");
    assert!(e.contains("unreachable") || e.contains("timed out"), "{e}");
    let rules = r.json(&["rule", "show"]);
    assert!(rules
        .iter()
        .any(|x| x["priority"] == 1000 && x["fwmark"] == "0x1900" && x["table"] == "50"));
}

/// The supervisor's view: `run` installs the kill switch at once, waits for a complete healthy
/// set, follows changes, repairs a hand edit at the next resync and stops on cancel, leaving
/// the kernel as it is.
#[test]
fn run_loop_bootstraps_follows_and_resyncs() {
    let ns = router("run");
    let name = ns.name.clone();
    let s = EgressSettings {
        resync_interval: Duration::from_millis(100),
        ..settings()
    };
    ns.run(move || async move {
        let ns = Netns { name };
        let (tx, rx) = tokio::sync::watch::channel(HealthyGateways::default());
        let m = EgressManager::new(s, Metrics::new()).unwrap();
        let mut ready = m.first_reconcile_done();
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(m.run(rx, cancel.clone()));

        tokio::time::sleep(Duration::from_millis(150)).await;
        let routes = table(&ns, "180");
        assert_eq!(
            routes.len(),
            1,
            "kill switch only before the first healthy set: {routes:?}"
        );
        assert_eq!(routes[0]["type"], "blackhole");
        assert!(ns
            .json(&["rule", "show"])
            .iter()
            .any(|r| r["priority"] == 10888));
        assert!(!*ready.borrow(), "not ready before the first reconcile");

        tx.send(healthy(&[0, 1])).unwrap();
        tokio::time::timeout(Duration::from_secs(2), ready.wait_for(|r| *r))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(group_members(&ns, 2056), Some(vec![1800, 1801]));

        ns.ip(&["route", "del", "default", "table", "180", "metric", "0"]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            table(&ns, "180").iter().any(|r| r["nhid"] == 2056),
            "resync repaired the route"
        );

        tx.send(healthy(&[])).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(group_members(&ns, 2056), None);

        cancel.cancel();
        task.await.unwrap();
        let routes = table(&ns, "180");
        assert_eq!(routes.len(), 1, "state kept on shutdown: {routes:?}");
        std::mem::forget(ns);
    });
}

/// Which gateway each of `flows` (client source port) is routed to, via `ip -batch` lookups.
fn gateway_per_flow(ns: &Netns, flows: &[u16]) -> Vec<String> {
    use std::io::Write as _;
    let script: String = flows
        .iter()
        .map(|sport| {
            format!(
                "route get 8.8.8.8 from 192.168.24.5 iif gwnet ipproto tcp sport {sport} dport 443\n"
            )
        })
        .collect();
    let mut child = Command::new("ip")
        .args(["-n", &ns.name, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let via: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(" via ").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert_eq!(via.len(), flows.len());
    via
}

/// Baseline for the flow-stable issue: of 400 flows over 4 gateways, how many keep their
/// gateway when one gateway dies (route lookups with the L4 hash; no traffic).
#[test]
fn flows_kept_when_one_of_four_gateways_dies() {
    let flows: Vec<u16> = (0..400).map(|i| 20000 + i * 7).collect();
    let mut kept_by_mode = Vec::new();
    for (tag, mode) in [
        ("flows-hash", EgressMode::Ecmp),
        (
            "flows-res",
            EgressMode::EcmpResilient(ResilientSettings::default()),
        ),
    ] {
        let ns = router(tag);
        ns.sysctl("net.ipv4.fib_multipath_hash_policy", "1");
        let s = EgressSettings {
            mode,
            gateways: (0..4).map(gw).collect(),
            ..settings()
        };
        let s2 = s.clone();
        ns.run(move || async move {
            EgressManager::new(s, Metrics::new())
                .unwrap()
                .reconcile(&healthy(&[0, 1, 2, 3]))
                .await
                .unwrap()
        });
        let before = gateway_per_flow(&ns, &flows);
        let used: std::collections::BTreeSet<_> = before.iter().collect();
        assert_eq!(used.len(), 4, "{tag}: all 4 gateways carry flows");
        ns.run(move || async move {
            EgressManager::new(s2, Metrics::new())
                .unwrap()
                .reconcile(&healthy(&[0, 2, 3]))
                .await
                .unwrap()
        });
        let after = gateway_per_flow(&ns, &flows);
        let dead = gw(1).to_string();
        let possible = before.iter().filter(|g| **g != dead).count();
        let kept = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != dead && b == a)
            .count();
        assert!(
            after.iter().all(|g| *g != dead),
            "{tag}: nothing goes to the dead gateway"
        );
        println!(
            "{tag}: {kept} of {} flows kept their gateway ({possible} possible)",
            flows.len()
        );
        kept_by_mode.push((kept, possible));
    }
    let (hash_kept, hash_possible) = kept_by_mode[0];
    let (res_kept, res_possible) = kept_by_mode[1];
    assert_eq!(
        res_kept, res_possible,
        "resilient group keeps every flow not on the dead gateway"
    );
    assert!(
        hash_kept < hash_possible,
        "hash-threshold moves some surviving flows"
    );
}

/// A reload that moves the egress table and rule priority: the new manager's first reconcile
/// (with the old settings to retire) leaves no rule or route of the old ones, and the next
/// reconcile writes nothing. Without `retire_previous` the old rules stay (checked first).
#[test]
fn a_changed_table_and_rule_priority_leave_nothing_behind() {
    let ns = router("retire");
    let name = ns.name.clone();
    let old = settings();
    let new = EgressSettings {
        table: 181,
        rule_priority: 20888,
        ..settings()
    };
    let (orphans_without, after, again) = ns.run(move || async move {
        let ns = std::mem::ManuallyDrop::new(Netns { name });
        let mut a = EgressManager::new(old.clone(), Metrics::new()).unwrap();
        a.reconcile(&healthy(&[0, 1])).await.unwrap();
        // Without retiring: the old rules survive the new manager.
        let mut b = EgressManager::new(new.clone(), Metrics::new()).unwrap();
        b.reconcile(&healthy(&[0, 1])).await.unwrap();
        let old_rules = |ns: &Netns| {
            ns.json(&["rule", "show"])
                .iter()
                .filter(|r| r["priority"] == 10888 || r["priority"] == 10887)
                .count()
        };
        let orphans_without = old_rules(&ns);
        // With retiring: a fresh manager for the new settings removes them.
        let mut c = EgressManager::new(new, Metrics::new()).unwrap();
        c.retire_previous(&old);
        c.reconcile(&healthy(&[0, 1])).await.unwrap();
        let after = (old_rules(&ns), table(&ns, "180").len());
        let again = c.reconcile(&healthy(&[0, 1])).await.unwrap();
        (orphans_without, after, again)
    });
    assert!(
        orphans_without > 0,
        "the old rules were gone without retiring: the check proves nothing"
    );
    assert_eq!(
        after,
        (0, 0),
        "rules at the old priorities, routes in the old table 180"
    );
    assert_eq!(again.writes, 0, "{:?}", again.changes);
    let rules = ns.json(&["rule", "show"]);
    assert!(
        rules
            .iter()
            .any(|r| r["priority"] == 20888 && r["table"] == "181"),
        "{rules:?}"
    );
}

/// Local routes (`local_route` virtual servers): added, adopted without a write, a hand
/// deletion repaired, an unwanted one of ours deleted, the kernel's own local routes and a
/// foreign one left alone; and the address is then delivered locally.
#[test]
fn local_routes_are_owned_adopted_and_cleaned_up() {
    use gateway_route_manager::local_routes::{LocalRoutes, LocalRoutesError, LocalRoutesReport};
    use std::collections::BTreeSet;
    async fn sync(
        w: &BTreeSet<Ipv4Addr>,
        src: Option<&str>,
    ) -> Result<LocalRoutesReport, LocalRoutesError> {
        LocalRoutes::open()?.sync(w, src).await
    }

    let ns = router("localrt");
    // A foreign local route (protocol static) must survive every sync.
    ns.ip(&[
        "route",
        "add",
        "local",
        "10.99.0.1",
        "dev",
        "lo",
        "table",
        "local",
        "proto",
        "static",
    ]);
    let set = |a: &[&str]| -> BTreeSet<Ipv4Addr> { a.iter().map(|s| s.parse().unwrap()).collect() };
    let ours = |ns: &Netns| -> Vec<String> {
        ns.ip(&["-4", "route", "show", "table", "local", "proto", "245"])
            .lines()
            .map(|l| l.trim().to_owned())
            .collect()
    };

    let want = set(&["10.33.0.10", "10.33.0.11"]);
    let w = want.clone();
    let r = ns.run(move || async move { sync(&w, Some("gwnet")).await.unwrap() });
    assert_eq!(r.added.len(), 2, "{r:?}");
    assert_eq!(r.in_force, want);
    assert_eq!(
        ours(&ns),
        [
            "local 10.33.0.10 dev lo scope host src 192.168.26.1",
            "local 10.33.0.11 dev lo scope host src 192.168.26.1"
        ]
    );
    // Delivered locally: the kernel says so for a packet arriving from the gateway network.
    let get = ns.ip(&[
        "route",
        "get",
        "10.33.0.10",
        "from",
        "192.168.24.5",
        "iif",
        "gwnet",
    ]);
    assert!(get.starts_with("local 10.33.0.10"), "{get}");

    // The router's own packets to it leave from its gateway-network address.
    let get = ns.ip(&["route", "get", "10.33.0.10"]);
    assert!(get.contains("src 192.168.26.1"), "{get}");

    // A second pass (a restarted daemon) writes nothing.
    let w = want.clone();
    let r = ns.run(move || async move { sync(&w, Some("gwnet")).await.unwrap() });
    assert!(r.added.is_empty() && r.deleted.is_empty(), "{r:?}");

    // Deleted by hand: repaired.
    ns.ip(&[
        "route",
        "del",
        "local",
        "10.33.0.11",
        "dev",
        "lo",
        "table",
        "local",
    ]);
    let w = want.clone();
    let r = ns.run(move || async move { sync(&w, Some("gwnet")).await.unwrap() });
    assert_eq!(r.added, vec!["10.33.0.11".parse::<Ipv4Addr>().unwrap()]);

    // No longer wanted: ours go, the foreign one and the kernel's stay.
    let r = ns.run(|| async { sync(&BTreeSet::new(), None).await.unwrap() });
    assert_eq!(r.deleted.len(), 2, "{r:?}");
    assert!(ours(&ns).is_empty(), "{:?}", ours(&ns));
    let local = ns.ip(&["-4", "route", "show", "table", "local"]);
    assert!(
        local.contains("local 10.99.0.1 dev lo proto static"),
        "{local}"
    );
    assert!(
        local.contains("local 192.168.26.1 dev gwnet proto kernel"),
        "{local}"
    );
}
