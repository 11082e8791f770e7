//! The `vpn-router` binary from the outside: check-config exit codes and messages, the
//! daemon's api, SIGHUP reload (a bad file keeps the running config), SIGTERM, the metrics
//! format (checked by Prometheus' own `promtool`), and that secrets never reach logs or /status.

#![allow(clippy::unwrap_used)]
// test harness: a failed setup step should panic right there
// The slow-client test measures wall time against the real daemon.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_vpn-router");

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vpn-router-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn reference_config(dir: &Scratch) -> PathBuf {
    dir.file("gluetun", "s3cret-gluetun\n");
    dir.file("tsig", "c2VjcmV0LXRzaWcta2V5LWJ5dGVz\n");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/reference.yaml"
    ))
    .unwrap()
    .replace("/run/secrets/", &format!("{}/", dir.0.display()));
    dir.file("reference.yaml", &text)
}

#[test]
fn check_config_accepts_the_reference_config() {
    let dir = Scratch::new("ref");
    let cfg = reference_config(&dir);
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .contains("ok (1 vrrp instance(s), 8 gateway(s), 1 virtual server(s), ddns: rfc2136)"),
        "{stdout}"
    );
}

#[test]
fn check_config_reports_every_error_with_position_and_exits_1() {
    let dir = Scratch::new("bad");
    let cfg = dir.file("bad.yaml", "vrrp:\n  - name: r\n    interface: eth0\n    vrid: 300\n    prority: 100\n    virtual_ips: [10.1.1.1/24]\n");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let f = cfg.display();
    assert!(
        stderr.contains(&format!(
            "{f}:4:11: vrrp[0].vrid: 300 is out of range; expected an integer 1-255"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{f}:5:5: vrrp[0]: unknown key `prority` (did you mean `priority`?)"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("2 error(s)"), "{stderr}");
}

#[test]
fn check_config_on_a_missing_file_says_so() {
    let out = Command::new(BIN)
        .args(["check-config", "/nonexistent/vpn-router.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/vpn-router.yaml: cannot read config"),
        "{stderr}"
    );
}

#[test]
fn version_prints_the_crate_version() {
    let out = Command::new(BIN).arg("version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("vpn-router {}", env!("CARGO_PKG_VERSION"))
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running daemon whose stderr goes to a file; killed on drop.
struct Daemon {
    child: Child,
    api: SocketAddr,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, api: SocketAddr, log: PathBuf) -> Self {
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let d = Self { child, api, log };
        for _ in 0..200 {
            if TcpStream::connect(api).is_ok() {
                return d;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "daemon did not open its api on {api}; log:\n{}",
            d.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(self.api, path)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn status_json(&self) -> serde_json::Value {
        let (code, body) = self.get("/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Polls /status until `pred` holds (a reload is asynchronous to the signal).
    fn wait_status(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        for _ in 0..200 {
            let s = self.status_json();
            if pred(&s) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "timed out waiting for {what}; status: {}\nlog:\n{}",
            self.status_json(),
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HTTP/1.0 GET without a client library: the test checks the server, not a client.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::Read as _;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_owned())
}

/// Moves the calling test thread, and every process it starts from now on, into a fresh
/// network namespace with `lo` up and a veth `vpn-r-veth0`: the daemon's VRRP runs there
/// for real without touching the host. The namespace goes when the returned guard drops.
fn enter_netns(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    let f = std::fs::File::open(format!("/run/netns/{}", ns.0)).unwrap();
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    for args in [
        &[
            "link",
            "add",
            "vpn-r-veth0",
            "type",
            "veth",
            "peer",
            "name",
            "vpn-r-peer",
        ][..],
        &["link", "set", "vpn-r-peer", "up"],
        &["link", "set", "vpn-r-veth0", "up"],
        &["addr", "add", "192.168.28.2/24", "dev", "vpn-r-veth0"],
    ] {
        let ok = Command::new("ip").args(args).status().unwrap();
        assert!(ok.success(), "ip {args:?} failed");
    }
    ns
}

/// No gateways/ingress section: the daemon needs no sysctl. VRRP runs on `vpn-r-veth0`
/// (see `enter_netns`).
fn vrrp_only_config(api: SocketAddr, vrid: u8) -> String {
    format!(
        "api: {{ listen: {api} }}\nlog: {{ level: info }}\nvrrp:\n  - name: router\n    interface: vpn-r-veth0\n    vrid: {vrid}\n    virtual_ips: [192.168.26.254/22]\n"
    )
}

#[test]
fn sighup_with_a_bad_file_keeps_the_running_config_and_counts_it() {
    let _ns = enter_netns("r");
    let dir = Scratch::new("reload");
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = dir.file("config.yaml", &vrrp_only_config(api, 51));
    let d = Daemon::start(&cfg, api, dir.0.join("daemon.log"));
    assert_eq!(d.get("/healthz"), (200, "ok\n".into()));
    let vrid =
        |s: &serde_json::Value| s["components"]["vrrp"]["detail"]["instances"][0]["vrid"].as_u64();
    assert_eq!(vrid(&d.status_json()), Some(51));

    // A broken file: rejected, counted, running config untouched.
    std::fs::write(&cfg, "vrrp:\n  - name: router\n    vrid: 300\n").unwrap();
    d.signal("HUP");
    let s = d.wait_status("a failed reload", |s| s["daemon"]["reloads_failed"] == 1);
    assert_eq!(
        vrid(&s),
        Some(51),
        "running config changed after a bad reload"
    );
    let errs = s["daemon"]["last_reload_error"].to_string();
    assert!(
        errs.contains("config.yaml:3:11: vrrp[0].vrid: 300 is out of range"),
        "{errs}"
    );
    let (_, metrics) = d.get("/metrics");
    assert!(
        metrics.contains("vpn_router_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vpn_router_config_reloads_total{result=\"success\"} 0"),
        "{metrics}"
    );

    // A good file: applied.
    std::fs::write(&cfg, vrrp_only_config(api, 52)).unwrap();
    d.signal("HUP");
    let s = d.wait_status("a successful reload", |s| {
        s["daemon"]["reloads_ok"] == 1 && vrid(s) == Some(52)
    });
    assert!(s["daemon"]["last_reload_error"].is_null());
    let log = d.log_text();
    assert!(
        log.contains("reload rejected, keeping the running config"),
        "{log}"
    );
    assert!(log.contains("config reloaded"), "{log}");
}

#[test]
fn sigterm_stops_the_daemon_promptly_and_cleanly() {
    let _ns = enter_netns("t");
    let dir = Scratch::new("term");
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = dir.file("config.yaml", &vrrp_only_config(api, 51));
    let mut d = Daemon::start(&cfg, api, dir.0.join("daemon.log"));
    d.signal("TERM");
    for _ in 0..200 {
        if let Some(status) = d.child.try_wait().unwrap() {
            assert!(status.success(), "exit {status}; log:\n{}", d.log_text());
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("daemon still running 5 s after SIGTERM");
}

#[test]
fn readyz_and_status_cover_configured_components() {
    let _ns = enter_netns("y");
    let dir = Scratch::new("ready");
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Two instances: one on the veth (runs), one on an interface that does not exist.
    let text = format!(
        "{}  - name: broken\n    interface: vpn-missing0\n    vrid: 52\n    virtual_ips: [192.168.26.253/22]\n",
        vrrp_only_config(api, 51)
    );
    let cfg = dir.file("config.yaml", &text);
    let d = Daemon::start(&cfg, api, dir.0.join("daemon.log"));
    let s = d.wait_status("both instances on the board", |s| {
        s["components"]["vrrp"]["detail"]["instances"]
            .as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().any(|i| !i["setup_error"].is_null()))
    });
    assert_eq!(s["components"]["vrrp"]["state"], "degraded", "{s}");
    let broken = &s["components"]["vrrp"]["detail"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "broken")
        .unwrap()["setup_error"];
    assert!(broken.to_string().contains("vpn-missing0"), "{broken}");
    assert_eq!(
        d.get("/readyz").0,
        503,
        "an instance that cannot start is not ready"
    );
    assert_eq!(d.get("/healthz").0, 200, "alive all the same");
    assert_eq!(d.get("/nope").0, 404);
    // `vpn-router status` renders the same for a human.
    let out = Command::new(BIN)
        .args(["status", "--api", &api.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("vrrp") && text.contains("degraded") && text.contains("ready: no"),
        "{text}"
    );

    // Without the broken instance the daemon gets ready.
    std::fs::write(&cfg, vrrp_only_config(api, 51)).unwrap();
    d.signal("HUP");
    d.wait_status("ready after the reload", |s| {
        s["components"]["vrrp"]["state"] == "running" && s["ready"] == true
    });
    assert_eq!(d.get("/readyz").0, 200);
}

#[test]
fn status_command_explains_an_unreachable_daemon() {
    let port = free_port();
    let out = Command::new(BIN)
        .args(["status", "--api", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the api") && err.contains("is `vpn-router run` running"),
        "{err}"
    );
}

fn promtool() -> PathBuf {
    let found = Command::new("sh")
        .args(["-c", "command -v promtool"])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "promtool is missing: install the Debian package `prometheus` (make test does this as root)"
    );
    PathBuf::from(String::from_utf8_lossy(&found.stdout).trim())
}

#[test]
fn metrics_pass_promtool() {
    let promtool = promtool();
    let dir = Scratch::new("metrics");
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = dir.file("config.yaml", &vrrp_only_config(api, 51));
    let d = Daemon::start(&cfg, api, dir.0.join("daemon.log"));
    let (code, metrics) = d.get("/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("vpn_router_build_info{"), "{metrics}");
    let (ok, report) = promtool_check(&promtool, &metrics);
    assert!(
        ok,
        "promtool check metrics failed:\n{report}\n--- metrics ---\n{metrics}"
    );
}

/// Runs `promtool check metrics` on `text`: (exit status ok, its stdout+stderr).
fn promtool_check(promtool: &Path, text: &str) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
    (out.status.success(), report)
}

/// The gateway engine's metric families with samples in every family, through the same
/// OpenMetrics → Prometheus text conversion /metrics uses (the daemon test above only sees
/// the families the running config fills).
#[test]
fn gateway_metrics_with_samples_pass_promtool() {
    use gateway_route_manager::metrics::{
        CheckLabels, FailureLabels, GatewayLabels, Metrics, ObjectLabels,
    };
    let promtool = promtool();
    let metrics = Metrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
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
    let text =
        vpn_router::metrics::to_prometheus_text(&vpn_router::metrics::encode(&registry).unwrap());
    let (ok, report) = promtool_check(&promtool, &text);
    assert!(ok && report.trim().is_empty(), "promtool: {report}\n{text}");
}

/// A network namespace for one test; deleted (with its processes) on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        assert!(
            nix_is_root(),
            "this test needs root (network namespaces and sysctls): run `make test` as root"
        );
        let name = format!("vrcli{}{tag}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("iproute2 `ip` is missing: apt-get install iproute2");
        assert!(ok.success(), "ip netns add {name} failed");
        let ok = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(ok.success());
        Self(name)
    }
    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

#[test]
fn daemon_in_a_netns_sets_its_sysctls_and_never_shows_secrets() {
    let dir = Scratch::new("netns");
    let ns = Netns::new("s");
    let reference = std::fs::read_to_string(reference_config(&dir)).unwrap();
    let cfg = dir.file(
        "with-ingress.yaml",
        &reference.replace("0.0.0.0:9090", "127.0.0.1:9090"),
    );

    // The ingress section needs IPVS sysctls: on a kernel without IPVS the daemon refuses to
    // start and names the sysctl; with IPVS it would set them.
    let has_ipvs = Path::new("/proc/sys/net/ipv4/vs").exists();
    if !has_ipvs {
        let out = ns
            .exec(&[BIN, "run", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("sysctl net.ipv4.vs.conntrack: not present in this kernel: the kernel has no IPVS loaded (modprobe ip_vs)"), "{err}");
    }

    // Without ingress: runs, sets forwarding and the multipath hash policy in its netns.
    let start = reference.find("\ningress:").unwrap();
    let end = reference.find("\nddns:").unwrap();
    let text = format!("{}{}", &reference[..start], &reference[end..])
        .replace("0.0.0.0:9090", "127.0.0.1:9090");
    let cfg = dir.file("config.yaml", &text);
    let log = dir.0.join("daemon.log");
    let mut child = ns
        .exec(&[BIN, "run", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = || {
        ns.exec(&[BIN, "status", "--api", "127.0.0.1:9090", "--json"])
            .output()
            .unwrap()
    };
    let mut body = String::new();
    for _ in 0..200 {
        let out = status();
        if out.status.success() {
            body = String::from_utf8_lossy(&out.stdout).into_owned();
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let sysctl = |k: &str| {
        String::from_utf8_lossy(&ns.exec(&["sysctl", "-n", k]).output().unwrap().stdout)
            .trim()
            .to_owned()
    };
    let forward = sysctl("net.ipv4.ip_forward");
    let policy = sysctl("net.ipv4.fib_multipath_hash_policy");
    // A reload of an unchanged gateways section keeps the running engine on the board.
    let _ = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status();
    let mut after_reload = serde_json::Value::Null;
    for _ in 0..200 {
        let out = status();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            if v["daemon"]["reloads_ok"] == 1 {
                after_reload = v;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        after_reload["components"]["gateways"]["state"], "running",
        "{after_reload}\n{log}"
    );
    assert!(
        !body.is_empty(),
        "daemon never answered /status; log:\n{log}"
    );
    assert_eq!(forward, "1", "{log}");
    assert_eq!(policy, "1", "{log}");
    if !Path::new("/proc/sys/net/ipv4/fib_multipath_hash_seed").exists() {
        assert!(
            log.contains("fib_multipath_hash_seed: not present in this kernel: needs Linux 6.11+"),
            "{log}"
        );
    }
    for secret in ["s3cret-gluetun", "c2VjcmV0LXRzaWcta2V5LWJ5dGVz"] {
        assert!(!body.contains(secret), "secret in /status: {body}");
        assert!(!log.contains(secret), "secret in the log: {log}");
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["components"]["ddns"]["state"], "running", "{body}");
}

/// VmRSS of `pid` in kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A TCP connection to `to` from the loopback address `from` (127/8 is all local).
fn connect_from(from: std::net::Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from((from, 0)).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(2))?;
    Ok(s.into())
}

/// True once the server has closed `s` (EOF or reset), within `within`.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    use std::io::Read as _;
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a 408 or 431 answer, then the close
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// The slow-client attack on the api: 1,000 connections from 100 addresses that each send half
/// a request head. The daemon keeps at most its connection limits open, closes the rest at once
/// and the slow ones after the header timeout, keeps answering the kubelet's probe (from
/// another address) quickly, and its memory stays bounded. An idle keep-alive connection is
/// closed too. Prints the numbers (docs/benchmarks.md).
#[test]
fn slow_clients_cannot_starve_the_api_or_its_memory() {
    let dir = Scratch::new("slow");
    let port = free_port();
    let api = SocketAddr::from(([127, 0, 0, 1], port));
    let cfg = dir.file("api.yaml", &format!("api:\n  listen: 127.0.0.1:{port}\n"));
    let d = Daemon::start(&cfg, api, dir.0.join("log"));
    let pid = d.child.id();
    let rss_before = rss_kb(pid);
    let t0 = std::time::Instant::now();
    let mut slow = Vec::new();
    for i in 0..1000u32 {
        let from = std::net::Ipv4Addr::new(127, 0, 1, u8::try_from(1 + i % 100).unwrap());
        if let Ok(mut s) = connect_from(from, api) {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            slow.push(s);
        }
    }
    let opened = t0.elapsed();
    // The kubelet's probes meanwhile, from another address.
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = std::time::Instant::now();
        let (code, body) = d.get("/healthz");
        worst = worst.max(t.elapsed());
        assert_eq!(
            code,
            200,
            "/healthz under load: {code} {body}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_loaded = rss_kb(pid);
    // Connections over the limits were closed at once; the rest within the header timeout.
    let mut closed_at_once = 0;
    for s in &mut slow {
        if closed_by_server(s, Duration::from_millis(1)) {
            closed_at_once += 1;
        }
    }
    let t1 = std::time::Instant::now();
    let mut still_open = 0;
    for s in &mut slow {
        let left = (Duration::from_secs(8)).saturating_sub(t1.elapsed());
        if !closed_by_server(s, left.max(Duration::from_millis(1))) {
            still_open += 1;
        }
    }
    let all_closed_after =
        t1.elapsed() + Duration::from_millis(u64::try_from(opened.as_millis()).unwrap_or(0));
    // An idle keep-alive connection after one request.
    let mut idle = connect_from(std::net::Ipv4Addr::new(127, 0, 2, 1), api).unwrap();
    write!(idle, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let t2 = std::time::Instant::now();
    let idle_closed = closed_by_server(&mut idle, Duration::from_secs(70));
    let idle_after = t2.elapsed();
    let log = d.log_text();
    eprintln!(
        "api under 1000 slow connections from 100 addresses: {} closed at once (the oldest evicted for newer ones, or over the per-address limit), probe worst {} ms, RSS {} -> {} kB, slow ones closed within {:.1} s, idle keep-alive closed after {:.1} s",
        closed_at_once,
        worst.as_millis(),
        rss_before,
        rss_loaded,
        all_closed_after.as_secs_f64(),
        idle_after.as_secs_f64()
    );
    assert_eq!(
        still_open, 0,
        "{still_open} slow connections still open 8 s later"
    );
    assert!(
        closed_at_once >= 1000 - 128,
        "only {closed_at_once} connections over the limits were closed at once"
    );
    assert!(log.contains("evicted"), "{log}");
    assert!(
        worst < Duration::from_secs(1),
        "a probe took {worst:?} under load"
    );
    assert!(
        rss_loaded < rss_before + 16 * 1024,
        "RSS grew from {rss_before} to {rss_loaded} kB"
    );
    assert!(idle_closed, "an idle keep-alive connection stayed open");
    assert!(
        log.contains("api: connection limit reached"),
        "no log line about the limit:\n{log}"
    );
}

/// A busy api port is no reason to exit (a router that exits gives up VRRP): the daemon keeps
/// running, says so, and serves once the port is free.
#[test]
fn a_busy_api_port_is_retried_not_fatal() {
    let dir = Scratch::new("busy");
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let api = holder.local_addr().unwrap();
    let cfg = dir.file("api.yaml", &format!("api:\n  listen: {api}\n"));
    let log = dir.0.join("log");
    let err = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon exited over a busy api port:\n{text}"
    );
    assert!(text.contains("api: cannot listen"), "{text}");
    drop(holder);
    let mut answered = false;
    for _ in 0..100 {
        if TcpStream::connect(api).is_ok() {
            answered = http_get(api, "/healthz").0 == 200;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        answered,
        "the api did not come up once the port was free:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

fn nad_routes(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("nad-routes")
        .args(args)
        .output()
        .unwrap()
}

fn nad_route_dsts(out: &std::process::Output) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["dst"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn nad_routes_prints_the_complement_of_the_intranet() {
    let out = nad_routes(&["--exclude", "10.0.0.0/8"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want: Vec<serde_json::Value> = [
        "0.0.0.0/5",
        "8.0.0.0/7",
        "11.0.0.0/8",
        "12.0.0.0/6",
        "16.0.0.0/4",
        "32.0.0.0/3",
        "64.0.0.0/2",
        "128.0.0.0/1",
    ]
    .iter()
    .map(|d| serde_json::json!({ "dst": d }))
    .collect();
    assert_eq!(v, serde_json::json!({ "routes": want }));
    // pretty, as the contract says
    assert!(String::from_utf8_lossy(&out.stdout).contains("\n  \"routes\": [\n"));
}

#[test]
fn nad_routes_via_extra_and_list_forms() {
    let out = nad_routes(&[
        "--exclude",
        "192.168.0.0/16,10.0.0.0/8",
        "--exclude",
        "10.1.0.0/16",
        "--extra",
        "10.33.0.10/32,1.1.1.1/32",
        "--via",
        "192.168.26.254",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let routes = v["routes"].as_array().unwrap();
    assert!(routes.iter().all(|r| r["gw"] == "192.168.26.254"), "{v}");
    let dsts = nad_route_dsts(&out);
    assert!(dsts.contains(&"10.33.0.10/32".to_owned()), "{dsts:?}");
    assert!(!dsts.contains(&"1.1.1.1/32".to_owned()), "{dsts:?}");
    assert!(!dsts.iter().any(|d| d.starts_with("192.168.")), "{dsts:?}");
    // 22 for the two ranges, plus the extra /32
    assert_eq!(dsts.len(), 22 + 1, "{dsts:?}");
    // the same input twice, the same bytes
    let again = nad_routes(&[
        "--exclude",
        "192.168.0.0/16,10.0.0.0/8",
        "--exclude",
        "10.1.0.0/16",
        "--extra",
        "10.33.0.10/32,1.1.1.1/32",
        "--via",
        "192.168.26.254",
    ]);
    assert_eq!(out.stdout, again.stdout);
}

#[test]
fn nad_routes_exclude_reserved_uses_the_routers_list() {
    let out = nad_routes(&["--exclude-reserved"]);
    assert!(out.status.success(), "{out:?}");
    let dsts = nad_route_dsts(&out);
    let with_intranet = nad_routes(&["--exclude-reserved", "--exclude", "10.0.0.0/8"]);
    assert_eq!(dsts, nad_route_dsts(&with_intranet), "10/8 is reserved");
    let routes: Vec<ipnet::Ipv4Net> = dsts.iter().map(|d| d.parse().unwrap()).collect();
    for r in gateway_route_manager::egress::reserved_ranges() {
        assert!(
            !routes
                .iter()
                .any(|n| n.contains(&r.network()) || r.contains(&n.network())),
            "{r} is reserved but routed: {dsts:?}"
        );
    }
    assert!(routes
        .iter()
        .any(|n| n.contains(&"1.1.1.1".parse::<std::net::Ipv4Addr>().unwrap())));
    let all = nad_routes(&["--exclude", "0.0.0.0/0"]);
    assert!(all.status.success(), "{all:?}");
    assert!(nad_route_dsts(&all).is_empty());
}

#[test]
fn nad_routes_refuses_bad_values_with_exit_2() {
    for (args, says) in [
        (&["--exclude", "10.0.0.1/8"][..], "did you mean 10.0.0.0/8"),
        (
            &["--exclude", "10.0.0.0/8,bogus"][..],
            "\"bogus\" is not a CIDR",
        ),
        (&["--exclude", "fd00::/8"][..], "IPv6 comes with dual-stack"),
        (
            &["--exclude", "10.0.0.0/8", "--extra", "2001:db8::/32"][..],
            "IPv6",
        ),
        (
            &["--exclude", "10.0.0.0/8", "--via", "192.168.26.254/22"][..],
            "not an IPv4 address",
        ),
        (&[][..], "--exclude"),
    ] {
        let out = nad_routes(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

/// The example in docs/operations.md#client-routes-for-your-intranet is what the binary prints.
#[test]
fn nad_routes_example_in_operations_md_is_the_output() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .unwrap();
    let section = doc
        .split("### Client routes for your intranet")
        .nth(1)
        .expect("the section");
    let mut lines = section
        .lines()
        .skip_while(|l| !l.starts_with("$ vpn-router nad-routes "));
    let command = lines.next().expect("the example command");
    let args: Vec<&str> = command["$ vpn-router nad-routes ".len()..]
        .split(" | jq -c '.routes[]'")
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let shown: Vec<&str> = lines.take_while(|l| !l.starts_with("```")).collect();
    let out = nad_routes(&args);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let printed: Vec<String> = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    assert_eq!(shown, printed, "update the example in docs/operations.md");
}
