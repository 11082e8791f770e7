//! IPVS on a real kernel: every operation read back through our client and through Debian's
//! `ipvsadm -Ln` as an independent reader, and the reconciler end to end.
//!
//! These need a kernel with IPVS (this repository's VM harness boots one), root, and ipvsadm.
//! They are `#[ignore]`d so plain `cargo test` on a host without IPVS skips them; the VM runs
//! them with `--ignored`, and there they FAIL (never skip) when something is missing.
//!
//! Each test moves its thread into a fresh network namespace first: IPVS state is per
//! namespace, so the tests run in parallel without seeing each other, FLUSH is harmless, and
//! whatever a failing test leaves behind disappears with its namespace.
// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;

use ipvs::reconcile::{dump, plan};
use ipvs::{
    AddressFamily, DesiredService, Destination, ForwardMethod, IpvsClient, IpvsError, Netmask,
    Protocol, Reconciler, Service, ServiceFlags, ServiceKey, Timeouts, Tunnel, TunnelType,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A fresh network namespace for the calling thread (the tokio test runtime runs on it, and
/// so do the ipvsadm children it forks).
fn private_netns() {
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        panic!("unshare(CLONE_NEWNET) failed: {e}; these tests must run as root (in the VM: make test-vm)");
    }
    // A namespace without any address has no local routing table, and then the kernel's
    // inet_addr_type() calls every IPv4 destination "broadcast": IPVS refuses it with EINVAL.
    // Bringing lo up creates the table.
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap_or_else(|e| panic!("run ip: {e} (install iproute2)"));
    assert!(st.success(), "ip link set lo up: {st}");
}

async fn client() -> IpvsClient {
    private_netns();
    match IpvsClient::connect().await {
        Ok(c) => c,
        Err(IpvsError::NoIpvs) => {
            panic!("no IPVS in this kernel: run these tests in the VM (make test-vm)")
        }
        Err(e) => panic!("connect to IPVS: {e}"),
    }
}

fn ipvsadm(args: &[&str]) -> String {
    let out = Command::new("ipvsadm")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ipvsadm: {e} (install it: apt-get install ipvsadm)"));
    assert!(
        out.status.success(),
        "ipvsadm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ipvsadm -Ln` as (service line, destination lines), whitespace collapsed, e.g.
/// `("TCP 10.255.0.1:80 mh (mh-fallback,mh-port)", ["-> 10.255.1.1:80 Masq 1 0 0"])`.
fn ipvsadm_list(extra: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut args = vec!["-Ln"];
    args.extend_from_slice(extra);
    let text = ipvsadm(&args);
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines().skip(3) {
        let norm = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if norm.starts_with("->") {
            out.last_mut()
                .expect("destination before any service")
                .1
                .push(norm);
        } else if !norm.is_empty() {
            out.push((norm, Vec::new()));
        }
    }
    out
}

fn ipvsadm_service(prefix: &str) -> (String, Vec<String>) {
    let all = ipvsadm_list(&[]);
    all.iter()
        .find(|(s, _)| s.starts_with(prefix))
        .cloned()
        .unwrap_or_else(|| panic!("ipvsadm -Ln has no service {prefix:?}: {all:#?}"))
}

fn mh(key: ServiceKey) -> Service {
    Service::new(key, "mh").with_flags(ServiceFlags::FALLBACK | ServiceFlags::PORT)
}

fn masq(addr: &str, weight: u32) -> Destination {
    Destination::new(sa(addr), ForwardMethod::Masquerade, weight)
}

async fn sorted_dests(c: &IpvsClient, key: &ServiceKey) -> Vec<Destination> {
    let mut d: Vec<_> = c
        .dests(key)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.destination)
        .collect();
    d.sort_by_key(|d| d.addr);
    d
}

#[tokio::test]
#[ignore = "needs a kernel with IPVS: make test-vm"]
async fn info_and_timeouts() {
    let c = client().await;
    let info = c.info().await.unwrap();
    assert_eq!(info.version_string(), "1.2.1");
    assert!(info.conn_tab_size > 0);
    let t = Timeouts {
        tcp: 901,
        tcp_fin: 121,
        udp: 301,
    };
    c.set_timeouts(&t).await.unwrap();
    assert_eq!(c.timeouts().await.unwrap(), t);
    assert!(ipvsadm(&["-Ln", "--timeout"]).contains("901 121 301"));
    // Zero leaves a timeout unchanged.
    c.set_timeouts(&Timeouts {
        tcp: 0,
        tcp_fin: 0,
        udp: 77,
    })
    .await
    .unwrap();
    assert_eq!(
        c.timeouts().await.unwrap(),
        Timeouts {
            tcp: 901,
            tcp_fin: 121,
            udp: 77
        }
    );
}

#[tokio::test]
#[ignore = "needs a kernel with IPVS: make test-vm"]
async fn service_and_destination_lifecycle() {
    let c = client().await;
    let key = ServiceKey::tcp(sa("10.255.0.1:80"));
    let svc = mh(key);

    // NEW_SERVICE
    c.new_service(&svc).await.unwrap();
    assert_eq!(c.service(&key).await.unwrap().unwrap().service, svc);
    assert_eq!(
        ipvsadm_service("TCP 10.255.0.1:80").0,
        "TCP 10.255.0.1:80 mh (mh-fallback,mh-port)"
    );
    let err = c.new_service(&svc).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "add service TCP 10.255.0.1:80: File exists (EEXIST)"
    );

    // NEW_DEST, read back both ways
    c.new_dest(&key, &masq("10.255.1.2:80", 1)).await.unwrap();
    c.new_dest(&key, &masq("10.255.1.1:80", 2)).await.unwrap();
    assert_eq!(
        sorted_dests(&c, &key).await,
        vec![masq("10.255.1.1:80", 2), masq("10.255.1.2:80", 1)]
    );
    let (_, dests) = ipvsadm_service("TCP 10.255.0.1:80");
    assert!(
        dests.contains(&"-> 10.255.1.1:80 Masq 2 0 0".to_owned()),
        "{dests:?}"
    );
    assert!(
        dests.contains(&"-> 10.255.1.2:80 Masq 1 0 0".to_owned()),
        "{dests:?}"
    );
    let err = c
        .new_dest(&key, &masq("10.255.1.2:80", 1))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "add destination 10.255.1.2:80 to TCP 10.255.0.1:80: File exists (EEXIST)"
    );
    assert_eq!(err.errno(), Some(17));

    // SET_DEST: weight 0 (quiesce), forward method, thresholds
    let mut d = masq("10.255.1.1:80", 0);
    d.forward = ForwardMethod::Route;
    d.upper_threshold = 100;
    d.lower_threshold = 10;
    c.set_dest(&key, &d).await.unwrap();
    assert_eq!(
        sorted_dests(&c, &key).await,
        vec![d.clone(), masq("10.255.1.2:80", 1)]
    );
    let (_, dests) = ipvsadm_service("TCP 10.255.0.1:80");
    assert!(
        dests.contains(&"-> 10.255.1.1:80 Route 0 0 0".to_owned()),
        "{dests:?}"
    );
    let (_, with_thresholds) = ipvsadm_list(&["--thresholds"])
        .into_iter()
        .find(|(s, _)| s.starts_with("TCP 10.255.0.1:80"))
        .unwrap();
    let line = with_thresholds
        .iter()
        .find(|l| l.contains("10.255.1.1:80"))
        .unwrap();
    let cols: Vec<&str> = line.split(' ').collect();
    // --thresholds columns: RemoteAddress:Port Uthreshold Lthreshold ActiveConn InActConn
    assert_eq!(&cols[2..4], &["100", "10"], "{line}");

    // SET_SERVICE: scheduler and flags change in place, destinations stay
    let mut sh = svc.clone();
    sh.scheduler = "sh".into();
    sh.flags = ServiceFlags::FALLBACK;
    c.set_service(&sh).await.unwrap();
    assert_eq!(c.service(&key).await.unwrap().unwrap().service, sh);
    assert_eq!(
        ipvsadm_service("TCP 10.255.0.1:80").0,
        "TCP 10.255.0.1:80 sh (sh-fallback)"
    );
    assert_eq!(c.dests(&key).await.unwrap().len(), 2);

    // Persistence with an IPv4 netmask
    let mut persistent = sh.clone();
    persistent.scheduler = "rr".into();
    persistent.flags = ServiceFlags::PERSISTENT;
    persistent.timeout = 300;
    persistent.netmask = Netmask::V4(Ipv4Addr::new(255, 255, 255, 0));
    c.set_service(&persistent).await.unwrap();
    assert_eq!(c.service(&key).await.unwrap().unwrap().service, persistent);
    assert_eq!(
        ipvsadm_service("TCP 10.255.0.1:80").0,
        "TCP 10.255.0.1:80 rr persistent 300 mask 255.255.255.0"
    );

    // Statistics are read (zero here: no traffic)
    let entry = c
        .services()
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.service.key == key)
        .unwrap();
    assert_eq!(entry.stats.conns, 0);
    assert!(c
        .dests(&key)
        .await
        .unwrap()
        .iter()
        .all(|d| d.stats.conns == 0 && d.active_conns == 0));

    // DEL_DEST, DEL_SERVICE
    c.del_dest(&key, sa("10.255.1.2:80")).await.unwrap();
    assert_eq!(sorted_dests(&c, &key).await, vec![d.clone()]);
    let err = c.del_dest(&key, sa("10.255.1.2:80")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "delete destination 10.255.1.2:80 from TCP 10.255.0.1:80: No such file or directory (ENOENT)"
    );
    c.del_service(&key).await.unwrap();
    assert_eq!(c.service(&key).await.unwrap(), None);
    assert!(ipvsadm_list(&[]).is_empty());
    let err = c.del_service(&key).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "delete service TCP 10.255.0.1:80: No such service (ESRCH)"
    );
}

