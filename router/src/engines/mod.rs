//! Starts, restarts and stops the engines of the configured sections, and keeps their
//! entries on the status board current. An engine is restarted only when its own section of
//! the config changed: the engines adopt the kernel state they find, so a restart does not
//! flap routes, and unrelated reloads do not touch them.
//!
//! Engines talk to each other only through the watches in [`Shared`], which outlive any one
//! engine: a consumer (VRRP tracking, DDNS) keeps its receiver when the producer restarts.
//! Each feature lives in its own file with a `start` function; this module owns none of
//! their logic.

mod ddns;
mod gateways;
mod ingress;
mod vrrp;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gateway_route_manager as grm;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::status::{ComponentState, ComponentStatus, StatusBoard};

/// VRRP state per instance name, as the VRRP engine last reported it.
pub type Roles = BTreeMap<String, ::vrrp::State>;

/// What engines share. Cloned into each engine at start.
#[derive(Debug, Clone)]
pub struct Shared {
    pub board: Arc<StatusBoard>,
    /// The healthy gateways; the default (`complete: false`, empty) until the gateways engine
    /// has checked every gateway once, and again when the `gateways` section is removed.
    pub healthy: watch::Receiver<grm::HealthyGateways>,
    /// VRRP roles by instance name; empty without VRRP.
    pub roles: watch::Receiver<Roles>,
    /// True once the egress kill switch has been read back from the kernel (always true
    /// without `gateways`). No VRRP instance starts before: see
    /// `grm::EgressManager::kill_switch_in_force`.
    pub kill_switch: watch::Receiver<bool>,
}

/// The senders behind [`Shared`]; held by `Engines` so the channels never close while the
/// daemon runs.
#[derive(Debug)]
struct Publishers {
    healthy: watch::Sender<grm::HealthyGateways>,
    roles: watch::Sender<Roles>,
    kill_switch: watch::Sender<bool>,
}

/// The engines of one running daemon.
#[derive(Debug)]
pub struct Engines {
    shared: Shared,
    publishers: Publishers,
    grm_metrics: grm::Metrics,
    rr_metrics: grm::ReturnRoutingMetrics,
    gateways: Option<Running>,
    /// The `gateways` section the running gateways engine was started with.
    gateways_config: Option<crate::config::Gateways>,
    vrrp: vrrp::VrrpEngine,
    ddns: Option<Running>,
    ddns_metrics: grm::ddns::DdnsMetrics,
    ingress: Option<Running>,
    /// What the running ingress engine owns, for the cleanup when the section is removed.
    ingress_owned: Option<std::collections::BTreeSet<std::net::IpAddr>>,
    /// One-shot cleanups (ingress withdrawn), awaited at shutdown.
    cleanups: Vec<JoinHandle<()>>,
    ingress_metrics: crate::ingress::IngressMetrics,
    /// Engines whose start failed (their section is configured, nothing runs): the supervisor
    /// calls `apply` again every [`START_RETRY`] while this is not empty.
    failed: std::collections::BTreeSet<&'static str>,
    /// Parent of every engine's token: cancelled once, at shutdown.
    root: CancellationToken,
}

