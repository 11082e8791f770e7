//! A one-node "cluster" for the shipped manifests: the bridges their NADs name, a node (the
//! pods' primary network, the kubelet's prober, the intranet and its DNS server for DDNS), an
//! "Internet" holding the addresses the shipped config talks to, gateway pods (the example's
//! gluetun pod behind gluetun's firewall, with the lab's gluetun-compatible control server
//! behind the address whereabouts gives them), router pods
//! run by podman from the built image as [`super::pod`] translates the Deployment, and client
//! pods attached as the example client's annotation says.
//!
//! Namespaces and containers are named `vrl<pid>x<n>-<role>` like the lab's, so a crashed run
//! is swept by the next one (`netns::sweep_stale`, and containers of dead owners here).
//!
//! What differs from a real cluster is recorded in [`Cluster::deviations`] (and the pod plan's
//! `not_honoured`), and printed by the test.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cni::{self, Attachment, Network, Pools};
use super::kubelet::Prober;
use super::manifests::{self, Object};
use super::pod::{self, PodContext, PodPlan};
use super::KubeError;
use crate::dns;
use crate::gluetun::{GluetunAuth, GluetunState};
use crate::gluetun_pod::{self, GatewayPodSpec, PodRun, Tunnel};
use crate::http;
use crate::lab::{self, find_binary, which};
use crate::netns::{self, Netns, LAB_ROOT};
use crate::servers::write_state;

/// The pod network (the cluster's own CNI): node at .0.1, router pods .1.x, clients .2.x.
const POD_NET_PREFIX: u8 = 16;
const NODE_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);
/// The Internet bridge: the Internet host, the node's uplink, the gateways' tunnels.
const INET_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const NODE_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// Where the shipped manifests live, relative to this crate.
const DEPLOY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// Which manifests, which image, and what to change on purpose.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The kustomization to render (relative to deploy/).
    pub overlay: String,
    pub image: String,
    /// Override `vmac:` of every VRRP instance in the router config (a deviation).
    pub vmac: Option<bool>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            overlay: "overlays/example".into(),
            image: std::env::var("VPN_ROUTER_IMAGE")
                .unwrap_or_else(|_| "localhost/vpn-router:dev".into()),
            vmac: None,
        }
    }
}

/// A pod's network namespace and its attachments.
#[derive(Debug)]
pub struct Sandbox {
    pub name: String,
    pub ns: Netns,
    /// The primary network's address (`status.podIP`).
    pub pod_ip: Ipv4Addr,
    /// Multus attachments and the address each got.
    pub attachments: Vec<(Attachment, Ipv4Addr)>,
}

impl Sandbox {
    /// The address on the attachment with interface `ifname`.
    pub fn address_on(&self, ifname: &str) -> Option<Ipv4Addr> {
        self.attachments
            .iter()
            .find(|(a, _)| a.interface == ifname)
            .map(|(_, ip)| *ip)
    }
}

/// A router pod: its sandbox, its container and the kubelet's prober.
#[derive(Debug)]
pub struct RouterPod {
    pub sandbox: Sandbox,
    pub plan: PodPlan,
    pub prober: Prober,
    pub log: PathBuf,
    pub started: Instant,
}

/// How a router pod went away.
#[derive(Debug, Clone)]
pub struct Termination {
    pub exit_code: Option<i64>,
    /// SIGTERM to exit.
    pub took: Duration,
}

/// One gateway pod.
#[derive(Debug)]
pub struct GatewayPod {
    pub index: usize,
    pub sandbox: Sandbox,
    pub public_ip: Ipv4Addr,
}

