//! Helpers the scenarios share: watching the kernel's nexthops with `ip monitor`, reading a
//! process's CPU time and RSS from /proc, waiting for conditions.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lab::netns::Netns;

/// The members of nexthop group `group_id` in one line of `ip nexthop show` / `ip monitor
/// nexthop` (`id 2056 group 1800/1801,2/1803 ...`): Some(members), Some(empty) when the line
/// deletes the group, None when the line is about another object.
pub fn group_members(line: &str, group_id: u32) -> Option<Vec<u32>> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let id_pos = f.iter().position(|t| *t == "id")?;
    if f.get(id_pos + 1)?.parse::<u32>().ok()? != group_id {
        return None;
    }
    if f.first() == Some(&"Deleted") {
        return Some(Vec::new());
    }
    let g = f.iter().position(|t| *t == "group")?;
    Some(
        f.get(g + 1)?
            .split('/')
            .filter_map(|m| m.split(',').next()?.parse().ok())
            .collect(),
    )
}

/// `ip monitor nexthop` running in a namespace; every line arrives with the time it was read.
pub struct NexthopMonitor {
    child: Child,
    rx: Receiver<(Instant, String)>,
}

impl NexthopMonitor {
    pub fn start(ns: &Netns) -> anyhow::Result<Self> {
        let mut child = ns
            .command("ip")
            .args(["monitor", "nexthop"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("ip monitor nexthop in {}", ns.name()))?;
        let out = child.stdout.take().context("ip monitor stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        // `ip monitor` subscribes right after it starts; give it that moment.
        std::thread::sleep(Duration::from_millis(100));
        Ok(Self { child, rx })
    }

    /// Throws away lines received so far.
    pub fn drain(&self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// Waits up to `timeout` for a line about `group` whose members satisfy `pred`; returns
    /// the time that line was read.
    pub fn wait_group(
        &self,
        group: u32,
        timeout: Duration,
        pred: impl Fn(&[u32]) -> bool,
    ) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok((t, line)) => {
                    if let Some(m) = group_members(&line, group) {
                        if pred(&m) {
                            return Some(t);
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }
}

impl Drop for NexthopMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Current members of nexthop group `group` in `ns` (empty when it does not exist).
pub fn current_group(ns: &Netns, group: u32) -> Vec<u32> {
    ns.ip(&["nexthop", "show", "id", &group.to_string()])
        .ok()
        .and_then(|s| s.lines().find_map(|l| group_members(l, group)))
        .unwrap_or_default()
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// utime + stime of a process in clock ticks (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm, field 3 is index 0: utime (14) is index 11, stime (15) index 12.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// VmRSS of a process in kB.
pub fn rss_kb(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |v| v as f64)
}

/// CPU use of each pid over `window`, in percent of one core.
pub fn cpu_percent(pids: &[i32], window: Duration) -> Vec<Option<f64>> {
    let before: Vec<Option<u64>> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let t = Instant::now();
    std::thread::sleep(window);
    let secs = t.elapsed().as_secs_f64();
    let tck = clk_tck();
    pids.iter()
        .zip(before)
        .map(|(p, b)| {
            let a = cpu_ticks(*p)?;
            Some((a.checked_sub(b?)? as f64) / tck / secs * 100.0)
        })
        .collect()
}

/// Milliseconds as f64.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_group_lines() {
        assert_eq!(
            group_members("id 2056 group 1800/1801/1803 proto 245", 2056),
            Some(vec![1800, 1801, 1803])
        );
        assert_eq!(
            group_members(
                "id 2056 group 1800,3/1802 type resilient buckets 128 idle_timer 120 unbalanced_timer 0 unbalanced_time 0 scope global proto 245",
                2056
            ),
            Some(vec![1800, 1802])
        );
        assert_eq!(
            group_members("Deleted id 2056 group 1800 proto 245", 2056),
            Some(vec![])
        );
        assert_eq!(
            group_members(
                "id 1800 via 192.168.25.128 dev gw0 scope link proto 245",
                2056
            ),
            None
        );
        assert_eq!(group_members("garbage", 2056), None);
    }

    #[test]
    fn reads_own_cpu_and_rss() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(cpu_ticks(me).is_some());
        assert!(rss_kb(me).unwrap() > 0);
    }
}
