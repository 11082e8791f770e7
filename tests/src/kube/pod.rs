//! A pod template as the kubelet and a CRI runtime run it, translated to one `podman run`:
//! container args and env (the downward API's fieldRefs resolved), ConfigMap and Secret
//! volumes written the way the kubelet's atomic writer lays them out and mounted at their
//! mountPaths, the container and pod securityContext (capabilities, no_new_privs, read-only
//! root, user, seccomp, sysctls), the memory limit, and the probes (run by
//! [`super::kubelet::Prober`]). The network namespace is the pod sandbox made by the caller.
//!
//! Every field of the spec is either translated, listed in [`PodPlan::not_honoured`] with the
//! reason (scheduling, registry), or refused with an error naming it: a spec that this does not
//! understand never runs as something else.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::manifests::{self, Object};
use super::KubeError;

/// What the pod needs from its surroundings.
#[derive(Debug, Clone)]
pub struct PodContext {
    pub pod_name: String,
    pub namespace: String,
    pub node_name: String,
    pub host_ip: Ipv4Addr,
    pub pod_ip: Ipv4Addr,
    /// The sandbox's network namespace (`/run/netns/...`).
    pub netns_path: PathBuf,
    /// The image to run instead of the spec's (which names a registry).
    pub image: String,
    /// Where volumes are written.
    pub volume_dir: PathBuf,
    pub log_path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "liveness",
            ProbeKind::Readiness => "readiness",
            ProbeKind::Startup => "startup",
        }
    }
}

/// A probe with Kubernetes' defaults filled in.
#[derive(Debug, Clone)]
pub struct Probe {
    pub kind: ProbeKind,
    /// `httpGet`: path, and port on the pod IP.
    pub path: String,
    pub port: u16,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// One container's `podman run`, and what the pod spec asks of the run.
#[derive(Debug, Clone)]
pub struct PodPlan {
    /// The podman container's name.
    pub container: String,
    /// `podman` arguments, `run` first.
    pub podman_run: Vec<String>,
    pub probes: Vec<Probe>,
    pub termination_grace: Duration,
    /// Parts of the spec this run does not carry out, each with why.
    pub not_honoured: Vec<String>,
}

fn unsupported(what: impl Into<String>) -> KubeError {
    KubeError::Unsupported { what: what.into() }
}

fn secs(v: &Value, default: u64) -> Duration {
    Duration::from_secs(v.as_u64().unwrap_or(default))
}

/// A Kubernetes memory quantity in bytes (`128Mi`, `1G`, `500000`).
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let units: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (u, m) in units {
        if let Some(n) = q.strip_suffix(u) {
            return n.parse::<u64>().ok()?.checked_mul(m);
        }
    }
    q.parse().ok()
}

