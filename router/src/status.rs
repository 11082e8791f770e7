//! What `/status`, `/readyz` and `vpn-router status` show: one entry per component with its
//! state, whether it has done its first reconcile, and a component-specific JSON detail.
//! Components write their own entry; the api only reads. Nothing here may hold a secret:
//! details are built from config types whose secrets serialize as `<redacted>`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentState {
    /// Configured and running.
    Running,
    /// Configured, but this build has no engine for it yet: parsed and validated only.
    NotBuilt,
    /// Running but its last reconcile failed; `detail.error` says why.
    Degraded,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComponentStatus {
    pub state: ComponentState,
    /// Has done its first reconcile (counts toward /readyz).
    pub ready: bool,
    pub detail: serde_json::Value,
}

/// The daemon-wide part of /status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub version: String,
    pub config_file: String,
    pub config_loaded_unix: f64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub last_reload_error: Option<Vec<String>>,
    /// Whether every router picks the same gateway for a flow (`None` without `gateways`).
    #[serde(default)]
    pub egress_hashing: Option<crate::sysctl::EgressHashing>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub daemon: DaemonStatus,
    pub ready: bool,
    pub components: BTreeMap<String, ComponentStatus>,
}

pub struct StatusBoard {
    daemon: RwLock<DaemonStatus>,
    components: RwLock<BTreeMap<String, ComponentStatus>>,
    /// Called before every report, by component: brings values that change too often to be
    /// pushed (the VRRP advert counters, 100 a second per instance) up to date on demand.
    refreshers: RwLock<BTreeMap<String, Refresher>>,
}

/// See [`StatusBoard::set_refresher`].
pub type Refresher = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let refreshers: Vec<String> = self
            .refreshers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        f.debug_struct("StatusBoard")
            .field("daemon", &self.daemon)
            .field("components", &self.components)
            .field("refreshers", &refreshers)
            .finish()
    }
}

impl StatusBoard {
    pub fn new(config_file: String, loaded_unix: f64) -> Arc<Self> {
        Arc::new(Self {
            daemon: RwLock::new(DaemonStatus {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                config_file,
                config_loaded_unix: loaded_unix,
                reloads_ok: 0,
                reloads_failed: 0,
                last_reload_error: None,
                egress_hashing: None,
            }),
            components: RwLock::new(BTreeMap::new()),
            refreshers: RwLock::new(BTreeMap::new()),
        })
    }

    /// Makes every report first call `refresh`, which updates component `name`'s entry with
    /// [`Self::set`] (it must not call `report` or `set_refresher`). Replaces an earlier one.
    pub fn set_refresher(&self, name: &str, refresh: Refresher) {
        let mut r = self.refreshers.write().unwrap_or_else(|p| p.into_inner());
        r.insert(name.to_owned(), refresh);
    }

    pub fn set(&self, name: &str, status: ComponentStatus) {
        let mut c = self.components.write().unwrap_or_else(|p| p.into_inner());
        c.insert(name.to_owned(), status);
    }

    pub fn remove(&self, name: &str) {
        let mut c = self.components.write().unwrap_or_else(|p| p.into_inner());
        c.remove(name);
    }

    pub fn update_daemon(&self, f: impl FnOnce(&mut DaemonStatus)) {
        let mut d = self.daemon.write().unwrap_or_else(|p| p.into_inner());
        f(&mut d);
    }

    /// Ready once every running component has done its first reconcile. Components this
    /// build cannot run do not hold readiness back; they are listed as `not_built`.
    pub fn report(&self) -> StatusReport {
        for refresh in self
            .refreshers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            refresh();
        }
        let components = self
            .components
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let ready = components
            .values()
            .all(|c| c.ready || c.state == ComponentState::NotBuilt);
        StatusReport {
            daemon: self
                .daemon
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            ready,
            components,
        }
    }
}

