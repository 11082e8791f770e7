//! One VRRP instance at run time: ties the state machine to the advert socket, the VIPs and
//! the protocol timers (timerfds), and reports status and metrics.
//!
//! Owns the event loop (`run`), the steady master's loop off the runtime (`run_steady`, used
//! on a thread of its own, see `own_thread`) and the mapping of `fsm::Action`s to effects. It
//! makes no protocol decision itself (those are in `fsm`) and reads time only through
//! `tokio::time::Instant`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::error::InstanceError;
use crate::fsm::{Action, Discard, Event, Fsm, FsmConfig, State, Track};
use crate::gratuitous::GratuitousConfig;
use crate::metrics::{InstanceLabel, ReasonLabels, VrrpMetrics};
use crate::netlink::Netlink;
use crate::network::{SocketParams, VrrpSocket};
use crate::own_thread::Steady;
use crate::packet::{self, Advertisement, ChecksumMode, DecodeContext, Family, Version};
use crate::timer::KernelTimer;
use crate::vip::{VipSet, VirtualIp};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// The shortest wait for a successor on a graceful stop. At 10 ms adverts 3 intervals are
/// 30 ms, and a backup on a busy node may not be scheduled that soon to act on the priority-0
/// advert (seen in the lab with four labs on two cores: the backup took over 58 ms after it).
/// Holding the VIPs longer costs nothing: the old master lets go as soon as it hears the new
/// one.
pub const HANDOFF_TIMEOUT_FLOOR: Duration = Duration::from_millis(200);

/// Everything an instance needs; the `router` crate maps its YAML onto this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceConfig {
    /// `vrrp[].name`: label in logs, metrics and status.
    pub name: String,
    /// Advert interface.
    pub interface: String,
    /// Virtual router id, 1–255.
    pub vrid: u8,
    /// V3 (default) or V2 (IPv4 only, whole-second intervals).
    pub version: Version,
    /// 1–254, or 255 for the address owner.
    pub priority: u8,
    /// Advertisement interval (v3: 10 ms units, v2: whole seconds).
    pub advert_interval: Duration,
    /// Preempt lower-priority masters.
    pub preempt: bool,
    /// No preemption for this long after startup.
    pub preempt_delay: Duration,
    /// Empty: multicast. Otherwise unicast adverts to (and only from) these.
    pub unicast_peers: Vec<IpAddr>,
    /// VIPs on a macvlan with the VRRP MAC.
    pub vmac: bool,
    /// The VIPs (egress VIP plus ingress VIPs); all of one family.
    pub virtual_ips: Vec<VirtualIp>,
    /// Gateway tracking.
    pub track: Option<Track>,
    /// VRRPv3 IPv4 checksum variant.
    pub checksum_mode: ChecksumMode,
    /// Gratuitous ARP / NA on becoming master.
    pub gratuitous: GratuitousConfig,
    /// Longest wait for a successor on graceful stop; None means 3 × advert_interval, and at
    /// least [`HANDOFF_TIMEOUT_FLOOR`].
    pub handoff_timeout: Option<Duration>,
    /// VRIDs of the daemon's other instances on the same interface: their adverts are not
    /// counted as `unknown_vrid`.
    pub sibling_vrids: Vec<u8>,
    /// Adverts with a longer Max Adver Int are discarded (`interval_too_long`); None means
    /// [`default_max_peer_advert_interval`].
    pub max_peer_advert_interval: Option<Duration>,
    /// Only adverts from these sources are used (others: `unknown_peer`); empty: any source,
    /// or with `unicast_peers` exactly those (then this list, if set, must be the same set).
    pub allowed_peers: Vec<IpAddr>,
}

/// How many of our own advert intervals a peer's Max Adver Int may be by default.
pub const MAX_PEER_ADVERT_INTERVAL_FACTOR: u32 = 10;

/// The longest Max Adver Int the wire format of `version` carries: 40.95 s (v3, 12 bits of
/// centiseconds), 255 s (v2, 8 bits of seconds).
pub fn max_wire_advert_interval(version: Version) -> Duration {
    match version {
        Version::V2 => Duration::from_secs(255),
        Version::V3 => Duration::from_millis(u64::from(packet::V3_MAX_ADVER_INT_CS) * 10),
    }
}

/// `max_peer_advert_interval` when not configured: 10 × our own `advert_interval`, at most
/// what the wire format carries (then there is no bound beyond the RFC's).
pub fn default_max_peer_advert_interval(version: Version, advert_interval: Duration) -> Duration {
    (advert_interval * MAX_PEER_ADVERT_INTERVAL_FACTOR).min(max_wire_advert_interval(version))
}

impl InstanceConfig {
    /// A config with the DESIGN.md defaults for everything optional.
    pub fn new(name: &str, interface: &str, vrid: u8, virtual_ips: Vec<VirtualIp>) -> Self {
        InstanceConfig {
            name: name.to_string(),
            interface: interface.to_string(),
            vrid,
            version: Version::V3,
            priority: 100,
            advert_interval: Duration::from_millis(100),
            preempt: true,
            preempt_delay: Duration::ZERO,
            unicast_peers: Vec::new(),
            vmac: true,
            virtual_ips,
            track: None,
            checksum_mode: ChecksumMode::PseudoHeader,
            gratuitous: GratuitousConfig::default(),
            handoff_timeout: None,
            sibling_vrids: Vec::new(),
            max_peer_advert_interval: None,
            allowed_peers: Vec::new(),
        }
    }

    /// `max_peer_advert_interval`, or its default.
    pub fn effective_max_peer_advert_interval(&self) -> Duration {
        self.max_peer_advert_interval
            .unwrap_or_else(|| default_max_peer_advert_interval(self.version, self.advert_interval))
    }