/// Translates the pod template of `workload` (a Deployment or StatefulSet) for one pod.
pub fn plan(workload: &Object, objects: &[Object], ctx: &PodContext) -> Result<PodPlan, KubeError> {
    let template = &workload.doc["spec"]["template"];
    let spec = &template["spec"];
    let mut not_honoured = Vec::new();
    let mut args: Vec<String> = vec!["run".into(), "--detach".into()];
    let container_name = ctx.pod_name.clone();
    args.extend([
        "--name".into(),
        container_name.clone(),
        "--hostname".into(),
        ctx.pod_name.clone(),
        "--network".into(),
        format!("ns:{}", ctx.netns_path.display()),
        "--log-driver".into(),
        "k8s-file".into(),
        "--log-opt".into(),
        format!("path={}", ctx.log_path.display()),
    ]);

    for (key, why) in [
        (
            "nodeSelector",
            "scheduling: every pod runs on this one node",
        ),
        ("tolerations", "scheduling: every pod runs on this one node"),
        ("affinity", "scheduling: every pod runs on this one node"),
    ] {
        if spec.get(key).is_some() {
            not_honoured.push(format!("spec.{key} ({why})"));
        }
    }
    if spec["initContainers"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        return Err(unsupported("initContainers"));
    }
    if spec["automountServiceAccountToken"] != Value::Bool(false) {
        not_honoured.push("the service account token mount (no API server here)".into());
    }
    if spec["enableServiceLinks"] != Value::Bool(false) {
        not_honoured.push("service link environment variables (no Services here)".into());
    }
    if spec.get("hostNetwork").is_some() || spec.get("hostPID").is_some() {
        return Err(unsupported("hostNetwork/hostPID"));
    }
    not_honoured
        .push("dnsPolicy: the container gets podman's resolv.conf (no cluster DNS here)".into());
    let grace = secs(&spec["terminationGracePeriodSeconds"], 30);

    let psc = &spec["securityContext"];
    for s in psc["sysctls"].as_array().into_iter().flatten() {
        let (Some(n), Some(v)) = (s["name"].as_str(), s["value"].as_str()) else {
            return Err(unsupported(format!("sysctl entry {s}")));
        };
        args.push(format!("--sysctl={n}={v}"));
    }
    match psc["seccompProfile"]["type"].as_str() {
        None | Some("RuntimeDefault") => {}
        Some("Unconfined") => args.push("--security-opt=seccomp=unconfined".into()),
        Some(other) => return Err(unsupported(format!("seccompProfile {other}"))),
    }

    let containers = spec["containers"]
        .as_array()
        .ok_or_else(|| unsupported("a pod without containers"))?;
    if containers.len() != 1 {
        return Err(unsupported("pods with more than one container"));
    }
    let c = &containers[0];
    for (key, why) in [
        (
            "image",
            "the image under test replaces the spec's registry image",
        ),
        ("imagePullPolicy", "the image is local"),
    ] {
        if c.get(key).is_some() {
            not_honoured.push(format!("containers[0].{key} ({why}): {}", c[key]));
        }
    }
    if c.get("lifecycle").is_some() || c.get("envFrom").is_some() || c.get("workingDir").is_some() {
        return Err(unsupported("container lifecycle/envFrom/workingDir"));
    }
    if let Some(req) = c["resources"].get("requests") {
        not_honoured.push(format!("resources.requests {req} (scheduling only)"));
    }
    if let Some(mem) = c["resources"]["limits"]["memory"].as_str() {
        let b = quantity_bytes(mem).ok_or_else(|| unsupported(format!("memory limit {mem}")))?;
        args.push(format!("--memory={b}"));
    }
    if c["resources"]["limits"].get("cpu").is_some() {
        return Err(unsupported("CPU limits"));
    }

    let csc = &c["securityContext"];
    if csc["privileged"] == Value::Bool(true) {
        args.push("--privileged".into());
    }
    let caps = &csc["capabilities"];
    for d in caps["drop"].as_array().into_iter().flatten() {
        args.push(format!(
            "--cap-drop={}",
            d.as_str().unwrap_or_default().to_lowercase()
        ));
    }
    for a in caps["add"].as_array().into_iter().flatten() {
        args.push(format!("--cap-add={}", a.as_str().unwrap_or_default()));
    }
    if csc["allowPrivilegeEscalation"] == Value::Bool(false) {
        args.push("--security-opt=no-new-privileges".into());
    }
    if csc["readOnlyRootFilesystem"] == Value::Bool(true) {
        // The kubelet adds no tmpfs; podman's --read-only would add some unless told not to.
        args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    let user = csc["runAsUser"].as_u64().or(psc["runAsUser"].as_u64());
    let non_root = csc["runAsNonRoot"]
        .as_bool()
        .or(psc["runAsNonRoot"].as_bool());
    if non_root == Some(true) && user.unwrap_or(0) == 0 {
        return Err(unsupported(
            "runAsNonRoot with user 0: the kubelet refuses to start it",
        ));
    }
    if let Some(u) = user {
        args.push(format!("--user={u}"));
    }
    match csc["seccompProfile"]["type"].as_str() {
        None | Some("RuntimeDefault") => {}
        Some("Unconfined") => args.push("--security-opt=seccomp=unconfined".into()),
        Some(other) => return Err(unsupported(format!("seccompProfile {other}"))),
    }

    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"]
            .as_str()
            .ok_or_else(|| unsupported(format!("env {e}")))?;
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match path {
                "status.podIP" => ctx.pod_ip.to_string(),
                "status.hostIP" => ctx.host_ip.to_string(),
                "metadata.name" => ctx.pod_name.clone(),
                "metadata.namespace" => ctx.namespace.clone(),
                "spec.nodeName" => ctx.node_name.clone(),
                other => return Err(unsupported(format!("env {name}: fieldRef {other}"))),
            }
        } else {
            return Err(unsupported(format!("env {name}: {e}")));
        };
        args.push(format!("--env={name}={value}"));
    }

    let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or_default();
        let mount = m["mountPath"]
            .as_str()
            .ok_or_else(|| unsupported(format!("volumeMount {m} without mountPath")))?;
        if m.get("subPath").is_some() {
            return Err(unsupported("subPath mounts"));
        }
        let v = volumes
            .iter()
            .find(|v| v["name"] == name)
            .ok_or_else(|| unsupported(format!("volumeMount {name}: no such volume")))?;
        let dir = write_volume(v, objects, &ctx.namespace, &ctx.volume_dir.join(name))?;
        let ro = if m["readOnly"] == Value::Bool(true) {
            "ro"
        } else {
            "rw"
        };
        args.push(format!("--volume={}:{mount}:{ro}", dir.display()));
    }

    let ports: Vec<(String, u16)> = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["name"].as_str().unwrap_or_default().to_string(),
                u16::try_from(p["containerPort"].as_u64()?).ok()?,
            ))
        })
        .collect();
    let mut probes = Vec::new();
    for (key, kind) in [
        ("livenessProbe", ProbeKind::Liveness),
        ("readinessProbe", ProbeKind::Readiness),
        ("startupProbe", ProbeKind::Startup),
    ] {
        let p = &c[key];
        if p.is_null() {
            continue;
        }
        let get = &p["httpGet"];
        if get.is_null() {
            return Err(unsupported(format!("{key} without httpGet")));
        }
        if get.get("host").is_some() || get["scheme"].as_str().is_some_and(|s| s != "HTTP") {
            return Err(unsupported(format!("{key}: host or scheme")));
        }
        let port = match &get["port"] {
            Value::String(n) => ports
                .iter()
                .find(|(pn, _)| pn == n)
                .map(|(_, p)| *p)
                .ok_or_else(|| unsupported(format!("{key}: no container port named {n}")))?,
            v => v
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| unsupported(format!("{key}: port {v}")))?,
        };
        probes.push(Probe {
            kind,
            path: get["path"].as_str().unwrap_or("/").to_string(),
            port,
            initial_delay: secs(&p["initialDelaySeconds"], 0),
            period: secs(&p["periodSeconds"], 10),
            timeout: secs(&p["timeoutSeconds"], 1),
            success_threshold: u32::try_from(p["successThreshold"].as_u64().unwrap_or(1))
                .unwrap_or(1),
            failure_threshold: u32::try_from(p["failureThreshold"].as_u64().unwrap_or(3))
                .unwrap_or(3),
        });
    }

    if let Some(cmd) = c["command"].as_array() {
        let first = cmd.first().and_then(Value::as_str).unwrap_or_default();
        args.push(format!("--entrypoint={first}"));
        args.push(ctx.image.clone());
        args.extend(
            cmd.iter()
                .skip(1)
                .filter_map(|x| x.as_str().map(String::from)),
        );
    } else {
        args.push(ctx.image.clone());
    }
    args.extend(
        c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from)),
    );
    Ok(PodPlan {
        container: container_name,
        podman_run: args,
        probes,
        termination_grace: grace,
        not_honoured,
    })
}

