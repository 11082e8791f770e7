//! Egress routing and kill switch: keeps the kernel's nexthops, egress routes and policy rules
//! equal to what the planner derives from the healthy set.
//!
//! Owns: the reconcile loop (dump → plan → diff → apply), adoption at start, periodic resync
//! and the `first_reconcile_done` signal. The pure parts are in `plan` and `diff`; kernel
//! access goes through `crate::netlink`. It must not run health checks, and it never deletes
//! anything [`Ownership`] does not cover. On shutdown it leaves the kernel as it is: the next
//! instance adopts it, and the kill switch stays in place meanwhile.

mod diff;
mod plan;
mod sysctl;

pub use diff::{diff, Change, KernelState};
pub use plan::{
    bootstrap_plan, ownership, plan, reserved_ranges, EgressMode, EgressPlan, EgressSettings,
    EgressSettingsError, NoneHealthy, Ownership, ResilientSettings, ACTIVE_METRIC,
    KILL_SWITCH_METRIC, MAX_GATEWAYS, RTPROT_VPN_ROUTER,
};
pub use sysctl::{apply_sysctls, apply_sysctls_at, desired_sysctls, Sysctl};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{EgressError, NetlinkError};
use crate::health::HealthyGateways;
use crate::metrics::Metrics;
use crate::netlink::{describe_rule, RouteSocket};
use crate::trigger::Trigger;

/// What one reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Kernel writes made (successful ones).
    pub writes: usize,
    /// One line per change made, for logs and tests.
    pub changes: Vec<String>,
}

/// Could not start the egress manager.
#[derive(Debug, thiserror::Error)]
pub enum EgressSetupError {
    #[error(transparent)]
    Settings(#[from] EgressSettingsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// First and longest wait between tries to install the kill switch at start.
const BOOTSTRAP_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const BOOTSTRAP_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug)]
pub struct EgressManager {
    settings: EgressSettings,
    ownership: Ownership,
    socket: RouteSocket,
    metrics: Metrics,
    ready: watch::Sender<bool>,
    kill_switch: watch::Sender<bool>,
    /// What the settings before a reload owned, until one reconcile has removed its leftovers.
    retiring: Option<Ownership>,
}

impl EgressManager {
    /// Validates the settings and opens a netlink socket in the caller's network namespace.
    /// Must be called inside a tokio runtime.
    pub fn new(settings: EgressSettings, metrics: Metrics) -> Result<Self, EgressSetupError> {
        settings.validate()?;
        let socket = RouteSocket::open()?;
        let (ready, _) = watch::channel(false);
        let (kill_switch, _) = watch::channel(false);
        Ok(EgressManager {
            ownership: ownership(&settings),
            settings,
            socket,
            metrics,
            ready,
            kill_switch,
            retiring: None,
        })
    }

    pub fn settings(&self) -> &EgressSettings {
        &self.settings
    }

    /// After a reload: the rules and routes `previous` owned that these settings do not (another
    /// `table` or `rule_priority`) are deleted by the next full reconcile, once.
    pub fn retire_previous(&mut self, previous: &EgressSettings) {
        let old = ownership(previous);
        if old != self.ownership {
            self.retiring = Some(old);
        }
    }

    fn owned(&self) -> Ownership {
        match &self.retiring {
            Some(old) => self.ownership.with_retired(old),
            None => self.ownership.clone(),
        }
    }

