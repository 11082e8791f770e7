//! The DDNS engine task: one loop per router that turns the healthy set into the provider's
//! records.
//!
//! Level-triggered: each attempt reads what the provider holds, writes only when it differs
//! from the wanted set, and reads back after writing. Inputs are two `watch` channels (healthy
//! set, master role); a change schedules an attempt `debounce` later, so a burst of changes is
//! one write (a fixed window: the latency stays bounded during a long burst). A failure is
//! retried with capped exponential backoff (or after the provider's `Retry-After`), and a new
//! input retries at once after the debounce. After a success the provider is read again every
//! `resync_interval`, repairing drift made by hand.
//!
//! The master gate is checked before every write, not only per attempt: a router that lost
//! mastership while reading never writes.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cloudflare::Cloudflare;
use super::dynu::Dynu;
use super::error::DdnsError;
use super::http::MAX_RETRY_AFTER;
use super::metrics::DdnsMetrics;
use super::provider::{holds_exactly, Provider, ProviderRecord};
use super::records::{wanted_records, RecordType, WantedRecords};
use super::rfc2136::Rfc2136;
use super::{DdnsSettings, ProviderSettings};
use crate::health::HealthyGateways;

/// Runs until `cancel`: builds the provider from `settings.provider` and keeps
/// `settings.hostname` equal to the healthy gateways' public IPs while `is_master` is true.
/// A provider that cannot be built (bad TSIG key, bad URL) is logged, shown in the error
/// metric, and the task waits for `cancel` (a config reload replaces it).
pub async fn run(
    settings: DdnsSettings,
    healthy: watch::Receiver<HealthyGateways>,
    is_master: watch::Receiver<bool>,
    metrics: DdnsMetrics,
    cancel: CancellationToken,
) {
    let built = match &settings.provider {
        ProviderSettings::Rfc2136(p) => Rfc2136::new(&settings, p).map(|p| {
            let e = Engine::new(settings.clone(), p, metrics.clone());
            tokio::spawn(e.run(healthy.clone(), is_master.clone(), cancel.clone()))
        }),
        ProviderSettings::Cloudflare(p) => Cloudflare::new(&settings, p).map(|p| {
            let e = Engine::new(settings.clone(), p, metrics.clone());
            tokio::spawn(e.run(healthy.clone(), is_master.clone(), cancel.clone()))
        }),
        ProviderSettings::Dynu(p) => Dynu::new(&settings, p).map(|p| {
            let e = Engine::new(settings.clone(), p, metrics.clone());
            tokio::spawn(e.run(healthy.clone(), is_master.clone(), cancel.clone()))
        }),
    };
    match built {
        Ok(task) => {
            if let Err(e) = task.await {
                tracing::error!(hostname = %settings.hostname, error = %e, "ddns: engine task failed");
            }
        }
        Err(e) => {
            tracing::error!(hostname = %settings.hostname, provider = settings.provider.name(), error = %e, "ddns: provider not usable; not updating");
            metrics.set_error_message(Some(&e));
            cancel.cancelled().await;
        }
    }
}

/// What one successful attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Written,
    Unchanged,
    /// Mastership was lost before a needed write.
    NotWriter,
}

struct Engine<P> {
    settings: DdnsSettings,
    provider: P,
    metrics: DdnsMetrics,
    started: Instant,
}

impl<P: Provider> Engine<P> {
    fn new(settings: DdnsSettings, provider: P, metrics: DdnsMetrics) -> Self {
        Engine {
            settings,
            provider,
            metrics,
            started: Instant::now(),
        }
    }

