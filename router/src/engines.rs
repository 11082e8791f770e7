//! Starts, restarts and stops the engines of the configured sections, and keeps their
//! entries on the status board current. An engine is restarted only when its own section of
//! the config changed: the engines adopt the kernel state they find, so a restart does not
//! flap routes, and unrelated reloads do not touch them.
//!
//! Built engines: gateway health and egress routing (`gateway-route-manager`). Sections whose
//! engine is not built yet stay `not_built` on the board (see `Supervisor`).

use std::sync::Arc;

use gateway_route_manager as grm;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, Gateways, HealthCheckKind};
use crate::status::{ComponentState, ComponentStatus, StatusBoard};

/// The engines of one running daemon.
#[derive(Debug)]
pub struct Engines {
    board: Arc<StatusBoard>,
    grm_metrics: grm::Metrics,
    gateways: Option<Running>,
    parent: CancellationToken,
}

#[derive(Debug)]
struct Running {
    /// The section the engine runs, compared as JSON to see whether a reload changed it.
    section: serde_json::Value,
    cancel: CancellationToken,
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
        parent: CancellationToken,
    ) -> Self {
        let grm_metrics = grm::Metrics::new();
        grm_metrics.register(registry);
        Self {
            board,
            grm_metrics,
            gateways: None,
            parent,
        }
    }

    /// Brings the engines in line with `config`: starts new ones, restarts changed ones,
    /// stops removed ones. Must run inside the tokio runtime.
    pub fn apply(&mut self, config: &Config) {
        match &config.gateways {
            None => {
                self.gateways = None;
                self.board.remove("gateways");
            }
            Some(g) => {
                let section = serde_json::to_value(g).unwrap_or_default();
                if self.gateways.as_ref().is_some_and(|r| r.section == section) {
                    return;
                }
                // Stop the old engine first: two reconcilers on one table would fight.
                self.gateways = None;
                match self.start_gateways(g) {
                    Ok(cancel) => self.gateways = Some(Running { section, cancel }),
                    Err(e) => {
                        tracing::error!(error = %e, "gateways: cannot start");
                        self.board.set(
                            "gateways",
                            ComponentStatus {
                                state: ComponentState::Degraded,
                                ready: false,
                                detail: serde_json::json!({ "error": e }),
                            },
                        );
                    }
                }
            }
        }
    }

    fn start_gateways(&self, g: &Gateways) -> Result<CancellationToken, String> {
        let cancel = self.parent.child_token();
        let (checker, healthy_rx) =
            grm::HealthChecker::new(health_settings(g), self.grm_metrics.clone())
                .map_err(|e| format!("gateways.health: {e}"))?;
        let status_rx = checker.status();
        tokio::spawn(checker.run(cancel.clone()));
        let (settings, built) = egress_settings(g);
        let manager = grm::EgressManager::new(settings, self.grm_metrics.clone())
            .map_err(|e| format!("gateways.egress: {e}"))?;
        let ready = manager.first_reconcile_done();
        if built {
            tokio::spawn(manager.run(healthy_rx.clone(), cancel.clone()));
        } else {
            // A mode whose engine is not built must still never leak: run the egress manager
            // on an always-empty healthy set, so only the kill switch is installed.
            tracing::error!("gateways.egress.mode consistent: engine not built yet (issue 8); installing the kill switch only, client traffic to the Internet is dropped");
            let (tx, rx) = tokio::sync::watch::channel(grm::HealthyGateways {
                complete: true,
                ..Default::default()
            });
            let keep = cancel.clone();
            tokio::spawn(async move {
                manager.run(rx, keep).await;
                drop(tx);
            });
        }
        let note = if built {
            "managed"
        } else {
            "kill switch only: egress.mode consistent is not built yet (issue 8)"
        };
        tokio::spawn(publish_gateway_status(
            self.board.clone(),
            status_rx,
            healthy_rx,
            Some(ready),
            note,
            cancel.clone(),
        ));
        tracing::info!(
            gateways = g.addresses.value.len(),
            "gateways: health checks and egress started"
        );
        Ok(cancel)
    }
}

