//! The kernel settings the configured features need, and setting them with errors that name
//! the sysctl and say what to do. In a pod these are often preset through
//! `securityContext.sysctls` with /proc/sys read-only: a value that is already right is never
//! written, so that setup works.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vrrp::packet::Family;
use vrrp::vip::vmac_sysctls;

use crate::config::{Config, EgressMode};

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
        // Only the multipath modes hash in the kernel's FIB; `consistent` hashes in nft with
        // gateways.egress.hash_seed and routes each flow through a single-path table.
        if g.egress.mode != EgressMode::Consistent {
            out.push(Wanted {
                key: "net.ipv4.fib_multipath_hash_policy".into(),
                value: "1".into(),
                why: "multipath egress hashes on the 5-tuple (layer 4), the same on every router",
                required: true,
                when_missing: "this kernel has no multipath routing",
            });
            out.push(Wanted {
                key: HASH_SEED.into(),
                value: g.egress.hash_seed.to_string(),
                why: "every router must pick the same gateway for a flow (gateways.egress.hash_seed)",
                required: false,
                when_missing: "needs Linux 6.11+; without it each router hashes with its own random seed, so a router failover may move ecmp flows (egress.mode: consistent does not depend on it)",
            });
        }
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

const HASH_SEED: &str = "net.ipv4.fib_multipath_hash_seed";

/// Where a preset belongs when /proc/sys is read-only (a pod).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "scope", content = "interface")]
pub enum Scope {
    /// The pod's `securityContext.sysctls`.
    Pod,
    /// One attachment's interface: the CNI `tuning` plugin of its NetworkAttachmentDefinition
    /// (`net.ipv4.conf.IFNAME.<name>`).
    Interface(String),
}

/// A sysctl a pod must preset for this config, because the daemon cannot write it there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Preset {
    pub key: String,
    pub value: String,
    #[serde(flatten)]
    pub scope: Scope,
    /// False: the daemon runs without it (and says so), with a documented loss.
    pub required: bool,
    pub why: String,
}

/// Everything a pod with read-only /proc/sys needs preset for `config`: the daemon-wide
/// settings of [`wanted`], and for every VMAC what the daemon would write on it (preset as
/// `net.*.conf.default.*`, which a macvlan inherits when the daemon creates it) and on its
/// parent (set per interface by the attachment's tuning plugin). `vpn-router check-config
/// --sysctls` prints it; deploy/validate.py checks the shipped Deployment and NADs against it.
pub fn pod_presets(config: &Config) -> Vec<Preset> {
    let mut out: Vec<Preset> = wanted(config)
        .into_iter()
        .map(|w| Preset {
            key: w.key,
            value: w.value,
            scope: Scope::Pod,
            required: w.required,
            why: w.why.to_string(),
        })
        .collect();
    let mut push = |p: Preset| {
        if !out.iter().any(|q| q.key == p.key) {
            out.push(p);
        }
    };
    let mut families: Vec<(Family, String)> = Vec::new();
    for v in config.vrrp.iter().filter(|v| v.vmac) {
        for vip in &v.virtual_ips {
            let family = Family::of(&vip.address.value.addr());
            if !families.contains(&(family, vip.interface.clone())) {
                families.push((family, vip.interface.clone()));
            }
        }
    }
    let any_v6 = families.iter().any(|(f, _)| *f == Family::V6);
    for (family, parent) in &families {
        let (own, on_parent) = vmac_sysctls(*family);
        for s in own {
            // An IPv6 VMAC needs IPv6 on: then the IPv4 VMACs go without IPv6 through the
            // IPv6 VMAC's addr_gen_mode=1 (accepted by vrrp::vip) instead of disable_ipv6.
            if any_v6 && s.name == "disable_ipv6" {
                continue;
            }
            push(Preset {
                key: s.key("default"),
                value: s.value.into(),
                scope: Scope::Pod,
                required: true,
                why: format!(
                    "vrrp[].vmac: the {} VMAC the daemon creates on {parent} inherits {}",
                    family.name(),
                    s.key("default")
                ),
            });
        }
        for s in on_parent {
            push(Preset {
                key: s.key(parent),
                value: s.value.into(),
                scope: Scope::Interface(parent.clone()),
                required: true,
                why: format!("vrrp[].vmac: the parent of the {} VMAC", family.name()),
            });
        }
    }
    out
}

/// Whether every router picks the same gateway for a flow, as far as this router can tell:
/// `/status` shows it under `daemon.egress_hashing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressHashing {
    /// `gateways.egress.mode`.
    pub mode: String,
    /// True when the choice depends only on the config (`consistent`, or the kernel's seed
    /// equals `hash_seed`), so routers with the same config agree and a failover keeps flows.
    pub same_on_every_router: bool,
    /// What decides it, and what to do when routers disagree.
    pub note: String,
}

