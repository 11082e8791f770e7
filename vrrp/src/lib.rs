//! VRRP v2/v3 for vpn-router: packet codec, RFC 5798 state machine (pure, time passed in),
//! raw-socket I/O, gratuitous ARP / unsolicited NA, VIP and VMAC management, and the async
//! runner that ties them together.
//!
//! This crate owns the VRRP protocol and the virtual addresses. It does not parse YAML (the
//! `router` crate maps its config into [`InstanceConfig`]), and it does not decide gateway
//! health (it receives a healthy-gateway count).

pub mod error;
pub mod fsm;
pub mod gratuitous;
pub mod instance;
pub mod metrics;
pub mod netlink;
pub mod network;
mod own_thread;
pub mod packet;
mod serde_duration;
mod timer;
pub mod vip;

pub use error::InstanceError;
pub use fsm::{State, Track};
pub use gratuitous::GratuitousConfig;
pub use instance::{run, InstanceConfig, InstanceStatus, RunHandles};
pub use metrics::VrrpMetrics;
pub use own_thread::{spawn, InstanceThread};
pub use packet::{ChecksumMode, Version};
pub use vip::VirtualIp;
