//! The daemon's own metrics (build info, config reloads) and the one registry every engine
//! registers into. Names carry the `vpn_router_` prefix themselves, so engine crates register
//! full names and the registry adds nothing.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub rustc: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `failure`.
    pub result: &'static str,
}

/// The supervisor's metrics; engines register theirs next to these.
#[derive(Debug, Default)]
pub struct DaemonMetrics {
    pub build_info: Family<BuildLabels, Gauge>,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub last_reload_success: Gauge<f64, AtomicU64>,
}

impl DaemonMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vpn_router_build_info",
            "Build information; the value is always 1",
            self.build_info.clone(),
        );
        registry.register(
            "vpn_router_config_reloads",
            "Config reloads (SIGHUP) by result; a failed reload keeps the running config",
            self.config_reloads.clone(),
        );
        registry.register(
            "vpn_router_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load (start or reload)",
            self.last_reload_success.clone(),
        );
        self.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                rustc: option_env!("VPN_ROUTER_RUSTC")
                    .unwrap_or("unknown")
                    .to_owned(),
            })
            .set(1);
        // Both series exist from the start, so a rate() over them works before the first reload.
        self.config_reloads
            .get_or_create(&ReloadLabels { result: "success" })
            .inc_by(0);
        self.config_reloads
            .get_or_create(&ReloadLabels { result: "failure" })
            .inc_by(0);
    }
}

/// The text exposition (OpenMetrics) of a registry.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The same samples in the Prometheus text format 0.0.4, for scrapers and tools (promtool,
/// curl users) that do not ask for OpenMetrics: counter families are named with their
/// `_total` suffix, `info`/`unit` metadata is folded away, and there is no `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if counters.contains(name) {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            let tail = if *prefix == "# TYPE " && tail == "info" {
                "gauge"
            } else {
                tail
            };
            Some(format!("{prefix}{name} {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_with_total_and_drops_eof() {
        let om = "# HELP x_reloads Reloads.\n# TYPE x_reloads counter\nx_reloads_total{r=\"a\"} 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n# EOF\n";
        let p = to_prometheus_text(om);
        assert_eq!(p, "# HELP x_reloads_total Reloads.\n# TYPE x_reloads_total counter\nx_reloads_total{r=\"a\"} 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n");
    }
}