    /// Checks what the state machine and the wire format require.
    pub fn validate(&self) -> Result<Family, InstanceError> {
        let err = |message: String| InstanceError::Config {
            instance: self.name.clone(),
            message,
        };
        if self.vrid == 0 {
            return Err(err("vrid must be 1-255".into()));
        }
        if self.priority == 0 {
            return Err(err(
                "priority must be 1-255 (0 is reserved for leaving)".into()
            ));
        }
        let Some(first) = self.virtual_ips.first() else {
            return Err(err("virtual_ips is empty; add at least one address".into()));
        };
        let family = Family::of(&first.addr);
        if self
            .virtual_ips
            .iter()
            .any(|v| Family::of(&v.addr) != family)
        {
            return Err(err(
                "virtual_ips mixes IPv4 and IPv6; VRRP runs one instance per family".into(),
            ));
        }
        if self.unicast_peers.iter().any(|p| Family::of(p) != family) {
            return Err(err(
                "unicast_peers must be of the virtual_ips' family".into()
            ));
        }
        if self.allowed_peers.iter().any(|p| Family::of(p) != family) {
            return Err(err(
                "allowed_peers must be of the virtual_ips' family".into()
            ));
        }
        if !self.unicast_peers.is_empty() && !self.allowed_peers.is_empty() {
            let set = |v: &[IpAddr]| v.iter().copied().collect::<BTreeSet<IpAddr>>();
            if set(&self.unicast_peers) != set(&self.allowed_peers) {
                return Err(err(
                    "allowed_peers differs from unicast_peers; with unicast_peers only those \
                     are heard, so list the same addresses or leave allowed_peers empty"
                        .into(),
                ));
            }
        }
        if let Some(max) = self.max_peer_advert_interval {
            let wire = max_wire_advert_interval(self.version);
            if max < self.advert_interval || max > wire {
                return Err(err(format!(
                    "max_peer_advert_interval {max:?}: expected at least advert_interval \
                     ({:?}) and at most {wire:?}",
                    self.advert_interval
                )));
            }
        }
        match self.version {
            Version::V2 => {
                if family == Family::V6 {
                    return Err(err("version 2 is IPv4 only; use version 3".into()));
                }
                if self.advert_interval.subsec_nanos() != 0
                    || self.advert_interval.is_zero()
                    || self.advert_interval > Duration::from_secs(255)
                {
                    return Err(err(format!(
                        "advert_interval {:?}: version 2 needs whole seconds 1-255",
                        self.advert_interval
                    )));
                }
            }
            Version::V3 => {
                let cs = self.advert_interval.as_millis();
                if cs < 10
                    || !cs.is_multiple_of(10)
                    || cs / 10 > u128::from(packet::V3_MAX_ADVER_INT_CS)
                {
                    return Err(err(format!(
                        "advert_interval {:?}: version 3 needs a multiple of 10ms, 10ms-40.95s",
                        self.advert_interval
                    )));
                }
            }
        }
        Ok(family)
    }

    fn fsm_config(&self, primary_addr: IpAddr) -> FsmConfig {
        FsmConfig {
            version: self.version,
            priority: self.priority,
            advert_interval: self.advert_interval,
            preempt: self.preempt,
            preempt_delay: self.preempt_delay,
            primary_addr,
            track: self.track,
            handoff_timeout: self
                .handoff_timeout
                .unwrap_or_else(|| (self.advert_interval * 3).max(HANDOFF_TIMEOUT_FLOOR)),
            max_peer_advert_interval: self.effective_max_peer_advert_interval(),
            // With unicast peers the runner hears nobody else anyway (`unknown_peer` before
            // decoding); the state machine gets the same set, so its rule is the one in force.
            allowed_peers: if self.allowed_peers.is_empty() {
                self.unicast_peers.clone()
            } else {
                self.allowed_peers.clone()
            },
        }
    }
}

/// What `/status` shows for an instance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceStatus {
    /// Instance name.
    pub name: String,
    /// Current state.
    pub state: State,
    /// Priority announced now.
    pub effective_priority: u8,
    /// Current master's address (ours while master), if known.
    pub master_addr: Option<IpAddr>,
    /// Our advert source address.
    pub source_addr: Option<IpAddr>,
    /// Number of state changes since start.
    pub transitions: u64,
    /// Unix time of the last change (seconds).
    pub last_transition_unix: Option<f64>,
    /// Reason of the last change.
    pub last_transition_reason: Option<String>,
    /// Rejected packets by reason.
    pub invalid: BTreeMap<String, u64>,
    /// Last VIP / send error, if any.
    pub last_error: Option<String>,
}

impl InstanceStatus {
    /// Makes `self` equal to `other`, cloning only the fields that differ. True if anything
    /// changed. A routine advert changes nothing here (packet counts live in the metrics,
    /// see [`crate::VrrpMetrics::advert_counts`]), so the status watch stays quiet.
    pub fn update_from(&mut self, other: &InstanceStatus) -> bool {
        if self == other {
            return false;
        }
        let InstanceStatus {
            name,
            state,
            effective_priority,
            master_addr,
            source_addr,
            transitions,
            last_transition_unix,
            last_transition_reason,
            invalid,
            last_error,
        } = other;
        if self.name != *name {
            self.name.clone_from(name);
        }
        self.state = *state;
        self.effective_priority = *effective_priority;
        self.master_addr = *master_addr;
        self.source_addr = *source_addr;
        self.transitions = *transitions;
        self.last_transition_unix = *last_transition_unix;
        if self.last_transition_reason != *last_transition_reason {
            self.last_transition_reason
                .clone_from(last_transition_reason);
        }
        if self.invalid != *invalid {
            self.invalid.clone_from(invalid);
        }
        if self.last_error != *last_error {
            self.last_error.clone_from(last_error);
        }
        true
    }

    /// Status before the instance runs.
    pub fn new(name: &str) -> InstanceStatus {
        InstanceStatus {
            name: name.to_string(),
            state: State::Initialize,
            effective_priority: 0,
            master_addr: None,
            source_addr: None,
            transitions: 0,
            last_transition_unix: None,
            last_transition_reason: None,
            invalid: BTreeMap::new(),
            last_error: None,
        }
    }
}

