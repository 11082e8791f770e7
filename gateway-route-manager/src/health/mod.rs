//! Gateway health: checks every gateway in parallel on a jittered schedule, applies rise/fall
//! hysteresis and publishes the healthy set on a `watch` channel.
//!
//! Owns: the schedule, running the selected checks (gluetun control server, health server,
//! data-plane probe), each gateway's state ([`GatewayStatus`]) and the published
//! [`HealthyGateways`]. It must not touch routes or rules: egress, return routing, VRRP
//! tracking and DDNS consume the healthy set.
//!
//! Schedule: every gateway is checked once right at start (so the first healthy set is known
//! after at most one `timeout`), then every `interval` with a fixed random phase per gateway
//! (up to 10 % of the interval) so requests to the gateways do not all leave at the same
//! instant. The period itself is not jittered, so a gateway that dies is removed within
//! `interval × fall` (+ `timeout` when the failure is a silent one).
//!
//! The checks of one gateway run concurrently; the round fails if any selected check fails and
//! the reason kept is the first failing one in the order vpn_status, public_ip,
//! health_server, probe.

mod hysteresis;
mod probe;

pub use hysteresis::{GatewayState, Hysteresis, Transition};
pub use probe::probe_through;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::error::{CheckError, FailureReason};
use crate::gluetun::{ControlAuth, GluetunClient, GluetunSettings};
use crate::metrics::{GatewayLabels, Metrics};

/// Which checks run each round (`gateways.health.checks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// `GET /v1/vpn/status` must say `running`.
    VpnStatus,
    /// `GET /v1/publicip/ip` must give a non-empty address (kept as the gateway's public IP).
    PublicIp,
    /// gluetun's health server must answer 200 (it can be a minute stale in v3.41+).
    HealthServer,
    /// A TCP connect to `probe.target` through this gateway must succeed.
    Probe,
}

impl CheckKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            CheckKind::VpnStatus => "vpn_status",
            CheckKind::PublicIp => "public_ip",
            CheckKind::HealthServer => "health_server",
            CheckKind::Probe => "probe",
        }
    }
}

/// Data-plane probe settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSettings {
    /// `gateways.health.probe.target`, e.g. 1.1.1.1:443.
    pub target: SocketAddr,
    /// Gateway i's probe uses `SO_MARK = mark_base + i` (`return_routing.mark_base`).
    pub mark_base: u32,
    /// The gateways' interface (`gateways.interface`): probes leave by it or not at all.
    pub interface: String,
}

/// Settings of the health checker (mapped from `gateways.health` by the router).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// Gateway i is `gateways[i]`.
    pub gateways: Vec<Ipv4Addr>,
    pub interval: Duration,
    /// Per-request (and per-probe) timeout.
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub checks: Vec<CheckKind>,
    pub control_port: u16,
    pub health_server_port: u16,
    pub auth: Option<ControlAuth>,
    /// Required when `checks` contains [`CheckKind::Probe`].
    pub probe: Option<ProbeSettings>,
    /// Also read forwarded ports (`/v1/portforward`) after a successful round. Informational:
    /// a failure here does not make the gateway unhealthy.
    pub fetch_forwarded_ports: bool,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            gateways: Vec::new(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(750),
            rise: 2,
            fall: 2,
            checks: vec![CheckKind::VpnStatus, CheckKind::PublicIp],
            control_port: 8000,
            health_server_port: 9999,
            auth: None,
            probe: None,
            fetch_forwarded_ports: true,
        }
    }
}

/// Settings the checker cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthSettingsError {
    #[error("gateways.health.checks contains probe but gateways.health.probe.target is not set")]
    ProbeWithoutTarget,
    #[error("gateways.health.interval must be greater than zero")]
    ZeroInterval,
}

/// One gateway in the healthy set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthyGateway {
    pub address: Ipv4Addr,
    /// From the `public_ip` check; `None` when that check is not enabled.
    pub public_ip: Option<IpAddr>,
}

/// The healthy set, keyed (and so sorted) by gateway index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HealthyGateways {
    /// True once every configured gateway has been checked at least once. Consumers that
    /// write the kernel (egress) wait for it, so a restart does not act on a half-known set.
    pub complete: bool,
    pub gateways: BTreeMap<usize, HealthyGateway>,
}

impl HealthyGateways {
    pub fn len(&self) -> usize {
        self.gateways.len()
    }
    pub fn is_empty(&self) -> bool {
        self.gateways.is_empty()
    }
    pub fn contains(&self, index: usize) -> bool {
        self.gateways.contains_key(&index)
    }
    /// Sorted gateway indexes.
    pub fn indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.gateways.keys().copied()
    }
}

