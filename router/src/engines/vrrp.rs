//! The VRRP engine: one `vrrp::run` task per configured instance, the mapping of the
//! `vrrp:` config (plus the derived ingress VIPs) onto `vrrp::InstanceConfig`, gateway
//! tracking fed from the daemon-wide healthy set, the status board entry `vrrp` and the
//! `roles` watch.
//!
//! Unlike the other engines it is not restarted wholesale when its section changes: a reload
//! must not move the VIPs. Each instance gets the changes `vrrp::run` applies live through its
//! `reload` watch; an instance is restarted only for changes the runner cannot apply, and
//! then in the way that keeps the VIPs where they are when that is possible (see
//! [`Restart`]). It makes no protocol decision itself (that is the `vrrp` crate's).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ::vrrp::{ChecksumMode, GratuitousConfig, InstanceConfig, InstanceStatus, Track, Version};
use gateway_route_manager as grm;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Roles, Shared};
use crate::config::{Config, VrrpInstance, VrrpVersion};
use crate::status::{ComponentState, ComponentStatus, StatusBoard};

/// How long a failed instance setup (missing interface, no raw-socket privilege) waits
/// before it is tried again.
const SETUP_RETRY: Duration = Duration::from_secs(5);

/// The VRRP instances of the daemon.
#[derive(Debug)]
pub(super) struct VrrpEngine {
    metrics: ::vrrp::VrrpMetrics,
    instances: BTreeMap<String, Instance>,
    /// Tasks of removed instances still handing over, by name; awaited at shutdown, and by
    /// an instance of the same name added back before they finished.
    stopping: Vec<(String, JoinHandle<()>)>,
    view: Option<Arc<View>>,
}

#[derive(Debug)]
struct Instance {
    config: InstanceConfig,
    reload: watch::Sender<InstanceConfig>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// What a config change needs from a running instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Restart {
    /// Nothing, or only what `vrrp::run` applies through its reload watch: priority,
    /// advert_interval, preempt, preempt_delay, track, gratuitous, handoff_timeout,
    /// max_peer_advert_interval, allowed_peers.
    No,
    /// `virtual_ips` (also the derived ingress VIPs), `unicast_peers`, the checksum mode or
    /// the sibling VRIDs changed: the instance is stopped without a handoff (like kill -9)
    /// and started again at once; a master finds its VIPs and adopts them, so nothing moves.
    /// VIPs no longer configured are removed in between.
    Adopt,
    /// The instance's identity changed (`interface`, `vrid`, `version`, `vmac`): it hands
    /// over (priority-0 advert), lets its VIPs go and starts as a new instance. The VIPs move.
    Handover,
}

/// Which kind of restart going from `old` to `new` needs.
pub(super) fn restart_needed(old: &InstanceConfig, new: &InstanceConfig) -> Restart {
    if old.interface != new.interface
        || old.vrid != new.vrid
        || old.version != new.version
        || old.vmac != new.vmac
    {
        Restart::Handover
    } else if old.virtual_ips != new.virtual_ips
        || old.unicast_peers != new.unicast_peers
        || old.checksum_mode != new.checksum_mode
        || old.sibling_vrids != new.sibling_vrids
    {
        Restart::Adopt
    } else {
        Restart::No
    }
}

