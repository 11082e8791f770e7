//! DDNS with RFC 2136 against a real BIND `named` (Debian `bind9`), in the netns lab: named
//! serves `lab.test` at 203.0.113.53 and accepts updates signed with TSIG key `ddns-key`; the
//! gluetun mocks on the gateways report their public IPs. The health checker and the DDNS
//! engine run in-process inside the lab's router namespace, so this is the real chain
//! gluetun → health → ddns → named, without the daemon around it.
//!
//! Needs root, `ip`, `named`, `dig` and the lab binary (`cargo build -p vpn-router-tests
//! --bins`); a missing piece fails the test with what to install.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::unwrap_used
)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use gateway_route_manager::ddns::{
    self, Credential, DdnsMetrics, DdnsSettings, ProviderSettings, Rfc2136Settings, TsigAlgorithm,
};
use gateway_route_manager::gluetun::{ControlAuth, Secret};
use gateway_route_manager::health::{CheckKind, HealthSettings};
use gateway_route_manager::{HealthChecker, HealthyGateways, Metrics};
use lab::{topo, GatewayBreak, Lab};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn build_lab(gateways: usize) -> Lab {
    let bin = lab::lab::find_binary("vpn-router-lab", "VPN_ROUTER_LAB_BIN");
    assert!(
        bin.is_file(),
        "lab binary {} not found: build it with `cargo build -p vpn-router-tests --bins` (or set VPN_ROUTER_LAB_BIN)",
        bin.display()
    );
    Lab::builder()
        .lab_bin(bin)
        .gateways(gateways)
        .routers(1)
        .clients(0)
        .ingress_pods(0)
        .dns(true)
        .start_routers(false)
        .build()
        .unwrap_or_else(|e| panic!("lab: {e}"))
}

fn tsig_secret(lab: &Lab) -> String {
    std::fs::read_to_string(lab.dir.join("tsig.secret"))
        .unwrap()
        .trim()
        .to_owned()
}

fn settings(key_name: &str, secret_b64: &str) -> DdnsSettings {
    let mut s = DdnsSettings::new(
        topo::DDNS_HOSTNAME,
        Duration::from_secs(60),
        4,
        ProviderSettings::Rfc2136(Rfc2136Settings {
            server: SocketAddr::from((topo::INTERNET_DNS, 53)),
            zone: topo::DNS_ZONE.to_owned(),
            key_name: key_name.to_owned(),
            key_algorithm: TsigAlgorithm::HmacSha256,
            key_secret_base64: Credential::new(secret_b64),
        }),
        SystemTime::now(),
    );
    s.debounce = Duration::from_millis(100);
    s.retry_initial = Duration::from_millis(200);
    s.retry_max = Duration::from_secs(1);
    s.request_timeout = Duration::from_secs(1);
    s
}

fn health(gateways: usize) -> HealthSettings {
    HealthSettings {
        gateways: (0..gateways).map(topo::gateway).collect(),
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(150),
        rise: 1,
        fall: 1,
        checks: vec![CheckKind::VpnStatus, CheckKind::PublicIp],
        auth: Some(ControlAuth::ApiKey(Secret::new("lab-api-key"))),
        fetch_forwarded_ports: false,
        ..HealthSettings::default()
    }
}

fn dig(lab: &Lab) -> Vec<Ipv4Addr> {
    tokio::task::block_in_place(|| lab.dns_a_records(topo::DDNS_HOSTNAME).unwrap())
}

/// The zone's SOA serial: named increments it on every update it applies.
fn soa_serial(lab: &Lab) -> u64 {
    tokio::task::block_in_place(|| lab.dns_soa_serial().unwrap())
}

fn publics(idx: &[usize]) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = idx.iter().map(|i| topo::gateway_public(*i)).collect();
    v.sort();
    v
}