#[tokio::test]
#[ignore = "needs a kernel with IPVS: make test-vm"]
async fn udp_sctp_and_fwmark_services() {
    let c = client().await;
    let udp = Service::new(ServiceKey::udp(sa("10.255.0.2:53")), "rr");
    let sctp = Service::new(
        ServiceKey::Addr {
            protocol: Protocol::Sctp,
            addr: sa("10.255.0.3:3868"),
        },
        "wrr",
    );
    let fwm4 = Service::new(
        ServiceKey::Fwmark {
            af: AddressFamily::Inet,
            mark: 7,
        },
        "rr",
    );
    let fwm6 = Service::new(
        ServiceKey::Fwmark {
            af: AddressFamily::Inet6,
            mark: 7,
        },
        "sh",
    )
    .with_flags(ServiceFlags::PORT);
    for s in [&udp, &sctp, &fwm4, &fwm6] {
        c.new_service(s).await.unwrap();
    }
    c.new_dest(
        &fwm4.key,
        &Destination::new(sa("10.255.1.7:0"), ForwardMethod::Route, 1),
    )
    .await
    .unwrap();
    c.new_dest(
        &fwm6.key,
        &Destination::new(sa("[fd00:255::7]:0"), ForwardMethod::Route, 3),
    )
    .await
    .unwrap();

    let mut got: Vec<Service> = c
        .services()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.service)
        .collect();
    got.sort_by_key(|s| s.key);
    let mut want = vec![udp.clone(), sctp.clone(), fwm4.clone(), fwm6.clone()];
    want.sort_by_key(|s| s.key);
    assert_eq!(got, want);
    assert_eq!(
        sorted_dests(&c, &fwm6.key).await,
        vec![Destination::new(
            sa("[fd00:255::7]:0"),
            ForwardMethod::Route,
            3
        )]
    );

    let list: Vec<String> = ipvsadm_list(&[]).into_iter().map(|(s, _)| s).collect();
    for want in [
        "UDP 10.255.0.2:53 rr",
        "SCTP 10.255.0.3:3868 wrr",
        "FWM 7 rr",
        "FWM 7 IPv6 sh (sh-port)",
    ] {
        assert!(list.contains(&want.to_owned()), "{want:?} not in {list:#?}");
    }
    let (_, d6) = ipvsadm_service("FWM 7 IPv6");
    assert_eq!(d6, vec!["-> [fd00:255::7]:0 Route 3 0 0"]);

    // FLUSH removes everything (this namespace only).
    c.flush().await.unwrap();
    assert!(c.services().await.unwrap().is_empty());
    assert!(ipvsadm_list(&[]).is_empty());
}

