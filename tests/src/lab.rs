//! The lab: builds the reference topology in namespaces, starts the in-namespace servers and
//! the `vpn-router` routers, gives scenario helpers (break a gateway, kill a router, requests
//! from a client pod), and tears everything down on Drop, on panic and (for the binary) on
//! Ctrl-C. Namespaces are named `vrl<pid>x<n>-<role>`; `Lab::build` first sweeps labs whose
//! owner pid is dead, so a crashed run never breaks the next, and labs run side by side.
//!
//! Layout (all bridges in the lab's own `-sw` namespace, nothing in the host's):
//! - `brgw` 192.168.24.0/22 MTU 1420: routers (`gw0` .26.1+k), gateways (`gw0` .25.128+i),
//!   clients (`gw0` .24.1+j, default via the egress VIP), ingress pods (`gw0` .27.1+m).
//! - `brvrrp` 192.168.28.0/24: routers' `vrrp0` (.1+k).
//! - `brpod` 10.244.0.0/16, the pod network: node (.0.1), routers' `eth0` (.1.1+k, their own
//!   default route: the leak path), clients' `eth0` (.2.1+j, the intranet 10.0.0.0/8).
//! - `brinet` 203.0.113.0/24, the Internet: `-inet` (.1 echo, .53 DNS), node (.2, masquerade),
//!   gateways' `wan0` (.10+i, masquerade out, DNAT of forwarded port 40000+i to the ingress VIP).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{self, RouterConfigInput, RouterSecrets, RouterTuning};
use crate::dns;
use crate::gluetun::{GatewayBreak, GluetunAuth, GluetunState};
use crate::gluetun_pod::{self, GatewayPodSpec, PodRun, Tunnel};
use crate::http::{self, HttpResponse};
use crate::netns::{self, Netns, NetnsError, LAB_ROOT};
use crate::probe::{self, Flows};
use crate::servers::write_state;
use crate::topo;

/// A lab failure: what failed and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(
        "the lab must run as root (it creates network namespaces); run it with sudo or as root"
    )]
    NotRoot,
    #[error("`{tool}` not found in PATH: install the Debian package {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Http(#[from] http::HttpError),
    #[error("{what} did not become ready within {secs} s{detail}")]
    NotReady {
        what: String,
        secs: u64,
        detail: String,
    },
    #[error("router binary {path} not found: build it with `cargo build -p vpn-router --bin vpn-router` (or set VPN_ROUTER_BIN)")]
    NoRouterBinary { path: PathBuf },
    #[error("router {router} exited ({status}); last log lines:\n{log}")]
    RouterExited {
        router: usize,
        status: String,
        log: String,
    },
    #[error("bad lab parameters: {0}")]
    Params(String),
    /// The shipped gateway example cannot be read, or its pod fails as it would on a cluster.
    #[error("gateway example (deploy/examples/gateways): {0}")]
    GatewayPod(String),
    #[error("DNS query {query} to the lab's named: {reason}")]
    Dns { query: String, reason: String },
}

/// The rdata of the `rtype` records in `dig +noall +comments +answer` output, after checking
/// that the header's status is NOERROR or NXDOMAIN.
fn parse_dig(out: &str, rtype: &str) -> Result<Vec<String>, String> {
    let status = out
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|rest| rest.split(',').next().unwrap_or("").trim())
        .ok_or_else(|| format!("no answer (dig printed {:?})", out.trim()))?;
    if status != "NOERROR" && status != "NXDOMAIN" {
        return Err(format!("status {status}"));
    }
    Ok(out
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| {
            // name ttl class type rdata...
            let mut f = l.split_whitespace();
            let _ = (f.next(), f.next(), f.next());
            (f.next()? == rtype).then(|| f.collect::<Vec<_>>().join(" "))
        })
        .collect())
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static LIVE_LABS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Tears down every lab this process still has (for signal handlers): kills their processes
/// and deletes their namespaces. Lab directories are kept for the logs.
pub fn teardown_live_labs() {
    let prefixes: Vec<String> = LIVE_LABS.lock().map(|l| l.clone()).unwrap_or_default();
    for p in prefixes {
        teardown_prefix(&p);
    }
}

/// Kills the processes in, and deletes, every namespace named `<prefix>-*`.
pub fn teardown_prefix(prefix: &str) {
    let want = format!("{prefix}-");
    let nss: Vec<Netns> = netns::list_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&want))
        .map(|n| Netns::named(&n))
        .collect();
    netns::kill_all_in(&nss);
    for ns in nss {
        let _ = ns.destroy();
    }
}

/// True when the kernel has IPVS (the module is loaded or built in). Without it the lab's
/// router configs leave out the `ingress` section, since vpn-router refuses to start an
/// ingress config on a kernel that cannot run it.
pub fn ipvs_available() -> bool {
    Path::new("/proc/net/ip_vs").exists() || Path::new("/proc/sys/net/ipv4/vs").exists()
}

/// True when `tool` is an executable file on PATH.
pub fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Fails with a clear message when not root or a tool the lab needs is missing.
pub fn check_prerequisites(dns: bool) -> Result<(), LabError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LabError::NotRoot);
    }
    let mut tools: Vec<(&'static str, &'static str)> = vec![
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("ping", "iputils-ping"),
        // the gateways: gluetun's firewall and the example's scripts
        ("iptables", "iptables"),
        ("ip6tables", "iptables"),
    ];
    if dns {
        tools.push(("named", "bind9"));
        tools.push(("dig", "bind9-dnsutils"));
    }
    for (tool, package) in tools {
        if !which(tool) {
            return Err(LabError::MissingTool { tool, package });
        }
    }
    Ok(())
}

/// Which cable of a router the lab cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterLink {
    /// `gw0`, the VPN gateway network (clients, gateways, VIPs).
    Gateway,
    /// `vrrp0`, the advert network.
    Vrrp,
    /// `eth0`, the pod network.
    Pod,
}

/// Builder for a lab: `Lab::builder().gateways(4).routers(2).clients(2).build()?`.
#[derive(Debug, Clone)]
pub struct LabBuilder {
    gateways: usize,
    routers: usize,
    clients: usize,
    ingress_pods: usize,
    dns: bool,
    start_routers: bool,
    router_bin: Option<PathBuf>,
    lab_bin: Option<PathBuf>,
    auth: GluetunAuth,
    tuning: RouterTuning,
    gateway_kind: GatewayKind,
    port_forwarding: PortForwarding,
    port_mappings: Option<String>,
}

/// What a lab gateway is.
#[derive(Debug, Clone, Default)]
pub enum GatewayKind {
    /// The shipped gluetun pod of deploy/examples/gateways behind gluetun's firewall as gluetun
    /// builds it, with a tunnel to a per-gateway provider namespace (tests/src/gluetun_pod.rs).
    #[default]
    Gluetun,
    /// [`GatewayKind::Gluetun`] with a changed pod spec.
    GluetunSpec(Box<GatewayPodSpec>),
    /// A bare forwarder with no firewall and no tunnel (masquerade out of `wan0`, DNAT of
    /// port 40000+i): only for tests that need a gateway to forward whatever reaches it.
    Permissive,
}

/// How the providers forward ports: the example's two kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PortForwarding {
    /// Fixed ports (the example as shipped): the init container's `PORT_MAPPINGS` DNATs them,
    /// the provider forwards their VPN ports, gluetun's port forwarding is off.
    #[default]
    Fixed,
    /// Ports handed out at run time: gluetun's `VPN_PORT_FORWARDING=on`, `PORT_MAPPINGS`
    /// empty, the example's up/down commands DNAT whatever port gateway i gets (first
    /// `topo::gateway_forwarded_port(i)`; `GatewayNode::set_forwarded_ports` changes it).
    Dynamic,
}

