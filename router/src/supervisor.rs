//! The supervisor: owns the running config, the component tasks and the api; reloads on
//! SIGHUP, stops on SIGTERM/SIGINT. A reload that fails (bad file, a sysctl the new config
//! needs is refused) is logged, counted and shown in /status, and changes nothing: the
//! components keep running on the last good config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::config::{self, Config, Loaded};
use crate::engines::Engines;
use crate::logging::LevelHandle;
use crate::metrics::{DaemonMetrics, ReloadLabels};
use crate::status::StatusBoard;
use crate::sysctl;

/// Unix time for the reload timestamp metric and /status. The one wall-clock read of the
/// daemon: everything that decides anything uses tokio's monotonic clock.
#[allow(clippy::disallowed_methods)]
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Sysctls(Vec<sysctl::SysctlError>),
    #[error("{0}")]
    Api(std::io::Error),
}

#[derive(Debug)]
pub struct Supervisor {
    path: PathBuf,
    config: Arc<Config>,
    board: Arc<StatusBoard>,
    metrics: Arc<DaemonMetrics>,
    level: Option<LevelHandle>,
    sysctl_root: PathBuf,
    engines: Engines,
    shutdown: CancellationToken,
}

/// How long the engines get to stop at SIGTERM (VRRP handoff). Below Kubernetes' default
/// terminationGracePeriodSeconds (30 s).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often a busy `api.listen` is tried again; an error is logged every
/// [`API_BIND_LOG_EVERY`] tries.
const API_BIND_RETRY: Duration = Duration::from_secs(1);
const API_BIND_LOG_EVERY: u32 = 30;

/// Binds `listen` until it works (or shutdown), then serves.
async fn bind_and_serve(listen: SocketAddr, state: Arc<ApiState>, shutdown: CancellationToken) {
    let mut tries: u32 = 0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(API_BIND_RETRY) => {}
        }
        tries = tries.saturating_add(1);
        match api::bind(listen).await {
            Ok(listener) => {
                tracing::info!(api = %listen, tries, "api: listening");
                return api::serve(listener, state, shutdown).await;
            }
            Err(e) if tries.is_multiple_of(API_BIND_LOG_EVERY) => {
                tracing::error!(error = %e, tries, "api: still cannot listen; retrying");
            }
            Err(_) => {}
        }
    }
}

/// The egress hashing report for `config` (`/status` daemon.egress_hashing), with a warning
/// when routers may pick different gateways for one flow.
fn egress_hashing(sysctl_root: &Path, config: &Config) -> Option<sysctl::EgressHashing> {
    let h = sysctl::egress_hashing(sysctl_root, config);
    if let Some(h) = h.as_ref().filter(|h| !h.same_on_every_router) {
        tracing::warn!(mode = %h.mode, "egress hashing differs between routers: {}", h.note);
    }
    h
}

/// Where the kernel's sysctls live; tests point this at a scratch directory.
pub const PROC_SYS: &str = "/proc/sys";

impl Supervisor {
    /// Prepares a supervisor for a loaded config: sets the sysctls it needs (refusing to start
    /// when a required one cannot be set) and registers metrics.
    pub fn new(
        path: &Path,
        loaded: Loaded,
        level: Option<LevelHandle>,
        sysctl_root: &Path,
        registry: &mut Registry,
    ) -> Result<Self, StartError> {
        for w in &loaded.warnings {
            tracing::warn!("config: {w}");
        }
        let fatal = sysctl::apply(sysctl_root, &sysctl::wanted(&loaded.config));
        if !fatal.is_empty() {
            return Err(StartError::Sysctls(fatal));
        }
        let metrics = Arc::new(DaemonMetrics::default());
        metrics.register(registry);
        let now = unix_now();
        metrics.last_reload_success.set(now);
        let board = StatusBoard::new(path.display().to_string(), now);
        let config = Arc::new(loaded.config);
        let shutdown = CancellationToken::new();
        let engines = Engines::new(board.clone(), registry);
        let hashing = egress_hashing(sysctl_root, &config);
        board.update_daemon(|d| d.egress_hashing = hashing);
        Ok(Self {
            path: path.to_path_buf(),
            config,
            board,
            metrics,
            level,
            sysctl_root: sysctl_root.to_path_buf(),
            engines,
            shutdown,
        })
    }

