//! `make demo`: builds the lab and walks through what vpn-router does, printing what was
//! measured. Every scene observes the data plane or the kernel; a scene whose feature is not
//! built yet says so ("not built yet: ...") instead of showing anything made up.
//!
//! `tour` runs the scenes on a lab someone else built and returns the numbers it printed, so
//! tests can check the demo's measurements against a lab whose behaviour they know.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::gluetun::GatewayBreak;
use crate::lab::{Lab, LabBuilder, LabError};
use crate::probe::{self, Outage};
use crate::topo;

/// What the tour measured (what it printed, as numbers).
#[derive(Debug, Default)]
pub struct TourSummary {
    /// Routers whose daemon runs and answers its api.
    pub routers_running: usize,
    /// Exit IP → number of the 40 requests that left there.
    pub exits: BTreeMap<Ipv4Addr, usize>,
    pub failed_requests: usize,
    /// Client packets the node forwarded past the VPN.
    pub leaked_packets: u64,
    /// Scene 2: what ping saw while the master's pod died.
    pub failover: Option<Outage>,
    /// Scene 2: what ping saw while the master's links were cut (its daemon alive).
    pub link_cut: Option<Outage>,
    /// Scene 2: what ping saw while the master handed over on SIGTERM.
    pub sigterm: Option<Outage>,
    /// Scene 3: time from the break to the last new connection the broken gateway got (or lost).
    pub gateway_left_after: Option<Duration>,
    /// Scene 3: time from the break until a router's /status called the gateway unhealthy.
    pub gateway_marked_after: Option<Duration>,
    /// Scene 3: whether the broken gateway was still used at the end.
    pub gateway_never_left: bool,
    /// Scene 4: (flows opened, flows still working, flows not on the broken gateway).
    pub flows: Option<(usize, usize, usize)>,
    /// Scene 5: the ingress pod's `/whoami` answer through a forwarded port.
    pub ingress_answer: Option<String>,
    /// Scene 6: the A records of the DDNS name.
    pub dns_records: Option<Vec<Ipv4Addr>>,
}

fn heading(n: usize, title: &str) {
    println!(
        "\n── {n}. {title} {}",
        "─".repeat(70usize.saturating_sub(title.chars().count()))
    );
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// Which router holds the egress VIP right now (kernel view), among running daemons.
fn master(lab: &Lab) -> Option<usize> {
    lab.routers()
        .iter()
        .position(|r| r.is_running() && r.holds_egress_vip())
}

fn wait_master(lab: &Lab, want: Option<usize>, timeout: Duration) -> Option<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let m = master(lab);
        let done = match want {
            Some(k) => m == Some(k),
            None => m.is_some(),
        };
        if done || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How scene 2 takes the master away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MasterLoss {
    /// Every cable of the master unplugged; its daemon keeps running.
    LinksCut,
    /// kill -9 of the daemon and every cable unplugged (a crashed pod).
    PodKilled,
    /// SIGTERM: the daemon hands over (priority-0 advert) and exits.
    Sigterm,
}

impl MasterLoss {
    fn describe(self) -> &'static str {
        match self {
            MasterLoss::LinksCut => "links cut (daemon alive)",
            MasterLoss::PodKilled => "pod killed (kill -9, links down)",
            MasterLoss::Sigterm => "SIGTERM (graceful handoff)",
        }
    }
}

