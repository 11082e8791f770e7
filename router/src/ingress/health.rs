//! The up/down state of one real server from its check results: `rise` successes in a row
//! bring it up, `fall` failures in a row take it down. The first result decides at once (a
//! restarted daemon must not wait `rise` intervals to serve again). Pure: results come in,
//! transitions come out.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    /// Not checked yet: treated as down (weight 0 / absent).
    Unknown,
    Up,
    Down,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerHealth {
    pub state: ServerState,
    /// Consecutive results that disagree with `state`.
    #[serde(skip)]
    streak: u32,
    /// Why the last check failed (or `ok`).
    pub last_reason: String,
    /// Duration of the last check, in seconds.
    pub last_check_seconds: Option<f64>,
}

impl Default for ServerHealth {
    fn default() -> Self {
        Self {
            state: ServerState::Unknown,
            streak: 0,
            last_reason: "not checked yet".into(),
            last_check_seconds: None,
        }
    }
}

impl ServerHealth {
    pub fn is_up(&self) -> bool {
        self.state == ServerState::Up
    }

    /// Records one result; returns the new state when it changed.
    pub fn observe(&mut self, ok: bool, reason: &str, rise: u32, fall: u32) -> Option<ServerState> {
        self.last_reason = reason.to_owned();
        let target = if ok {
            ServerState::Up
        } else {
            ServerState::Down
        };
        if self.state == target {
            self.streak = 0;
            return None;
        }
        if self.state == ServerState::Unknown {
            self.state = target;
            self.streak = 0;
            return Some(target);
        }
        self.streak += 1;
        let needed = if ok { rise } else { fall };
        if self.streak >= needed.max(1) {
            self.state = target;
            self.streak = 0;
            return Some(target);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides_then_rise_and_fall() {
        let mut h = ServerHealth::default();
        assert!(!h.is_up());
        assert_eq!(h.observe(true, "ok", 3, 2), Some(ServerState::Up));
        assert_eq!(h.observe(false, "refused", 3, 2), None);
        assert!(h.is_up());
        assert_eq!(h.last_reason, "refused");
        // A success in between resets the failure streak.
        assert_eq!(h.observe(true, "ok", 3, 2), None);
        assert_eq!(h.observe(false, "refused", 3, 2), None);
        assert_eq!(h.observe(false, "refused", 3, 2), Some(ServerState::Down));
        assert_eq!(h.observe(true, "ok", 3, 2), None);
        assert_eq!(h.observe(true, "ok", 3, 2), None);
        assert_eq!(h.observe(true, "ok", 3, 2), Some(ServerState::Up));

        let mut h = ServerHealth::default();
        assert_eq!(h.observe(false, "timeout", 1, 1), Some(ServerState::Down));
        assert_eq!(h.observe(true, "ok", 1, 1), Some(ServerState::Up));
        assert_eq!(h.observe(false, "timeout", 1, 1), Some(ServerState::Down));
    }
}
