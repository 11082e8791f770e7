//! Scenario `flows` (issues 6 and 8): long-lived TCP flows from client pods over 4 gateways to
//! the lab's Internet echo, through the VRRP master of two vpn-routers. Event 1: one gateway is
//! killed; which flows still echo afterwards, against the number that were not on the dead
//! gateway. Event 2: the master router's pod dies; which flows still echo through the new
//! master (target: all). Run per `egress.mode`, each in a fresh lab with the real daemon; a
//! mode the daemon reports as not built is skipped with a line saying so.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use lab::config::RouterTuning;
use lab::lab::RouterNode;
use lab::probe::Flows;
use lab::{topo, GatewayBreak, Lab};

use crate::common::wait_until;
use crate::stats::{render_table, Row};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Modes to compare (ecmp = plain multipath, hash-threshold; the reference).
    #[arg(
        id = "flows-modes",
        long = "flows-modes",
        value_delimiter = ',',
        default_value = "ecmp,ecmp_resilient,consistent"
    )]
    pub modes: Vec<String>,
    #[arg(id = "flows-count", long = "flows-count", default_value_t = 400)]
    pub flows: usize,
    #[arg(id = "flows-clients", long = "flows-clients", default_value_t = 4)]
    pub clients: usize,
    #[arg(id = "flows-gateways", long = "flows-gateways", default_value_t = 4)]
    pub gateways: usize,
    /// Trials per mode (the killed gateway is trial mod gateways).
    #[arg(id = "flows-trials", long = "flows-trials", default_value_t = 4)]
    pub trials: usize,
    /// Router-failover trials per mode (the master router's pod dies: kill -9, cables cut).
    #[arg(
        id = "flows-router-trials",
        long = "flows-router-trials",
        default_value_t = 2
    )]
    pub router_trials: usize,
}

/// Healthy gateway indices the router reports in /status.
fn healthy(r: &RouterNode) -> Option<Vec<usize>> {
    let v = r.status().ok()?;
    let h = v["components"]["gateways"]["detail"]["healthy"].as_array()?;
    Some(
        h.iter()
            .filter_map(|x| usize::try_from(x.as_u64()?).ok())
            .collect(),
    )
}

fn egress_note(r: &RouterNode) -> String {
    r.status()
        .ok()
        .and_then(|v| {
            v["components"]["gateways"]["detail"]["egress"]
                .as_str()
                .map(String::from)
        })
        .unwrap_or_default()
}

struct Trial {
    total: usize,
    on_dead: usize,
    kept: usize,
    failed_to_open: usize,
}

