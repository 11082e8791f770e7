//! The VRRP state machine of RFC 5798 §6 with the RFC 9568 corrections, as a pure function
//! of (event, now) → actions.
//!
//! Owns the protocol decisions: when to become master or backup, what priority to announce,
//! which timers to arm. It must not touch sockets, netlink or clocks: time comes in as `now`
//! (a `Duration` since any fixed origin), timer expiries come in as events, and every effect
//! goes out as an [`Action`] the runner performs in order.
//!
//! Behaviour beyond the RFC, chosen for this project (each is covered by a golden test):
//! - `preempt_delay` follows keepalived: for that long after `Startup` this router does not
//!   preempt a lower-priority master (it accepts its adverts as if `preempt` were off).
//! - `track`: while fewer than `min_healthy` gateways are healthy the effective priority is
//!   `priority + weight`, clamped to 1..=254; an address owner (255) is never lowered. A
//!   master announces a changed priority at once instead of waiting for its next advert.
//! - Adoption: `Startup { vips_present: true }` (a restart after kill -9 while master) enters
//!   Master at once, keeping the addresses (AddVips is an idempotent reconcile) and sending an
//!   advert immediately. Listening first would let the peer's Master_Down expire and move the
//!   VIPs away and back. If a better master exists after all, the RFC 9568 master rules make
//!   us step down on its first advert.
//! - Graceful shutdown: a master sends a priority-0 advert but keeps its addresses until it
//!   hears an advert with priority > 0 from the new master (or `handoff_timeout` passes), so
//!   clients are never left without a router; then, after half an advert interval (the new
//!   master announces the VIPs just after its advert), it removes them and stops.
//! - Advert screening (VRRPv3 has no authentication): an advert from a source outside
//!   `allowed_peers` (when set), or with a Max Adver Int above `max_peer_advert_interval`, is
//!   discarded before any RFC rule sees it — it neither demotes a master nor sets a backup's
//!   Master_Adver_Interval (§6.4.2) — and reported as [`Action::DiscardAdvert`]. So one forged
//!   advert can hold the VIPs away for at most 3 × `max_peer_advert_interval` + Skew_Time, and
//!   not at all from a source outside `allowed_peers`.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::packet::Version;
use crate::serde_duration;

/// Gateway tracking: lower the priority while too few gateways are healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Track {
    /// Fewer healthy gateways than this applies `weight`.
    pub min_healthy: usize,
    /// Added to the configured priority (usually negative) while unhealthy.
    pub weight: i16,
}

/// What the state machine needs from the instance configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsmConfig {
    /// Protocol version (v2: Skew_Time in seconds, fixed interval).
    pub version: Version,
    /// Configured priority, 1–255 (255 = address owner).
    pub priority: u8,
    /// Our Advertisement_Interval.
    #[serde(with = "serde_duration")]
    pub advert_interval: Duration,
    /// Preempt a lower-priority master.
    pub preempt: bool,
    /// No preemption for this long after startup (keepalived semantics).
    #[serde(with = "serde_duration")]
    pub preempt_delay: Duration,
    /// Our primary address on the advert interface, for the equal-priority tie-break.
    pub primary_addr: IpAddr,
    /// Optional gateway tracking.
    pub track: Option<Track>,
    /// Longest a shutting-down master keeps its addresses waiting for the new master.
    #[serde(with = "serde_duration")]
    pub handoff_timeout: Duration,
    /// Adverts whose Max Adver Int is longer are discarded (`interval_too_long`) instead of
    /// setting Master_Adver_Interval: this bounds how long one advert can make us wait.
    #[serde(with = "serde_duration")]
    pub max_peer_advert_interval: Duration,
    /// Adverts from other sources are discarded (`unknown_peer`); empty: any source.
    #[serde(default)]
    pub allowed_peers: Vec<IpAddr>,
}

/// RFC 5798 states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not running (before startup, after shutdown).
    Initialize,
    /// Listening to a master.
    Backup,
    /// Owning the virtual addresses and advertising.
    Master,
}

