//! docs/metrics.md keeps up with the VRRP metrics: every family `VrrpMetrics::register`
//! registers has a row with its type and labels (router/tests/docs.rs does the same for the
//! daemon's own registry, which does not hold these), and the row of the invalid-packet
//! counter names every `reason` the runner can count.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use prometheus_client::registry::Registry;
use vrrp::metrics::{InstanceLabel, ReasonLabels, StateLabels, EXTRA_INVALID_REASONS};
use vrrp::packet::DecodeError;
use vrrp::VrrpMetrics;

fn metrics_md() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn row<'a>(md: &'a str, metric: &str) -> Option<&'a str> {
    md.lines()
        .filter(|l| l.starts_with('|'))
        .find(|l| l.contains(&format!("`{metric}`")))
}

/// (name as served, type, label names) of every family, from the text exposition of a
/// registry where each family has one series.
fn families() -> Vec<(String, String, Vec<String>)> {
    let m = VrrpMetrics::new();
    let il = InstanceLabel {
        instance: "r".into(),
    };
    m.state
        .get_or_create(&StateLabels {
            instance: "r".into(),
            state: "master".into(),
        })
        .set(1);
    m.transitions.get_or_create(&il).inc();
    m.adverts_sent.get_or_create(&il).inc();
    m.adverts_received.get_or_create(&il).inc();
    m.invalid_packets
        .get_or_create(&ReasonLabels {
            instance: "r".into(),
            reason: "ttl".into(),
        })
        .inc();
    m.effective_priority.get_or_create(&il).set(100);
    m.last_transition.get_or_create(&il).set(1.0);
    let mut reg = Registry::default();
    m.register(&mut reg);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    let mut out: Vec<(String, String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let served = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            out.push((served, kind.to_owned(), Vec::new()));
        } else if let (false, Some((_, labels))) = (line.starts_with('#'), line.split_once('{')) {
            let names = labels
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()));
            if let Some(last) = out.last_mut() {
                last.2.extend(names);
            }
        }
    }
    out
}

#[test]
fn every_vrrp_metric_has_a_row_with_type_and_labels() {
    let md = metrics_md();
    let fams = families();
    assert!(fams.len() >= 7, "{fams:?}");
    let mut missing = Vec::new();
    for (name, kind, labels) in &fams {
        let Some(r) = row(&md, name) else {
            missing.push(format!("`{name}` ({kind}): no table row"));
            continue;
        };
        if !r.contains(kind.as_str()) {
            missing.push(format!("`{name}`: its row does not say `{kind}`"));
        }
        for l in labels {
            if !r.contains(&format!("`{l}`")) {
                missing.push(format!("`{name}`: its row does not name label `{l}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/metrics.md is behind vrrp/src/metrics.rs:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn every_invalid_packet_reason_is_documented() {
    let md = metrics_md();
    let r = row(&md, "vpn_router_vrrp_invalid_packets_total").expect("a row");
    let missing: Vec<&str> = DecodeError::REASONS
        .iter()
        .chain(EXTRA_INVALID_REASONS.iter())
        .copied()
        .filter(|reason| !r.contains(&format!("`{reason}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/metrics.md: reasons of vpn_router_vrrp_invalid_packets_total not listed: {missing:?}"
    );
}