/// The cluster. Dropping it removes every container and namespace it made.
#[derive(Debug)]
pub struct Cluster {
    pub prefix: String,
    pub dir: PathBuf,
    pub switch: Netns,
    pub node: Netns,
    pub inet: Netns,
    pub objects: Vec<Object>,
    networks: BTreeMap<(String, String), Network>,
    pools: Mutex<Pools>,
    /// What this run changes from the manifests, and why.
    pub deviations: Vec<String>,
    pub gateways: Vec<GatewayPod>,
    services: Mutex<Vec<Child>>,
    pods: AtomicU32,
    image: String,
    torn_down: AtomicBool,
    /// The Internet addresses the config uses (the probe target first).
    pub internet: Vec<Ipv4Addr>,
    /// The DDNS server, zone and name of the config, when it has rfc2136.
    pub ddns: Option<(Ipv4Addr, String, String)>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KubeError {
    let what = what.into();
    move |source| KubeError::Io { what, source }
}

/// `podman ARGS`, with the project's containers.conf; stdout on success.
pub fn podman(args: &[String]) -> Result<String, KubeError> {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/containers.conf");
    let out = Command::new("podman")
        .env("CONTAINERS_CONF", conf)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io("run podman"))?;
    if !out.status.success() {
        return Err(KubeError::Podman {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn strs(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_string()).collect()
}

/// Removes containers of kubelet-like runs whose owner process is gone.
fn sweep_stale_containers() {
    let Ok(names) = podman(&strs(&["ps", "-a", "--format", "{{.Names}}"])) else {
        return;
    };
    for n in names.lines().filter(|n| n.starts_with("vrl")) {
        if let Some(prefix) = netns::lab_prefix(n) {
            if !netns::lab_owner_alive(prefix) {
                let _ = podman(&strs(&["rm", "-f", "-t", "0", n]));
            }
        }
    }
}

/// The YAML value at `path` (dotted) of a config text, as a string.
fn config_str(cfg: &Value, path: &str) -> Option<String> {
    let mut v = cfg;
    for k in path.split('.') {
        v = v.get(k)?;
    }
    v.as_str().map(str::to_string)
}

impl Cluster {
    /// Renders the manifests and builds everything but the router and client pods.
    pub fn build(opts: ClusterOptions) -> Result<Cluster, KubeError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(KubeError::Prerequisite(
                "must run as root (network namespaces, podman)".into(),
            ));
        }
        for (tool, pkg) in [
            ("podman", "podman"),
            ("runc", "runc"),
            ("ip", "iproute2"),
            ("nft", "nftables"),
            ("ping", "iputils-ping"),
            ("named", "bind9"),
            ("dig", "bind9-dnsutils"),
        ] {
            if !which(tool) {
                return Err(KubeError::Prerequisite(format!(
                    "{tool} not found: install the Debian package {pkg} (scripts/install-deps.sh)"
                )));
            }
        }
        if podman(&strs(&["image", "exists", &opts.image])).is_err() {
            return Err(KubeError::Prerequisite(format!(
                "image {} not found: build it with `make image`",
                opts.image
            )));
        }
        netns::sweep_stale();
        sweep_stale_containers();

        let deploy = Path::new(DEPLOY_DIR);
        let mut objects = manifests::render(&deploy.join(&opts.overlay))?;
        let mut deviations = Vec::new();
        adjust_router(&mut objects, &opts, &mut deviations)?;

        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // The lab counts its own labs from 0 in the same process; these names stay clear of them.
        let prefix = format!("vrl{}x{}", std::process::id(), 9000 + n);
        let dir = Path::new(LAB_ROOT).join(&prefix);
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let me = i32::try_from(std::process::id()).unwrap_or(-1);
        if let Some(t) = netns::proc_starttime(me) {
            std::fs::write(dir.join(netns::OWNER_FILE), t.to_string())
                .map_err(io("write the owner file"))?;
        }
        let mut networks = BTreeMap::new();
        for o in objects
            .iter()
            .filter(|o| o.kind == "NetworkAttachmentDefinition")
        {
            networks.insert((o.namespace.clone(), o.name.clone()), cni::parse_nad(o)?);
        }
        let cfg = router_config(&objects)?;
        let probe_target: SocketAddr = config_str(&cfg, "gateways.health.probe.target")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| SocketAddr::from(([1, 1, 1, 1], 443)));
        let probe_ip = ipv4_of(probe_target)?;
        let ddns = match (
            config_str(&cfg, "ddns.provider.rfc2136.server"),
            config_str(&cfg, "ddns.provider.rfc2136.zone"),
            config_str(&cfg, "ddns.hostname"),
        ) {
            (Some(s), Some(z), Some(h)) => {
                let a: SocketAddr = s.parse().map_err(|_| KubeError::Unsupported {
                    what: format!("ddns server {s}"),
                })?;
                Some((ipv4_of(a)?, z, h))
            }
            _ => None,
        };
        let name = |role: &str| format!("{prefix}-{role}");
        let mut c = Cluster {
            prefix: prefix.clone(),
            dir,
            switch: Netns::named(&name("sw")),
            node: Netns::named(&name("node")),
            inet: Netns::named(&name("inet")),
            objects,
            networks,
            pools: Mutex::new(Pools::default()),
            deviations,
            gateways: Vec::new(),
            services: Mutex::new(Vec::new()),
            pods: AtomicU32::new(0),
            image: opts.image,
            torn_down: AtomicBool::new(false),
            internet: vec![probe_ip],
            ddns,
        };
        c.wire()?;
        c.start_gateways()?;
        c.start_services()?;
        Ok(c)
    }

