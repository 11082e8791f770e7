//! `make demo`: builds the lab and walks through what vpn-router does, printing what was
//! measured. Every scene observes the data plane or the kernel; a scene whose feature is not
//! built yet says so ("not built yet: ...") instead of showing anything made up.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::gluetun::GatewayBreak;
use crate::lab::{Lab, LabBuilder, LabError};
use crate::probe;
use crate::topo;

fn heading(n: usize, title: &str) {
    println!(
        "\n── {n}. {title} {}",
        "─".repeat(70usize.saturating_sub(title.len()))
    );
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// Which router holds the egress VIP right now (kernel view).
fn master(lab: &Lab) -> Option<usize> {
    lab.routers()
        .iter()
        .position(|r| r.is_running() && r.holds_egress_vip())
}

/// The issue that builds each component the daemon reports in `/status`.
fn issue_of(component: &str) -> &'static str {
    match component {
        "vrrp" => "issue 5",
        "gateways" => "issues 6-8",
        "ingress" => "issues 4 and 9",
        "ddns" => "issue 10",
        _ => "see the issue list",
    }
}

/// `components.<name>.state` from each running router's `/status`.
fn component_states(lab: &Lab) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in lab.routers() {
        let Ok(v) = r.status() else { continue };
        let Some(comps) = v["components"].as_object() else {
            continue;
        };
        for (name, c) in comps {
            let state = c["state"].as_str().unwrap_or("?").to_string();
            m.entry(name.clone()).or_default().push(state);
        }
    }
    m
}

/// True when some router reports `component` as built (any state but `not_built`).
fn built(states: &BTreeMap<String, Vec<String>>, component: &str) -> bool {
    states
        .get(component)
        .is_some_and(|v| v.iter().any(|s| s != "not_built"))
}

fn first_lines(s: &str, n: usize) -> String {
    s.lines().take(n).collect::<Vec<_>>().join("\n      ")
}

