//! Reads the shipped manifests the way `kubectl apply -k` would see them: a kustomization's
//! `resources` (files and nested kustomizations), its `namespace` and `images`, rendered into
//! plain objects. Only what deploy/ uses is rendered; any other kustomize feature is an error
//! that names it, so the kubelet-like test never runs something other than what users apply.
//!
//! YAML is read with Kubernetes' YAML 1.1 habits where they differ from YAML 1.2: an integer
//! with a leading zero is octal (`defaultMode: 0400` is 256), as kubectl reads it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::KubeError;

/// One rendered object.
#[derive(Debug, Clone)]
pub struct Object {
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub doc: Value,
    /// The file it came from.
    pub source: PathBuf,
}

impl Object {
    pub fn describe(&self) -> String {
        format!("{}/{} ({})", self.kind, self.name, self.source.display())
    }
}

/// Kinds without a namespace (the ones deploy/ ships).
const CLUSTER_SCOPED: &[&str] = &["Namespace"];

/// The keys of kustomization.yaml this renderer understands.
const KUSTOMIZATION_KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "components",
    "images",
];

fn bad(file: &Path, msg: impl Into<String>) -> KubeError {
    KubeError::Manifest {
        file: file.to_path_buf(),
        msg: msg.into(),
    }
}

/// Parses every YAML document of `text` (empty documents dropped).
pub fn parse_documents(file: &Path, text: &str) -> Result<Vec<Value>, KubeError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| bad(file, format!("invalid YAML: {e}")))?;
    Ok(docs
        .into_iter()
        .filter(|d| !d.is_null())
        .map(|d| octal_ints(d, text))
        .collect())
}

/// Kubernetes' YAML reads `0400` as octal. serde-saphyr (YAML 1.2) reads it as 400; this finds
/// such numbers by their spelling in the source and fixes the values where every spelling of
/// that number in the file is an octal one, so a decimal 400 elsewhere is never touched.
fn octal_ints(v: Value, text: &str) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let v = match &v {
                        // serde-saphyr hands a leading-zero integer over as a float.
                        Value::Number(n) => n
                            .as_u64()
                            .or_else(|| {
                                n.as_f64()
                                    .filter(|f| f.fract() == 0.0 && (0.0..1e15).contains(f))
                                    .map(|f| f as u64)
                            })
                            .and_then(|n| octal_spelling(&k, n, text))
                            .map_or(v, Value::from),
                        _ => octal_ints(v, text),
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(|x| octal_ints(x, text)).collect()),
        other => other,
    }
}

/// For `key: 0NNN` in `text` where NNN reads as the decimal `n`: the octal value.
fn octal_spelling(key: &str, n: u64, text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.trim_start().trim_start_matches("- ").strip_prefix(key)?;
        let val = rest.strip_prefix(':')?.split('#').next()?.trim();
        let octal =
            val.len() > 1 && val.starts_with('0') && val.bytes().all(|b| b.is_ascii_digit());
        if !octal || val.parse::<u64>().ok()? != n {
            return None;
        }
        u64::from_str_radix(&val[1..], 8).ok()
    })
}

/// Renders the kustomization in `dir` (and everything it includes).
pub fn render(dir: &Path) -> Result<Vec<Object>, KubeError> {
    let file = dir.join("kustomization.yaml");
    let text = std::fs::read_to_string(&file).map_err(|e| bad(&file, e.to_string()))?;
    let k = parse_documents(&file, &text)?
        .into_iter()
        .next()
        .ok_or_else(|| bad(&file, "empty kustomization"))?;
    let map = k.as_object().ok_or_else(|| bad(&file, "not a mapping"))?;
    for key in map.keys() {
        if !KUSTOMIZATION_KEYS.contains(&key.as_str()) {
            return Err(bad(
                &file,
                format!("`{key}` is not rendered by the kubelet-like test (tests/src/kube/manifests.rs); extend it"),
            ));
        }
    }
    let mut objects = Vec::new();
    for (list, want_kind) in [("resources", "Kustomization"), ("components", "Component")] {
        for entry in map
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let rel = entry
                .as_str()
                .ok_or_else(|| bad(&file, format!("{list}: {entry} is not a path")))?;
            let path = dir.join(rel);
            if path.is_dir() {
                check_kind(&path.join("kustomization.yaml"), want_kind)?;
                objects.extend(render(&path)?);
            } else {
                let t = std::fs::read_to_string(&path).map_err(|e| bad(&path, e.to_string()))?;
                for doc in parse_documents(&path, &t)? {
                    objects.push(object(&path, doc)?);
                }
            }
        }
    }
    if let Some(ns) = map.get("namespace").and_then(Value::as_str) {
        for o in &mut objects {
            if !CLUSTER_SCOPED.contains(&o.kind.as_str()) {
                o.namespace = ns.to_string();
                o.doc["metadata"]["namespace"] = Value::from(ns);
            }
        }
    }
    for image in map
        .get("images")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        set_image(&file, &mut objects, image)?;
    }
    Ok(objects)
}

