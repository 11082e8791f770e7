//! Errors of the instance runner; the per-module errors are wrapped, each naming its object.

use crate::network::NetworkError;
use crate::vip::VipError;

/// Why an instance could not run.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// Configuration the runner cannot work with.
    #[error("VRRP instance {instance}: {message}")]
    Config {
        /// Instance name.
        instance: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// Advert socket.
    #[error("VRRP instance {instance}: {source}")]
    Network {
        /// Instance name.
        instance: String,
        /// Cause.
        source: Box<NetworkError>,
    },
    /// VIPs / VMAC.
    #[error("VRRP instance {instance}: {source}")]
    Vip {
        /// Instance name.
        instance: String,
        /// Cause.
        source: Box<VipError>,
    },
    /// The instance's own thread or runtime could not be started (see `crate::spawn`).
    #[error("VRRP instance {instance}: cannot start its thread: {source}")]
    Thread {
        /// Instance name.
        instance: String,
        /// Cause.
        source: std::io::Error,
    },
}
