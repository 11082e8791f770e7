//! The ingress engine's tasks: one checker per real server (all in parallel, at most
//! `max_concurrent_checks` probes at once, each spread over its interval with jitter) feeding a
//! watch of health, and one reconciler that turns health into IPVS state whenever a server
//! changes state and on a periodic resync (a resync that finds nothing to change writes
//! nothing). Also reads the kernel's counters for the metrics and keeps the `ingress` entry of
//! /status current. Never decides policy: the desired state comes from [`super::desired`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use gateway_route_manager as grm;
use ipvs::{DesiredService, IpvsClient, Reconciler, ServiceKey};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::desired::{IngressPlan, RealServerId};
use super::health::{ServerHealth, ServerState};
use super::metrics::{
    CheckLabels, IngressMetrics, KernelCounters, KernelServiceStats, ServerLabels, VsLabels,
};
use super::{check, weights};
use crate::status::{ComponentState, ComponentStatus, StatusBoard};

/// Health of every real server.
pub type HealthMap = BTreeMap<RealServerId, ServerHealth>;

/// Engine settings that are not in the config file.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Full dump + plan even without a health change (repairs drift made by hand).
    pub resync: Duration,
    /// Probes in flight at once, over all virtual servers.
    pub max_concurrent_checks: usize,
    /// Each check is moved by up to this fraction of its interval, so checks spread out.
    pub jitter: f64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(10),
            max_concurrent_checks: 64,
            jitter: 0.1,
        }
    }
}

/// Starts the checkers, the reconciler and the status publisher.
pub fn start(
    plan: IngressPlan,
    settings: EngineSettings,
    board: Arc<StatusBoard>,
    metrics: IngressMetrics,
    cancel: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let plan = Arc::new(plan);
    let (rx, mut tasks) = spawn_checks(plan.clone(), &settings, &metrics, &cancel);
    let (local_tx, local_rx) = watch::channel(LocalRoutesStatus::default());
    tasks.push(tokio::spawn(local_routes_loop(
        plan.local_routes.clone(),
        plan.local_src_interface.clone(),
        settings.resync,
        local_tx,
        metrics.clone(),
        cancel.clone(),
    )));
    tasks.push(tokio::spawn(reconcile_loop(
        plan, rx, local_rx, settings, board, metrics, cancel,
    )));
    tasks
}

/// The `local_routes` entry of the ingress status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LocalRoutesStatus {
    /// Every `local_route` address, and whether its route is in the kernel.
    pub routes: Vec<LocalRouteStatus>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LocalRouteStatus {
    pub address: Ipv4Addr,
    pub in_force: bool,
}

/// Keeps the local routes of `wanted` (and no other of ours) in the kernel: at once, then
/// every `resync` (repairs a route deleted by hand).
async fn local_routes_loop(
    wanted: BTreeSet<Ipv4Addr>,
    src_interface: Option<String>,
    resync: Duration,
    status: watch::Sender<LocalRoutesStatus>,
    metrics: IngressMetrics,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut socket: Option<grm::local_routes::LocalRoutes> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let synced = match &socket {
            Some(s) => s.sync(&wanted, src_interface.as_deref()).await,
            None => match grm::local_routes::LocalRoutes::open() {
                Ok(s) => {
                    socket
                        .insert(s)
                        .sync(&wanted, src_interface.as_deref())
                        .await
                }
                Err(e) => Err(e),
            },
        };
        let (in_force, last_error) = match synced {
            Ok(r) => {
                for a in &r.added {
                    tracing::info!(address = %a, "ingress: local route added (table local): the router accepts this address for its virtual servers");
                }
                for a in &r.deleted {
                    tracing::info!(address = %a, "ingress: local route of an address no virtual server uses any more deleted");
                }
                (r.in_force, None)
            }
            Err(e) => {
                tracing::warn!(error = %e, "ingress: local routes not in force; retrying");
                (BTreeSet::new(), Some(e.to_string()))
            }
        };
        metrics
            .local_routes
            .set(i64::try_from(in_force.len()).unwrap_or(i64::MAX));
        status.send_replace(LocalRoutesStatus {
            routes: wanted
                .iter()
                .map(|a| LocalRouteStatus {
                    address: *a,
                    in_force: in_force.contains(a),
                })
                .collect(),
            last_error,
        });
    }
}

