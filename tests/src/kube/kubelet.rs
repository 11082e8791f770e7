//! The kubelet's prober for one pod: each probe runs on its own thread in the node's network
//! namespace (the kubelet probes from the node, to the pod IP), at `periodSeconds` after
//! `initialDelaySeconds`, with `timeoutSeconds`, and turns results into state with
//! `successThreshold` / `failureThreshold` as the kubelet does. Every failure is recorded;
//! [`Prober::violations`] names the ones the test must not accept: any liveness failure, and a
//! readiness failure once the pod was Ready, both before the pod was told to terminate.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::pod::{Probe, ProbeKind};
use crate::http;
use crate::netns::Netns;

#[derive(Debug, Default)]
struct State {
    ready: bool,
    ever_ready: bool,
    /// When the pod last became Ready (for minReadySeconds).
    ready_since: Option<Instant>,
    terminating: bool,
    failures: Vec<String>,
    violations: Vec<String>,
    probes_run: u64,
}

/// The probes of one pod.
#[derive(Debug)]
pub struct Prober {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl Prober {
    /// Starts every probe of the pod at `pod_ip`, from `node`.
    pub fn start(node: &Netns, pod_name: &str, pod_ip: Ipv4Addr, probes: &[Probe]) -> Prober {
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let has_readiness = probes.iter().any(|p| p.kind == ProbeKind::Readiness);
        if !has_readiness {
            // Without a readiness probe the kubelet reports Ready once the container runs.
            let mut s = lock(&state);
            s.ready = true;
            s.ever_ready = true;
            s.ready_since = Some(started);
        }
        let threads = probes
            .iter()
            .cloned()
            .map(|p| {
                let (node, state, stop) = (node.clone(), state.clone(), stop.clone());
                let pod = pod_name.to_string();
                std::thread::spawn(move || {
                    let _ = node.run_in(|| run_probe(&pod, pod_ip, &p, &state, &stop, started));
                })
            })
            .collect();
        Prober {
            state,
            stop,
            threads,
            started,
        }
    }

    pub fn ready(&self) -> bool {
        lock(&self.state).ready
    }

    /// Ready for at least `min_ready` without a break (the Deployment's availability).
    pub fn available(&self, min_ready: Duration) -> bool {
        let s = lock(&self.state);
        s.ready && s.ready_since.is_some_and(|t| t.elapsed() >= min_ready)
    }

    /// From now on failures are expected (SIGTERM on its way).
    pub fn terminating(&self) {
        lock(&self.state).terminating = true;
    }

    /// Failures the kubelet would act on (restart the container, take the pod out of service).
    pub fn violations(&self) -> Vec<String> {
        lock(&self.state).violations.clone()
    }

    /// Every failed probe, expected or not.
    pub fn failures(&self) -> Vec<String> {
        lock(&self.state).failures.clone()
    }

    pub fn probes_run(&self) -> u64 {
        lock(&self.state).probes_run
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sleep_until(t: Instant, stop: &AtomicBool) -> bool {
    while Instant::now() < t {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(
            Duration::from_millis(20).min(t.saturating_duration_since(Instant::now())),
        );
    }
    !stop.load(Ordering::SeqCst)
}

fn run_probe(
    pod: &str,
    pod_ip: Ipv4Addr,
    p: &Probe,
    state: &Mutex<State>,
    stop: &AtomicBool,
    started: Instant,
) {
    let url = format!("http://{pod_ip}:{}{}", p.port, p.path);
    let mut next = started + p.initial_delay;
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    while sleep_until(next, stop) {
        next += p.period;
        let at = started.elapsed();
        // The kubelet counts 200-399 as success; anything else, a timeout or a refused
        // connection as failure.
        let result = match http::get(&url, p.timeout) {
            Ok(r) if (200..400).contains(&r.status) => Ok(()),
            Ok(r) => Err(format!("HTTP {}: {}", r.status, r.body.trim())),
            Err(e) => Err(e.to_string()),
        };
        let mut s = lock(state);
        s.probes_run += 1;
        match result {
            Ok(()) => {
                ok_run += 1;
                fail_run = 0;
                if p.kind == ProbeKind::Readiness && !s.ready && ok_run >= p.success_threshold {
                    s.ready = true;
                    s.ever_ready = true;
                    s.ready_since = Some(Instant::now());
                }
            }
            Err(e) => {
                fail_run += 1;
                ok_run = 0;
                let line = format!(
                    "{pod}: {} probe GET {url} failed at {:.1} s: {e}",
                    p.kind.name(),
                    at.as_secs_f64()
                );
                s.failures.push(line.clone());
                if !s.terminating {
                    match p.kind {
                        ProbeKind::Liveness | ProbeKind::Startup => s.violations.push(format!(
                            "{line} (failure {fail_run} of {}: at {} the kubelet restarts the container)",
                            p.failure_threshold, p.failure_threshold
                        )),
                        ProbeKind::Readiness if s.ever_ready => s.violations.push(format!(
                            "{line} (after the pod was Ready; at {} failures the pod leaves the Service)",
                            p.failure_threshold
                        )),
                        ProbeKind::Readiness => {}
                    }
                }
                if p.kind == ProbeKind::Readiness && fail_run >= p.failure_threshold {
                    s.ready = false;
                    s.ready_since = None;
                }
            }
        }
    }
}