impl State {
    /// Lower-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Initialize => "initialize",
            State::Backup => "backup",
            State::Master => "master",
        }
    }
}

/// Inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The instance starts; `vips_present` says whether the virtual addresses were found on
    /// the system (a restart while master).
    Startup {
        /// Some configured VIP is already on its interface.
        vips_present: bool,
    },
    /// Graceful stop (SIGTERM).
    Shutdown,
    /// A valid advert from another router for our VRID.
    AdvertReceived {
        /// Its priority.
        priority: u8,
        /// Its Max Adver Int (v3) or Adver Int (v2).
        #[serde(with = "serde_duration")]
        max_adver_interval: Duration,
        /// Its IP source address.
        src: IpAddr,
    },
    /// The Master_Down timer expired.
    MasterDownTimerFired,
    /// The Adver timer expired.
    AdverTimerFired,
    /// The graceful-shutdown wait expired.
    HandoffTimerFired,
    /// The number of healthy gateways changed.
    TrackChanged {
        /// Healthy gateways now.
        healthy_count: usize,
    },
    /// Configuration reloaded (never moves addresses by itself).
    ConfigChanged {
        /// The new configuration.
        config: FsmConfig,
    },
}

/// Why a state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Startup without addresses: listen first.
    Startup,
    /// Priority 255 owns the addresses (RFC 5798 §6.4.1).
    AddressOwner,
    /// Startup found our addresses in place (restart while master).
    AdoptedVips,
    /// No advert from a better master within Master_Down_Interval.
    MasterDown,
    /// The master announced priority 0 and Skew_Time passed.
    MasterLeft,
    /// Advert with a higher priority.
    HigherPriority,
    /// Advert with the same priority from a higher primary address.
    HigherAddress,
    /// Graceful shutdown; the new master was heard.
    ShutdownHandedOff,
    /// Graceful shutdown; nobody took over within the handoff timeout.
    ShutdownTimeout,
    /// Shutdown while not master.
    Shutdown,
}

impl Reason {
    /// snake_case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Startup => "startup",
            Reason::AddressOwner => "address_owner",
            Reason::AdoptedVips => "adopted_vips",
            Reason::MasterDown => "master_down",
            Reason::MasterLeft => "master_left",
            Reason::HigherPriority => "higher_priority",
            Reason::HigherAddress => "higher_address",
            Reason::ShutdownHandedOff => "shutdown_handed_off",
            Reason::ShutdownTimeout => "shutdown_timeout",
            Reason::Shutdown => "shutdown",
        }
    }
}

/// Why an otherwise valid advert was not used (a local policy beyond RFC 5798 §7.1's checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Discard {
    /// The source is not in `allowed_peers`.
    UnknownPeer,
    /// Its Max Adver Int is above `max_peer_advert_interval`.
    IntervalTooLong,
    /// Its Max Adver Int is 0 (VRRPv3): no sender configures that, and §6.4.2 would make
    /// Master_Down_Interval 0, so every backup would take over at once after each one.
    IntervalZero,
}

impl Discard {
    /// snake_case name: the `reason` label of `vpn_router_vrrp_invalid_packets_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Discard::UnknownPeer => "unknown_peer",
            Discard::IntervalTooLong => "interval_too_long",
            Discard::IntervalZero => "interval_zero",
        }
    }
}

