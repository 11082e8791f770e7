//! Scenario `vrrp` (issue 5): one rig (the netns lab with two router namespaces, one client,
//! no daemon started by the lab) runs first keepalived, then vpn-router, with the same
//! settings: VRRPv3, 10 ms adverts, priorities as the lab gives them, adverts and VMAC on the
//! router's `gw0`, the VIP 192.168.26.254/22. Measured per implementation: the client's outage
//! (longest gap between replies of a ping to the VIP every 5 ms) when the master's links are
//! cut, and on SIGTERM of the master; then the idle master's CPU (scheduler run time of
//! all its threads, /proc/PID/task/*/schedstat, over a window) and RSS.
//!
//! vpn-router counts as "not built" when neither router holds the VIP within a few seconds of
//! starting (VRRP not wired into the daemon); the scenario says so and measures keepalived.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use lab::config::priority;
use lab::lab::RouterLink;
use lab::{topo, Lab};

use crate::common::{cpu_percent, ms, ping_during, rss_kb, wait_until, PingOutage as Outage};
use crate::stats::{render_table, summarize, Row};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Failover and SIGTERM trials per implementation.
    #[arg(id = "vrrp-trials", long = "vrrp-trials", default_value_t = 20)]
    pub trials: usize,
    #[arg(id = "vrrp-advert-ms", long = "vrrp-advert-ms", default_value_t = 10)]
    pub advert_ms: u64,
    #[arg(id = "vrrp-ping-ms", long = "vrrp-ping-ms", default_value_t = 5)]
    pub ping_ms: u64,
    /// Idle master CPU window.
    #[arg(id = "vrrp-idle-secs", long = "vrrp-idle-secs", default_value_t = 20)]
    pub idle_secs: u64,
    /// Idle windows per implementation, taken in alternating order (A B B A ...) after all
    /// trials, each with freshly started daemons, so that a drift in the machine's load
    /// weighs on both sides alike.
    #[arg(
        id = "vrrp-idle-rounds",
        long = "vrrp-idle-rounds",
        default_value_t = 3
    )]
    pub idle_rounds: usize,
    /// Implementations to measure.
    #[arg(
        id = "vrrp-impls",
        long = "vrrp-impls",
        value_delimiter = ',',
        default_value = "keepalived,vpn-router"
    )]
    pub impls: Vec<String>,
    #[arg(
        id = "vrrp-keepalived",
        long = "vrrp-keepalived",
        default_value = "/usr/sbin/keepalived"
    )]
    pub keepalived: PathBuf,
}

/// What one implementation measured.
#[derive(Default)]
struct Measured {
    cut: Vec<Outage>,
    term: Vec<Outage>,
    /// Trials before which the VIP did not answer within 3 s although only router 0 held it.
    dark_before_cut: usize,
    dark_before_term: usize,
    /// Per link-cut trial: the old master's last advert to the new master's first, as seen at
    /// the switch (None when the capture did not show both).
    takeover: Vec<Option<Duration>>,
}

/// From `tcpdump -nn -tt` lines of VRRP adverts: the time from the last advert announcing
/// `old_prio` to the first one announcing `new_prio` after it. Unlike the ping outage, this
/// does not depend on the prober: `ping -i` stretches its interval while replies are missing,
/// which puts the first answered ping on a 10 ms grid.
fn takeover_on_wire(lines: &[String], old_prio: u8, new_prio: u8) -> Option<Duration> {
    let mut last_old: Option<f64> = None;
    for l in lines {
        let Some(t) = l
            .split_whitespace()
            .next()
            .and_then(|t| t.parse::<f64>().ok())
        else {
            continue;
        };
        let Some(prio) = l
            .split("prio ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse::<u8>().ok())
        else {
            continue;
        };
        if prio == old_prio {
            last_old = Some(t);
        } else if prio == new_prio {
            if let Some(old) = last_old {
                return Some(Duration::from_secs_f64((t - old).max(0.0)));
            }
        }
    }
    None
}

/// How the rig drives one implementation on router `k` (0 = preferred master, 1 = backup).
trait Vrrp {
    fn name(&self) -> &'static str;
    fn start(&mut self, k: usize) -> anyhow::Result<()>;
    /// The pid a SIGTERM goes to for router k.
    fn main_pid(&self, k: usize) -> Option<i32>;
    /// Waits for router k's instance to exit after a SIGTERM.
    fn reap(&mut self, k: usize) -> anyhow::Result<()>;
    /// (name, pid) of the processes whose idle cost is reported for router k.
    fn processes(&self, k: usize) -> Vec<(String, i32)>;
    fn stop_all(&mut self);
}

struct Keepalived<'a> {
    lab: &'a Lab,
    bin: PathBuf,
    advert: Duration,
    children: [Option<Child>; 2],
}