impl VrrpEngine {
    /// Registers the VRRP metrics once for the daemon's life.
    pub(super) fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = ::vrrp::VrrpMetrics::new();
        metrics.register(registry);
        Self {
            metrics,
            instances: BTreeMap::new(),
            stopping: Vec::new(),
            view: None,
        }
    }

    /// Brings the running instances in line with `config`. Must run inside the runtime.
    pub(super) fn apply(
        &mut self,
        config: &Config,
        shared: &Shared,
        roles: &watch::Sender<Roles>,
        root: &CancellationToken,
    ) {
        let view = self
            .view
            .get_or_insert_with(|| {
                let view = Arc::new(View {
                    metrics: self.metrics.clone(),
                    board: shared.board.clone(),
                    roles: roles.clone(),
                    entries: Mutex::new(BTreeMap::new()),
                });
                // Weak: the view holds the board; a strong reference back would be a cycle.
                let weak = Arc::downgrade(&view);
                shared.board.set_refresher(
                    "vrrp",
                    Box::new(move || {
                        if let Some(view) = weak.upgrade() {
                            view.refresh_counters();
                        }
                    }),
                );
                view
            })
            .clone();
        self.stopping.retain(|(_, t)| !t.is_finished());
        let desired: BTreeMap<String, InstanceConfig> = instance_configs(config)
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();

        let gone: Vec<String> = self
            .instances
            .keys()
            .filter(|n| !desired.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(old) = self.instances.remove(&name) {
                tracing::info!(instance = %name, "VRRP instance removed from the config: handing over");
                old.cancel.cancel();
                self.stopping.push((name, old.task));
            }
        }

        for (name, new) in desired {
            let spawn = |previous: Option<(JoinHandle<()>, Option<InstanceConfig>)>,
                         metrics: &::vrrp::VrrpMetrics| {
                let cancel = root.child_token();
                let (reload, reload_rx) = watch::channel(new.clone());
                let task = tokio::spawn(instance_task(
                    previous,
                    reload_rx,
                    shared.kill_switch.clone(),
                    shared.healthy.clone(),
                    metrics.clone(),
                    cancel.clone(),
                    view.clone(),
                ));
                Instance {
                    config: new.clone(),
                    reload,
                    cancel,
                    task,
                }
            };
            let Some(old) = self.instances.remove(&name) else {
                // Removed a moment ago and still handing over: the new one waits for it
                // (two runners on one VRID would fight, and its end clears the status).
                let previous = self
                    .stopping
                    .iter()
                    .position(|(n, _)| *n == name)
                    .map(|i| (self.stopping.swap_remove(i).1, None));
                let inst = spawn(previous, &self.metrics);
                self.instances.insert(name, inst);
                continue;
            };
            match restart_needed(&old.config, &new) {
                Restart::No => {
                    if old.config != new {
                        tracing::info!(instance = %name, "VRRP reload applied in place");
                        old.reload.send_replace(new.clone());
                    }
                    let mut old = old;
                    old.config = new;
                    self.instances.insert(name, old);
                }
                Restart::Adopt => {
                    tracing::info!(instance = %name, "VRRP reload: virtual_ips, unicast_peers, checksum or sibling instances changed; restarting the instance in place (a master keeps its VIPs)");
                    old.task.abort();
                    let stale: Vec<_> = old
                        .config
                        .virtual_ips
                        .iter()
                        .filter(|v| !new.virtual_ips.contains(v))
                        .cloned()
                        .collect();
                    let stale_cfg = InstanceConfig {
                        virtual_ips: stale,
                        ..old.config.clone()
                    };
                    let inst = spawn(Some((old.task, Some(stale_cfg))), &self.metrics);
                    self.instances.insert(name, inst);
                }
                Restart::Handover => {
                    tracing::warn!(instance = %name, "VRRP reload: interface, vrid, version or vmac changed; the instance hands over and starts anew (its VIPs move)");
                    old.cancel.cancel();
                    let inst = spawn(Some((old.task, None)), &self.metrics);
                    self.instances.insert(name, inst);
                }
            }
        }
    }

    /// Every task to await at shutdown (after the root token was cancelled).
    pub(super) fn take_tasks(&mut self) -> Vec<JoinHandle<()>> {
        let mut tasks: Vec<JoinHandle<()>> = std::mem::take(&mut self.instances)
            .into_values()
            .map(|i| i.task)
            .collect();
        tasks.extend(self.stopping.drain(..).map(|(_, t)| t));
        tasks
    }
}

