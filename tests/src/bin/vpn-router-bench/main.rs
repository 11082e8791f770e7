//! `vpn-router-bench`: the benchmark scenarios of docs/benchmarks.md, each measuring vpn-router
//! and the tool it replaces side by side in one run and printing a table (median, p95, min,
//! max, n) with the exact parameters. Benchmarks print numbers; they never fail on a timing
//! (they fail only when the rig itself breaks). `make bench` runs `all`.
//!
//!   vpn-router-bench ipvs | gateway-loss | flows | vrrp | all
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
// Sample counts and tick counts become f64 for statistics; they are far below 2^52.
#![allow(clippy::cast_precision_loss)]

mod common;
mod flows;
mod gwloss;
mod ipvs;
mod stats;
mod vrrp;

use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vpn-router-bench",
    about = "vpn-router benchmark scenarios (make bench)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// IPVS apply in the VM: our reconciler vs `ipvsadm --restore` (issue 4).
    Ipvs(ipvs::Args),
    /// Gateway break → removal from the egress group, per failure kind (issue 6).
    GatewayLoss(gwloss::Args),
    /// Long-lived flows kept when one of 4 gateways dies, per egress mode (issues 6, 8).
    Flows(flows::Args),
    /// VRRP failover, SIGTERM handoff, idle cost: keepalived vs vpn-router (issue 5).
    Vrrp(vrrp::Args),
    /// Every scenario, in the order above; a failing scenario is reported and the rest run.
    All {
        #[command(flatten)]
        ipvs: ipvs::Args,
        #[command(flatten)]
        gw: gwloss::Args,
        #[command(flatten)]
        flows: flows::Args,
        #[command(flatten)]
        vrrp: vrrp::Args,
    },
}

/// Tears the labs down on Ctrl-C / SIGTERM, then exits 130.
fn teardown_on_signal() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("\nvpn-router-bench: interrupted, tearing the labs down");
            lab::lab::teardown_live_labs();
            std::process::exit(130);
        });
    });
}

fn timed(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let t = Instant::now();
    eprintln!("[bench] scenario {name}: start");
    let r = f();
    eprintln!(
        "[bench] scenario {name}: {} after {:.0} s",
        if r.is_ok() { "done" } else { "FAILED" },
        t.elapsed().as_secs_f64()
    );
    r
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("vpn-router-bench: run as root (network namespaces, keepalived, the VM)");
        return std::process::ExitCode::from(2);
    }
    teardown_on_signal();
    println!(
        "# vpn-router-bench ({} cores, kernel {})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let results: Vec<(&str, anyhow::Result<()>)> = match cli.cmd {
        Cmd::Ipvs(a) => vec![("ipvs", timed("ipvs", || ipvs::run(&a)))],
        Cmd::GatewayLoss(a) => vec![("gateway-loss", timed("gateway-loss", || gwloss::run(&a)))],
        Cmd::Flows(a) => vec![("flows", timed("flows", || flows::run(&a)))],
        Cmd::Vrrp(a) => vec![("vrrp", timed("vrrp", || vrrp::run(&a)))],
        Cmd::All {
            ipvs: i,
            gw,
            flows: f,
            vrrp: v,
        } => vec![
            ("ipvs", timed("ipvs", || ipvs::run(&i))),
            ("gateway-loss", timed("gateway-loss", || gwloss::run(&gw))),
            ("flows", timed("flows", || flows::run(&f))),
            ("vrrp", timed("vrrp", || vrrp::run(&v))),
        ],
    };
    let mut failed = false;
    for (name, r) in results {
        if let Err(e) = r {
            failed = true;
            eprintln!("vpn-router-bench: scenario {name} FAILED: {e:#}");
        }
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
