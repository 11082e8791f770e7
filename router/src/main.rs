//! The `vpn-router` command: `run`, `check-config`, `status`, `nad-routes`, `version`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;

use vpn_router::config;
use vpn_router::status;
use vpn_router::supervisor::{Supervisor, PROC_SYS};

#[derive(Debug, Parser)]
#[command(name = "vpn-router", version, about = "In-pod router for Kubernetes VPN gateway networks", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file: exit 0 if valid, 1 with FILE:LINE:COL messages if not.
    CheckConfig {
        file: PathBuf,
        /// Print, as JSON, the sysctls a pod with read-only /proc/sys must preset for this
        /// config: `scope: pod` in securityContext.sysctls, `scope: interface` through the
        /// attachment's CNI tuning plugin.
        #[arg(long)]
        sysctls: bool,
    },
    /// Show the running daemon's state (asks its api).
    Status {
        /// The api address (default: api.listen of --config, else of /etc/vpn-router/config.yaml
        /// when it exists (the image's config path), else 127.0.0.1:9090).
        #[arg(long)]
        api: Option<SocketAddr>,
        /// Take the api address from this config file (its api.listen, `${POD_IP}` expanded).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the routes for a client NetworkAttachmentDefinition's ipam: every IPv4 destination
    /// except the excluded ranges, as JSON `{"routes": [{"dst": ...}, ...]}`.
    ///
    /// The list is the fewest CIDRs covering (0.0.0.0/0 minus --exclude) plus --extra, in
    /// address order, so the same input always gives the same output. An extra inside an
    /// excluded range is routed anyway (that is what it is for, e.g. a DNS service /32 inside
    /// the intranet); one already covered adds nothing and does not appear. Every address
    /// comes out as 0.0.0.0/1 + 128.0.0.0/1, never a /0 that would collide with the pod's own
    /// default route. IPv4 only for now (the router's egress is IPv4 only): an IPv6 value is
    /// an error. A bad value exits 2 naming it.
    NadRoutes {
        /// Ranges the clients reach through their primary network, not the VIP (comma-separated
        /// or repeated): the router config's gateways.egress.exclude.
        #[arg(long, value_name = "CIDR", value_delimiter = ',', value_parser = vpn_router::nad_routes::parse_cidr, required_unless_present = "exclude_reserved")]
        exclude: Vec<ipnet::Ipv4Net>,
        /// Also exclude the private and reserved ranges that the router keeps off the VPN when
        /// gateways.egress.exclude_reserved is true (the default): the router's own list.
        #[arg(long)]
        exclude_reserved: bool,
        /// Add `"gw": ADDR` to every route (without it the bridge plugin uses the ipam
        /// `gateway`).
        #[arg(long, value_name = "ADDR", value_parser = vpn_router::nad_routes::parse_via)]
        via: Option<Ipv4Addr>,
        /// Destinations that go to the VIP even inside an excluded range (comma-separated or
        /// repeated).
        #[arg(long, value_name = "CIDR", value_delimiter = ',', value_parser = vpn_router::nad_routes::parse_cidr)]
        extra: Vec<ipnet::Ipv4Net>,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("vpn-router {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file, sysctls } => check_config(&file, sysctls),
        Command::Run { config } => run(&config),
        Command::Status { api, config, json } => status_cmd(api, config.as_deref(), json),
        Command::NadRoutes {
            mut exclude,
            exclude_reserved,
            via,
            extra,
        } => {
            if exclude_reserved {
                exclude.extend(gateway_route_manager::egress::reserved_ranges());
            }
            nad_routes_cmd(&exclude, &extra, via)
        }
    }
}

fn nad_routes_cmd(
    exclude: &[ipnet::Ipv4Net],
    extra: &[ipnet::Ipv4Net],
    via: Option<Ipv4Addr>,
) -> ExitCode {
    let routes = vpn_router::nad_routes::nad_routes(exclude, extra, via);
    match serde_json::to_string_pretty(&routes) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vpn-router nad-routes: {e}");
            ExitCode::from(2)
        }
    }
}

