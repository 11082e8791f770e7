//! Return routing: what came in through gateway i leaves through gateway i — and, in
//! `egress.mode: consistent`, the stateless per-packet bucket marking of client traffic.
//!
//! Owns: the per-gateway routing tables `table_base+i`, their nexthops and `fwmark` rules (the
//! only owner: the data-plane probe and consistent egress use them too), and the nftables
//! table `ip vpn_router_return` (ct mark for new connections to ingress VIP i, ct mark →
//! packet mark, the bucket map). Reconcile loop: dump → plan → diff → apply, adoption at start
//! without flapping, periodic drift repair. It must not touch any other table, rule or nft
//! object, and never runs health checks. Per-gateway state stays while a gateway is unhealthy
//! and goes only when the gateway leaves the configuration. On shutdown it leaves the kernel
//! as it is: established ingress connections keep their way back while the next instance
//! starts and adopts.

pub mod nft;
mod plan;

pub use nft::{NftChange, NftError};
pub use plan::{
    bucket_table, nft_model, ownership, plan_routes, ConsistentSettings, EgressNft, MssClamp,
    NftModel, ReturnRoutingSettings, ReturnRoutingSettingsError,
};

use std::net::Ipv4Addr;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::consistent::BucketTable;
use crate::egress::{diff, Change, KernelState, Ownership};
use crate::error::NetlinkError;
use crate::health::HealthyGateways;
use crate::netlink::{describe_rule, RouteSocket};
use crate::trigger::Trigger;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObjectLabels {
    object: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GatewayLabels {
    gateway: String,
}

/// Metrics of return routing and consistent egress. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ReturnRoutingMetrics {
    changes: Family<ObjectLabels, Counter>,
    errors: Counter,
    gateways: Gauge,
    nft_apply: Histogram,
    buckets: Family<GatewayLabels, Gauge>,
    bucket_moves: Counter,
}

impl Default for ReturnRoutingMetrics {
    fn default() -> Self {
        ReturnRoutingMetrics {
            changes: Family::default(),
            errors: Counter::default(),
            gateways: Gauge::default(),
            nft_apply: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            buckets: Family::default(),
            bucket_moves: Counter::default(),
        }
    }
}

impl ReturnRoutingMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every metric under its full `vpn_router_...` name (registry without prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vpn_router_return_routing_changes",
            "Kernel writes made by return routing, by object (nexthop, route, rule, nft_table, nft_buckets)",
            self.changes.clone(),
        );
        registry.register(
            "vpn_router_return_routing_reconcile_errors",
            "Return routing reconciliations that failed (some change could not be applied)",
            self.errors.clone(),
        );
        registry.register(
            "vpn_router_return_routing_gateways",
            "Gateways whose return table and fwmark rule are in force",
            self.gateways.clone(),
        );
        registry.register(
            "vpn_router_return_routing_nft_apply_duration_seconds",
            "Time to apply one nftables transaction to the return routing table (nft included)",
            self.nft_apply.clone(),
        );
        registry.register(
            "vpn_router_egress_consistent_buckets",
            "Buckets of the consistent egress table assigned to the gateway",
            self.buckets.clone(),
        );
        registry.register(
            "vpn_router_egress_consistent_bucket_moves",
            "Buckets moved to another gateway (or to none) by healthy-set changes",
            self.bucket_moves.clone(),
        );
    }

    fn count(&self, object: &str) {
        self.changes
            .get_or_create(&ObjectLabels {
                object: object.to_owned(),
            })
            .inc();
    }
}

/// One gateway's return path, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayReturnStatus {
    pub gateway: Ipv4Addr,
    pub mark: String,
    pub table: u32,
    pub rule_priority: u32,
    pub ingress_vip: Option<Ipv4Addr>,
    /// Table route and fwmark rule found in the kernel after the last reconcile.
    pub in_force: bool,
    /// Consistent mode: buckets assigned to this gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<u32>,
}