/// What `/status` shows for one gateway.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GatewayStatus {
    pub index: usize,
    pub address: Ipv4Addr,
    pub state: GatewayState,
    /// The last failure (kept while the gateway stays unhealthy), as text.
    pub last_reason: Option<String>,
    /// The last failure's kind, e.g. `timeout` (same labels as the failures metric).
    pub last_reason_kind: Option<&'static str>,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
    pub public_ip: Option<IpAddr>,
    /// The ports gluetun's port forwarding got (`/v1/portforward`), as last read.
    pub forwarded_ports: Vec<u16>,
    /// Why the last `/v1/portforward` answer was ignored (`forwarded_ports` is then the last
    /// good answer); None once an answer is good again.
    pub forwarded_ports_error: Option<String>,
    pub probe_rtt_seconds: Option<f64>,
}

/// The result of one round of checks of one gateway.
#[derive(Debug, Clone, PartialEq)]
struct RoundResult {
    index: usize,
    failure: Option<CheckError>,
    public_ip: Option<IpAddr>,
    /// None: not read this round (a check failed, or not asked for).
    forwarded_ports: Option<Result<Vec<u16>, String>>,
    probe_rtt: Option<Duration>,
}

/// Runs the checks. Create with [`HealthChecker::new`], then drive [`HealthChecker::run`].
#[derive(Debug)]
pub struct HealthChecker {
    settings: Arc<HealthSettings>,
    client: GluetunClient,
    metrics: Metrics,
    healthy_tx: watch::Sender<HealthyGateways>,
    status_tx: watch::Sender<Vec<GatewayStatus>>,
    probe_routes: Option<watch::Receiver<bool>>,
}

impl HealthChecker {
    /// With the `probe` check, the first round waits until `ready` is true (at most 3
    /// intervals): the per-gateway tables and fwmark rules the probes are routed by are in
    /// the kernel (return routing). A probe sent before would find no route and fail, and the
    /// gateways would start out unhealthy for `rise` rounds at every start.
    pub fn with_probe_routes(mut self, ready: watch::Receiver<bool>) -> Self {
        self.probe_routes = Some(ready);
        self
    }

    /// Returns the checker and the healthy-set receiver (initially empty, `complete: false`).
    pub fn new(
        settings: HealthSettings,
        metrics: Metrics,
    ) -> Result<(Self, watch::Receiver<HealthyGateways>), HealthSettingsError> {
        if settings.checks.contains(&CheckKind::Probe) && settings.probe.is_none() {
            return Err(HealthSettingsError::ProbeWithoutTarget);
        }
        if settings.interval.is_zero() {
            return Err(HealthSettingsError::ZeroInterval);
        }
        let client = GluetunClient::new(GluetunSettings {
            control_port: settings.control_port,
            health_port: settings.health_server_port,
            auth: settings.auth.clone(),
            timeout: settings.timeout,
        });
        let status = initial_status(&settings.gateways);
        for gw in &settings.gateways {
            metrics
                .gateway_healthy
                .get_or_create(&GatewayLabels {
                    gateway: gw.to_string(),
                })
                .set(0);
        }
        metrics.gateways_healthy.set(0);
        // With no gateway configured the (empty) set is complete from the start.
        let initial = HealthyGateways {
            complete: settings.gateways.is_empty(),
            ..Default::default()
        };
        let (healthy_tx, healthy_rx) = watch::channel(initial);
        let (status_tx, _) = watch::channel(status);
        let checker = HealthChecker {
            settings: Arc::new(settings),
            client,
            metrics,
            healthy_tx,
            status_tx,
            probe_routes: None,
        };
        Ok((checker, healthy_rx))
    }

    /// Per-gateway status for `/status`.
    pub fn status(&self) -> watch::Receiver<Vec<GatewayStatus>> {
        self.status_tx.subscribe()
    }

    /// Another receiver of the healthy set.
    pub fn subscribe(&self) -> watch::Receiver<HealthyGateways> {
        self.healthy_tx.subscribe()
    }

