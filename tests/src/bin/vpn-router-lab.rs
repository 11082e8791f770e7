//! `vpn-router-lab`: the lab's command line. Its subcommands are both the servers the lab runs
//! inside namespaces (`gluetun`, `serve`), small tools (`http-get`, `cleanup`, `up`) and the
//! demo (`demo`, what `make demo` runs).
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vpn-router-lab",
    about = "The vpn-router netns lab: servers, tools and demo"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// A gluetun-compatible control server (+ health server), answering from a state file.
    Gluetun {
        #[arg(long, default_value = "0.0.0.0:8000")]
        listen: SocketAddr,
        #[arg(long, default_value = "0.0.0.0:9999")]
        health_listen: SocketAddr,
        #[arg(long)]
        state_file: PathBuf,
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Echo service: HTTP (`GET /` answers the client address), TCP echo, UDP echo.
    Serve {
        #[arg(long, default_value = "echo")]
        name: String,
        #[arg(long)]
        http: Vec<SocketAddr>,
        #[arg(long)]
        tcp_echo: Vec<SocketAddr>,
        #[arg(long)]
        udp_echo: Vec<SocketAddr>,
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// GET a URL and print the body (status on stderr); exit 1 unless 200.
    HttpGet {
        url: String,
        /// Extra header, `Name: value`.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Remove namespaces and directories of labs whose owner process is dead.
    Cleanup,
    /// Build a lab and keep it up until Ctrl-C (or --hold-secs); prints its prefix.
    Up {
        #[command(flatten)]
        shape: Shape,
        #[arg(long)]
        hold_secs: Option<u64>,
    },
    /// The guided tour `make demo` runs.
    Demo {
        #[command(flatten)]
        shape: Shape,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct Shape {
    #[arg(long, default_value_t = 4)]
    gateways: usize,
    #[arg(long, default_value_t = 2)]
    routers: usize,
    #[arg(long, default_value_t = 2)]
    clients: usize,
    #[arg(long, default_value_t = 2)]
    ingress_pods: usize,
    /// Do not run BIND.
    #[arg(long)]
    no_dns: bool,
    /// Do not start vpn-router in the router namespaces.
    #[arg(long)]
    no_routers: bool,
}

impl Shape {
    fn builder(&self) -> lab::LabBuilder {
        lab::Lab::builder()
            .gateways(self.gateways)
            .routers(self.routers)
            .clients(self.clients)
            .ingress_pods(self.ingress_pods)
            .dns(!self.no_dns)
            .start_routers(!self.no_routers)
    }
}

/// Tears the labs down on Ctrl-C / SIGTERM, then exits 130.
fn teardown_on_signal() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("\nvpn-router-lab: interrupted, tearing the lab down");
            lab::lab::teardown_live_labs();
            std::process::exit(130);
        });
    });
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Gluetun {
            listen,
            health_listen,
            state_file,
            log,
        } => lab::servers::run_gluetun(listen, health_listen, state_file, log)
            .context("gluetun mock")?,
        Cmd::Serve {
            name,
            http,
            tcp_echo,
            udp_echo,
            log,
        } => lab::servers::run_echo(lab::servers::EchoConfig {
            name,
            http,
            tcp_echo,
            udp_echo,
            log,
        })
        .context("echo service")?,
        Cmd::HttpGet {
            url,
            headers,
            timeout_ms,
        } => {
            let hs: Vec<(&str, &str)> = headers
                .iter()
                .filter_map(|h| h.split_once(':'))
                .map(|(k, v)| (k.trim(), v.trim()))
                .collect();
            let r = lab::http::request("GET", &url, &hs, "", Duration::from_millis(timeout_ms))?;
            eprintln!("HTTP {}", r.status);
            print!("{}", r.body);
            if r.status != 200 {
                std::process::exit(1);
            }
        }
        Cmd::Cleanup => {
            let r = lab::netns::sweep_stale();
            println!(
                "removed {} namespaces, killed {} processes, removed {} directories",
                r.namespaces.len(),
                r.processes_killed,
                r.dirs.len()
            );
            for n in r.namespaces {
                println!("  {n}");
            }
        }
        Cmd::Up { shape, hold_secs } => {
            teardown_on_signal();
            let l = shape.builder().build()?;
            println!("prefix {}", l.prefix);
            println!("dir {}", l.dir.display());
            println!("setup {:?}", l.setup_time);
            for n in l.namespace_names() {
                println!("ns {n}");
            }
            println!("ready");
            match hold_secs {
                Some(s) => std::thread::sleep(Duration::from_secs(s)),
                None => loop {
                    std::thread::sleep(Duration::from_secs(3600));
                },
            }
        }
        Cmd::Demo { shape } => {
            teardown_on_signal();
            lab::demo::run(shape.builder())?;
        }
    }
    Ok(())
}