#[tokio::test]
#[ignore = "needs a kernel with IPVS: make test-vm"]
async fn ipv6_services() {
    let c = client().await;
    let key = ServiceKey::tcp(sa("[fd00:26::80]:6666"));
    let svc = mh(key);
    c.new_service(&svc).await.unwrap();
    for d in [masq("[fd00:27::10]:6666", 1), masq("[fd00:27::2]:6666", 1)] {
        c.new_dest(&key, &d).await.unwrap();
    }
    let got = c.service(&key).await.unwrap().unwrap().service;
    assert_eq!(got, svc);
    assert_eq!(got.netmask, Netmask::V6Prefix(128));
    assert_eq!(
        sorted_dests(&c, &key).await,
        vec![masq("[fd00:27::2]:6666", 1), masq("[fd00:27::10]:6666", 1)]
    );
    let (line, dests) = ipvsadm_service("TCP [fd00:26::80]:6666");
    assert_eq!(line, "TCP [fd00:26::80]:6666 mh (mh-fallback,mh-port)");
    assert!(
        dests.contains(&"-> [fd00:27::10]:6666 Masq 1 0 0".to_owned()),
        "{dests:?}"
    );

    // Persistence granularity for IPv6 is a prefix length.
    let mut p = svc.clone();
    p.scheduler = "rr".into();
    p.flags = ServiceFlags::PERSISTENT;
    p.timeout = 600;
    p.netmask = Netmask::V6Prefix(64);
    c.set_service(&p).await.unwrap();
    assert_eq!(c.service(&key).await.unwrap().unwrap().service, p);
    assert_eq!(
        ipvsadm_service("TCP [fd00:26::80]:6666").0,
        "TCP [fd00:26::80]:6666 rr persistent 600 mask 64"
    );

    // A mixed-family destination is accepted with tunnel forwarding only.
    let mut tun = Destination::new(sa("10.255.1.9:6666"), ForwardMethod::Tunnel, 1);
    tun.tunnel = Some(Tunnel {
        kind: TunnelType::Ipip,
        port: 0,
        flags: 0,
    });
    c.new_dest(&key, &tun).await.unwrap();
    let dests = c.dests(&key).await.unwrap();
    assert!(dests.iter().any(|e| e.destination == tun), "{dests:?}");
    let err = c
        .new_dest(&key, &masq("10.255.1.10:6666", 1))
        .await
        .unwrap_err();
    assert_eq!(err.errno(), Some(22), "{err}");
}

