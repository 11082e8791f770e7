//! Times the reconciler on a real kernel, side by side with `ipvsadm --restore` of the same set.
//! Per trial: N services x M destinations applied from empty by our reconciler, a no-change
//! resync (which must write nothing), a change of one weight (which must write once), removal;
//! then the same set loaded with `ipvsadm --restore` and checked by a reconcile that must plan
//! nothing (so both loaded the same state), and removal again.
//!
//!   ipvs-bench [SERVICES] [DESTINATIONS] [TRIALS] [--no-ipvsadm]     (default 1000 16 1)
//!
//! Prints a human line per phase and a machine line per measurement:
//! `RESULT <phase> <trial> <seconds> <writes>` (phases: `ours_apply`, `ours_resync`,
//! `ours_weight`, `ours_remove`, `ipvsadm_restore`), which `vpn-router-bench ipvs` collects.
//! Uses services on 10.254.0.0/16 only (TCP port 80, mh) and removes them at the end.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{ExitCode, Stdio};
use std::time::Instant;

use ipvs::{
    DesiredService, Destination, ForwardMethod, IpvsClient, Reconciler, Service, ServiceFlags,
    ServiceKey,
};

fn owned(key: &ServiceKey) -> bool {
    matches!(key, ServiceKey::Addr { addr: SocketAddr::V4(a), .. } if a.ip().octets()[..2] == [10, 254])
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 254, 0, 0)) + i)
}

fn real_server(j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 253, 0, 1)) + j)
}

fn desired(services: u32, dests: u32) -> Vec<DesiredService> {
    (0..services)
        .map(|i| {
            let key = ServiceKey::tcp(SocketAddr::new(vip(i).into(), 80));
            DesiredService {
                service: Service::new(key, "mh")
                    .with_flags(ServiceFlags::FALLBACK | ServiceFlags::PORT),
                destinations: (0..dests)
                    .map(|j| {
                        Destination::new(
                            SocketAddr::new(real_server(j).into(), 80),
                            ForwardMethod::Masquerade,
                            1,
                        )
                    })
                    .collect(),
            }
        })
        .collect()
}

/// The same set as `desired`, in `ipvsadm --restore` syntax (what `ipvsadm-save -n` prints).
fn restore_text(services: u32, dests: u32) -> String {
    let mut s = String::new();
    for i in 0..services {
        let v = vip(i);
        let _ = writeln!(s, "-A -t {v}:80 -s mh -b mh-fallback,mh-port");
        for j in 0..dests {
            let _ = writeln!(s, "-a -t {v}:80 -r {}:80 -m -w 1", real_server(j));
        }
    }
    s
}

fn result(phase: &str, trial: u32, secs: f64, writes: u64) {
    println!("RESULT {phase} {trial} {secs:.6} {writes}");
}

type BoxError = Box<dyn std::error::Error>;

async fn ours(
    client: &IpvsClient,
    r: &Reconciler<fn(&ServiceKey) -> bool>,
    want: &[DesiredService],
    trial: u32,
) -> Result<(), BoxError> {
    let (services, dests) = (want.len(), want.first().map_or(0, |d| d.destinations.len()));
    let (w, t) = (client.writes_sent(), Instant::now());
    let first = r.reconcile(want).await?;
    let apply = t.elapsed().as_secs_f64();
    if let Some(e) = first.errors.first() {
        return Err(format!("{} writes failed, first: {}", first.errors.len(), e.error).into());
    }
    let writes = client.writes_sent() - w;
    println!("trial {trial}: apply from empty: {services} services x {dests} destinations, {writes} writes in {apply:.3} s");
    result("ours_apply", trial, apply, writes);

    let (w, t) = (client.writes_sent(), Instant::now());
    let second = r.reconcile(want).await?;
    let resync = t.elapsed().as_secs_f64();
    let writes = client.writes_sent() - w;
    println!(
        "trial {trial}: no-change resync: {} planned, {writes} writes in {resync:.3} s",
        second.ops.len()
    );
    result("ours_resync", trial, resync, writes);
    if !second.ops.is_empty() || writes != 0 {
        return Err("the no-change resync wrote something".into());
    }

    let mut changed = want.to_vec();
    let last = changed.len().saturating_sub(1);
    if let Some(d) = changed
        .get_mut(last)
        .and_then(|s| s.destinations.get_mut(0))
    {
        d.weight = 2;
    }
    let (w, t) = (client.writes_sent(), Instant::now());
    let third = r.reconcile(&changed).await?;
    let weight = t.elapsed().as_secs_f64();
    let writes = client.writes_sent() - w;
    println!(
        "trial {trial}: one weight changed: {} planned, {writes} writes in {weight:.3} s",
        third.ops.len()
    );
    result("ours_weight", trial, weight, writes);
    if writes != 1 || !third.errors.is_empty() {
        return Err(format!("one weight change took {writes} writes (want 1)").into());
    }

    let (w, t) = (client.writes_sent(), Instant::now());
    r.reconcile(&[]).await?;
    let remove = t.elapsed().as_secs_f64();
    let writes = client.writes_sent() - w;
    println!("trial {trial}: remove all: {writes} writes in {remove:.3} s");
    result("ours_remove", trial, remove, writes);
    Ok(())
}

