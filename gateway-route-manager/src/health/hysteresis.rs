//! Rise/fall hysteresis of one gateway: a pure state machine (no clock, no I/O).
//!
//! Owns: the rule that turns a stream of check results into Healthy/Unhealthy. It must not
//! know what a check is or when checks run.
//!
//! Start-up (adoption): a gateway starts `Unknown`. Its *first* result decides at once — a
//! success admits it (no `rise` wait), a failure rejects it. A restarted daemon therefore
//! rebuilds, after one round, the same healthy set its predecessor had, and the egress
//! reconciler finds the kernel already matching (no flap). `rise` applies only to a gateway
//! coming back from `Unhealthy`, `fall` only to one leaving `Healthy`.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayState {
    /// Not checked yet; not in the healthy set.
    Unknown,
    Healthy,
    Unhealthy,
}

impl GatewayState {
    pub fn as_str(&self) -> &'static str {
        match self {
            GatewayState::Unknown => "unknown",
            GatewayState::Healthy => "healthy",
            GatewayState::Unhealthy => "unhealthy",
        }
    }
}

/// A state change: `(from, to)`.
pub type Transition = (GatewayState, GatewayState);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hysteresis {
    rise: u32,
    fall: u32,
    state: GatewayState,
    successes: u32,
    failures: u32,
}

impl Hysteresis {
    /// `rise`/`fall` of 0 are treated as 1.
    pub fn new(rise: u32, fall: u32) -> Self {
        Hysteresis {
            rise: rise.max(1),
            fall: fall.max(1),
            state: GatewayState::Unknown,
            successes: 0,
            failures: 0,
        }
    }

    pub fn state(&self) -> GatewayState {
        self.state
    }

    /// Consecutive successes so far (reset by a failure).
    pub fn consecutive_successes(&self) -> u32 {
        self.successes
    }

    /// Consecutive failures so far (reset by a success).
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Feeds one check result; returns the transition if the state changed.
    pub fn observe(&mut self, ok: bool) -> Option<Transition> {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
        let next = match (self.state, ok) {
            (GatewayState::Unknown, true) => GatewayState::Healthy,
            (GatewayState::Unknown, false) => GatewayState::Unhealthy,
            (GatewayState::Healthy, false) if self.failures >= self.fall => GatewayState::Unhealthy,
            (GatewayState::Unhealthy, true) if self.successes >= self.rise => GatewayState::Healthy,
            (state, _) => state,
        };
        let from = self.state;
        self.state = next;
        (from != next).then_some((from, next))
    }
}

#[cfg(test)]
mod tests {
    use super::GatewayState::*;
    use super::*;

    fn feed(h: &mut Hysteresis, results: &[bool]) -> Vec<GatewayState> {
        results
            .iter()
            .map(|&ok| {
                h.observe(ok);
                h.state()
            })
            .collect()
    }

    #[test]
    fn first_success_admits_at_once() {
        let mut h = Hysteresis::new(3, 2);
        assert_eq!(h.state(), Unknown);
        assert_eq!(h.observe(true), Some((Unknown, Healthy)));
    }

    #[test]
    fn first_failure_rejects_at_once() {
        let mut h = Hysteresis::new(2, 3);
        assert_eq!(h.observe(false), Some((Unknown, Unhealthy)));
    }

    #[test]
    fn fall_consecutive_failures_remove() {
        let mut h = Hysteresis::new(2, 3);
        h.observe(true);
        assert_eq!(feed(&mut h, &[false, false]), [Healthy, Healthy]);
        assert_eq!(h.consecutive_failures(), 2);
        assert_eq!(h.observe(false), Some((Healthy, Unhealthy)));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut h = Hysteresis::new(2, 2);
        h.observe(true);
        assert_eq!(
            feed(&mut h, &[false, true, false, true, false]),
            [Healthy; 5]
        );
        assert_eq!(h.observe(false), Some((Healthy, Unhealthy)));
    }

    #[test]
    fn rise_consecutive_successes_readmit() {
        let mut h = Hysteresis::new(3, 1);
        h.observe(false);
        assert_eq!(
            feed(&mut h, &[true, true, false, true, true]),
            [Unhealthy; 5]
        );
        assert_eq!(h.consecutive_successes(), 2);
        assert_eq!(h.observe(true), Some((Unhealthy, Healthy)));
        assert_eq!(h.observe(true), None);
    }

    #[test]
    fn zero_counts_mean_one() {
        let mut h = Hysteresis::new(0, 0);
        h.observe(true);
        assert_eq!(h.observe(false), Some((Healthy, Unhealthy)));
        assert_eq!(h.observe(true), Some((Unhealthy, Healthy)));
    }
}
