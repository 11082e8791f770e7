//! vpn-router: one daemon for the router pods of a Kubernetes VPN gateway network.
//!
//! This crate owns the config contract, the supervisor that runs the engines (from the
//! `vrrp`, `ipvs` and `gateway-route-manager` crates), the sysctls they need, and the api
//! (`/metrics`, `/healthz`, `/readyz`, `/status`). See docs/architecture.md.

pub mod api;
pub mod config;
pub mod engines;
pub mod ingress;
pub mod logging;
pub mod metrics;
pub mod nad_routes;
pub mod status;
pub mod supervisor;
pub mod sysctl;
