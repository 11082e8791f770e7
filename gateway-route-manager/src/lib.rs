//! Gateway health, egress routing with a kill switch (and, in later issues, return routing
//! and DDNS) for vpn-router.
//!
//! - [`gluetun`]: HTTP client of gluetun's control and health servers.
//! - [`health`]: checks, rise/fall hysteresis, the healthy set on a `watch` channel, `/status`.
//! - [`egress`]: planner (pure), diff (pure) and the reconciler that applies them.
//! - `netlink` (private): the only module that speaks rtnetlink.
//! - [`metrics`]: Prometheus metrics; [`error`]: error and failure types.
//!
//! The crate never parses YAML: the router maps its config to [`health::HealthSettings`] and
//! [`egress::EgressSettings`].

pub mod egress;
pub mod error;
pub mod gluetun;
pub mod health;
pub mod metrics;
mod netlink;

pub use egress::{EgressManager, EgressSettings};
pub use error::{CheckError, FailureReason};
pub use health::{GatewayStatus, HealthChecker, HealthSettings, HealthyGateways};
pub use metrics::Metrics;
pub use netlink::{GroupType, Nexthop, NexthopKind, Route, RouteTarget, Rule, RuleTarget};