/// The `vrrp::InstanceConfig` of every configured instance.
pub(super) fn instance_configs(c: &Config) -> Vec<InstanceConfig> {
    c.vrrp
        .iter()
        .map(|v| {
            let mut cfg =
                InstanceConfig::new(&v.name.value, &v.interface, v.vrid, virtual_ips(v, c));
            cfg.version = match v.version {
                VrrpVersion::V2 => Version::V2,
                VrrpVersion::V3 => Version::V3,
            };
            cfg.priority = v.priority;
            cfg.advert_interval = v.advert_interval;
            cfg.preempt = v.preempt;
            cfg.preempt_delay = v.preempt_delay;
            cfg.unicast_peers = v.unicast_peers.clone();
            cfg.max_peer_advert_interval = Some(v.max_peer_advert_interval);
            cfg.allowed_peers = v.allowed_peers.iter().map(|a| a.value).collect();
            cfg.vmac = v.vmac;
            cfg.track = v.track_gateways.map(|t| Track {
                min_healthy: t.min_healthy as usize,
                weight: t.weight.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16,
            });
            cfg.checksum_mode = if v.v3_checksum_as_v2 {
                ChecksumMode::MessageOnly
            } else {
                ChecksumMode::PseudoHeader
            };
            cfg.gratuitous = GratuitousConfig {
                repeat: v.garp_master_repeat,
                refresh: (!v.garp_master_refresh.is_zero()).then_some(v.garp_master_refresh),
                ..GratuitousConfig::default()
            };
            cfg.sibling_vrids = c
                .vrrp
                .iter()
                .filter(|o| o.interface == v.interface && o.vrid != v.vrid)
                .map(|o| o.vrid)
                .collect();
            cfg
        })
        .collect()
}

/// The configured VIPs, then with `gateway_ingress_vips` one ingress VIP per gateway
/// (`ingress_vip_start + i`) with the prefix length and interface of the instance's first
/// IPv4 VIP: the ingress VIPs live in the same subnet as the egress VIP, and validation
/// guarantees the instance is IPv4.
fn virtual_ips(v: &VrrpInstance, c: &Config) -> Vec<::vrrp::VirtualIp> {
    let mut out: Vec<::vrrp::VirtualIp> = v
        .virtual_ips
        .iter()
        .map(|vip| ::vrrp::VirtualIp {
            addr: vip.address.value.addr(),
            prefix_len: vip.address.value.prefix_len(),
            interface: vip.interface.clone(),
        })
        .collect();
    let first_v4 = out.iter().find(|x| x.addr.is_ipv4()).cloned();
    if let (true, Some(g), Some(first)) = (v.gateway_ingress_vips, &c.gateways, first_v4) {
        for a in g.ingress_vips() {
            let addr = IpAddr::V4(a);
            if !out.iter().any(|x| x.addr == addr) {
                out.push(::vrrp::VirtualIp {
                    addr,
                    prefix_len: first.prefix_len,
                    interface: first.interface.clone(),
                });
            }
        }
    }
    out
}

/// The healthy-gateway count an instance's tracking sees. Until the gateways engine has
/// checked every gateway once (`complete`), the count is not known: the last complete count
/// is kept, and before the first one the router counts as healthy. Counting an unknown set as
/// 0 would lower the priority of every router at every start, and a master restarted after
/// kill -9 would adopt its VIPs with the lowered priority and lose them to the backup — a
/// failover caused by the restart itself. A router whose gateways really are broken drops its
/// priority after the first full round of checks (interval × fall at most).
fn tracked_count(h: &grm::HealthyGateways, last_complete: &mut Option<usize>) -> usize {
    if h.complete {
        *last_complete = Some(h.len());
        h.len()
    } else {
        last_complete.unwrap_or(usize::MAX)
    }
}

/// The daemon's one wall-clock read for VRRP: `vrrp::run` stamps its transitions with it
/// (the library reads only tokio's monotonic clock).
#[allow(clippy::disallowed_methods)]
fn wall_clock_now() -> SystemTime {
    SystemTime::now()
}