    /// Bridges, node, Internet.
    fn wire(&self) -> Result<(), KubeError> {
        for ns in [&self.switch, &self.node, &self.inet] {
            Netns::create(ns.name())?;
        }
        let mut bridges: BTreeMap<&str, u32> = BTreeMap::new();
        for n in self.networks.values() {
            let m = bridges.entry(n.bridge.as_str()).or_insert(0);
            *m = (*m).max(n.mtu);
        }
        let mut sw: Vec<String> = bridges
            .iter()
            .map(|(b, mtu)| format!("link add {b} mtu {mtu} type bridge"))
            .collect();
        sw.extend(bridges.keys().map(|b| format!("link set {b} up")));
        sw.extend([
            "link add podnet type bridge".into(),
            "link add inet type bridge".into(),
            "link set podnet up".into(),
            "link set inet up".into(),
            format!(
                "link add p-node type veth peer name eth0 netns {}",
                self.node.name()
            ),
            format!(
                "link add i-node type veth peer name wan0 netns {}",
                self.node.name()
            ),
            format!(
                "link add i-inet type veth peer name wan0 netns {}",
                self.inet.name()
            ),
            "link set p-node master podnet up".into(),
            "link set i-node master inet up".into(),
            "link set i-inet master inet up".into(),
        ]);
        self.switch.ip_batch(&sw)?;
        let mut node = vec![
            format!("addr add {NODE_POD_IP}/{POD_NET_PREFIX} dev eth0"),
            format!("addr add {NODE_PUBLIC}/24 dev wan0"),
            "link set eth0 up".into(),
            "link set wan0 up".into(),
            format!("route add default via {INET_HOST} dev wan0"),
        ];
        if let Some((dns, _, _)) = &self.ddns {
            node.push(format!("addr add {dns}/32 dev lo"));
        }
        self.node.ip_batch(&node)?;
        self.node.sysctl("net.ipv4.ip_forward", "1")?;
        self.node.nft(lab::NODE_NFT)?;
        let mut inet = vec![
            format!("addr add {INET_HOST}/24 dev wan0"),
            "link set wan0 up".into(),
        ];
        inet.extend(
            self.internet
                .iter()
                .map(|a| format!("addr add {a}/32 dev lo")),
        );
        self.inet.ip_batch(&inet)?;
        Ok(())
    }