    /// Re-reads the config file. On any error the running config stays as it is.
    pub async fn reload(&mut self) -> Result<(), Vec<String>> {
        let result = config::load(&self.path)
            .map_err(|e| e.lines())
            .and_then(|loaded| {
                let fatal = sysctl::apply(&self.sysctl_root, &sysctl::wanted(&loaded.config));
                if fatal.is_empty() {
                    Ok(loaded)
                } else {
                    Err(fatal.iter().map(|e| e.to_string()).collect())
                }
            });
        match result {
            Err(lines) => {
                for l in &lines {
                    tracing::error!("reload rejected, keeping the running config: {l}");
                }
                self.metrics
                    .config_reloads
                    .get_or_create(&ReloadLabels { result: "failure" })
                    .inc();
                self.board.update_daemon(|d| {
                    d.reloads_failed += 1;
                    d.last_reload_error = Some(lines.clone());
                });
                Err(lines)
            }
            Ok(loaded) => {
                for w in &loaded.warnings {
                    tracing::warn!("config: {w}");
                }
                let new = Arc::new(loaded.config);
                if new.api.listen != self.config.api.listen {
                    tracing::warn!(old = %self.config.api.listen, new = %new.api.listen, "api.listen changed: takes effect at the next start");
                }
                if new.log.format != self.config.log.format {
                    tracing::warn!("log.format changed: takes effect at the next start");
                }
                if let Some(level) = &self.level {
                    level.set(&new.log);
                }
                self.config = new.clone();
                self.engines.apply(&new).await;
                let now = unix_now();
                self.metrics
                    .config_reloads
                    .get_or_create(&ReloadLabels { result: "success" })
                    .inc();
                self.metrics.last_reload_success.set(now);
                let hashing = egress_hashing(&self.sysctl_root, &new);
                self.board.update_daemon(|d| {
                    d.reloads_ok += 1;
                    d.config_loaded_unix = now;
                    d.last_reload_error = None;
                    d.egress_hashing = hashing;
                });
                tracing::info!(file = %self.path.display(), "config reloaded");
                Ok(())
            }
        }
    }

    /// Runs until SIGTERM or SIGINT: serves the api and handles SIGHUP reloads.
    pub async fn run(mut self, registry: Registry) -> Result<(), StartError> {
        let shutdown = self.shutdown.clone();
        let listen: SocketAddr = self.config.api.listen;
        let state = Arc::new(ApiState {
            registry,
            board: self.board.clone(),
        });
        // A busy or missing address is retried, not a reason to exit: a restarted router that
        // exits at once over its api would give up VRRP, and the engines run without the api.
        let bound = api::bind(listen).await;
        // Every configured engine is on the status board before the api answers, so the first
        // /status already lists them all.
        let config = self.config.clone();
        self.engines.apply(&config).await;
        let api_task = match bound {
            Ok(listener) => tokio::spawn(api::serve(listener, state, shutdown.clone())),
            Err(e) => {
                tracing::error!(error = %e, retry_every = ?API_BIND_RETRY, "api: cannot listen; the engines run, the api is retried (probes fail until it listens)");
                tokio::spawn(bind_and_serve(listen, state, shutdown.clone()))
            }
        };
        tracing::info!(api = %listen, config = %self.path.display(), "vpn-router running");

        let mut hup = signal(SignalKind::hangup()).map_err(StartError::Api)?;
        let mut term = signal(SignalKind::terminate()).map_err(StartError::Api)?;
        let mut int = signal(SignalKind::interrupt()).map_err(StartError::Api)?;
        let mut retry = tokio::time::interval(crate::engines::START_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading config");
                    let _ = self.reload().await;
                }
                _ = retry.tick(), if self.engines.needs_retry() => {
                    let config = self.config.clone();
                    self.engines.apply(&config).await;
                }
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            }
        }
        // Engines first, while the api still answers: VRRP sends its priority-0 advert and
        // keeps the VIPs until the new master is heard, then lets go.
        self.engines.shutdown(SHUTDOWN_GRACE).await;
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), api_task).await;
        tracing::info!("stopped");
        Ok(())
    }
}
