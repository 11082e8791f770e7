//! When a level-triggered reconciler (egress, return routing) runs its next pass: at once at
//! start, on every change of the healthy set, on a periodic resync (repairs hand edits), and
//! one second after a failed pass. Owns only the timing; the passes are the caller's.

use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};
use tokio_util::sync::CancellationToken;

use crate::health::HealthyGateways;

/// How long after a failed pass the next one runs (unless something else comes first).
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct Trigger {
    resync: Interval,
    retry: Pin<Box<Sleep>>,
    retry_armed: bool,
}

impl Trigger {
    /// The first pass is due at once; resyncs every `resync_interval` after it.
    pub(crate) fn new(resync_interval: Duration) -> Self {
        let mut resync =
            tokio::time::interval_at(Instant::now() + resync_interval, resync_interval);
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            resync,
            retry: Box::pin(tokio::time::sleep(Duration::ZERO)),
            retry_armed: true,
        }
    }

    /// Waits until the next pass is due and returns the healthy set to reconcile; None when
    /// `cancel` fired or the healthy set's sender is gone.
    pub(crate) async fn next(
        &mut self,
        healthy: &mut watch::Receiver<HealthyGateways>,
        cancel: &CancellationToken,
    ) -> Option<HealthyGateways> {
        tokio::select! {
            () = cancel.cancelled() => return None,
            changed = healthy.changed() => changed.ok()?,
            _ = self.resync.tick() => {}
            () = &mut self.retry, if self.retry_armed => {}
        }
        self.retry_armed = false;
        Some(healthy.borrow_and_update().clone())
    }

    /// The pass failed: run again after [`RETRY_AFTER_ERROR`].
    pub(crate) fn failed(&mut self) {
        self.retry
            .as_mut()
            .reset(Instant::now() + RETRY_AFTER_ERROR);
        self.retry_armed = true;
    }
}