async fn ipvsadm(
    client: &IpvsClient,
    r: &Reconciler<fn(&ServiceKey) -> bool>,
    want: &[DesiredService],
    text: &str,
    trial: u32,
) -> Result<(), BoxError> {
    let path = std::env::temp_dir().join(format!("ipvs-bench-{}.rules", std::process::id()));
    std::fs::write(&path, text)?;
    let input = std::fs::File::open(&path)?;
    let t = Instant::now();
    let out = std::process::Command::new("ipvsadm")
        .arg("--restore")
        .stdin(Stdio::from(input))
        .output()
        .map_err(|e| format!("run `ipvsadm --restore` (apt-get install ipvsadm): {e}"))?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    if !out.status.success() {
        return Err(format!(
            "ipvsadm --restore failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    let lines = text.lines().count();
    println!("trial {trial}: ipvsadm --restore: {lines} commands in {secs:.3} s");
    result(
        "ipvsadm_restore",
        trial,
        secs,
        u64::try_from(lines).unwrap_or(u64::MAX),
    );
    // Our reconciler must find exactly the desired state: proof both loaded the same set.
    let (w, check) = (client.writes_sent(), r.reconcile(want).await?);
    if !check.ops.is_empty() || client.writes_sent() != w {
        return Err(format!(
            "after ipvsadm --restore our reconciler planned {} ops: the two sets differ",
            check.ops.len()
        )
        .into());
    }
    r.reconcile(&[]).await?;
    Ok(())
}

async fn run(services: u32, dests: u32, trials: u32, with_ipvsadm: bool) -> Result<(), BoxError> {
    let client = IpvsClient::connect().await?;
    let r: Reconciler<fn(&ServiceKey) -> bool> = Reconciler::new(client.clone(), owned);
    r.reconcile(&[]).await?; // leftovers of an earlier run
    let want = desired(services, dests);
    let text = restore_text(services, dests);
    println!("PARAMS services={services} destinations={dests} trials={trials} scheduler=mh flags=fallback,port forward=masq");
    for trial in 0..trials {
        // Alternate who goes first, so neither always runs on a freshly emptied table.
        if trial % 2 == 1 && with_ipvsadm {
            ipvsadm(&client, &r, &want, &text, trial).await?;
            ours(&client, &r, &want, trial).await?;
        } else {
            ours(&client, &r, &want, trial).await?;
            if with_ipvsadm {
                ipvsadm(&client, &r, &want, &text, trial).await?;
            }
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let with_ipvsadm = !args.iter().any(|a| a == "--no-ipvsadm");
    let mut nums = args.iter().filter(|a| !a.starts_with("--"));
    let mut next = |name: &str, default: u32| -> Result<u32, String> {
        nums.next()
            .map_or(Ok(default), |a| a.parse::<u32>())
            .map_err(|e| format!("ipvs-bench: {name}: {e}"))
    };
    let parsed = (|| {
        Ok::<_, String>((
            next("SERVICES", 1000)?,
            next("DESTINATIONS", 16)?,
            next("TRIALS", 1)?,
        ))
    })();
    let (services, dests, trials) = match parsed {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(services, dests, trials, with_ipvsadm).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipvs-bench: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
