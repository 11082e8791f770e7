//! Ingress virtual servers: IPVS services on the ingress VIPs (and any listed address) with
//! real-server health checks. Owns the mapping of the `ingress` config to IPVS state
//! ([`desired`], pure), the checks ([`check`], [`health`]), the engine's tasks ([`run`]) and
//! their metrics. Talks to the kernel only through the `ipvs` crate and, for the local routes
//! of `local_route` virtual servers, `gateway_route_manager::local_routes`; never touches VIPs
//! (VRRP does) or other routing (egress and return routing do).

pub mod check;
pub mod desired;
pub mod health;
pub mod metrics;
pub mod run;

pub use desired::{plan, weights, IngressPlan, PlanError, RealServerId};
pub use metrics::IngressMetrics;
pub use run::{start, withdraw, EngineSettings};