/// Starts one checker per real server; their results land in the returned watch (notified on
/// a state change or a new failure reason, not on every check).
pub fn spawn_checks(
    plan: Arc<IngressPlan>,
    settings: &EngineSettings,
    metrics: &IngressMetrics,
    cancel: &CancellationToken,
) -> (watch::Receiver<HealthMap>, Vec<JoinHandle<()>>) {
    metrics.clear();
    let initial: HealthMap = plan
        .real_servers()
        .into_iter()
        .map(|id| (id, ServerHealth::default()))
        .collect();
    for v in &plan.virtual_servers {
        let vs = VsLabels {
            virtual_server: v.name.clone(),
        };
        metrics
            .real_servers
            .get_or_create(&vs)
            .set(v.candidates.len() as i64);
        metrics.real_servers_up.get_or_create(&vs).set(0);
    }
    let (tx, rx) = watch::channel(initial);
    let sem = Arc::new(Semaphore::new(settings.max_concurrent_checks.max(1)));
    let mut tasks = Vec::new();
    for id in plan.real_servers() {
        tasks.push(tokio::spawn(check_loop(
            plan.clone(),
            id,
            sem.clone(),
            tx.clone(),
            metrics.clone(),
            settings.jitter,
            cancel.clone(),
        )));
    }
    (rx, tasks)
}

fn jittered(interval: Duration, jitter: f64) -> Duration {
    let j = jitter.clamp(0.0, 0.5);
    let f = 1.0 + j * (2.0 * rand::random::<f64>() - 1.0);
    interval.mul_f64(f)
}

async fn check_loop(
    plan: Arc<IngressPlan>,
    id: RealServerId,
    sem: Arc<Semaphore>,
    tx: watch::Sender<HealthMap>,
    metrics: IngressMetrics,
    jitter: f64,
    cancel: CancellationToken,
) {
    let Some(v) = plan.virtual_servers.get(id.vs) else {
        return;
    };
    let addr = SocketAddr::new(id.addr, v.real_port);
    let c = &v.check;
    let server_labels = ServerLabels {
        virtual_server: v.name.clone(),
        real_server: id.addr.to_string(),
    };
    let vs_labels = VsLabels {
        virtual_server: v.name.clone(),
    };
    metrics.real_server_up.get_or_create(&server_labels).set(0);
    // The first round runs at once (the daemon serves as soon as it knows); later rounds are
    // spread over the interval.
    let mut next = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let started = Instant::now();
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = check::run(&c.kind, addr, c.timeout) => r,
        };
        let took = started.elapsed();
        drop(permit);
        next = started + jittered(c.interval, jitter);
        metrics
            .check_duration
            .get_or_create(&vs_labels)
            .observe(took.as_secs_f64());
        metrics
            .checks
            .get_or_create(&CheckLabels {
                virtual_server: v.name.clone(),
                result: if result.is_ok() { "ok" } else { "failed" },
            })
            .inc();
        let reason = match &result {
            Ok(()) => "ok".to_owned(),
            Err(e) => e.to_string(),
        };
        let mut transition = None;
        tx.send_if_modified(|m| {
            let Some(h) = m.get_mut(&id) else {
                return false;
            };
            let reason_changed = h.last_reason != reason;
            h.last_check_seconds = Some(took.as_secs_f64());
            transition = h.observe(result.is_ok(), &reason, c.rise, c.fall);
            transition.is_some() || reason_changed
        });
        if let Some(state) = transition {
            let up = state == ServerState::Up;
            metrics
                .real_server_up
                .get_or_create(&server_labels)
                .set(i64::from(up));
            let n = tx
                .borrow()
                .iter()
                .filter(|(k, h)| k.vs == id.vs && h.is_up())
                .count();
            metrics
                .real_servers_up
                .get_or_create(&vs_labels)
                .set(n as i64);
            tracing::info!(virtual_server = %v.name, real_server = %addr, state = ?state, reason = %reason, "ingress real server changed state");
        }
    }
}

