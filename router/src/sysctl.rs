//! The kernel settings the configured features need, and setting them with errors that name
//! the sysctl and say what to do. In a pod these are often preset through
//! `securityContext.sysctls` with /proc/sys read-only: a value that is already right is never
//! written, so that setup works.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// One wanted setting and why the daemon needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub key: String,
    pub value: String,
    pub why: &'static str,
    /// Without a required setting the feature cannot work: the daemon refuses to start.
    /// An optional one only improves behaviour (a warning when it cannot be set).
    pub required: bool,
    /// What it means when the sysctl does not exist in this kernel.
    pub when_missing: &'static str,
}

pub fn wanted(config: &Config) -> Vec<Wanted> {
    let mut out = Vec::new();
    if let Some(g) = &config.gateways {
        out.push(Wanted {
            key: "net.ipv4.ip_forward".into(),
            value: "1".into(),
            why: "the router forwards client traffic to the gateways",
            required: true,
            when_missing: "this kernel has no IPv4 forwarding",
        });
        out.push(Wanted {
            key: "net.ipv4.fib_multipath_hash_policy".into(),
            value: "1".into(),
            why: "multipath egress hashes on the 5-tuple (layer 4), the same on every router",
            required: true,
            when_missing: "this kernel has no multipath routing",
        });
        out.push(Wanted {
            key: "net.ipv4.fib_multipath_hash_seed".into(),
            value: g.egress.hash_seed.to_string(),
            why: "every router must pick the same gateway for a flow (gateways.egress.hash_seed)",
            required: false,
            when_missing: "needs Linux 6.11+; without it each router hashes with its own random seed, so a router failover may move ecmp flows (egress.mode: consistent does not depend on it)",
        });
    }
    if let Some(i) = &config.ingress {
        out.push(Wanted {
            key: "net.ipv4.vs.conntrack".into(),
            value: "1".into(),
            why: "return routing marks IPVS connections through conntrack",
            required: true,
            when_missing: "the kernel has no IPVS loaded (modprobe ip_vs)",
        });
        out.push(Wanted {
            key: "net.ipv4.vs.sloppy_tcp".into(),
            value: if i.sloppy_tcp { "1" } else { "0" }.into(),
            why: "a new master adopts TCP flows that started on the old one (ingress.sloppy_tcp)",
            required: true,
            when_missing: "the kernel has no IPVS loaded (modprobe ip_vs)",
        });
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    AlreadySet,
    Set { from: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("sysctl {key}: not present in this kernel: {when_missing}")]
    Missing {
        key: String,
        when_missing: &'static str,
    },
    #[error("sysctl {key}={value} (now {current}): {source}; {hint}")]
    Refused {
        key: String,
        value: String,
        current: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("sysctl {key}: cannot read {path}: {source}")]
    Read {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

const POD_HINT: &str = "in Kubernetes set it in the pod's securityContext.sysctls (and allow it \
     with the kubelet's --allowed-unsafe-sysctls), or give the container NET_ADMIN with a \
     writable /proc/sys";

fn path_of(root: &Path, key: &str) -> PathBuf {
    root.join(key.replace('.', "/"))
}

/// Sets one sysctl under `root` (normally /proc/sys), leaving it alone when already right.
pub fn apply_one(root: &Path, w: &Wanted) -> Result<Outcome, SysctlError> {
    let path = path_of(root, &w.key);
    let current = match std::fs::read_to_string(&path) {
        Ok(s) => s.split_whitespace().collect::<Vec<_>>().join(" "),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(SysctlError::Missing {
                key: w.key.clone(),
                when_missing: w.when_missing,
            })
        }
        Err(source) => {
            return Err(SysctlError::Read {
                key: w.key.clone(),
                path,
                source,
            })
        }
    };
    if current == w.value {
        return Ok(Outcome::AlreadySet);
    }
    std::fs::write(&path, format!("{}\n", w.value)).map_err(|source| SysctlError::Refused {
        key: w.key.clone(),
        value: w.value.clone(),
        current: current.clone(),
        source,
        hint: POD_HINT,
    })?;
    Ok(Outcome::Set { from: current })
}

/// Applies every wanted setting. Returns the errors of required settings (the caller refuses
/// to run) and logs optional ones as warnings.
pub fn apply(root: &Path, wanted: &[Wanted]) -> Vec<SysctlError> {
    let mut fatal = Vec::new();
    for w in wanted {
        match apply_one(root, w) {
            Ok(Outcome::AlreadySet) => {
                tracing::debug!(sysctl = %w.key, value = %w.value, "sysctl already set")
            }
            Ok(Outcome::Set { from }) => {
                tracing::info!(sysctl = %w.key, value = %w.value, was = %from, why = w.why, "sysctl set")
            }
            Err(e) if w.required => fatal.push(e),
            Err(e) => tracing::warn!(error = %e, "optional sysctl not set"),
        }
    }
    fatal
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(entries: &[(&str, &str)]) -> tempdir::TempDir {
        let dir = tempdir::TempDir::new();
        for (k, v) in entries {
            let p = path_of(dir.path(), k);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        }
        dir
    }

    /// A tiny self-cleaning temp dir (no extra dependency for one test helper).
    mod tempdir {
        use std::path::{Path, PathBuf};
        pub struct TempDir(PathBuf);
        impl TempDir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir()
                    .join(format!("vpn-router-sysctl-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn want(key: &str, value: &str, required: bool) -> Wanted {
        Wanted {
            key: key.into(),
            value: value.into(),
            why: "test",
            required,
            when_missing: "missing in test",
        }
    }

    #[test]
    fn sets_changes_and_leaves_correct_values_alone() {
        let dir = fake_proc(&[
            ("net.ipv4.ip_forward", "0\n"),
            ("net.ipv4.fib_multipath_hash_policy", "1\n"),
        ]);
        let w = want("net.ipv4.ip_forward", "1", true);
        assert_eq!(
            apply_one(dir.path(), &w).unwrap(),
            Outcome::Set { from: "0".into() }
        );
        assert_eq!(
            std::fs::read_to_string(path_of(dir.path(), &w.key)).unwrap(),
            "1\n"
        );
        let w = want("net.ipv4.fib_multipath_hash_policy", "1", true);
        assert_eq!(apply_one(dir.path(), &w).unwrap(), Outcome::AlreadySet);
    }

    #[test]
    fn missing_sysctl_is_named_and_only_required_ones_are_fatal() {
        let dir = fake_proc(&[]);
        let errs = apply(
            dir.path(),
            &[
                want("net.ipv4.vs.conntrack", "1", true),
                want("net.ipv4.fib_multipath_hash_seed", "7", false),
            ],
        );
        assert_eq!(errs.len(), 1);
        let msg = errs[0].to_string();
        assert!(
            msg.contains("net.ipv4.vs.conntrack") && msg.contains("missing in test"),
            "{msg}"
        );
    }

    #[test]
    fn features_ask_for_their_sysctls() {
        let loaded = crate::config::load_str(
            Path::new("t.yaml"),
            "gateways: { interface: eth1, addresses: 192.168.25.128-192.168.25.129 }\ningress: { sloppy_tcp: false }\n",
        )
        .unwrap();
        let keys: Vec<(String, String)> = wanted(&loaded.config)
            .into_iter()
            .map(|w| (w.key, w.value))
            .collect();
        assert!(keys.contains(&("net.ipv4.ip_forward".into(), "1".into())));
        assert!(keys.contains(&(
            "net.ipv4.fib_multipath_hash_seed".into(),
            0xdeadbeef_u32.to_string()
        )));
        assert!(keys.contains(&("net.ipv4.vs.sloppy_tcp".into(), "0".into())));
        let empty = crate::config::load_str(Path::new("t.yaml"), "").unwrap();
        assert!(wanted(&empty.config).is_empty());
    }
}
