//! Secrets (gluetun passwords, API keys, TSIG keys): read from a file or an environment
//! variable when the config is loaded, held in memory, and never printed — `Debug` and
//! `Serialize` show `<redacted>` and where the secret came from, never its bytes.
//!
//! `Serialize` also shows a short fingerprint: a keyed hash whose key is random per process,
//! so it says nothing about the value to anyone outside the process, but two loads of the
//! same file compare equal and a rotated secret does not. The engines compare their config
//! sections as JSON to decide whether a reload restarts them; without the fingerprint a
//! secret rotated in place (a Kubernetes Secret update) would be ignored by SIGHUP.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where a secret was read from; safe to show in logs and /status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "file {}", p.display()),
            SecretSource::Env(v) => write!(f, "${{{v}}}"),
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    source: SecretSource,
}

impl Secret {
    pub fn new(value: String, source: SecretSource) -> Self {
        Self { value, source }
    }

    /// The secret itself, for the one place that sends it (an HTTP header, a TSIG key).
    pub fn expose(&self) -> &str {
        &self.value
    }

    pub fn source(&self) -> &SecretSource {
        &self.source
    }

    /// 32 bits of a hash keyed with this process's random key: equal for equal secrets
    /// within one process, meaningless outside it.
    fn fingerprint(&self) -> u32 {
        static KEY: OnceLock<RandomState> = OnceLock::new();
        let h = KEY.get_or_init(RandomState::new).hash_one(&self.value);
        (h >> 32) as u32
    }

    /// Reads a secret file. Trailing newlines are dropped: `echo secret > file` is the common
    /// way such files are made, and no gluetun password or API token ends in a newline.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let value = text.trim_end_matches(['\n', '\r']).to_owned();
                if value.is_empty() {
                    return Err(format!("secret file {} is empty", path.display()));
                }
                Ok(Self::new(value, SecretSource::File(path.to_path_buf())))
            }
            Err(e) => Err(format!("cannot read secret file {}: {e}", path.display())),
        }
    }

    /// Reads `${NAME}` from the environment.
    pub fn from_env_reference(reference: &str) -> Result<Self, String> {
        let name = reference
            .strip_prefix("${")
            .and_then(|r| r.strip_suffix('}'))
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .ok_or_else(|| {
                "secrets are not written in the config; expected an environment reference like \
                 ${GLUETUN_PASSWORD}, or use the matching `*_file` key"
                    .to_owned()
            })?;
        match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(Self::new(v, SecretSource::Env(name.to_owned()))),
            Ok(_) => Err(format!("environment variable {name} is empty")),
            Err(_) => Err(format!("environment variable {name} is not set")),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<redacted>, from {})", self.source)
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!(
            "<redacted> (from {}, fingerprint {:08x})",
            self.source,
            self.fingerprint()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_secret_serializes_differently() {
        let src = || SecretSource::File(PathBuf::from("/run/secrets/x"));
        let a = serde_json::to_string(&Secret::new("one".into(), src())).unwrap();
        let again = serde_json::to_string(&Secret::new("one".into(), src())).unwrap();
        let rotated = serde_json::to_string(&Secret::new("two".into(), src())).unwrap();
        assert_eq!(a, again);
        assert_ne!(a, rotated);
        assert!(!rotated.contains("two"), "{rotated}");
    }

    #[test]
    fn debug_and_serialize_never_show_the_value() {
        let s = Secret::new("hunter2".into(), SecretSource::Env("PW".into()));
        let dbg = format!("{s:?} {:#?}", s);
        assert!(!dbg.contains("hunter2"), "{dbg}");
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
        assert!(json.contains("${PW}"), "{json}");
    }

    #[test]
    fn env_reference_syntax_is_strict() {
        assert!(Secret::from_env_reference("plaintext").is_err());
        assert!(Secret::from_env_reference("${}").is_err());
        assert!(Secret::from_env_reference("${A B}").is_err());
    }
}