/// Takes the current master away as `way` while a client pings `target`, prints the new
/// master and the outage, then brings the router back and waits for it to preempt again.
fn master_loss_scene(
    lab: &Lab,
    target: Ipv4Addr,
    way: MasterLoss,
) -> Result<Option<Outage>, LabError> {
    let Some(k) = wait_master(lab, None, Duration::from_secs(3)) else {
        println!("  {}: skipped, no router holds the VIP", way.describe());
        return Ok(None);
    };
    let r = lab.router(k);
    let links = [
        crate::lab::RouterLink::Gateway,
        crate::lab::RouterLink::Vrrp,
        crate::lab::RouterLink::Pod,
    ];
    let ping = |to: Ipv4Addr, action: Box<dyn FnOnce() + Send + '_>| {
        lab.client(0).ping_outage(
            to,
            Duration::from_millis(10),
            Duration::from_secs(3),
            Duration::from_millis(500),
            action,
        )
    };
    // Two pings at once: to `target` (what a client's traffic sees; the backup forwards as
    // soon as frames for the shared VMAC reach it) and to the VIP itself (answered only by
    // the VRRP master: the takeover time proper).
    let (out, vip_out) = std::thread::scope(|s| {
        let vip = (target != topo::EGRESS_VIP)
            .then(|| s.spawn(|| ping(topo::EGRESS_VIP, Box::new(|| {}))));
        let out = ping(
            target,
            Box::new(|| match way {
                MasterLoss::LinksCut => {
                    for l in links {
                        let _ = r.cut_link(l);
                    }
                }
                MasterLoss::PodKilled => {
                    let _ = r.kill_pod();
                }
                MasterLoss::Sigterm => {
                    let _ = r.sigterm(Duration::from_secs(3));
                }
            }),
        );
        let vip_out = vip.and_then(|h| h.join().ok()).and_then(Result::ok);
        (out, vip_out)
    });
    let out = out?;
    // The old master may still hold the VIP in its cut-off namespace; the new one is the
    // other router that holds it.
    let new = lab
        .routers()
        .iter()
        .position(|o| o.index != k && o.is_running() && o.holds_egress_vip());
    println!(
        "  {:<34} router {k} → {}: longest gap {}, {} of {} pings lost",
        way.describe(),
        new.map(|n| format!("router {n}"))
            .unwrap_or_else(|| "NO master".into()),
        ms(out.longest_gap),
        out.lost(),
        out.sent
    );
    if let Some(v) = vip_out {
        println!(
            "  {:<34} the VIP itself went unanswered for {}, {} of {} pings lost",
            "",
            ms(v.longest_gap),
            v.lost(),
            v.sent
        );
    }
    let back = match way {
        MasterLoss::LinksCut => links.iter().try_for_each(|l| r.restore_link(*l)),
        MasterLoss::PodKilled => r.revive_pod(),
        MasterLoss::Sigterm => r.start(),
    };
    match back {
        Err(e) => println!(
            "  bringing router {k} back failed: {}",
            first_lines(&e.to_string(), 3)
        ),
        Ok(()) => {
            // Let the higher-priority router preempt and its gateway checks recover (they
            // failed while its links were down) before the next scene.
            let settled = |lab: &Lab| {
                let holders: Vec<usize> = lab
                    .routers()
                    .iter()
                    .filter(|o| o.holds_egress_vip())
                    .map(|o| o.index)
                    .collect();
                let healthy = r
                    .gateway_states()
                    .is_none_or(|v| v.iter().all(|(_, st)| st == "healthy"));
                (holders == [k] && healthy, holders)
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut state = settled(lab);
            while !state.0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
                state = settled(lab);
            }
            if !state.0 {
                println!(
                    "  router {k} is back but did not settle as the only master with healthy gateways within 5 s (VIP holders: {:?})",
                    state.1
                );
            }
        }
    }
    Ok(Some(out))
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
    for r in lab.routers().iter().filter(|r| r.is_running()) {
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

/// `components.gateways.detail.egress` of the first running router.
fn egress_detail(lab: &Lab) -> Option<String> {
    let r = lab.routers().iter().find(|r| r.is_running())?;
    let v = r.status().ok()?;
    v["components"]["gateways"]["detail"]["egress"]
        .as_str()
        .map(str::to_owned)
}

fn set_egress_mode(yaml: &str, mode: &str) -> String {
    yaml.lines()
        .map(|l| {
            if l.starts_with("    mode: ") {
                format!("    mode: {mode}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// The lab asks for the flow-stable egress mode; when the routers say it is not built yet,
/// say so and fall back to the best mode that is.
fn egress_mode_fallback(lab: &Lab) -> Result<(), LabError> {
    let Some(first) = egress_detail(lab) else {
        return Ok(());
    };
    println!("  egress routing: {first}");
    if !first.contains("not built") {
        return Ok(());
    }
    for mode in ["ecmp_resilient", "ecmp"] {
        for r in lab.routers() {
            r.rewrite_config(|y| set_egress_mode(y, mode))?;
            if r.is_running() {
                r.restart()?;
            }
        }
        match egress_detail(lab) {
            Some(d) if !d.contains("not built") => {
                println!("  → this demo runs with egress.mode {mode} instead ({d})");
                return Ok(());
            }
            d => println!("  egress.mode {mode}: {}", d.unwrap_or_default()),
        }
    }
    Ok(())
}

/// Each gateway's health as each running router reports it.
fn gateway_table(lab: &Lab) {
    let per_router: Vec<(usize, Vec<(Ipv4Addr, String)>)> = lab
        .routers()
        .iter()
        .filter(|r| r.is_running())
        .filter_map(|r| r.gateway_states().map(|g| (r.index, g)))
        .collect();
    if per_router.is_empty() {
        return;
    }
    let head: Vec<String> = per_router
        .iter()
        .map(|(k, _)| format!("router {k}"))
        .collect();
    println!(
        "  {:<8} {:<15} {:<14} {}",
        "gateway",
        "address",
        "exit IP",
        head.join("  ")
    );
    for g in lab.gateways() {
        let cells: Vec<String> = per_router
            .iter()
            .map(|(_, v)| {
                v.iter()
                    .find(|(a, _)| *a == g.address())
                    .map(|(_, s)| format!("{s:<8}"))
                    .unwrap_or_else(|| "?       ".into())
            })
            .collect();
        println!(
            "  {:<8} {:<15} {:<14} {}",
            g.index,
            g.address().to_string(),
            g.public_ip().to_string(),
            cells.join("  ")
        );
    }
}

fn first_lines(s: &str, n: usize) -> String {
    s.lines().take(n).collect::<Vec<_>>().join("\n      ")
}

fn list<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds the lab and runs the tour (what `vpn-router-lab demo` does).
pub fn run(builder: LabBuilder) -> Result<(), LabError> {
    let t0 = Instant::now();
    println!("vpn-router demo: the reference topology in network namespaces on this machine");
    let lab = builder.start_routers(false).build()?;
    println!(
        "lab {} up in {}: {} router(s), {} gateway(s) (exit IPs {}), {} client pod(s), {} ingress pod(s), Internet{}",
        lab.prefix,
        ms(lab.setup_time),
        lab.routers().len(),
        lab.gateways().len(),
        list(&lab.gateways().iter().map(|g| g.public_ip()).collect::<Vec<_>>()),
        lab.clients().len(),
        lab.ingress_pods().len(),
        if lab.has_dns() { ", DNS" } else { "" },
    );
    if let Some(g) = lab.gateways().first().filter(|g| g.provider().is_some()) {
        println!(
            "gateways: the shipped gluetun pod (deploy/examples/gateways) behind gluetun's own firewall (policies DROP; the example's post-rules let clients through {} → tun0), each with a tunnel to its own VPN provider; forwarded port{} {}",
            g.lan_if(),
            if g.forwarded_ports().len() == 1 { "" } else { "s" },
            list(&g.forwarded_ports())
        );
    }
    println!("logs and configs: {}", lab.dir.display());
    tour(&lab, true)?;
    let td = Instant::now();
    drop(lab);
    println!(
        "\nlab torn down in {}; demo took {:.1} s",
        ms(td.elapsed()),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs the scenes on `lab`, starting its routers first when `start_routers`.
pub fn tour(lab: &Lab, start_routers: bool) -> Result<TourSummary, LabError> {
    let mut sum = TourSummary::default();

    heading(0, "routers");
    let mut missing_binary = false;
    for r in lab.routers() {
        if !start_routers {
            continue;
        }
        match r.start() {
            Ok(()) => {
                let ready = match r.api_get("/readyz") {
                    Ok(x) if x.status == 200 => "ready",
                    Ok(_) => "not ready",
                    Err(_) => "no answer on /readyz",
                };
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
    sum.routers_running = lab.routers().iter().filter(|r| r.is_running()).count();
    if !crate::lab::ipvs_available() {
        println!(
            "  (this kernel has no IPVS, so the routers' configs leave out the ingress section)"
        );
    }
    if missing_binary {
        println!("  not built yet: the vpn-router binary (issue 2) — the scenes below run without routers and show what fails");
    } else if sum.routers_running == 0 {
        println!(
            "  no router is running — the scenes below run without routers and show what fails"
        );
    }
    let states = component_states(lab);
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
    let states = if built(&states, "gateways") {
        egress_mode_fallback(lab)?;
        let states = component_states(lab);
        gateway_table(lab);
        states
    } else {
        states
    };
    let m = if sum.routers_running > 0 {
        // VRRP elects within 3 adverts + skew (a few hundred ms at 100 ms adverts).
        wait_master(lab, None, Duration::from_secs(3))
    } else {
        None
    };
    match m {
        Some(k) => println!("  router {k} holds the egress VIP {}", topo::EGRESS_VIP),
        None if built(&states, "vrrp") => println!(
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
    let mut first_err = None;
    for _ in 0..40 {
        match client.exit_ip(Duration::from_millis(250)) {
            Ok(ip) => *sum.exits.entry(ip).or_insert(0) += 1,
            Err(e) => {
                sum.failed_requests += 1;
                first_err.get_or_insert(e.to_string());
            }
        }
    }
    println!("  {:<16} {:>6}  which", "exit IP", "count");
    for (ip, n) in &sum.exits {
        let who = match lab.gateways().iter().find(|g| g.public_ip() == *ip) {
            Some(g) => format!("gateway {}", g.index),
            None if *ip == topo::NODE_PUBLIC => "THE NODE — a leak past the VPN".into(),
            None => "?".into(),
        };
        println!("  {:<16} {n:>6}  {who}", ip.to_string());
    }
    println!("  failed requests: {} of 40", sum.failed_requests);
    let egress_works = !sum.exits.is_empty();
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
    sum.leaked_packets = lab.leaked_packets()?;
    if sum.leaked_packets == 0 {
        println!("  leaks through the router's own default route (node counter): 0 packets");
    } else {
        println!(
            "  LEAK: the node forwarded {} packets from client pods past the VPN",
            sum.leaked_packets
        );
    }

    // 2. The master goes away, three ways.
    heading(
        2,
        "the master goes away (links cut, pod killed, SIGTERM): the outage a client saw",
    );
    let target = if egress_works {
        topo::INTERNET_ECHO
    } else {
        topo::EGRESS_VIP
    };
    match m {
        None => println!(
            "  skipped: no router holds the egress VIP, so there is no master to take away"
        ),
        Some(k) if lab.routers().len() < 2 => {
            println!("  skipped: router {k} is the only router; use --routers 2")
        }
        Some(_) => {
            println!(
                "  a client pings {target}{} every 10 ms through the egress VIP; the master goes away at 0.5 s",
                if egress_works { " (the Internet host)" } else { " (the VIP itself: egress does not work)" }
            );
            for way in [
                MasterLoss::LinksCut,
                MasterLoss::PodKilled,
                MasterLoss::Sigterm,
            ] {
                let out = master_loss_scene(lab, target, way)?;
                if way == MasterLoss::PodKilled {
                    sum.failover = out;
                } else if way == MasterLoss::LinksCut {
                    sum.link_cut = out;
                } else {
                    sum.sigterm = out;
                }
            }
        }
    }

    // 3 + 4. A gateway breaks.
    heading(
        3,
        "a gateway's tunnel dies silently (its API still says running)",
    );
    let broken = 1.min(lab.gateways().len() - 1);
    let health_built = built(&states, "gateways");
    if !egress_works && !health_built {
        println!("  skipped: no gateway health checks run (issue 6) and no request got through in scene 1");
        heading(4, "long-lived flows when that gateway died");
        println!("  skipped for the same reason (flow-stable egress: issue 8)");
    } else {
        let gw = lab.gateway(broken);
        let mut flows = if egress_works {
            Some(client.open_flows(40, Duration::from_millis(500))?)
        } else {
            None
        };
        let watcher = lab.routers().iter().find(|r| r.is_running());
        let via = format!("via {} ", gw.address());
        let route_had_gw = watcher.is_some_and(|r| r.egress_routes().contains(&via));
        let mut marked: Option<Duration> = None;
        let mut route_gone: Option<Duration> = None;
        let broke_at = Duration::from_millis(300);
        let run_for = Duration::from_secs(4);
        let mut watch = || {
            let t = Instant::now();
            let _ = gw.break_as(GatewayBreak::TunnelDead);
            while let Some(r) = watcher {
                if marked.is_none()
                    && r.gateway_states().is_some_and(|v| {
                        v.iter()
                            .any(|(a, st)| *a == gw.address() && st != "healthy")
                    })
                {
                    marked = Some(t.elapsed());
                }
                if route_had_gw && route_gone.is_none() && !r.egress_routes().contains(&via) {
                    route_gone = Some(t.elapsed());
                }
                let done = marked.is_some() && (!route_had_gw || route_gone.is_some());
                if done || t.elapsed() > Duration::from_secs(3) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let timeline = if egress_works {
            Some(probe::connection_timeline(
                &client.ns,
                SocketAddr::from((topo::INTERNET_ECHO, 7)),
                Duration::from_millis(20),
                Duration::from_millis(150),
                run_for,
                broke_at,
                watch,
            )?)
        } else {
            watch();
            None
        };
        let who = format!("gateway {broken} ({})", gw.public_ip());
        if let Some(r) = watcher {
            match marked {
                Some(d) => println!(
                    "  router {}'s health checks marked {who} unhealthy {} after the break",
                    r.index,
                    ms(d)
                ),
                None => println!(
                    "  router {} still called {who} healthy 3 s after its tunnel died",
                    r.index
                ),
            }
            match (route_had_gw, route_gone) {
                (true, Some(d)) => println!(
                    "  its nexthop left router {}'s egress table 180 {} after the break",
                    r.index,
                    ms(d)
                ),
                (true, None) => println!(
                    "  its nexthop was still in router {}'s egress table 180 3 s after the break",
                    r.index
                ),
                (false, _) => println!(
                    "  (router {}'s table 180 has no route via {} to watch)",
                    r.index,
                    gw.address()
                ),
            }
        }
        if let Some(timeline) = timeline {
            let bad = |r: &Option<Ipv4Addr>| r.is_none() || *r == Some(gw.public_ip());
            let after: Vec<_> = timeline.iter().filter(|(t, _)| *t >= broke_at).collect();
            let last_bad = after.iter().filter(|(_, r)| bad(r)).map(|(t, _)| *t).max();
            match last_bad {
                None => println!("  {who}: no new connection went to it after the break"),
                Some(t) if t + Duration::from_millis(500) > run_for => {
                    sum.gateway_never_left = true;
                    println!(
                        "  {who} still got new connections {} after the break: it never left the route",
                        ms(t - broke_at)
                    )
                }
                Some(t) => {
                    sum.gateway_left_after = Some(t - broke_at);
                    println!(
                        "  clients: the last new connection lost to {who} was {} after the break",
                        ms(t - broke_at),
                    );
                }
            }
            println!(
                "  ({} new connections tried after the break, one every 20 ms, 150 ms connect timeout)",
                after.len()
            );
        }
        heading(4, "long-lived flows when that gateway died");
        match flows.as_mut() {
            None => println!("  skipped: no request got through in scene 1, so no flow to keep"),
            Some(flows) => {
                let before = flows.by_exit();
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
                let total = flows.flows.len();
                println!(
                    "  kept {kept} of {total} flows; {} could have been kept (those not on gateway {broken})",
                    total - on_broken
                );
                if flows.failed_to_open > 0 {
                    println!("  ({} flows failed to open)", flows.failed_to_open);
                }
                sum.flows = Some((total, kept, total - on_broken));
            }
        }
        gw.repair()?;
        if let Some(r) = watcher {
            let t = Instant::now();
            let mut back = None;
            while t.elapsed() < Duration::from_secs(3) {
                if r.gateway_states().is_some_and(|v| {
                    v.iter()
                        .any(|(a, st)| *a == gw.address() && st == "healthy")
                }) {
                    back = Some(t.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            match back {
                Some(d) => println!(
                    "  repaired: router {} calls it healthy again after {}",
                    r.index,
                    ms(d)
                ),
                None => println!(
                    "  repaired, but router {} did not call it healthy within 3 s",
                    r.index
                ),
            }
        }
        sum.gateway_marked_after = marked;
    }

    // 5. Ingress.
    heading(5, "a request from the Internet through a forwarded port");
    if !crate::lab::ipvs_available() {
        let modprobe = std::process::Command::new("modprobe")
            .arg("ip_vs")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
            .unwrap_or_else(|e| e.to_string());
        println!(
            "  this kernel has no IPVS (/proc/net/ip_vs is missing; modprobe ip_vs: {modprobe})"
        );
        println!("  the ingress path needs IPVS: `bash tests/vm/test-ingress.sh` runs this lab with the real daemon inside a VM whose kernel has it (make test does)");
    } else {
        let g = lab.gateway(0);
        let url = format!(
            "http://{}:{}/whoami",
            g.public_ip(),
            g.forwarded_port().unwrap_or(0)
        );
        match lab.internet_http_get(&url, Duration::from_secs(2)) {
            Ok(r) => {
                println!(
                    "  GET {url} from 203.0.113.1 → HTTP {}: {}",
                    r.status,
                    r.body.trim()
                );
                println!("  (the TCP answer came from {}: the reply left through gateway 0)", g.public_ip());
                sum.ingress_answer = Some(r.body);
            }
            Err(e) => println!(
                "  GET {url} failed: {e}\n  (ingress: the `ingress` entry of the routers' /status says why)"
            ),
        }
    }

    // 6. DNS.
    heading(6, "the DNS record set");
    if !lab.has_dns() {
        println!("  skipped: this lab runs without a DNS server (--no-dns)");
        return Ok(sum);
    }
    let expected: Vec<Ipv4Addr> = lab.gateways().iter().map(|g| g.public_ip()).collect();
    let ddns_built = built(&states, "ddns");
    let mut records = lab.dns_a_records(topo::DDNS_HOSTNAME);
    if ddns_built {
        // A gateway was repaired a moment ago; DDNS has a couple of seconds to catch up.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !matches!(&records, Ok(v) if *v == expected) {
            std::thread::sleep(Duration::from_millis(200));
            records = lab.dns_a_records(topo::DDNS_HOSTNAME);
        }
    }
    match records {
        Ok(v) if v.is_empty() && !ddns_built => println!(
            "  {} has no A records on the lab's BIND: not built yet: DDNS (issue 10)",
            topo::DDNS_HOSTNAME
        ),
        Ok(v) => {
            let shown = if v.is_empty() {
                "(none)".to_string()
            } else {
                list(&v)
            };
            println!("  {} A {shown}", topo::DDNS_HOSTNAME);
            println!(
                "  healthy gateways' exit IPs: {} — {}",
                list(&expected),
                if v == expected { "match" } else { "MISMATCH" }
            );
            sum.dns_records = Some(v);
        }
        Err(e) => println!("  dig failed: {e}"),
    }
    Ok(sum)
}