    async fn run(
        self,
        mut healthy: watch::Receiver<HealthyGateways>,
        mut is_master: watch::Receiver<bool>,
        cancel: CancellationToken,
    ) {
        let s = &self.settings;
        // First attempt right away: a restarted router adopts what the provider holds.
        let mut due: Option<Instant> = Some(Instant::now());
        let mut backoff = s.retry_initial;
        let mut last_error: Option<String> = None;
        let mut was_writer: Option<bool> = None;
        let mut healthy_open = true;
        let mut master_open = true;
        let mut kept_for_empty = false;
        // Set by a 429: new inputs do not bring the next attempt before this.
        let mut not_before = Instant::now();
        loop {
            let sleep = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = healthy.changed(), if healthy_open => {
                    healthy_open = r.is_ok();
                    due = Some(debounced(due, s.debounce).max(not_before));
                    continue;
                }
                r = is_master.changed(), if master_open => {
                    master_open = r.is_ok();
                    due = Some(debounced(due, s.debounce).max(not_before));
                    continue;
                }
                _ = sleep => {}
            }
            let writer = *is_master.borrow_and_update();
            let set = healthy.borrow_and_update().clone();
            if was_writer != Some(writer) {
                tracing::info!(hostname = %s.hostname, writer, "ddns: {}", if writer { "this router writes the name" } else { "not the master: not writing the name" });
                self.metrics.writer.set(i64::from(writer));
                if !writer {
                    // The error gauge describes this router's own attempts; a backup makes none.
                    self.metrics.set_error_message(None);
                    last_error = None;
                    backoff = s.retry_initial;
                }
                was_writer = Some(writer);
            }
            if !writer || !set.complete {
                // Nothing to do until an input changes (a half-known set would drop gateways
                // that simply were not checked yet).
                due = None;
                continue;
            }
            let wanted = wanted_records(&set, s.max_records);
            if wanted.is_empty() {
                // No healthy gateway with a public IP: keep what is published. Emptying the
                // name gains nothing (no gateway answers anyway) and resolvers would cache
                // the negative answer for the zone's SOA minimum, delaying recovery.
                if !kept_for_empty {
                    tracing::warn!(hostname = %s.hostname, "ddns: no healthy gateway has a public IP; keeping the published records until one has");
                    kept_for_empty = true;
                }
                due = None;
                continue;
            }
            kept_for_empty = false;
            let attempt = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.reconcile(&wanted, &is_master) => r,
            };
            match attempt {
                Ok(outcome) => {
                    if outcome != Outcome::NotWriter {
                        let result = if outcome == Outcome::Written {
                            "written"
                        } else {
                            "unchanged"
                        };
                        self.metrics.count_update(self.provider.name(), result);
                        self.metrics.set_error_message(None);
                        let now = s.wall_clock_at_start.checked_add(self.started.elapsed());
                        if let Some(Ok(d)) = now.map(|n| n.duration_since(UNIX_EPOCH)) {
                            self.metrics.last_success.set(d.as_secs_f64());
                        }
                        for t in RecordType::ALL {
                            self.metrics.set_records(t, wanted.of(t).len());
                        }
                        if last_error.take().is_some() {
                            tracing::info!(hostname = %s.hostname, provider = self.provider.name(), "ddns: update succeeded again");
                        }
                    }
                    backoff = s.retry_initial;
                    due = Some(deadline_after(s.resync_interval));
                }
                Err(e) => {
                    self.metrics.count_update(self.provider.name(), "failed");
                    self.metrics.set_error_message(Some(&e));
                    let wait = retry_wait(&e, backoff);
                    let text = e.to_string();
                    if last_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(hostname = %s.hostname, provider = self.provider.name(), kind = e.kind(), retry_in = ?wait, "ddns: update failed: {text}");
                    } else {
                        tracing::debug!(hostname = %s.hostname, retry_in = ?wait, "ddns: update failed again: {text}");
                    }
                    last_error = Some(text);
                    backoff = backoff.saturating_mul(2).min(s.retry_max);
                    due = Some(deadline_after(wait));
                    if matches!(e, DdnsError::RateLimited { .. }) {
                        not_before = deadline_after(wait);
                    }
                }
            }
        }
    }

    /// Read → compare → (write → read back), per record type.
    async fn reconcile(
        &self,
        wanted: &WantedRecords,
        is_master: &watch::Receiver<bool>,
    ) -> Result<Outcome, DdnsError> {
        let s = &self.settings;
        let ttl = s.ttl_secs();
        let mut outcome = Outcome::Unchanged;
        for rtype in RecordType::ALL {
            let want = wanted.of(rtype);
            let current = self.provider.read(rtype).await?;
            if holds_exactly(&current, want, ttl) {
                continue;
            }
            if !*is_master.borrow() {
                return Ok(Outcome::NotWriter);
            }
            self.provider.replace(rtype, &current, want, ttl).await?;
            let after = self.provider.read(rtype).await?;
            if !holds_exactly(&after, want, ttl) {
                return Err(DdnsError::Mismatch(format!(
                    "{}: {} {rtype}: read back {} after writing, expected {} (ttl {ttl}); another writer may be changing the name",
                    self.provider.name(),
                    s.hostname,
                    show_records(&after),
                    show_set(want)
                )));
            }
            tracing::info!(
                hostname = %s.hostname,
                provider = self.provider.name(),
                "ddns: {rtype} {} -> {}",
                show_records(&current),
                show_set(want)
            );
            outcome = Outcome::Written;
        }
        Ok(outcome)
    }
}

/// Fixed-window debounce: the first change of a burst sets the deadline, later ones keep it
/// (unless the pending attempt is further away, e.g. a backoff or the resync timer).
fn debounced(due: Option<Instant>, debounce: Duration) -> Instant {
    let soon = deadline_after(debounce);
    match due {
        Some(at) if at <= soon => at,
        _ => soon,
    }
}

/// How long to wait after a failed attempt: the backoff, or a rate limit's `Retry-After` when
/// that is longer, never more than [`MAX_RETRY_AFTER`] for the `Retry-After` part (the HTTP
/// client clamps it already; this holds for any provider).
fn retry_wait(e: &DdnsError, backoff: Duration) -> Duration {
    match e {
        DdnsError::RateLimited { retry_after, .. } => {
            (*retry_after).min(MAX_RETRY_AFTER).max(backoff)
        }
        _ => backoff,
    }
}

/// Beyond any timer this engine means; what a deadline saturates to (tokio's own `sleep`
/// uses about as far for durations it cannot add).
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `now + d` that cannot panic: `Instant + Duration` panics on overflow, and `d` may come from
/// the network (`Retry-After`) or the settings (debounce, resync interval).
fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d.min(FAR_FUTURE))
        .or_else(|| now.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(now)
}

fn show_set(s: &BTreeSet<IpAddr>) -> String {
    let v: Vec<String> = s.iter().map(|a| a.to_string()).collect();
    format!("[{}]", v.join(", "))
}

fn show_records(r: &[ProviderRecord]) -> String {
    let v: Vec<String> = r.iter().map(|r| r.address.to_string()).collect();
    format!("[{}]", v.join(", "))
}

#[cfg(test)]
mod tests;
