//! The lab's gateway as the shipped gluetun pod is, not as we would like it to be.
//!
//! Real gluetun (v3.41, `internal/firewall/`, `internal/routing/`, `internal/wireguard/` in its
//! source) sets INPUT, OUTPUT and FORWARD to DROP for IPv4 and IPv6 and accepts loopback,
//! replies (INPUT/OUTPUT only), its local networks (the on-link main-table routes of every
//! Ethernet link), the ports it is told to open, output to the VPN server and into the
//! tunnel, and then the lines of `/iptables/post-rules.txt`. It accepts nothing forwarded and
//! translates no address. Its routing sends its local networks to the main table (rule 98),
//! its own eth0 address out of eth0 (rule 100) and everything else into the tunnel (rule 101,
//! table 51820). The tunnel is `tun0` (the image's `VPN_INTERFACE`, WireGuard included), MTU
//! 1320 (`WIREGUARD_MTU`).
//!
//! This module builds exactly that in a lab gateway namespace, in gluetun's order, from the
//! pod of `deploy/examples/gateways/` as rendered from the manifests: the init containers'
//! commands and env, the ConfigMap files they mount, the gluetun container's env (its image
//! defaults, the `gluetun-vpn` Secret, its own `env`), its postStart hook and its port
//! forwarding commands. Nothing of the example is copied here: break the example and the lab
//! gateway breaks the same way.
//!
//! What the lab cannot run is the tunnel itself (no WireGuard module on the lab machine): a
//! veth named like gluetun's interface, with its MTU and address, leads to a per-gateway
//! "provider" namespace that plays the VPN server (proxy ARP for everything, masquerade to the
//! gateway's public IP, DNAT of the ports the provider forwards to the tunnel address). Paths
//! under the pod's volume mounts (in the commands and env values) are mapped to the lab's copy
//! of the volumes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::kube::manifests::{self, Object};
use crate::kube::{cni, KubeError};
use crate::netns::{Netns, NetnsError};

/// The gateways' manifests: the example overlay (gateways, their Secret, the routers' config).
pub const DEPLOY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
/// The overlay the lab renders (as `kubectl apply -k` would).
pub const OVERLAY: &str = "overlays/example";
/// The gateway workload in it.
const STATEFULSET: (&str, &str) = ("vpn-gateway", "vpn-gateway");

/// gluetun's image defaults that the lab's gateway depends on (its Dockerfile's `ENV`, v3.41.3).
pub const IMAGE_DEFAULTS: &[(&str, &str)] = &[
    ("VPN_INTERFACE", "tun0"),
    ("WIREGUARD_MTU", "1320"),
    ("HEALTH_SERVER_ADDRESS", "127.0.0.1:9999"),
    ("HTTP_CONTROL_SERVER_ADDRESS", ":8000"),
    ("FIREWALL_INPUT_PORTS", ""),
    ("FIREWALL_VPN_INPUT_PORTS", ""),
    ("FIREWALL_OUTBOUND_SUBNETS", ""),
    ("VPN_PORT_FORWARDING", "off"),
    ("VPN_PORT_FORWARDING_UP_COMMAND", ""),
    ("VPN_PORT_FORWARDING_DOWN_COMMAND", ""),
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
];
/// gluetun's WireGuard firewall mark, routing table and rule (`not fwmark 51820 lookup 51820`).
pub const WG_MARK: u32 = 51820;
const WG_RULE_PRIORITY: u32 = 101;
/// The file gluetun reads its extra iptables rules from (hard-coded in gluetun).
pub const POST_RULES_PATH: &str = "/iptables/post-rules.txt";
/// The line prefixes gluetun runs from the post-rules file (every other line is skipped).
const POST_RULE_PREFIXES: &[(&str, bool)] = &[
    ("iptables ", false),
    ("iptables-nft ", false),
    ("iptables-legacy ", false),
    ("ip6tables ", true),
    ("ip6tables-nft ", true),
    ("ip6tables-legacy ", true),
];

fn unsupported(what: impl Into<String>) -> KubeError {
    KubeError::Unsupported { what: what.into() }
}

/// One container of the gateway pod, as the lab runs it.
#[derive(Debug, Clone)]
pub struct Container {
    pub name: String,
    /// `command` + `args` (the image's entrypoint is never needed here).
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// (mountPath, volume name)
    mounts: Vec<(String, String)>,
    /// `lifecycle.postStart.exec.command`
    pub post_start: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
enum Volume {
    /// ConfigMap or Secret: (path in the volume, content)
    Files(Vec<(String, Vec<u8>)>),
    Empty,
}

/// The gateway pod of the example, read from the manifests.
#[derive(Debug, Clone)]
pub struct GatewayPodSpec {
    /// The Multus name of the VPN gateway network's interface in the pod (`...@vpn-gw-veth0`).
    pub gateway_interface: String,
    /// Pod-level sysctls (`securityContext.sysctls`).
    pub sysctls: Vec<(String, String)>,
    pub init: Vec<Container>,
    /// The gluetun container, env = image defaults < Secret `envFrom` < `env`.
    pub gluetun: Container,
    volumes: BTreeMap<String, Volume>,
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect()
}

impl GatewayPodSpec {
    /// Renders `deploy/overlays/example` and reads the gateway pod from it.
    pub fn load() -> Result<Self, KubeError> {
        let objects = manifests::render(&Path::new(DEPLOY_DIR).join(OVERLAY))?;
        Self::from_objects(&objects)
    }