async fn wait_dns(lab: &Lab, want: &[Ipv4Addr], within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = dig(lab);
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{} answers {got:?}, expected {want:?} within {within:?}",
            topo::DDNS_HOSTNAME
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `f` on a multi-thread runtime inside router 0's namespace (its sockets live there).
fn in_router<F: FnOnce() + Send>(lab: &Lab, f: F) {
    lab.router(0).ns.run_in(f).unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

struct Running {
    healthy: watch::Receiver<HealthyGateways>,
    is_master: watch::Sender<bool>,
    metrics: DdnsMetrics,
    cancel: CancellationToken,
    engine: tokio::task::JoinHandle<()>,
}

fn start(gateways: usize, settings: DdnsSettings, master: bool) -> Running {
    let (checker, healthy) = HealthChecker::new(health(gateways), Metrics::new()).unwrap();
    let (is_master, master_rx) = watch::channel(master);
    let metrics = DdnsMetrics::new();
    let cancel = CancellationToken::new();
    tokio::spawn(checker.run(cancel.clone()));
    let engine = tokio::spawn(ddns::run(
        settings,
        healthy.clone(),
        master_rx,
        metrics.clone(),
        cancel.clone(),
    ));
    Running {
        healthy,
        is_master,
        metrics,
        cancel,
        engine,
    }
}

#[test]
fn rfc2136_publishes_healthy_set_and_follows_changes() {
    let lab = build_lab(3);
    let secret = tsig_secret(&lab);
    in_router(&lab, || {
        runtime().block_on(async {
            let mut s = settings("ddns-key", &secret);
            s.resync_interval = Duration::from_millis(500);
            // The daemon's default, so the latency below is what a deployment sees.
            s.debounce = Duration::from_millis(250);
            let mut r = start(3, s, true);
            // All three healthy: the name answers all three public IPs.
            wait_dns(&lab, &publics(&[0, 1, 2]), Duration::from_secs(10)).await;
            assert_eq!(r.metrics.current_error(), None, "{:?}", r.metrics.last_error());
            assert!(r.metrics.updates_count("rfc2136", "written") >= 1);
            assert!(r.metrics.last_success.get() > 1.0e9, "last success timestamp not set");

            // Unchanged inputs: resyncs read and find the set in place, and write nothing
            // (named bumps the SOA serial on every applied update).
            let serial = soa_serial(&lab);
            let written = r.metrics.updates_count("rfc2136", "written");
            let unchanged = r.metrics.updates_count("rfc2136", "unchanged");
            tokio::time::sleep(Duration::from_millis(1600)).await;
            assert!(r.metrics.updates_count("rfc2136", "unchanged") >= unchanged + 2, "no resync happened");
            assert_eq!(r.metrics.updates_count("rfc2136", "written"), written, "a resync wrote");
            assert_eq!(soa_serial(&lab), serial, "the zone changed without a change of the set");

            // Gateway 1 breaks and is repaired, `DDNS_ROUNDS` times (default 3): it leaves the
            // answer and comes back. Latency is measured from the healthy-set change (what DDNS
            // reacts to) to named answering the new set, with the daemon's default debounce.
            let rounds: usize = std::env::var("DDNS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
            let mut latencies = Vec::new();
            for _ in 0..rounds {
                for (broken, want) in [(true, publics(&[0, 2])), (false, publics(&[0, 1, 2]))] {
                    r.healthy.mark_unchanged();
                    tokio::task::block_in_place(|| {
                        if broken {
                            lab.gateway(1).break_as(GatewayBreak::ApiStopped).unwrap()
                        } else {
                            lab.gateway(1).repair().unwrap()
                        }
                    });
                    while r.healthy.borrow().contains(1) == broken {
                        tokio::time::timeout(Duration::from_secs(5), r.healthy.changed()).await.unwrap().unwrap();
                    }
                    let set_changed = Instant::now();
                    wait_dns(&lab, &want, Duration::from_secs(5)).await;
                    latencies.push(set_changed.elapsed());
                }
            }
            latencies.sort();
            let ms: Vec<u128> = latencies.iter().map(|d| d.as_millis()).collect();
            eprintln!(
                "DDNS latency (rfc2136 to named, debounce 250 ms), healthy-set change -> dig answers the new set, {} changes: median {} ms, max {} ms, all {ms:?}",
                ms.len(),
                ms[ms.len() / 2],
                ms[ms.len() - 1]
            );
            assert!(latencies[latencies.len() - 1] <= Duration::from_secs(2), "DDNS took {:?} (target <= 2 s)", latencies[latencies.len() - 1]);
            assert_eq!(r.metrics.current_error(), None, "{:?}", r.metrics.last_error());

            // A record added by hand for the name is drift: the resync removes it. A record of
            // another name is not ours and stays.
            tokio::task::block_in_place(|| nsupdate(&lab, &secret, &["update add vpn.lab.test. 60 A 198.51.100.7", "update add other.lab.test. 60 A 198.51.100.8"]));
            wait_dns(&lab, &publics(&[0, 1, 2]), Duration::from_secs(5)).await;
            let other = tokio::task::block_in_place(|| lab.dns_a_records("other.lab.test").unwrap());
            assert_eq!(other, [Ipv4Addr::new(198, 51, 100, 8)], "a record of another name was touched");

            r.cancel.cancel();
            tokio::time::timeout(Duration::from_secs(2), &mut r.engine).await.expect("engine did not stop on cancel").unwrap();
        });
    });
}

/// A hand-made update with BIND's nsupdate (from the Internet namespace), signed with the key.
fn nsupdate(lab: &Lab, secret: &str, lines: &[&str]) {
    let mut script = format!("server {}\nzone {}\n", topo::INTERNET_DNS, topo::DNS_ZONE);
    for l in lines {
        script.push_str(l);
        script.push('\n');
    }
    script.push_str("send\n");
    let file = lab.dir.join("nsupdate.txt");
    std::fs::write(&file, script).unwrap();
    let key = format!("hmac-sha256:ddns-key:{secret}");
    let out = lab
        .internet()
        .exec("nsupdate", &["-y", &key, &file.display().to_string()]);
    out.unwrap_or_else(|e| panic!("nsupdate (Debian bind9-dnsutils): {e}"));
}

#[test]
fn rfc2136_wrong_key_is_a_clear_error_retried_without_crash() {
    use base64::Engine as _;
    let lab = build_lab(2);
    let right = tsig_secret(&lab);
    let wrong = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    in_router(&lab, || {
        runtime().block_on(async {
            for (key_name, secret) in [
                ("ddns-key", wrong.as_str()),
                ("no-such-key", right.as_str()),
            ] {
                let r = start(2, settings(key_name, secret), true);
                wait_until("three failed attempts", Duration::from_secs(10), || {
                    r.metrics.updates_count("rfc2136", "failed") >= 3
                })
                .await;
                assert_eq!(
                    r.metrics.current_error(),
                    Some("auth"),
                    "{:?}",
                    r.metrics.last_error()
                );
                let msg = r.metrics.last_error().unwrap();
                assert!(
                    msg.contains(&format!("TSIG key `{key_name}`"))
                        && msg.contains("key_secret_file"),
                    "unclear error: {msg}"
                );
                assert!(
                    !r.engine.is_finished(),
                    "the engine stopped after an auth error"
                );
                assert_eq!(r.metrics.updates_count("rfc2136", "written"), 0);
                assert!(dig(&lab).is_empty(), "records written with a wrong key");
                eprintln!("wrong key `{key_name}`: {msg}");
                r.cancel.cancel();
            }
        });
    });
}

#[test]
fn rfc2136_backup_never_writes() {
    let lab = build_lab(2);
    let secret = tsig_secret(&lab);
    in_router(&lab, || {
        runtime().block_on(async {
            let r = start(2, settings("ddns-key", &secret), false);
            let serial = soa_serial(&lab);
            wait_until(
                "healthy set complete with both gateways",
                Duration::from_secs(5),
                || {
                    let h = r.healthy.borrow();
                    h.complete && h.len() == 2
                },
            )
            .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(dig(&lab).is_empty(), "the backup wrote");
            assert_eq!(soa_serial(&lab), serial, "the backup changed the zone");
            assert_eq!(r.metrics.writer.get(), 0);
            let total: u64 = ["written", "unchanged", "failed"]
                .iter()
                .map(|res| r.metrics.updates_count("rfc2136", res))
                .sum();
            assert_eq!(total, 0, "the backup attempted updates");

            // Becoming master is the only thing missing: it writes at once.
            r.is_master.send(true).unwrap();
            wait_dns(&lab, &publics(&[0, 1]), Duration::from_secs(3)).await;
            assert_eq!(r.metrics.writer.get(), 1);

            // Back to backup: a gateway change is not written any more.
            r.is_master.send(false).unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            tokio::task::block_in_place(|| {
                lab.gateway(0).break_as(GatewayBreak::ApiStopped).unwrap()
            });
            wait_until(
                "gateway 0 left the healthy set",
                Duration::from_secs(5),
                || !r.healthy.borrow().contains(0),
            )
            .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(
                dig(&lab),
                publics(&[0, 1]),
                "the backup wrote after losing mastership"
            );
            r.cancel.cancel();
        });
    });
}