/// Runs the demo.
pub fn run(builder: LabBuilder) -> Result<(), LabError> {
    let t0 = Instant::now();
    println!("vpn-router demo: the reference topology in network namespaces on this machine");
    let lab = builder.start_routers(false).build()?;
    println!(
        "lab {} up in {}: {} routers, {} gateways (exit IPs {}), clients, ingress pods, Internet, DNS",
        lab.prefix,
        ms(lab.setup_time),
        lab.routers().len(),
        lab.gateways().len(),
        lab.gateways()
            .iter()
            .map(|g| g.public_ip().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("logs and configs: {}", lab.dir.display());

    // Routers.
    heading(0, "routers");
    let mut running = 0;
    let mut missing_binary = false;
    for r in lab.routers() {
        match r.start() {
            Ok(()) => {
                running += 1;
                let ready = r
                    .api_get("/readyz")
                    .map(|x| {
                        if x.status == 200 {
                            "ready"
                        } else {
                            "not ready"
                        }
                    })
                    .unwrap_or("no answer on /readyz");
                println!("  router {}: vpn-router running, {ready}", r.index);
            }
            Err(e) => {
                missing_binary |= matches!(e, LabError::NoRouterBinary { .. });
                println!(
                    "  router {}: vpn-router did not start: {}",
                    r.index,
                    first_lines(&e.to_string(), 6)
                )
            }
        }
    }
    if !crate::lab::ipvs_available() {
        println!(
            "  (this kernel has no IPVS, so the routers' configs leave out the ingress section)"
        );
    }
    if missing_binary {
        println!("  not built yet: the vpn-router binary (issue 2) — the scenes below run without routers and show what fails");
    } else if running == 0 {
        println!("  no router is running (see above) — the scenes below run without routers and show what fails");
    }
    let states = component_states(&lab);
    if !states.is_empty() {
        println!("  {:<10} state on each router (from /status)", "component");
        for (name, v) in &states {
            let note = if built(&states, name) {
                String::new()
            } else {
                format!("   ← not built yet ({})", issue_of(name))
            };
            println!("  {name:<10} {}{note}", v.join(", "));
        }
    }
    // Give VRRP a moment to elect (3 adverts of 100 ms + skew).
    if running > 0 {
        let deadline = Instant::now() + Duration::from_secs(3);
        while master(&lab).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let m = master(&lab);
    match m {
        Some(k) => println!("  router {k} holds the egress VIP {}", topo::EGRESS_VIP),
        None if running > 0 && built(&states, "vrrp") => println!(
            "  no router holds the egress VIP {} although VRRP is built: see the routers' logs",
            topo::EGRESS_VIP
        ),
        None => println!(
            "  no router holds the egress VIP {}: not built yet: VRRP (issue 5)",
            topo::EGRESS_VIP
        ),
    }

    // 1. Egress spread.
    heading(
        1,
        "40 requests from a client pod: the exit IPs the Internet saw",
    );
    let client = lab.client(0);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    let mut first_err = None;
    for _ in 0..40 {
        match client.exit_ip(Duration::from_millis(250)) {
            Ok(ip) => *seen.entry(ip.to_string()).or_insert(0) += 1,
            Err(e) => {
                failed += 1;
                first_err.get_or_insert(e.to_string());
            }
        }
    }
    println!("  {:<16} {:>6}  which", "exit IP", "count");
    for (ip, n) in &seen {
        let who = lab
            .gateways()
            .iter()
            .find(|g| g.public_ip().to_string() == *ip)
            .map(|g| format!("gateway {}", g.index))
            .unwrap_or_else(|| {
                if ip == &topo::NODE_PUBLIC.to_string() {
                    "THE NODE — a leak past the VPN".into()
                } else {
                    "?".into()
                }
            });
        println!("  {ip:<16} {n:>6}  {who}");
    }
    println!("  failed requests: {failed} of 40");
    let egress_works = !seen.is_empty();
    if !egress_works {
        println!("  first error: {}", first_err.unwrap_or_default());
        if m.is_none() {
            println!("  nobody answers for the egress VIP, so nothing leaves (VRRP: issue 5)");
        } else if !built(&states, "gateways") {
            println!("  the VIP is held but nothing routes to a gateway: not built yet: egress routing (issue 6)");
        } else {
            println!("  the VIP is held and egress is built, yet nothing got through: see the routers' logs");
        }
    }
    match lab.leaked_packets() {
        Ok(0) => {
            println!("  leaks through the router's own default route (node counter): 0 packets")
        }
        Ok(n) => println!("  LEAK: the node forwarded {n} packets from client pods past the VPN"),
        Err(e) => println!("  leak counter unreadable: {e}"),
    }

    // 2. Master killed.
    heading(
        2,
        "the master router killed (kill -9): the outage a client saw",
    );
    match m {
        None => println!("  skipped: no master to kill (not built yet: VRRP, issue 5)"),
        Some(k) if lab.routers().len() < 2 => {
            println!("  skipped: router {k} is the only router; use --routers 2")
        }
        Some(k) => {
            let target = if egress_works {
                topo::INTERNET_ECHO
            } else {
                topo::EGRESS_VIP
            };
            let out = client.ping_outage(
                target,
                Duration::from_millis(10),
                Duration::from_secs(3),
                Duration::from_millis(500),
                || {
                    let _ = lab.router(k).kill_pod();
                },
            )?;
            let new = master(&lab);
            println!(
                "  pinging {target} every 10 ms; router {k} killed at 0.5 s; new master: {}",
                new.map(|n| format!("router {n}"))
                    .unwrap_or_else(|| "none".into())
            );
            println!(
                "  {:<28} {}\n  {:<28} {} of {}",
                "longest gap between replies",
                ms(out.longest_gap),
                "pings lost",
                out.lost(),
                out.sent
            );
            if !egress_works {
                println!("  (measured to the VIP itself: the egress path does not work yet)");
            }
            if let Err(e) = lab.router(k).restart() {
                println!(
                    "  restarting router {k} failed: {}",
                    first_lines(&e.to_string(), 3)
                );
            }
        }
    }

    // 3. Gateway broken.
    heading(
        3,
        "a gateway's tunnel dies silently (its API still says running)",
    );
    let broken = 1.min(lab.gateways().len() - 1);
    if !egress_works {
        println!(
            "  skipped: no request got through in scene 1, so no traffic reaches a gateway to lose"
        );
        heading(4, "long-lived flows when that gateway died");
        println!("  skipped for the same reason (flow-stable egress: issue 8)");
    } else {
        let mut flows = client.open_flows(40, Duration::from_millis(500))?;
        let before = flows.by_exit();
        let gw = lab.gateway(broken);
        let echo7 = SocketAddr::from((topo::INTERNET_ECHO, 7));
        let timeline = probe::connection_timeline(
            &client.ns,
            echo7,
            Duration::from_millis(20),
            Duration::from_millis(150),
            Duration::from_secs(4),
            Duration::from_millis(300),
            || {
                let _ = gw.break_as(GatewayBreak::TunnelDead);
            },
        )?;
        let broke_at = Duration::from_millis(300);
        let bad = |r: &Option<Ipv4Addr>| r.is_none() || *r == Some(gw.public_ip());
        let last_bad = timeline
            .iter()
            .filter(|(t, r)| *t >= broke_at && bad(r))
            .map(|(t, _)| *t)
            .max();
        let after: Vec<_> = timeline.iter().filter(|(t, _)| *t >= broke_at).collect();
        match last_bad {
            None => println!("  gateway {broken}: no new connection hit it after the break"),
            Some(t) if t + Duration::from_millis(500) > Duration::from_secs(4) => println!(
                "  gateway {broken} ({}) was still getting new connections {} after the break: it never left the route",
                gw.public_ip(),
                ms(t - broke_at)
            ),
            Some(t) => println!(
                "  gateway {broken} ({}) left the route: last new connection lost {} after the break ({} connections tried, 1 per 20 ms)",
                gw.public_ip(),
                ms(t - broke_at),
                after.len()
            ),
        }
        heading(4, "long-lived flows when that gateway died");
        let alive = flows.check(Duration::from_millis(800));
        let on_broken = before.get(&gw.public_ip()).copied().unwrap_or(0);
        let kept = alive.iter().filter(|a| **a).count();
        println!("  {:<16} {:>6} {:>6}", "exit IP", "flows", "alive");
        for (ip, n) in &before {
            let a = flows
                .flows
                .iter()
                .zip(&alive)
                .filter(|(f, ok)| f.exit_ip == *ip && **ok)
                .count();
            println!("  {:<16} {n:>6} {a:>6}", ip.to_string());
        }
        println!(
            "  kept {kept} of {} flows; {} could have been kept (those not on gateway {broken})",
            flows.flows.len(),
            flows.flows.len() - on_broken
        );
        let _ = gw.repair();
    }

    // 5. Ingress.
    heading(5, "a request from the Internet through a forwarded port");
    let ipvs = std::path::Path::new("/proc/net/ip_vs").exists();
    if !ipvs {
        let modprobe = std::process::Command::new("modprobe")
            .arg("ip_vs")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
            .unwrap_or_else(|e| e.to_string());
        println!(
            "  this kernel has no IPVS (/proc/net/ip_vs is missing; modprobe ip_vs: {modprobe})"
        );
        println!("  the ingress scene needs IPVS; it runs in the VM harness (tests/vm, issue 4), not here");
    } else {
        let g = lab.gateway(0);
        let url = format!(
            "http://{}:{}/whoami",
            g.public_ip(),
            topo::gateway_forwarded_port(0)
        );
        match lab.internet_http_get(&url, Duration::from_secs(2)) {
            Ok(r) => println!(
                "  GET {url} from 203.0.113.1 → HTTP {}: {}\n  (a TCP answer from {} means the reply went back through gateway 0)",
                r.status,
                r.body.trim(),
                g.public_ip()
            ),
            Err(e) => println!(
                "  GET {url} failed: {e}\n  not built yet: ingress virtual servers (issue 9) and return routing (issue 7)"
            ),
        }
    }

    // 6. DNS.
    heading(6, "the DNS record set");
    let expected: Vec<Ipv4Addr> = lab.gateways().iter().map(|g| g.public_ip()).collect();
    let ddns_built = built(&states, "ddns");
    let mut records = lab.dns_a_records(topo::DDNS_HOSTNAME);
    if ddns_built {
        // Gateway 1 was repaired a moment ago; DDNS has a couple of seconds to catch up.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !matches!(&records, Ok(v) if *v == expected) {
            std::thread::sleep(Duration::from_millis(200));
            records = lab.dns_a_records(topo::DDNS_HOSTNAME);
        }
    }
    let list = |v: &[Ipv4Addr]| {
        v.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match records {
        Ok(v) if v.is_empty() && !ddns_built => println!(
            "  {} has no A records on the lab's BIND: not built yet: DDNS (issue 10)",
            topo::DDNS_HOSTNAME
        ),
        Ok(v) => {
            println!(
                "  {} A {}",
                topo::DDNS_HOSTNAME,
                if v.is_empty() {
                    "(none)".to_string()
                } else {
                    list(&v)
                }
            );
            println!(
                "  healthy gateways' exit IPs: {} — {}",
                list(&expected),
                if v == expected { "match" } else { "MISMATCH" }
            );
        }
        Err(e) => println!("  dig failed: {e}"),
    }

    let td = Instant::now();
    drop(lab);
    println!(
        "\nlab torn down in {}; demo took {:.1} s",
        ms(td.elapsed()),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
