//! Prometheus metrics of the IPVS reconciler (one `IpvsMetrics`, shared by clone). Owns metric
//! names and labels only; the values are set by `reconcile::Reconciler`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::reconcile::Op;

/// `op`, `result` labels of the change counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    /// add_service | update_service | delete_service | add_destination | update_destination |
    /// delete_destination.
    pub op: &'static str,
    /// ok | error.
    pub result: &'static str,
}

/// `result` label of the pass counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PassLabels {
    /// ok (nothing failed) | write_errors (some writes failed) | dump_error (nothing written).
    pub result: &'static str,
}

pub(crate) const OPS: [&str; 6] = [
    "add_service",
    "update_service",
    "delete_service",
    "add_destination",
    "update_destination",
    "delete_destination",
];

pub(crate) fn op_label(op: &Op) -> &'static str {
    match op {
        Op::NewService(_) => OPS[0],
        Op::SetService(_) => OPS[1],
        Op::DelService(_) => OPS[2],
        Op::NewDest { .. } => OPS[3],
        Op::SetDest { .. } => OPS[4],
        Op::DelDest { .. } => OPS[5],
    }
}

/// All IPVS metrics. Cloning shares the underlying series.
#[derive(Debug, Clone, Default)]
pub struct IpvsMetrics {
    /// Writes sent to the kernel, by operation and result.
    pub changes: Family<ChangeLabels, Counter>,
    /// Reconcile passes, by result.
    pub passes: Family<PassLabels, Counter>,
    /// Services owned by us in the kernel after the last pass.
    pub services: Gauge,
    /// Their destinations.
    pub destinations: Gauge,
    /// How long the last pass took (dump + plan + apply).
    pub last_pass_seconds: Gauge<f64, AtomicU64>,
}

impl IpvsMetrics {
    /// New, unregistered metrics with every series present at 0.
    pub fn new() -> Self {
        let m = Self::default();
        for op in OPS {
            for result in ["ok", "error"] {
                let _ = m.changes.get_or_create(&ChangeLabels { op, result });
            }
        }
        for result in ["ok", "write_errors", "dump_error"] {
            let _ = m.passes.get_or_create(&PassLabels { result });
        }
        m
    }

    /// Registers every metric under `vpn_router_ipvs_*`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("vpn_router_ipvs");
        r.register(
            "changes",
            "IPVS writes sent to the kernel, by operation and result",
            self.changes.clone(),
        );
        r.register(
            "reconcile_passes",
            "IPVS reconcile passes (dump, plan, apply), by result",
            self.passes.clone(),
        );
        r.register(
            "services",
            "IPVS services owned by vpn-router after the last pass",
            self.services.clone(),
        );
        r.register(
            "destinations",
            "Destinations of the owned IPVS services after the last pass",
            self.destinations.clone(),
        );
        r.register(
            "last_pass_duration_seconds",
            "Duration of the last IPVS reconcile pass",
            self.last_pass_seconds.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        let m = IpvsMetrics::new();
        let mut registry = Registry::default();
        m.register(&mut registry);
        m.changes
            .get_or_create(&ChangeLabels {
                op: "add_service",
                result: "ok",
            })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"vpn_router_ipvs_changes_total{op="add_service",result="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"vpn_router_ipvs_reconcile_passes_total{result="dump_error"} 0"#));
        assert!(text.contains("vpn_router_ipvs_last_pass_duration_seconds 0.0"));

        // promtool runs on the daemon's whole /metrics in router's tests (Prometheus text
        // format there); here the OpenMetrics encoding is checked for names and labels.
    }
}