/// One started feature engine.
#[derive(Debug)]
struct Running {
    /// The section the engine runs, compared as JSON to see whether a reload changed it.
    section: serde_json::Value,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Engines {
    pub fn new(
        board: Arc<StatusBoard>,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let grm_metrics = grm::Metrics::new();
        grm_metrics.register(registry);
        let rr_metrics = grm::ReturnRoutingMetrics::new();
        rr_metrics.register(registry);
        let vrrp = vrrp::VrrpEngine::new(registry);
        let ddns_metrics = grm::ddns::DdnsMetrics::new();
        ddns_metrics.register(registry);
        let ingress_metrics = crate::ingress::IngressMetrics::new();
        ingress_metrics.register(registry);
        let (healthy, healthy_rx) = watch::channel(grm::HealthyGateways::default());
        let (roles, roles_rx) = watch::channel(Roles::new());
        let (kill_switch, kill_switch_rx) = watch::channel(false);
        Self {
            shared: Shared {
                board,
                healthy: healthy_rx,
                roles: roles_rx,
                kill_switch: kill_switch_rx,
            },
            publishers: Publishers {
                healthy,
                roles,
                kill_switch,
            },
            grm_metrics,
            rr_metrics,
            gateways: None,
            gateways_config: None,
            vrrp,
            ddns: None,
            ddns_metrics,
            ingress: None,
            ingress_owned: None,
            cleanups: Vec::new(),
            ingress_metrics,
            failed: std::collections::BTreeSet::new(),
            root: CancellationToken::new(),
        }
    }

    /// A handle on the shared watches (tests, the api).
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Brings the engines in line with `config`: starts new ones, restarts changed ones,
    /// stops removed ones. A changed engine's old tasks are awaited (up to [`RESTART_GRACE`])
    /// before its successor starts, so two reconcilers never work on the same kernel objects.
    pub async fn apply(&mut self, config: &Config) {
        let section = config
            .gateways
            .as_ref()
            .map(|g| serde_json::to_value(g).unwrap_or_default());
        let (shared, metrics, healthy, kill_switch) = (
            &self.shared,
            &self.grm_metrics,
            &self.publishers.healthy,
            &self.publishers.kill_switch,
        );
        let rr_metrics = &self.rr_metrics;
        let previous = self.gateways_config.clone();
        reconcile(
            &mut self.gateways,
            &self.shared.board,
            &self.root,
            &mut self.failed,
            "gateways",
            section,
            |cancel| match &config.gateways {
                Some(g) => gateways::start(
                    g,
                    shared,
                    metrics,
                    rr_metrics,
                    gateways::Outputs {
                        healthy,
                        kill_switch,
                    },
                    previous.as_ref(),
                    cancel,
                ),
                None => Ok(Vec::new()),
            },
        )
        .await;
        self.gateways_config = config.gateways.clone();
        if config.gateways.is_some() && self.failed.contains("gateways") {
            // Nothing keeps the kill switch: the VRRP instances stay out until a retry works.
            self.publishers.kill_switch.send_replace(false);
        }
        if config.gateways.is_none() {
            self.publishers
                .healthy
                .send_replace(grm::HealthyGateways::default());
            // No egress to guard: nothing routes client traffic here.
            self.publishers.kill_switch.send_replace(true);
        }

        self.vrrp
            .apply(config, &self.shared, &self.publishers.roles, &self.root);

        // The ingress VIPs come from `gateways`: a change there restarts ingress too.
        let section = config.ingress.as_ref().map(|i| {
            let vips = config.gateways.as_ref().map(|g| g.ingress_vips());
            let vrrp_vips: Vec<String> = config
                .vrrp
                .iter()
                .flat_map(|v| v.virtual_ips.iter().map(|x| x.address.value.to_string()))
                .collect();
            serde_json::json!({ "ingress": i, "gateway_ingress_vips": vips, "vrrp_vips": vrrp_vips })
        });
        let (shared, metrics, owned_before) =
            (&self.shared, &self.ingress_metrics, &self.ingress_owned);
        reconcile(
            &mut self.ingress,
            &self.shared.board,
            &self.root,
            &mut self.failed,
            "ingress",
            section,
            |cancel| ingress::start(config, owned_before.as_ref(), shared, metrics, cancel),
        )
        .await;
        // A removed section stops the engine; the services it built go with it. (A daemon
        // started without `ingress` never touches IPVS: it cannot know what was ours.)
        if config.ingress.is_none() {
            if let Some(was) = self.ingress_owned.take() {
                self.cleanups.retain(|t| !t.is_finished());
                self.cleanups.push(tokio::spawn(crate::ingress::withdraw(
                    was,
                    self.ingress_metrics.clone(),
                    self.root.child_token(),
                )));
            }
        } else if let Some(now) = ingress::owned(config) {
            self.ingress_owned = Some(now);
        }

        let c = config;
        let (shared, metrics) = (&self.shared, &self.ddns_metrics);
        reconcile(
            &mut self.ddns,
            &self.shared.board,
            &self.root,
            &mut self.failed,
            "ddns",
            c.ddns.as_ref().map(|d| serde_json::json!(d)),
            |cancel| ddns::start(c, shared, metrics, cancel),
        )
        .await;
        // The roles of instances that are gone must not linger for DDNS.
        let names: Vec<&str> = c.vrrp.iter().map(|v| v.name.value.as_str()).collect();
        self.publishers.roles.send_if_modified(|r| {
            let before = r.len();
            r.retain(|k, _| names.contains(&k.as_str()));
            r.len() != before
        });
    }

    /// Stops every engine and waits up to `grace` for their tasks to finish (VRRP sends its
    /// priority-0 advert and keeps the VIPs until the new master is heard).
    pub async fn shutdown(&mut self, grace: Duration) {
        self.root.cancel();
        let mut tasks = Vec::new();
        for slot in [&mut self.gateways, &mut self.ingress, &mut self.ddns] {
            if let Some(mut r) = slot.take() {
                tasks.append(&mut r.tasks);
            }
        }
        tasks.append(&mut self.cleanups);
        tasks.append(&mut self.vrrp.take_tasks());
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(grace = ?grace, "engines did not stop in time; exiting anyway");
        }
    }
}