/// What the last reconcile did, for /status.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct LastPass {
    ok: bool,
    changes: usize,
    errors: Vec<String>,
}

/// Deletes every IPVS service on the `owned` addresses and every local route of ours, once:
/// the `ingress` section was removed from the config, and what it built must not outlive it.
/// Services on other addresses are not touched.
pub async fn withdraw(owned: BTreeSet<IpAddr>, metrics: IngressMetrics, cancel: CancellationToken) {
    let synced = match grm::local_routes::LocalRoutes::open() {
        Ok(s) => s.sync(&BTreeSet::new(), None).await,
        Err(e) => Err(e),
    };
    match synced {
        Ok(r) if !r.deleted.is_empty() => {
            tracing::info!(deleted = ?r.deleted, "ingress removed from the config: its local routes are deleted");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "ingress removed from the config, but its local routes could not be deleted");
        }
    }
    let client = tokio::select! {
        _ = cancel.cancelled() => return,
        c = IpvsClient::connect() => match c {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "ingress removed from the config, but IPVS cannot be opened to delete its services");
                return;
            }
        },
    };
    let reconciler = Reconciler::new(client, move |k: &ServiceKey| match k {
        ServiceKey::Addr { addr, .. } => owned.contains(&addr.ip()),
        ServiceKey::Fwmark { .. } => false,
    })
    .with_metrics(metrics.ipvs.clone());
    let pass = tokio::select! {
        _ = cancel.cancelled() => return,
        r = reconciler.reconcile(&[]) => r,
    };
    match pass {
        Ok(o) if o.errors.is_empty() => {
            tracing::info!(
                writes = o.ops.len(),
                "ingress removed from the config: its IPVS services are deleted"
            )
        }
        Ok(o) => tracing::error!(
            writes = o.ops.len(),
            failed = o.errors.len(),
            first = %o.errors[0].error,
            "ingress removed from the config: some of its IPVS services could not be deleted"
        ),
        Err(e) => {
            tracing::error!(error = %e, "ingress removed from the config: cannot read IPVS to delete its services")
        }
    }
    metrics.clear();
}