/// Outputs, performed in order. An `Arm*` replaces a pending timer of the same kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Send one advertisement with this priority.
    SendAdvert {
        /// Priority to announce (0 = leaving).
        priority: u8,
    },
    /// Make sure every virtual address is present (idempotent).
    AddVips,
    /// Remove the virtual addresses.
    RemoveVips,
    /// Send the gratuitous ARP / unsolicited NA burst.
    SendGratuitous,
    /// Arm the Adver timer.
    ArmAdverTimer {
        /// Expiry from now.
        #[serde(with = "serde_duration")]
        after: Duration,
    },
    /// Arm the Master_Down timer.
    ArmMasterDownTimer {
        /// Expiry from now.
        #[serde(with = "serde_duration")]
        after: Duration,
    },
    /// Arm the graceful-shutdown wait.
    ArmHandoffTimer {
        /// Expiry from now.
        #[serde(with = "serde_duration")]
        after: Duration,
    },
    /// Cancel every pending timer.
    CancelTimers,
    /// The state changed.
    StateChanged {
        /// Previous state.
        from: State,
        /// New state.
        to: State,
        /// Why.
        reason: Reason,
    },
    /// The instance finished (after `Shutdown`); the runner returns.
    Stopped,
    /// The advert just received was discarded without any effect; the runner counts it.
    DiscardAdvert {
        /// Why.
        reason: Discard,
    },
}

/// One VRRP instance's protocol state.
#[derive(Debug, Clone)]
pub struct Fsm {
    config: FsmConfig,
    state: State,
    healthy_count: Option<usize>,
    effective_priority: u8,
    master_adver_interval: Duration,
    started_at: Duration,
    handing_off: bool,
    /// Handing off and the successor's advert was heard: letting go after a short linger.
    successor_heard: bool,
    stopped: bool,
    master_addr: Option<IpAddr>,
    /// When we last re-announced our addresses because another master was heard.
    last_reclaim: Option<Duration>,
}

/// Re-announcements when lower-priority masters are heard are at least this far apart, and at
/// least two advert intervals: one per episode (the other router backs off within an interval
/// of hearing us), not one per advert of a peer that never hears us.
const RECLAIM_HOLDOFF_MIN: Duration = Duration::from_millis(100);