/// Runs one instance until cancelled: waits for the instance it replaces, runs `vrrp::run`,
/// feeds it the tracked gateway count and mirrors its status. Setup errors are shown on the
/// board and retried.
async fn instance_task(
    previous: Option<(JoinHandle<()>, Option<InstanceConfig>)>,
    mut reload: watch::Receiver<InstanceConfig>,
    mut kill_switch: watch::Receiver<bool>,
    mut healthy: watch::Receiver<grm::HealthyGateways>,
    metrics: ::vrrp::VrrpMetrics,
    cancel: CancellationToken,
    view: Arc<View>,
) {
    if let Some((task, stale)) = previous {
        // Two runners on one VRID and socket would fight; the old one must be gone.
        let _ = task.await;
        if let Some(stale) = stale.filter(|s| !s.virtual_ips.is_empty()) {
            remove_stale(&stale).await;
        }
    }
    let name = reload.borrow().name.clone();
    let fixed = {
        let c = reload.borrow();
        Fixed {
            interface: c.interface.clone(),
            vrid: c.vrid,
            virtual_ips: c
                .virtual_ips
                .iter()
                .map(|v| format!("{}/{} on {}", v.addr, v.prefix_len, v.interface))
                .collect(),
        }
    };
    view.update(&name, InstanceStatus::new(&name), Some(fixed));
    // No VMAC, no advert, no VIP before the egress kill switch is in the kernel: a backup's
    // VMAC already receives client frames the switch floods, and would route them by the main
    // table, out of the pod's own network.
    if !wait_for_kill_switch(&mut kill_switch, &cancel, &view, &name).await {
        view.remove(&name);
        return;
    }
    let mut last_complete = None;
    loop {
        let config = reload.borrow_and_update().clone();
        let (count_tx, count_rx) = watch::channel(tracked_count(
            &healthy.borrow_and_update(),
            &mut last_complete,
        ));
        let (status_tx, mut status_rx) = watch::channel(InstanceStatus::new(&name));
        // The instance's own stop: the daemon's, or the kill switch lost while it runs.
        let run = cancel.child_token();
        let mut lost_kill_switch = false;
        let mut kill_switch_gone = false;
        let handles = ::vrrp::RunHandles {
            healthy: count_rx,
            shutdown: run.clone(),
            status: status_tx,
            metrics: metrics.clone(),
            reload: Some(reload.clone()),
            wall_clock_at_start: wall_clock_now(),
        };
        // Each instance on a thread of its own (see `vrrp::spawn`). Dropping it (this task
        // aborted for a `Restart::Adopt`) stops it without a handover and waits until it is
        // gone.
        let result = match ::vrrp::spawn(config, handles) {
            Err(e) => Err(e),
            Ok(mut instance) => loop {
                tokio::select! {
                    res = instance.wait() => break res,
                    Ok(()) = status_rx.changed() => {
                        let s = status_rx.borrow_and_update().clone();
                        view.update(&name, s, None);
                    }
                    Ok(()) = healthy.changed() => {
                        let n = tracked_count(&healthy.borrow_and_update(), &mut last_complete);
                        count_tx.send_if_modified(|c| std::mem::replace(c, n) != n);
                    }
                    r = kill_switch.wait_for(|k| !*k), if !lost_kill_switch && !kill_switch_gone => {
                        if r.is_ok() {
                            // What a stop does: a master sends priority 0 (the backup takes
                            // over at once) and drops its VIPs and VMAC.
                            tracing::error!(instance = %name, "the egress kill switch is no longer in the kernel: giving up the VIPs until it is");
                            lost_kill_switch = true;
                            run.cancel();
                        } else {
                            kill_switch_gone = true;
                        }
                    }
                }
            },
        };
        view.update(&name, status_rx.borrow().clone(), None);
        match result {
            Ok(()) if lost_kill_switch && !cancel.is_cancelled() => {
                if !wait_for_kill_switch(&mut kill_switch, &cancel, &view, &name).await {
                    break;
                }
            }
            Ok(()) => break,
            Err(e) => {
                tracing::error!(instance = %name, error = %e, retry_in = ?SETUP_RETRY, "VRRP instance cannot start");
                view.setup_error(&name, e.to_string());
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(SETUP_RETRY) => {}
                }
            }
        }
    }
    view.remove(&name);
    metrics.remove_instance(&name);
}

