//! IPVS for vpn-router: our own client for the kernel's "IPVS" generic-netlink family and a
//! desired-vs-kernel reconciler.
//!
//! - [`model`]: services, destinations, statistics in plain Rust types.
//! - [`codec`]: the wire format (pure, never panics on hostile bytes).
//! - [`client`]: async client on netlink-proto (one netlink stack with rtnetlink).
//! - [`reconcile`]: pure planner of minimal ordered writes, plus dump → plan → apply.
//!
//! This crate does not read configuration or decide which services should exist; the `router`
//! crate maps its config to [`reconcile::DesiredService`] values.

pub mod client;
pub mod codec;
pub mod errno;
pub mod metrics;
pub mod model;
pub mod reconcile;

pub use client::{IpvsClient, IpvsError};
pub use metrics::IpvsMetrics;
pub use model::*;
pub use reconcile::{apply, plan, DesiredService, KernelService, Op, Reconciler};
