//! Desired IPVS state vs what the kernel has → the minimal ordered list of writes, and the
//! thin async part that dumps, plans and applies.
//!
//! `plan` is pure and owns the ordering rules: new services first; per service a SET_SERVICE
//! when its settings changed, destinations added (sorted by address, then port, so every router
//! builds the same maglev table) before old ones are removed, and changed destinations updated
//! in place with SET_DEST (never delete + add for a weight change); services no longer desired
//! are deleted last. For `mh`/`sh`, whose table follows the kernel's list order, an addition
//! that would land out of order re-inserts the kept destinations that sort after it (deleted,
//! then added back in sorted order in the same batch; the kernel restores them from its trash
//! with their connections), so every router's list — and table — equals a fresh build's. It only ever touches services the `owned` predicate accepts,
//! so services configured by someone else survive. A pass with nothing to change plans nothing
//! and therefore writes nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use crate::client::{describe, IpvsClient, IpvsError, PendingReply};
use crate::codec::IpvsMessage;
use crate::metrics::{op_label, ChangeLabels, IpvsMetrics, PassLabels};
use crate::model::{Destination, ForwardMethod, Service, ServiceKey, Tunnel, TunnelType};

/// A service and its destinations as they should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub service: Service,
    pub destinations: Vec<Destination>,
}

/// A service and its destinations as the kernel has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelService {
    pub service: Service,
    pub destinations: Vec<Destination>,
}

/// One write to the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    NewService(Service),
    SetService(Service),
    DelService(ServiceKey),
    NewDest {
        service: ServiceKey,
        dest: Destination,
    },
    SetDest {
        service: ServiceKey,
        dest: Destination,
    },
    DelDest {
        service: ServiceKey,
        addr: SocketAddr,
    },
}

impl Op {
    /// How the operation is named in errors and logs.
    pub fn describe(&self) -> String {
        match self {
            Self::NewService(s) => describe::new_service(&s.key),
            Self::SetService(s) => describe::set_service(&s.key),
            Self::DelService(k) => describe::del_service(k),
            Self::NewDest { service, dest } => describe::new_dest(service, dest.addr),
            Self::SetDest { service, dest } => describe::set_dest(service, dest.addr),
            Self::DelDest { service, addr } => describe::del_dest(service, *addr),
        }
    }