impl Default for LabBuilder {
    fn default() -> Self {
        Self {
            gateways: 4,
            routers: 2,
            clients: 2,
            ingress_pods: 2,
            dns: true,
            start_routers: true,
            router_bin: None,
            lab_bin: None,
            auth: GluetunAuth::ApiKey {
                key: "lab-api-key".into(),
            },
            tuning: RouterTuning::default(),
            gateway_kind: GatewayKind::default(),
            port_forwarding: PortForwarding::default(),
            port_mappings: None,
        }
    }
}

impl LabBuilder {
    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }
    pub fn routers(mut self, n: usize) -> Self {
        self.routers = n;
        self
    }
    pub fn clients(mut self, n: usize) -> Self {
        self.clients = n;
        self
    }
    pub fn ingress_pods(mut self, n: usize) -> Self {
        self.ingress_pods = n;
        self
    }
    /// Run BIND (`named`) on the Internet for DDNS (default on).
    pub fn dns(mut self, on: bool) -> Self {
        self.dns = on;
        self
    }
    /// Start `vpn-router run` in each router namespace (default on). Off: the namespaces and
    /// configs exist, nothing runs there (tests of the plumbing itself).
    pub fn start_routers(mut self, on: bool) -> Self {
        self.start_routers = on;
        self
    }
    pub fn router_bin(mut self, p: impl Into<PathBuf>) -> Self {
        self.router_bin = Some(p.into());
        self
    }
    pub fn lab_bin(mut self, p: impl Into<PathBuf>) -> Self {
        self.lab_bin = Some(p.into());
        self
    }
    /// How the gateways' control servers authenticate (default: an API key).
    pub fn gateway_auth(mut self, a: GluetunAuth) -> Self {
        self.auth = a;
        self
    }
    pub fn tuning(mut self, t: RouterTuning) -> Self {
        self.tuning = t;
        self
    }
    /// What the gateways are (default: the shipped gluetun pod).
    pub fn gateway_kind(mut self, k: GatewayKind) -> Self {
        self.gateway_kind = k;
        self
    }
    /// Fixed (default) or dynamic forwarded ports.
    pub fn port_forwarding(mut self, p: PortForwarding) -> Self {
        self.port_forwarding = p;
        self
    }
    /// Overrides the init container's `PORT_MAPPINGS` ("vpn:virtual-server" pairs).
    pub fn port_mappings(mut self, m: impl Into<String>) -> Self {
        self.port_mappings = Some(m.into());
        self
    }

    pub fn build(self) -> Result<Lab, LabError> {
        Lab::build(self)
    }
}