/// Writes a configMap or secret volume as the kubelet's atomic writer does: the files in a
/// timestamped directory, `..data` pointing at it, and each key a symlink through `..data`
/// (so an update swaps one symlink). Returns the volume's directory.
fn write_volume(
    v: &Value,
    objects: &[Object],
    namespace: &str,
    dir: &Path,
) -> Result<PathBuf, KubeError> {
    let (kind, name, default_mode) = if let Some(cm) = v.get("configMap") {
        (
            "ConfigMap",
            cm["name"].as_str(),
            cm["defaultMode"].as_u64().unwrap_or(0o644),
        )
    } else if let Some(s) = v.get("secret") {
        (
            "Secret",
            s["secretName"].as_str(),
            s["defaultMode"].as_u64().unwrap_or(0o644),
        )
    } else {
        return Err(unsupported(format!(
            "volume {}: only configMap and secret volumes",
            v["name"]
        )));
    };
    let src = v
        .get("configMap")
        .or(v.get("secret"))
        .cloned()
        .unwrap_or_default();
    if src.get("items").is_some() || src.get("optional").is_some() {
        return Err(unsupported("volume items/optional"));
    }
    let name = name.ok_or_else(|| unsupported(format!("{kind} volume without a name")))?;
    let obj = manifests::find(objects, kind, namespace, name)?;
    let io = |e: std::io::Error| KubeError::Io {
        what: format!("write volume {}", dir.display()),
        source: e,
    };
    let stamp = dir.join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir_all(&stamp).map_err(io)?;
    let mode = u32::try_from(default_mode).unwrap_or(0o644);
    for (key, bytes) in manifests::data(obj)? {
        let f = stamp.join(&key);
        std::fs::write(&f, bytes).map_err(io)?;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).map_err(io)?;
        std::os::unix::fs::symlink(Path::new("..data").join(&key), dir.join(&key)).map_err(io)?;
    }
    std::os::unix::fs::symlink(stamp.file_name().unwrap_or_default(), dir.join("..data"))
        .map_err(io)?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("128Mi"), Some(128 << 20));
        assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("4096"), Some(4096));
        assert_eq!(quantity_bytes("12x"), None);
    }

    #[test]
    fn shipped_router_pod_translates() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let objs = manifests::render(&deploy.join("overlays/example")).unwrap();
        let d = manifests::find(&objs, "Deployment", "vpn-gateway", "vpn-router").unwrap();
        let tmp = std::env::temp_dir().join(format!("kube-plan-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let ctx = PodContext {
            pod_name: "vpn-router-abc".into(),
            namespace: "vpn-gateway".into(),
            node_name: "node".into(),
            host_ip: Ipv4Addr::new(10, 42, 0, 1),
            pod_ip: Ipv4Addr::new(10, 42, 1, 7),
            netns_path: "/run/netns/x".into(),
            image: "localhost/vpn-router:dev".into(),
            volume_dir: tmp.clone(),
            log_path: tmp.join("log"),
        };
        let p = plan(d, &objs, &ctx).unwrap();
        let has = |a: &str| p.podman_run.iter().any(|x| x == a);
        assert!(has("--cap-drop=all") && has("--cap-add=NET_ADMIN") && has("--cap-add=NET_RAW"));
        assert!(has("--read-only") && has("--security-opt=no-new-privileges"));
        assert!(has("--env=POD_IP=10.42.1.7"), "{:?}", p.podman_run);
        assert!(has("--sysctl=net.ipv4.ip_forward=1"));
        assert!(p
            .podman_run
            .iter()
            .any(|x| x.ends_with(":/etc/vpn-router:ro")));
        assert_eq!(
            p.podman_run.last().map(String::as_str),
            Some("/etc/vpn-router/config.yaml")
        );
        assert!(p
            .probes
            .iter()
            .any(|x| x.kind == ProbeKind::Readiness && x.port == 9090));
        let secret = std::fs::metadata(tmp.join("secrets/..data/gluetun-api-key")).unwrap();
        assert_eq!(secret.permissions().mode() & 0o777, 0o400);
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
