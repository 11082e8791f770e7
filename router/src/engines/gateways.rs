//! The gateways engine: health checks of every gateway, egress routing over the healthy
//! ones, return routing (per-gateway tables, fwmark rules and the nft table, which also carries
//! the `egress.mode: consistent` bucket marking) — all from `gateway-route-manager` — and the
//! status board entry `gateways`. Its healthy set is forwarded into the daemon-wide watch in
//! [`super::Shared`].

use std::sync::Arc;

use gateway_route_manager as grm;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::config::{self, Gateways, HealthCheckKind};
use crate::status::{ComponentState, ComponentStatus, StatusBoard};

/// Where the engine publishes, in the daemon-wide watches that outlive it.
pub(super) struct Outputs<'a> {
    pub healthy: &'a watch::Sender<grm::HealthyGateways>,
    pub kill_switch: &'a watch::Sender<bool>,
}

/// Starts the health checker, the egress manager and the status publisher for `g`.
/// `previous`: the section the replaced engine ran, whose leftovers the first reconcile removes.
pub(super) fn start(
    g: &Gateways,
    shared: &Shared,
    metrics: &grm::Metrics,
    rr_metrics: &grm::ReturnRoutingMetrics,
    out: Outputs<'_>,
    previous: Option<&Gateways>,
    cancel: CancellationToken,
) -> Result<Vec<JoinHandle<()>>, String> {
    let (healthy_out, kill_switch_out) = (out.healthy, out.kill_switch);
    let mut tasks = Vec::new();
    let mut manager = grm::EgressManager::new(egress_settings(g), metrics.clone())
        .map_err(|e| format!("gateways.egress: {e}"))?;
    let mut return_routing =
        grm::ReturnRoutingManager::new(return_routing_settings(g), rr_metrics.clone())
            .map_err(|e| format!("gateways.return_routing: {e}"))?;
    // A reload that moved a table or a rule priority: the first reconcile removes what the old
    // settings left (after the new ones are in).
    if let Some(prev) = previous {
        manager.retire_previous(&egress_settings(prev));
        return_routing.retire_previous(&return_routing_settings(prev));
    }
    let rr_status = return_routing.status();
    let (probe_routes_tx, probe_routes) = watch::channel(false);
    tasks.push(tokio::spawn(probe_routes_in_force(
        rr_status.clone(),
        probe_routes_tx,
        cancel.clone(),
    )));
    let (checker, healthy_rx) = grm::HealthChecker::new(health_settings(g), metrics.clone())
        .map_err(|e| format!("gateways.health: {e}"))?;
    let checker = checker.with_probe_routes(probe_routes);
    let status_rx = checker.status();
    tasks.push(tokio::spawn(forward_kill_switch(
        manager.kill_switch_in_force(),
        kill_switch_out.clone(),
        cancel.clone(),
    )));
    tasks.push(tokio::spawn(checker.run(cancel.clone())));
    tasks.push(tokio::spawn(forward(
        healthy_rx.clone(),
        healthy_out.clone(),
        cancel.clone(),
    )));
    let ready = manager.first_reconcile_done();
    tasks.push(tokio::spawn(
        manager.run(healthy_rx.clone(), cancel.clone()),
    ));
    tasks.push(tokio::spawn(
        return_routing.run(healthy_rx.clone(), cancel.clone()),
    ));
    let note = match g.egress.mode {
        config::EgressMode::Consistent => {
            "managed: consistent (nft bucket map -> per-gateway tables; kill switch in the egress table)"
        }
        _ => "managed",
    };
    tasks.push(tokio::spawn(publish_gateway_status(
        shared.board.clone(),
        status_rx,
        healthy_rx,
        Some(ready),
        rr_status,
        note,
        cancel,
    )));
    tracing::info!(
        gateways = g.addresses.value.len(),
        "gateways: health checks and egress started"
    );
    Ok(tasks)
}

/// Sets `ready` once every gateway's table route and fwmark rule is in the kernel, so the
/// probes never go out before their routes exist.
async fn probe_routes_in_force(
    mut rr: watch::Receiver<grm::ReturnRoutingStatus>,
    ready: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    tokio::select! {
        () = cancel.cancelled() => {}
        r = rr.wait_for(|s| !s.gateways.is_empty() && s.gateways.iter().all(|g| g.in_force)) => {
            if r.is_ok() {
                ready.send_replace(true);
            }
        }
    }
}

/// Copies one of this engine's watches into the daemon-wide one until cancelled.
async fn forward<T: Clone + PartialEq + Send + Sync + 'static>(
    mut from: watch::Receiver<T>,
    to: watch::Sender<T>,
    cancel: CancellationToken,
) {
    loop {
        let now = from.borrow_and_update().clone();
        to.send_if_modified(|cur| {
            let changed = *cur != now;
            *cur = now;
            changed
        });
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = from.changed() => if r.is_err() { return },
        }
    }
}

/// Mirrors the egress manager's kill-switch state onto the daemon's, from the manager's first
/// `true` on: a manager restarted by a reload starts at `false` until its bootstrap read the
/// kill switch back, which the kernel still holds from the old one, and the VRRP instances must
/// not hand their VIPs over for that. A `false` after that (a kill-switch write the kernel
/// refused) is passed on.
async fn forward_kill_switch(
    mut from: watch::Receiver<bool>,
    to: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    tokio::select! {
        _ = cancel.cancelled() => return,
        r = from.wait_for(|k| *k) => if r.is_err() { return },
    }
    forward(from, to, cancel).await;
}

