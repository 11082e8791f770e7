//! Data-plane measurements from a pod: long-lived TCP flows through the gateways (which exit
//! each took, which still work), outages seen by `ping`, and how long a broken gateway kept
//! getting new connections. Everything here observes traffic; nothing asks a router.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::netns::{Netns, NetnsError};

/// One long-lived connection to the Internet echo.
#[derive(Debug)]
pub struct Flow {
    pub stream: TcpStream,
    /// The exit address the Internet saw for this flow (from the echo's greeting).
    pub exit_ip: Ipv4Addr,
}

/// Long-lived flows held open from one pod.
#[derive(Debug, Default)]
pub struct Flows {
    pub flows: Vec<Flow>,
    /// Connections that failed to open (no route, timeout).
    pub failed_to_open: usize,
}

fn open_one(target: SocketAddr, timeout: Duration) -> std::io::Result<Flow> {
    let s = TcpStream::connect_timeout(&target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    let mut line = String::new();
    BufReader::new(s.try_clone()?).read_line(&mut line)?;
    // Greeting: "<server> <peer-ip:port>"
    let exit_ip = line
        .split_whitespace()
        .nth(1)
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .and_then(|a| match a.ip() {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        })
        .ok_or_else(|| std::io::Error::other(format!("bad greeting {line:?}")))?;
    Ok(Flow { stream: s, exit_ip })
}

impl Flows {
    /// Opens `n` connections (call from a thread inside the pod's namespace).
    pub fn open(target: SocketAddr, n: usize, timeout: Duration) -> Flows {
        let mut f = Flows::default();
        for _ in 0..n {
            match open_one(target, timeout) {
                Ok(flow) => f.flows.push(flow),
                Err(_) => f.failed_to_open += 1,
            }
        }
        f
    }

    /// Flows per exit IP.
    pub fn by_exit(&self) -> BTreeMap<Ipv4Addr, usize> {
        let mut m = BTreeMap::new();
        for f in &self.flows {
            *m.entry(f.exit_ip).or_insert(0) += 1;
        }
        m
    }

    /// Sends a probe on every flow and waits up to `timeout` for each echo; returns, per flow,
    /// whether it still works. All flows are probed at once, so this takes about `timeout`
    /// when some are dead.
    pub fn check(&mut self, timeout: Duration) -> Vec<bool> {
        let probe = b"still-there?\n";
        let mut alive = vec![false; self.flows.len()];
        let mut got = vec![0usize; self.flows.len()];
        for f in &mut self.flows {
            let _ = f.stream.set_nonblocking(true);
            let mut sink = [0u8; 256];
            while matches!(f.stream.read(&mut sink), Ok(n) if n > 0) {}
            let _ = f.stream.write_all(probe);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && alive.iter().any(|a| !a) {
            for (i, f) in self.flows.iter_mut().enumerate() {
                if alive[i] {
                    continue;
                }
                let mut buf = [0u8; 256];
                if let Ok(n) = f.stream.read(&mut buf) {
                    got[i] += n;
                    if got[i] >= probe.len() {
                        alive[i] = true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for f in &mut self.flows {
            let _ = f.stream.set_nonblocking(false);
        }
        alive
    }
}

/// What `ping` saw while something happened.
#[derive(Debug, Clone, Default)]
pub struct Outage {
    pub sent: u64,
    pub received: u64,
    /// Longest time without a reply, between two replies (or from the start / to the end).
    pub longest_gap: Duration,
    pub interval: Duration,
}

impl Outage {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

/// Parses `ping -D` output: reply timestamps, and the transmitted count from the summary.
pub fn parse_ping(out: &str) -> (Vec<f64>, u64) {
    let mut ts = Vec::new();
    let mut sent = 0;
    for l in out.lines() {
        if l.contains("bytes from") {
            if let Some(t) = l
                .strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .and_then(|t| t.parse::<f64>().ok())
            {
                ts.push(t);
            }
        } else if l.contains("packets transmitted") {
            sent = l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    (ts, sent)
}

/// Pings `target` from `ns` every `interval` for `duration`; runs `action` after `lead`.
pub fn ping_outage<F: FnOnce() + Send>(
    ns: &Netns,
    target: Ipv4Addr,
    interval: Duration,
    duration: Duration,
    lead: Duration,
    action: F,
) -> Result<Outage, crate::lab::LabError> {
    let secs = format!("{:.3}", interval.as_secs_f64());
    let deadline = format!("{}", duration.as_secs().max(1));
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let child = ns
        .command("ping")
        .args(["-n", "-D", "-i", &secs, "-W", "0.2", "-w", &deadline])
        .arg(target.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|source| NetnsError::Spawn {
            cmd: format!("ping in {}", ns.name()),
            source,
        })?;
    // ping's output is read while the action runs: a long action would otherwise fill the
    // pipe and stall ping, which then stops sending and reports a gap that never happened.
    let out = std::thread::scope(|s| {
        let reader = s.spawn(|| child.wait_with_output());
        std::thread::sleep(lead);
        action();
        reader
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the ping reader panicked")))
    })
    .map_err(|source| NetnsError::Spawn {
        cmd: format!("ping in {}", ns.name()),
        source,
    })?;
    let total = started.elapsed().as_secs_f64().min(duration.as_secs_f64());
    let (ts, sent) = parse_ping(&String::from_utf8_lossy(&out.stdout));
    Ok(Outage {
        sent,
        received: u64::try_from(ts.len()).unwrap_or(u64::MAX),
        longest_gap: longest_gap(&ts, started_wall, total),
        interval,
    })
}

/// Longest stretch without a reply within `[start, start + total]` (epoch seconds), counting
/// the stretch before the first reply and after the last one.
fn longest_gap(ts: &[f64], start: f64, total: f64) -> Duration {
    let end = start + total;
    let mut prev = start;
    let mut gap = 0.0f64;
    for t in ts {
        gap = gap.max(t - prev);
        prev = *t;
    }
    gap = gap.max(end - prev);
    Duration::from_secs_f64(gap.max(0.0))
}

/// One new TCP connection to the echo's port 7 per `interval`: `(time since start, exit IP or
/// None when it failed)`, for `duration`, while `action` runs after `lead`.
pub fn connection_timeline<F: FnOnce() + Send>(
    ns: &Netns,
    target: SocketAddr,
    interval: Duration,
    connect_timeout: Duration,
    duration: Duration,
    lead: Duration,
    action: F,
) -> Result<Vec<(Duration, Option<Ipv4Addr>)>, NetnsError> {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            ns.run_in(|| {
                let start = Instant::now();
                let mut v = Vec::new();
                while start.elapsed() < duration {
                    let t = start.elapsed();
                    let r = open_one(target, connect_timeout).ok().map(|f| f.exit_ip);
                    v.push((t, r));
                    let next = t + interval;
                    let now = start.elapsed();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                }
                v
            })
        });
        std::thread::sleep(lead);
        action();
        h.join().unwrap_or_else(|_| {
            Err(NetnsError::Enter {
                name: ns.name().to_string(),
                reason: "connection prober panicked".into(),
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_output() {
        let out = "PING 1.2.3.4 (1.2.3.4) 56(84) bytes of data.\n\
[1700000000.000000] 64 bytes from 1.2.3.4: icmp_seq=1 ttl=64 time=0.1 ms\n\
[1700000000.010000] 64 bytes from 1.2.3.4: icmp_seq=2 ttl=64 time=0.1 ms\n\
[1700000000.250000] 64 bytes from 1.2.3.4: icmp_seq=26 ttl=64 time=0.1 ms\n\
\n--- 1.2.3.4 ping statistics ---\n\
30 packets transmitted, 3 received, 90% packet loss, time 300ms\n";
        let (ts, sent) = parse_ping(out);
        assert_eq!(ts.len(), 3);
        assert_eq!(sent, 30);
        let g = longest_gap(&ts, 1_700_000_000.0, 0.26);
        assert!((g.as_secs_f64() - 0.24).abs() < 1e-6, "{g:?}");
        assert_eq!(longest_gap(&[], 5.0, 1.0), Duration::from_secs(1));
        // Silence at the start and at the end both count.
        let g = longest_gap(&[10.5, 10.6], 10.0, 1.0);
        assert!((g.as_secs_f64() - 0.5).abs() < 1e-6, "{g:?}");
        let g = longest_gap(&[10.1, 10.2], 10.0, 1.0);
        assert!((g.as_secs_f64() - 0.8).abs() < 1e-6, "{g:?}");
    }
}