/// Finds a sibling binary of the running executable: `target/debug/X` from the binary itself
/// or from an integration test in `target/debug/deps/`.
pub fn find_binary(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    for d in [
        dir.clone(),
        dir.parent().map(Path::to_path_buf).unwrap_or_default(),
    ] {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    dir.join(name)
}

/// A background process the lab started in one of its namespaces.
#[derive(Debug)]
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(ns: &Netns, program: &Path, args: &[String], log: &Path) -> Result<Self, LabError> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err(format!("open log {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("open log {}", log.display())))?;
        let child = ns
            .command(program)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(io_err(format!(
                "spawn {} in {}",
                program.display(),
                ns.name()
            )))?;
        Ok(Self { child })
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(-1)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    fn kill_and_reap(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `lines` lines of a file (empty when unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn wait_tcp(ns: &Netns, addr: SocketAddr, what: &str, timeout: Duration) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    let ok = ns.run_in(|| loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    })?;
    if ok {
        Ok(())
    } else {
        Err(LabError::NotReady {
            what: format!("{what} on {addr} in {}", ns.name()),
            secs: timeout.as_secs(),
            detail: String::new(),
        })
    }
}

/// A router namespace and its `vpn-router` process.
#[derive(Debug)]
pub struct RouterNode {
    pub index: usize,
    pub ns: Netns,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    sw: Netns,
    bin: Option<PathBuf>,
    proc_: Mutex<Option<Proc>>,
}

impl RouterNode {
    /// Starts `vpn-router run --config` (no-op if running) and waits until its api answers.
    pub fn start(&self) -> Result<(), LabError> {
        let bin = self
            .bin
            .clone()
            .unwrap_or_else(|| find_binary("vpn-router", "VPN_ROUTER_BIN"));
        if !bin.is_file() {
            return Err(LabError::NoRouterBinary { path: bin });
        }
        {
            let mut g = self.proc_.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = g.as_mut() {
                if p.exited().is_none() {
                    return Ok(());
                }
            }
            let args = vec![
                "run".to_string(),
                "--config".to_string(),
                self.config_path.display().to_string(),
            ];
            *g = Some(Proc::spawn(&self.ns, &bin, &args, &self.log_path)?);
        }
        self.wait_api(Duration::from_secs(10))
    }

    fn wait_api(&self, timeout: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(LabError::RouterExited {
                    router: self.index,
                    status,
                    log: tail(&self.log_path, 15),
                });
            }
            if self.api_get("/healthz").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::NotReady {
                    what: format!("router {} api on :{}", self.index, topo::ROUTER_API_PORT),
                    secs: timeout.as_secs(),
                    detail: format!("; last log lines:\n{}", tail(&self.log_path, 15)),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Exit status if the router process has exited (None: running or never started).
    pub fn exited(&self) -> Option<String> {
        let mut g = self.proc_.lock().unwrap_or_else(|e| e.into_inner());
        g.as_mut().and_then(Proc::exited)
    }

    pub fn is_running(&self) -> bool {
        let mut g = self.proc_.lock().unwrap_or_else(|e| e.into_inner());
        g.as_mut().is_some_and(|p| p.exited().is_none())
    }

    /// kill -9: no goodbye advert, VIPs stay configured in the dead router's namespace.
    pub fn kill9(&self) {
        let g = self.proc_.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = g.as_ref() {
            p.signal(nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// The router pod dies: kill -9 of the daemon and every cable unplugged, so the kernel
    /// state it leaves behind (VIPs, routes) cannot answer anything — what a deleted or
    /// crashed pod looks like to the rest of the network. Undo with `revive_pod`.
    pub fn kill_pod(&self) -> Result<(), LabError> {
        self.kill9();
        for l in [RouterLink::Gateway, RouterLink::Vrrp, RouterLink::Pod] {
            self.cut_link(l)?;
        }
        Ok(())
    }

    /// Plugs the cables back in and starts the daemon again.
    pub fn revive_pod(&self) -> Result<(), LabError> {
        for l in [RouterLink::Gateway, RouterLink::Vrrp, RouterLink::Pod] {
            self.restore_link(l)?;
        }
        self.restart()
    }

    /// SIGTERM: graceful handover; waits up to `wait` for the exit.
    pub fn sigterm(&self, wait: Duration) -> Option<String> {
        {
            let g = self.proc_.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = g.as_ref() {
                p.signal(nix::sys::signal::Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// SIGHUP: reload the config.
    pub fn sighup(&self) {
        let g = self.proc_.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = g.as_ref() {
            p.signal(nix::sys::signal::Signal::SIGHUP);
        }
    }

    /// Stops (kill -9) and starts again with the same config.
    pub fn restart(&self) -> Result<(), LabError> {
        let old = self.proc_.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = old {
            p.kill_and_reap();
        }
        self.start()
    }

    fn switch_port(&self, link: RouterLink) -> String {
        match link {
            RouterLink::Gateway => format!("g-r{}", self.index),
            RouterLink::Vrrp => format!("v-r{}", self.index),
            RouterLink::Pod => format!("p-r{}", self.index),
        }
    }

    /// Unplugs a cable at the switch (the router sees carrier loss on its side).
    pub fn cut_link(&self, link: RouterLink) -> Result<(), LabError> {
        self.sw
            .ip(&["link", "set", &self.switch_port(link), "down"])?;
        Ok(())
    }

    pub fn restore_link(&self, link: RouterLink) -> Result<(), LabError> {
        self.sw
            .ip(&["link", "set", &self.switch_port(link), "up"])?;
        Ok(())
    }

    /// `GET http://127.0.0.1:9090<path>` from inside the router namespace.
    pub fn api_get(&self, path: &str) -> Result<HttpResponse, LabError> {
        let url = format!("http://127.0.0.1:{}{path}", topo::ROUTER_API_PORT);
        Ok(self
            .ns
            .run_in(|| http::get(&url, Duration::from_millis(1000)))??)
    }

    /// Rewrites this router's config file (takes effect on SIGHUP or restart).
    pub fn rewrite_config(&self, f: impl FnOnce(&str) -> String) -> Result<(), LabError> {
        let old = std::fs::read_to_string(&self.config_path)
            .map_err(io_err(format!("read {}", self.config_path.display())))?;
        std::fs::write(&self.config_path, f(&old))
            .map_err(io_err(format!("write {}", self.config_path.display())))
    }

    /// Per-gateway health as this router reports it in `/status`
    /// (`components.gateways.detail.gateways[].{address,state}`); None when not reported.
    pub fn gateway_states(&self) -> Option<Vec<(Ipv4Addr, String)>> {
        let v = self.status().ok()?;
        let gws = v["components"]["gateways"]["detail"]["gateways"].as_array()?;
        Some(
            gws.iter()
                .filter_map(|g| {
                    Some((
                        g["address"].as_str()?.parse().ok()?,
                        g["state"].as_str()?.to_string(),
                    ))
                })
                .collect(),
        )
    }

    /// The routes of egress table 180 (`ip route show table 180`), empty when it has none.
    pub fn egress_routes(&self) -> String {
        self.ns
            .ip(&["route", "show", "table", "180"])
            .unwrap_or_default()
    }

    /// `/status` parsed as JSON.
    pub fn status(&self) -> Result<serde_json::Value, LabError> {
        let r = self.api_get("/status")?;
        serde_json::from_str(&r.body).map_err(|e| LabError::Io {
            what: format!("router {} /status is not JSON", self.index),
            source: std::io::Error::other(e),
        })
    }

    /// True when this router's `gw0` (or a macvlan on it) holds the egress VIP.
    pub fn holds_egress_vip(&self) -> bool {
        self.ns
            .ip(&["-4", "-o", "addr", "show"])
            .map(|s| s.contains(&format!("inet {}/", topo::EGRESS_VIP)))
            .unwrap_or(false)
    }
}

/// A gateway namespace (a gluetun pod) and its control-server stand-in.
#[derive(Debug)]
pub struct GatewayNode {
    pub index: usize,
    pub ns: Netns,
    pub state_file: PathBuf,
    pub log_path: PathBuf,
    healthy_state: Mutex<GluetunState>,
    lab_bin: PathBuf,
    proc_: Mutex<Option<Proc>>,
    faithful: Option<Faithful>,
}

/// The gluetun-pod side of a gateway.
#[derive(Debug)]
struct Faithful {
    /// The VPN provider's namespace: the tunnel's far end, the gateway's public IP.
    provider: Netns,
    spec: GatewayPodSpec,
    /// Set once the pod started.
    pod: Mutex<Option<PodRun>>,
    dynamic: bool,
    /// Ports the provider forwards to this gateway now.
    forwarded: Mutex<Vec<u16>>,
}

impl GatewayNode {
    pub fn address(&self) -> Ipv4Addr {
        topo::gateway(self.index)
    }
    pub fn public_ip(&self) -> Ipv4Addr {
        topo::gateway_public(self.index)
    }
    /// The gateway's interface on the VPN gateway network (the example's Multus name for the
    /// gluetun pod, `gw0` for the permissive one).
    pub fn lan_if(&self) -> &str {
        self.faithful
            .as_ref()
            .map_or("gw0", |f| f.spec.gateway_interface.as_str())
    }
    /// The namespace whose `wan0` is on the Internet: the provider's for a gluetun pod.
    pub fn wan_ns(&self) -> &Netns {
        self.faithful.as_ref().map_or(&self.ns, |f| &f.provider)
    }
    /// The provider namespace (None for a permissive gateway).
    pub fn provider(&self) -> Option<&Netns> {
        self.faithful.as_ref().map(|f| &f.provider)
    }
    /// Ports the Internet reaches this gateway's ingress VIP through, now.
    pub fn forwarded_ports(&self) -> Vec<u16> {
        match &self.faithful {
            Some(f) => f
                .forwarded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            None => vec![topo::gateway_forwarded_port(self.index)],
        }
    }
    /// The first of `forwarded_ports`.
    pub fn forwarded_port(&self) -> Option<u16> {
        self.forwarded_ports().first().copied()
    }
    /// What gluetun ran in this gateway (firewall, post-rules, scripts), for failure messages.
    pub fn pod_log(&self) -> String {
        self.faithful
            .as_ref()
            .and_then(|f| {
                f.pod
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(|p| p.log.join("\n"))
            })
            .unwrap_or_default()
    }

    /// Where the stand-in listens: gluetun's `HTTP_CONTROL_SERVER_ADDRESS` and
    /// `HEALTH_SERVER_ADDRESS` for a gluetun pod (":8000" is every address).
    fn listen_addrs(&self) -> (String, String) {
        let Some(f) = &self.faithful else {
            return (
                format!("0.0.0.0:{}", topo::GLUETUN_PORT),
                format!("0.0.0.0:{}", topo::GLUETUN_HEALTH_PORT),
            );
        };
        let fix = |a: &str| {
            if a.starts_with(':') {
                format!("0.0.0.0{a}")
            } else {
                a.to_owned()
            }
        };
        (
            fix(f.spec.env("HTTP_CONTROL_SERVER_ADDRESS")),
            fix(f.spec.env("HEALTH_SERVER_ADDRESS")),
        )
    }

    /// Starts the gluetun stand-in (no-op when running) and waits for its port.
    pub fn start(&self) -> Result<(), LabError> {
        let (control, health) = self.listen_addrs();
        {
            let mut g = self.proc_.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = g.as_mut() {
                if p.exited().is_none() {
                    return Ok(());
                }
            }
            let args = vec![
                "gluetun".to_string(),
                "--listen".to_string(),
                control,
                "--health-listen".to_string(),
                health,
                "--state-file".to_string(),
                self.state_file.display().to_string(),
                "--log".to_string(),
                self.log_path.display().to_string(),
            ];
            *g = Some(Proc::spawn(&self.ns, &self.lab_bin, &args, &self.log_path)?);
        }
        wait_tcp(
            &self.ns,
            SocketAddr::from((self.address(), topo::GLUETUN_PORT)),
            "gluetun stand-in",
            Duration::from_secs(5),
        )
    }

    /// Writes the stand-in's state (takes effect on the next request).
    pub fn set_state(&self, s: &GluetunState) -> Result<(), LabError> {
        write_state(&self.state_file, s)
            .map_err(io_err(format!("write {}", self.state_file.display())))
    }

    pub fn healthy_state(&self) -> GluetunState {
        self.healthy_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Drops (true) or restores (false) everything the gateway would forward: the tunnel (the
    /// provider's side of it for a gluetun pod).
    pub fn set_tunnel_dead(&self, dead: bool) -> Result<(), LabError> {
        let rules = if dead {
            "flush chain ip lab tunnel\nadd rule ip lab tunnel counter drop\n"
        } else {
            "flush chain ip lab tunnel\n"
        };
        self.wan_ns().nft(rules)?;
        Ok(())
    }

    /// The provider hands out `ports` (dynamic port forwarding only): the provider forwards
    /// them instead of the old ones, and gluetun runs what it runs on a change (the example's
    /// DOWN command with the old ports, then UP with the new) and reports them on
    /// `/v1/portforward`.
    pub fn set_forwarded_ports(&self, ports: &[u16]) -> Result<(), LabError> {
        let f = self
            .faithful
            .as_ref()
            .filter(|f| f.dynamic)
            .ok_or_else(|| {
                LabError::Params(
                    "set_forwarded_ports needs gluetun gateways with PortForwarding::Dynamic"
                        .into(),
                )
            })?;
        let old = self.forwarded_ports();
        let mut pod = f.pod.lock().unwrap_or_else(|e| e.into_inner());
        let pod = pod
            .as_mut()
            .ok_or_else(|| LabError::GatewayPod("the gateway pod has not started".into()))?;
        gluetun_pod::provider_forward(&f.provider, &old, ports)?;
        pod.forward_ports(&self.ns, &old, ports)
            .map_err(LabError::GatewayPod)?;
        *f.forwarded.lock().unwrap_or_else(|e| e.into_inner()) = ports.to_vec();
        let mut healthy = self.healthy_state.lock().unwrap_or_else(|e| e.into_inner());
        healthy.ports = Some(ports.to_vec());
        let mut now =
            crate::servers::read_state(&self.state_file).unwrap_or_else(|_| healthy.clone());
        now.ports = Some(ports.to_vec());
        drop(healthy);
        self.set_state(&now)
    }

    /// Breaks the gateway in one realistic way. Every break but `AuthChanged` also stops the
    /// data plane: a stopped, crashed or IP-less VPN forwards nothing.
    pub fn break_as(&self, how: GatewayBreak) -> Result<(), LabError> {
        if how != GatewayBreak::AuthChanged {
            self.set_tunnel_dead(true)?;
        }
        match how {
            GatewayBreak::ProcessGone => {
                let p = self.proc_.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(p) = p {
                    p.kill_and_reap();
                }
            }
            other => {
                if let Some(s) = other.apply(&self.healthy_state()) {
                    self.set_state(&s)?;
                }
            }
        }
        Ok(())
    }

    /// Back to healthy: state, tunnel and process.
    pub fn repair(&self) -> Result<(), LabError> {
        self.set_state(&self.healthy_state())?;
        self.set_tunnel_dead(false)?;
        self.start()
    }

    /// Packets this gateway forwarded from the VPN network out to the Internet (counted where
    /// they leave for the Internet: the provider, for a gluetun pod).
    pub fn egress_packets(&self) -> Result<u64, LabError> {
        counter_packets(self.wan_ns(), "egress")
    }

    /// `GET` on the stand-in's control server from the gateway namespace itself.
    pub fn control_get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse, LabError> {
        let url = format!("http://{}:{}{path}", self.address(), topo::GLUETUN_PORT);
        Ok(self
            .ns
            .run_in(|| http::request("GET", &url, headers, "", Duration::from_secs(2)))??)
    }

    /// `GET /` on the health server (gluetun's listens on loopback only).
    pub fn health_get(&self) -> Result<HttpResponse, LabError> {
        let (_, health) = self.listen_addrs();
        let url = format!("http://{}/", health.replace("0.0.0.0", "127.0.0.1"));
        Ok(self
            .ns
            .run_in(|| http::get(&url, Duration::from_secs(2)))??)
    }

    /// Starts the gluetun pod: its init containers, gluetun's firewall, post-rules, routing
    /// and tunnel (no-op for a permissive gateway).
    fn start_pod(&self, dir: &Path, mappings: Option<&str>) -> Result<(), LabError> {
        let Some(f) = &self.faithful else {
            return Ok(());
        };
        let mut init_env = Vec::new();
        if f.dynamic {
            init_env.push(("PORT_MAPPINGS".to_owned(), String::new()));
        } else if let Some(m) = mappings {
            init_env.push(("PORT_MAPPINGS".to_owned(), m.to_owned()));
        }
        let tunnel = Tunnel {
            provider: f.provider.clone(),
            endpoint: (self.public_ip(), 51820),
        };
        let pod = PodRun::start(
            f.spec.clone(),
            &self.ns,
            &tunnel,
            &gluetun_pod::volumes_dir(dir, self.index),
            &init_env,
        )
        .map_err(LabError::GatewayPod)?;
        *f.pod.lock().unwrap_or_else(|e| e.into_inner()) = Some(pod);
        Ok(())
    }
}

/// The VPN ports of "vpn:virtual-server" pairs.
fn mapped_vpn_ports(mappings: &str) -> Result<Vec<u16>, LabError> {
    mappings
        .split_whitespace()
        .map(|m| {
            m.split(':')
                .next()
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    LabError::GatewayPod(format!("PORT_MAPPINGS entry {m:?} is not vpn-port:port"))
                })
        })
        .collect()
}

/// The elements of the node's `leaked` set: `input interface . source . destination .
/// protocol` of each flow the `leak` counter counted.
pub fn leaked_flows(node: &Netns) -> String {
    node.exec("nft", &["list", "set", "ip", "lab", "leaked"])
        .ok()
        .and_then(|s| {
            let start = s.find("elements = {")?;
            let rest = &s[start + 12..];
            Some(
                rest[..rest.find('}').unwrap_or(rest.len())]
                    .trim()
                    .to_string(),
            )
        })
        .unwrap_or_default()
}

/// Packets of the nft counter `name` of table `ip lab` in `ns`.
pub fn counter_packets(ns: &Netns, name: &str) -> Result<u64, LabError> {
    let out = ns.exec("nft", &["-j", "list", "counter", "ip", "lab", name])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| LabError::Io {
        what: format!("nft counter {name} in {}", ns.name()),
        source: std::io::Error::other(e),
    })?;
    Ok(v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|o| o["counter"]["packets"].as_u64()))
        .unwrap_or(0))
}

/// A pod on the VPN gateway network: an ordinary client or an ingress pod.
#[derive(Debug)]
pub struct PodNode {
    pub index: usize,
    pub ns: Netns,
    pub address: Ipv4Addr,
}

impl PodNode {
    /// `GET url` from this pod; the body on 200, an error otherwise.
    pub fn http_get(&self, url: &str) -> Result<String, LabError> {
        self.http_get_timeout(url, Duration::from_secs(2))
    }

    pub fn http_get_timeout(&self, url: &str, timeout: Duration) -> Result<String, LabError> {
        let r = self.ns.run_in(|| http::get(url, timeout))??;
        if r.status != 200 {
            return Err(LabError::Io {
                what: format!("GET {url} from {}", self.ns.name()),
                source: std::io::Error::other(format!("HTTP {}", r.status)),
            });
        }
        Ok(r.body)
    }

    /// The exit IP the Internet echo sees for one new connection.
    pub fn exit_ip(&self, timeout: Duration) -> Result<Ipv4Addr, LabError> {
        let body = self.http_get_timeout(&format!("http://{}/", topo::INTERNET_ECHO), timeout)?;
        body.trim().parse().map_err(|_| LabError::Io {
            what: "echo answer".into(),
            source: std::io::Error::other(format!("not an address: {body:?}")),
        })
    }

    /// Opens `n` long-lived TCP connections to the Internet echo (port 7).
    pub fn open_flows(&self, n: usize, timeout: Duration) -> Result<Flows, LabError> {
        let target = SocketAddr::from((topo::INTERNET_ECHO, 7));
        Ok(self.ns.run_in(|| Flows::open(target, n, timeout))?)
    }

    /// Runs `ping` at `interval` for `duration` while `action` runs (started after `lead`),
    /// and reports the longest gap between replies.
    pub fn ping_outage<F: FnOnce() + Send>(
        &self,
        target: Ipv4Addr,
        interval: Duration,
        duration: Duration,
        lead: Duration,
        action: F,
    ) -> Result<probe::Outage, LabError> {
        probe::ping_outage(&self.ns, target, interval, duration, lead, action)
    }

    /// Runs a program in the pod's namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, LabError> {
        Ok(self.ns.exec(program, args)?)
    }
}

/// A running lab. Dropping it tears everything down.
#[derive(Debug)]
pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    sw: Netns,
    inet: Netns,
    node: Netns,
    routers: Vec<RouterNode>,
    gateways: Vec<GatewayNode>,
    clients: Vec<PodNode>,
    ingress: Vec<PodNode>,
    services: Mutex<Vec<Proc>>,
    dns: bool,
    lab_bin: PathBuf,
    torn_down: AtomicBool,
    /// How long `build` took.
    pub setup_time: Duration,
}

impl Lab {
    pub fn builder() -> LabBuilder {
        LabBuilder::default()
    }

    fn all_namespaces(&self) -> Vec<Netns> {
        let mut v = vec![self.inet.clone(), self.node.clone()];
        v.extend(self.routers.iter().map(|r| r.ns.clone()));
        v.extend(self.gateways.iter().map(|g| g.ns.clone()));
        v.extend(self.gateways.iter().filter_map(|g| g.provider().cloned()));
        v.extend(self.clients.iter().map(|c| c.ns.clone()));
        v.extend(self.ingress.iter().map(|c| c.ns.clone()));
        v.push(self.sw.clone());
        v
    }

    fn build(b: LabBuilder) -> Result<Lab, LabError> {
        let started = Instant::now();
        if b.gateways == 0 || b.gateways > topo::MAX_GATEWAYS {
            return Err(LabError::Params(format!(
                "gateways must be 1..={}",
                topo::MAX_GATEWAYS
            )));
        }
        if b.ingress_pods > topo::MAX_INGRESS_PODS || b.clients > 100 || b.routers > 100 {
            return Err(LabError::Params(
                "at most 14 ingress pods, 100 clients, 100 routers".into(),
            ));
        }
        check_prerequisites(b.dns)?;
        netns::sweep_stale();

        let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("vrl{}x{n}", std::process::id());
        let dir = Path::new(LAB_ROOT).join(&prefix);
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        let me = i32::try_from(std::process::id()).unwrap_or(-1);
        if let Some(t) = netns::proc_starttime(me) {
            let f = dir.join(netns::OWNER_FILE);
            std::fs::write(&f, t.to_string()).map_err(io_err(format!("write {}", f.display())))?;
        }
        if let Ok(mut l) = LIVE_LABS.lock() {
            l.push(prefix.clone());
        }
        let lab_bin = b
            .lab_bin
            .clone()
            .unwrap_or_else(|| find_binary("vpn-router-lab", "VPN_ROUTER_LAB_BIN"));
        let name = |role: &str| format!("{prefix}-{role}");

        // The Lab exists from here on, so any error below tears down what was made.
        let mut lab = Lab {
            prefix: prefix.clone(),
            dir: dir.clone(),
            sw: Netns::named(&name("sw")),
            inet: Netns::named(&name("inet")),
            node: Netns::named(&name("node")),
            routers: Vec::new(),
            gateways: Vec::new(),
            clients: Vec::new(),
            ingress: Vec::new(),
            services: Mutex::new(Vec::new()),
            dns: b.dns,
            lab_bin: lab_bin.clone(),
            torn_down: AtomicBool::new(false),
            setup_time: Duration::ZERO,
        };
        if !lab_bin.is_file() {
            return Err(LabError::Io {
                what: format!("lab binary {}", lab_bin.display()),
                source: std::io::Error::other(
                    "not found: build it with `cargo build -p vpn-router-tests --bin vpn-router-lab` or set VPN_ROUTER_LAB_BIN",
                ),
            });
        }
        for ns in [&lab.sw, &lab.inet, &lab.node] {
            Netns::create(ns.name())?;
        }
        let secrets = lab.write_secrets(&b)?;
        for k in 0..b.routers {
            let ns = Netns::create(&name(&format!("r{k}")))?;
            lab.routers.push(RouterNode {
                index: k,
                ns,
                config_path: dir.join(format!("r{k}.yaml")),
                log_path: dir.join(format!("r{k}.log")),
                sw: lab.sw.clone(),
                bin: b.router_bin.clone(),
                proc_: Mutex::new(None),
            });
        }
        let spec = match &b.gateway_kind {
            GatewayKind::Gluetun => {
                Some(GatewayPodSpec::load().map_err(|e| LabError::GatewayPod(e.to_string()))?)
            }
            GatewayKind::GluetunSpec(s) => Some((**s).clone()),
            GatewayKind::Permissive => None,
        };
        let spec = spec.map(|mut s| {
            if b.port_forwarding == PortForwarding::Dynamic {
                s.gluetun
                    .env
                    .insert("VPN_PORT_FORWARDING".into(), "on".into());
            }
            s
        });
        // The ports a fixed-port provider forwards: the example's PORT_MAPPINGS (or the
        // builder's), VPN side.
        let fixed_ports = match (&spec, b.port_forwarding) {
            (Some(s), PortForwarding::Fixed) => {
                let from_spec = s
                    .init
                    .iter()
                    .find_map(|c| c.env.get("PORT_MAPPINGS").cloned())
                    .unwrap_or_default();
                mapped_vpn_ports(b.port_mappings.as_deref().unwrap_or(&from_spec))?
            }
            _ => Vec::new(),
        };
        for i in 0..b.gateways {
            let ns = Netns::create(&name(&format!("gw{i}")))?;
            let faithful = match &spec {
                Some(s) => Some(Faithful {
                    provider: Netns::create(&name(&format!("vpn{i}")))?,
                    spec: s.clone(),
                    pod: Mutex::new(None),
                    dynamic: b.port_forwarding == PortForwarding::Dynamic,
                    forwarded: Mutex::new(Vec::new()),
                }),
                None => None,
            };
            // What the stand-in reports on /v1/portforward: gluetun's port forwarding never
            // ran unless it is on (the permissive gateway keeps the old lab's one port).
            let ports = match &faithful {
                Some(f) if f.dynamic => Some(Vec::new()),
                Some(_) => None,
                None => Some(vec![topo::gateway_forwarded_port(i)]),
            };
            lab.gateways.push(GatewayNode {
                index: i,
                ns,
                state_file: dir.join(format!("gw{i}.state.json")),
                log_path: dir.join(format!("gw{i}.log")),
                healthy_state: Mutex::new(GluetunState::running(
                    &topo::gateway_public(i).to_string(),
                    ports,
                    b.auth.clone(),
                )),
                lab_bin: lab_bin.clone(),
                proc_: Mutex::new(None),
                faithful,
            });
        }
        for j in 0..b.clients {
            let ns = Netns::create(&name(&format!("c{j}")))?;
            lab.clients.push(PodNode {
                index: j,
                ns,
                address: topo::client(j),
            });
        }
        for m in 0..b.ingress_pods {
            let ns = Netns::create(&name(&format!("in{m}")))?;
            lab.ingress.push(PodNode {
                index: m,
                ns,
                address: topo::ingress_pod(m),
            });
        }
        lab.wire()?;
        lab.start_services(&b, &fixed_ports)?;
        for r in &lab.routers {
            let y = config::router_config(&RouterConfigInput {
                router: r.index,
                routers: b.routers,
                gateways: b.gateways,
                ingress_pods: if ipvs_available() { b.ingress_pods } else { 0 },
                auth: b.auth.clone(),
                secrets: secrets.clone(),
                tuning: b.tuning.clone(),
            });
            std::fs::write(&r.config_path, y)
                .map_err(io_err(format!("write {}", r.config_path.display())))?;
        }
        if b.start_routers {
            for r in &lab.routers {
                r.start()?;
            }
        }
        lab.setup_time = started.elapsed();
        Ok(lab)
    }

    fn write_secrets(&self, b: &LabBuilder) -> Result<RouterSecrets, LabError> {
        let gluetun_secret_file = match &b.auth {
            GluetunAuth::None => None,
            GluetunAuth::Basic { password, .. } => Some((password.clone(), "gluetun-password")),
            GluetunAuth::ApiKey { key } => Some((key.clone(), "gluetun-api-key")),
        }
        .map(|(secret, file)| {
            let p = self.dir.join(file);
            std::fs::write(&p, secret)
                .map(|_| p.clone())
                .map_err(io_err(format!("write {}", p.display())))
        })
        .transpose()?;
        let tsig_secret_file = if b.dns {
            let mut raw = [0u8; 32];
            use std::io::Read as _;
            File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut raw))
                .map_err(io_err("read /dev/urandom"))?;
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
            let p = self.dir.join("tsig.secret");
            std::fs::write(&p, format!("{b64}\n"))
                .map_err(io_err(format!("write {}", p.display())))?;
            Some(p)
        } else {
            None
        };
        Ok(RouterSecrets {
            gluetun_secret_file,
            tsig_secret_file,
        })
    }

    /// Bridges, veths, addresses, routes, sysctls and nft rules.
    fn wire(&self) -> Result<(), LabError> {
        let mtu = topo::GW_NET_MTU;
        let gp = topo::GW_NET_PREFIX;
        let mut sw = vec![
            format!("link add brgw mtu {mtu} type bridge"),
            "link add brvrrp type bridge".to_string(),
            "link add brpod type bridge".to_string(),
            "link add brinet type bridge".to_string(),
        ];
        // (switch port, bridge, namespace, inner name, mtu)
        let mut ports: Vec<(String, &str, &Netns, &str, u32)> = Vec::new();
        for r in &self.routers {
            let k = r.index;
            ports.push((format!("g-r{k}"), "brgw", &r.ns, "gw0", mtu));
            ports.push((format!("v-r{k}"), "brvrrp", &r.ns, "vrrp0", 1500));
            ports.push((format!("p-r{k}"), "brpod", &r.ns, "eth0", 1500));
        }
        for g in &self.gateways {
            let i = g.index;
            ports.push((format!("g-gw{i}"), "brgw", &g.ns, g.lan_if(), mtu));
            ports.push((format!("i-gw{i}"), "brinet", g.wan_ns(), "wan0", 1500));
            if g.faithful.is_some() {
                // A pod's primary network: gluetun needs its default route (and finds the
                // pod network as a local network).
                ports.push((format!("p-gw{i}"), "brpod", &g.ns, "eth0", 1500));
            }
        }
        for c in &self.clients {
            let j = c.index;
            ports.push((format!("g-c{j}"), "brgw", &c.ns, "gw0", mtu));
            ports.push((format!("p-c{j}"), "brpod", &c.ns, "eth0", 1500));
        }
        for p in &self.ingress {
            ports.push((format!("g-in{}", p.index), "brgw", &p.ns, "gw0", mtu));
        }
        ports.push(("p-node".into(), "brpod", &self.node, "eth0", 1500));
        ports.push(("i-node".into(), "brinet", &self.node, "wan0", 1500));
        ports.push(("i-inet".into(), "brinet", &self.inet, "wan0", 1500));
        for (port, br, ns, inner, m) in &ports {
            sw.push(format!(
                "link add {port} mtu {m} type veth peer name {inner} mtu {m} netns {}",
                ns.name()
            ));
            sw.push(format!("link set {port} master {br} up"));
        }
        for br in ["brgw", "brvrrp", "brpod", "brinet"] {
            sw.push(format!("link set {br} up"));
        }
        self.sw.ip_batch(&sw)?;

        let up = |name: &str| format!("link set {name} up");
        for r in &self.routers {
            let k = r.index;
            r.ns.ip_batch(&[
                format!("addr add {}/{gp} dev gw0", topo::router_gw(k)),
                format!("addr add {}/24 dev vrrp0", topo::router_vrrp(k)),
                format!("addr add {}/16 dev eth0", topo::router_pod(k)),
                up("gw0"),
                up("vrrp0"),
                up("eth0"),
                format!("route add default via {} dev eth0", topo::NODE_POD),
            ])?;
        }
        for g in &self.gateways {
            let i = g.index;
            if let Some(f) = &g.faithful {
                self.wire_gluetun_gateway(g, f)?;
                continue;
            }
            g.ns.ip_batch(&[
                format!("addr add {}/{gp} dev gw0", topo::gateway(i)),
                format!("addr add {}/24 dev wan0", topo::gateway_public(i)),
                up("gw0"),
                up("wan0"),
                format!("route add default via {} dev wan0", topo::INTERNET_ECHO),
            ])?;
            g.ns.sysctl("net.ipv4.ip_forward", "1")?;
            g.ns.nft(&gateway_nft(i))?;
        }
        for c in &self.clients {
            c.ns.ip_batch(&[
                format!("addr add {}/{gp} dev gw0", c.address),
                format!("addr add {}/16 dev eth0", topo::client_pod(c.index)),
                up("gw0"),
                up("eth0"),
                format!("route add default via {} dev gw0", topo::EGRESS_VIP),
                format!("route add 10.0.0.0/8 via {} dev eth0", topo::NODE_POD),
            ])?;
        }
        for p in &self.ingress {
            p.ns.ip_batch(&[
                format!("addr add {}/{gp} dev gw0", p.address),
                up("gw0"),
                format!("route add default via {} dev gw0", topo::EGRESS_VIP),
            ])?;
        }
        self.node.ip_batch(&[
            format!("addr add {}/16 dev eth0", topo::NODE_POD),
            format!("addr add {}/24 dev wan0", topo::NODE_PUBLIC),
            up("eth0"),
            up("wan0"),
            format!("route add default via {} dev wan0", topo::INTERNET_ECHO),
        ])?;
        self.node.sysctl("net.ipv4.ip_forward", "1")?;
        self.node.nft(NODE_NFT)?;
        self.inet.ip_batch(&[
            format!("addr add {}/24 dev wan0", topo::INTERNET_ECHO),
            format!("addr add {}/24 dev wan0", topo::INTERNET_DNS),
            up("wan0"),
        ])?;
        Ok(())
    }

    /// A gluetun pod's plumbing, before the pod starts: its attachment and primary network
    /// (as Multus and the CNI leave them), and the provider: public address, the tunnel's far
    /// end (proxy ARP, the route to the tunnel address), masquerade, forwarded ports. The
    /// tunnel's near end waits in the provider until gluetun would create it.
    fn wire_gluetun_gateway(&self, g: &GatewayNode, f: &Faithful) -> Result<(), LabError> {
        let i = g.index;
        let lan = g.lan_if();
        g.ns.ip_batch(&[
            format!(
                "addr add {}/{} dev {lan}",
                topo::gateway(i),
                topo::GW_NET_PREFIX
            ),
            format!("addr add {}/16 dev eth0", topo::gateway_pod(i)),
            format!("link set {lan} up"),
            "link set eth0 up".into(),
            format!("route add default via {} dev eth0", topo::NODE_POD),
        ])?;
        gluetun_pod::wire_provider(
            &f.provider,
            &f.spec,
            topo::gateway_public(i),
            24,
            topo::INTERNET_ECHO,
        )
        .map_err(LabError::GatewayPod)?;
        Ok(())
    }

    fn spawn_service(
        &self,
        ns: &Netns,
        program: &Path,
        args: &[String],
        log: &str,
    ) -> Result<(), LabError> {
        let p = Proc::spawn(ns, program, args, &self.dir.join(log))?;
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p);
        Ok(())
    }

    fn start_services(&self, b: &LabBuilder, fixed_ports: &[u16]) -> Result<(), LabError> {
        let echo = SocketAddr::from((topo::INTERNET_ECHO, 80));
        self.spawn_service(
            &self.inet,
            &self.lab_bin,
            &[
                "serve".into(),
                "--name".into(),
                "internet".into(),
                "--http".into(),
                echo.to_string(),
                "--tcp-echo".into(),
                format!("{}:7", topo::INTERNET_ECHO),
                "--udp-echo".into(),
                format!("{}:7", topo::INTERNET_ECHO),
                "--log".into(),
                self.dir.join("internet-seen.log").display().to_string(),
            ],
            "internet.log",
        )?;
        let intranet = SocketAddr::from((topo::NODE_POD, 80));
        self.spawn_service(
            &self.node,
            &self.lab_bin,
            &[
                "serve".into(),
                "--name".into(),
                "intranet".into(),
                "--http".into(),
                intranet.to_string(),
            ],
            "intranet.log",
        )?;
        for p in &self.ingress {
            self.spawn_service(
                &p.ns,
                &self.lab_bin,
                &[
                    "serve".into(),
                    "--name".into(),
                    format!("ingress-pod-{}", p.index),
                    "--http".into(),
                    format!("0.0.0.0:{}", topo::INGRESS_PORT),
                    "--udp-echo".into(),
                    format!("0.0.0.0:{}", topo::INGRESS_PORT),
                ],
                &format!("in{}.log", p.index),
            )?;
        }
        for g in &self.gateways {
            g.set_state(&g.healthy_state())?;
            g.start_pod(&self.dir, b.port_mappings.as_deref())?;
            if let Some(f) = &g.faithful {
                if !f.dynamic {
                    gluetun_pod::provider_forward(&f.provider, &[], fixed_ports)?;
                    *f.forwarded.lock().unwrap_or_else(|e| e.into_inner()) = fixed_ports.to_vec();
                }
            }
            g.start()?;
            if g.faithful.as_ref().is_some_and(|f| f.dynamic) {
                g.set_forwarded_ports(&[topo::gateway_forwarded_port(g.index)])?;
            }
        }
        if self.dns {
            let conf = self.dir.join("named.conf");
            let secret = std::fs::read_to_string(self.dir.join("tsig.secret"))
                .map_err(io_err("read tsig.secret"))?;
            std::fs::write(
                &conf,
                dns::named_conf(&self.dir, topo::INTERNET_DNS, secret.trim()),
            )
            .map_err(io_err("write named.conf"))?;
            std::fs::write(
                self.dir.join(format!("{}.zone", topo::DNS_ZONE)),
                dns::zone_file(),
            )
            .map_err(io_err("write zone file"))?;
            self.spawn_service(
                &self.inet,
                Path::new("named"),
                &["-g".into(), "-c".into(), conf.display().to_string()],
                "named.log",
            )?;
        }
        wait_tcp(&self.inet, echo, "Internet echo", Duration::from_secs(5))?;
        wait_tcp(
            &self.node,
            intranet,
            "intranet echo",
            Duration::from_secs(5),
        )?;
        for p in &self.ingress {
            wait_tcp(
                &p.ns,
                SocketAddr::from((p.address, topo::INGRESS_PORT)),
                "ingress pod service",
                Duration::from_secs(5),
            )?;
        }
        if self.dns {
            wait_tcp(
                &self.inet,
                SocketAddr::from((topo::INTERNET_DNS, 53)),
                "named",
                Duration::from_secs(10),
            )
            .and_then(|()| {
                // Listening comes before the zone is loaded: wait until it answers for it.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match self.dns_soa_serial() {
                        Ok(_) => return Ok(()),
                        Err(e) if Instant::now() >= deadline => {
                            return Err(LabError::NotReady {
                                what: format!("named's zone {} ({e})", topo::DNS_ZONE),
                                secs: 10,
                                detail: String::new(),
                            })
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
            .map_err(|e| match e {
                LabError::NotReady { what, secs, .. } => LabError::NotReady {
                    what,
                    secs,
                    detail: format!("; named.log:\n{}", tail(&self.dir.join("named.log"), 10)),
                },
                e => e,
            })?;
        }
        Ok(())
    }

    pub fn router(&self, k: usize) -> &RouterNode {
        &self.routers[k]
    }
    pub fn routers(&self) -> &[RouterNode] {
        &self.routers
    }
    /// The last `n` lines of every router's daemon log, one block per router (for the
    /// message of a failed test).
    pub fn router_log_tails(&self, n: usize) -> String {
        self.routers
            .iter()
            .map(|r| {
                let log = std::fs::read_to_string(&r.log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(n).collect();
                format!(
                    "--- router {} log (last {n} lines):\n{}",
                    r.index,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
    pub fn gateway(&self, i: usize) -> &GatewayNode {
        &self.gateways[i]
    }
    pub fn gateways(&self) -> &[GatewayNode] {
        &self.gateways
    }
    pub fn client(&self, j: usize) -> &PodNode {
        &self.clients[j]
    }
    pub fn ingress_pod(&self, m: usize) -> &PodNode {
        &self.ingress[m]
    }
    /// True when the lab runs BIND on the Internet.
    pub fn has_dns(&self) -> bool {
        self.dns
    }
    pub fn clients(&self) -> &[PodNode] {
        &self.clients
    }
    pub fn ingress_pods(&self) -> &[PodNode] {
        &self.ingress
    }
    /// The "Internet" namespace (echo 203.0.113.1, DNS 203.0.113.53, remote clients).
    pub fn internet(&self) -> &Netns {
        &self.inet
    }
    /// The node namespace: the pod network's gateway to the Internet (the leak path).
    pub fn node(&self) -> &Netns {
        &self.node
    }
    /// The switch namespace holding the bridges.
    pub fn switch(&self) -> &Netns {
        &self.sw
    }
    /// Names of every namespace of this lab.
    pub fn namespace_names(&self) -> Vec<String> {
        self.all_namespaces()
            .iter()
            .map(|n| n.name().to_string())
            .collect()
    }
    /// Pids of every process running in this lab's namespaces.
    pub fn pids(&self) -> Vec<i32> {
        netns::pids_in(&self.all_namespaces())
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    /// `interface . source . destination . protocol` of what [`Lab::leaked_packets`] counted
    /// (at most 256).
    pub fn leaked_flows(&self) -> String {
        leaked_flows(&self.node)
    }

    /// Packets of client pods (192.168.24.0/22) the node forwarded to the Internet: traffic
    /// that bypassed the VPN through a router's own default route. Must stay 0.
    pub fn leaked_packets(&self) -> Result<u64, LabError> {
        counter_packets(&self.node, "leak")
    }

    /// Every connection the Internet echo saw: `(kind, peer, local)`.
    pub fn internet_seen(&self) -> Vec<(String, SocketAddr, String)> {
        let text = std::fs::read_to_string(self.dir.join("internet-seen.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let kind = it.next()?.to_string();
                let peer = it.next()?.parse().ok()?;
                Some((kind, peer, it.next().unwrap_or("").to_string()))
            })
            .collect()
    }

    /// A request from the Internet (`203.0.113.1`) to `public_ip:port`.
    pub fn internet_http_get(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<HttpResponse, LabError> {
        Ok(self.inet.run_in(|| http::get(url, timeout))??)
    }

    /// The A records of `name` on the lab's DNS server; empty when the name has none. An
    /// error when named does not answer, or answers anything but NOERROR/NXDOMAIN, so "no
    /// records" is never confused with "no answer".
    pub fn dns_a_records(&self, name: &str) -> Result<Vec<Ipv4Addr>, LabError> {
        let mut v = Vec::new();
        for rdata in self.dns_query(name, "A")? {
            v.push(rdata.parse().map_err(|_| LabError::Dns {
                query: format!("{name} A"),
                reason: format!("answer {rdata:?} is not an IPv4 address"),
            })?);
        }
        v.sort();
        Ok(v)
    }

    /// The serial of the lab zone's SOA record (named increments it on every applied update).
    pub fn dns_soa_serial(&self) -> Result<u64, LabError> {
        let answers = self.dns_query(topo::DNS_ZONE, "SOA")?;
        answers
            .first()
            .and_then(|rdata| rdata.split_whitespace().nth(2))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| LabError::Dns {
                query: format!("{} SOA", topo::DNS_ZONE),
                reason: format!("no serial in the answer {answers:?}"),
            })
    }

    /// One query to the lab's named (up to 3 tries, 1 s each): the rdata of the answer
    /// records of type `rtype`.
    fn dns_query(&self, name: &str, rtype: &str) -> Result<Vec<String>, LabError> {
        let query = format!("{name} {rtype}");
        let out = self
            .inet
            .exec(
                "dig",
                &[
                    &format!("@{}", topo::INTERNET_DNS),
                    "+noall",
                    "+comments",
                    "+answer",
                    "+time=1",
                    "+tries=3",
                    name,
                    rtype,
                ],
            )
            .map_err(|e| LabError::Dns {
                query: query.clone(),
                reason: e.to_string(),
            })?;
        parse_dig(&out, rtype).map_err(|reason| LabError::Dns { query, reason })
    }

    /// Hand-made egress for plumbing tests, before vpn-router's engines exist: router `k`
    /// takes the egress VIP and sends everything (default route) to gateway `i`.
    /// This replaces the router's own default route — only for tests of the lab itself.
    pub fn static_egress(&self, k: usize, i: usize) -> Result<(), LabError> {
        let r = self.router(k);
        r.ns.sysctl("net.ipv4.ip_forward", "1")?;
        r.ns.ip_batch(&[
            format!(
                "addr replace {}/{} dev gw0",
                topo::EGRESS_VIP,
                topo::GW_NET_PREFIX
            ),
            format!("route replace default via {} dev gw0", topo::gateway(i)),
        ])?;
        Ok(())
    }

    /// Starts `tcpdump -w` on `iface` in `ns`; stop it with `Capture::stop`.
    pub fn capture(&self, ns: &Netns, iface: &str, filter: &str) -> Result<Capture, LabError> {
        if !which("tcpdump") {
            return Err(LabError::MissingTool {
                tool: "tcpdump",
                package: "tcpdump",
            });
        }
        let file = self.dir.join(format!(
            "{}-{iface}-{}.pcap",
            ns.name(),
            LAB_COUNTER.load(Ordering::SeqCst)
        ));
        let mut args = vec!["-i", iface, "-n", "-U", "--immediate-mode", "-w"];
        let f = file.display().to_string();
        args.push(&f);
        args.extend(filter.split_whitespace());
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let p = Proc::spawn(
            ns,
            Path::new("tcpdump"),
            &args,
            &self.dir.join("tcpdump.log"),
        )?;
        // tcpdump needs a moment to open the interface.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Capture {
            proc_: Some(p),
            file,
        })
    }

    /// Kills every process, deletes every namespace. Idempotent; also run on Drop.
    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        let nss = self.all_namespaces();
        netns::kill_all_in(&nss);
        for r in &self.routers {
            if let Some(p) = r.proc_.lock().unwrap_or_else(|e| e.into_inner()).take() {
                p.kill_and_reap();
            }
        }
        for g in &self.gateways {
            if let Some(p) = g.proc_.lock().unwrap_or_else(|e| e.into_inner()).take() {
                p.kill_and_reap();
            }
        }
        for p in self
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            p.kill_and_reap();
        }
        for ns in &nss {
            let _ = ns.destroy();
        }
        if let Ok(mut l) = LIVE_LABS.lock() {
            l.retain(|p| p != &self.prefix);
        }
        if std::thread::panicking() || std::env::var_os("VPN_ROUTER_LAB_KEEP").is_some() {
            eprintln!("lab {}: logs kept in {}", self.prefix, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A running `tcpdump -w`.
#[derive(Debug)]
pub struct Capture {
    proc_: Option<Proc>,
    pub file: PathBuf,
}

impl Capture {
    /// Stops the capture and counts packets matching `filter` (`tcpdump -r`).
    pub fn stop_and_count(self, filter: &str) -> Result<usize, LabError> {
        Ok(self.stop_and_read(filter)?.len())
    }

    /// Stops the capture and returns the packets matching `filter`, one `tcpdump -r -nn -tt`
    /// line each (the first field is the Unix time in seconds, microsecond precision).
    pub fn stop_and_read(mut self, filter: &str) -> Result<Vec<String>, LabError> {
        if let Some(mut p) = self.proc_.take() {
            // SIGINT lets tcpdump flush its file; kill it only if it does not exit.
            p.signal(nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(2);
            while p.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            p.kill_and_reap();
        }
        let f = self.file.display().to_string();
        let mut args = vec!["-nn", "-tt", "-r", f.as_str()];
        args.extend(filter.split_whitespace());
        let out = netns::run(Command::new("tcpdump").args(&args).stderr(Stdio::null()))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

/// The node: masquerades out of `wan0`, counts client packets (192.168.24.0/22) it forwards.
pub const NODE_NFT: &str = r#"table ip lab {
  counter leak { }
  counter forwarded { }
  set leaked {
    type ifname . ipv4_addr . ipv4_addr . inet_proto
    size 256
    flags dynamic
  }
  chain forward {
    type filter hook forward priority 0; policy accept;
    ip saddr 192.168.24.0/22 add @leaked { iifname . ip saddr . ip daddr . meta l4proto } counter name "leak"
    counter name "forwarded"
  }
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    oifname "wan0" masquerade
  }
}
"#;

fn gateway_nft(i: usize) -> String {
    gateway_nft_for(
        "gw0",
        "wan0",
        Some((
            topo::gateway_forwarded_port(i),
            topo::ingress_vip(i),
            topo::INGRESS_PORT,
        )),
    )
}

/// A gateway's forwarding: masquerade out of `wan_if`, an `egress` counter of what it forwards
/// from `gw_if`, an empty `tunnel` chain (`set_tunnel_dead` fills it), and optionally the DNAT
/// of a forwarded port `(port, ingress VIP, virtual server port)` arriving on `wan_if`.
pub fn gateway_nft_for(gw_if: &str, wan_if: &str, dnat: Option<(u16, Ipv4Addr, u16)>) -> String {
    let dnat = dnat
        .map(|(port, vip, iport)| {
            format!(
                "    iifname \"{wan_if}\" tcp dport {port} dnat to {vip}:{iport}\n    iifname \"{wan_if}\" udp dport {port} dnat to {vip}:{iport}\n"
            )
        })
        .unwrap_or_default();
    format!(
        r#"table ip lab {{
  counter egress {{ }}
  chain tunnel {{
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    jump tunnel
    iifname "{gw_if}" oifname "{wan_if}" counter name "egress"
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
{dnat}  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    oifname "{wan_if}" masquerade
  }}
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::parse_dig;

    #[test]
    fn dig_output_statuses_and_answers() {
        let ok = ";; Got answer:\n;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 1\n\
                  ;; flags: qr aa rd; QUERY: 1, ANSWER: 2\n\n\
                  vpn.lab.test.\t60\tIN\tA\t198.51.100.11\n\
                  vpn.lab.test.\t60\tIN\tA\t198.51.100.10\n";
        assert_eq!(
            parse_dig(ok, "A").unwrap(),
            vec!["198.51.100.11", "198.51.100.10"]
        );
        let nx = ";; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 2\n";
        assert_eq!(parse_dig(nx, "A").unwrap(), Vec::<String>::new());
        let soa = ";; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 3\n\
                   lab.test. 300 IN SOA ns.lab.test. hostmaster.lab.test. 7 3600 600 86400 60\n";
        assert_eq!(
            parse_dig(soa, "SOA").unwrap(),
            vec!["ns.lab.test. hostmaster.lab.test. 7 3600 600 86400 60"]
        );
        let fail = ";; ->>HEADER<<- opcode: QUERY, status: SERVFAIL, id: 4\n";
        assert_eq!(parse_dig(fail, "A").unwrap_err(), "status SERVFAIL");
        assert!(parse_dig(";; communications error: timed out\n", "A")
            .unwrap_err()
            .starts_with("no answer"));
    }
}