/// What `/status` shows for return routing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReturnRoutingStatus {
    pub nft_table: String,
    /// The nft table matched the desired one after the last reconcile.
    pub nft_in_force: bool,
    pub gateways: Vec<GatewayReturnStatus>,
    /// Consistent mode: bucket count and hash seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistent: Option<ConsistentStatus>,
    /// `gateways.clamp_mss`: the MSS that SYNs through the gateways are clamped to (in the
    /// nft table; `nft_in_force` says whether the kernel has it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_mss_clamp: Option<u16>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsistentStatus {
    pub buckets: u32,
    pub hash_seed: String,
    /// Buckets with no healthy gateway (all of them when none is healthy: kill switch).
    pub unassigned: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ReturnRoutingError {
    #[error(transparent)]
    Settings(#[from] ReturnRoutingSettingsError),
    #[error("return routing: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("return routing: {count} kernel change(s) failed; first: {first}")]
    Apply { count: usize, first: NetlinkError },
    #[error("return routing: {0}")]
    Nft(#[from] NftError),
}

/// What one reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub changes: Vec<String>,
    /// The nft change made (`None` when the table already matched).
    pub nft: Option<NftChange>,
    pub nft_apply: Option<Duration>,
}

#[derive(Debug)]
pub struct ReturnRoutingManager {
    settings: ReturnRoutingSettings,
    socket: RouteSocket,
    metrics: ReturnRoutingMetrics,
    status: watch::Sender<ReturnRoutingStatus>,
    /// The bucket table last written (for move counting).
    last_table: Option<BucketTable>,
    /// What the settings before a reload owned, until one reconcile has removed its leftovers.
    retiring: Option<Ownership>,
}

impl ReturnRoutingManager {
    /// Validates the settings and opens a netlink socket in the caller's network namespace.
    /// Must be called inside a tokio runtime.
    pub fn new(
        settings: ReturnRoutingSettings,
        metrics: ReturnRoutingMetrics,
    ) -> Result<Self, ReturnRoutingError> {
        settings.validate()?;
        let socket = RouteSocket::open()?;
        let (status, _) = watch::channel(ReturnRoutingStatus {
            nft_table: settings.nft_table.clone(),
            ..Default::default()
        });
        Ok(ReturnRoutingManager {
            settings,
            socket,
            metrics,
            status,
            last_table: None,
            retiring: None,
        })
    }

    /// After a reload: the tables and rules `previous` owned that these settings do not (another
    /// `table_base` or `rule_priority_base`) are deleted by the next reconcile, once.
    pub fn retire_previous(&mut self, previous: &ReturnRoutingSettings) {
        let old = ownership(previous);
        if old != ownership(&self.settings) {
            self.retiring = Some(old);
        }
    }

    pub fn status(&self) -> watch::Receiver<ReturnRoutingStatus> {
        self.status.subscribe()
    }

    pub fn settings(&self) -> &ReturnRoutingSettings {
        &self.settings
    }

    /// Brings tables, rules and the nft table to the plan. `healthy` only matters in
    /// consistent mode; while it is not `complete`, the kernel's bucket map is kept as found.
    pub async fn reconcile(
        &mut self,
        healthy: &HealthyGateways,
    ) -> Result<ReconcileReport, ReturnRoutingError> {
        let mut report = ReconcileReport::default();
        let routes = self.reconcile_routes(&mut report).await;
        let table = if healthy.complete {
            bucket_table(&self.settings, healthy)
        } else {
            None
        };
        let nft = self.reconcile_nft(table.as_ref(), &mut report).await;
        let in_force = self.in_force().await.unwrap_or_default();
        let error = routes
            .as_ref()
            .err()
            .map(ToString::to_string)
            .or_else(|| nft.as_ref().err().map(ToString::to_string));
        self.publish(
            table.as_ref().or(self.last_table.as_ref()),
            &in_force,
            nft.is_ok(),
            error,
        );
        if let Some(t) = table {
            if let Some(old) = &self.last_table {
                if old.size() == t.size() && nft.is_ok() {
                    self.metrics
                        .bucket_moves
                        .inc_by(u64::try_from(old.moved(&t)).unwrap_or(0));
                }
            }
            if nft.is_ok() {
                self.last_table = Some(t);
            }
        }
        routes?;
        nft?;
        Ok(report)
    }

    async fn reconcile_routes(
        &mut self,
        report: &mut ReconcileReport,
    ) -> Result<(), ReturnRoutingError> {
        // Interface missing: only the unreachable routes and the rules (marked packets are
        // dropped rather than leaked to another gateway); `in_force` shows it in /status.
        let oif = self.socket.link_index(&self.settings.interface).await.ok();
        let kernel = KernelState {
            nexthops: self.socket.dump_nexthops().await?,
            routes: self.socket.dump_routes().await?,
            rules: self.socket.dump_rules().await?,
        };
        let desired = plan_routes(&self.settings, oif);
        let own = match &self.retiring {
            Some(old) => ownership(&self.settings).with_retired(old),
            None => ownership(&self.settings),
        };
        let changes = diff(&desired, &own, &kernel);
        let mut errors = Vec::new();
        for change in changes {
            let text = describe(&change);
            let result = crate::egress::execute(&self.socket, &change).await;
            match result {
                Ok(()) => {
                    tracing::info!(change = %text, "return routing: kernel updated");
                    self.metrics.count(change.object());
                    report.changes.push(text);
                }
                Err(e)
                    if is_delete(&change)
                        && matches!(e.errno(), Some(libc::ESRCH) | Some(libc::ENOENT)) => {}
                Err(e) => {
                    tracing::warn!(change = %text, error = %e, "return routing: kernel refused a change");
                    errors.push(e);
                }
            }
        }
        let count = errors.len();
        match errors.into_iter().next() {
            None => {
                if self.retiring.take().is_some() {
                    tracing::info!("return routing: what the previous table_base/rule_priority_base left is removed");
                }
                Ok(())
            }
            Some(first) => Err(ReturnRoutingError::Apply { count, first }),
        }
    }

    async fn reconcile_nft(
        &mut self,
        table: Option<&BucketTable>,
        report: &mut ReconcileReport,
    ) -> Result<(), ReturnRoutingError> {
        let name = self.settings.nft_table.clone();
        let model = nft_model(&self.settings, table);
        let keep = model.egress.as_ref().is_some_and(|e| e.buckets.is_none());
        let objects = nft::render(&model);
        let listed = nft::list_table(&name).await?;
        let kernel = nft::view(listed.as_deref().unwrap_or_default());
        let desired = nft::view(&objects);
        let change = nft::compare(&desired, &kernel, keep);
        if change == NftChange::None {
            return Ok(());
        }
        let carry = keep.then(|| nft::kernel_buckets(&kernel));
        let batch = nft::transaction(&name, &objects, &change, carry.as_ref());
        let what = match &change {
            NftChange::Full if kernel.exists => "rebuild (drift or config change)".to_owned(),
            NftChange::Full => "create".to_owned(),
            NftChange::Buckets { delete, add } => {
                format!("bucket map: {} removed, {} set", delete.len(), add.len())
            }
            NftChange::None => String::new(),
        };
        let started = tokio::time::Instant::now();
        nft::apply(&name, &what, &batch).await?;
        let took = started.elapsed();
        self.metrics.nft_apply.observe(took.as_secs_f64());
        self.metrics.count(match change {
            NftChange::Buckets { .. } => "nft_buckets",
            _ => "nft_table",
        });
        tracing::info!(table = %name, change = %what, took = ?took, "return routing: nft table updated");
        report.changes.push(format!("nft table ip {name}: {what}"));
        report.nft = Some(change);
        report.nft_apply = Some(took);
        Ok(())
    }

    /// Gateway indexes whose default route and fwmark rule are in the kernel.
    async fn in_force(&self) -> Result<Vec<bool>, NetlinkError> {
        let routes = self.socket.dump_routes().await?;
        let rules = self.socket.dump_rules().await?;
        let s = &self.settings;
        Ok((0..s.gateways.len())
            .map(|i| {
                routes
                    .iter()
                    .any(|r| r.table == s.table(i) && r.metric == 0 && r.dst.prefix_len() == 0)
                    && rules.iter().any(|r| {
                        r.priority == s.rule_priority(i)
                            && r.fwmark == Some((s.mark(i), u32::MAX))
                            && r.action == crate::netlink::RuleTarget::Lookup(s.table(i))
                    })
            })
            .collect())
    }

    fn publish(
        &self,
        table: Option<&BucketTable>,
        in_force: &[bool],
        nft_ok: bool,
        error: Option<String>,
    ) {
        let s = &self.settings;
        let shares = table.map(BucketTable::shares);
        self.metrics
            .gateways
            .set(i64::try_from(in_force.iter().filter(|b| **b).count()).unwrap_or(0));
        let gateways = s
            .gateways
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let buckets = shares.as_ref().map(|sh| sh.get(&i).copied().unwrap_or(0));
                if let Some(b) = buckets {
                    self.metrics
                        .buckets
                        .get_or_create(&GatewayLabels {
                            gateway: g.to_string(),
                        })
                        .set(i64::from(b));
                }
                GatewayReturnStatus {
                    gateway: *g,
                    mark: format!("{:#x}", s.mark(i)),
                    table: s.table(i),
                    rule_priority: s.rule_priority(i),
                    ingress_vip: s.ingress_vips.get(i).copied(),
                    in_force: in_force.get(i).copied().unwrap_or(false),
                    buckets,
                }
            })
            .collect();
        let consistent = s.consistent.as_ref().map(|c| ConsistentStatus {
            buckets: c.buckets,
            hash_seed: format!("{:#x}", c.hash_seed),
            unassigned: table.map_or(c.buckets, |t| {
                u32::try_from(t.buckets.iter().filter(|b| b.is_none()).count()).unwrap_or(0)
            }),
        });
        self.status.send_replace(ReturnRoutingStatus {
            nft_table: s.nft_table.clone(),
            nft_in_force: nft_ok,
            gateways,
            consistent,
            tcp_mss_clamp: s.mss_clamp,
            last_error: error,
        });
    }

    /// Reconciles at once (routes, rules and nft do not wait for health; the bucket map
    /// waits for the first complete healthy set), then on every healthy-set change and every
    /// `resync_interval` until `cancel` fires.
    pub async fn run(
        mut self,
        mut healthy: watch::Receiver<HealthyGateways>,
        cancel: CancellationToken,
    ) {
        let mut trigger = Trigger::new(self.settings.resync_interval);
        while let Some(current) = trigger.next(&mut healthy, &cancel).await {
            if let Err(e) = self.reconcile(&current).await {
                self.metrics.errors.inc();
                tracing::warn!(error = %e, "return routing: reconcile failed; retrying");
                trigger.failed();
            }
        }
    }
}

fn is_delete(change: &Change) -> bool {
    matches!(
        change,
        Change::DeleteNexthop(_) | Change::DeleteRoute(_) | Change::DeleteRule(_)
    )
}

fn describe(change: &Change) -> String {
    match change {
        Change::SetNexthop(n) => format!("set nexthop {} {:?}", n.id, n.kind),
        Change::DeleteNexthop(id) => format!("delete nexthop {id}"),
        Change::SetRoute(r) => format!(
            "set route {} table {} metric {} -> {:?}",
            r.dst, r.table, r.metric, r.target
        ),
        Change::DeleteRoute(r) => format!(
            "delete route {} table {} metric {} ({:?})",
            r.dst, r.table, r.metric, r.target
        ),
        Change::AddRule(r) => format!("add rule {}", describe_rule(r)),
        Change::DeleteRule(r) => format!("delete rule {}", describe_rule(r)),
    }
}