impl Fsm {
    /// A new instance in Initialize. Until a `TrackChanged` arrives, tracking counts as
    /// healthy.
    pub fn new(config: FsmConfig) -> Fsm {
        let mut fsm = Fsm {
            master_adver_interval: config.advert_interval,
            effective_priority: config.priority,
            config,
            state: State::Initialize,
            healthy_count: None,
            started_at: Duration::ZERO,
            handing_off: false,
            successor_heard: false,
            stopped: false,
            master_addr: None,
            last_reclaim: None,
        };
        fsm.effective_priority = fsm.compute_priority();
        fsm
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Priority currently announced (configured priority adjusted by tracking).
    pub fn effective_priority(&self) -> u8 {
        self.effective_priority
    }

    /// Current configuration.
    pub fn config(&self) -> &FsmConfig {
        &self.config
    }

    /// Address of the master last heard (or our own while master).
    pub fn master_addr(&self) -> Option<IpAddr> {
        match self.state {
            State::Master => Some(self.config.primary_addr),
            _ => self.master_addr,
        }
    }

    /// True between a graceful `Shutdown` and `Stopped` while holding the addresses.
    pub fn handing_off(&self) -> bool {
        self.handing_off
    }

    /// RFC 5798 §6.1 Skew_Time, from the local priority and (v3) Master_Adver_Interval.
    pub fn skew_time(&self) -> Duration {
        let weight = 256 - u32::from(self.effective_priority);
        match self.config.version {
            // RFC 3768 §6.1: (256 - Priority) / 256 seconds.
            Version::V2 => Duration::from_secs(1) * weight / 256,
            Version::V3 => self.master_adver_interval * weight / 256,
        }
    }

    /// RFC 5798 §6.1 Master_Down_Interval.
    pub fn master_down_interval(&self) -> Duration {
        let interval = match self.config.version {
            Version::V2 => self.config.advert_interval,
            Version::V3 => self.master_adver_interval,
        };
        interval * 3 + self.skew_time()
    }

    fn compute_priority(&self) -> u8 {
        let p = self.config.priority;
        let (Some(track), Some(healthy)) = (self.config.track, self.healthy_count) else {
            return p;
        };
        if p == 255 || healthy >= track.min_healthy {
            return p;
        }
        (i32::from(p) + i32::from(track.weight)).clamp(1, 254) as u8
    }

    fn preempt_allowed(&self, now: Duration) -> bool {
        self.config.preempt && now >= self.started_at + self.config.preempt_delay
    }

    fn transition(&mut self, to: State, reason: Reason, out: &mut Vec<Action>) {
        let from = self.state;
        self.state = to;
        out.push(Action::StateChanged { from, to, reason });
    }

    fn become_master(&mut self, reason: Reason, out: &mut Vec<Action>) {
        // RFC 5798 §6.4.1/§6.4.2: send an advert, broadcast gratuitous ARP, arm the Adver
        // timer. The addresses come first, as keepalived adds them: the advert, sent from
        // the VMAC, is what moves the switch's entry for the VMAC to us, and a client packet
        // following it must find the VIP here. The other way round, packets that arrived in
        // the ~0.3 ms between advert and address were dropped.
        out.push(Action::CancelTimers);
        out.push(Action::AddVips);
        out.push(Action::SendAdvert {
            priority: self.effective_priority,
        });
        out.push(Action::SendGratuitous);
        out.push(Action::ArmAdverTimer {
            after: self.config.advert_interval,
        });
        self.transition(State::Master, reason, out);
    }

    fn accept_master(&mut self, interval: Duration, src: IpAddr, out: &mut Vec<Action>) {
        if self.config.version == Version::V3 {
            self.master_adver_interval = interval;
        }
        self.master_addr = Some(src);
        out.push(Action::ArmMasterDownTimer {
            after: self.master_down_interval(),
        });
    }

    /// Feeds one event at time `now`; returns the actions to perform, in order.
    pub fn handle(&mut self, event: Event, now: Duration) -> Vec<Action> {
        let mut out = Vec::new();
        self.handle_into(event, now, &mut out);
        out
    }

    /// [`Self::handle`], appending the actions to `out` (a steady master reuses one buffer
    /// instead of allocating one per advert).
    pub fn handle_into(&mut self, event: Event, now: Duration, out: &mut Vec<Action>) {
        if self.stopped {
            return;
        }
        match event {
            Event::Startup { vips_present } => {
                if self.state != State::Initialize {
                    return;
                }
                self.started_at = now;
                self.master_adver_interval = self.config.advert_interval;
                if self.config.priority == 255 {
                    self.become_master(Reason::AddressOwner, out);
                } else if vips_present {
                    self.become_master(Reason::AdoptedVips, out);
                } else {
                    out.push(Action::ArmMasterDownTimer {
                        after: self.master_down_interval(),
                    });
                    self.transition(State::Backup, Reason::Startup, out);
                }
            }
            Event::Shutdown => match self.state {
                State::Master if !self.handing_off => {
                    // RFC 5798 §6.4.3: cancel the Adver timer, send priority 0. Unlike the RFC
                    // we keep the addresses until the successor is heard (see module doc).
                    self.handing_off = true;
                    out.push(Action::CancelTimers);
                    out.push(Action::SendAdvert { priority: 0 });
                    out.push(Action::ArmHandoffTimer {
                        after: self.config.handoff_timeout,
                    });
                }
                State::Master => {}
                State::Backup | State::Initialize => {
                    out.push(Action::CancelTimers);
                    if self.state != State::Initialize {
                        self.transition(State::Initialize, Reason::Shutdown, out);
                    }
                    self.stopped = true;
                    out.push(Action::Stopped);
                }
            },
            Event::AdvertReceived {
                priority,
                max_adver_interval,
                src,
            } => self.on_advert(priority, max_adver_interval, src, now, out),
            Event::MasterDownTimerFired => {
                if self.state == State::Backup {
                    self.become_master(Reason::MasterDown, out);
                }
            }
            Event::AdverTimerFired => {
                if self.state == State::Master && !self.handing_off {
                    out.push(Action::SendAdvert {
                        priority: self.effective_priority,
                    });
                    out.push(Action::ArmAdverTimer {
                        after: self.config.advert_interval,
                    });
                }
            }
            Event::HandoffTimerFired => {
                if self.handing_off {
                    let reason = if self.successor_heard {
                        Reason::ShutdownHandedOff
                    } else {
                        Reason::ShutdownTimeout
                    };
                    self.finish_handoff(reason, out);
                }
            }
            Event::TrackChanged { healthy_count } => {
                self.healthy_count = Some(healthy_count);
                self.reprioritise(out);
            }
            Event::ConfigChanged { config } => {
                let interval_changed = config.advert_interval != self.config.advert_interval;
                self.config = config;
                if self.state != State::Master {
                    self.master_adver_interval = self.config.advert_interval;
                }
                let before = self.effective_priority;
                self.reprioritise(out);
                if interval_changed && before == self.effective_priority {
                    self.announce(out);
                }
            }
        }
    }

    fn reprioritise(&mut self, out: &mut Vec<Action>) {
        let new = self.compute_priority();
        if new == self.effective_priority {
            return;
        }
        self.effective_priority = new;
        // A backup's new priority takes effect on the next advert it judges (preempting after
        // Master_Down if it now outranks the master); a master announces it at once.
        self.announce(out);
    }

    fn announce(&mut self, out: &mut Vec<Action>) {
        if self.state == State::Master && !self.handing_off {
            out.push(Action::SendAdvert {
                priority: self.effective_priority,
            });
            out.push(Action::ArmAdverTimer {
                after: self.config.advert_interval,
            });
        }
    }

    fn finish_handoff(&mut self, reason: Reason, out: &mut Vec<Action>) {
        self.handing_off = false;
        out.push(Action::CancelTimers);
        out.push(Action::RemoveVips);
        self.transition(State::Initialize, reason, out);
        self.stopped = true;
        out.push(Action::Stopped);
    }

    fn on_advert(
        &mut self,
        priority: u8,
        interval: Duration,
        src: IpAddr,
        now: Duration,
        out: &mut Vec<Action>,
    ) {
        if src == self.config.primary_addr {
            return;
        }
        // VRRPv3 has no authentication (RFC 5798 §9): any host on the segment can send a
        // valid advert. Two local checks bound what one such advert can do, whatever our
        // state: its source must be a configured peer, and its Max Adver Int must be one we
        // are willing to wait for. §6.4.2 would set Master_Adver_Interval from it, and a
        // single priority-255 advert with 40.95 s then leaves the VIPs unheld for
        // 3 × 40.95 s + Skew_Time. Discarding (not clamping) makes such an advert change
        // nothing at all: clamped, it would still take the VIPs away for 3 × the bound.
        if !self.config.allowed_peers.is_empty() && !self.config.allowed_peers.contains(&src) {
            out.push(Action::DiscardAdvert {
                reason: Discard::UnknownPeer,
            });
            return;
        }
        if interval > self.config.max_peer_advert_interval {
            out.push(Action::DiscardAdvert {
                reason: Discard::IntervalTooLong,
            });
            return;
        }
        if interval.is_zero() {
            out.push(Action::DiscardAdvert {
                reason: Discard::IntervalZero,
            });
            return;
        }
        match self.state {
            State::Initialize => {}
            State::Backup => {
                if priority == 0 {
                    // RFC 5798 §6.4.2: the master is leaving; take over after Skew_Time only.
                    out.push(Action::ArmMasterDownTimer {
                        after: self.skew_time(),
                    });
                } else if !self.preempt_allowed(now) || priority >= self.effective_priority {
                    self.accept_master(interval, src, out);
                }
                // Otherwise discard: a preempting backup lets Master_Down expire.
            }
            State::Master if self.handing_off => {
                if priority > 0 && !self.successor_heard {
                    // Linger half an advert interval before letting go: the successor
                    // sends its advert before it adds the VIPs and announces them, and
                    // until that announcement the switch still sends the VMAC's frames to
                    // us. Letting go at once dropped them (lab: lost pings on SIGTERM).
                    self.master_addr = Some(src);
                    self.successor_heard = true;
                    out.push(Action::ArmHandoffTimer {
                        after: self.config.advert_interval / 2,
                    });
                }
            }
            State::Master => {
                if priority == 0 {
                    // RFC 5798 §6.4.3: another master left; reassert at once.
                    out.push(Action::SendAdvert {
                        priority: self.effective_priority,
                    });
                    out.push(Action::ArmAdverTimer {
                        after: self.config.advert_interval,
                    });
                    return;
                }
                let reason = if priority > self.effective_priority {
                    Reason::HigherPriority
                } else if priority == self.effective_priority && src > self.config.primary_addr {
                    Reason::HigherAddress
                } else {
                    // RFC 9568 §6.4.3: a lower priority (or a lower address at equal
                    // priority) is discarded; our next advert makes that router back off.
                    // But a second master means a partition just healed (or that router
                    // missed our adverts): it announced the VIPs, so the switch now sends
                    // the VMAC's frames to it. Our IPv4 multicast adverts come from the VMAC
                    // and move them back, but IPv6 and unicast adverts come from the parent's
                    // MAC, and VIPs on other interfaces are never in an advert: announce again,
                    // as keepalived does on a lower-priority advert.
                    let holdoff = (self.config.advert_interval * 2).max(RECLAIM_HOLDOFF_MIN);
                    if self.last_reclaim.is_none_or(|at| now >= at + holdoff) {
                        self.last_reclaim = Some(now);
                        out.push(Action::SendGratuitous);
                    }
                    return;
                };
                out.push(Action::CancelTimers);
                self.accept_master(interval, src, out);
                out.push(Action::RemoveVips);
                self.transition(State::Backup, reason, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(priority: u8, interval_ms: u64) -> FsmConfig {
        FsmConfig {
            version: Version::V3,
            priority,
            advert_interval: Duration::from_millis(interval_ms),
            preempt: true,
            preempt_delay: Duration::ZERO,
            primary_addr: "192.168.28.1".parse().unwrap(),
            track: None,
            handoff_timeout: Duration::from_millis(3 * interval_ms),
            max_peer_advert_interval: Duration::from_millis(10 * interval_ms),
            allowed_peers: Vec::new(),
        }
    }

    #[test]
    fn skew_and_master_down_follow_rfc_5798() {
        let f = Fsm::new(cfg(100, 1000));
        // (256-100)*100cs/256 = 60.9375 cs
        assert_eq!(f.skew_time(), Duration::from_micros(609_375));
        assert_eq!(f.master_down_interval(), Duration::from_micros(3_609_375));
        let f = Fsm::new(cfg(150, 10));
        assert_eq!(f.skew_time(), Duration::from_nanos(4_140_625));
        let mut c = cfg(100, 1000);
        c.version = Version::V2;
        let f = Fsm::new(c);
        assert_eq!(f.master_down_interval(), Duration::from_micros(3_609_375));
    }

    #[test]
    fn master_down_uses_received_interval() {
        let mut f = Fsm::new(cfg(100, 1000));
        f.handle(
            Event::Startup {
                vips_present: false,
            },
            Duration::ZERO,
        );
        let a = f.handle(
            Event::AdvertReceived {
                priority: 200,
                max_adver_interval: Duration::from_millis(100),
                src: "192.168.28.9".parse().unwrap(),
            },
            Duration::from_millis(5),
        );
        assert_eq!(
            a,
            vec![Action::ArmMasterDownTimer {
                after: Duration::from_nanos(360_937_500)
            }]
        );
    }

    #[test]
    fn tracking_clamps_and_spares_owner() {
        let mut c = cfg(40, 1000);
        c.track = Some(Track {
            min_healthy: 2,
            weight: -50,
        });
        let mut f = Fsm::new(c.clone());
        f.handle(Event::TrackChanged { healthy_count: 1 }, Duration::ZERO);
        assert_eq!(f.effective_priority(), 1);
        c.priority = 255;
        let mut f = Fsm::new(c);
        f.handle(Event::TrackChanged { healthy_count: 0 }, Duration::ZERO);
        assert_eq!(f.effective_priority(), 255);
    }
}