fn owned_vips(key: &ServiceKey) -> bool {
    match key {
        ServiceKey::Addr { addr, .. } => match addr.ip() {
            IpAddr::V4(v4) => v4.octets()[..3] == [10, 255, 0],
            IpAddr::V6(v6) => v6.segments()[..2] == [0xfd00, 0x26],
        },
        ServiceKey::Fwmark { .. } => false,
    }
}

fn desired_state() -> Vec<DesiredService> {
    let mut out = Vec::new();
    for port in [6666u16, 7777] {
        let key = ServiceKey::tcp(SocketAddr::new("10.255.0.1".parse().unwrap(), port));
        let dests = (1..=4)
            .map(|i| masq(&format!("10.255.1.{i}:{port}"), 1))
            .collect();
        out.push(DesiredService {
            service: mh(key),
            destinations: dests,
        });
    }
    let key6 = ServiceKey::udp(sa("[fd00:26::1]:53"));
    out.push(DesiredService {
        service: Service::new(key6, "rr"),
        destinations: vec![masq("[fd00:27::53]:53", 1), masq("[fd00:27::54]:53", 1)],
    });
    out
}

#[tokio::test]
#[ignore = "needs a kernel with IPVS: make test-vm"]
async fn reconcile_from_empty_then_nothing() {
    let c = client().await;
    // A foreign service, written by someone else (ipvsadm), must survive every pass.
    ipvsadm(&["-A", "-t", "10.9.9.9:80", "-s", "rr"]);
    ipvsadm(&[
        "-a",
        "-t",
        "10.9.9.9:80",
        "-r",
        "10.9.9.10:80",
        "-m",
        "-w",
        "1",
    ]);
    ipvsadm(&["-A", "-f", "5", "-s", "rr"]);

    let r = Reconciler::new(c.clone(), owned_vips);
    let want = desired_state();
    let w0 = c.writes_sent();
    let first = r.reconcile(&want).await.unwrap();
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    // 3 services + 4 + 4 + 2 destinations
    assert_eq!(first.ops.len(), 13);
    assert_eq!(c.writes_sent() - w0, 13);

    let w1 = c.writes_sent();
    let second = r.reconcile(&want).await.unwrap();
    assert!(second.ops.is_empty(), "{:?}", second.ops);
    assert_eq!(c.writes_sent(), w1, "a no-change pass must not write");

    // The kernel holds exactly the desired state (ours) and the foreign services untouched.
    let current = dump(&c, owned_vips).await.unwrap();
    assert_eq!(current.len(), 3);
    assert!(plan(&want, &current, owned_vips).is_empty());
    let list = ipvsadm_list(&[]);
    let foreign = list
        .iter()
        .find(|(s, _)| s == "TCP 10.9.9.9:80 rr")
        .expect("foreign service gone");
    assert_eq!(foreign.1, vec!["-> 10.9.9.10:80 Masq 1 0 0"]);
    assert!(list.iter().any(|(s, _)| s == "FWM 5 rr"));
    assert!(list
        .iter()
        .any(|(s, _)| s == "TCP 10.255.0.1:6666 mh (mh-fallback,mh-port)"));
    assert!(list.iter().any(|(s, _)| s == "UDP [fd00:26::1]:53 rr"));

    // Nothing desired: ours go, foreign stays.
    let last = r.reconcile(&[]).await.unwrap();
    assert_eq!(last.ops.len(), 3, "{:?}", last.ops);
    let left: Vec<String> = ipvsadm_list(&[]).into_iter().map(|(s, _)| s).collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[tokio::test]
#[ignore = "needs a kernel with IPVS: make test-vm"]
async fn reconcile_from_partial_state() {
    let c = client().await;
    let want = desired_state();
    // Someone (or an earlier daemon) left a partial, drifted state:
    // - 6666 exists with .1 (weight 5, drifted) and .9 (stale), .2-.4 missing
    // - 7777 exists complete but with the wrong scheduler
    // - the IPv6 service is missing; a stale owned service 10.255.0.1:8888 exists
    ipvsadm(&[
        "-A",
        "-t",
        "10.255.0.1:6666",
        "-s",
        "mh",
        "-b",
        "mh-fallback,mh-port",
    ]);
    ipvsadm(&[
        "-a",
        "-t",
        "10.255.0.1:6666",
        "-r",
        "10.255.1.1:6666",
        "-m",
        "-w",
        "5",
    ]);
    ipvsadm(&[
        "-a",
        "-t",
        "10.255.0.1:6666",
        "-r",
        "10.255.1.9:6666",
        "-m",
        "-w",
        "1",
    ]);
    ipvsadm(&["-A", "-t", "10.255.0.1:7777", "-s", "rr"]);
    for i in 1..=4 {
        ipvsadm(&[
            "-a",
            "-t",
            "10.255.0.1:7777",
            "-r",
            &format!("10.255.1.{i}:7777"),
            "-m",
            "-w",
            "1",
        ]);
    }
    ipvsadm(&["-A", "-t", "10.255.0.1:8888", "-s", "rr"]);

    let r = Reconciler::new(c.clone(), owned_vips);
    let first = r.reconcile(&want).await.unwrap();
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    let names: Vec<String> = first.ops.iter().map(|o| o.describe()).collect();
    assert_eq!(
        names,
        vec![
            "add service UDP [fd00:26::1]:53",
            "add destination 10.255.1.2:6666 to TCP 10.255.0.1:6666",
            "add destination 10.255.1.3:6666 to TCP 10.255.0.1:6666",
            "add destination 10.255.1.4:6666 to TCP 10.255.0.1:6666",
            "update destination 10.255.1.1:6666 in TCP 10.255.0.1:6666",
            "delete destination 10.255.1.9:6666 from TCP 10.255.0.1:6666",
            "update service TCP 10.255.0.1:7777",
            "add destination [fd00:27::53]:53 to UDP [fd00:26::1]:53",
            "add destination [fd00:27::54]:53 to UDP [fd00:26::1]:53",
            "delete service TCP 10.255.0.1:8888",
        ]
    );
    let w = c.writes_sent();
    let second = r.reconcile(&want).await.unwrap();
    assert!(second.ops.is_empty(), "{:?}", second.ops);
    assert_eq!(c.writes_sent(), w);
    let (line, dests) = ipvsadm_service("TCP 10.255.0.1:7777");
    assert_eq!(line, "TCP 10.255.0.1:7777 mh (mh-fallback,mh-port)");
    assert_eq!(dests.len(), 4);
    let (_, dests) = ipvsadm_service("TCP 10.255.0.1:6666");
    assert!(
        dests.contains(&"-> 10.255.1.1:6666 Masq 1 0 0".to_owned()),
        "{dests:?}"
    );
    assert!(!dests.iter().any(|d| d.contains("10.255.1.9")), "{dests:?}");
}

#[tokio::test]
#[ignore = "needs a kernel with IPVS: make test-vm"]
async fn apply_reports_every_failure_and_goes_on() {
    let c = client().await;
    let key = ServiceKey::tcp(sa("10.255.0.1:80"));
    let ops = vec![
        ipvs::Op::NewDest {
            service: key,
            dest: masq("10.255.1.1:80", 1),
        }, // no service yet: fails
        ipvs::Op::NewService(mh(key)),
        ipvs::Op::NewDest {
            service: key,
            dest: masq("10.255.1.1:80", 1),
        },
        ipvs::Op::NewService(Service::new(
            ServiceKey::tcp(sa("10.255.0.2:80")),
            "no-such-sched",
        )),
        ipvs::Op::NewDest {
            service: key,
            dest: masq("10.255.1.2:80", 1),
        },
    ];
    let errors = ipvs::apply(&c, &ops).await;
    let msgs: Vec<String> = errors.iter().map(|e| e.error.to_string()).collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(
        msgs[0].starts_with("add destination 10.255.1.1:80 to TCP 10.255.0.1:80: "),
        "{msgs:?}"
    );
    assert!(
        msgs[1].starts_with("add service TCP 10.255.0.2:80: "),
        "{msgs:?}"
    );
    assert_eq!(c.dests(&key).await.unwrap().len(), 2);
}

/// mh builds its table by walking the destination list, whose order is the insertion history.
/// A destination that leaves and comes back must leave the list exactly as a service built
/// from empty has it, so every router computes the same maglev table.
#[tokio::test]
#[ignore = "needs a kernel with IPVS: make test-vm"]
async fn mh_list_order_after_churn_equals_a_fresh_build() {
    let c = client().await;
    let r = Reconciler::new(c.clone(), owned_vips);
    let svc = |port: u16, hosts: &[u8]| DesiredService {
        service: mh(ServiceKey::tcp(SocketAddr::new(
            "10.255.0.1".parse().unwrap(),
            port,
        ))),
        destinations: hosts
            .iter()
            .map(|i| masq(&format!("10.255.1.{i}:80"), 1))
            .collect(),
    };
    let all = [1u8, 2, 3, 4, 5];
    let out = r
        .reconcile(&[svc(6666, &all), svc(7777, &all)])
        .await
        .unwrap();
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    // Churn on 7777 only: .3 removed, then back.
    let out = r
        .reconcile(&[svc(6666, &all), svc(7777, &[1, 2, 4, 5])])
        .await
        .unwrap();
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let out = r
        .reconcile(&[svc(6666, &all), svc(7777, &all)])
        .await
        .unwrap();
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    // The kernel's list order, as our client dumps it (head first); ports differ, so compare
    // addresses.
    let mut orders = Vec::new();
    for port in [6666u16, 7777] {
        let key = ServiceKey::tcp(SocketAddr::new("10.255.0.1".parse().unwrap(), port));
        let d: Vec<SocketAddr> = c
            .dests(&key)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.destination.addr)
            .collect();
        orders.push(d);
    }
    let (fresh, churned) = (orders[0].clone(), orders[1].clone());
    assert_eq!(fresh.len(), 5);
    assert_eq!(fresh, churned, "kernel list order differs after churn");
    // And a no-change pass after all that writes nothing.
    let w = c.writes_sent();
    r.reconcile(&[svc(6666, &all), svc(7777, &all)])
        .await
        .unwrap();
    assert_eq!(c.writes_sent(), w);
}