impl Keepalived<'_> {
    fn file(&self, k: usize, ext: &str) -> PathBuf {
        self.lab.dir.join(format!("keepalived-r{k}.{ext}"))
    }

    fn config(&self, k: usize) -> String {
        let secs = self.advert.as_secs_f64();
        format!(
            "global_defs {{\n  router_id lab-r{k}\n}}\nvrrp_instance router {{\n  state BACKUP\n  interface gw0\n  use_vmac vrrp.{vrid}\n  virtual_router_id {vrid}\n  version 3\n  priority {prio}\n  advert_int {secs}\n  virtual_ipaddress {{\n    {vip}/{plen}\n  }}\n}}\n",
            vrid = topo::VRID,
            prio = priority(k, 2),
            vip = topo::EGRESS_VIP,
            plen = topo::GW_NET_PREFIX,
        )
    }

    fn pidfile(path: &Path) -> Option<i32> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }
}

impl Vrrp for Keepalived<'_> {
    fn name(&self) -> &'static str {
        "keepalived"
    }

    fn start(&mut self, k: usize) -> anyhow::Result<()> {
        let conf = self.file(k, "conf");
        std::fs::write(&conf, self.config(k)).context("write keepalived.conf")?;
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.file(k, "log"))
            .context("keepalived log")?;
        let _ = std::fs::remove_file(self.file(k, "vrrp.pid"));
        let child = self
            .lab
            .router(k)
            .ns
            .command(&self.bin)
            .args([
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--no-syslog",
                "--vrrp",
            ])
            .arg("--use-file")
            .arg(&conf)
            .arg("--pid")
            .arg(self.file(k, "pid"))
            .arg("--vrrp_pid")
            .arg(self.file(k, "vrrp.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("keepalived log")?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!("start {} (apt-get install keepalived)", self.bin.display())
            })?;
        self.children[k] = Some(child);
        if !wait_until(Duration::from_secs(5), || {
            Self::pidfile(&self.file(k, "vrrp.pid")).is_some()
        }) {
            bail!(
                "keepalived on router {k} did not start its VRRP process; log: {}",
                self.file(k, "log").display()
            );
        }
        Ok(())
    }

    fn main_pid(&self, k: usize) -> Option<i32> {
        self.children[k]
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
    }

    fn reap(&mut self, k: usize) -> anyhow::Result<()> {
        if let Some(mut c) = self.children[k].take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("keepalived on router {k} did not exit within 5 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    fn processes(&self, k: usize) -> Vec<(String, i32)> {
        let mut v = Vec::new();
        if let Some(p) = Self::pidfile(&self.file(k, "vrrp.pid")) {
            v.push(("keepalived VRRP process".to_string(), p));
        }
        if let Some(p) = self.children[k]
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
        {
            v.push(("keepalived parent process".to_string(), p));
        }
        v
    }

    fn stop_all(&mut self) {
        for k in 0..2 {
            sigterm(self.main_pid(k));
        }
        for k in 0..2 {
            let _ = self.reap(k);
        }
    }
}

struct Daemon<'a> {
    lab: &'a Lab,
    advert: Duration,
}

impl Daemon<'_> {
    /// A VRRP-only config, the same instance keepalived runs.
    fn config(&self, k: usize) -> String {
        format!(
            "# vpn-router-bench vrrp scenario, router {k}\napi:\n  listen: 0.0.0.0:{api}\nlog: {{ level: info, format: text }}\nvrrp:\n  - name: router\n    interface: gw0\n    vrid: {vrid}\n    version: 3\n    priority: {prio}\n    advert_interval: {adv}ms\n    preempt: true\n    vmac: true\n    virtual_ips:\n      - {{ address: {vip}/{plen}, interface: gw0 }}\n",
            api = topo::ROUTER_API_PORT,
            vrid = topo::VRID,
            prio = priority(k, 2),
            adv = self.advert.as_millis(),
            vip = topo::EGRESS_VIP,
            plen = topo::GW_NET_PREFIX,
        )
    }

    fn pid(&self, k: usize) -> Option<i32> {
        self.lab.router(k).ns.pids().into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "vpn-router")
        })
    }
}