    /// Becomes `true` after the first reconcile that applied everything (for `/readyz`).
    pub fn first_reconcile_done(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Becomes `true` once the kill switch (the egress table's last-resort route and the rules
    /// that send client traffic to it) has been read back from the kernel, and stays so. The
    /// VRRP instances wait for it before they create a VMAC or take a VIP: a router that
    /// receives client traffic without it would route that traffic by its main table, out of
    /// the pod's own network.
    pub fn kill_switch_in_force(&self) -> watch::Receiver<bool> {
        self.kill_switch.subscribe()
    }

    /// Adds the kill-switch routes and the rules if they are missing, touching nothing else,
    /// then reads the kernel back: an error unless they are all there. Run at start, before
    /// the first healthy set is known, so client traffic is never routed by the main table
    /// while the daemon is starting; adopted state stays as it is.
    pub async fn bootstrap(&mut self) -> Result<ApplyReport, EgressError> {
        let missing = |kernel: &KernelState| -> Vec<Change> {
            diff(&bootstrap_plan(&self.settings), &self.ownership, kernel)
                .into_iter()
                .filter(|c| matches!(c, Change::SetRoute(_) | Change::AddRule(_)))
                .collect()
        };
        let kernel = self.dump().await?;
        let report = self.apply(missing(&kernel)).await?;
        let after = missing(&self.dump().await?);
        if let Some(first) = after.first() {
            return Err(EgressError::NotInForce {
                missing: after.len(),
                first: describe(first),
            });
        }
        self.kill_switch.send_replace(true);
        Ok(report)
    }

    /// Brings the kernel to the plan for `healthy`. A no-change pass writes nothing.
    pub async fn reconcile(
        &mut self,
        healthy: &HealthyGateways,
    ) -> Result<ApplyReport, EgressError> {
        let (oif, link_error) = match self.socket.link_index(&self.settings.interface).await {
            Ok(index) => (Some(index), None),
            Err(e) => (None, Some(e)),
        };
        let kernel = self.dump().await?;
        let desired = plan(&self.settings, healthy, oif);
        let changes = diff(&desired, &self.owned(), &kernel);
        let result = self.apply(changes).await;
        if result.is_ok() {
            // Every planned change is in, the kill-switch routes with them (a missing
            // interface leaves them in place: they name no device).
            self.kill_switch
                .send_if_modified(|k| !std::mem::replace(k, true));
        }
        match (result, link_error) {
            (Ok(report), None) => {
                self.ready.send_replace(true);
                if self.retiring.take().is_some() {
                    tracing::info!("egress: what the previous table/rule_priority left is removed");
                }
                Ok(report)
            }
            (Ok(_), Some(e)) => Err(EgressError::Apply { count: 1, first: e }),
            (Err(e), _) => Err(e),
        }
    }

    async fn dump(&self) -> Result<KernelState, EgressError> {
        Ok(KernelState {
            nexthops: self
                .socket
                .dump_nexthops()
                .await
                .map_err(EgressError::Dump)?,
            routes: self.socket.dump_routes().await.map_err(EgressError::Dump)?,
            rules: self.socket.dump_rules().await.map_err(EgressError::Dump)?,
        })
    }

    async fn apply(&self, changes: Vec<Change>) -> Result<ApplyReport, EgressError> {
        let socket = &self.socket;
        apply_changes(changes, &self.metrics, &self.kill_switch, |c| async move {
            execute(socket, &c).await
        })
        .await
    }

    /// Bootstrap, wait for the first complete healthy set, reconcile, then reconcile on every
    /// change and every `resync_interval` until `cancel` fires.
    pub async fn run(
        mut self,
        mut healthy: watch::Receiver<HealthyGateways>,
        cancel: CancellationToken,
    ) {
        // Until the kill switch is in the kernel nothing else may happen: retried with a
        // capped backoff, and the VRRP instances wait for it (`kill_switch_in_force`).
        let mut backoff = BOOTSTRAP_RETRY_FIRST;
        loop {
            match self.bootstrap().await {
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?backoff, "egress: cannot install the kill switch; this router takes no VIP until it is in place");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BOOTSTRAP_RETRY_MAX);
                }
            }
        }
        loop {
            if healthy.borrow_and_update().complete {
                break;
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = healthy.changed() => if changed.is_err() { return },
            }
        }
        let mut trigger = Trigger::new(self.settings.resync_interval);
        while let Some(current) = trigger.next(&mut healthy, &cancel).await {
            if let Err(e) = self.reconcile(&current).await {
                tracing::warn!(error = %e, "egress: reconcile failed; retrying");
                trigger.failed();
            }
        }
    }
}

/// Writes one change to the kernel (egress and return routing share the change type).
pub(crate) async fn execute(socket: &RouteSocket, change: &Change) -> Result<(), NetlinkError> {
    match change {
        Change::SetNexthop(n) => socket.set_nexthop(n).await,
        Change::DeleteNexthop(id) => socket.delete_nexthop(*id).await,
        Change::SetRoute(r) => socket.set_route(r).await,
        Change::DeleteRoute(r) => socket.delete_route(r).await,
        Change::AddRule(r) => socket.add_rule(r).await,
        Change::DeleteRule(r) => socket.delete_rule(r).await,
    }
}