    pub fn from_objects(objects: &[Object]) -> Result<Self, KubeError> {
        let sts = manifests::find(objects, "StatefulSet", STATEFULSET.0, STATEFULSET.1)?;
        let tpl = &sts.doc["spec"]["template"];
        let spec = &tpl["spec"];
        let annotation = tpl["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"]
            .as_str()
            .ok_or_else(|| unsupported("a gateway pod without a Multus attachment"))?;
        let atts = cni::multus_annotation(annotation, &sts.namespace)?;
        let [att] = atts.as_slice() else {
            return Err(unsupported(format!(
                "a gateway pod with {} attachments (the lab wires one: the VPN gateway network)",
                atts.len()
            )));
        };
        let sysctls = spec["securityContext"]["sysctls"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s["name"].as_str().unwrap_or_default().to_owned(),
                    s["value"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let mut volumes = BTreeMap::new();
        for v in spec["volumes"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            let vol = if v.get("emptyDir").is_some() {
                Volume::Empty
            } else if let Some(cm) = v["configMap"]["name"].as_str() {
                let o = manifests::find(objects, "ConfigMap", &sts.namespace, cm)?;
                Volume::Files(volume_files(o, &v["configMap"]["items"])?)
            } else if let Some(s) = v["secret"]["secretName"].as_str() {
                let o = manifests::find(objects, "Secret", &sts.namespace, s)?;
                Volume::Files(volume_files(o, &v["secret"]["items"])?)
            } else {
                return Err(unsupported(format!("gateway volume {v}")));
            };
            volumes.insert(name, vol);
        }
        let init = spec["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| container(objects, &sts.namespace, c, &[]))
            .collect::<Result<Vec<_>, _>>()?;
        let gluetun = spec["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "gluetun")
            .ok_or_else(|| KubeError::Missing {
                what: "the gluetun container of StatefulSet vpn-gateway".into(),
            })?;
        let gluetun = container(objects, &sts.namespace, gluetun, IMAGE_DEFAULTS)?;
        Ok(Self {
            gateway_interface: att.interface.clone(),
            sysctls,
            init,
            gluetun,
            volumes,
        })
    }

    /// An init container's env value (the first init container that sets `key`).
    pub fn init_env(&self, key: &str) -> Option<String> {
        self.init.iter().find_map(|c| c.env.get(key).cloned())
    }

    /// A gluetun setting (after defaults, Secret and env).
    pub fn env(&self, key: &str) -> &str {
        self.gluetun.env.get(key).map(String::as_str).unwrap_or("")
    }

    /// The content of the file at `path` inside container `c` (through its volume mounts).
    pub fn file(&self, c: &Container, path: &str) -> Option<String> {
        let (mount, vol) = c
            .mounts
            .iter()
            .filter(|(m, _)| under(path, m).is_some())
            .max_by_key(|(m, _)| m.len())?;
        let rel = under(path, mount)?;
        match self.volumes.get(vol)? {
            Volume::Files(files) => files
                .iter()
                .find(|(p, _)| p == rel)
                .map(|(_, b)| String::from_utf8_lossy(b).into_owned()),
            Volume::Empty => None,
        }
    }

    /// gluetun's post-rules file, if the gluetun container mounts one.
    pub fn post_rules(&self) -> Option<String> {
        self.file(&self.gluetun, POST_RULES_PATH)
    }

    /// The example with the post-rules lines that `drop` picks removed (tests that break it on
    /// purpose); false when gluetun mounts no post-rules file.
    pub fn drop_post_rules(&mut self, drop: impl Fn(&str) -> bool) -> bool {
        let gluetun = self.gluetun.clone();
        self.edit_file(&gluetun, POST_RULES_PATH, |t| {
            t.lines()
                .filter(|l| !drop(l))
                .map(|l| format!("{l}\n"))
                .collect()
        })
    }

    /// Changes one file of a ConfigMap/Secret volume (tests that break the example on purpose).
    pub fn edit_file(&mut self, c: &Container, path: &str, f: impl FnOnce(&str) -> String) -> bool {
        let Some((mount, vol)) = c
            .mounts
            .iter()
            .filter(|(m, _)| under(path, m).is_some())
            .max_by_key(|(m, _)| m.len())
            .cloned()
        else {
            return false;
        };
        let Some(rel) = under(path, &mount).map(str::to_owned) else {
            return false;
        };
        match self.volumes.get_mut(&vol) {
            Some(Volume::Files(files)) => match files.iter_mut().find(|(p, _)| *p == rel) {
                Some((_, b)) => {
                    *b = f(&String::from_utf8_lossy(b)).into_bytes();
                    true
                }
                None => false,
            },
            _ => false,
        }
    }

    /// Writes every volume under `dir/<volume>/` (the pod's filesystem view, for `map_path`).
    pub fn write_volumes(&self, dir: &Path) -> Result<(), std::io::Error> {
        for (name, vol) in &self.volumes {
            let root = dir.join(name);
            std::fs::create_dir_all(&root)?;
            if let Volume::Files(files) = vol {
                for (rel, content) in files {
                    let p = root.join(rel);
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::write(&p, content)?;
                }
            }
        }
        Ok(())
    }

    /// A path as container `c` sees it, mapped to the lab's copy of its volume under `dir`
    /// (other strings unchanged).
    pub fn map_path(&self, c: &Container, dir: &Path, s: &str) -> String {
        c.mounts
            .iter()
            .filter_map(|(m, vol)| under(s, m).map(|rel| (m.len(), vol, rel)))
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, vol, rel)| {
                let base = dir.join(vol);
                if rel.is_empty() {
                    base.display().to_string()
                } else {
                    base.join(rel).display().to_string()
                }
            })
            .unwrap_or_else(|| s.to_owned())
    }

    /// Container `c`'s env with its paths mapped (see `map_path`).
    pub fn mapped_env(&self, c: &Container, dir: &Path) -> BTreeMap<String, String> {
        c.env
            .iter()
            .map(|(k, v)| (k.clone(), self.map_path(c, dir, v)))
            .collect()
    }
}

/// `path` relative to `mount` when it lies under it ("" for the mount point itself).
fn under<'a>(path: &'a str, mount: &str) -> Option<&'a str> {
    let mount = mount.trim_end_matches('/');
    let rest = path.strip_prefix(mount)?;
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix('/')
    }
}