    fn spawn(
        &self,
        ns: &Netns,
        program: &Path,
        args: &[String],
        log: &str,
    ) -> Result<(), KubeError> {
        let path = self.dir.join(log);
        let out = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(format!("open {}", path.display())))?;
        let err = out.try_clone().map_err(io("dup a log file"))?;
        let child = ns
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(io(format!("spawn {} in {}", program.display(), ns.name())))?;
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        Ok(())
    }

    /// The Internet's echo and the probe target, the intranet's DNS server.
    fn start_services(&self) -> Result<(), KubeError> {
        let lab_bin = find_binary("vpn-router-lab", "VPN_ROUTER_LAB_BIN");
        let target = self.internet[0];
        self.spawn(
            &self.inet,
            &lab_bin,
            &[
                "serve".into(),
                "--name".into(),
                "internet".into(),
                "--http".into(),
                format!("{target}:80"),
                "--tcp-echo".into(),
                format!("{target}:443"),
                "--tcp-echo".into(),
                format!("{target}:7"),
            ],
            "internet.log",
        )?;
        wait_tcp(
            &self.inet,
            SocketAddr::from((target, 80)),
            Duration::from_secs(5),
        )?;
        if let Some((addr, zone, _)) = &self.ddns {
            let secrets =
                manifests::find(&self.objects, "Secret", "vpn-gateway", "vpn-router-secrets")?;
            let data = manifests::data(secrets)?;
            let cfg = router_config(&self.objects)?;
            let key_file =
                config_str(&cfg, "ddns.provider.rfc2136.key_secret_file").unwrap_or_default();
            let key = Path::new(&key_file)
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or_default()
                .to_string();
            let secret = data
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| String::from_utf8_lossy(v).trim().to_string())
                .ok_or_else(|| KubeError::Missing {
                    what: format!("Secret vpn-router-secrets key {key}"),
                })?;
            let conf = dns::named_conf_for(
                &self.dir,
                *addr,
                zone,
                &dns::Tsig {
                    name: &config_str(&cfg, "ddns.provider.rfc2136.key_name").unwrap_or_default(),
                    algorithm: &config_str(&cfg, "ddns.provider.rfc2136.key_algorithm")
                        .unwrap_or_else(|| "hmac-sha256".into()),
                    secret_b64: &secret,
                },
            );
            std::fs::write(self.dir.join("named.conf"), conf).map_err(io("write named.conf"))?;
            std::fs::write(
                self.dir.join(format!("{zone}.zone")),
                dns::zone_file_for(zone, *addr),
            )
            .map_err(io("write the zone file"))?;
            self.spawn(
                &self.node,
                Path::new("named"),
                &[
                    "-g".into(),
                    "-c".into(),
                    self.dir.join("named.conf").display().to_string(),
                ],
                "named.log",
            )?;
            wait_tcp(
                &self.node,
                SocketAddr::from((*addr, 53)),
                Duration::from_secs(10),
            )?;
        }
        Ok(())
    }

    /// The example gateways' pods: as many as the StatefulSet's replicas, attached as its
    /// annotation says, on the pod network, each run as the shipped gluetun pod behind
    /// gluetun's firewall (tests/src/gluetun_pod.rs) with a tunnel to its own provider
    /// namespace on the Internet, and the lab's gluetun control server answering with the
    /// router's API key.
    fn start_gateways(&mut self) -> Result<(), KubeError> {
        let sts =
            manifests::find(&self.objects, "StatefulSet", "vpn-gateway", "vpn-gateway")?.clone();
        let replicas =
            usize::try_from(sts.doc["spec"]["replicas"].as_u64().unwrap_or(1)).unwrap_or(1);
        let key = self.secret_value("vpn-router-secrets", "gluetun-api-key")?;
        let lab_bin = find_binary("vpn-router-lab", "VPN_ROUTER_LAB_BIN");
        let cfg = router_config(&self.objects)?;
        let first: Ipv4Addr = config_str(&cfg, "gateways.addresses")
            .and_then(|a| a.split('-').next().and_then(|x| x.trim().parse().ok()))
            .ok_or_else(|| KubeError::Unsupported {
                what: "gateways.addresses as a range".into(),
            })?;
        let spec = GatewayPodSpec::from_objects(&self.objects)?;
        let fixed: Vec<u16> = spec
            .init_env("PORT_MAPPINGS")
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|m| m.split(':').next()?.parse().ok())
            .collect();
        let fix = |a: &str| {
            if a.starts_with(':') {
                format!("0.0.0.0{a}")
            } else {
                a.to_owned()
            }
        };
        let (control, health) = (
            fix(spec.env("HTTP_CONTROL_SERVER_ADDRESS")),
            fix(spec.env("HEALTH_SERVER_ADDRESS")),
        );
        for r in 0..replicas {
            let pod_ip = Ipv4Addr::new(10, 42, 3, u8::try_from(10 + r).unwrap_or(250));
            let sb = self.sandbox(&sts, &format!("gw{r}"), Some(pod_ip))?;
            let (_, addr) =
                sb.attachments
                    .first()
                    .cloned()
                    .ok_or_else(|| KubeError::Unsupported {
                        what: "a gateway without attachments".into(),
                    })?;
            let index =
                usize::try_from(u32::from(addr).saturating_sub(u32::from(first))).unwrap_or(0);
            let public_ip =
                Ipv4Addr::from(u32::from(INET_HOST) + 9 + u32::try_from(index).unwrap_or(0));
            let provider = Netns::create(&format!("{}-vpn{r}", self.prefix))?;
            let port = format!("{}-wan", short(&sb.name));
            self.switch.ip_batch(&[
                format!(
                    "link add {port} type veth peer name wan0 netns {}",
                    provider.name()
                ),
                format!("link set {port} master inet up"),
            ])?;
            gluetun_pod::wire_provider(&provider, &spec, public_ip, 24, INET_HOST)
                .map_err(|e| KubeError::Prerequisite(format!("gateway {r}'s provider: {e}")))?;
            gluetun_pod::provider_forward(&provider, &[], &fixed)?;
            let pod = PodRun::start(
                spec.clone(),
                &sb.ns,
                &Tunnel {
                    provider: provider.clone(),
                    endpoint: (public_ip, 51820),
                },
                &self.dir.join(format!("gw{r}-pod")),
                &[],
            )
            .map_err(KubeError::Prerequisite)?;
            std::fs::write(self.dir.join(format!("gw{r}-pod.log")), pod.log.join("\n"))
                .map_err(io("write a gateway pod's log"))?;
            let state = self.dir.join(format!("gw{index}.state.json"));
            write_state(
                &state,
                &GluetunState::running(
                    &public_ip.to_string(),
                    None,
                    GluetunAuth::ApiKey { key: key.clone() },
                ),
            )
            .map_err(io("write a gluetun state file"))?;
            self.spawn(
                &sb.ns,
                &lab_bin,
                &[
                    "gluetun".into(),
                    "--listen".into(),
                    control.clone(),
                    "--health-listen".into(),
                    health.clone(),
                    "--state-file".into(),
                    state.display().to_string(),
                ],
                &format!("gw{index}.log"),
            )?;
            wait_tcp(
                &sb.ns,
                SocketAddr::from((addr, 8000)),
                Duration::from_secs(5),
            )?;
            self.gateways.push(GatewayPod {
                index,
                sandbox: sb,
                public_ip,
            });
        }
        self.deviations.push(format!(
            "gateways: {replicas} pods of StatefulSet vpn-gateway with its attachments and a pod-network address, running its init container, postStart hook, gluetun's firewall and routing with its post-rules (tests/src/gluetun_pod.rs), a veth `tun0` to a provider namespace instead of WireGuard, and the lab's gluetun-compatible control server (API key from Secret vpn-router-secrets) instead of gluetun"
        ));
        Ok(())
    }

    fn secret_value(&self, secret: &str, key: &str) -> Result<String, KubeError> {
        let s = manifests::find(&self.objects, "Secret", "vpn-gateway", secret)?;
        manifests::data(s)?
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| String::from_utf8_lossy(&v).trim().to_string())
            .ok_or_else(|| KubeError::Missing {
                what: format!("Secret {secret} key {key}"),
            })
    }

    /// A pod sandbox for `workload`: a namespace, the primary network (when `pod_ip` is given:
    /// eth0 with a default route via the node) and every Multus attachment of its template.
    fn sandbox(
        &self,
        workload: &Object,
        name: &str,
        pod_ip: Option<Ipv4Addr>,
    ) -> Result<Sandbox, KubeError> {
        let ns = Netns::create(&format!("{}-{name}", self.prefix))?;
        if let Some(ip) = pod_ip {
            let port = format!("{}-p", short(name));
            self.switch.ip_batch(&[
                format!(
                    "link add {port} type veth peer name eth0 netns {}",
                    ns.name()
                ),
                format!("link set {port} master podnet up"),
            ])?;
            ns.ip_batch(&[
                format!("addr add {ip}/{POD_NET_PREFIX} dev eth0"),
                "link set eth0 up".into(),
                format!("route add default via {NODE_POD_IP} dev eth0"),
            ])?;
        }
        let annotation = workload.doc["spec"]["template"]["metadata"]["annotations"]
            ["k8s.v1.cni.cncf.io/networks"]
            .as_str()
            .unwrap_or_default();
        let mut attachments = Vec::new();
        for (k, a) in cni::multus_annotation(annotation, &workload.namespace)?
            .into_iter()
            .enumerate()
        {
            let net = self
                .networks
                .get(&(a.namespace.clone(), a.network.clone()))
                .ok_or_else(|| KubeError::Missing {
                    what: format!("NetworkAttachmentDefinition {}/{}", a.namespace, a.network),
                })?;
            let addr = self
                .pools
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allocate(net)?;
            cni::plug(
                &self.switch,
                &ns,
                &format!("{}-{k}", short(name)),
                &a.interface,
                net,
                addr,
            )?;
            attachments.push((a, addr));
        }
        Ok(Sandbox {
            name: name.to_string(),
            ns,
            pod_ip: pod_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            attachments,
        })
    }

    /// Deletes a sandbox: its namespace (the veths go with it) and its addresses.
    fn remove_sandbox(&self, sb: &Sandbox) {
        let _ = sb.ns.destroy();
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        for (a, addr) in &sb.attachments {
            if let Some(net) = self.networks.get(&(a.namespace.clone(), a.network.clone())) {
                pools.release(net, *addr);
            }
        }
    }

    pub fn router_deployment(&self) -> Result<&Object, KubeError> {
        manifests::find(&self.objects, "Deployment", "vpn-gateway", "vpn-router")
    }

    /// The Deployment's `minReadySeconds`.
    pub fn min_ready(&self) -> Duration {
        self.router_deployment()
            .ok()
            .and_then(|d| d.doc["spec"]["minReadySeconds"].as_u64())
            .map_or(Duration::ZERO, Duration::from_secs)
    }

    /// Creates one router pod of the Deployment and starts its container and prober.
    pub fn start_router(&self) -> Result<RouterPod, KubeError> {
        let d = self.router_deployment()?.clone();
        let n = self.pods.fetch_add(1, Ordering::SeqCst);
        let name = format!("r{n}");
        let pod_ip = Ipv4Addr::new(10, 42, 1, u8::try_from(10 + n).unwrap_or(250));
        let sandbox = self.sandbox(&d, &name, Some(pod_ip))?;
        let pod_name = format!("{}-{name}", self.prefix);
        let log = self.dir.join(format!("{name}.log"));
        let ctx = PodContext {
            pod_name: pod_name.clone(),
            namespace: d.namespace.clone(),
            node_name: "node".into(),
            host_ip: NODE_POD_IP,
            pod_ip,
            netns_path: sandbox.ns.path(),
            image: self.image.clone(),
            volume_dir: self.dir.join(format!("{name}-volumes")),
            log_path: log.clone(),
        };
        let plan = pod::plan(&d, &self.objects, &ctx)?;
        podman(&plan.podman_run)?;
        let prober = Prober::start(&self.node, &pod_name, pod_ip, &plan.probes);
        Ok(RouterPod {
            sandbox,
            plan,
            prober,
            log,
            started: Instant::now(),
        })
    }

    /// Deletes a router pod as the kubelet does: SIGTERM, SIGKILL after the grace period,
    /// then the sandbox.
    pub fn delete_router(&self, mut pod: RouterPod) -> Result<Termination, KubeError> {
        pod.prober.terminating();
        let t0 = Instant::now();
        let grace = pod.plan.termination_grace.as_secs().to_string();
        podman(&strs(&["stop", "-t", &grace, &pod.plan.container]))?;
        let took = t0.elapsed();
        let code = podman(&strs(&[
            "inspect",
            "--format",
            "{{.State.ExitCode}}",
            &pod.plan.container,
        ]))
        .ok()
        .and_then(|s| s.trim().parse().ok());
        pod.prober.stop();
        let _ = podman(&strs(&["rm", "-f", &pod.plan.container]));
        self.remove_sandbox(&pod.sandbox);
        Ok(Termination {
            exit_code: code,
            took,
        })
    }

    /// The pod dies with its node: the container is killed and the sandbox is gone at once
    /// (its links vanish from the bridges), with no goodbye advert.
    pub fn crash_router(&self, mut pod: RouterPod) {
        pod.prober.terminating();
        let _ = podman(&strs(&["kill", "-s", "KILL", &pod.plan.container]));
        self.remove_sandbox(&pod.sandbox);
        pod.prober.stop();
        let _ = podman(&strs(&["rm", "-f", &pod.plan.container]));
    }

    /// A client pod of the example Deployment `name` (namespace vpn-clients): its sandbox only
    /// (the test drives traffic from it).
    pub fn start_client(&self, name: &str) -> Result<Sandbox, KubeError> {
        let d = manifests::find(&self.objects, "Deployment", "vpn-clients", name)?.clone();
        let n = self.pods.fetch_add(1, Ordering::SeqCst);
        self.sandbox(
            &d,
            &format!("c{n}"),
            Some(Ipv4Addr::new(
                10,
                42,
                2,
                u8::try_from(10 + n).unwrap_or(250),
            )),
        )
    }

    /// `GET http://<pod IP>:<port><path>` from the node.
    pub fn api_get(&self, pod: &RouterPod, path: &str) -> Result<http::HttpResponse, KubeError> {
        let port = pod.plan.probes.first().map_or(9090, |p| p.port);
        let url = format!("http://{}:{port}{path}", pod.sandbox.pod_ip);
        Ok(self
            .node
            .run_in(|| http::get(&url, Duration::from_secs(2)))??)
    }

    /// `podman exec <pod> ARGS` (what `kubectl exec` runs).
    pub fn exec(&self, pod: &RouterPod, args: &[&str]) -> Result<String, KubeError> {
        let mut a = strs(&["exec", &pod.plan.container]);
        a.extend(strs(args));
        podman(&a)
    }

    /// The container's log, last `n` lines.
    pub fn log_tail(&self, pod: &RouterPod, n: usize) -> String {
        lab::tail(&pod.log, n)
    }

    /// Client packets the node forwarded to the Internet: traffic around the VPN. Must stay 0.
    pub fn leaked_packets(&self) -> Result<u64, KubeError> {
        Ok(lab::counter_packets(&self.node, "leak")?)
    }

    /// What the leak counter counted, flow by flow.
    pub fn leaked_flows(&self) -> String {
        lab::leaked_flows(&self.node)
    }

    /// The A records of the DDNS name on the intranet's DNS server.
    pub fn ddns_records(&self) -> Result<Vec<Ipv4Addr>, KubeError> {
        let Some((server, _, name)) = &self.ddns else {
            return Ok(Vec::new());
        };
        let out = self.node.exec(
            "dig",
            &[
                &format!("@{server}"),
                "+short",
                "+time=1",
                "+tries=2",
                name,
                "A",
            ],
        )?;
        let mut v: Vec<Ipv4Addr> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
        v.sort();
        Ok(v)
    }

    /// Every pod's `not_honoured` plus the cluster's deviations, for the test's report.
    pub fn report(&self, plan: &PodPlan) -> String {
        let mut s = String::from("what this run changes from the manifests:\n");
        for d in &self.deviations {
            s.push_str(&format!("  - {d}\n"));
        }
        s.push_str("what the run does not honour of the router pod spec:\n");
        for d in &plan.not_honoured {
            s.push_str(&format!("  - {d}\n"));
        }
        s
    }

    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Ok(names) = podman(&strs(&["ps", "-a", "--format", "{{.Names}}"])) {
            for n in names
                .lines()
                .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            {
                let _ = podman(&strs(&["rm", "-f", "-t", "0", n]));
            }
        }
        for mut c in self
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        lab::teardown_prefix(&self.prefix);
        if std::thread::panicking() || std::env::var_os("VPN_ROUTER_LAB_KEEP").is_some() {
            eprintln!(
                "kubelet-like run {}: logs kept in {}",
                self.prefix,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Switch-side port names must fit IFNAMSIZ with a suffix: the role part of a pod name.
fn short(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect()
}

/// The IPv4 address of `a` (the run's networks are IPv4 only).
fn ipv4_of(a: SocketAddr) -> Result<Ipv4Addr, KubeError> {
    match a.ip() {
        std::net::IpAddr::V4(v) => Ok(v),
        std::net::IpAddr::V6(_) => Err(KubeError::Unsupported {
            what: format!("IPv6 address {a}"),
        }),
    }
}

fn wait_tcp(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<(), KubeError> {
    let deadline = Instant::now() + timeout;
    let ok = ns.run_in(|| loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    })?;
    if ok {
        Ok(())
    } else {
        Err(KubeError::Prerequisite(format!(
            "{addr} in {} did not answer within {timeout:?}",
            ns.name()
        )))
    }
}

/// The router config from the ConfigMap the Deployment mounts (`config.yaml`), parsed.
pub fn router_config(objects: &[Object]) -> Result<Value, KubeError> {
    let text = router_config_text(objects)?;
    let docs = manifests::parse_documents(Path::new("config.yaml"), &text)?;
    Ok(docs.into_iter().next().unwrap_or_default())
}

fn router_config_text(objects: &[Object]) -> Result<String, KubeError> {
    let cm = manifests::find(objects, "ConfigMap", "vpn-gateway", "vpn-router-config")?;
    cm.doc["data"]["config.yaml"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| KubeError::Missing {
            what: "ConfigMap vpn-router-config key config.yaml".into(),
        })
}

/// The changes this kernel or the run's options force on the router's manifests, each
/// recorded: without IPVS the `ingress` section and the `net.ipv4.vs.*` sysctls go (vpn-router
/// refuses to start ingress on a kernel without IPVS; the VM tier tests it); `vmac` override.
fn adjust_router(
    objects: &mut [Object],
    opts: &ClusterOptions,
    deviations: &mut Vec<String>,
) -> Result<(), KubeError> {
    let mut text = router_config_text(objects)?;
    if !lab::ipvs_available() {
        text = drop_top_level_section(&text, "ingress");
        deviations.push("this kernel has no IPVS: the config's `ingress` section and the pod's net.ipv4.vs.* sysctls are left out (tests/vm covers IPVS)".into());
        for o in objects
            .iter_mut()
            .filter(|o| o.kind == "Deployment" && o.name == "vpn-router")
        {
            if let Some(s) =
                o.doc["spec"]["template"]["spec"]["securityContext"]["sysctls"].as_array_mut()
            {
                s.retain(|x| {
                    !x["name"]
                        .as_str()
                        .unwrap_or_default()
                        .starts_with("net.ipv4.vs.")
                });
            }
        }
    }
    if let Some(v) = opts.vmac {
        let from = format!("vmac: {}", !v);
        if text.contains(&from) {
            text = text.replace(&from, &format!("vmac: {v}"));
            deviations.push(format!("vrrp[].vmac set to {v} for this run"));
        }
    }
    for o in objects
        .iter_mut()
        .filter(|o| o.kind == "ConfigMap" && o.name == "vpn-router-config")
    {
        o.doc["data"]["config.yaml"] = Value::from(text.clone());
    }
    Ok(())
}

/// `text` without the top-level mapping key `key` and its block.
fn drop_top_level_section(text: &str, key: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        let top = !line.starts_with(' ') && !line.starts_with('#') && !line.trim().is_empty();
        if top {
            skipping = line.starts_with(&format!("{key}:"));
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_one_top_level_section() {
        let t = "a: 1\ningress:\n  x: 1\n  # c\n\n  y: [1]\nddns:\n  z: 2\n";
        assert_eq!(
            drop_top_level_section(t, "ingress"),
            "a: 1\nddns:\n  z: 2\n"
        );
    }
}