fn check_kind(file: &Path, want: &str) -> Result<(), KubeError> {
    let text = std::fs::read_to_string(file).map_err(|e| bad(file, e.to_string()))?;
    let doc = parse_documents(file, &text)?
        .into_iter()
        .next()
        .unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or("");
    if kind != want {
        return Err(bad(file, format!("kind {kind:?} where a {want} belongs")));
    }
    Ok(())
}

fn object(file: &Path, doc: Value) -> Result<Object, KubeError> {
    let kind = doc["kind"]
        .as_str()
        .ok_or_else(|| bad(file, "a document without kind"))?
        .to_string();
    let name = doc["metadata"]["name"]
        .as_str()
        .ok_or_else(|| bad(file, format!("a {kind} without metadata.name")))?
        .to_string();
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    Ok(Object {
        kind,
        name,
        namespace,
        doc,
        source: file.to_path_buf(),
    })
}

/// kustomize's `images:` entry: `name` matched against each container's image without its
/// tag, replaced by `newName` and/or `newTag`.
fn set_image(file: &Path, objects: &mut [Object], entry: &Value) -> Result<(), KubeError> {
    let name = entry["name"]
        .as_str()
        .ok_or_else(|| bad(file, "images: an entry without name"))?;
    let new_name = entry["newName"].as_str();
    let new_tag = entry["newTag"].as_str();
    for o in objects.iter_mut() {
        let spec = &mut o.doc["spec"]["template"]["spec"];
        for list in ["containers", "initContainers"] {
            if let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) {
                for c in cs {
                    let Some(image) = c["image"].as_str() else {
                        continue;
                    };
                    let (base, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
                    if base == name {
                        let img =
                            format!("{}:{}", new_name.unwrap_or(base), new_tag.unwrap_or(tag));
                        c["image"] = Value::from(img);
                    }
                }
            }
        }
    }
    Ok(())
}

/// The one object of `kind` named `name` in `namespace`.
pub fn find<'a>(
    objects: &'a [Object],
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<&'a Object, KubeError> {
    objects
        .iter()
        .find(|o| o.kind == kind && o.name == name && o.namespace == namespace)
        .ok_or_else(|| KubeError::Missing {
            what: format!("{kind} {namespace}/{name}"),
        })
}

/// The data of a Secret (`data` base64-decoded, `stringData` as is) or a ConfigMap (`data`).
pub fn data(o: &Object) -> Result<Vec<(String, Vec<u8>)>, KubeError> {
    use base64::Engine as _;
    let mut out = Vec::new();
    if let Some(m) = o.doc["stringData"].as_object() {
        for (k, v) in m {
            out.push((
                k.clone(),
                v.as_str().unwrap_or_default().as_bytes().to_vec(),
            ));
        }
    }
    if let Some(m) = o.doc["data"].as_object() {
        for (k, v) in m {
            let s = v.as_str().unwrap_or_default();
            let bytes = if o.kind == "Secret" {
                base64::engine::general_purpose::STANDARD
                    .decode(s.trim())
                    .map_err(|e| {
                        bad(
                            &o.source,
                            format!("{}: data.{k} is not base64: {e}", o.describe()),
                        )
                    })?
            } else {
                s.as_bytes().to_vec()
            };
            out.push((k.clone(), bytes));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zero_ints_are_octal_as_in_kubernetes() {
        let t = "a:\n  defaultMode: 0400\n  port: 400\n  mode: 0644\nb: [1, 2]\n";
        let d = &parse_documents(Path::new("x.yaml"), t).unwrap()[0];
        assert_eq!(d["a"]["defaultMode"], 256);
        assert_eq!(d["a"]["mode"], 420);
        assert_eq!(d["a"]["port"], 400);
        assert_eq!(d["b"][1], 2);
    }

    #[test]
    fn multi_document_files_drop_empty_documents() {
        let t = "---\nkind: A\n---\n# nothing\n---\nkind: B\n";
        let d = parse_documents(Path::new("x.yaml"), t).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1]["kind"], "B");
    }

    #[test]
    fn shipped_overlay_renders_with_namespaces() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let objs = render(&deploy.join("overlays/example")).unwrap();
        let d = find(&objs, "Deployment", "vpn-gateway", "vpn-router").unwrap();
        assert!(d.doc["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .ends_with(":0.1.0"));
        let s = find(&objs, "Secret", "vpn-gateway", "vpn-router-secrets").unwrap();
        assert!(data(s).unwrap().iter().any(|(k, _)| k == "gluetun-api-key"));
        assert!(find(&objs, "Deployment", "vpn-clients", "egress-client").is_ok());
    }
}
