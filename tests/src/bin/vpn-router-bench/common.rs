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

/// CPU time of a process in nanoseconds: the sum over its threads of the scheduler's
/// run time (`/proc/PID/task/TID/schedstat`, first field). Exact, unlike utime + stime,
/// which are sampled in 10 ms ticks and, for a process that wakes 100 times a second for a
/// few dozen microseconds, move by a third between runs.
pub fn cpu_ns(pid: i32) -> Option<u64> {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = t.ok()?.path().join("schedstat");
        // A thread that ended between the listing and the read has no time to add.
        let Ok(s) = std::fs::read_to_string(path) else {
            continue;
        };
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// VmRSS of a process in kB.
pub fn rss_kb(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU use of each pid over `window`, in percent of one core.
pub fn cpu_percent(pids: &[i32], window: Duration) -> Vec<Option<f64>> {
    let before: Vec<Option<u64>> = pids.iter().map(|p| cpu_ns(*p)).collect();
    let t = Instant::now();
    std::thread::sleep(window);
    let secs = t.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(p, b)| {
            let a = cpu_ns(*p)?;
            Some((a.checked_sub(b?)? as f64) / 1e9 / secs * 100.0)
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
        assert!(cpu_ns(me).is_some_and(|ns| ns > 0));
        assert!(rss_kb(me).unwrap() > 0);
    }
}

/// What a ping run saw: how many were sent and received, and the outage.
#[derive(Debug, Clone, Copy, Default)]
pub struct PingOutage {
    pub sent: u64,
    pub received: u64,
    /// The longest stretch of lost replies: from the last reply before a run of missing
    /// `icmp_seq`s to the first reply after it (or to the window's start/end when the loss
    /// touches it). A pause of the prober itself (no ping sent, so no sequence number
    /// missing) is not an outage; 0 when nothing was lost.
    pub outage: Duration,
}

impl PingOutage {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

/// `(icmp_seq, epoch seconds)` of every reply in `ping -D` output, and the transmitted count.
pub fn parse_ping_seq(out: &str) -> (Vec<(u64, f64)>, u64) {
    let mut replies = Vec::new();
    let mut sent = 0;
    for l in out.lines() {
        if l.contains("bytes from") {
            let t = l
                .strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .and_then(|t| t.parse::<f64>().ok());
            let seq = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|s| s.parse::<u64>().ok());
            if let (Some(t), Some(seq)) = (t, seq) {
                replies.push((seq, t));
            }
        } else if l.contains("packets transmitted") {
            sent = l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    (replies, sent)
}

/// The outage (see [`PingOutage`]) from replies (sequence numbers start at 1), within the
/// window `[start, end]` (epoch seconds).
pub fn seq_outage(replies: &[(u64, f64)], sent: u64, start: f64, end: f64) -> PingOutage {
    let received = u64::try_from(replies.len()).unwrap_or(u64::MAX);
    let mut worst = 0.0f64;
    match (replies.first(), replies.last()) {
        (Some(&(first_seq, first_t)), Some(&(last_seq, last_t))) => {
            if first_seq > 1 {
                worst = worst.max(first_t - start);
            }
            for w in replies.windows(2) {
                let ((sa, ta), (sb, tb)) = (w[0], w[1]);
                if sb > sa + 1 {
                    worst = worst.max(tb - ta);
                }
            }
            if last_seq < sent {
                worst = worst.max(end - last_t);
            }
        }
        _ => {
            if sent > 0 {
                worst = end - start;
            }
        }
    }
    PingOutage {
        sent,
        received,
        outage: Duration::from_secs_f64(worst.max(0.0)),
    }
}

/// Pings `target` from `ns` every `interval` for `duration` and runs `action` after `lead`.
pub fn ping_during(
    ns: &Netns,
    target: std::net::Ipv4Addr,
    interval: Duration,
    duration: Duration,
    lead: Duration,
    action: impl FnOnce(),
) -> anyhow::Result<PingOutage> {
    let epoch = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let start = epoch();
    let child = ns
        .command("ping")
        .args(["-n", "-D", "-W", "0.2"])
        .args(["-i", &format!("{:.3}", interval.as_secs_f64())])
        .args(["-w", &duration.as_secs().max(1).to_string()])
        .arg(target.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("ping in {} (apt-get install iputils-ping)", ns.name()))?;
    std::thread::sleep(lead);
    action();
    let out = child.wait_with_output().context("wait for ping")?;
    let end = epoch();
    let (replies, sent) = parse_ping_seq(&String::from_utf8_lossy(&out.stdout));
    Ok(seq_outage(&replies, sent, start, end))
}

#[cfg(test)]
mod ping_tests {
    use super::*;

    #[test]
    fn outage_counts_only_lost_sequence_numbers() {
        let out = "PING 1.2.3.4 (1.2.3.4) 56(84) bytes of data.\n\
[100.000] 64 bytes from 1.2.3.4: icmp_seq=1 ttl=64 time=0.1 ms\n\
[100.005] 64 bytes from 1.2.3.4: icmp_seq=2 ttl=64 time=0.1 ms\n\
[100.300] 64 bytes from 1.2.3.4: icmp_seq=3 ttl=64 time=0.1 ms\n\
[100.340] 64 bytes from 1.2.3.4: icmp_seq=11 ttl=64 time=0.1 ms\n\
[100.345] 64 bytes from 1.2.3.4: icmp_seq=12 ttl=64 time=0.1 ms\n\
\n--- 1.2.3.4 ping statistics ---\n\
12 packets transmitted, 5 received, 58% packet loss, time 345ms\n";
        let (r, sent) = parse_ping_seq(out);
        assert_eq!((r.len(), sent), (5, 12));
        let o = seq_outage(&r, sent, 99.99, 100.35);
        // The 295 ms pause between seq 2 and 3 lost nothing: the prober stalled.
        assert!((o.outage.as_secs_f64() - 0.040).abs() < 1e-9, "{o:?}");
        assert_eq!(o.lost(), 7);
    }

    #[test]
    fn loss_at_the_edges_and_no_reply() {
        let r = [(3, 10.1), (4, 10.2)];
        let o = seq_outage(&r, 6, 10.0, 11.0);
        assert!((o.outage.as_secs_f64() - 0.8).abs() < 1e-9, "{o:?}");
        let o = seq_outage(&[], 5, 10.0, 11.0);
        assert_eq!(o.outage, Duration::from_secs(1));
        let o = seq_outage(&[(1, 10.0), (2, 10.01)], 2, 9.9, 10.5);
        assert_eq!(o.outage, Duration::ZERO);
    }
}