fn check_config(file: &Path, sysctls: bool) -> ExitCode {
    match config::load(file) {
        Ok(loaded) if sysctls => {
            let presets = vpn_router::sysctl::pod_presets(&loaded.config);
            match serde_json::to_string_pretty(&serde_json::json!({ "sysctls": presets })) {
                Ok(s) => {
                    println!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vpn-router check-config: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            let c = &loaded.config;
            println!(
                "{}: ok ({} vrrp instance(s), {} gateway(s), {} virtual server(s), ddns: {})",
                file.display(),
                c.vrrp.len(),
                c.gateways.as_ref().map_or(0, |g| g.addresses.value.len()),
                c.ingress.as_ref().map_or(0, |i| i.virtual_servers.len()),
                c.ddns.as_ref().map_or("off", |d| d.provider.name()),
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for line in errors.lines() {
                eprintln!("{line}");
            }
            eprintln!("{}: {} error(s)", file.display(), errors.errors.len());
            ExitCode::from(1)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    // Two workers: the daemon is I/O bound, and a router pod should not claim every core.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// One malloc arena for the whole daemon (unless `MALLOC_ARENA_MAX` says otherwise). glibc
/// gives each thread that allocates an arena of its own, and memory freed in one is not
/// reused by another: with the runtime's workers, the VRRP thread and the blocking pool
/// (nft) the daemon's peak RSS in the lab was 18.3 MB, 14.9 MB with one arena. The daemon
/// allocates little and rarely at once, so the shared arena's lock costs nothing measurable.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only changes allocator parameters; it is called before the runtime
    // starts any thread, and M_ARENA_MAX with a positive value is a documented setting.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn run(path: &Path) -> ExitCode {
    limit_malloc_arenas();
    let loaded = match config::load(path) {
        Ok(l) => l,
        Err(errors) => {
            for line in errors.lines() {
                eprintln!("{line}");
            }
            eprintln!(
                "vpn-router: not starting: {} config error(s)",
                errors.errors.len()
            );
            return ExitCode::from(1);
        }
    };
    let level = vpn_router::logging::init(&loaded.config.log);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(1);
        }
    };
    let mut registry = Registry::default();
    let result = rt.block_on(async {
        let sup = Supervisor::new(
            path,
            loaded,
            Some(level),
            Path::new(PROC_SYS),
            &mut registry,
        )?;
        sup.run(registry).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            for line in e.to_string().lines() {
                tracing::error!("not starting: {line}");
            }
            ExitCode::from(1)
        }
    }
}

/// Where the image's CMD reads the config: `vpn-router status` in the container (`kubectl exec`)
/// finds the api there, wherever api.listen puts it.
const IMAGE_CONFIG: &str = "/etc/vpn-router/config.yaml";

fn status_cmd(api: Option<SocketAddr>, config_path: Option<&Path>, json: bool) -> ExitCode {
    let image_config = Path::new(IMAGE_CONFIG);
    let config_path = config_path.or_else(|| image_config.is_file().then_some(image_config));
    let addr = match (api, config_path) {
        (Some(a), _) => a,
        (None, Some(p)) => match config::load(p) {
            Ok(l) => local_view(l.config.api.listen),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 9090)),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vpn-router status: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(vpn_router::api::get(addr, "/status"));
    match result {
        Ok((code, body)) if code.is_success() => {
            if json {
                println!("{body}");
                return ExitCode::SUCCESS;
            }
            match serde_json::from_str::<status::StatusReport>(&body) {
                Ok(report) => {
                    print!("{}", status::render(&report));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vpn-router status: unexpected answer from {addr}: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Ok((code, body)) => {
            eprintln!("vpn-router status: {addr} answered {code}: {body}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("vpn-router status: {e}");
            ExitCode::from(2)
        }
    }
}

/// A wildcard listen address is reached through loopback.
fn local_view(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(a) if a.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, listen.port()))
        }
        IpAddr::V6(a) if a.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, listen.port()))
        }
        _ => listen,
    }
}