/// The channels an instance talks through.
#[derive(Debug)]
pub struct RunHandles {
    /// Number of healthy gateways (for `track`).
    pub healthy: watch::Receiver<usize>,
    /// Cancelled on SIGTERM: the instance hands over and returns.
    pub shutdown: CancellationToken,
    /// Where status is published.
    pub status: watch::Sender<InstanceStatus>,
    /// Shared metrics.
    pub metrics: VrrpMetrics,
    /// New configs on reload; only priority, preempt, preempt_delay, advert_interval,
    /// track, handoff_timeout, gratuitous, max_peer_advert_interval and allowed_peers take
    /// effect without a restart.
    pub reload: Option<watch::Receiver<InstanceConfig>>,
    /// Wall-clock time at the moment `run` is called (library code does not read the wall
    /// clock); used for `last_transition` timestamps.
    pub wall_clock_at_start: SystemTime,
}

/// Waits for a change on `rx` and hands the receiver back with it. Pending forever without
/// a receiver or once the sender is gone (the last value stays in force).
async fn changed_owned<T>(rx: Option<watch::Receiver<T>>) -> watch::Receiver<T> {
    let Some(mut rx) = rx else {
        return std::future::pending().await;
    };
    match rx.changed().await {
        Ok(()) => rx,
        Err(_) => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[derive(Default)]
struct Timers {
    adver: Option<Instant>,
    /// When the Adver timer that is being handled was due (set only while its event is fed).
    adver_fired: Option<Instant>,
    master_down: Option<Instant>,
    handoff: Option<Instant>,
    garp_burst: Option<Instant>,
    /// One more announcement an advert interval after becoming master: by then the old
    /// master has heard our advert and let the VIPs go, so nothing it still said for them
    /// (an answer to a client's ARP request in the overlap) can keep the switch pointing
    /// the VMAC at it.
    garp_followup: Option<Instant>,
    garp_refresh: Option<Instant>,
}

/// The adverts last encoded, one per destination: a steady master sends the same bytes
/// every interval, so they are built again only when the priority or interval changes.
struct EncodedAdverts {
    /// (priority, Max Advertise Interval field).
    key: (u8, u16),
    messages: Vec<(IpAddr, Result<Vec<u8>, String>)>,
}

struct Runner {
    cfg: InstanceConfig,
    /// An advert the steady loop could not finish (send buffer full): priority and the
    /// first destination still to send to; `resume` sends it.
    resume_send: Option<(u8, usize)>,
    /// The steady loop's action buffer, reused for every advert.
    actions: Vec<Action>,
    /// Adverts that failed to send (each also set `status.last_error`).
    send_failures: u64,
    advert_cache: Option<EncodedAdverts>,
    /// Fire at `timers.adver` and `timers.master_down` (kept in step before every wait).
    adver_timer: KernelTimer,
    master_down_timer: KernelTimer,
    fsm: Fsm,
    socket: VrrpSocket,
    vips: VipSet,
    vip_addrs: Vec<IpAddr>,
    timers: Timers,
    start: Instant,
    handles_status: watch::Sender<InstanceStatus>,
    metrics: VrrpMetrics,
    label: InstanceLabel,
    /// This instance's per-advert series, looked up once (a family lookup hashes the label
    /// under a lock, 100 times a second at 10 ms adverts).
    sent: Counter,
    received: Counter,
    priority_gauge: Gauge,
    wall_start: SystemTime,
    status: InstanceStatus,
    /// Discard reasons already logged as a warning (see `count_advert`).
    warned_discards: BTreeSet<&'static str>,
}

/// Runs one instance until `shutdown` is cancelled and the handover finished.
///
/// Startup: opens the socket, prepares the VMACs, and if any VIP is already present (a
/// restart after kill -9 while master) adopts it (see `fsm` module doc). Errors while
/// running (a failed VIP add, a send error) are logged, counted in `last_error`, and do not
/// stop the instance; only setup errors are returned.
///
/// Runs cooperatively on whatever runtime polls it. [`crate::spawn`] runs it on a thread of
/// its own instead, where a steady master costs less (see `own_thread`).
pub async fn run(config: InstanceConfig, handles: RunHandles) -> Result<(), InstanceError> {
    run_with(config, handles, None).await
}

/// [`run`]; with `own_thread` (the token that kills the instance, see
/// [`crate::InstanceThread`]) a steady master waits outside the runtime, blocking the thread.
pub(crate) async fn run_with(
    config: InstanceConfig,
    mut handles: RunHandles,
    own_thread: Option<CancellationToken>,
) -> Result<(), InstanceError> {
    let family = config.validate()?;
    let name = config.name.clone();
    let vip_addrs: Vec<IpAddr> = config.virtual_ips.iter().map(|v| v.addr).collect();
    let mut socket = VrrpSocket::open(&SocketParams {
        interface: config.interface.clone(),
        family,
        unicast_peers: config.unicast_peers.clone(),
        exclude_sources: vip_addrs.clone(),
    })
    .map_err(|source| InstanceError::Network {
        instance: name.clone(),
        source: Box::new(source),
    })?;
    let vip_err = |source| InstanceError::Vip {
        instance: name.clone(),
        source: Box::new(source),
    };
    let nl = Netlink::connect().map_err(|e| vip_err(e.into()))?;
    let vips = VipSet::prepare(nl, config.vrid, config.vmac, &config.virtual_ips)
        .await
        .map_err(vip_err)?;
    let vips_present = vips.any_present().await.map_err(vip_err)?;
    if config.vmac && config.unicast_peers.is_empty() {
        if let Some(vmac_if) = vips.vmac_on(&config.interface) {
            socket
                .add_vmac_receiver(&vmac_if, crate::vip::vmac(config.vrid, family))
                .map_err(|source| InstanceError::Network {
                    instance: name.clone(),
                    source: Box::new(source),
                })?;
        }
    }

    let metrics = handles.metrics.clone();
    metrics.init_instance(&name);
    let mut status = InstanceStatus::new(&name);
    status.source_addr = Some(socket.source());
    let fsm = Fsm::new(config.fsm_config(socket.source()));
    let sent = metrics
        .adverts_sent
        .get_or_create(&InstanceLabel {
            instance: name.clone(),
        })
        .clone();
    let received = metrics
        .adverts_received
        .get_or_create(&InstanceLabel {
            instance: name.clone(),
        })
        .clone();
    let priority_gauge = metrics
        .effective_priority
        .get_or_create(&InstanceLabel {
            instance: name.clone(),
        })
        .clone();
    let timer = || {
        KernelTimer::new().map_err(|source| InstanceError::Network {
            instance: name.clone(),
            source: Box::new(crate::network::NetworkError::Timer(source)),
        })
    };
    let adver_timer = timer()?;
    let master_down_timer = timer()?;
    let mut r = Runner {
        resume_send: None,
        actions: Vec::new(),
        send_failures: 0,
        advert_cache: None,
        adver_timer,
        master_down_timer,
        sent,
        received,
        priority_gauge,
        label: InstanceLabel {
            instance: name.clone(),
        },
        fsm,
        socket,
        vips,
        vip_addrs,
        timers: Timers::default(),
        start: Instant::now(),
        handles_status: handles.status.clone(),
        metrics,
        wall_start: handles.wall_clock_at_start,
        status,
        warned_discards: BTreeSet::new(),
        cfg: config,
    };
    tracing::info!(
        instance = %name,
        interface = %r.cfg.interface,
        vrid = r.cfg.vrid,
        source = %r.socket.source(),
        vip_interfaces = ?r.vips.interfaces(),
        vips_present,
        "VRRP instance starting"
    );
    let healthy_now = *handles.healthy.borrow_and_update();
    if r.cfg.track.is_some() {
        r.feed(Event::TrackChanged {
            healthy_count: healthy_now,
        })
        .await;
    }
    if r.feed(Event::Startup { vips_present }).await {
        return r.finish().await;
    }

    let ctx = DecodeContext {
        version: r.cfg.version,
        family,
        vrids: std::iter::once(r.cfg.vrid)
            .chain(r.cfg.sibling_vrids.iter().copied())
            .collect::<BTreeSet<u8>>(),
        checksum_mode: r.cfg.checksum_mode,
    };
    let v2_interval = match r.cfg.version {
        Version::V2 => u8::try_from(r.cfg.advert_interval.as_secs()).ok(),
        Version::V3 => None,
    };
    let mut buf = vec![0u8; 2048];
    let mut controls = Controls {
        shutdown: Box::pin(handles.shutdown.clone().cancelled_owned()),
        shutdown_fed: false,
        kill: Box::pin(own_thread.clone().unwrap_or_default().cancelled_owned()),
        healthy: Box::pin(changed_owned(Some(handles.healthy))),
        reload: Box::pin(changed_owned(handles.reload.take())),
    };
    let steady = match own_thread {
        Some(_) => match Steady::new(r.adver_timer.fd(), &r.socket.fds()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(instance = %name, error = %e, "VRRP: cannot set up the steady master's own wait; staying on the runtime");
                None
            }
        },
        None => None,
    };
    // False for one turn after the steady loop handed over something only the async loop
    // sees (a packet, another timer): otherwise a readable socket would bounce between them.
    let mut try_steady = true;
    loop {
        // A steady master re-arms the advert timer from when it was due, which is where the
        // kernel's periodic timer already stands: no system call then.
        if let Err(e) = r
            .adver_timer
            .sync(r.timers.adver, Some(r.cfg.advert_interval))
        {
            r.timer_failed("advert", e);
        }
        if let Err(e) = r.master_down_timer.sync(r.timers.master_down, None) {
            r.timer_failed("Master_Down", e);
        }
        let steady_now = steady
            .as_ref()
            .filter(|_| try_steady && !controls.shutdown_fed && r.steady_master());
        let event = if let Some(steady) = steady_now {
            match r.run_steady(steady, &mut controls) {
                SteadyExit::Killed => return Ok(()),
                SteadyExit::Event(ev) => ev,
                SteadyExit::Actions(rest) => {
                    let stopped = r.resume(rest).await;
                    r.timers.adver_fired = None;
                    r.publish();
                    if stopped {
                        return r.finish().await;
                    }
                    continue;
                }
                SteadyExit::Look => {
                    try_steady = false;
                    continue;
                }
            }
        } else {
            try_steady = true;
            r.select_event(&mut controls, &mut buf, &ctx, v2_interval)
                .await
        };
        if let Some(ev) = event {
            if r.feed(ev).await {
                return r.finish().await;
            }
        }
        r.timers.adver_fired = None;
    }
}

impl Runner {
    /// The async loop's wait: the next event from the control inputs, the timers or the
    /// socket (None: something was handled that the state machine does not see).
    async fn select_event(
        &mut self,
        controls: &mut Controls,
        buf: &mut [u8],
        ctx: &DecodeContext,
        v2_interval: Option<u8>,
    ) -> Option<Event> {
        let r = self;
        let t = &r.timers;
        let (handoff, garp_burst, garp_followup, garp_refresh) =
            (t.handoff, t.garp_burst, t.garp_followup, t.garp_refresh);
        tokio::select! {
            biased;
            () = &mut controls.shutdown, if !controls.shutdown_fed => {
                Some(controls.shutdown_event())
            }
            res = r.master_down_timer.fired() => {
                if let Err(e) = res {
                    r.timer_failed("Master_Down", e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                r.timers.master_down = None;
                Some(Event::MasterDownTimerFired)
            }
            res = r.adver_timer.fired() => {
                if let Err(e) = res {
                    r.timer_failed("advert", e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                r.timers.adver_fired = r.timers.adver.take();
                Some(Event::AdverTimerFired)
            }
            _ = sleep_until_opt(handoff) => {
                r.timers.handoff = None;
                Some(Event::HandoffTimerFired)
            }
            res = r.socket.recv(buf) => match res {
                Ok(rx) => r.on_packet(buf, rx, ctx, v2_interval),
                Err(e) => {
                    tracing::warn!(instance = %r.cfg.name, error = %e, "VRRP receive failed");
                    r.status.last_error = Some(e.to_string());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    None
                }
            },
            _ = sleep_until_opt(garp_burst) => {
                r.timers.garp_burst = None;
                r.announce();
                None
            }
            _ = sleep_until_opt(garp_followup) => {
                r.timers.garp_followup = None;
                r.announce_rounds(1);
                None
            }
            _ = sleep_until_opt(garp_refresh) => {
                r.timers.garp_refresh = r.cfg.gratuitous.refresh.map(|d| Instant::now() + d);
                r.announce();
                None
            }
            rx = &mut controls.healthy => Some(controls.track_event(rx)),
            rx = &mut controls.reload => {
                let new = controls.reload_config(rx);
                r.apply_reload(new)
            }
        }
    }
}

/// A change of a watched value, the receiver handed back with it (see [`changed_owned`]).
type Change<T> = Pin<Box<dyn Future<Output = watch::Receiver<T>> + Send>>;

/// The run loop's control inputs. They wait in futures that live across iterations
/// (re-creating them for every advert registered and unregistered a waiter with each
/// channel 100 times a second), polled by the async loop's `select!` and by the steady
/// master's own wait alike.
struct Controls {
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The shutdown was fed to the state machine (it then waits for the handover).
    shutdown_fed: bool,
    /// Stop at once (only on an own thread; never fires otherwise).
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
    healthy: Change<usize>,
    reload: Change<InstanceConfig>,
}

impl Controls {
    fn shutdown_event(&mut self) -> Event {
        self.shutdown_fed = true;
        Event::Shutdown
    }

    fn track_event(&mut self, mut rx: watch::Receiver<usize>) -> Event {
        let healthy_count = *rx.borrow_and_update();
        self.healthy = Box::pin(changed_owned(Some(rx)));
        Event::TrackChanged { healthy_count }
    }

    fn reload_config(&mut self, mut rx: watch::Receiver<InstanceConfig>) -> InstanceConfig {
        let new = rx.borrow_and_update().clone();
        self.reload = Box::pin(changed_owned(Some(rx)));
        new
    }

    /// The first ready input, in the `select!`'s order (kill before everything).
    fn poll_steady(&mut self, cx: &mut Context<'_>, r: &mut Runner) -> Poll<SteadyExit> {
        if self.kill.as_mut().poll(cx).is_ready() {
            return Poll::Ready(SteadyExit::Killed);
        }
        if !self.shutdown_fed && self.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(SteadyExit::Event(Some(self.shutdown_event())));
        }
        if let Poll::Ready(rx) = self.healthy.as_mut().poll(cx) {
            return Poll::Ready(SteadyExit::Event(Some(self.track_event(rx))));
        }
        if let Poll::Ready(rx) = self.reload.as_mut().poll(cx) {
            let new = self.reload_config(rx);
            return Poll::Ready(SteadyExit::Event(r.apply_reload(new)));
        }
        Poll::Pending
    }
}

/// Why the steady master's loop gave control back.
enum SteadyExit {
    /// Killed: return at once.
    Killed,
    /// A control input is ready: feed its event (if it makes one).
    Event(Option<Event>),
    /// An advert-timer event's actions that need the runtime (a VIP change, or a send that
    /// found the buffer full: see `Runner::resume_send`), in order.
    Actions(Vec<Action>),
    /// Something only the async loop handles: a packet, another timer's deadline, a failed
    /// wait, or just a turn for the runtime's other tasks.
    Look,
}

/// The longest the steady loop keeps the runtime waiting. Its other tasks (the netlink
/// connection) only ever have work while the async loop awaits them, so this is a safety
/// net; each turn costs about one advert's worth of CPU.
const STEADY_YIELD: Duration = Duration::from_secs(5);

/// How often an advert is tried again, 1 ms apart, when the socket's buffer is full. A raw
/// socket's buffer is practically never full for one small advert every few ms; if it is
/// for longer, the advert to that destination is reported and skipped (the next follows
/// anyway).
const SEND_RETRIES: u32 = 5;

impl Runner {
    /// A timerfd call failed (practically impossible): logged and shown as the last error;
    /// the loop goes on.
    fn timer_failed(&mut self, timer: &str, e: std::io::Error) {
        tracing::warn!(instance = %self.cfg.name, timer, error = %e, "VRRP timer failed");
        self.status.last_error = Some(format!("{timer} timer: {e}"));
    }

    fn now(&self) -> Duration {
        Instant::now().duration_since(self.start)
    }

    fn apply_reload(&mut self, new: InstanceConfig) -> Option<Event> {
        let restart_needed = new.interface != self.cfg.interface
            || new.vrid != self.cfg.vrid
            || new.version != self.cfg.version
            || new.unicast_peers != self.cfg.unicast_peers
            || new.vmac != self.cfg.vmac
            || new.virtual_ips != self.cfg.virtual_ips
            || new.checksum_mode != self.cfg.checksum_mode;
        if restart_needed {
            tracing::warn!(
                instance = %self.cfg.name,
                "VRRP reload: interface, vrid, version, unicast_peers, vmac, virtual_ips and \
                 checksum changes need a restart of the instance; applying the rest"
            );
        }
        if new.validate().is_err() {
            tracing::warn!(instance = %self.cfg.name, "VRRP reload: invalid config ignored");
            return None;
        }
        self.cfg.priority = new.priority;
        self.cfg.advert_interval = new.advert_interval;
        self.cfg.preempt = new.preempt;
        self.cfg.preempt_delay = new.preempt_delay;
        self.cfg.track = new.track;
        self.cfg.handoff_timeout = new.handoff_timeout;
        self.cfg.gratuitous = new.gratuitous;
        self.cfg.max_peer_advert_interval = new.max_peer_advert_interval;
        self.cfg.allowed_peers = new.allowed_peers;
        Some(Event::ConfigChanged {
            config: self.cfg.fsm_config(self.socket.source()),
        })
    }

    /// Counts an advert the state machine judged: received, or discarded by its screening
    /// (`fsm::Discard`). The first discard of each reason is a warning naming the key that
    /// governs it (a legitimate peer configured differently shows up here); later ones are
    /// debug lines, as every other rejected packet: an attacker must not be able to flood
    /// the log.
    fn count_advert(&mut self, actions: &[Action], src: IpAddr, interval: Duration) {
        let Some(reason) = actions.iter().find_map(|a| match a {
            Action::DiscardAdvert { reason } => Some(*reason),
            _ => None,
        }) else {
            self.received.inc();
            return;
        };
        self.count_invalid(reason.as_str());
        // Built only when a line is written (tracing evaluates its arguments then).
        let max = self.cfg.effective_max_peer_advert_interval();
        let detail = || match reason {
            Discard::UnknownPeer => format!(
                "source {src} is not an allowed peer (allowed_peers, or unicast_peers); add it \
                 there if it is one of ours"
            ),
            Discard::IntervalTooLong => format!(
                "its Max Adver Int {} is above max_peer_advert_interval {}; raise that if the \
                 peer is legitimate",
                humantime::format_duration(interval),
                humantime::format_duration(max)
            ),
            Discard::IntervalZero => "its Max Adver Int is 0, which no VRRP sender configures; \
                 taken, it would make every backup take over at once"
                .to_owned(),
        };
        let name = &self.cfg.name;
        if self.warned_discards.insert(reason.as_str()) {
            tracing::warn!(instance = %name, %src, reason = reason.as_str(), "VRRP advert discarded: {}; further discards for this reason are logged at debug level only (all are counted in vpn_router_vrrp_invalid_packets_total)", detail());
        } else {
            tracing::debug!(instance = %name, %src, reason = reason.as_str(), "VRRP advert discarded: {}", detail());
        }
    }

    fn count_invalid(&mut self, reason: &str) {
        *self.status.invalid.entry(reason.to_string()).or_default() += 1;
        self.metrics
            .invalid_packets
            .get_or_create(&ReasonLabels {
                instance: self.cfg.name.clone(),
                reason: reason.to_string(),
            })
            .inc();
    }

    fn on_packet(
        &mut self,
        buf: &[u8],
        rx: crate::network::Received,
        ctx: &DecodeContext,
        v2_interval: Option<u8>,
    ) -> Option<Event> {
        if rx.meta.src == self.socket.source() {
            return None;
        }
        if !self.cfg.unicast_peers.is_empty() && !self.cfg.unicast_peers.contains(&rx.meta.src) {
            self.count_invalid("unknown_peer");
            return None;
        }
        let payload = buf.get(rx.payload.clone())?;
        match packet::decode(payload, &rx.meta, ctx, v2_interval) {
            Ok(adv) if adv.vrid != self.cfg.vrid => None,
            // Counted as received (or discarded) once the state machine judged it.
            Ok(adv) => Some(Event::AdvertReceived {
                priority: adv.priority,
                max_adver_interval: adv.interval(),
                src: rx.meta.src,
            }),
            Err(e) => {
                tracing::debug!(instance = %self.cfg.name, src = %rx.meta.src, error = %e, "VRRP packet rejected");
                self.count_invalid(e.reason());
                None
            }
        }
    }

    fn announce(&mut self) {
        self.announce_rounds(self.cfg.gratuitous.repeat);
    }

    fn announce_rounds(&mut self, rounds: u32) {
        if let Err(e) = self.vips.announce(rounds) {
            tracing::warn!(instance = %self.cfg.name, error = %e, "gratuitous announcement failed");
            self.status.last_error = Some(e.to_string());
        }
    }

    /// Builds the adverts for `priority` unless the cached ones are still right.
    fn encode_adverts(&mut self, priority: u8) {
        let adver_int = Advertisement::adver_int_field(self.cfg.version, self.cfg.advert_interval);
        let key = (priority, adver_int);
        if self.advert_cache.as_ref().is_some_and(|c| c.key == key) {
            return;
        }
        let adv = Advertisement {
            version: self.cfg.version,
            vrid: self.cfg.vrid,
            priority,
            adver_int,
            addresses: self.vip_addrs.clone(),
        };
        let src = self.socket.source();
        let messages = self
            .socket
            .destinations()
            .iter()
            .map(|&dst| {
                let bytes = adv
                    .encode(src, dst, self.cfg.checksum_mode)
                    .map_err(|e| e.to_string());
                (dst, bytes)
            })
            .collect();
        self.advert_cache = Some(EncodedAdverts { key, messages });
    }

    /// Sends the advert to the destinations from index `from` on, without waiting. Err(i):
    /// destination i found the send buffer full; it and the ones after it are still to send.
    fn send_advert_now(&mut self, priority: u8, from: usize) -> Result<(), usize> {
        self.encode_adverts(priority);
        let Some(cache) = &self.advert_cache else {
            return Ok(());
        };
        for (i, (dst, bytes)) in cache.messages.iter().enumerate().skip(from) {
            let res = match bytes {
                Ok(bytes) => match self.socket.try_send(bytes, *dst) {
                    Err(e) if e.would_block() => return Err(i),
                    r => r.map_err(|e| e.to_string()),
                },
                Err(e) => Err(e.clone()),
            };
            match res {
                Ok(()) => {
                    self.sent.inc();
                }
                Err(e) => {
                    tracing::debug!(instance = %self.cfg.name, %dst, error = %e, "VRRP advert not sent");
                    self.status.last_error = Some(e);
                    self.send_failures += 1;
                }
            }
        }
        Ok(())
    }

    /// Sends the advert to the destinations from index `from` on; a full send buffer is
    /// waited out `SEND_RETRIES` times 1 ms apart, then that destination is skipped.
    async fn send_advert(&mut self, priority: u8, mut from: usize) {
        let mut tries = 0;
        while let Err(blocked) = self.send_advert_now(priority, from) {
            if tries < SEND_RETRIES {
                tries += 1;
                from = blocked;
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            let dst = self.socket.destinations().get(blocked).copied();
            tracing::debug!(instance = %self.cfg.name, ?dst, "VRRP advert not sent: send buffer full");
            self.status.last_error = Some(format!(
                "advert to {} not sent: the socket's send buffer stayed full",
                dst.map_or_else(|| "?".to_string(), |d| d.to_string())
            ));
            tries = 0;
            from = blocked + 1;
        }
    }

    /// Feeds an event and performs the actions; true once the instance stopped.
    async fn feed(&mut self, event: Event) -> bool {
        let advert = match &event {
            Event::AdvertReceived {
                src,
                max_adver_interval,
                ..
            } => Some((*src, *max_adver_interval)),
            _ => None,
        };
        let actions = self.fsm.handle(event, self.now());
        if let Some((src, interval)) = advert {
            self.count_advert(&actions, src, interval);
        }
        let stopped = self.perform(actions).await;
        self.publish();
        stopped
    }

    /// Performs actions in order; true once the instance stopped.
    async fn perform(&mut self, actions: Vec<Action>) -> bool {
        let mut stopped = false;
        for action in actions {
            let Err(action) = self.perform_now(action) else {
                continue;
            };
            match action {
                Action::SendAdvert { priority } => self.send_advert(priority, 0).await,
                Action::AddVips => {
                    if let Err(e) = self.vips.add_all().await {
                        tracing::error!(instance = %self.cfg.name, error = %e, "adding VIPs failed");
                        self.status.last_error = Some(e.to_string());
                    }
                }
                Action::RemoveVips => {
                    if let Err(e) = self.vips.remove_all().await {
                        tracing::error!(instance = %self.cfg.name, error = %e, "removing VIPs failed");
                        self.status.last_error = Some(e.to_string());
                    }
                    self.timers.garp_burst = None;
                    self.timers.garp_followup = None;
                    self.timers.garp_refresh = None;
                }
                Action::Stopped => stopped = true,
                // perform_now did the rest.
                _ => {}
            }
        }
        stopped
    }

    /// Finishes what the steady loop handed over: the rest of an interrupted advert, then
    /// the remaining actions. True once the instance stopped.
    async fn resume(&mut self, rest: Vec<Action>) -> bool {
        if let Some((priority, from)) = self.resume_send.take() {
            self.send_advert(priority, from).await;
        }
        self.perform(rest).await
    }

    /// Performs an action that needs no waiting; gives back the others (sending adverts,
    /// VIP changes, `Stopped`).
    fn perform_now(&mut self, action: Action) -> Result<(), Action> {
        match action {
            Action::SendAdvert { .. } | Action::AddVips | Action::RemoveVips | Action::Stopped => {
                return Err(action)
            }
            // Counted by `count_advert`, which knows the advert.
            Action::DiscardAdvert { .. } => {}
            Action::SendGratuitous => {
                self.announce();
                let g = self.cfg.gratuitous;
                self.timers.garp_burst = g.second_burst_after.map(|d| Instant::now() + d);
                self.timers.garp_followup = Some(Instant::now() + self.cfg.advert_interval);
                self.timers.garp_refresh = g.refresh.map(|d| Instant::now() + d);
            }
            Action::ArmAdverTimer { after } => {
                // Re-arming after a periodic advert counts from when it was due, not from
                // now: otherwise every wake-up's latency adds to the interval and at 10 ms
                // adverts the drift eats into the backups' Master_Down margin.
                let now = Instant::now();
                let base = self
                    .timers
                    .adver_fired
                    .take()
                    .filter(|due| now.saturating_duration_since(*due) < after)
                    .unwrap_or(now);
                self.timers.adver = Some(base + after)
            }
            Action::ArmMasterDownTimer { after } => {
                self.timers.master_down = Some(Instant::now() + after)
            }
            Action::ArmHandoffTimer { after } => self.timers.handoff = Some(Instant::now() + after),
            Action::CancelTimers => {
                self.timers.adver = None;
                self.timers.master_down = None;
                self.timers.handoff = None;
            }
            Action::StateChanged { from, to, reason } => {
                tracing::info!(
                    instance = %self.cfg.name,
                    from = from.as_str(),
                    to = to.as_str(),
                    reason = reason.as_str(),
                    priority = self.fsm.effective_priority(),
                    master = ?self.fsm.master_addr(),
                    "VRRP state change"
                );
                let unix = self
                    .wall_start
                    .checked_add(self.now())
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs_f64());
                self.status.transitions += 1;
                self.status.last_transition_unix = unix;
                self.status.last_transition_reason = Some(reason.as_str().to_string());
                self.metrics.transitions.get_or_create(&self.label).inc();
                if let Some(u) = unix {
                    self.metrics
                        .last_transition
                        .get_or_create(&self.label)
                        .set(u);
                }
                self.metrics.set_state(&self.cfg.name, to);
                if to != State::Master {
                    self.timers.garp_burst = None;
                    self.timers.garp_followup = None;
                    self.timers.garp_refresh = None;
                }
            }
        }
        Ok(())
    }

    /// Master with nothing pending but the next advert: the steady loop's precondition.
    fn steady_master(&self) -> bool {
        self.fsm.state() == State::Master
            && self.timers.adver.is_some()
            && self.timers.master_down.is_none()
            && self.timers.handoff.is_none()
    }

    /// The steady master's loop off the runtime (see `own_thread`): sends adverts as the
    /// timer fires and returns as soon as anything else needs attention.
    fn run_steady(&mut self, steady: &Steady, controls: &mut Controls) -> SteadyExit {
        let mut cx = Context::from_waker(steady.waker());
        let mut woken = true;
        loop {
            if woken {
                if let Poll::Ready(exit) = controls.poll_steady(&mut cx, self) {
                    return exit;
                }
            }
            let t = &self.timers;
            let timeout = [t.garp_burst, t.garp_followup, t.garp_refresh]
                .into_iter()
                .flatten()
                .min()
                .map_or(STEADY_YIELD, |d| {
                    d.saturating_duration_since(Instant::now())
                        .min(STEADY_YIELD)
                });
            if timeout.is_zero() {
                return SteadyExit::Look;
            }
            let ready = match steady.wait(timeout) {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::warn!(instance = %self.cfg.name, error = %e, "VRRP steady wait failed");
                    return SteadyExit::Look;
                }
            };
            woken = ready.woken;
            if ready.timer {
                match self.adver_timer.try_fired() {
                    Ok(true) => {
                        self.timers.adver_fired = self.timers.adver.take();
                        let failures_before = self.send_failures;
                        let mut actions = std::mem::take(&mut self.actions);
                        self.fsm
                            .handle_into(Event::AdverTimerFired, self.now(), &mut actions);
                        let rest = self.perform_steady(&mut actions);
                        self.actions = actions;
                        if !rest.is_empty() || self.resume_send.is_some() {
                            // `adver_fired` stays for the handed-back ArmAdverTimer: after
                            // a blocked send it must count from when this advert was due.
                            return SteadyExit::Actions(rest);
                        }
                        self.timers.adver_fired = None;
                        // A routine advert changes no status field (the counters are in
                        // the metrics); only a failed send or a state machine surprise needs
                        // the comparison `publish` makes.
                        if self.send_failures != failures_before
                            || self.status.state != self.fsm.state()
                            || self.status.effective_priority != self.fsm.effective_priority()
                        {
                            self.publish();
                        }
                        if !self.steady_master() {
                            return SteadyExit::Look;
                        }
                        let interval = Some(self.cfg.advert_interval);
                        if let Err(e) = self.adver_timer.sync(self.timers.adver, interval) {
                            self.timer_failed("advert", e);
                            return SteadyExit::Look;
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        self.timer_failed("advert", e);
                        return SteadyExit::Look;
                    }
                }
            }
            if ready.socket || !(ready.timer || ready.woken) {
                return SteadyExit::Look;
            }
        }
    }

    /// Performs the actions that need no waiting, in order, up to the first that does; gives
    /// back that one and the rest. A send that finds the buffer full leaves its remainder in
    /// `resume_send`.
    fn perform_steady(&mut self, actions: &mut Vec<Action>) -> Vec<Action> {
        let mut actions = actions.drain(..);
        while let Some(action) = actions.next() {
            let action = match action {
                Action::SendAdvert { priority } => match self.send_advert_now(priority, 0) {
                    Ok(()) => continue,
                    Err(blocked) => {
                        self.resume_send = Some((priority, blocked));
                        return actions.collect();
                    }
                },
                other => other,
            };
            if let Err(action) = self.perform_now(action) {
                return std::iter::once(action).chain(actions).collect();
            }
        }
        Vec::new()
    }

    fn publish(&mut self) {
        self.status.state = self.fsm.state();
        self.status.effective_priority = self.fsm.effective_priority();
        self.status.master_addr = self.fsm.master_addr();
        self.priority_gauge
            .set(i64::from(self.fsm.effective_priority()));
        let s = &self.status;
        self.handles_status
            .send_if_modified(|old| old.update_from(s));
    }

    async fn finish(self) -> Result<(), InstanceError> {
        // Clean stop: the VIPs are gone (the state machine removed them); delete the VMACs
        // so nothing is left behind. After kill -9 they stay and the next start adopts them.
        if let Err(e) = self.vips.teardown().await {
            tracing::warn!(instance = %self.cfg.name, error = %e, "VMAC teardown failed");
        }
        tracing::info!(instance = %self.cfg.name, "VRRP instance stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InstanceConfig {
        InstanceConfig::new(
            "r",
            "eth0",
            51,
            vec![VirtualIp {
                addr: "192.168.28.254".parse().unwrap(),
                prefix_len: 24,
                interface: "eth0".into(),
            }],
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn max_peer_advert_interval_defaults_to_ten_intervals_within_the_field() {
        let mut c = cfg();
        assert_eq!(
            c.effective_max_peer_advert_interval(),
            Duration::from_secs(1)
        );
        c.advert_interval = Duration::from_secs(5);
        assert_eq!(
            c.effective_max_peer_advert_interval(),
            Duration::from_millis(40_950)
        );
        c.version = Version::V2;
        c.advert_interval = Duration::from_secs(30);
        assert_eq!(
            c.effective_max_peer_advert_interval(),
            Duration::from_secs(255)
        );
        let f = cfg().fsm_config(ip("192.168.28.1"));
        assert_eq!(f.max_peer_advert_interval, Duration::from_secs(1));
    }

    #[test]
    fn max_peer_advert_interval_is_validated() {
        let mut c = cfg();
        c.max_peer_advert_interval = Some(Duration::from_millis(50));
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("VRRP instance r: max_peer_advert_interval"),
            "{e}"
        );
        c.max_peer_advert_interval = Some(Duration::from_millis(40_960));
        assert!(c.validate().is_err());
        c.max_peer_advert_interval = Some(Duration::from_millis(40_950));
        c.validate().unwrap();
        c.max_peer_advert_interval = Some(Duration::from_millis(100));
        c.validate().unwrap();
    }

    #[test]
    fn unicast_peers_are_the_allowed_set_and_allowed_peers_must_agree() {
        let mut c = cfg();
        c.unicast_peers = vec![ip("192.168.28.2"), ip("192.168.28.3")];
        let f = c.fsm_config(ip("192.168.28.1"));
        assert_eq!(f.allowed_peers, c.unicast_peers);
        c.allowed_peers = vec![ip("192.168.28.3"), ip("192.168.28.2")];
        c.validate().unwrap();
        c.allowed_peers = vec![ip("192.168.28.2")];
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("allowed_peers differs from unicast_peers"),
            "{e}"
        );
        c.unicast_peers.clear();
        c.validate().unwrap();
        assert_eq!(
            c.fsm_config(ip("192.168.28.1")).allowed_peers,
            vec![ip("192.168.28.2")]
        );
        c.allowed_peers = vec![ip("fd28::2")];
        assert!(c.validate().is_err());
    }
}