/// Renders a report for a human at a terminal (`vpn-router status`).
pub fn render(report: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let d = &report.daemon;
    let _ = writeln!(out, "vpn-router {}  config {}", d.version, d.config_file);
    let _ = writeln!(
        out,
        "ready: {}   reloads: {} ok, {} failed",
        if report.ready { "yes" } else { "no" },
        d.reloads_ok,
        d.reloads_failed
    );
    if let Some(h) = &d.egress_hashing {
        let _ = writeln!(
            out,
            "egress hashing ({}): {}: {}",
            h.mode,
            if h.same_on_every_router {
                "the same on every router"
            } else {
                "routers may disagree"
            },
            h.note
        );
    }
    if let Some(errs) = &d.last_reload_error {
        let _ = writeln!(out, "last reload was rejected:");
        for e in errs {
            let _ = writeln!(out, "  {e}");
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<16} {:<10} {:<6}", "COMPONENT", "STATE", "READY");
    for (name, c) in &report.components {
        let state = match c.state {
            ComponentState::Running => "running",
            ComponentState::NotBuilt => "not built",
            ComponentState::Degraded => "degraded",
        };
        let _ = writeln!(
            out,
            "{name:<16} {state:<10} {:<6}",
            if c.ready { "yes" } else { "no" }
        );
    }
    for (name, c) in &report.components {
        if c.detail.is_null() {
            continue;
        }
        let _ = writeln!(out, "\n[{name}]");
        render_value(&mut out, &c.detail, 1);
    }
    out
}

fn render_value(out: &mut String, v: &serde_json::Value, depth: usize) {
    use std::fmt::Write as _;
    let pad = "  ".repeat(depth);
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map {
                if val.is_object()
                    || (val.is_array()
                        && val
                            .as_array()
                            .is_some_and(|a| a.iter().any(|x| x.is_object())))
                {
                    let _ = writeln!(out, "{pad}{k}:");
                    render_value(out, val, depth + 1);
                } else {
                    let _ = writeln!(out, "{pad}{k}: {}", scalar(val));
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                if item.is_object() {
                    let _ = writeln!(out, "{pad}-");
                    render_value(out, item, depth + 1);
                } else {
                    let _ = writeln!(out, "{pad}- {}", scalar(item));
                }
            }
        }
        other => {
            let _ = writeln!(out, "{pad}{}", scalar(other));
        }
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => items.iter().map(scalar).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn refreshers_update_their_entry_before_each_report() {
        let board = StatusBoard::new("cfg.yaml".into(), 0.0);
        let reads = Arc::new(AtomicU64::new(0));
        let (b, r) = (Arc::downgrade(&board), reads.clone());
        board.set_refresher(
            "c",
            Box::new(move || {
                let n = r.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(b) = b.upgrade() {
                    b.set(
                        "c",
                        ComponentStatus {
                            state: ComponentState::Running,
                            ready: true,
                            detail: serde_json::json!({ "n": n }),
                        },
                    );
                }
            }),
        );
        assert_eq!(board.report().components["c"].detail["n"], 1);
        assert_eq!(board.report().components["c"].detail["n"], 2);
        assert_eq!(reads.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn not_built_components_do_not_hold_readiness_back() {
        let b = StatusBoard::new("c.yaml".into(), 0.0);
        b.set(
            "vrrp",
            ComponentStatus {
                state: ComponentState::NotBuilt,
                ready: false,
                detail: serde_json::Value::Null,
            },
        );
        assert!(b.report().ready);
        b.set(
            "egress",
            ComponentStatus {
                state: ComponentState::Running,
                ready: false,
                detail: serde_json::Value::Null,
            },
        );
        assert!(!b.report().ready);
        b.set(
            "egress",
            ComponentStatus {
                state: ComponentState::Running,
                ready: true,
                detail: serde_json::json!({"a": 1}),
            },
        );
        let r = b.report();
        assert!(r.ready);
        let text = render(&r);
        assert!(text.contains("egress") && text.contains("a: 1"), "{text}");
    }
}