impl Vrrp for Daemon<'_> {
    fn name(&self) -> &'static str {
        "vpn-router"
    }

    fn start(&mut self, k: usize) -> anyhow::Result<()> {
        let y = self.config(k);
        let r = self.lab.router(k);
        r.rewrite_config(|_| y)?;
        r.start().context("start vpn-router")?;
        Ok(())
    }

    fn main_pid(&self, k: usize) -> Option<i32> {
        self.pid(k)
    }

    fn reap(&mut self, k: usize) -> anyhow::Result<()> {
        let r = self.lab.router(k);
        if !wait_until(Duration::from_secs(5), || r.exited().is_some()) {
            bail!("vpn-router on router {k} did not exit within 5 s of SIGTERM");
        }
        Ok(())
    }

    fn processes(&self, k: usize) -> Vec<(String, i32)> {
        self.pid(k)
            .map(|p| vec![("vpn-router (whole daemon)".to_string(), p)])
            .unwrap_or_default()
    }

    fn stop_all(&mut self) {
        for k in 0..2 {
            sigterm(self.main_pid(k));
        }
        for k in 0..2 {
            let _ = self.reap(k);
        }
    }
}

fn sigterm(pid: Option<i32>) {
    if let Some(p) = pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

fn r0_is_master(lab: &Lab) -> bool {
    lab.router(0).holds_egress_vip() && !lab.router(1).holds_egress_vip()
}

fn wait_r0_master(lab: &Lab, what: &str) -> anyhow::Result<()> {
    if !wait_until(Duration::from_secs(10), || r0_is_master(lab)) {
        bail!(
            "{what}: router 0 is not the only VIP holder after 10 s (r0 holds: {}, r1 holds: {})",
            lab.router(0).holds_egress_vip(),
            lab.router(1).holds_egress_vip()
        );
    }
    // Let the preemption settle (the backup drops its VIP, the bridge relearns the VMAC).
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// True when the client gets an answer from the VIP within `within` (one ping a second).
fn vip_answers(lab: &Lab, within: Duration) -> bool {
    let c = lab.client(0);
    let vip = topo::EGRESS_VIP.to_string();
    wait_until(within, || {
        c.exec("ping", &["-n", "-q", "-c", "1", "-W", "1", &vip])
            .is_ok()
    })
}

fn ping(lab: &Lab, a: &Args, action: impl FnOnce()) -> anyhow::Result<Outage> {
    ping_during(
        &lab.client(0).ns,
        topo::EGRESS_VIP,
        Duration::from_millis(a.ping_ms),
        Duration::from_secs(2),
        Duration::from_millis(400),
        action,
    )
}

fn measure(lab: &Lab, a: &Args, v: &mut dyn Vrrp) -> anyhow::Result<Option<Measured>> {
    let name = v.name();
    v.start(0)?;
    v.start(1)?;
    if !wait_until(Duration::from_secs(4), || {
        lab.router(0).holds_egress_vip() || lab.router(1).holds_egress_vip()
    }) {
        v.stop_all();
        return Ok(None);
    }
    wait_r0_master(lab, name)?;
    let mut m = Measured::default();
    for t in 0..a.trials {
        let r0 = lab.router(0);
        if !vip_answers(lab, Duration::from_secs(3)) {
            m.dark_before_cut += 1;
            eprintln!("[vrrp] {name} link cut {}/{}: the VIP does not answer although only router 0 holds it", t + 1, a.trials);
        }
        // The adverts (and the VMAC) are on gw0, whose bridge floods them to the switch too.
        let cap = lab
            .capture(lab.switch(), "brgw", "vrrp")
            .context("capture adverts at the switch")?;
        let o = ping(lab, a, || {
            let _ = r0.cut_link(RouterLink::Gateway);
            let _ = r0.cut_link(RouterLink::Vrrp);
        })?;
        let wire = takeover_on_wire(
            &cap.stop_and_read("").context("read the advert capture")?,
            priority(0, 2),
            priority(1, 2),
        );
        m.takeover.push(wire);
        eprintln!(
            "[vrrp] {name} link cut {}/{}: outage {:.1} ms, {} of {} pings lost",
            t + 1,
            a.trials,
            ms(o.outage),
            o.lost(),
            o.sent
        );
        m.cut.push(o);
        r0.restore_link(RouterLink::Gateway)?;
        r0.restore_link(RouterLink::Vrrp)?;
        wait_r0_master(lab, name)?;
    }
    for t in 0..a.trials {
        if !vip_answers(lab, Duration::from_secs(3)) {
            m.dark_before_term += 1;
            eprintln!("[vrrp] {name} SIGTERM {}/{}: the VIP does not answer although only router 0 holds it", t + 1, a.trials);
        }
        let pid = v.main_pid(0);
        if pid.is_none() {
            bail!("{name}: no process to send SIGTERM to on router 0");
        }
        let o = ping(lab, a, move || sigterm(pid))?;
        v.reap(0)?;
        eprintln!(
            "[vrrp] {name} SIGTERM {}/{}: outage {:.1} ms, {} of {} pings lost",
            t + 1,
            a.trials,
            ms(o.outage),
            o.lost(),
            o.sent
        );
        m.term.push(o);
        v.start(0)?;
        wait_r0_master(lab, name)?;
    }
    v.stop_all();
    Ok(Some(m))
}

/// One process's idle cost over the windows: (process, CPU % of a core per window, last RSS
/// in kB).
type Idle = (String, Vec<f64>, Option<u64>);

/// One idle window: both routers started afresh, router 0 the settled master, then the CPU
/// of router 0's processes over `idle_secs`.
fn idle_window(lab: &Lab, a: &Args, v: &mut dyn Vrrp, out: &mut Vec<Idle>) -> anyhow::Result<()> {
    let name = v.name();
    v.start(0)?;
    v.start(1)?;
    wait_r0_master(lab, name)?;
    // Past the second gratuitous burst a new master sends (keepalived: 5 s after taking over;
    // ours: `second_burst_after`, the same) and the start-up work.
    std::thread::sleep(Duration::from_secs(6));
    eprintln!(
        "[vrrp] {name}: idle master, measuring CPU for {} s",
        a.idle_secs
    );
    let procs = v.processes(0);
    let pids: Vec<i32> = procs.iter().map(|(_, p)| *p).collect();
    let cpu = cpu_percent(&pids, Duration::from_secs(a.idle_secs));
    for ((n, p), c) in procs.into_iter().zip(cpu) {
        let i = match out.iter().position(|(o, _, _)| *o == n) {
            Some(i) => i,
            None => {
                out.push((n, Vec::new(), None));
                out.len() - 1
            }
        };
        out[i].1.extend(c);
        out[i].2 = rss_kb(p);
    }
    let kept = r0_is_master(lab);
    v.stop_all();
    if !kept {
        bail!("{name}: router 0 lost mastership during the idle window");
    }
    Ok(())
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    eprintln!("[vrrp] building the rig: 2 router namespaces, 1 client, no daemon");
    let lab = Lab::builder()
        .gateways(1)
        .routers(2)
        .clients(1)
        .ingress_pods(0)
        .dns(false)
        .start_routers(false)
        .build()
        .context("build the lab")?;
    let advert = Duration::from_millis(a.advert_ms);
    let mut results: Vec<(&'static str, Option<Measured>)> = Vec::new();
    let mut impls: Vec<Box<dyn Vrrp + '_>> = Vec::new();
    for imp in &a.impls {
        let mut v: Box<dyn Vrrp + '_> = match imp.as_str() {
            "keepalived" => Box::new(Keepalived {
                lab: &lab,
                bin: a.keepalived.clone(),
                advert,
                children: [None, None],
            }),
            "vpn-router" => Box::new(Daemon { lab: &lab, advert }),
            other => bail!("unknown implementation {other:?} (keepalived, vpn-router)"),
        };
        eprintln!(
            "[vrrp] {imp}: {} link-cut and {} SIGTERM trials",
            a.trials, a.trials
        );
        let m = measure(&lab, a, v.as_mut())?;
        if m.is_none() {
            eprintln!("[vrrp] {imp}: no router took the VIP");
        }
        results.push((v.name(), m));
        impls.push(v);
    }
    let mut idle: Vec<Idle> = Vec::new();
    for round in 0..a.idle_rounds {
        let mut order: Vec<usize> = (0..impls.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            if results[i].1.is_some() {
                idle_window(&lab, a, impls[i].as_mut(), &mut idle)?;
            }
        }
    }
    println!();
    println!("## VRRP (issue 5)");
    println!(
        "params: VRRPv3, advert interval {} ms, priorities {} / {}, preempt, VMAC on gw0 (adverts on gw0), VIP {}/{}; client pings the VIP every {} ms (ping -i, 2 s per trial); outage = from the last reply before a run of lost pings (missing icmp_seq) to the first reply after it, so a stall of the prober itself does not count; link cut = the master's gw0 and vrrp0 cables unplugged at the switch; SIGTERM = the master's process; {} trials each; idle CPU = scheduler run time of all threads (/proc/PID/task/*/schedstat) over {} s, in {} windows per implementation taken alternately (A B B A ...), each with freshly started daemons",
        a.advert_ms,
        priority(0, 2),
        priority(1, 2),
        topo::EGRESS_VIP,
        topo::GW_NET_PREFIX,
        a.ping_ms,
        a.trials,
        a.idle_secs,
        a.idle_rounds
    );
    let mut outage = Vec::new();
    let mut lost = Vec::new();
    for (name, m) in &results {
        match m {
            Some(m) => {
                let gap = |v: &[Outage]| v.iter().map(|o| ms(o.outage)).collect::<Vec<_>>();
                let lo = |v: &[Outage]| v.iter().map(|o| o.lost() as f64).collect::<Vec<_>>();
                let ours = *name == "vpn-router";
                let note = |t: &'static str| if ours { t } else { "reference" };
                outage.push(Row::new(
                    format!("{name}: master's link cut"),
                    gap(&m.cut),
                    note("target ≤ 40 ms and ≤ keepalived"),
                ));
                outage.push(Row::new(
                    format!("{name}: SIGTERM handoff"),
                    gap(&m.term),
                    note("target ≤ 10 ms (no lost ping)"),
                ));
                lost.push(Row::new(
                    format!("{name}: master's link cut"),
                    lo(&m.cut),
                    note(""),
                ));
                lost.push(Row::new(
                    format!("{name}: SIGTERM handoff"),
                    lo(&m.term),
                    note("target 0"),
                ));
            }
            None => {
                println!("{name}: not built (no router took the VIP within 4 s of starting: VRRP is not wired into the daemon)");
            }
        }
    }
    for (name, m) in &results {
        if let Some(m) = m {
            if m.dark_before_cut + m.dark_before_term > 0 {
                println!(
                    "{name}: the VIP did not answer for 3 s before {} of {} link-cut trials and {} of {} SIGTERM trials, although only router 0 held it (the outage below then starts before the action)",
                    m.dark_before_cut, a.trials, m.dark_before_term, a.trials
                );
            }
        }
    }
    println!("Client outage:");
    print!("{}", render_table("ms", 1, &outage));
    println!("Pings lost (sent - received):");
    print!("{}", render_table("pings", 0, &lost));
    let mut wire = Vec::new();
    for (name, m) in &results {
        if let Some(m) = m {
            let got: Vec<f64> = m.takeover.iter().flatten().map(|d| ms(*d)).collect();
            let missing = m.takeover.len() - got.len();
            let note = if missing > 0 {
                format!("{missing} trial(s) without both adverts in the capture")
            } else {
                String::new()
            };
            wire.push(Row::new(format!("{name}: master's link cut"), got, note));
        }
    }
    println!(
        "Takeover on the wire (link cut; the old master's last advert to the new master's first, captured at the switch; Master_Down = 3 × interval + Skew):"
    );
    print!("{}", render_table("ms", 1, &wire));
    println!("Idle master:");
    println!("| process | CPU (% of a core), median | each window | RSS (MB) | target |");
    println!("| --- | --: | --- | --: | --- |");
    for (n, cpu, rss) in &idle {
        let target = if n.starts_with("vpn-router") {
            "CPU ≤ keepalived's VRRP process; RSS ≤ 12 MB"
        } else {
            "reference"
        };
        let each: Vec<String> = cpu.iter().map(|c| format!("{c:.2}")).collect();
        println!(
            "| {n} | {} | {} | {} | {target} |",
            summarize(cpu).map_or("-".into(), |s| format!("{:.2}", s.median)),
            each.join(" / "),
            rss.map_or("-".into(), |r| format!("{:.1}", r as f64 / 1024.0))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert(t: &str, src: &str, prio: u8) -> String {
        format!("{t} IP {src} > 224.0.0.18: VRRPv3, Advertisement, vrid 51, prio {prio}, intvl 1cs, length 12")
    }

    #[test]
    fn takeover_is_last_old_advert_to_first_new_one() {
        let lines = vec![
            advert("100.000000", "192.168.26.1", 160),
            advert("100.010000", "192.168.26.1", 160),
            advert("100.045100", "192.168.26.2", 150),
            advert("100.055100", "192.168.26.2", 150),
        ];
        let d = takeover_on_wire(&lines, 160, 150).unwrap();
        assert!((ms(d) - 35.1).abs() < 0.001, "{d:?}");
    }

    #[test]
    fn no_takeover_without_both_masters() {
        let only_old = vec![advert("1.0", "192.168.26.1", 160)];
        assert_eq!(takeover_on_wire(&only_old, 160, 150), None);
        // The new master's adverts before any of the old one's do not count.
        let only_new = vec![advert("1.0", "192.168.26.2", 150), "garbage".to_string()];
        assert_eq!(takeover_on_wire(&only_new, 160, 150), None);
    }
}
