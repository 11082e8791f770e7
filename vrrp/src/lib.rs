//! VRRP v2/v3 for vpn-router: packet codec, RFC 5798 state machine (pure, time passed in),
//! raw-socket I/O, gratuitous ARP / unsolicited NA, VIP and VMAC management, and the async
//! runner that ties them together.
//!
//! This crate owns the VRRP protocol and the virtual addresses. It does not parse YAML (the
//! `router` crate maps its config into [`InstanceConfig`]), and it does not decide gateway
//! health (it receives a healthy-gateway count).

pub mod fsm;
pub mod gratuitous;
pub mod netlink;
pub mod network;
pub mod packet;
mod serde_duration;
pub mod vip;