fn volume_files(o: &Object, items: &Value) -> Result<Vec<(String, Vec<u8>)>, KubeError> {
    let data = manifests::data(o)?;
    let Some(items) = items.as_array() else {
        return Ok(data);
    };
    items
        .iter()
        .map(|it| {
            let key = it["key"].as_str().unwrap_or_default();
            let path = it["path"].as_str().unwrap_or(key);
            data.iter()
                .find(|(k, _)| k == key)
                .map(|(_, b)| (path.to_owned(), b.clone()))
                .ok_or_else(|| KubeError::Missing {
                    what: format!("key {key} of {}", o.describe()),
                })
        })
        .collect()
}

fn container(
    objects: &[Object],
    namespace: &str,
    c: &Value,
    defaults: &[(&str, &str)],
) -> Result<Container, KubeError> {
    let name = c["name"].as_str().unwrap_or_default().to_owned();
    let mut env: BTreeMap<String, String> = defaults
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| IMAGE_DEFAULTS[IMAGE_DEFAULTS.len() - 1].1.to_owned());
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let (kind, src) = if let Some(s) = from["secretRef"]["name"].as_str() {
            ("Secret", s)
        } else if let Some(s) = from["configMapRef"]["name"].as_str() {
            ("ConfigMap", s)
        } else {
            return Err(unsupported(format!("{name}: envFrom {from}")));
        };
        let o = manifests::find(objects, kind, namespace, src)?;
        for (k, v) in manifests::data(o)? {
            env.insert(k, String::from_utf8_lossy(&v).into_owned());
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let k = e["name"].as_str().unwrap_or_default();
        let v = e["value"]
            .as_str()
            .ok_or_else(|| unsupported(format!("{name}: env {k} without a plain value")))?;
        env.insert(k.to_owned(), v.to_owned());
    }
    let mut argv = str_list(&c["command"]);
    argv.extend(str_list(&c["args"]));
    let mounts = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap_or_default().to_owned(),
                m["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let post_start = c["lifecycle"]["postStart"]["exec"]["command"]
        .as_array()
        .map(|_| str_list(&c["lifecycle"]["postStart"]["exec"]["command"]));
    Ok(Container {
        name,
        argv,
        env,
        mounts,
        post_start,
    })
}

// ---------------------------------------------------------------------------------------------
// gluetun's firewall and routing, as plans of commands (pure, unit-tested)

/// One command gluetun runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `iptables ARGS` (or `ip6tables` when `v6`).
    Iptables { v6: bool, args: Vec<String> },
    /// `ip ARGS`
    Ip(Vec<String>),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Iptables { v6, args } => {
                write!(
                    f,
                    "{} {}",
                    if *v6 { "ip6tables" } else { "iptables" },
                    args.join(" ")
                )
            }
            Step::Ip(args) => write!(f, "ip {}", args.join(" ")),
        }
    }
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}
fn v4(s: &str) -> Step {
    Step::Iptables {
        v6: false,
        args: words(s),
    }
}
fn v6(s: &str) -> Step {
    Step::Iptables {
        v6: true,
        args: words(s),
    }
}
/// gluetun's "mixed" instruction: iptables, then ip6tables.
fn mixed(s: &str) -> [Step; 2] {
    [v4(s), v6(s)]
}
fn ip(s: &str) -> Step {
    Step::Ip(words(s))
}

/// A local network as gluetun finds it (`internal/routing/local.go`): a main-table route
/// without gateway on an Ethernet link, with the link's first address of that family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNetwork {
    pub net: String,
    pub interface: String,
    pub ip: IpAddr,
}

/// A default route of the main table (`internal/routing/default.go`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultRoute {
    pub interface: String,
    pub gateway: Ipv4Addr,
    pub ip: Ipv4Addr,
}

/// What gluetun reads from the namespace at start.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    pub local: Vec<LocalNetwork>,
    pub defaults: Vec<DefaultRoute>,
    /// "IPv6 supported" in v3.41: any non-loopback IPv6 route.
    pub ipv6: bool,
}

fn ports(s: &str) -> Vec<u16> {
    s.split(',').filter_map(|p| p.trim().parse().ok()).collect()
}