async fn reconcile_loop(
    plan: Arc<IngressPlan>,
    mut health: watch::Receiver<HealthMap>,
    local: watch::Receiver<LocalRoutesStatus>,
    settings: EngineSettings,
    board: Arc<StatusBoard>,
    metrics: IngressMetrics,
    cancel: CancellationToken,
) {
    let owned: BTreeSet<IpAddr> = plan.owned_addresses();
    publish(
        &board,
        &plan,
        &health.borrow(),
        &local.borrow(),
        None,
        None,
        (ComponentState::Running, false),
    );

    // Connect (IPVS may be loaded later by the operator: keep trying, and say why not).
    let client = loop {
        match IpvsClient::connect().await {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(error = %e, "ingress: cannot open IPVS; retrying in 5 s");
                publish(
                    &board,
                    &plan,
                    &health.borrow(),
                    &local.borrow(),
                    None,
                    Some(e.to_string()),
                    (ComponentState::Degraded, false),
                );
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    };
    let owned_k = owned.clone();
    let reconciler = Reconciler::new(client.clone(), move |k: &ServiceKey| match k {
        ServiceKey::Addr { addr, .. } => owned_k.contains(&addr.ip()),
        ServiceKey::Fwmark { .. } => false,
    })
    .with_metrics(metrics.ipvs.clone());

    // The first pass waits until every server was checked once (or one interval), so a
    // restarted daemon does not quiesce servers it has not checked yet.
    let longest = plan
        .virtual_servers
        .iter()
        .map(|v| v.check.interval)
        .max()
        .unwrap_or_default();
    let first_deadline = Instant::now() + longest;
    loop {
        if health
            .borrow()
            .values()
            .all(|h| h.state != ServerState::Unknown)
        {
            break;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(first_deadline) => break,
            r = health.changed() => if r.is_err() { break },
        }
    }

    let mut applied: Option<Vec<DesiredService>> = None;
    let mut ready = false;
    let mut last = LastPass::default();
    let mut resync = tokio::time::interval_at(Instant::now(), settings.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let force = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = resync.tick() => true,
            r = health.changed() => { if r.is_err() { return } false }
        };
        let snapshot = health.borrow_and_update().clone();
        let desired = plan.desired(|id| snapshot.get(&id).is_some_and(ServerHealth::is_up));
        if force || applied.as_ref() != Some(&desired) {
            match reconciler.reconcile(&desired).await {
                Ok(out) => {
                    last = LastPass {
                        ok: out.errors.is_empty(),
                        changes: out.ops.len(),
                        errors: out.errors.iter().map(|e| e.error.to_string()).collect(),
                    };
                    if out.errors.is_empty() {
                        applied = Some(desired.clone());
                        ready = true;
                    } else {
                        applied = None;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ingress: IPVS dump failed; nothing written");
                    last = LastPass {
                        ok: false,
                        changes: 0,
                        errors: vec![e.to_string()],
                    };
                    applied = None;
                }
            }
        }
        if force {
            match read_kernel_stats(&client, &plan).await {
                Ok(s) => metrics.kernel.set(s),
                Err(e) => tracing::debug!(error = %e, "ingress: reading IPVS counters failed"),
            }
        }
        let state = if last.ok {
            ComponentState::Running
        } else {
            ComponentState::Degraded
        };
        publish(
            &board,
            &plan,
            &snapshot,
            &local.borrow(),
            Some(&last),
            None,
            (state, ready),
        );
    }
}

/// The kernel's counters of every service of the plan.
async fn read_kernel_stats(
    client: &IpvsClient,
    plan: &IngressPlan,
) -> Result<Vec<KernelServiceStats>, ipvs::IpvsError> {
    let mut by_key: BTreeMap<ServiceKey, &str> = BTreeMap::new();
    for v in &plan.virtual_servers {
        for s in &v.services {
            by_key.insert(s.key, &v.name);
        }
    }
    let mut out = Vec::new();
    for e in client.services().await? {
        let Some(vs) = by_key.get(&e.service.key) else {
            continue;
        };
        let dests = client.dests(&e.service.key).await?;
        out.push(KernelServiceStats {
            virtual_server: (*vs).to_owned(),
            service: e.service.key.to_string(),
            counters: KernelCounters::from(&e.stats),
            destinations: dests
                .iter()
                .map(|d| {
                    (
                        d.destination.addr.to_string(),
                        KernelCounters::from(&d.stats),
                        d.active_conns,
                        d.inactive_conns,
                    )
                })
                .collect(),
        });
    }
    Ok(out)
}

/// The `ingress` entry of /status: every virtual server with its services and each real
/// server's state, weight and last check result; the local routes. `(state, ready)` is the
/// component's.
fn publish(
    board: &StatusBoard,
    plan: &IngressPlan,
    health: &HealthMap,
    local: &LocalRoutesStatus,
    last: Option<&LastPass>,
    error: Option<String>,
    (state, ready): (ComponentState, bool),
) {
    let desired = plan.desired(|id| health.get(&id).is_some_and(ServerHealth::is_up));
    let w = weights(&desired);
    let vss: Vec<serde_json::Value> = plan
        .virtual_servers
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let first = v.services.first().map(|s| s.key);
            let servers: Vec<serde_json::Value> = v
                .candidates
                .iter()
                .map(|&addr| {
                    let h = health.get(&RealServerId { vs: i, addr });
                    let weight = first
                        .and_then(|k| w.get(&k))
                        .and_then(|m| m.get(&SocketAddr::new(addr, v.real_port)))
                        .copied();
                    serde_json::json!({
                        "address": SocketAddr::new(addr, v.real_port).to_string(),
                        "state": h.map_or(ServerState::Unknown, |h| h.state),
                        "weight": weight,
                        "last_reason": h.map(|h| h.last_reason.clone()),
                        "last_check_seconds": h.and_then(|h| h.last_check_seconds),
                    })
                })
                .collect();
            let up = v
                .candidates
                .iter()
                .filter(|&&addr| {
                    health
                        .get(&RealServerId { vs: i, addr })
                        .is_some_and(ServerHealth::is_up)
                })
                .count();
            serde_json::json!({
                "name": v.name,
                "scheduler": v.services.first().map(|s| s.scheduler.clone()),
                "flags": v.services.first().map(|s| format!("{:#x}", s.flags.bits())),
                "on_failure": v.on_failure,
                "services": v.services.iter().map(|s| s.key.to_string()).collect::<Vec<_>>(),
                "up": up,
                "real_servers": servers,
            })
        })
        .collect();
    board.set(
        "ingress",
        ComponentStatus {
            state,
            ready,
            detail: serde_json::json!({
                "virtual_servers": vss,
                "local_routes": local,
                "last_reconcile": last,
                "error": error,
            }),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    /// user+system CPU seconds of this process so far (/proc/self/stat, clock ticks of 10 ms).
    fn cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let after = stat.rsplit_once(')').unwrap().1;
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat(5); `after` starts at field 3.
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        ticks / 100.0
    }

    /// The scale of issue 9: 10 forwarded ports × 16 real servers checked every 3 s (the 8
    /// VIPs × 2 protocols do not multiply the checks: one check per virtual server × real
    /// server). Real TCP checks against listeners on loopback; prints the CPU the checks cost.
    /// Not a pass/fail test: `cargo test -p vpn-router --lib check_load -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement (30 s of wall time); run by hand, see docs/benchmarks.md"]
    async fn check_load() {
        let secs: u64 = std::env::var("CHECK_LOAD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30);
        let mut y = String::from("ingress:\n  virtual_servers:\n");
        let servers: Vec<String> = (1..=16).map(|i| format!("127.0.1.{i}")).collect();
        let vips: Vec<String> = (0..8).map(|i| format!("10.255.0.{}", i + 1)).collect();
        for k in 0..10u16 {
            let _ = write!(
                y,
                "    - name: port-{k}\n      port: {}\n      protocols: [tcp, udp]\n      addresses: [{}]\n      real_servers: [{}]\n      health_check: {{ type: tcp, interval: 3s, timeout: 1s }}\n",
                21000 + k,
                vips.join(", "),
                servers.join(", ")
            );
        }
        let cfg = crate::config::load_str(std::path::Path::new("load.yaml"), &y)
            .unwrap()
            .config;
        let plan = super::super::plan(cfg.ingress.as_ref().unwrap(), None).unwrap();
        assert_eq!(plan.real_servers().len(), 160);
        assert_eq!(
            plan.virtual_servers
                .iter()
                .map(|v| v.services.len())
                .sum::<usize>(),
            160
        );
        let mut listeners = Vec::new();
        for s in &servers {
            for k in 0..10u16 {
                let l = tokio::net::TcpListener::bind((s.parse::<IpAddr>().unwrap(), 21000 + k))
                    .await
                    .unwrap();
                listeners.push(tokio::spawn(async move {
                    while let Ok((c, _)) = l.accept().await {
                        drop(c);
                    }
                }));
            }
        }
        // Baseline: the listeners alone, idle.
        let c0 = cpu_seconds();
        tokio::time::sleep(Duration::from_secs(secs / 3)).await;
        let idle = (cpu_seconds() - c0) / (secs / 3) as f64;

        let board = StatusBoard::new("load.yaml".into(), 0.0);
        let metrics = IngressMetrics::new();
        let cancel = CancellationToken::new();
        let tasks = start(
            plan,
            EngineSettings::default(),
            board,
            metrics.clone(),
            cancel.clone(),
        );
        // Let the first round settle, then measure.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let ok0 = count(&metrics, "ok");
        let c1 = cpu_seconds();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let used = (cpu_seconds() - c1) / secs as f64;
        let checks = count(&metrics, "ok") - ok0;
        cancel.cancel();
        for t in tasks {
            let _ = t.await;
        }
        println!(
            "RESULT check_load servers=160 interval=3s checks={checks} in {secs}s ({:.1}/s) cpu={:.2}% of one core (listeners alone {:.2}%), {:.1} us CPU per check including the accepting side",
            checks as f64 / secs as f64,
            used * 100.0,
            idle * 100.0,
            (used - idle) * secs as f64 / checks.max(1) as f64 * 1e6
        );
        assert!(
            checks as f64 >= 160.0 * secs as f64 / 3.0 * 0.8,
            "{checks} checks"
        );
    }

    /// The checkers against real loopback listeners: both servers come up, one whose port
    /// closes goes down after `fall` failures (and the gauges follow), and comes back after
    /// `rise` successes once it listens again.
    #[tokio::test]
    async fn checkers_follow_a_server_going_away_and_back() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let y = format!(
            "ingress:\n  virtual_servers:\n    - name: t\n      port: 80\n      addresses: [10.255.0.1]\n      real_servers: [127.0.3.1, 127.0.3.2]\n      real_port: {port}\n      health_check: {{ type: tcp, interval: 100ms, timeout: 50ms, rise: 2, fall: 2 }}\n"
        );
        let cfg = crate::config::load_str(std::path::Path::new("t.yaml"), &y)
            .unwrap()
            .config;
        let plan = Arc::new(super::super::plan(cfg.ingress.as_ref().unwrap(), None).unwrap());
        let a = std::net::TcpListener::bind(("127.0.3.1", port)).unwrap();
        let b = std::net::TcpListener::bind(("127.0.3.2", port)).unwrap();
        let metrics = IngressMetrics::new();
        let cancel = CancellationToken::new();
        let (rx, tasks) = spawn_checks(plan, &EngineSettings::default(), &metrics, &cancel);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let state = |m: &HealthMap, a: &str| m[&RealServerId { vs: 0, addr: ip(a) }].state;
        let up_gauge = || {
            metrics
                .real_servers_up
                .get_or_create(&VsLabels {
                    virtual_server: "t".into(),
                })
                .get()
        };
        wait(&rx, |m| m.values().all(ServerHealth::is_up)).await;
        assert_eq!(up_gauge(), 2);

        drop(b);
        let t0 = Instant::now();
        let m = wait(&rx, |m| state(m, "127.0.3.2") == ServerState::Down).await;
        // Two failed checks 100 ms apart: not on the first failure.
        assert!(
            t0.elapsed() >= Duration::from_millis(80),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(state(&m, "127.0.3.1"), ServerState::Up);
        assert!(m[&RealServerId {
            vs: 0,
            addr: ip("127.0.3.2")
        }]
            .last_reason
            .starts_with("connect:"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(up_gauge(), 1);

        let _b = std::net::TcpListener::bind(("127.0.3.2", port)).unwrap();
        wait(&rx, |m| state(m, "127.0.3.2") == ServerState::Up).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(up_gauge(), 2);
        cancel.cancel();
        for t in tasks {
            t.await.unwrap();
        }
        drop(a);
    }

    async fn wait(rx: &watch::Receiver<HealthMap>, f: impl Fn(&HealthMap) -> bool) -> HealthMap {
        let mut rx = rx.clone();
        let r = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|m| f(m)))
            .await
            .expect("state not reached in 5 s");
        r.map(|m| m.clone()).unwrap()
    }

    fn count(m: &IngressMetrics, result: &'static str) -> u64 {
        (0..10)
            .map(|k| {
                m.checks
                    .get_or_create(&CheckLabels {
                        virtual_server: format!("port-{k}"),
                        result,
                    })
                    .get()
            })
            .sum()
    }
}
