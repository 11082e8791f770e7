//! The netns lab shared by integration tests, benchmarks and `make demo`: the reference topology
//! of ../shared/DESIGN.md built from network namespaces, bridges, veths and nft on one machine,
//! with the real `vpn-router` binary as the routers.
//!
//! This crate owns lab namespaces (prefix `vrl<pid>x<n>-`), the processes it starts in them and
//! its directory under `/tmp/vpn-router-lab/`. It never touches the host's root namespace
//! (bridges live in the lab's own "switch" namespace) and never talks to addresses outside the
//! namespaces it created. It is a test harness: it reads the wall clock to measure outages, so
//! the workspace's clock bans do not apply here.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

pub mod config;
pub mod demo;
pub mod dns;
pub mod gluetun;
pub mod gluetun_pod;
pub mod http;
pub mod kube;
pub mod lab;
pub mod netns;
pub mod probe;
pub mod servers;
pub mod topo;

pub use gluetun::{GatewayBreak, GluetunAuth, GluetunState};
pub use lab::{GatewayKind, Lab, LabBuilder, LabError, PortForwarding, RouterLink};