    /// Checks until `cancel` fires (with no gateway configured: just waits for `cancel`).
    pub async fn run(mut self, cancel: CancellationToken) {
        if self.settings.gateways.is_empty() {
            cancel.cancelled().await;
            return;
        }
        if let Some(mut ready) = self
            .probe_routes
            .take()
            .filter(|_| self.settings.checks.contains(&CheckKind::Probe))
        {
            // Not for ever: routes that never come (a missing interface) must show up as
            // failing probes with a reason, not as gateways that stay `unknown`.
            let wait = self.settings.interval.saturating_mul(3);
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tokio::time::timeout(wait, ready.wait_for(|r| *r)) => {}
            }
        }
        let (tx, mut rx) = mpsc::channel::<RoundResult>(self.settings.gateways.len().max(1));
        let mut loops = JoinSet::new();
        let start = Instant::now();
        for index in 0..self.settings.gateways.len() {
            let phase = jitter(self.settings.interval);
            loops.spawn(check_loop(
                index,
                start,
                phase,
                self.settings.clone(),
                self.client.clone(),
                self.metrics.clone(),
                tx.clone(),
            ));
        }
        drop(tx);
        let mut machines: Vec<Hysteresis> = self
            .settings
            .gateways
            .iter()
            .map(|_| Hysteresis::new(self.settings.rise, self.settings.fall))
            .collect();
        loop {
            let result = tokio::select! {
                () = cancel.cancelled() => break,
                result = rx.recv() => result,
            };
            let Some(result) = result else { break };
            self.apply(&mut machines, result);
        }
        loops.shutdown().await;
    }

    fn apply(&self, machines: &mut [Hysteresis], result: RoundResult) {
        let index = result.index;
        let (Some(machine), Some(&address)) =
            (machines.get_mut(index), self.settings.gateways.get(index))
        else {
            return;
        };
        let transition = machine.observe(result.failure.is_none());
        let state = machine.state();
        let gateway = address.to_string();
        if let Some(failure) = &result.failure {
            match transition {
                Some((from, to)) => tracing::warn!(
                    gateway = %address, from = from.as_str(), to = to.as_str(),
                    reason = %failure, "gateway state changed"
                ),
                None => {
                    tracing::debug!(gateway = %address, state = state.as_str(), reason = %failure, "gateway check failed")
                }
            }
        } else if let Some((from, to)) = transition {
            tracing::info!(gateway = %address, from = from.as_str(), to = to.as_str(), "gateway state changed");
        }
        self.metrics
            .gateway_healthy
            .get_or_create(&GatewayLabels {
                gateway: gateway.clone(),
            })
            .set(i64::from(state == GatewayState::Healthy));
        if let Some(rtt) = result.probe_rtt {
            self.metrics
                .probe_rtt
                .get_or_create(&GatewayLabels {
                    gateway: gateway.clone(),
                })
                .set(rtt.as_secs_f64());
        }

        self.status_tx.send_modify(|all| {
            if let Some(s) = all.get_mut(index) {
                s.state = state;
                s.consecutive_successes = machine.consecutive_successes();
                s.consecutive_failures = machine.consecutive_failures();
                match &result.failure {
                    Some(f) => {
                        s.last_reason = Some(f.to_string());
                        s.last_reason_kind = Some(f.reason.label());
                    }
                    None if state == GatewayState::Healthy => {
                        s.last_reason = None;
                        s.last_reason_kind = None;
                    }
                    None => {}
                }
                if let Some(ip) = result.public_ip {
                    s.public_ip = Some(ip);
                } else if matches!(
                    result.failure.as_ref().map(|f| &f.reason),
                    Some(FailureReason::EmptyPublicIp)
                ) {
                    s.public_ip = None;
                }
                match &result.forwarded_ports {
                    Some(Ok(ports)) => {
                        if *ports != s.forwarded_ports {
                            tracing::info!(gateway = %address, from = ?s.forwarded_ports, to = ?ports, "forwarded ports changed");
                            self.metrics.set_forwarded_ports(&gateway, &s.forwarded_ports, ports);
                            s.forwarded_ports.clone_from(ports);
                        }
                        if s.forwarded_ports_error.take().is_some() {
                            tracing::info!(gateway = %address, "the gateway's forwarded ports answer is good again");
                        }
                    }
                    Some(Err(e)) => {
                        self.metrics.count_forwarded_ports_error(&gateway);
                        if s.forwarded_ports_error.as_deref() != Some(e.as_str()) {
                            tracing::warn!(gateway = %address, error = %e, kept = ?s.forwarded_ports, "ignoring the gateway's forwarded ports answer; keeping the last good one");
                            s.forwarded_ports_error = Some(e.clone());
                        }
                    }
                    None => {}
                }
                if let Some(rtt) = result.probe_rtt {
                    s.probe_rtt_seconds = Some(rtt.as_secs_f64());
                }
            }
        });

        let complete = machines.iter().all(|m| m.state() != GatewayState::Unknown);
        let healthy: BTreeMap<usize, HealthyGateway> = self
            .status_tx
            .borrow()
            .iter()
            .filter(|s| s.state == GatewayState::Healthy)
            .map(|s| {
                (
                    s.index,
                    HealthyGateway {
                        address: s.address,
                        public_ip: s.public_ip,
                    },
                )
            })
            .collect();
        // Metrics first: a consumer woken by the channel must see them up to date.
        self.metrics
            .gateways_healthy
            .set(i64::try_from(healthy.len()).unwrap_or(i64::MAX));
        let next = HealthyGateways {
            complete,
            gateways: healthy,
        };
        self.healthy_tx.send_if_modified(|current| {
            if *current == next {
                false
            } else {
                *current = next;
                true
            }
        });
    }
}