/// Opens the flows from every client at once and keeps those that echo.
fn open_working(lab: &Lab, a: &Args) -> anyhow::Result<(Vec<Flows>, usize)> {
    let per = a.flows.div_ceil(a.clients);
    let mut sets: Vec<Flows> = std::thread::scope(|s| {
        let hs: Vec<_> = lab
            .clients()
            .iter()
            .map(|c| s.spawn(move || c.open_flows(per, Duration::from_secs(1))))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("flow opener panicked"))?
                    .map_err(anyhow::Error::from)
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let failed_to_open: usize = sets.iter().map(|f| f.failed_to_open).sum();
    for f in &mut sets {
        let alive = f.check(Duration::from_secs(1));
        let flows = std::mem::take(&mut f.flows);
        f.flows = flows
            .into_iter()
            .zip(alive)
            .filter_map(|(fl, ok)| ok.then_some(fl))
            .collect();
    }
    Ok((sets, failed_to_open))
}

/// Probes every flow (all clients at once) and counts those that still echo.
fn count_alive(sets: &mut [Flows]) -> usize {
    let mut kept = 0;
    std::thread::scope(|s| {
        let hs: Vec<_> = sets
            .iter_mut()
            .map(|f| s.spawn(move || f.check(Duration::from_millis(1500))))
            .collect();
        for h in hs {
            if let Ok(v) = h.join() {
                kept += v.iter().filter(|x| **x).count();
            }
        }
    });
    kept
}

fn gateway_trial(lab: &Lab, a: &Args, victim: usize) -> anyhow::Result<Trial> {
    let r = lab.router(0);
    let (mut sets, failed_to_open) = open_working(lab, a)?;
    let dead_ip: Ipv4Addr = topo::gateway_public(victim);
    let total: usize = sets.iter().map(|f| f.flows.len()).sum();
    let on_dead: usize = sets
        .iter()
        .map(|f| f.flows.iter().filter(|x| x.exit_ip == dead_ip).count())
        .sum();
    lab.gateway(victim)
        .break_as(GatewayBreak::ProcessGone)
        .context("kill the gateway")?;
    if !wait_until(Duration::from_secs(5), || {
        healthy(r).is_some_and(|h| !h.contains(&victim))
    }) {
        bail!("the router still reports gateway {victim} healthy 5 s after it was killed");
    }
    // Let the egress change reach the kernel.
    std::thread::sleep(Duration::from_millis(500));
    let kept = count_alive(&mut sets);
    Ok(Trial {
        total,
        on_dead,
        kept,
        failed_to_open,
    })
}

fn router_trial(lab: &Lab, a: &Args) -> anyhow::Result<Trial> {
    let (r0, r1) = (lab.router(0), lab.router(1));
    let (mut sets, failed_to_open) = open_working(lab, a)?;
    let total: usize = sets.iter().map(|f| f.flows.len()).sum();
    r0.kill_pod().context("kill router 0's pod")?;
    if !wait_until(Duration::from_secs(5), || r1.holds_egress_vip()) {
        bail!("router 1 did not take the egress VIP within 5 s of router 0's death");
    }
    std::thread::sleep(Duration::from_millis(500));
    let kept = count_alive(&mut sets);
    r0.revive_pod().context("revive router 0")?;
    Ok(Trial {
        total,
        on_dead: 0,
        kept,
        failed_to_open,
    })
}

enum ModeResult {
    NotBuilt,
    Broken,
    Measured {
        gateway: Vec<Trial>,
        router: Vec<Trial>,
    },
}

fn all_healthy(lab: &Lab, n: usize) -> bool {
    let all: Vec<usize> = (0..n).collect();
    lab.routers()
        .iter()
        .all(|r| healthy(r).is_some_and(|h| h == all))
}

fn r0_master(lab: &Lab) -> bool {
    lab.router(0).holds_egress_vip() && !lab.router(1).holds_egress_vip()
}

fn run_mode(a: &Args, mode: &str) -> anyhow::Result<ModeResult> {
    eprintln!(
        "[flows] {mode}: building the lab (2 routers, {} gateways, {} clients)",
        a.gateways, a.clients
    );
    let lab = Lab::builder()
        .gateways(a.gateways)
        .routers(2)
        .clients(a.clients)
        .ingress_pods(0)
        .dns(false)
        .tuning(RouterTuning {
            egress_mode: mode.into(),
            log_level: "info".into(),
            ..RouterTuning::default()
        })
        .build()
        .context("build the lab")?;
    let r = lab.router(0);
    let vrrp = wait_until(Duration::from_secs(3), || r0_master(&lab));
    if !vrrp {
        eprintln!("[flows] {mode}: router 0 is not the VRRP master (VRRP not wired?); adding the egress VIP to its gw0 by hand, no router-failover trials");
        r.ns.ip(&[
            "addr",
            "add",
            &format!("{}/{}", topo::EGRESS_VIP, topo::GW_NET_PREFIX),
            "dev",
            "gw0",
        ])?;
    }
    if !wait_until(Duration::from_secs(15), || all_healthy(&lab, a.gateways)) {
        bail!(
            "the routers never reported all gateways healthy: {:?} / {:?}",
            healthy(r),
            healthy(lab.router(1))
        );
    }
    let note = egress_note(r);
    if note.contains("not built") {
        println!("flows: egress.mode {mode}: not built (the daemon says: {note}); skipped");
        return Ok(ModeResult::NotBuilt);
    }
    let mut last_err = String::new();
    let reachable = wait_until(Duration::from_secs(5), || {
        match lab.client(0).exit_ip(Duration::from_millis(500)) {
            Ok(_) => true,
            Err(e) => {
                last_err = e.to_string();
                false
            }
        }
    });
    if !reachable {
        println!(
            "flows: egress.mode {mode}: BROKEN: every gateway is healthy but a client pod cannot reach the Internet echo ({last_err}); the daemon says egress: {note}"
        );
        return Ok(ModeResult::Broken);
    }
    let mut gateway = Vec::new();
    for t in 0..a.trials {
        let victim = t % a.gateways;
        let tr = gateway_trial(&lab, a, victim)?;
        eprintln!(
            "[flows] {mode} gateway trial {}/{}: gateway {victim} killed: {} of {} flows kept, {} were not on it ({} on it; {} failed to open)",
            t + 1,
            a.trials,
            tr.kept,
            tr.total,
            tr.total - tr.on_dead,
            tr.on_dead,
            tr.failed_to_open
        );
        gateway.push(tr);
        lab.gateway(victim).repair()?;
        if !wait_until(Duration::from_secs(10), || all_healthy(&lab, a.gateways)) {
            bail!("gateway {victim} did not return after its repair");
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    let mut router = Vec::new();
    for t in 0..if vrrp { a.router_trials } else { 0 } {
        let tr = router_trial(&lab, a)?;
        eprintln!(
            "[flows] {mode} router trial {}/{}: master's pod killed: {} of {} flows kept ({} failed to open)",
            t + 1,
            a.router_trials,
            tr.kept,
            tr.total,
            tr.failed_to_open
        );
        router.push(tr);
        if !wait_until(Duration::from_secs(10), || {
            r0_master(&lab) && all_healthy(&lab, a.gateways)
        }) {
            bail!(
                "router 0 did not become master again with all gateways healthy after its revival"
            );
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    Ok(ModeResult::Measured { gateway, router })
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut rrows = Vec::new();
    let mut skipped = Vec::new();
    let mut broken = Vec::new();
    let mut lines = Vec::new();
    for mode in &a.modes {
        match run_mode(a, mode)? {
            ModeResult::NotBuilt => skipped.push(mode.clone()),
            ModeResult::Broken => broken.push(mode.clone()),
            ModeResult::Measured { gateway, router } => {
                let f = |v: &[Trial], g: fn(&Trial) -> usize| {
                    v.iter().map(|t| g(t) as f64).collect::<Vec<_>>()
                };
                for (k, t) in gateway.iter().enumerate() {
                    lines.push(format!(
                        "| {mode} | gateway {} killed | {} | {} | {} | {} | {} |",
                        k % a.gateways,
                        t.total,
                        t.on_dead,
                        t.total - t.on_dead,
                        t.kept,
                        (t.total - t.on_dead).saturating_sub(t.kept)
                    ));
                }
                for t in &router {
                    lines.push(format!(
                        "| {mode} | master router killed | {} | - | {} | {} | {} |",
                        t.total,
                        t.total,
                        t.kept,
                        t.total.saturating_sub(t.kept)
                    ));
                }
                rows.push(Row::new(
                    format!("{mode}: flows kept"),
                    f(&gateway, |t| t.kept),
                    "target: all not on the dead gateway",
                ));
                rows.push(Row::new(
                    format!("{mode}: flows not on the dead gateway"),
                    f(&gateway, |t| t.total - t.on_dead),
                    "the most that can be kept",
                ));
                rows.push(Row::new(
                    format!("{mode}: healthy flows broken"),
                    f(&gateway, |t| (t.total - t.on_dead).saturating_sub(t.kept)),
                    "target 0",
                ));
                if !router.is_empty() {
                    rrows.push(Row::new(
                        format!("{mode}: flows kept"),
                        f(&router, |t| t.kept),
                        "target: all",
                    ));
                    rrows.push(Row::new(
                        format!("{mode}: flows working before"),
                        f(&router, |t| t.total),
                        "",
                    ));
                }
            }
        }
    }
    println!();
    println!("## Flows on gateway loss and router failover (issues 6, 8)");
    println!(
        "params: 2 vpn-routers (VRRP, 100 ms adverts; router 0 master), {} gateways, {} long-lived TCP flows from {} client pods to the Internet echo (203.0.113.1:7), health interval 200 ms, fall 2. Gateway loss: one gateway killed (gluetun gone + tunnel dead; trial t kills gateway t mod {}), a flow is kept when it still echoes 0.5 s after the router reports the gateway down; {} trials per mode. Router failover: the master's pod dies (kill -9, cables cut), a flow is kept when it echoes 0.5 s after the backup holds the VIP; {} trials per mode",
        a.gateways, a.flows, a.clients, a.gateways, a.trials, a.router_trials
    );
    println!("Gateway loss:");
    print!("{}", render_table("flows", 0, &rows));
    if !rrows.is_empty() {
        println!("Router failover:");
        print!("{}", render_table("flows", 0, &rrows));
    }
    println!();
    println!(
        "| mode | event | working before | on dead gateway | could be kept | kept | broken needlessly |"
    );
    println!("| --- | --- | --: | --: | --: | --: | --: |");
    for l in lines {
        println!("{l}");
    }
    for m in skipped {
        println!("egress.mode {m}: not built (skipped)");
    }
    for m in &broken {
        println!(
            "egress.mode {m}: BROKEN: client traffic does not reach the Internet (not measured)"
        );
    }
    if !broken.is_empty() {
        bail!(
            "egress modes that carry no client traffic: {}",
            broken.join(", ")
        );
    }
    Ok(())
}
