//! The sysctls egress needs: `net.ipv4.fib_multipath_hash_policy = 1` (hash on the L4 5-tuple)
//! and, when a seed is configured, `net.ipv4.fib_multipath_hash_seed` (Linux 6.11+), so every
//! router sends the same flow to the same gateway.
//!
//! Owns: the list and a small writer under /proc/sys (per network namespace: the caller's).
//! It must not decide when to apply them (the supervisor does, once at start and on reload).

use std::path::{Path, PathBuf};

use super::plan::EgressSettings;
use crate::error::SysctlError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    /// Dotted name, e.g. `net.ipv4.fib_multipath_hash_policy`.
    pub name: &'static str,
    pub value: String,
    /// First kernel that has it, for the error message when it is missing.
    pub since: &'static str,
}

pub fn desired_sysctls(settings: &EgressSettings) -> Vec<Sysctl> {
    let mut out = vec![Sysctl {
        name: "net.ipv4.fib_multipath_hash_policy",
        value: "1".into(),
        since: "4.12",
    }];
    if let Some(seed) = settings.hash_seed {
        // proc_douintvec takes decimal only.
        out.push(Sysctl {
            name: "net.ipv4.fib_multipath_hash_seed",
            value: seed.to_string(),
            since: "6.11",
        });
    }
    out
}

fn path_of(root: &Path, name: &str) -> PathBuf {
    root.join(name.replace('.', "/"))
}

/// Writes every sysctl under `/proc/sys`; returns one error per sysctl that could not be set
/// (a missing one names the kernel version it needs). The others are still written.
pub fn apply_sysctls(sysctls: &[Sysctl]) -> Vec<SysctlError> {
    apply_sysctls_at(Path::new("/proc/sys"), sysctls)
}

/// [`apply_sysctls`] under another root (tests).
pub fn apply_sysctls_at(root: &Path, sysctls: &[Sysctl]) -> Vec<SysctlError> {
    let kernel = std::fs::read_to_string(root.join("kernel/osrelease"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown kernel".to_owned());
    let mut errors = Vec::new();
    for s in sysctls {
        let path = path_of(root, s.name);
        if !path.exists() {
            errors.push(SysctlError::Missing {
                name: s.name.to_owned(),
                kernel: kernel.clone(),
                needs: s.since,
            });
            continue;
        }
        if let Ok(current) = std::fs::read_to_string(&path) {
            if current.trim() == s.value {
                continue;
            }
        }
        if let Err(source) = std::fs::write(&path, &s.value) {
            errors.push(SysctlError::Write {
                name: s.name.to_owned(),
                value: s.value.clone(),
                path: path.display().to_string(),
                source,
            });
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_only_when_configured() {
        let none = desired_sysctls(&EgressSettings::default());
        assert_eq!(none.len(), 1);
        let seeded = desired_sysctls(&EgressSettings {
            hash_seed: Some(0xdeadbeef),
            ..Default::default()
        });
        assert_eq!(seeded[1].name, "net.ipv4.fib_multipath_hash_seed");
        assert_eq!(seeded[1].value, "3735928559");
    }

    #[test]
    fn missing_sysctl_names_itself_and_the_kernel_it_needs() {
        let root = std::env::temp_dir().join(format!("grm-sysctl-{}", std::process::id()));
        std::fs::create_dir_all(root.join("net/ipv4")).unwrap();
        std::fs::create_dir_all(root.join("kernel")).unwrap();
        std::fs::write(root.join("kernel/osrelease"), "6.1.0-test\n").unwrap();
        std::fs::write(root.join("net/ipv4/fib_multipath_hash_policy"), "0\n").unwrap();
        let errors = apply_sysctls_at(
            &root,
            &desired_sysctls(&EgressSettings {
                hash_seed: Some(7),
                ..Default::default()
            }),
        );
        let policy =
            std::fs::read_to_string(root.join("net/ipv4/fib_multipath_hash_policy")).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(policy, "1");
        assert_eq!(errors.len(), 1);
        let text = errors[0].to_string();
        assert!(text.contains("net.ipv4.fib_multipath_hash_seed"), "{text}");
        assert!(
            text.contains("6.11") && text.contains("6.1.0-test"),
            "{text}"
        );
    }
}