fn initial_status(gateways: &[Ipv4Addr]) -> Vec<GatewayStatus> {
    gateways
        .iter()
        .enumerate()
        .map(|(index, &address)| GatewayStatus {
            index,
            address,
            state: GatewayState::Unknown,
            last_reason: None,
            last_reason_kind: None,
            consecutive_successes: 0,
            consecutive_failures: 0,
            public_ip: None,
            forwarded_ports: Vec::new(),
            forwarded_ports_error: None,
            probe_rtt_seconds: None,
        })
        .collect()
}

/// A phase in [0, interval/10).
fn jitter(interval: Duration) -> Duration {
    let max = interval / 10;
    if max.is_zero() {
        return Duration::ZERO;
    }
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..nanos))
}

async fn check_loop(
    index: usize,
    start: Instant,
    phase: Duration,
    settings: Arc<HealthSettings>,
    client: GluetunClient,
    metrics: Metrics,
    results: mpsc::Sender<RoundResult>,
) {
    let mut ticks = tokio::time::interval_at(start + settings.interval + phase, settings.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let result = check_round(index, &settings, &client, &metrics).await;
        if results.send(result).await.is_err() {
            return;
        }
        ticks.tick().await;
    }
}

/// Runs one round of the selected checks of gateway `index`.
async fn check_round(
    index: usize,
    settings: &HealthSettings,
    client: &GluetunClient,
    metrics: &Metrics,
) -> RoundResult {
    let Some(&gateway) = settings.gateways.get(index) else {
        return RoundResult {
            index,
            failure: None,
            public_ip: None,
            forwarded_ports: None,
            probe_rtt: None,
        };
    };
    let wants = |kind| settings.checks.contains(&kind);
    let timed = |kind: CheckKind| {
        let metrics = metrics.clone();
        move |took: Duration| metrics.observe_check(kind.as_str(), took)
    };

    let vpn_status = async {
        if !wants(CheckKind::VpnStatus) {
            return None;
        }
        let started = Instant::now();
        let r = client.vpn_status(gateway).await.map(drop);
        timed(CheckKind::VpnStatus)(started.elapsed());
        Some(r)
    };
    let public_ip = async {
        if !wants(CheckKind::PublicIp) {
            return None;
        }
        let started = Instant::now();
        let r = client.public_ip(gateway).await;
        timed(CheckKind::PublicIp)(started.elapsed());
        Some(r)
    };
    let health_server = async {
        if !wants(CheckKind::HealthServer) {
            return None;
        }
        let started = Instant::now();
        let r = client.health_server(gateway).await;
        timed(CheckKind::HealthServer)(started.elapsed());
        Some(r)
    };
    let probe = async {
        let probe = settings
            .probe
            .as_ref()
            .filter(|_| wants(CheckKind::Probe))?;
        let mark = probe
            .mark_base
            .wrapping_add(u32::try_from(index).unwrap_or(u32::MAX));
        let started = Instant::now();
        let r = probe_through(probe.target, mark, Some(&probe.interface), settings.timeout)
            .await
            .map_err(|detail| CheckError {
                gateway,
                endpoint: format!("probe {} via mark {mark:#x}", probe.target),
                reason: FailureReason::ProbeFailed(detail),
            });
        timed(CheckKind::Probe)(started.elapsed());
        Some(r)
    };
    // When the control server already reports a failure, the round does not wait for the
    // probe: a broken tunnel makes it run into its timeout, which only delayed the removal
    // of a gateway known to be broken. API failures are reported in a fixed order, so the
    // reason does not depend on which answer came first.
    let api = async { tokio::join!(vpn_status, public_ip, health_server) };
    tokio::pin!(api, probe);
    let ((vpn_status, public_ip, health_server), probe) = tokio::select! {
        a = &mut api => {
            let failed = matches!(a.0, Some(Err(_)))
                || matches!(a.1, Some(Err(_)))
                || matches!(a.2, Some(Err(_)));
            if failed { (a, None) } else { (a, probe.await) }
        }
        p = &mut probe => (api.await, p),
    };

    let mut failures: Vec<CheckError> = Vec::new();
    if let Some(Err(e)) = vpn_status {
        failures.push(e);
    }
    let public_ip = match public_ip {
        Some(Ok(ip)) => Some(ip),
        Some(Err(e)) => {
            failures.push(e);
            None
        }
        None => None,
    };
    if let Some(Err(e)) = health_server {
        failures.push(e);
    }
    let probe_rtt = match probe {
        Some(Ok(rtt)) => Some(rtt),
        Some(Err(e)) => {
            failures.push(e);
            None
        }
        None => None,
    };
    let label = gateway.to_string();
    for f in &failures {
        metrics.count_failure(&label, f.reason.label());
    }
    let failure = failures.into_iter().next();
    let forwarded_ports = if failure.is_none() && settings.fetch_forwarded_ports {
        Some(
            client
                .forwarded_ports(gateway)
                .await
                .map_err(|e| e.to_string()),
        )
    } else {
        None
    };
    RoundResult {
        index,
        failure,
        public_ip,
        forwarded_ports,
        probe_rtt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_needs_a_target() {
        let settings = HealthSettings {
            gateways: vec![Ipv4Addr::new(192, 168, 25, 128)],
            checks: vec![CheckKind::Probe],
            ..Default::default()
        };
        assert_eq!(
            HealthChecker::new(settings, Metrics::new()).err(),
            Some(HealthSettingsError::ProbeWithoutTarget)
        );
    }

    #[tokio::test]
    async fn a_bad_forwarded_ports_answer_keeps_the_last_good_one() {
        let gw = Ipv4Addr::new(192, 168, 25, 128);
        let settings = HealthSettings {
            gateways: vec![gw],
            checks: vec![CheckKind::VpnStatus],
            rise: 1,
            fall: 1,
            ..Default::default()
        };
        let metrics = Metrics::new();
        let (checker, healthy) = HealthChecker::new(settings, metrics.clone()).unwrap();
        let status = checker.status();
        let mut machines = vec![Hysteresis::new(1, 1)];
        let round = |ports: Result<Vec<u16>, String>| RoundResult {
            index: 0,
            failure: None,
            public_ip: None,
            forwarded_ports: Some(ports),
            probe_rtt: None,
        };
        let port_series = |m: &Metrics| {
            let mut r = prometheus_client::registry::Registry::default();
            m.register(&mut r);
            let mut t = String::new();
            prometheus_client::encoding::text::encode(&mut t, &r).unwrap();
            t.lines()
                .filter(|l| l.starts_with("vpn_router_gateway_forwarded_port{"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        checker.apply(&mut machines, round(Ok(vec![40000])));
        assert_eq!(status.borrow()[0].forwarded_ports, [40000]);
        assert_eq!(
            port_series(&metrics),
            ["vpn_router_gateway_forwarded_port{gateway=\"192.168.25.128\",port=\"40000\"} 1"]
        );
        checker.apply(&mut machines, round(Err("bad JSON".into())));
        checker.apply(&mut machines, round(Err("bad JSON".into())));
        let s = status.borrow()[0].clone();
        assert_eq!(s.forwarded_ports, [40000], "the last good answer stays");
        assert_eq!(s.forwarded_ports_error.as_deref(), Some("bad JSON"));
        assert_eq!(s.state, GatewayState::Healthy, "nothing else changes");
        assert!(healthy.borrow().gateways.contains_key(&0));
        let errors = metrics
            .forwarded_ports_errors
            .get_or_create(&GatewayLabels {
                gateway: gw.to_string(),
            })
            .get();
        assert_eq!(errors, 2);
        checker.apply(&mut machines, round(Ok(vec![41000])));
        let s = status.borrow()[0].clone();
        assert_eq!(s.forwarded_ports, [41000]);
        assert_eq!(s.forwarded_ports_error, None);
        assert_eq!(
            port_series(&metrics),
            ["vpn_router_gateway_forwarded_port{gateway=\"192.168.25.128\",port=\"41000\"} 1"]
        );
    }

    #[test]
    fn jitter_stays_below_a_tenth() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_secs(1)) < Duration::from_millis(100));
        }
        assert_eq!(jitter(Duration::from_nanos(5)), Duration::ZERO);
    }
}
