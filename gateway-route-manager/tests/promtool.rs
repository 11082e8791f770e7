//! The metrics pass `promtool check metrics` (needs promtool, from the `prometheus` Debian
//! package). prometheus-client writes OpenMetrics; promtool reads the Prometheus text format,
//! so counters' HELP/TYPE get their `_total` name and `# EOF` goes, as the router's /metrics
//! conversion (`router::metrics::to_prometheus_text`) does.

// Test harness: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Stdio};

use gateway_route_manager::metrics::{
    CheckLabels, FailureLabels, GatewayLabels, Metrics, ObjectLabels,
};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

#[test]
fn promtool_accepts_the_metrics() {
    let metrics = Metrics::new();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let gw = GatewayLabels {
        gateway: "192.168.25.128".into(),
    };
    metrics.gateway_healthy.get_or_create(&gw).set(1);
    metrics.probe_rtt.get_or_create(&gw).set(0.0123);
    metrics.gateways_healthy.set(1);
    metrics.egress_reconcile_errors.inc();
    let failure = FailureLabels {
        gateway: "192.168.25.128".into(),
        reason: "timeout".into(),
    };
    metrics.check_failures.get_or_create(&failure).inc();
    metrics
        .check_duration
        .get_or_create(&CheckLabels {
            check: "probe".into(),
        })
        .observe(0.02);
    metrics
        .egress_changes
        .get_or_create(&ObjectLabels {
            object: "route".into(),
        })
        .inc();
    let mut text = String::new();
    encode(&mut text, &registry).unwrap();

    let text = to_prometheus_text(&text);
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool ({e}): apt-get install prometheus"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}\n{text}"
    );
}

fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::new();
    for line in openmetrics.lines().filter(|l| *l != "# EOF") {
        let mut line = line.to_owned();
        for c in &counters {
            for kind in ["# HELP ", "# TYPE "] {
                let prefix = format!("{kind}{c} ");
                if let Some(rest) = line.strip_prefix(&prefix) {
                    line = format!("{kind}{c}_total {rest}");
                }
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}
