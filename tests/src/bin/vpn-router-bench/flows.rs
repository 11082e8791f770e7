//! Scenario `flows` (issues 6 and 8): long-lived TCP flows from client pods over 4 gateways to
//! the lab's Internet echo; one gateway is killed; which flows still echo afterwards, against
//! the number that were not on the dead gateway. Run per `egress.mode`, each in a fresh lab
//! with the real daemon; a mode the daemon reports as not built is skipped with a line saying
//! so.

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

fn one_trial(lab: &Lab, a: &Args, victim: usize) -> anyhow::Result<Trial> {
    let r = lab.router(0);
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
    // Only flows that work before the kill count.
    for f in &mut sets {
        let alive = f.check(Duration::from_secs(1));
        let flows = std::mem::take(&mut f.flows);
        f.flows = flows
            .into_iter()
            .zip(alive)
            .filter_map(|(fl, ok)| ok.then_some(fl))
            .collect();
    }
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
    drop(sets);
    Ok(Trial {
        total,
        on_dead,
        kept,
        failed_to_open,
    })
}

enum ModeResult {
    NotBuilt,
    Broken,
    Measured(Vec<Trial>),
}

fn run_mode(a: &Args, mode: &str) -> anyhow::Result<ModeResult> {
    eprintln!(
        "[flows] {mode}: building the lab (1 router, {} gateways, {} clients)",
        a.gateways, a.clients
    );
    let lab = Lab::builder()
        .gateways(a.gateways)
        .routers(1)
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
    // Without VRRP in the daemon nobody holds the egress VIP: the lone router takes it by hand.
    if !wait_until(Duration::from_millis(1500), || r.holds_egress_vip()) {
        eprintln!("[flows] {mode}: no VRRP master holds the egress VIP; adding it to router 0's gw0 by hand");
        r.ns.ip(&[
            "addr",
            "add",
            &format!("{}/{}", topo::EGRESS_VIP, topo::GW_NET_PREFIX),
            "dev",
            "gw0",
        ])?;
    }
    let all: Vec<usize> = (0..a.gateways).collect();
    if !wait_until(Duration::from_secs(15), || {
        healthy(r).is_some_and(|h| h == all)
    }) {
        bail!(
            "router 0 never reported all gateways healthy: {:?}",
            healthy(r)
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
    let mut out = Vec::new();
    for t in 0..a.trials {
        let victim = t % a.gateways;
        let tr = one_trial(&lab, a, victim)?;
        eprintln!(
            "[flows] {mode} trial {}/{}: gateway {victim} killed: {} of {} flows kept, {} were not on it ({} on it; {} failed to open)",
            t + 1,
            a.trials,
            tr.kept,
            tr.total,
            tr.total - tr.on_dead,
            tr.on_dead,
            tr.failed_to_open
        );
        out.push(tr);
        lab.gateway(victim).repair()?;
        if !wait_until(Duration::from_secs(10), || {
            healthy(r).is_some_and(|h| h == all)
        }) {
            bail!("gateway {victim} did not return after its repair");
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    Ok(ModeResult::Measured(out))
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let mut broken = Vec::new();
    let mut lines = Vec::new();
    for mode in &a.modes {
        match run_mode(a, mode)? {
            ModeResult::NotBuilt => skipped.push(mode.clone()),
            ModeResult::Broken => broken.push(mode.clone()),
            ModeResult::Measured(trials) => {
                let f =
                    |g: fn(&Trial) -> usize| trials.iter().map(|t| g(t) as f64).collect::<Vec<_>>();
                for (k, t) in trials.iter().enumerate() {
                    lines.push(format!(
                        "| {mode} | {} | {} | {} | {} | {} | {} |",
                        k + 1,
                        t.total,
                        t.on_dead,
                        t.total - t.on_dead,
                        t.kept,
                        (t.total - t.on_dead).saturating_sub(t.kept)
                    ));
                }
                rows.push(Row::new(
                    format!("{mode}: flows kept"),
                    f(|t| t.kept),
                    "target: all not on the dead gateway",
                ));
                rows.push(Row::new(
                    format!("{mode}: flows not on the dead gateway"),
                    f(|t| t.total - t.on_dead),
                    "the most that can be kept",
                ));
                rows.push(Row::new(
                    format!("{mode}: healthy flows broken"),
                    f(|t| (t.total - t.on_dead).saturating_sub(t.kept)),
                    "target 0",
                ));
            }
        }
    }
    println!();
    println!("## Flows on gateway loss (issues 6, 8)");
    println!(
        "params: vpn-router (1 router), {} gateways, {} long-lived TCP flows from {} client pods to the Internet echo (203.0.113.1:7), one gateway killed (gluetun gone + tunnel dead; trial t kills gateway t mod {}), health interval 200 ms, fall 2; a flow is kept when it still echoes 0.5 s after the router reports the gateway down; {} trials per mode",
        a.gateways, a.flows, a.clients, a.gateways, a.trials
    );
    print!("{}", render_table("flows", 0, &rows));
    println!();
    println!(
        "| mode | trial | working before | on dead gateway | not on it | kept | healthy broken |"
    );
    println!("| --- | --: | --: | --: | --: | --: | --: |");
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