/// Until the egress kill switch is in the kernel: says so in `/status` and waits. False when
/// the daemon stops first.
async fn wait_for_kill_switch(
    kill_switch: &mut watch::Receiver<bool>,
    cancel: &CancellationToken,
    view: &View,
    name: &str,
) -> bool {
    if *kill_switch.borrow_and_update() {
        return true;
    }
    view.setup_error(
        name,
        "waiting for the egress kill switch (gateways.egress) to be in the kernel before taking part in VRRP".into(),
    );
    tokio::select! {
        _ = cancel.cancelled() => false,
        r = kill_switch.wait_for(|k| *k) => r.is_ok(),
    }
}

/// Removes VIPs a restarted instance no longer holds (see [`Restart::Adopt`]).
async fn remove_stale(stale: &InstanceConfig) {
    let result = match ::vrrp::netlink::Netlink::connect() {
        Ok(nl) => {
            ::vrrp::vip::remove_addresses(&nl, stale.vrid, stale.vmac, &stale.virtual_ips).await
        }
        Err(e) => Err(e.into()),
    };
    if let Err(e) = result {
        tracing::warn!(instance = %stale.name, error = %e, "VRRP reload: removing VIPs that are no longer configured failed");
    }
}

/// The `vrrp` status board entry and the roles, built from every instance's last status.
#[derive(Debug)]
struct View {
    metrics: ::vrrp::VrrpMetrics,
    board: Arc<StatusBoard>,
    roles: watch::Sender<Roles>,
    entries: Mutex<BTreeMap<String, Entry>>,
}

#[derive(Debug, Clone, Serialize)]
struct Entry {
    #[serde(flatten)]
    status: InstanceStatus,
    #[serde(flatten)]
    fixed: Fixed,
    /// Adverts sent since the instance started (a restart that hands over starts it again
    /// at 0); read from the metrics when `/status` is read (see `View::refresh_counters`).
    adverts_sent: u64,
    /// Valid adverts received, counted the same way.
    adverts_received: u64,
    /// Why the instance is not running (it is retried).
    setup_error: Option<String>,
}

/// What an instance runs with that only a restart changes.
#[derive(Debug, Clone, Default, Serialize)]
struct Fixed {
    interface: String,
    vrid: u8,
    virtual_ips: Vec<String>,
}

impl View {
    fn update(&self, name: &str, status: InstanceStatus, fixed: Option<Fixed>) {
        let state = status.state;
        {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let e = entries.entry(name.to_string()).or_insert_with(|| Entry {
                status: status.clone(),
                fixed: Fixed::default(),
                adverts_sent: 0,
                adverts_received: 0,
                setup_error: None,
            });
            if state != ::vrrp::State::Initialize {
                e.setup_error = None;
            }
            e.status = status;
            if let Some(f) = fixed {
                e.fixed = f;
            }
        }
        self.roles.send_if_modified(|r| {
            r.insert(name.to_string(), state)
                .is_none_or(|old| old != state)
        });
        self.publish();
    }

    /// Copies the advert counters into the board entry, on every `/status` read. The runner
    /// publishes a status change only when state, priority, master or an error changes, and
    /// pushing the counters instead (at first with every advert, later every second) woke a
    /// task and serialised the entry for nobody: at 10 ms adverts that cost more than the
    /// protocol itself.
    fn refresh_counters(&self) {
        if self.read_counters() {
            self.publish();
        }
    }

    /// Copies the advert counters from the metrics into the entries; true if any changed.
    fn read_counters(&self) -> bool {
        let mut changed = false;
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for (name, e) in entries.iter_mut() {
            let (sent, received) = self.metrics.advert_counts(name);
            changed |= (sent, received) != (e.adverts_sent, e.adverts_received);
            e.adverts_sent = sent;
            e.adverts_received = received;
        }
        changed
    }

    fn setup_error(&self, name: &str, error: String) {
        if let Some(e) = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(name)
        {
            e.setup_error = Some(error);
        }
        self.publish();
    }

    fn remove(&self, name: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.roles.send_if_modified(|r| r.remove(name).is_some());
        self.publish();
    }