    fn start(&self, client: &IpvsClient) -> Result<PendingReply, IpvsError> {
        let msg = match self {
            Self::NewService(s) => IpvsMessage::new_service(s),
            Self::SetService(s) => IpvsMessage::set_service(s),
            Self::DelService(k) => Ok(IpvsMessage::del_service(k)),
            Self::NewDest { service, dest } => Ok(IpvsMessage::new_dest(service, dest)),
            Self::SetDest { service, dest } => Ok(IpvsMessage::set_dest(service, dest)),
            Self::DelDest { service, addr } => Ok(IpvsMessage::del_dest(service, *addr)),
        };
        let msg = msg.map_err(|source| IpvsError::Encode {
            op: self.describe(),
            source,
        })?;
        Ok(client.start_write(self.describe(), msg))
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

fn same_service_settings(have: &Service, want: &Service) -> bool {
    have.scheduler == want.scheduler
        && have.flags.user_visible() == want.flags.user_visible()
        && have.timeout == want.timeout
        && have.netmask == want.netmask
        && have.pe_name == want.pe_name
}

/// The kernel reports tunnel settings (IPIP, port 0, no flags by default) for tunnel forwarding
/// only; compare what it will report.
fn effective_tunnel(d: &Destination) -> Option<Tunnel> {
    (d.forward == ForwardMethod::Tunnel).then(|| {
        d.tunnel.unwrap_or(Tunnel {
            kind: TunnelType::Ipip,
            port: 0,
            flags: 0,
        })
    })
}

fn same_dest_settings(have: &Destination, want: &Destination) -> bool {
    have.forward == want.forward
        && have.weight == want.weight
        && have.upper_threshold == want.upper_threshold
        && have.lower_threshold == want.lower_threshold
        && effective_tunnel(have) == effective_tunnel(want)
}

/// Schedulers whose lookup table is built by walking the service's destination list, so two
/// routers with the same destinations but a different insertion history build different
/// tables: `mh` (maglev, `ip_vs_mh_populate`) and `sh` (`ip_vs_sh_reassign`).
fn table_depends_on_order(scheduler: &str) -> bool {
    matches!(scheduler, "mh" | "sh")
}

/// Which destinations of an `mh`/`sh` service must be deleted and added again so that the
/// kernel's list ends up as if every destination had been added once, in sorted order (what a
/// router building the service from empty gets).
///
/// The kernel adds a destination at the head of the list (`list_add_rcu` in
/// `__ip_vs_update_dest`) and a dump walks it from the head, so "added in sorted order" reads
/// back as strictly descending; deleting keeps the others' order. `kernel_order` is the
/// current list as dumped. The longest tail of kept destinations that is descending and below
/// everything that will be (re-)added stays; the rest is re-added. Nothing is re-added when
/// nothing new comes in, so a no-change pass stays empty and a restarted daemon adopts the
/// list it finds.
fn reinsert_for_order(
    kernel_order: &[SocketAddr],
    want: &BTreeMap<SocketAddr, &Destination>,
) -> Vec<SocketAddr> {
    let kept: Vec<SocketAddr> = kernel_order
        .iter()
        .copied()
        .filter(|a| want.contains_key(a))
        .collect();
    let have: std::collections::BTreeSet<SocketAddr> = kernel_order.iter().copied().collect();
    let Some(min_new) = want.keys().copied().find(|a| !have.contains(a)) else {
        return Vec::new();
    };
    // j: start of the tail that stays. Walk from the end while the tail stays descending.
    let mut j = kept.len();
    while j > 0 {
        let cand = kept[j - 1];
        let descending = j == kept.len() || cand > kept[j];
        if !descending {
            break;
        }
        j -= 1;
    }
    // Everything before the tail (and every new destination) must sort after the tail's
    // head; shrink the tail until it does.
    while let Some(&head) = kept.get(j) {
        let lowest_added = kept[..j]
            .iter()
            .copied()
            .min()
            .map_or(min_new, |m| m.min(min_new));
        if lowest_added > head {
            break;
        }
        j += 1;
    }
    kept[..j].to_vec()
}

/// The minimal ordered writes that turn `current` into `desired`, touching only services for
/// which `owned` is true (desired services that are not owned are ignored too). Duplicate
/// services or destinations in `desired`: the later entry wins.
pub fn plan(
    desired: &[DesiredService],
    current: &[KernelService],
    owned: impl Fn(&ServiceKey) -> bool,
) -> Vec<Op> {
    let want: BTreeMap<ServiceKey, &DesiredService> = desired
        .iter()
        .filter(|d| owned(&d.service.key))
        .map(|d| (d.service.key, d))
        .collect();
    let have: BTreeMap<ServiceKey, &KernelService> = current
        .iter()
        .filter(|k| owned(&k.service.key))
        .map(|k| (k.service.key, k))
        .collect();

    let mut ops = Vec::new();
    for (key, d) in &want {
        if !have.contains_key(key) {
            ops.push(Op::NewService(d.service.clone()));
        }
    }
    for (key, d) in &want {
        let current = have.get(key);
        if let Some(k) = current {
            if !same_service_settings(&k.service, &d.service) {
                ops.push(Op::SetService(d.service.clone()));
            }
        }
        // BTreeMap on SocketAddr: IPv4 before IPv6, then address, then port.
        let want_dests: BTreeMap<SocketAddr, &Destination> =
            d.destinations.iter().map(|x| (x.addr, x)).collect();
        let mut have_dests: BTreeMap<SocketAddr, &Destination> = current
            .map(|k| k.destinations.iter().map(|x| (x.addr, x)).collect())
            .unwrap_or_default();
        if let (Some(k), true) = (current, table_depends_on_order(&d.service.scheduler)) {
            // Re-insert the destinations that would otherwise end up out of order; they are
            // then added below with the new ones, in sorted order, with their wanted settings.
            let kernel_order: Vec<SocketAddr> = k.destinations.iter().map(|x| x.addr).collect();
            for addr in reinsert_for_order(&kernel_order, &want_dests) {
                ops.push(Op::DelDest {
                    service: *key,
                    addr,
                });
                have_dests.remove(&addr);
            }
        }
        for (addr, dest) in &want_dests {
            if !have_dests.contains_key(addr) {
                ops.push(Op::NewDest {
                    service: *key,
                    dest: (*dest).clone(),
                });
            }
        }
        for (addr, dest) in &want_dests {
            if let Some(h) = have_dests.get(addr) {
                if !same_dest_settings(h, dest) {
                    ops.push(Op::SetDest {
                        service: *key,
                        dest: (*dest).clone(),
                    });
                }
            }
        }
        for addr in have_dests.keys() {
            if !want_dests.contains_key(addr) {
                ops.push(Op::DelDest {
                    service: *key,
                    addr: *addr,
                });
            }
        }
    }
    for key in have.keys() {
        if !want.contains_key(key) {
            ops.push(Op::DelService(*key));
        }
    }
    ops
}

/// An operation the kernel refused (or that could not be sent).
#[derive(Debug)]
pub struct OpError {
    /// Position of the operation in the applied list.
    pub index: usize,
    pub op: Op,
    pub error: IpvsError,
}

/// How many requests may wait for their acknowledgement at once. Requests reach the kernel in
/// order regardless; the window only bounds the acks queued in the socket's receive buffer.
const WINDOW: usize = 128;

/// Executes `ops` in order (pipelined) and reports every failure; one failure does not stop
/// the rest (a destination whose service could not be created fails on its own).
pub async fn apply(client: &IpvsClient, ops: &[Op]) -> Vec<OpError> {
    let mut errors = Vec::new();
    let mut in_flight: std::collections::VecDeque<(usize, PendingReply)> = Default::default();
    for (i, op) in ops.iter().enumerate() {
        match op.start(client) {
            Ok(p) => in_flight.push_back((i, p)),
            Err(error) => errors.push(OpError {
                index: i,
                op: op.clone(),
                error,
            }),
        }
        if in_flight.len() >= WINDOW {
            if let Some((j, p)) = in_flight.pop_front() {
                settle(j, &ops[j], p.finish().await, &mut errors);
            }
        }
    }
    while let Some((j, p)) = in_flight.pop_front() {
        settle(j, &ops[j], p.finish().await, &mut errors);
    }
    errors.sort_by_key(|e| e.index);
    errors
}

fn settle(
    index: usize,
    op: &Op,
    result: Result<Vec<IpvsMessage>, IpvsError>,
    errors: &mut Vec<OpError>,
) {
    match result {
        Ok(_) => tracing::debug!(op = %op, "ipvs change applied"),
        Err(error) => {
            tracing::warn!(error = %error, "ipvs change failed");
            errors.push(OpError {
                index,
                op: op.clone(),
                error,
            });
        }
    }
}

/// Reads the services `owned` accepts, with their destinations (dumped pipelined).
pub async fn dump(
    client: &IpvsClient,
    owned: impl Fn(&ServiceKey) -> bool,
) -> Result<Vec<KernelService>, IpvsError> {
    let services: Vec<Service> = client
        .services()
        .await?
        .into_iter()
        .map(|e| e.service)
        .filter(|s| owned(&s.key))
        .collect();
    let mut out = Vec::with_capacity(services.len());
    let mut in_flight = std::collections::VecDeque::new();
    let mut iter = services.into_iter();
    loop {
        while in_flight.len() < WINDOW {
            match iter.next() {
                Some(s) => {
                    let p = client.start_dests(&s.key);
                    in_flight.push_back((s, p));
                }
                None => break,
            }
        }
        let Some((service, p)) = in_flight.pop_front() else {
            break;
        };
        let destinations = IpvsClient::finish_dests(&service.key, p)
            .await?
            .into_iter()
            .map(|e| e.destination)
            .collect();
        out.push(KernelService {
            service,
            destinations,
        });
    }
    Ok(out)
}

/// What one reconcile pass did.
#[derive(Debug, Default)]
pub struct ReconcileOutcome {
    /// Every write that was attempted, in order.
    pub ops: Vec<Op>,
    /// The writes that failed.
    pub errors: Vec<OpError>,
}

/// dump → plan → apply for the services a predicate owns (e.g. those whose VIP is configured).
pub struct Reconciler<F> {
    client: IpvsClient,
    owned: F,
    metrics: Option<IpvsMetrics>,
}

impl<F> fmt::Debug for Reconciler<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconciler")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl<F: Fn(&ServiceKey) -> bool> Reconciler<F> {
    pub fn new(client: IpvsClient, owned: F) -> Self {
        Self {
            client,
            owned,
            metrics: None,
        }
    }

    /// Counts every write and pass in `metrics` (register them with `IpvsMetrics::register`).
    pub fn with_metrics(mut self, metrics: IpvsMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn client(&self) -> &IpvsClient {
        &self.client
    }

    /// One pass. A dump failure aborts the pass (nothing is written); write failures are
    /// collected in the outcome and the rest is still applied.
    pub async fn reconcile(
        &self,
        desired: &[DesiredService],
    ) -> Result<ReconcileOutcome, IpvsError> {
        let started = tokio::time::Instant::now();
        let current = match dump(&self.client, &self.owned).await {
            Ok(c) => c,
            Err(e) => {
                self.count_pass("dump_error");
                return Err(e);
            }
        };
        let ops = plan(desired, &current, &self.owned);
        let errors = if ops.is_empty() {
            Vec::new()
        } else {
            apply(&self.client, &ops).await
        };
        if !ops.is_empty() {
            tracing::info!(
                changes = ops.len(),
                failed = errors.len(),
                services = desired.len(),
                "ipvs reconciled"
            );
        }
        if let Some(m) = &self.metrics {
            let failed: std::collections::HashSet<usize> = errors.iter().map(|e| e.index).collect();
            for (i, op) in ops.iter().enumerate() {
                let result = if failed.contains(&i) { "error" } else { "ok" };
                m.changes
                    .get_or_create(&ChangeLabels {
                        op: op_label(op),
                        result,
                    })
                    .inc();
            }
            let owned: Vec<&DesiredService> = desired
                .iter()
                .filter(|d| (self.owned)(&d.service.key))
                .collect();
            m.services.set(owned.len() as i64);
            m.destinations
                .set(owned.iter().map(|d| d.destinations.len() as i64).sum());
            m.last_pass_seconds.set(started.elapsed().as_secs_f64());
        }
        self.count_pass(if errors.is_empty() {
            "ok"
        } else {
            "write_errors"
        });
        Ok(ReconcileOutcome { ops, errors })
    }

    fn count_pass(&self, result: &'static str) {
        if let Some(m) = &self.metrics {
            m.passes.get_or_create(&PassLabels { result }).inc();
        }
    }
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
