//! Prometheus metrics of gateway health and egress routing.
//!
//! Owns: metric definitions, names (`vpn_router_` prefix, base units, `_total` counters added
//! by prometheus-client) and labels (`gateway` = the gateway's address, `check`, `reason`,
//! `object`: all low cardinality). It must not decide anything; `health` and `egress` update it.
//! Register once with [`Metrics::register`] on a registry *without* a prefix.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    pub gateway: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    pub gateway: String,
    pub port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub gateway: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    /// `nexthop`, `route` or `rule`.
    pub object: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn check_duration_histogram() -> Histogram {
    // 1 ms .. ~4 s: LAN answers are milliseconds; timeouts are sub-second to seconds.
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0,
    ])
}

/// All metrics of this crate. Cheap to clone (handles to shared atomics).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub gateway_healthy: Family<GatewayLabels, Gauge>,
    pub check_duration: HistogramFamily<CheckLabels>,
    pub check_failures: Family<FailureLabels, Counter>,
    pub gateways_healthy: Gauge,
    pub egress_changes: Family<ObjectLabels, Counter>,
    pub egress_reconcile_errors: Counter,
    pub probe_rtt: Family<GatewayLabels, Gauge<f64, AtomicU64>>,
    pub forwarded_port: Family<PortLabels, Gauge>,
    pub forwarded_ports_errors: Family<GatewayLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            gateway_healthy: Family::default(),
            check_duration: Family::new_with_constructor(check_duration_histogram),
            check_failures: Family::default(),
            gateways_healthy: Gauge::default(),
            egress_changes: Family::default(),
            egress_reconcile_errors: Counter::default(),
            probe_rtt: Family::default(),
            forwarded_port: Family::default(),
            forwarded_ports_errors: Family::default(),
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every metric under its full `vpn_router_...` name.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vpn_router_gateway_healthy",
            "Whether the gateway is in the healthy set (1) or not (0)",
            self.gateway_healthy.clone(),
        );
        registry.register(
            "vpn_router_gateway_check_duration_seconds",
            "Duration of one gateway check, by check",
            self.check_duration.clone(),
        );
        registry.register(
            "vpn_router_gateway_check_failures",
            "Failed gateway checks, by gateway and reason",
            self.check_failures.clone(),
        );
        registry.register(
            "vpn_router_gateways_healthy",
            "Number of gateways in the healthy set",
            self.gateways_healthy.clone(),
        );
        registry.register(
            "vpn_router_egress_route_changes",
            "Kernel writes made by the egress reconciler, by object (nexthop, route, rule)",
            self.egress_changes.clone(),
        );
        registry.register(
            "vpn_router_egress_reconcile_errors",
            "Egress reconciliations that failed (some change could not be applied)",
            self.egress_reconcile_errors.clone(),
        );
        registry.register(
            "vpn_router_gateway_probe_rtt_seconds",
            "TCP connect time of the last successful data-plane probe through the gateway",
            self.probe_rtt.clone(),
        );
        registry.register(
            "vpn_router_gateway_forwarded_port",
            "A port the gateway's VPN provider forwards to it (1), from gluetun's /v1/portforward",
            self.forwarded_port.clone(),
        );
        registry.register(
            "vpn_router_gateway_forwarded_ports_errors",
            "Answers of /v1/portforward that were ignored (malformed, or a port 0 in the list)",
            self.forwarded_ports_errors.clone(),
        );
    }

    /// The gateway's forwarded ports changed from `old` to `new`: one series per port.
    pub(crate) fn set_forwarded_ports(&self, gateway: &str, old: &[u16], new: &[u16]) {
        for p in old.iter().filter(|p| !new.contains(p)) {
            self.forwarded_port.remove(&PortLabels {
                gateway: gateway.to_owned(),
                port: p.to_string(),
            });
        }
        for p in new {
            self.forwarded_port
                .get_or_create(&PortLabels {
                    gateway: gateway.to_owned(),
                    port: p.to_string(),
                })
                .set(1);
        }
    }

    pub(crate) fn count_forwarded_ports_error(&self, gateway: &str) {
        self.forwarded_ports_errors
            .get_or_create(&GatewayLabels {
                gateway: gateway.to_owned(),
            })
            .inc();
    }

    pub(crate) fn observe_check(&self, check: &str, took: Duration) {
        self.check_duration
            .get_or_create(&CheckLabels {
                check: check.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub(crate) fn count_failure(&self, gateway: &str, reason: &str) {
        self.check_failures
            .get_or_create(&FailureLabels {
                gateway: gateway.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn count_change(&self, object: &str) {
        self.egress_changes
            .get_or_create(&ObjectLabels {
                object: object.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn encodes_with_prefix_and_total_suffix() {
        let metrics = Metrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.count_failure("192.168.25.128", "timeout");
        metrics.observe_check("vpn_status", Duration::from_millis(3));
        metrics.count_change("route");
        metrics.set_forwarded_ports("192.168.25.128", &[], &[5000, 5001]);
        metrics.set_forwarded_ports("192.168.25.128", &[5000, 5001], &[5001]);
        metrics
            .probe_rtt
            .get_or_create(&GatewayLabels {
                gateway: "192.168.25.128".into(),
            })
            .set(0.012);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(text.contains(
            "vpn_router_gateway_check_failures_total{gateway=\"192.168.25.128\",reason=\"timeout\"} 1"
        ), "{text}");
        assert!(text.contains("vpn_router_egress_route_changes_total{object=\"route\"} 1"));
        assert!(text.contains(
            "vpn_router_gateway_forwarded_port{gateway=\"192.168.25.128\",port=\"5001\"} 1"
        ));
        assert!(!text.contains("port=\"5000\""), "{text}");
        assert!(text.contains("vpn_router_gateway_check_duration_seconds_bucket{le=\"0.005\",check=\"vpn_status\"} 1"), "{text}");
        assert!(
            text.contains("vpn_router_gateway_probe_rtt_seconds{gateway=\"192.168.25.128\"} 0.012")
        );
    }
}