    fn publish(&self) {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.is_empty() {
            self.board.remove("vrrp");
            return;
        }
        let degraded = entries.values().any(|e| e.setup_error.is_some());
        let ready = entries
            .values()
            .all(|e| e.status.state != ::vrrp::State::Initialize);
        let instances: Vec<&Entry> = entries.values().collect();
        self.board.set(
            "vrrp",
            ComponentStatus {
                state: if degraded {
                    ComponentState::Degraded
                } else {
                    ComponentState::Running
                },
                ready,
                detail: serde_json::json!({ "instances": instances }),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn load(yaml: &str) -> Config {
        crate::config::load_str(Path::new("t.yaml"), yaml)
            .map_err(|e| e.lines())
            .expect("valid config")
            .config
    }

    const BASE: &str = r#"
vrrp:
  - name: router
    interface: adv0
    vrid: 51
    priority: 150
    advert_interval: 10ms
    virtual_ips:
      - { address: 192.168.26.254/22, interface: gw0 }
    gateway_ingress_vips: true
    track_gateways: { min_healthy: 1, weight: -60 }
    allowed_peers: [192.168.28.2]
  - name: other
    interface: adv0
    vrid: 52
    version: 2
    advert_interval: 1s
    v3_checksum_as_v2: true
    garp_master_refresh: 30s
    virtual_ips:
      - { address: 192.168.26.253/22, interface: gw0 }
gateways:
  interface: gw0
  addresses: 192.168.25.128-192.168.25.130
"#;

    #[test]
    fn maps_every_field_and_derives_ingress_vips() {
        let c = load(BASE);
        let cfgs = instance_configs(&c);
        assert_eq!(cfgs.len(), 2);
        let r = &cfgs[0];
        assert_eq!(r.name, "router");
        assert_eq!(r.priority, 150);
        assert_eq!(r.advert_interval, Duration::from_millis(10));
        assert_eq!(r.version, Version::V3);
        assert_eq!(
            r.track,
            Some(Track {
                min_healthy: 1,
                weight: -60
            })
        );
        assert_eq!(r.sibling_vrids, vec![52]);
        // Not set: 10 × its own 10ms, resolved by the config.
        assert_eq!(r.max_peer_advert_interval, Some(Duration::from_millis(100)));
        assert_eq!(
            r.allowed_peers,
            vec!["192.168.28.2".parse::<IpAddr>().unwrap()]
        );
        let vips: Vec<String> = r
            .virtual_ips
            .iter()
            .map(|v| format!("{}/{} {}", v.addr, v.prefix_len, v.interface))
            .collect();
        assert_eq!(
            vips,
            [
                "192.168.26.254/22 gw0",
                "192.168.26.128/22 gw0",
                "192.168.26.129/22 gw0",
                "192.168.26.130/22 gw0"
            ]
        );
        r.validate().expect("valid instance");
        let o = &cfgs[1];
        assert_eq!(o.version, Version::V2);
        assert_eq!(o.checksum_mode, ChecksumMode::MessageOnly);
        assert_eq!(o.gratuitous.refresh, Some(Duration::from_secs(30)));
        assert_eq!(o.virtual_ips.len(), 1);
        assert_eq!(o.sibling_vrids, vec![51]);
        assert_eq!(o.max_peer_advert_interval, Some(Duration::from_secs(10)));
        assert!(o.allowed_peers.is_empty());
        o.validate().expect("valid instance");
    }

    #[test]
    fn restart_only_for_what_the_runner_cannot_apply() {
        let c = load(BASE);
        let old = instance_configs(&c).remove(0);
        let live = load(
            &BASE
                .replace("priority: 150", "priority: 120")
                .replace("weight: -60", "weight: -10")
                .replace(
                    "allowed_peers: [192.168.28.2]",
                    "allowed_peers: [192.168.28.3]\n    max_peer_advert_interval: 2s",
                ),
        );
        assert_eq!(
            restart_needed(&old, &instance_configs(&live)[0]),
            Restart::No
        );
        // One more gateway: one more ingress VIP; a master keeps the others.
        let more = load(&BASE.replace("192.168.25.130", "192.168.25.131"));
        assert_eq!(
            restart_needed(&old, &instance_configs(&more)[0]),
            Restart::Adopt
        );
        let vrid = load(&BASE.replace("vrid: 51", "vrid: 61"));
        assert_eq!(
            restart_needed(&old, &instance_configs(&vrid)[0]),
            Restart::Handover
        );
    }

    #[test]
    fn an_unknown_healthy_set_counts_as_healthy_then_keeps_the_last_known() {
        let mut last = None;
        let unknown = grm::HealthyGateways::default();
        assert_eq!(tracked_count(&unknown, &mut last), usize::MAX);
        let none = grm::HealthyGateways {
            complete: true,
            ..Default::default()
        };
        assert_eq!(tracked_count(&none, &mut last), 0);
        // The gateways engine restarted (reload): still 0 until it knows again.
        assert_eq!(tracked_count(&unknown, &mut last), 0);
    }

    /// Runs `cmd` with `sh -c`; its stdout. Fails the test when it fails.
    fn sh(cmd: &str) -> String {
        let out = std::process::Command::new("sh")
            .args(["-c", cmd])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread inside a fresh network namespace (removed afterwards), on a
    /// current-thread runtime. Root only, like the namespace tier.
    fn in_netns<F, Fut>(tag: &str, f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let name = format!("vr-{tag}-{}", std::process::id());
        sh(&format!("ip netns add {name}"));
        let path = format!("/run/netns/{name}");
        let result = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f());
        })
        .join();
        sh(&format!("ip netns del {name}"));
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }

    /// The kill switch gates mastership for as long as the instance runs, not only at start:
    /// lost, the master hands its VIP over (a stop's priority-0 advert) and waits, saying why
    /// in /status; back, it takes part again.
    #[test]
    fn losing_the_kill_switch_gives_the_vips_up_until_it_is_back() {
        in_netns("ks", || async {
            sh("ip link add ks0 type veth peer name ks1 && ip link set ks0 up && ip link set ks1 up && ip addr add 192.0.2.1/24 dev ks0");
            let c = load("vrrp:\n  - { name: r, interface: ks0, vrid: 77, advert_interval: 50ms, vmac: false, virtual_ips: [192.0.2.254/24] }\n");
            let config = instance_configs(&c).remove(0);
            let (roles_tx, roles) = watch::channel(Roles::new());
            let metrics = ::vrrp::VrrpMetrics::new();
            let view = Arc::new(View {
                metrics: metrics.clone(),
                board: StatusBoard::new("t.yaml".into(), 0.0),
                roles: roles_tx,
                entries: Mutex::new(BTreeMap::new()),
            });
            let (_reload, reload_rx) = watch::channel(config);
            let (kill_switch, kill_switch_rx) = watch::channel(true);
            let (_healthy, healthy_rx) = watch::channel(grm::HealthyGateways::default());
            let cancel = CancellationToken::new();
            let task = tokio::spawn(instance_task(
                None,
                reload_rx,
                kill_switch_rx,
                healthy_rx,
                metrics,
                cancel.clone(),
                view.clone(),
            ));
            let within = Duration::from_secs(10);
            let role_is = |want: ::vrrp::State| {
                let r = roles.clone();
                async move {
                    let mut r = r;
                    tokio::time::timeout(within, r.wait_for(|m| m.get("r") == Some(&want)))
                        .await
                        .unwrap_or_else(|_| panic!("instance never {want:?}"))
                        .unwrap();
                }
            };
            let holds = || sh("ip -4 -o addr show dev ks0").contains("192.0.2.254/24");
            role_is(::vrrp::State::Master).await;
            assert!(holds(), "master without its VIP");

            kill_switch.send_replace(false);
            role_is(::vrrp::State::Initialize).await;
            assert!(!holds(), "the VIP stayed without the kill switch");
            let says_why = || {
                view.entries.lock().unwrap()["r"]
                    .setup_error
                    .as_ref()
                    .is_some_and(|w| w.contains("kill switch"))
            };
            let deadline = tokio::time::Instant::now() + within;
            while !says_why() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "/status does not say why"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }

            kill_switch.send_replace(true);
            role_is(::vrrp::State::Master).await;
            assert!(holds(), "master again, VIP back");
            cancel.cancel();
            task.await.unwrap();
        });
    }
}