/// How often the engines whose start failed are started again (the supervisor's tick).
pub const START_RETRY: Duration = Duration::from_secs(5);

impl Engines {
    /// True while an engine's start failed: the supervisor calls [`Engines::apply`] again.
    pub fn needs_retry(&self) -> bool {
        !self.failed.is_empty()
    }
}

/// How long a replaced engine's tasks get to finish after their cancellation (an nft run has
/// its own 10 s timeout; netlink writes are quick) before they are aborted.
pub const RESTART_GRACE: Duration = Duration::from_secs(12);

impl Running {
    /// Cancels the engine and waits for its tasks; past `grace` they are aborted.
    async fn stop(mut self, name: &str, grace: Duration) {
        self.cancel.cancel();
        let tasks = std::mem::take(&mut self.tasks);
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(grace, futures::future::join_all(tasks))
            .await
            .is_err()
        {
            tracing::warn!(engine = name, grace = ?grace, "engine did not stop in time after its cancellation; aborted its tasks");
            for a in aborts {
                a.abort();
            }
        }
    }
}

/// Starts, restarts or stops one feature engine so that it runs `section` (None: not
/// configured). `start` gets the engine's own cancellation token and returns its tasks. The
/// old engine is stopped and awaited first: two reconcilers on one kernel object would fight.
#[allow(clippy::too_many_arguments)] // one call per engine, each argument a different thing
async fn reconcile(
    slot: &mut Option<Running>,
    board: &StatusBoard,
    root: &CancellationToken,
    failed: &mut std::collections::BTreeSet<&'static str>,
    name: &'static str,
    section: Option<serde_json::Value>,
    start: impl FnOnce(CancellationToken) -> Result<Vec<JoinHandle<()>>, String>,
) {
    let Some(section) = section else {
        if let Some(old) = slot.take() {
            old.stop(name, RESTART_GRACE).await;
        }
        failed.remove(name);
        board.remove(name);
        return;
    };
    if slot.as_ref().is_some_and(|r| r.section == section) {
        return;
    }
    if let Some(old) = slot.take() {
        old.stop(name, RESTART_GRACE).await;
    }
    let cancel = root.child_token();
    match start(cancel.clone()) {
        Ok(tasks) => {
            if failed.remove(name) {
                tracing::info!("{name}: started after an earlier failure");
            }
            *slot = Some(Running {
                section,
                cancel,
                tasks,
            })
        }
        Err(e) => {
            cancel.cancel();
            failed.insert(name);
            tracing::error!(error = %e, retry_in = ?START_RETRY, "{name}: cannot start");
            board.set(
                name,
                ComponentStatus {
                    state: ComponentState::Degraded,
                    ready: false,
                    detail: serde_json::json!({ "error": e }),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine whose start fails is marked for the supervisor's retry and shown degraded;
    /// the next call with the same section starts it and clears the mark.
    #[tokio::test]
    async fn a_failed_start_is_retried_with_the_same_section() {
        let board = StatusBoard::new("t.yaml".into(), 0.0);
        let root = CancellationToken::new();
        let mut failed = std::collections::BTreeSet::new();
        let mut slot = None;
        let section = Some(serde_json::json!({ "a": 1 }));
        reconcile(
            &mut slot,
            &board,
            &root,
            &mut failed,
            "ddns",
            section.clone(),
            |_| Err("provider not reachable".to_string()),
        )
        .await;
        assert!(slot.is_none());
        assert!(failed.contains("ddns"));
        let r = board.report();
        assert_eq!(r.components["ddns"].state, ComponentState::Degraded);
        reconcile(
            &mut slot,
            &board,
            &root,
            &mut failed,
            "ddns",
            section,
            |_| Ok(Vec::new()),
        )
        .await;
        assert!(slot.is_some() && failed.is_empty());
    }
}