/// Mirrors the health checker's and egress manager's state onto the status board.
async fn publish_gateway_status(
    board: Arc<StatusBoard>,
    mut status: tokio::sync::watch::Receiver<Vec<grm::GatewayStatus>>,
    mut healthy: tokio::sync::watch::Receiver<grm::HealthyGateways>,
    mut egress_ready: Option<tokio::sync::watch::Receiver<bool>>,
    egress_note: &'static str,
    cancel: CancellationToken,
) {
    loop {
        let ready = egress_ready
            .as_ref()
            .map_or_else(|| healthy.borrow().complete, |r| *r.borrow());
        let healthy_now: Vec<usize> = healthy.borrow().gateways.keys().copied().collect();
        let gateways = status.borrow().clone();
        board.set(
            "gateways",
            ComponentStatus {
                state: ComponentState::Running,
                ready,
                detail: serde_json::json!({
                    "healthy": healthy_now,
                    "egress": egress_note,
                    "gateways": gateways,
                }),
            },
        );
        let egress_changed = async {
            match egress_ready.as_mut() {
                Some(r) => r.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = status.changed() => if r.is_err() { return },
            r = healthy.changed() => if r.is_err() { return },
            ok = egress_changed => if !ok { egress_ready = None },
        }
    }
}

fn health_settings(g: &Gateways) -> grm::HealthSettings {
    let h = &g.health;
    let probe_on = h.checks.contains(&HealthCheckKind::Probe);
    grm::HealthSettings {
        gateways: g.addresses.value.clone(),
        interval: h.interval,
        timeout: h.timeout,
        rise: h.rise,
        fall: h.fall,
        checks: h
            .checks
            .iter()
            .map(|c| match c {
                HealthCheckKind::VpnStatus => grm::health::CheckKind::VpnStatus,
                HealthCheckKind::PublicIp => grm::health::CheckKind::PublicIp,
                HealthCheckKind::HealthServer => grm::health::CheckKind::HealthServer,
                HealthCheckKind::Probe => grm::health::CheckKind::Probe,
            })
            .collect(),
        control_port: h.control_server.port,
        health_server_port: h.health_server_port,
        auth: h.control_server.auth.as_ref().map(|a| match a {
            config::ControlServerAuth::Basic { username, password } => {
                grm::gluetun::ControlAuth::Basic {
                    username: username.clone(),
                    password: grm::gluetun::Secret::new(password.expose()),
                }
            }
            config::ControlServerAuth::ApiKey(k) => {
                grm::gluetun::ControlAuth::ApiKey(grm::gluetun::Secret::new(k.expose()))
            }
        }),
        probe: probe_on.then_some(grm::health::ProbeSettings {
            target: h.probe.target,
            mark_base: g.return_routing.mark_base.value,
        }),
        fetch_forwarded_ports: true,
    }
}

/// The egress settings, and whether the configured mode's engine is built (`consistent` is
/// not yet: it gets plain ecmp settings that only ever carry the kill switch).
fn egress_settings(g: &Gateways) -> (grm::EgressSettings, bool) {
    let e = &g.egress;
    let mode = match e.mode {
        config::EgressMode::Ecmp => grm::egress::EgressMode::Ecmp,
        config::EgressMode::EcmpResilient => {
            grm::egress::EgressMode::EcmpResilient(Default::default())
        }
        config::EgressMode::Consistent => grm::egress::EgressMode::Ecmp,
    };
    let built = e.mode != config::EgressMode::Consistent;
    let probe_on = g.health.checks.contains(&HealthCheckKind::Probe);
    let rr = &g.return_routing;
    let settings = grm::EgressSettings {
        interface: g.interface.clone(),
        gateways: g.addresses.value.clone(),
        mode,
        table: e.table.value,
        rule_priority: e.rule_priority.value,
        destinations: e.destinations.clone(),
        exclude: e.exclude.clone(),
        exclude_reserved: e.exclude_reserved,
        when_none_healthy: match e.when_none_healthy {
            config::NoneHealthy::Blackhole => grm::egress::NoneHealthy::Blackhole,
            config::NoneHealthy::Unreachable => grm::egress::NoneHealthy::Unreachable,
        },
        // Until return routing (issue 7) owns the per-gateway tables, the probe needs its own.
        probe_routing: probe_on.then_some(grm::egress::ProbeRouting {
            mark_base: rr.mark_base.value,
            table_base: rr.table_base.value,
            rule_priority_base: rr.rule_priority_base.value,
        }),
        hash_seed: Some(e.hash_seed),
        ..Default::default()
    };
    (settings, built)
}
