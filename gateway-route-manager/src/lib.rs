//! Gateway health, egress routing with a kill switch (and, in later issues, return routing
//! and DDNS) for vpn-router.
//!
//! - [`gluetun`]: HTTP client of gluetun's control and health servers.
//! - [`health`]: checks, rise/fall hysteresis, the healthy set on a `watch` channel, `/status`.
//! - [`egress`]: planner (pure), diff (pure) and the reconciler that applies them.
//! - [`return_routing`]: per-gateway tables/rules and the nft table (ct mark return routing,
//!   consistent egress marking); [`consistent`]: the flow-stable bucket table (pure).
//! - `netlink` (private): the only module that speaks rtnetlink.
//! - [`ddns`]: one DNS name for the public IPs of the healthy gateways (rfc2136, cloudflare, dynu).
//! - [`metrics`]: Prometheus metrics; [`error`]: error and failure types.
//!
//! The crate never parses YAML: the router maps its config to [`health::HealthSettings`],
//! [`egress::EgressSettings`] and [`return_routing::ReturnRoutingSettings`].

pub mod consistent;
pub mod ddns;
pub mod egress;
pub mod error;
pub mod gluetun;
pub mod health;
pub mod local_routes;
pub mod metrics;
mod netlink;
pub mod return_routing;
mod trigger;

pub use egress::{EgressManager, EgressSettings};
pub use error::{CheckError, FailureReason};
pub use health::{GatewayStatus, HealthChecker, HealthSettings, HealthyGateways};
pub use metrics::Metrics;
pub use netlink::{GroupType, Nexthop, NexthopKind, Route, RouteTarget, Rule, RuleTarget};
pub use return_routing::{
    ReturnRoutingManager, ReturnRoutingMetrics, ReturnRoutingSettings, ReturnRoutingStatus,
};

#[cfg(test)]
mod tests {
    /// The lead spawns these on a multi-thread runtime: they must be `Send`.
    #[allow(dead_code)]
    fn futures_are_send(
        checker: crate::HealthChecker,
        egress: crate::EgressManager,
        rr: crate::ReturnRoutingManager,
        healthy: tokio::sync::watch::Receiver<crate::HealthyGateways>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        fn send<T: Send>(_: T) {}
        send(checker.run(cancel.clone()));
        let mut egress = egress;
        let set = crate::HealthyGateways::default();
        send(egress.reconcile(&set));
        send(egress.run(healthy.clone(), cancel.clone()));
        send(rr.run(healthy, cancel));
    }
}