/// Applies `changes` in order through `exec`, counting and logging each. A kill-switch route
/// the kernel refused: nothing is deleted in this pass (diff orders deletions last), since
/// removing the old routes or rules could leave client traffic with nothing but the main
/// table; `kill_switch` turns false (the VRRP instances give their VIPs up) until a pass puts
/// it back. The next pass tries again.
async fn apply_changes<F, Fut>(
    changes: Vec<Change>,
    metrics: &Metrics,
    kill_switch: &watch::Sender<bool>,
    mut exec: F,
) -> Result<ApplyReport, EgressError>
where
    F: FnMut(Change) -> Fut,
    Fut: std::future::Future<Output = Result<(), NetlinkError>>,
{
    let mut report = ApplyReport::default();
    let mut errors: Vec<NetlinkError> = Vec::new();
    let mut kill_switch_failed = false;
    for change in changes {
        let text = describe(&change);
        if kill_switch_failed && is_delete(&change) {
            tracing::warn!(change = %text, "egress: not deleting while the kill switch is not in place");
            continue;
        }
        let object = change.object();
        let refused_kill_switch = matches!(&change, Change::SetRoute(r) if r.is_kill_switch());
        let delete = is_delete(&change);
        match exec(change).await {
            Ok(()) => {
                tracing::info!(change = %text, "egress: kernel updated");
                metrics.count_change(object);
                report.writes += 1;
                report.changes.push(text);
            }
            // Already gone (the kernel removes routes with their nexthop): nothing to do.
            Err(e) if delete && matches!(e.errno(), Some(libc::ESRCH | libc::ENOENT)) => {}
            Err(e) => {
                tracing::warn!(change = %text, error = %e, "egress: kernel refused a change");
                if refused_kill_switch {
                    kill_switch_failed = true;
                    kill_switch.send_if_modified(|k| std::mem::replace(k, false));
                }
                errors.push(e);
            }
        }
    }
    let count = errors.len();
    match errors.into_iter().next() {
        None => Ok(report),
        Some(first) => {
            metrics.egress_reconcile_errors.inc();
            Err(EgressError::Apply { count, first })
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
        Change::SetRoute(r) => {
            format!(
                "set route {} table {} metric {} -> {:?}",
                r.dst, r.table, r.metric, r.target
            )
        }
        Change::DeleteRoute(r) => {
            format!(
                "delete route {} table {} metric {} ({:?})",
                r.dst, r.table, r.metric, r.target
            )
        }
        Change::AddRule(r) => format!("add rule {}", describe_rule(r)),
        Change::DeleteRule(r) => format!("delete rule {}", describe_rule(r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{Route, RouteTarget};

    fn route(dst: &str, target: RouteTarget) -> Route {
        Route {
            table: 180,
            dst: dst.parse().unwrap(),
            metric: 0,
            protocol: RTPROT_VPN_ROUTER,
            target,
        }
    }

    /// A kill-switch route the kernel refuses: the rest of the pass still writes what it adds,
    /// but deletes nothing (old routes may be all that keeps traffic off the main table), the
    /// kill switch reads false, and the error is returned.
    #[tokio::test]
    async fn a_refused_kill_switch_write_stops_every_deletion_in_the_pass() {
        let kill = route("0.0.0.0/0", RouteTarget::Blackhole);
        let changes = vec![
            Change::SetRoute(route("0.0.0.0/0", RouteTarget::Nexthop(1800))),
            Change::SetRoute(kill.clone()),
            Change::SetRoute(route("192.0.2.0/24", RouteTarget::Nexthop(1801))),
            Change::DeleteRoute(route("198.51.100.0/24", RouteTarget::Nexthop(1802))),
            Change::DeleteNexthop(1802),
        ];
        let (switch, mut state) = watch::channel(true);
        let done = std::sync::Mutex::new(Vec::new());
        let result = apply_changes(changes, &Metrics::new(), &switch, |c| {
            let refuse = c == Change::SetRoute(kill.clone());
            done.lock().unwrap().push(describe(&c));
            async move {
                if refuse {
                    Err(NetlinkError::Kernel {
                        what: "setting the kill switch".into(),
                        errno: libc::ENOBUFS,
                        message: "No buffer space available".into(),
                    })
                } else {
                    Ok(())
                }
            }
        })
        .await;
        let done = done.into_inner().unwrap();
        assert!(
            matches!(result, Err(EgressError::Apply { count: 1, .. })),
            "{result:?}"
        );
        assert_eq!(done.len(), 3, "only the three additions ran: {done:?}");
        assert!(!done.iter().any(|d| d.contains("delete")), "{done:?}");
        assert!(
            !*state.borrow_and_update(),
            "the kill switch still reads true"
        );

        // The next pass, accepted: deletions run again (reconcile then sets the switch true).
        let (switch, _) = watch::channel(false);
        let n = std::sync::atomic::AtomicUsize::new(0);
        let result = apply_changes(
            vec![Change::DeleteNexthop(1802)],
            &Metrics::new(),
            &switch,
            |_| {
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async { Ok(()) }
            },
        )
        .await;
        assert_eq!(result.unwrap().writes, 1);
        assert_eq!(n.into_inner(), 1);
    }
}