/// Mirrors the health checker's and egress manager's state onto the status board.
async fn publish_gateway_status(
    board: Arc<StatusBoard>,
    mut status: tokio::sync::watch::Receiver<Vec<grm::GatewayStatus>>,
    mut healthy: tokio::sync::watch::Receiver<grm::HealthyGateways>,
    mut egress_ready: Option<tokio::sync::watch::Receiver<bool>>,
    mut return_routing: watch::Receiver<grm::ReturnRoutingStatus>,
    egress_note: &'static str,
    cancel: CancellationToken,
) {
    loop {
        let ready = egress_ready
            .as_ref()
            .map_or_else(|| healthy.borrow().complete, |r| *r.borrow());
        let healthy_now: Vec<usize> = healthy.borrow().gateways.keys().copied().collect();
        let gateways = status.borrow().clone();
        let rr = return_routing.borrow().clone();
        board.set(
            "gateways",
            ComponentStatus {
                state: ComponentState::Running,
                ready,
                detail: serde_json::json!({
                    "healthy": healthy_now,
                    "egress": egress_note,
                    "return_routing": rr,
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
            r = return_routing.changed() => if r.is_err() { return },
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
            interface: g.interface.clone(),
        }),
        fetch_forwarded_ports: true,
    }
}

/// The egress settings. In `consistent` mode egress keeps only the kill switch and its rules:
/// the per-packet gateway choice is return routing's nft bucket map.
fn egress_settings(g: &Gateways) -> grm::EgressSettings {
    let e = &g.egress;
    let mode = match e.mode {
        config::EgressMode::Ecmp => grm::egress::EgressMode::Ecmp,
        config::EgressMode::EcmpResilient => {
            grm::egress::EgressMode::EcmpResilient(Default::default())
        }
        config::EgressMode::Consistent => grm::egress::EgressMode::Consistent,
    };
    grm::EgressSettings {
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
        hash_seed: Some(e.hash_seed),
        ..Default::default()
    }
}

/// Return routing for every configured gateway (the probe check and consistent egress use the
/// same per-gateway tables), plus the bucket marking in `consistent` mode.
fn return_routing_settings(g: &Gateways) -> grm::ReturnRoutingSettings {
    let e = &g.egress;
    let rr = &g.return_routing;
    let consistent = (e.mode == config::EgressMode::Consistent).then(|| {
        let mut exclude = e.exclude.clone();
        if e.exclude_reserved {
            exclude.extend(grm::egress::reserved_ranges());
        }
        grm::return_routing::ConsistentSettings {
            destinations: e.destinations.clone(),
            exclude,
            hash_seed: e.hash_seed,
            buckets: grm::consistent::table_size(g.addresses.value.len()),
        }
    });
    grm::ReturnRoutingSettings {
        interface: g.interface.clone(),
        gateways: g.addresses.value.clone(),
        ingress_vips: g.ingress_vips(),
        mark_base: rr.mark_base.value,
        table_base: rr.table_base.value,
        rule_priority_base: rr.rule_priority_base.value,
        foreign_tables: vec![e.table.value],
        consistent,
        mss_clamp: g.mss_clamp(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateways(yaml: &str) -> Gateways {
        let loaded = crate::config::load_str(std::path::Path::new("t.yaml"), yaml).unwrap();
        loaded.config.gateways.unwrap()
    }

    #[test]
    fn consistent_mode_maps_to_return_routing_bucket_marking() {
        let g = gateways(
            "gateways:\n  interface: gw0\n  addresses: 192.168.25.128-192.168.25.131\n  egress:\n    mode: consistent\n    exclude: [10.0.0.0/8]\n    hash_seed: 7\n",
        );
        let rr = return_routing_settings(&g);
        assert_eq!(rr.gateways.len(), 4);
        assert_eq!(rr.ingress_vips[3].to_string(), "192.168.26.131");
        assert_eq!(
            (rr.mark_base, rr.table_base, rr.rule_priority_base),
            (0x1900, 50, 1000)
        );
        assert_eq!(rr.foreign_tables, vec![180]);
        let c = rr.consistent.clone().expect("consistent settings");
        assert_eq!((c.buckets, c.hash_seed), (4093, 7));
        assert!(c.exclude.contains(&"10.0.0.0/8".parse().unwrap()));
        assert!(
            c.exclude.contains(&"192.168.0.0/16".parse().unwrap()),
            "exclude_reserved defaults to true"
        );
        assert_eq!(
            egress_settings(&g).mode,
            grm::egress::EgressMode::Consistent
        );
        rr.validate().unwrap();
    }

    #[test]
    fn multipath_modes_get_return_routing_without_buckets() {
        let g = gateways("gateways:\n  interface: gw0\n  addresses: [192.168.25.128]\n");
        assert!(return_routing_settings(&g).consistent.is_none());
        assert_eq!(egress_settings(&g).mode, grm::egress::EgressMode::Ecmp);
    }

    /// A restarted engine's manager starts at false: the daemon's kill switch stays true (the
    /// kernel still has it) until the manager says true, and follows it from then on.
    #[tokio::test]
    async fn a_restarted_managers_initial_false_is_not_passed_on() {
        let (manager, from) = watch::channel(false);
        let (to, mut daemon) = watch::channel(true);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(forward_kill_switch(from, to, cancel.clone()));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            *daemon.borrow_and_update(),
            "the initial false was passed on"
        );
        manager.send_replace(true);
        // (a watch keeps the latest value only: the forwarder must see the true first)
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        manager.send_replace(false);
        tokio::time::timeout(std::time::Duration::from_secs(5), daemon.wait_for(|k| !*k))
            .await
            .expect("a false after the first true is passed on")
            .unwrap();
        manager.send_replace(true);
        tokio::time::timeout(std::time::Duration::from_secs(5), daemon.wait_for(|k| *k))
            .await
            .expect("and the true after it")
            .unwrap();
        cancel.cancel();
        task.await.unwrap();
    }
}
