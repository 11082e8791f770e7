//! Prometheus metrics for every VRRP instance of the daemon (one `VrrpMetrics`, shared by
//! clone, labelled by instance). Owns metric names and labels only; values are set by the
//! runner.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::fsm::State;
use crate::packet::DecodeError;

/// `instance` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabel {
    /// Instance name.
    pub instance: String,
}

/// `instance`, `state` labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// Instance name.
    pub instance: String,
    /// initialize | backup | master.
    pub state: String,
}

/// `instance`, `reason` labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Instance name.
    pub instance: String,
    /// `DecodeError::reason()`, or a `fsm::Discard` reason (`unknown_peer`,
    /// `interval_too_long`).
    pub reason: String,
}

/// Reasons counted besides the decoder's: the state machine's screening (`fsm::Discard`;
/// `unknown_peer` also for a packet from outside `unicast_peers`, dropped before decoding).
pub const EXTRA_INVALID_REASONS: [&str; 3] = ["unknown_peer", "interval_too_long", "interval_zero"];

/// All VRRP metrics. Cloning shares the underlying series.
#[derive(Debug, Clone, Default)]
pub struct VrrpMetrics {
    /// 1 for the current state, 0 for the others.
    pub state: Family<StateLabels, Gauge>,
    /// State transitions.
    pub transitions: Family<InstanceLabel, Counter>,
    /// Adverts sent (each destination counts).
    pub adverts_sent: Family<InstanceLabel, Counter>,
    /// Valid adverts received for this instance.
    pub adverts_received: Family<InstanceLabel, Counter>,
    /// Packets rejected, by reason.
    pub invalid_packets: Family<ReasonLabels, Counter>,
    /// Priority currently announced.
    pub effective_priority: Family<InstanceLabel, Gauge>,
    /// Unix time of the last transition.
    pub last_transition: Family<InstanceLabel, Gauge<f64, AtomicU64>>,
}

impl VrrpMetrics {
    /// New, unregistered metrics.
    pub fn new() -> VrrpMetrics {
        VrrpMetrics::default()
    }

    /// Registers every metric under `vpn_router_vrrp_*`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("vpn_router_vrrp");
        r.register(
            "state",
            "VRRP state per instance: 1 for the current state",
            self.state.clone(),
        );
        r.register(
            "transitions",
            "VRRP state transitions",
            self.transitions.clone(),
        );
        r.register(
            "adverts_sent",
            "VRRP advertisements sent",
            self.adverts_sent.clone(),
        );
        r.register(
            "adverts_received",
            "Valid VRRP advertisements received for the instance",
            self.adverts_received.clone(),
        );
        r.register(
            "invalid_packets",
            "VRRP packets rejected, by reason",
            self.invalid_packets.clone(),
        );
        r.register(
            "effective_priority",
            "VRRP priority currently announced (after gateway tracking)",
            self.effective_priority.clone(),
        );
        r.register(
            "last_transition_timestamp_seconds",
            "Unix time of the last VRRP state transition",
            self.last_transition.clone(),
        );
    }

    /// Creates every series of an instance so they exist at 0 before anything happens.
    pub(crate) fn init_instance(&self, instance: &str) {
        let il = InstanceLabel {
            instance: instance.to_string(),
        };
        let _ = self.transitions.get_or_create(&il);
        let _ = self.adverts_sent.get_or_create(&il);
        let _ = self.adverts_received.get_or_create(&il);
        let _ = self.effective_priority.get_or_create(&il);
        let _ = self.last_transition.get_or_create(&il);
        for reason in DecodeError::REASONS
            .iter()
            .chain(EXTRA_INVALID_REASONS.iter())
        {
            let _ = self.invalid_packets.get_or_create(&ReasonLabels {
                instance: instance.to_string(),
                reason: reason.to_string(),
            });
        }
        self.set_state(instance, State::Initialize);
    }

    /// Adverts sent and valid adverts received by `instance` since the daemon started (0 for
    /// an instance that never ran). Read from the counters, so the runner publishes no
    /// status change per advert.
    pub fn advert_counts(&self, instance: &str) -> (u64, u64) {
        let il = InstanceLabel {
            instance: instance.to_string(),
        };
        let get = |f: &Family<InstanceLabel, Counter>| f.get(&il).map_or(0, |c| c.get());
        (get(&self.adverts_sent), get(&self.adverts_received))
    }

    /// Drops every series of `instance` (it was removed from the configuration), so
    /// `/metrics` stops reporting it.
    pub fn remove_instance(&self, instance: &str) {
        let il = InstanceLabel {
            instance: instance.to_string(),
        };
        self.transitions.remove(&il);
        self.adverts_sent.remove(&il);
        self.adverts_received.remove(&il);
        self.effective_priority.remove(&il);
        self.last_transition.remove(&il);
        for s in [State::Initialize, State::Backup, State::Master] {
            self.state.remove(&StateLabels {
                instance: instance.to_string(),
                state: s.as_str().to_string(),
            });
        }
        for reason in DecodeError::REASONS
            .iter()
            .chain(EXTRA_INVALID_REASONS.iter())
        {
            self.invalid_packets.remove(&ReasonLabels {
                instance: instance.to_string(),
                reason: reason.to_string(),
            });
        }
    }

    pub(crate) fn set_state(&self, instance: &str, state: State) {
        for s in [State::Initialize, State::Backup, State::Master] {
            self.state
                .get_or_create(&StateLabels {
                    instance: instance.to_string(),
                    state: s.as_str().to_string(),
                })
                .set(i64::from(s == state));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(m: &VrrpMetrics) -> String {
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn every_discard_reason_has_a_series_from_the_start() {
        use crate::fsm::Discard;
        for d in [
            Discard::UnknownPeer,
            Discard::IntervalTooLong,
            Discard::IntervalZero,
        ] {
            assert!(
                EXTRA_INVALID_REASONS.contains(&d.as_str()),
                "{} is not created in advance",
                d.as_str()
            );
        }
        let m = VrrpMetrics::new();
        m.init_instance("a");
        let text = exposition(&m);
        assert!(
            text.contains(r#"vpn_router_vrrp_invalid_packets_total{instance="a",reason="interval_too_long"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn counts_read_back_and_a_removed_instance_leaves_no_series() {
        let m = VrrpMetrics::new();
        m.init_instance("a");
        m.init_instance("b");
        let il = |i: &str| InstanceLabel {
            instance: i.to_string(),
        };
        m.adverts_sent.get_or_create(&il("a")).inc_by(5);
        m.adverts_received.get_or_create(&il("a")).inc_by(2);
        assert_eq!(m.advert_counts("a"), (5, 2));
        assert_eq!(m.advert_counts("never-ran"), (0, 0));

        m.remove_instance("a");
        let text = exposition(&m);
        assert!(
            !text.contains("instance=\"a\""),
            "series of a left:\n{text}"
        );
        assert!(text.contains("instance=\"b\""), "series of b gone:\n{text}");
        assert_eq!(m.advert_counts("a"), (0, 0));
    }
}
