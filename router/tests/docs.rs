#![allow(clippy::unwrap_used)]
//! The documentation keeps up with the code: every config key the parser accepts is documented
//! under the heading of its section in docs/configuration.md, and every metric the router crate
//! registers has a row in docs/metrics.md with its type and labels.
//!
//! The key lists come from `vpn_router::config::key_sets()`, the same lists the parser checks
//! keys against; the metric names come from encoding a registry, so neither side is copied by
//! hand into this test.

use std::collections::BTreeSet;
use std::path::PathBuf;

use prometheus_client::registry::Registry;

fn doc(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Markdown split at headings: (heading line, text up to the next heading). Lines in fenced code
/// blocks are text, not headings (YAML comments start with `#` too).
fn sections(md: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![(String::new(), String::new())];
    let mut fenced = false;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && line.starts_with('#') {
            out.push((line.to_owned(), String::new()));
        } else if let Some(last) = out.last_mut() {
            last.1.push_str(line);
            last.1.push('\n');
        }
    }
    out
}

#[test]
fn every_config_key_is_documented_under_its_section() {
    let md = doc("configuration.md");
    let secs = sections(&md);
    let sets = vpn_router::config::key_sets();
    assert!(
        sets.len() > 10,
        "key_sets() lists only {} sections",
        sets.len()
    );
    let mut missing = Vec::new();
    for (path, keys) in sets {
        let tag = if path.is_empty() {
            "Top level".to_owned()
        } else {
            format!("`{path}`")
        };
        let Some((_, body)) = secs.iter().find(|(h, _)| h.contains(&tag)) else {
            missing.push(format!(
                "no heading naming {tag} (keys: {})",
                keys.join(", ")
            ));
            continue;
        };
        for key in *keys {
            if !body.contains(&format!("`{key}`")) {
                let shown = if path.is_empty() {
                    (*key).to_owned()
                } else {
                    format!("{path}.{key}")
                };
                missing.push(format!("`{shown}` under the heading {tag}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn every_accepted_key_appears_in_the_configuration_doc() {
    let md = doc("configuration.md");
    let keys: BTreeSet<&str> = vpn_router::config::all_keys().into_iter().collect();
    assert!(keys.contains("advert_interval") && keys.contains("key_secret_file"));
    let missing: Vec<&str> = keys
        .into_iter()
        .filter(|k| !md.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md never mentions: {}",
        missing.join(", ")
    );
}

/// One metric family of an OpenMetrics exposition: name, type and the label names its samples
/// carry.
#[derive(Debug)]
struct Family {
    name: String,
    kind: String,
    labels: BTreeSet<String>,
}

fn families(exposition: &str) -> Vec<Family> {
    let mut out: Vec<Family> = Vec::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            out.push(Family {
                name: name.to_owned(),
                kind: kind.to_owned(),
                labels: BTreeSet::new(),
            });
        } else if !line.starts_with('#') {
            if let (Some(f), Some((_, labels))) = (out.last_mut(), line.split_once('{')) {
                f.labels.extend(label_names(labels));
            }
        }
    }
    out
}

/// The label names of `a="x",b="y\"z"} 1`.
fn label_names(s: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = s;
    while let Some((name, after)) = rest.split_once("=\"") {
        names.push(name.trim_start_matches(',').to_owned());
        let mut escaped = false;
        let end = after
            .char_indices()
            .find(|&(_, c)| {
                let close = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                close
            })
            .map(|(i, _)| i)
            .unwrap();
        rest = &after[end + 1..];
        if rest.starts_with('}') {
            break;
        }
    }
    names
}

#[test]
fn label_names_reads_quoted_values() {
    assert_eq!(
        label_names(r#"a="x",b="y\"},c=",c="" } 1"#),
        vec!["a", "b", "c"]
    );
}

#[test]
fn every_router_metric_is_documented_with_type_and_labels() {
    let mut reg = Registry::default();
    vpn_router::metrics::DaemonMetrics::default().register(&mut reg);
    let text = vpn_router::metrics::encode(&reg).unwrap();
    let fams = families(&text);
    assert!(fams.len() >= 3, "expected the daemon's metrics in:\n{text}");
    let md = doc("metrics.md");
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
    let mut missing = Vec::new();
    for f in &fams {
        // The name as served by default (Prometheus text 0.0.4): counters carry `_total`.
        let served = if f.kind == "counter" {
            format!("{}_total", f.name)
        } else {
            f.name.clone()
        };
        let Some(row) = rows.iter().find(|r| r.contains(&format!("`{served}`"))) else {
            missing.push(format!("`{served}` ({}): no table row", f.kind));
            continue;
        };
        if !row.contains(&f.kind) {
            missing.push(format!("`{served}`: its row does not say `{}`", f.kind));
        }
        for l in &f.labels {
            if !row.contains(&format!("`{l}`")) {
                missing.push(format!("`{served}`: its row does not name label `{l}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/metrics.md is behind the code:\n  {}",
        missing.join("\n  ")
    );
}

/// The fenced YAML block right after the heading `heading` in `md`.
fn yaml_after(md: &str, heading: &str) -> String {
    let rest = &md[md
        .find(heading)
        .unwrap_or_else(|| panic!("no heading {heading:?}"))..];
    let start = rest
        .find("```yaml\n")
        .expect("a yaml block after the heading")
        + 8;
    let end = rest[start..].find("```").expect("the block's end");
    rest[start..start + end].to_owned()
}

/// deploy/base's router pod: its sysctls, and for each Multus interface the tuning plugin's
/// sysctls of its attachment (`IFNAME` replaced by the interface).
fn shipped_pod() -> (
    std::collections::BTreeMap<String, String>,
    std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
) {
    use serde_json::Value;
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/base");
    let read = |f: &str| std::fs::read_to_string(base.join(f)).unwrap();
    let d: Value = serde_saphyr::from_str(&read("router-deployment.yaml")).unwrap();
    let spec = &d["spec"]["template"];
    let sysctls = spec["spec"]["securityContext"]["sysctls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let nads: Vec<Value> = serde_saphyr::from_multiple(&read("networks.yaml")).unwrap();
    let mut interfaces = std::collections::BTreeMap::new();
    let annotation = spec["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"]
        .as_str()
        .unwrap();
    for item in annotation.split(',').map(str::trim) {
        let (net, ifname) = item.split_once('@').unwrap();
        let nad = nads
            .iter()
            .find(|n| n["metadata"]["name"] == net)
            .unwrap_or_else(|| panic!("no NAD {net}"));
        let cni: Value = serde_json::from_str(nad["spec"]["config"].as_str().unwrap()).unwrap();
        let mut tuning = std::collections::BTreeMap::new();
        for p in cni["plugins"].as_array().into_iter().flatten() {
            for (k, v) in p["sysctl"].as_object().into_iter().flatten() {
                tuning.insert(k.replace("IFNAME", ifname), v.as_str().unwrap().to_owned());
            }
        }
        interfaces.insert(ifname.to_owned(), tuning);
    }
    (sysctls, interfaces)
}

/// The README's minimal config runs in the shipped router pod: its interfaces are the pod's
/// attachments, every sysctl it needs preset (`vpn-router check-config --sysctls`) is set by
/// the pod spec or the attachment's tuning plugin, its secret is under the pod's mount.
#[test]
fn readme_config_becomes_ready_in_the_shipped_pod() {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let yaml = yaml_after(&readme, "## A minimal config");
    let dir = std::env::temp_dir().join(format!("vpn-router-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mount = "/run/secrets/vpn-router/";
    assert!(
        yaml.contains(mount),
        "the example's secrets are not under the pod's mount {mount}"
    );
    for line in yaml.lines().filter(|l| l.contains(mount)) {
        let file = line
            .split(mount)
            .nth(1)
            .unwrap()
            .split([' ', '}', ','])
            .next()
            .unwrap();
        std::fs::write(dir.join(file), "c2VjcmV0\n").unwrap();
    }
    let text = yaml.replace(mount, &format!("{}/", dir.display()));
    // The Deployment gives POD_IP from the downward API; this test is its only reader.
    std::env::set_var("POD_IP", "10.42.1.10");
    let loaded = vpn_router::config::load_str(&dir.join("config.yaml"), &text)
        .unwrap_or_else(|e| panic!("the README's config is invalid:\n{}", e.lines().join("\n")));
    let _ = std::fs::remove_dir_all(&dir);
    let (pod, attachments) = shipped_pod();
    let c = &loaded.config;
    let mut used: Vec<&str> = c.vrrp.iter().map(|v| v.interface.as_str()).collect();
    used.extend(
        c.vrrp
            .iter()
            .flat_map(|v| v.virtual_ips.iter().map(|x| x.interface.as_str())),
    );
    used.extend(c.gateways.iter().map(|g| g.interface.as_str()));
    for i in used {
        assert!(
            attachments.contains_key(i),
            "interface {i} is not one of the pod's attachments {:?}",
            attachments.keys()
        );
    }
    let presets = vpn_router::sysctl::pod_presets(c);
    assert!(!presets.is_empty());
    for p in presets.iter().filter(|p| p.required) {
        let have = match &p.scope {
            vpn_router::sysctl::Scope::Pod => pod.get(&p.key),
            vpn_router::sysctl::Scope::Interface(i) => {
                attachments.get(i).and_then(|t| t.get(&p.key))
            }
        };
        assert_eq!(
            have,
            Some(&p.value),
            "{} ({:?}) is not preset by the shipped pod: {}",
            p.key,
            p.scope,
            p.why
        );
    }
}