/// Reads `net.ipv4.fib_multipath_hash_seed` under `root` for the multipath modes.
pub fn egress_hashing(root: &Path, config: &Config) -> Option<EgressHashing> {
    let g = config.gateways.as_ref()?;
    let mode = match g.egress.mode {
        EgressMode::Consistent => {
            return Some(EgressHashing {
                mode: "consistent".into(),
                same_on_every_router: true,
                note: format!(
                    "nft jhash with gateways.egress.hash_seed {:#x}: the same on every router with this config",
                    g.egress.hash_seed
                ),
            })
        }
        EgressMode::Ecmp => "ecmp",
        EgressMode::EcmpResilient => "ecmp_resilient",
    };
    let seed = std::fs::read_to_string(path_of(root, HASH_SEED))
        .ok()
        .map(|s| s.trim().to_string());
    let want = g.egress.hash_seed.to_string();
    let (same, note) = match seed.as_deref() {
        // The seed makes the hash alike, but a resilient group's buckets depend on the order of
        // each router's own nexthop changes since it started.
        Some(s) if s == want && g.egress.mode == EgressMode::EcmpResilient => (false, format!("{HASH_SEED} = gateways.egress.hash_seed ({want}), but a resilient nexthop group's buckets follow each router's own history of gateway changes, so routers may still disagree; use egress.mode: consistent")),
        None => (false, format!("this kernel has no {HASH_SEED} (Linux < 6.11): each router hashes flows with its own random key, so routers disagree and a failover moves flows; use egress.mode: consistent")),
        Some(s) if s == want => (true, format!("{HASH_SEED} = gateways.egress.hash_seed ({want})")),
        Some("0") => (false, format!("{HASH_SEED} is 0 (unset: a random key per router), so routers disagree and a failover moves flows; set it to {want} (deploy/components/ecmp-hash-seed) or use egress.mode: consistent")),
        Some(s) => (false, format!("{HASH_SEED} is {s}, not gateways.egress.hash_seed {want}: routers with another seed pick other gateways")),
    };
    Some(EgressHashing {
        mode: mode.into(),
        same_on_every_router: same,
        note,
    })
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

    #[test]
    fn consistent_mode_needs_no_multipath_sysctls() {
        let loaded = crate::config::load_str(
            Path::new("t.yaml"),
            "gateways: { interface: eth1, addresses: 192.168.25.128, egress: { mode: consistent } }\n",
        )
        .unwrap();
        let keys: Vec<String> = wanted(&loaded.config).into_iter().map(|w| w.key).collect();
        assert_eq!(keys, vec!["net.ipv4.ip_forward".to_string()]);
    }

    #[test]
    fn vmac_presets_cover_the_macvlan_and_its_parent() {
        let yaml = "vrrp:\n  - { name: r, interface: vrrp0, vrid: 51, vmac: true, virtual_ips: [{ address: 192.168.26.254/22, interface: gw0 }] }\n";
        let loaded = crate::config::load_str(Path::new("t.yaml"), yaml).unwrap();
        let p = pod_presets(&loaded.config);
        let find = |k: &str| {
            p.iter()
                .find(|x| x.key == k)
                .map(|x| (x.value.as_str(), &x.scope))
        };
        assert_eq!(
            find("net.ipv4.conf.default.arp_ignore"),
            Some(("1", &Scope::Pod))
        );
        assert_eq!(
            find("net.ipv4.conf.default.rp_filter"),
            Some(("0", &Scope::Pod))
        );
        assert_eq!(
            find("net.ipv6.conf.default.disable_ipv6"),
            Some(("1", &Scope::Pod))
        );
        assert_eq!(
            find("net.ipv4.conf.gw0.arp_announce"),
            Some(("2", &Scope::Interface("gw0".into())))
        );
        // The same config without VMAC needs nothing of it.
        let plain = crate::config::load_str(
            Path::new("t.yaml"),
            &yaml.replace("vmac: true", "vmac: false"),
        )
        .unwrap();
        assert!(pod_presets(&plain.config).is_empty());
        // With an IPv6 VMAC too, IPv6 stays on: the IPv4 VMAC goes by addr_gen_mode instead.
        let dual = format!("{yaml}  - {{ name: r6, interface: vrrp0, vrid: 51, vmac: true, virtual_ips: [{{ address: \"fd24::fe/64\", interface: gw0 }}] }}\n");
        let dual = crate::config::load_str(Path::new("t.yaml"), &dual).unwrap();
        let p = pod_presets(&dual.config);
        assert!(
            p.iter()
                .all(|x| x.key != "net.ipv6.conf.default.disable_ipv6"),
            "{p:?}"
        );
        assert!(p
            .iter()
            .any(|x| x.key == "net.ipv6.conf.default.addr_gen_mode"));
    }

    #[test]
    fn egress_hashing_reports_whether_routers_agree() {
        let cfg = |mode: &str| {
            crate::config::load_str(
                Path::new("t.yaml"),
                &format!("gateways: {{ interface: eth1, addresses: 192.168.25.128, egress: {{ mode: {mode}, hash_seed: 7 }} }}\n"),
            )
            .unwrap()
            .config
        };
        let none = fake_proc(&[]);
        let h = egress_hashing(none.path(), &cfg("ecmp")).unwrap();
        assert!(!h.same_on_every_router && h.note.contains("6.11"), "{h:?}");
        let zero = fake_proc(&[(HASH_SEED, "0\n")]);
        let h = egress_hashing(zero.path(), &cfg("ecmp_resilient")).unwrap();
        assert!(
            !h.same_on_every_router && h.note.contains("ecmp-hash-seed"),
            "{h:?}"
        );
        let right = fake_proc(&[(HASH_SEED, "7\n")]);
        assert!(
            egress_hashing(right.path(), &cfg("ecmp"))
                .unwrap()
                .same_on_every_router
        );
        let h = egress_hashing(none.path(), &cfg("consistent")).unwrap();
        assert!(h.same_on_every_router, "{h:?}");
        let empty = crate::config::load_str(Path::new("t.yaml"), "").unwrap();
        assert!(egress_hashing(none.path(), &empty.config).is_none());
    }
}
