//! Scenario `gateway-loss` (issue 6): the netns lab with the real daemon (one router, four
//! gateways, `egress.mode: ecmp`); break one gateway in each way the gluetun mock knows and
//! time from the break to the kernel event that takes its nexthop out of the egress group
//! (`ip monitor nexthop` in the router's namespace, each line stamped when read).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use lab::config::RouterTuning;
use lab::{GatewayBreak, Lab};

use crate::common::{current_group, ms, wait_until, NexthopMonitor};
use crate::stats::{render_table, Row};

/// The egress group's and gateway nexthops' ids (gateway-route-manager's defaults).
pub const GROUP_ID: u32 = 2056;
pub const NEXTHOP_BASE: u32 = 1800;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Trials per way of breaking a gateway.
    #[arg(id = "gw-trials", long = "gw-trials", default_value_t = 10)]
    pub trials: usize,
    #[arg(id = "gw-interval-ms", long = "gw-interval-ms", default_value_t = 200)]
    pub interval_ms: u64,
    #[arg(id = "gw-timeout-ms", long = "gw-timeout-ms", default_value_t = 150)]
    pub timeout_ms: u64,
    #[arg(id = "gw-fall", long = "gw-fall", default_value_t = 2)]
    pub fall: u32,
    #[arg(id = "gw-rise", long = "gw-rise", default_value_t = 2)]
    pub rise: u32,
    #[arg(id = "gw-gateways", long = "gw-gateways", default_value_t = 4)]
    pub gateways: usize,
}

fn kind_name(k: GatewayBreak) -> &'static str {
    match k {
        GatewayBreak::ProcessGone => "refused (gluetun killed)",
        GatewayBreak::ApiStopped => "status stopped",
        GatewayBreak::PublicIpEmpty => "public IP empty",
        GatewayBreak::TunnelDead => "tunnel dead (probe only)",
        GatewayBreak::AuthChanged => "401 (credentials changed)",
    }
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let tuning = RouterTuning {
        health_interval: Duration::from_millis(a.interval_ms),
        health_timeout: Duration::from_millis(a.timeout_ms),
        rise: a.rise,
        fall: a.fall,
        egress_mode: "ecmp".into(),
        log_level: "info".into(),
        ..RouterTuning::default()
    };
    let checks = tuning.checks.join(",");
    eprintln!(
        "[gateway-loss] building the lab: 1 router, {} gateways",
        a.gateways
    );
    let lab = Lab::builder()
        .gateways(a.gateways)
        .routers(1)
        .clients(0)
        .ingress_pods(0)
        .dns(false)
        .tuning(tuning)
        .build()
        .context("build the lab")?;
    let r = lab.router(0);
    let all: Vec<u32> = (0..a.gateways)
        .map(|i| NEXTHOP_BASE + u32::try_from(i).unwrap_or(0))
        .collect();
    let full = |m: &[u32]| all.iter().all(|n| m.contains(n));
    if !wait_until(Duration::from_secs(15), || {
        full(&current_group(&r.ns, GROUP_ID))
    }) {
        bail!(
            "egress group {GROUP_ID} never held all {} gateways; table 180:\n{}",
            a.gateways,
            r.egress_routes()
        );
    }
    let mon = NexthopMonitor::start(&r.ns)?;
    let target = a.interval_ms * u64::from(a.fall) + 50;
    let mut rows = Vec::new();
    let mut break_costs = Vec::new();
    for kind in GatewayBreak::ALL {
        let mut samples = Vec::new();
        let mut missed = 0;
        for t in 0..a.trials {
            let i = t % a.gateways;
            let nh = all[i];
            let gw = lab.gateway(i);
            mon.drain();
            let t0 = Instant::now();
            gw.break_as(kind).context("break the gateway")?;
            break_costs.push(ms(t0.elapsed()));
            match mon.wait_group(GROUP_ID, Duration::from_secs(5), |m| !m.contains(&nh)) {
                Some(t1) => {
                    let d = ms(t1.duration_since(t0));
                    eprintln!(
                        "[gateway-loss] {} trial {}/{}: gateway {i} left the group after {d:.1} ms",
                        kind_name(kind),
                        t + 1,
                        a.trials
                    );
                    samples.push(d);
                }
                None => {
                    missed += 1;
                    eprintln!(
                        "[gateway-loss] {} trial {}/{}: gateway {i} still in the group after 5 s",
                        kind_name(kind),
                        t + 1,
                        a.trials
                    );
                }
            }
            gw.repair().context("repair the gateway")?;
            if mon
                .wait_group(GROUP_ID, Duration::from_secs(5), |m| full(m))
                .is_none()
                && !full(&current_group(&r.ns, GROUP_ID))
            {
                bail!("gateway {i} did not come back into the group within 5 s of its repair");
            }
            // Start the next break at a different point of the check schedule.
            std::thread::sleep(Duration::from_millis(100 + (t as u64 * 37) % a.interval_ms));
        }
        let note = if missed > 0 {
            format!("target ≤ {target} ms; {missed} trials not removed within 5 s")
        } else {
            format!("target ≤ {target} ms")
        };
        rows.push(Row::new(kind_name(kind), samples, note));
    }
    println!();
    println!("## Gateway loss (issue 6): break → nexthop leaves the egress group");
    println!(
        "params: vpn-router (1 router), {} gateways, egress.mode ecmp, health interval {} ms (jittered), timeout {} ms, fall {}, rise {}, checks [{checks}]; {} trials per kind, gateway t mod {}; time from just before the break action to the `ip monitor nexthop` line (read at once) showing group {GROUP_ID} without it",
        a.gateways, a.interval_ms, a.timeout_ms, a.fall, a.rise, a.trials, a.gateways
    );
    print!("{}", render_table("ms", 1, &rows));
    print!(
        "{}",
        render_table(
            "ms",
            1,
            &[Row::new(
                "the break action itself (nft + state file / kill)",
                break_costs,
                "included above"
            )]
        )
        .lines()
        .skip(2)
        .map(|l| format!("{l}\n"))
        .collect::<String>()
    );
    Ok(())
}
