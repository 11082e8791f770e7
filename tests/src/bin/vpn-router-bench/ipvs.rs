//! Scenario `ipvs` (issue 4): boots the IPVS VM once and runs `ipvs-bench` there, which applies
//! N services x M destinations from empty with our reconciler and loads the same set with
//! `ipvsadm --restore`, per trial, plus a no-change resync and a one-weight change. This side
//! collects its `RESULT` lines and prints the table.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

use crate::stats::{render_table, Row};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(id = "ipvs-services", long = "ipvs-services", default_value_t = 1000)]
    pub services: u32,
    #[arg(
        id = "ipvs-destinations",
        long = "ipvs-destinations",
        default_value_t = 16
    )]
    pub destinations: u32,
    #[arg(id = "ipvs-trials", long = "ipvs-trials", default_value_t = 5)]
    pub trials: u32,
    /// The VM harness.
    #[arg(
        id = "ipvs-vm-run",
        long = "ipvs-vm-run",
        default_value = "tests/vm/run.sh"
    )]
    pub vm_run: PathBuf,
    /// The `ipvs-bench` example binary (host build; the VM sees the host root read-only).
    #[arg(
        id = "ipvs-bench-bin",
        long = "ipvs-bench-bin",
        default_value = "target/release/examples/ipvs-bench"
    )]
    pub ipvs_bench: PathBuf,
    /// VM timeout in seconds.
    #[arg(id = "ipvs-timeout", long = "ipvs-timeout", default_value_t = 1200)]
    pub timeout: u64,
}

#[derive(Debug, Default)]
struct Phase {
    secs: Vec<f64>,
    writes: Vec<u64>,
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    if !a.ipvs_bench.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p ipvs --example ipvs-bench`",
            a.ipvs_bench.display()
        );
    }
    eprintln!(
        "[ipvs] booting the VM: {} services x {} destinations, {} trials (each: ours, then ipvsadm --restore, alternating order)",
        a.services, a.destinations, a.trials
    );
    let mut child = Command::new("bash")
        .arg(&a.vm_run)
        .args(["--timeout", &a.timeout.to_string(), "--"])
        .arg(&a.ipvs_bench)
        .args([
            a.services.to_string(),
            a.destinations.to_string(),
            a.trials.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {}", a.vm_run.display()))?;
    let out = child.stdout.take().context("VM stdout")?;
    let mut phases: std::collections::BTreeMap<String, Phase> = Default::default();
    for line in BufReader::new(out).lines() {
        let line = line.context("read VM output")?;
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() == Some(&"RESULT") && f.len() == 5 {
            let p = phases.entry(f[1].to_string()).or_default();
            p.secs.push(f[3].parse().context("RESULT seconds")?);
            p.writes.push(f[4].parse().context("RESULT writes")?);
        } else {
            eprintln!("[ipvs] {line}");
        }
    }
    let st = child.wait().context("wait for the VM")?;
    if !st.success() {
        bail!(
            "the VM run failed ({st}); see the `vm: serial log:` path above (124: timeout, 125: harness)"
        );
    }
    let writes = |name: &str| -> String {
        let w = phases
            .get(name)
            .map(|p| p.writes.clone())
            .unwrap_or_default();
        let (lo, hi) = (w.iter().min(), w.iter().max());
        match (lo, hi) {
            (Some(lo), Some(hi)) if lo == hi => format!("{lo}"),
            (Some(lo), Some(hi)) => format!("{lo}-{hi}"),
            _ => "-".into(),
        }
    };
    let secs = |name: &str| phases.get(name).map(|p| p.secs.clone()).unwrap_or_default();
    let ratio: Vec<f64> = secs("ipvsadm_restore")
        .iter()
        .zip(secs("ours_apply"))
        .map(|(i, o)| i / o)
        .collect();
    let rows = vec![
        Row::new(
            format!(
                "vpn-router reconciler: apply from empty ({} writes)",
                writes("ours_apply")
            ),
            secs("ours_apply"),
            "target < 1 s (host kernel); here TCG",
        ),
        Row::new(
            format!(
                "`ipvsadm --restore` of the same set ({} commands)",
                writes("ipvsadm_restore")
            ),
            secs("ipvsadm_restore"),
            "reference, same VM, same boot",
        ),
        Row::new(
            format!("no-change resync ({} writes)", writes("ours_resync")),
            secs("ours_resync"),
            "must write nothing",
        ),
        Row::new(
            format!("one weight changed ({} writes)", writes("ours_weight")),
            secs("ours_weight"),
            "SET_DEST, no delete+add",
        ),
        Row::new(
            format!("remove all ({} writes)", writes("ours_remove")),
            secs("ours_remove"),
            "",
        ),
    ];
    println!();
    println!("## IPVS apply (issue 4)");
    println!(
        "params: {} services x {} destinations (TCP :80, mh fallback,port, masq, weight 1), {} trials, one VM boot (Debian 6.12 kernel, qemu TCG: every instruction emulated)",
        a.services, a.destinations, a.trials
    );
    print!("{}", render_table("s", 3, &rows));
    if !ratio.is_empty() {
        print!(
            "{}",
            render_table(
                "x",
                2,
                &[Row::new(
                    "ipvsadm --restore time / our apply time, per trial",
                    ratio,
                    ">1: ours is faster"
                )]
            )
            .lines()
            .skip(2)
            .map(|l| format!("{l}\n"))
            .collect::<String>()
        );
    }
    if phases
        .get("ours_resync")
        .is_some_and(|p| p.writes.iter().any(|w| *w != 0))
    {
        bail!("a no-change resync wrote to the kernel");
    }
    Ok(())
}