/// Steps 1-10 of gluetun's `enable()`, before the post-rules.
pub fn enable_plan(d: &Discovered) -> Vec<Step> {
    let mut s = vec![
        v4("--policy INPUT DROP"),
        v4("--policy OUTPUT DROP"),
        v4("--policy FORWARD DROP"),
        v6("--policy INPUT DROP"),
        v6("--policy OUTPUT DROP"),
        v6("--policy FORWARD DROP"),
    ];
    s.extend(mixed("--append INPUT -i lo -j ACCEPT"));
    s.extend(mixed("--append OUTPUT -o lo -j ACCEPT"));
    s.extend(mixed(
        "--append OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    ));
    s.extend(mixed(
        "--append INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    ));
    let mut seen = Vec::new();
    for n in &d.local {
        let rule = format!(
            "--append OUTPUT -o {} -s {} -d {} -j ACCEPT",
            n.interface, n.ip, n.net
        );
        s.push(if n.ip.is_ipv4() { v4(&rule) } else { v6(&rule) });
        if !seen.contains(&n.interface) {
            seen.push(n.interface.clone());
            s.push(v6(&format!(
                "--append OUTPUT -o {} -d ff02::1:ff00:0/104 -j ACCEPT",
                n.interface
            )));
        }
    }
    // Outbound subnets are set later (main.go), not here. Input ports too.
    for n in &d.local {
        let rule = format!("--append INPUT -i {} -d {} -j ACCEPT", n.interface, n.net);
        s.push(if n.ip.is_ipv4() { v4(&rule) } else { v6(&rule) });
    }
    s
}

/// The post-rules gluetun runs: each line starting with an iptables binary name, prefix
/// stripped, split on whitespace (no shell, no quotes). Other lines are skipped silently.
pub fn post_rules_plan(text: &str) -> Vec<Step> {
    text.split('\n')
        .filter_map(|line| {
            POST_RULE_PREFIXES.iter().find_map(|(p, is6)| {
                line.strip_prefix(p).map(|rest| Step::Iptables {
                    v6: *is6,
                    args: words(rest),
                })
            })
        })
        .collect()
}

/// What `main.go` does after the firewall: the inbound route (rule 100), outbound subnets
/// (rule 99 and OUTPUT), local rules (98), `FIREWALL_INPUT_PORTS` on the default interfaces.
pub fn routing_plan(d: &Discovered, env: &BTreeMap<String, String>) -> Vec<Step> {
    let get = |k: &str| env.get(k).map(String::as_str).unwrap_or("");
    let mut s = Vec::new();
    for r in &d.defaults {
        s.push(ip(&format!(
            "route replace default via {} dev {} table 200",
            r.gateway, r.interface
        )));
        s.push(ip(&format!(
            "rule add from {}/32 lookup 200 priority 100",
            r.ip
        )));
    }
    let subnets: Vec<&str> = get("FIREWALL_OUTBOUND_SUBNETS")
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .collect();
    for sub in &subnets {
        for r in &d.defaults {
            s.push(v4(&format!(
                "--append OUTPUT -o {} -s {} -d {sub} -j ACCEPT",
                r.interface, r.ip
            )));
        }
    }
    for sub in &subnets {
        for r in d.defaults.iter().take(1) {
            s.push(ip(&format!(
                "route replace {sub} via {} dev {} table 199",
                r.gateway, r.interface
            )));
            s.push(ip(&format!("rule add to {sub} lookup 199 priority 99")));
        }
    }
    // addIPRule skips a rule that exists (two links on one subnet, e.g. fe80::/64).
    let mut rules: Vec<Step> = Vec::new();
    for n in &d.local {
        let fam = if n.ip.is_ipv4() { "-4" } else { "-6" };
        let r = ip(&format!(
            "{fam} rule add to {} lookup main priority 98",
            n.net
        ));
        if !rules.contains(&r) {
            rules.push(r);
        }
    }
    s.extend(rules);
    let mut opened: Vec<(u16, String)> = Vec::new();
    for p in ports(get("FIREWALL_INPUT_PORTS")) {
        for r in &d.defaults {
            if opened.contains(&(p, r.interface.clone())) {
                continue;
            }
            opened.push((p, r.interface.clone()));
            s.extend(allow_port_steps(p, &r.interface, "--append"));
        }
    }
    s
}

/// `SetAllowedPort` / `RemoveAllowedPort` on one interface (tcp then udp, v4 then v6).
pub fn allow_port_steps(port: u16, interface: &str, op: &str) -> Vec<Step> {
    let mut s = Vec::new();
    for proto in ["tcp", "udp"] {
        s.extend(mixed(&format!(
            "{op} INPUT -i {interface} -p {proto} -m {proto} --dport {port} -j ACCEPT"
        )));
    }
    s
}

/// The VPN connection's rules (`SetVPNConnection`), before the tunnel exists.
pub fn vpn_connection_plan(
    d: &Discovered,
    env: &BTreeMap<String, String>,
    endpoint: (Ipv4Addr, u16),
) -> Vec<Step> {
    let tun = env
        .get("VPN_INTERFACE")
        .map(String::as_str)
        .unwrap_or("tun0");
    let mut s: Vec<Step> = d
        .defaults
        .iter()
        .map(|r| {
            v4(&format!(
                "--append OUTPUT -d {} -o {} -p udp -m udp --dport {} -j ACCEPT",
                endpoint.0, r.interface, endpoint.1
            ))
        })
        .collect();
    s.extend(mixed(&format!("--append OUTPUT -o {tun} -j ACCEPT")));
    s
}

/// The tunnel's routes and rules (WireGuard setup, tunnel interface up), then
/// `FIREWALL_VPN_INPUT_PORTS` on the tunnel.
pub fn tunnel_plan(d: &Discovered, env: &BTreeMap<String, String>) -> Vec<Step> {
    let tun = env
        .get("VPN_INTERFACE")
        .map(String::as_str)
        .unwrap_or("tun0");
    let mut s = vec![ip(&format!(
        "route add 0.0.0.0/0 dev {tun} table {WG_MARK}"
    ))];
    if d.ipv6 {
        s.push(ip(&format!("-6 route add ::/0 dev {tun} table {WG_MARK}")));
        s.push(ip(&format!(
            "-6 rule add not fwmark {WG_MARK} table {WG_MARK} priority {WG_RULE_PRIORITY}"
        )));
    }
    s.push(ip(&format!(
        "rule add not fwmark {WG_MARK} table {WG_MARK} priority {WG_RULE_PRIORITY}"
    )));
    for p in ports(
        env.get("FIREWALL_VPN_INPUT_PORTS")
            .map(String::as_str)
            .unwrap_or(""),
    ) {
        s.extend(allow_port_steps(p, tun, "--append"));
    }
    s
}

/// gluetun's command splitting for the port-forwarding commands (`internal/command/split.go`):
/// words on space, tab and newline; single quotes literal; double quotes with `\` escaping
/// `$`, `` ` ``, `"`, `\` and newline; a backslash outside quotes escapes the next character.
pub fn split_command(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(x) => cur.push(x),
                        None => return Err(format!("unterminated single quote in {s:?}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(x @ ('$' | '`' | '"' | '\\')) => cur.push(x),
                            Some('\n') => {}
                            Some(x) => {
                                cur.push('\\');
                                cur.push(x);
                            }
                            None => return Err(format!("unterminated double quote in {s:?}")),
                        },
                        Some(x) => cur.push(x),
                        None => return Err(format!("unterminated double quote in {s:?}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') => {}
                    Some(x) => cur.push(x),
                    None => return Err(format!("trailing backslash in {s:?}")),
                }
            }
            x => {
                in_word = true;
                cur.push(x);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// A port-forwarding command template with gluetun's placeholders filled in.
pub fn pf_command(template: &str, ports: &[u16], vpn_interface: &str) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    template
        .replace("{{PORTS}}", &list.join(","))
        .replace("{{PORT}}", list.first().map(String::as_str).unwrap_or(""))
        .replace("{{VPN_INTERFACE}}", vpn_interface)
}

// ---------------------------------------------------------------------------------------------
// discovery and execution in a namespace

/// gluetun's view of the namespace at start: local networks, default routes, IPv6.
pub fn discover(ns: &Netns) -> Result<Discovered, NetnsError> {
    let links: Value = serde_json::from_str(&ns.ip(&["-j", "link", "show"])?).unwrap_or_default();
    let ether: Vec<String> = links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["link_type"] == "ether")
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect();
    let addrs: Value = serde_json::from_str(&ns.ip(&["-j", "addr", "show"])?).unwrap_or_default();
    let first_addr = |ifname: &str, family: &str| -> Option<IpAddr> {
        addrs.as_array()?.iter().find(|l| l["ifname"] == ifname)?["addr_info"]
            .as_array()?
            .iter()
            .find(|a| a["family"] == family)?["local"]
            .as_str()?
            .parse()
            .ok()
    };
    let mut d = Discovered::default();
    for (fam, family) in [("-4", "inet"), ("-6", "inet6")] {
        let routes: Value =
            serde_json::from_str(&ns.ip(&[fam, "-j", "route", "show", "table", "main"])?)
                .unwrap_or_default();
        for r in routes.as_array().into_iter().flatten() {
            let dev = r["dev"].as_str().unwrap_or_default();
            if fam == "-6" && dev != "lo" {
                d.ipv6 = true;
            }
            let dst = r["dst"].as_str().unwrap_or_default();
            if dst == "default" {
                if let (Some(gw), Some(IpAddr::V4(a))) = (
                    r["gateway"].as_str().and_then(|g| g.parse().ok()),
                    first_addr(dev, family),
                ) {
                    d.defaults.push(DefaultRoute {
                        interface: dev.to_owned(),
                        gateway: gw,
                        ip: a,
                    });
                }
                continue;
            }
            if r.get("gateway").is_some() || !ether.iter().any(|e| e == dev) {
                continue;
            }
            let net = if dst.contains('/') {
                dst.to_owned()
            } else if fam == "-4" {
                format!("{dst}/32")
            } else {
                format!("{dst}/128")
            };
            if let Some(a) = first_addr(dev, family) {
                d.local.push(LocalNetwork {
                    net,
                    interface: dev.to_owned(),
                    ip: a,
                });
            }
        }
    }
    Ok(d)
}

/// Runs `program args` in `ns` with exactly `env`, without a shell; Ok(stdout+stderr) or the
/// failure with its output.
pub fn run_in_ns(
    ns: &Netns,
    program: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
) -> Result<String, String> {
    let program = program.to_owned();
    let args = args.to_vec();
    let env = env.clone();
    let desc = format!("{program} {}", args.join(" "));
    let out = ns
        .run_in(move || {
            Command::new(&program)
                .args(&args)
                .env_clear()
                .envs(&env)
                .stdin(Stdio::null())
                .output()
        })
        .map_err(|e| format!("{desc}: {e}"))?
        .map_err(|e| format!("{desc}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{desc}: {} {}", out.status, text.trim()))
    }
}

/// Runs the steps in order; stops at the first failure (gluetun exits then).
pub fn run_steps(ns: &Netns, steps: &[Step], log: &mut Vec<String>) -> Result<(), String> {
    let env: BTreeMap<String, String> = [(
        "PATH".to_owned(),
        IMAGE_DEFAULTS[IMAGE_DEFAULTS.len() - 1].1.to_owned(),
    )]
    .into();
    for st in steps {
        log.push(st.to_string());
        let r = match st {
            Step::Iptables { v6, args } => {
                run_in_ns(ns, if *v6 { "ip6tables" } else { "iptables" }, args, &env)
            }
            Step::Ip(args) => run_in_ns(ns, "ip", args, &env),
        };
        r.map_err(|e| format!("command failed: \"{st}\": {e}"))?;
    }
    Ok(())
}

/// The tunnel the lab gives a gateway instead of WireGuard: a veth pair created in the
/// provider namespace as `<VPN_INTERFACE>` + `<VPN_INTERFACE>p`; `start` moves the first into
/// the gateway when gluetun would bring its tunnel up.
#[derive(Debug, Clone)]
pub struct Tunnel {
    /// The VPN server's side.
    pub provider: Netns,
    /// The VPN server's endpoint (gluetun's OUTPUT rule towards it).
    pub endpoint: (Ipv4Addr, u16),
}

/// The tunnel address gluetun gets (`WIREGUARD_ADDRESSES`, first IPv4).
pub fn tunnel_address(spec: &GatewayPodSpec) -> Result<Ipv4Addr, KubeError> {
    let a = spec.env("WIREGUARD_ADDRESSES");
    a.split(',')
        .filter_map(|x| x.trim().split('/').next()?.parse::<Ipv4Addr>().ok())
        .next()
        .ok_or_else(|| unsupported(format!("WIREGUARD_ADDRESSES {a:?} without an IPv4 address")))
}

/// One gateway pod running in a lab namespace: what was done, for its log and for errors.
#[derive(Debug)]
pub struct PodRun {
    pub spec: GatewayPodSpec,
    pub dir: PathBuf,
    pub log: Vec<String>,
}

impl PodRun {
    /// Starts the pod in `ns` the way the kubelet and gluetun would, up to "tunnel up":
    /// sysctls, volumes, init containers (with `init_env` overriding their env), the gluetun
    /// container's postStart hook, then gluetun: firewall, post-rules, routing, VPN
    /// connection, tunnel. A failure is what would make the pod fail (an init container
    /// exiting non-zero, gluetun exiting on a post-rule), with everything run so far.
    pub fn start(
        spec: GatewayPodSpec,
        ns: &Netns,
        tunnel: &Tunnel,
        dir: &Path,
        init_env: &[(String, String)],
    ) -> Result<PodRun, String> {
        let mut run = PodRun {
            spec,
            dir: dir.to_path_buf(),
            log: Vec::new(),
        };
        run.start_inner(ns, tunnel, init_env).map_err(|e| {
            format!(
                "gateway pod in {}: {e}\n  what ran:\n    {}",
                ns.name(),
                run.log.join("\n    ")
            )
        })?;
        Ok(run)
    }

    fn start_inner(
        &mut self,
        ns: &Netns,
        tunnel: &Tunnel,
        init_env: &[(String, String)],
    ) -> Result<(), String> {
        for (k, v) in &self.spec.sysctls {
            ns.sysctl(k, v).map_err(|e| e.to_string())?;
            self.log.push(format!("sysctl {k}={v}"));
        }
        self.spec
            .write_volumes(&self.dir)
            .map_err(|e| format!("write the pod's volumes to {}: {e}", self.dir.display()))?;
        for c in self.spec.init.clone() {
            let mut env = self.spec.mapped_env(&c, &self.dir);
            for (k, v) in init_env {
                env.insert(k.clone(), v.clone());
            }
            let argv: Vec<String> = c
                .argv
                .iter()
                .map(|a| self.spec.map_path(&c, &self.dir, a))
                .collect();
            let (prog, args) = argv
                .split_first()
                .ok_or_else(|| format!("init container {} has no command", c.name))?;
            self.log
                .push(format!("init container {}: {}", c.name, argv.join(" ")));
            let out = run_in_ns(ns, prog, args, &env)
                .map_err(|e| format!("init container {} failed: {e}", c.name))?;
            self.log
                .extend(out.lines().map(|l| format!("  {}: {l}", c.name)));
        }
        let g = self.spec.gluetun.clone();
        let env = self.spec.mapped_env(&g, &self.dir);
        // The kubelet runs postStart right after the container starts: long before gluetun
        // has its tunnel (seconds later), so it runs first here.
        if let Some(hook) = &g.post_start {
            let argv: Vec<String> = hook
                .iter()
                .map(|a| self.spec.map_path(&g, &self.dir, a))
                .collect();
            if let Some((prog, args)) = argv.split_first() {
                self.log.push(format!("postStart: {}", argv.join(" ")));
                run_in_ns(ns, prog, args, &env)
                    .map_err(|e| format!("postStart hook failed: {e}"))?;
            }
        }
        let d = discover(ns).map_err(|e| e.to_string())?;
        if d.defaults.is_empty() {
            return Err("gluetun: no default route in the main table (it exits)".into());
        }
        run_steps(ns, &enable_plan(&d), &mut self.log)?;
        if let Some(text) = self.spec.post_rules() {
            run_steps(ns, &post_rules_plan(&text), &mut self.log)
                .map_err(|e| format!("running user defined post firewall rules: {e}"))?;
        }
        run_steps(ns, &routing_plan(&d, &env), &mut self.log)?;
        run_steps(
            ns,
            &vpn_connection_plan(&d, &env, tunnel.endpoint),
            &mut self.log,
        )?;
        let tun = self.spec.env("VPN_INTERFACE").to_owned();
        let mtu = self.spec.env("WIREGUARD_MTU").to_owned();
        let addr = tunnel_address(&self.spec).map_err(|e| e.to_string())?;
        tunnel
            .provider
            .ip(&["link", "set", &tun, "netns", ns.name()])
            .map_err(|e| e.to_string())?;
        let up = [
            format!("addr add {addr}/32 dev {tun}"),
            format!("link set {tun} mtu {mtu} up"),
        ];
        self.log.extend(up.iter().map(|l| format!("ip {l}")));
        ns.ip_batch(&up).map_err(|e| e.to_string())?;
        run_steps(ns, &tunnel_plan(&d, &env), &mut self.log)?;
        Ok(())
    }

    /// gluetun's port forwarding when the provider's ports change from `old` to `new`: the
    /// DOWN command with the old ports and their INPUT rules removed, then the new ports'
    /// INPUT rules on the tunnel and the UP command (both run as gluetun runs them: placeholders
    /// filled in, split without a shell, gluetun's env).
    pub fn forward_ports(&mut self, ns: &Netns, old: &[u16], new: &[u16]) -> Result<(), String> {
        let g = self.spec.gluetun.clone();
        let env = self.spec.mapped_env(&g, &self.dir);
        let tun = self.spec.env("VPN_INTERFACE").to_owned();
        if !old.is_empty() {
            self.pf_command(ns, "VPN_PORT_FORWARDING_DOWN_COMMAND", old, &env)?;
            for p in old {
                run_steps(ns, &allow_port_steps(*p, &tun, "--delete"), &mut self.log)?;
            }
        }
        if !new.is_empty() {
            for p in new {
                run_steps(ns, &allow_port_steps(*p, &tun, "--append"), &mut self.log)?;
            }
            self.pf_command(ns, "VPN_PORT_FORWARDING_UP_COMMAND", new, &env)?;
        }
        Ok(())
    }

    fn pf_command(
        &mut self,
        ns: &Netns,
        key: &str,
        ports: &[u16],
        env: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let template = self.spec.env(key).to_owned();
        if template.trim().is_empty() {
            return Ok(());
        }
        let g = self.spec.gluetun.clone();
        let line = pf_command(&template, ports, self.spec.env("VPN_INTERFACE"));
        let argv: Vec<String> = split_command(&line)?
            .iter()
            .map(|a| self.spec.map_path(&g, &self.dir, a))
            .collect();
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| format!("{key} is empty after splitting"))?;
        self.log.push(format!("{key}: {line}"));
        let out = run_in_ns(ns, prog, args, env).map_err(|e| format!("{key} failed: {e}"))?;
        self.log
            .extend(out.lines().map(|l| format!("  port forwarding: {l}")));
        Ok(())
    }
}

/// The provider's name for its end of the tunnel.
pub fn provider_if(tun: &str) -> String {
    format!("{tun}p")
}

/// The VPN provider of a gluetun pod, in `provider` (whose `wan0` is already on the
/// Internet): the public address and default route, the tunnel's veth pair (its near end
/// waits here until `PodRun::start` moves it into the pod), proxy ARP on the far end (the
/// pod routes everything `dev tun0`, without a next hop, as over WireGuard), the route to the
/// tunnel address, and nft: masquerade out of `wan0`, an `egress` counter, a `tunnel` chain
/// (the lab fills it to kill the tunnel) and the `forwarded` port set (`provider_forward`).
pub fn wire_provider(
    provider: &Netns,
    spec: &GatewayPodSpec,
    public: Ipv4Addr,
    prefix_len: u8,
    internet_gateway: Ipv4Addr,
) -> Result<(), String> {
    let tun = spec.env("VPN_INTERFACE").to_owned();
    let tunp = provider_if(&tun);
    let mtu = spec.env("WIREGUARD_MTU").to_owned();
    let addr = tunnel_address(spec).map_err(|e| e.to_string())?;
    let e = |e: NetnsError| e.to_string();
    provider
        .ip_batch(&[
            format!("link add {tun} mtu {mtu} type veth peer name {tunp} mtu {mtu}"),
            format!("addr add {public}/{prefix_len} dev wan0"),
            "link set wan0 up".into(),
            format!("link set {tunp} up"),
            format!("route add {addr}/32 dev {tunp}"),
            format!("route add default via {internet_gateway} dev wan0"),
        ])
        .map_err(e)?;
    provider.sysctl("net.ipv4.ip_forward", "1").map_err(e)?;
    provider
        .sysctl(&format!("net.ipv4.conf.{tunp}.proxy_arp"), "1")
        .map_err(e)?;
    provider
        .sysctl(&format!("net.ipv4.neigh.{tunp}.proxy_delay"), "0")
        .map_err(e)?;
    provider.nft(&provider_nft(&tunp, addr)).map_err(e)
}

/// The VPN provider of a gluetun gateway: what leaves the tunnel goes out of `wan0`
/// masqueraded to the gateway's public IP (an `egress` counter of it, a `tunnel` chain that
/// `set_tunnel_dead` fills), and the ports in the `forwarded` set come in to the tunnel
/// address (tcp and udp, port unchanged) as a provider's port forwarding does.
pub fn provider_nft(tunp: &str, tunnel_addr: Ipv4Addr) -> String {
    format!(
        r#"table ip lab {{
  counter egress {{ }}
  set forwarded {{ type inet_service; }}
  chain tunnel {{
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    jump tunnel
    iifname "{tunp}" oifname "wan0" counter name "egress"
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    iifname "wan0" meta l4proto {{ tcp, udp }} th dport @forwarded dnat to {tunnel_addr}
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    oifname "wan0" masquerade
  }}
}}
"#
    )
}

/// The provider forwards `new` (tcp and udp) to the tunnel address instead of `old`.
pub fn provider_forward(provider: &Netns, old: &[u16], new: &[u16]) -> Result<(), NetnsError> {
    let mut cmds = String::new();
    if !old.is_empty() {
        let list: Vec<String> = old.iter().map(u16::to_string).collect();
        cmds.push_str(&format!(
            "delete element ip lab forwarded {{ {} }}\n",
            list.join(", ")
        ));
    }
    if !new.is_empty() {
        let list: Vec<String> = new.iter().map(u16::to_string).collect();
        cmds.push_str(&format!(
            "add element ip lab forwarded {{ {} }}\n",
            list.join(", ")
        ));
    }
    if !cmds.is_empty() {
        provider.nft(&cmds)?;
    }
    Ok(())
}

/// Where the lab keeps a gateway pod's volumes.
pub fn volumes_dir(lab_dir: &Path, gateway: usize) -> PathBuf {
    lab_dir.join(format!("gw{gateway}-pod"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GatewayPodSpec {
        GatewayPodSpec::load().unwrap()
    }

    #[test]
    fn the_example_pod_is_read_from_the_manifests() {
        let s = spec();
        assert_eq!(s.gateway_interface, "vpn-gw-veth0");
        assert_eq!(s.env("VPN_INTERFACE"), "tun0", "image default");
        assert!(s
            .sysctls
            .contains(&("net.ipv4.ip_forward".into(), "1".into())));
        let post = s.post_rules().expect("post-rules mounted at /iptables");
        assert!(post_rules_plan(&post).iter().any(|st| matches!(st,
            Step::Iptables { v6: false, args } if args.first().map(String::as_str) == Some("-A") && args.get(1).map(String::as_str) == Some("FORWARD"))));
        let init = &s.init[0];
        let script = s
            .file(init, &init.argv[1])
            .expect("the init script is in a volume");
        assert!(script.contains("iptables"));
        assert_eq!(
            s.map_path(init, Path::new("/lab"), "/setup/setup.sh"),
            "/lab/setup/setup.sh"
        );
        assert_eq!(
            s.map_path(init, Path::new("/lab"), "/run/vpn-gateway"),
            "/lab/state"
        );
        assert_eq!(s.map_path(init, Path::new("/lab"), "/setupx"), "/setupx");
    }

    #[test]
    fn post_rules_are_parsed_as_gluetun_parses_them() {
        let text = "# comment\n iptables -A INPUT -j ACCEPT\niptables -A FORWARD -i a -j ACCEPT\r\n/sbin/iptables -A X\nip6tables -P FORWARD DROP\niptables-legacy -t nat -A POSTROUTING -o tun0 -j MASQUERADE\n";
        let p = post_rules_plan(text);
        assert_eq!(
            p.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "iptables -A FORWARD -i a -j ACCEPT",
                "ip6tables -P FORWARD DROP",
                "iptables -t nat -A POSTROUTING -o tun0 -j MASQUERADE"
            ]
        );
    }

    #[test]
    fn commands_are_split_and_filled_like_gluetun() {
        let c = pf_command(
            "/bin/sh /setup/pf.sh up {{PORTS}} {{PORT}} {{VPN_INTERFACE}}",
            &[5, 7],
            "tun0",
        );
        assert_eq!(c, "/bin/sh /setup/pf.sh up 5,7 5 tun0");
        assert_eq!(
            split_command(r#"/bin/sh -c "echo \"a b\" \$x" 'c d' e\ f"#).unwrap(),
            ["/bin/sh", "-c", "echo \"a b\" $x", "c d", "e f"]
        );
        assert!(split_command("a 'b").is_err());
        assert_eq!(pf_command("x {{PORT}}", &[], "tun0"), "x ");
    }

    #[test]
    fn the_firewall_is_built_in_gluetuns_order() {
        let d = Discovered {
            local: vec![
                LocalNetwork {
                    net: "10.244.0.0/16".into(),
                    interface: "eth0".into(),
                    ip: "10.244.3.1".parse().unwrap(),
                },
                LocalNetwork {
                    net: "fe80::/64".into(),
                    interface: "eth0".into(),
                    ip: "fe80::1".parse().unwrap(),
                },
            ],
            defaults: vec![DefaultRoute {
                interface: "eth0".into(),
                gateway: "10.244.0.1".parse().unwrap(),
                ip: "10.244.3.1".parse().unwrap(),
            }],
            ipv6: true,
        };
        let env: BTreeMap<String, String> = [
            ("FIREWALL_INPUT_PORTS".to_owned(), "8000".to_owned()),
            ("VPN_INTERFACE".to_owned(), "tun0".to_owned()),
        ]
        .into();
        let e: Vec<String> = enable_plan(&d).iter().map(ToString::to_string).collect();
        assert_eq!(e[0], "iptables --policy INPUT DROP");
        assert_eq!(e[2], "iptables --policy FORWARD DROP");
        assert_eq!(e[5], "ip6tables --policy FORWARD DROP");
        assert!(!e
            .iter()
            .any(|l| l.contains("FORWARD") && !l.contains("--policy")));
        let pos = |l: &str| e.iter().position(|x| x == l).unwrap();
        assert!(
            pos("iptables --append OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
                < pos(
                    "iptables --append INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
                )
        );
        assert!(
            pos("iptables --append OUTPUT -o eth0 -s 10.244.3.1 -d 10.244.0.0/16 -j ACCEPT")
                < pos("iptables --append INPUT -i eth0 -d 10.244.0.0/16 -j ACCEPT")
        );
        assert_eq!(
            e.iter()
                .filter(|l| l.contains("ff02::1:ff00:0/104"))
                .count(),
            1,
            "NDP multicast once per interface"
        );
        let r: Vec<String> = routing_plan(&d, &env)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            r[0],
            "ip route replace default via 10.244.0.1 dev eth0 table 200"
        );
        assert!(r.contains(&"ip -4 rule add to 10.244.0.0/16 lookup main priority 98".to_owned()));
        assert!(r.contains(
            &"iptables --append INPUT -i eth0 -p tcp -m tcp --dport 8000 -j ACCEPT".to_owned()
        ));
        let t: Vec<String> = tunnel_plan(&d, &env)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            t,
            [
                "ip route add 0.0.0.0/0 dev tun0 table 51820",
                "ip -6 route add ::/0 dev tun0 table 51820",
                "ip -6 rule add not fwmark 51820 table 51820 priority 101",
                "ip rule add not fwmark 51820 table 51820 priority 101"
            ]
        );
    }
}
