//! The kubelet-like run of the shipped manifests: the router Deployment, its ConfigMap and
//! Secrets and the NetworkAttachmentDefinitions are read from deploy/ as files (rendered like
//! `kubectl apply -k deploy/overlays/example`), and router pods are started from the built image
//! (`make image`) with podman, with exactly that pod spec, in network namespaces wired the way
//! Multus, the bridge plugin, whereabouts and the tuning plugin would wire them. The kubelet's
//! probes are polled as the kubelet polls them.
//!
//! - [`manifests`]: rendering deploy/ (kustomize subset: resources, components, namespace, images);
//! - [`cni`]: the Multus annotation, NAD configs, whereabouts allocation, plugging a pod in;
//! - [`pod`]: a pod template to one `podman run`, and what it does not honour;
//! - [`kubelet`]: the prober;
//! - [`cluster`]: the one-node cluster (switch, node, Internet, gateways) and pod lifecycles.
//!
//! Used by `tests/tests/kubelet.rs` (`make test-kubelet`).

pub mod cluster;
pub mod cni;
pub mod kubelet;
pub mod manifests;
pub mod pod;

use std::path::PathBuf;

pub use cluster::{Cluster, ClusterOptions, RouterPod, Sandbox, Termination};

/// A failure of the kubelet-like run: what, where, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("{file}: {msg}")]
    Manifest { file: PathBuf, msg: String },
    #[error("{what}: not found in the rendered manifests")]
    Missing { what: String },
    #[error("{what}: not implemented by the kubelet-like run (tests/src/kube/); extend it or change the manifest")]
    Unsupported { what: String },
    #[error("{0}")]
    Prerequisite(String),
    #[error("podman {args}: {stderr}")]
    Podman { args: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error(transparent)]
    Lab(#[from] crate::lab::LabError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
}
