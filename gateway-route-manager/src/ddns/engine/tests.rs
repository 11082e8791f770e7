//! The engine's timing and gating with a fake provider on tokio's paused clock.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::ddns::error::DdnsError;
use crate::ddns::metrics::DdnsMetrics;
use crate::ddns::provider::{Provider, ProviderRecord};
use crate::ddns::records::RecordType;
use crate::ddns::{Credential, DdnsSettings, DynuSettings, ProviderSettings};
use crate::health::{HealthyGateway, HealthyGateways};

#[derive(Default)]
struct FakeState {
    records: BTreeMap<RecordType, Vec<IpAddr>>,
    /// Errors the next reads return, in order.
    fail_reads: VecDeque<DdnsError>,
    reads: Vec<Instant>,
    writes: Vec<(RecordType, Vec<IpAddr>)>,
    /// Set to false on the next read (mastership lost while reading).
    drop_master_on_read: Option<watch::Sender<bool>>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }
}

impl Provider for Fake {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn read(&self, rtype: RecordType) -> Result<Vec<ProviderRecord>, DdnsError> {
        let mut s = self.state();
        s.reads.push(Instant::now());
        if let Some(tx) = s.drop_master_on_read.take() {
            tx.send_replace(false);
        }
        if let Some(e) = s.fail_reads.pop_front() {
            return Err(e);
        }
        Ok(s.records
            .get(&rtype)
            .into_iter()
            .flatten()
            .map(|a| ProviderRecord {
                id: None,
                address: *a,
                ttl: Some(60),
            })
            .collect())
    }
    async fn replace(
        &self,
        rtype: RecordType,
        _current: &[ProviderRecord],
        wanted: &std::collections::BTreeSet<IpAddr>,
        _ttl: u32,
    ) -> Result<(), DdnsError> {
        let mut s = self.state();
        let v: Vec<IpAddr> = wanted.iter().copied().collect();
        s.writes.push((rtype, v.clone()));
        s.records.insert(rtype, v);
        Ok(())
    }
}

fn public(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10 + i as u8))
}

fn set(idx: &[usize]) -> HealthyGateways {
    HealthyGateways {
        complete: true,
        gateways: idx
            .iter()
            .map(|i| {
                let gw = HealthyGateway {
                    address: Ipv4Addr::new(192, 168, 25, 128 + *i as u8),
                    public_ip: Some(public(*i)),
                };
                (*i, gw)
            })
            .collect(),
    }
}

fn settings() -> DdnsSettings {
    let mut s = DdnsSettings::new(
        "vpn.example.com",
        Duration::from_secs(60),
        4,
        ProviderSettings::Dynu(DynuSettings {
            api_url: "http://127.0.0.1:1/unused".into(),
            api_key: Credential::new("unused"),
            ca_certificates: None,
        }),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    );
    s.debounce = Duration::from_millis(250);
    s.retry_initial = Duration::from_secs(1);
    s.retry_max = Duration::from_secs(4);
    s.resync_interval = Duration::from_secs(300);
    s
}

struct Harness {
    fake: Fake,
    healthy: watch::Sender<HealthyGateways>,
    master: watch::Sender<bool>,
    metrics: DdnsMetrics,
    cancel: CancellationToken,
}

fn start(s: DdnsSettings, fake: Fake, initial: HealthyGateways, master: bool) -> Harness {
    let (healthy, healthy_rx) = watch::channel(initial);
    let (master_tx, master_rx) = watch::channel(master);
    let metrics = DdnsMetrics::new();
    let cancel = CancellationToken::new();
    let engine = Engine::new(s, fake.clone(), metrics.clone());
    tokio::spawn(engine.run(healthy_rx, master_rx, cancel.clone()));
    Harness {
        fake,
        healthy,
        master: master_tx,
        metrics,
        cancel,
    }
}

fn a_writes(h: &Harness) -> Vec<Vec<IpAddr>> {
    h.fake
        .state()
        .writes
        .iter()
        .filter(|(t, _)| *t == RecordType::A)
        .map(|(_, v)| v.clone())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn first_attempt_writes_and_a_burst_of_changes_is_one_write() {
    let h = start(settings(), Fake::default(), set(&[0]), true);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(a_writes(&h), [vec![public(0)]]);
    assert_eq!(h.metrics.updates_count("fake", "written"), 1);
    assert_eq!(h.metrics.last_success.get(), 1_700_000_000.0);
    // Four changes 50 ms apart: one write of the last set, 250 ms after the first change.
    for s in [&[0, 1][..], &[0, 1, 2], &[0, 2], &[0, 1, 2]] {
        h.healthy.send(set(s)).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(
        a_writes(&h).len(),
        1,
        "wrote before the debounce window closed"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        a_writes(&h),
        [vec![public(0)], vec![public(0), public(1), public(2)]]
    );
    h.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_provider_holding_the_set_is_not_written_and_resync_reads_again() {
    let fake = Fake::default();
    fake.state()
        .records
        .insert(RecordType::A, vec![public(0), public(1)]);
    let h = start(settings(), fake, set(&[1, 0]), true);
    tokio::time::sleep(Duration::from_secs(601)).await;
    assert!(h.fake.state().writes.is_empty());
    // Start + two resyncs, each reading A and AAAA.
    assert_eq!(h.metrics.updates_count("fake", "unchanged"), 3);
    assert_eq!(h.fake.state().reads.len(), 6);
    h.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_up_to_the_cap() {
    let fake = Fake::default();
    for _ in 0..5 {
        fake.state()
            .fail_reads
            .push_back(DdnsError::Transport("down".into()));
    }
    let start_at = Instant::now();
    let h = start(settings(), fake, set(&[0]), true);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let reads = h.fake.state().reads.clone();
    let gaps: Vec<u64> = reads
        .windows(2)
        .take(5)
        .map(|w| (w[1] - w[0]).as_secs())
        .collect();
    assert_eq!(reads[0] - start_at, Duration::ZERO);
    assert_eq!(gaps, [1, 2, 4, 4, 4], "retry delays");
    assert_eq!(h.metrics.updates_count("fake", "failed"), 5);
    assert_eq!(a_writes(&h), [vec![public(0)]]);
    assert_eq!(h.metrics.current_error(), None);
    h.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn rate_limit_is_respected_even_when_inputs_change() {
    let fake = Fake::default();
    fake.state().fail_reads.push_back(DdnsError::RateLimited {
        message: "429".into(),
        retry_after: Duration::from_secs(10),
    });
    let h = start(settings(), fake, set(&[0]), true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.metrics.current_error(), Some("rate_limited"));
    h.healthy.send(set(&[0, 1])).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.fake.state().reads.len(), 1, "retried before Retry-After");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(a_writes(&h), [vec![public(0), public(1)]]);
    h.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn no_healthy_gateway_keeps_the_published_records() {
    let h = start(settings(), Fake::default(), set(&[0, 1]), true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a_writes(&h), [vec![public(0), public(1)]]);
    h.healthy.send(set(&[])).unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(a_writes(&h).len(), 1, "emptied the name");
    assert_eq!(
        h.fake.state().records.get(&RecordType::A),
        Some(&vec![public(0), public(1)])
    );
    h.healthy.send(set(&[1])).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a_writes(&h).last(), Some(&vec![public(1)]));
    h.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_backup_never_reads_nor_writes_and_an_incomplete_set_waits() {
    let h = start(settings(), Fake::default(), set(&[0]), false);
    h.healthy.send(set(&[0, 1])).unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(h.fake.state().reads.is_empty());
    assert_eq!(h.metrics.writer.get(), 0);
    // Master, but the healthy set is not known yet for every gateway: wait.
    let mut incomplete = set(&[0]);
    incomplete.complete = false;
    h.healthy.send(incomplete).unwrap();
    h.master.send(true).unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(h.fake.state().reads.is_empty());
    h.healthy.send(set(&[0, 1])).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a_writes(&h), [vec![public(0), public(1)]]);
    assert_eq!(h.metrics.writer.get(), 1);
    h.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn mastership_lost_while_reading_means_no_write() {
    let fake = Fake::default();
    let h = start(settings(), fake, set(&[0]), true);
    // Re-arm: the engine's first read finds the master gone.
    h.fake.state().drop_master_on_read = Some(h.master.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        h.fake.state().writes.is_empty(),
        "wrote after losing mastership"
    );
    let total: u64 = ["written", "unchanged", "failed"]
        .iter()
        .map(|r| h.metrics.updates_count("fake", r))
        .sum();
    assert_eq!(total, 0);
    h.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn becoming_backup_clears_the_error_of_the_masters_attempts() {
    let fake = Fake::default();
    fake.state()
        .fail_reads
        .push_back(DdnsError::Auth("key refused".into()));
    let h = start(settings(), fake, set(&[0]), true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.metrics.current_error(), Some("auth"));
    assert_eq!(h.metrics.last_error().as_deref(), Some("key refused"));
    h.master.send(false).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.metrics.current_error(), None);
    assert_eq!(h.fake.state().reads.len(), 1, "a backup retried");
    h.cancel.cancel();
}

/// A provider that answers `Retry-After: 18446744073709551615` (or any huge value) must neither
/// crash the engine (`Instant + Duration` overflow) nor stop it: the next try is at most
/// `MAX_RETRY_AFTER` away.
#[tokio::test(start_paused = true)]
async fn a_huge_retry_after_neither_panics_nor_freezes_the_engine() {
    for asked in [Duration::MAX, Duration::from_secs(30 * 86_400)] {
        let fake = Fake::default();
        fake.state().fail_reads.push_back(DdnsError::RateLimited {
            message: "429".into(),
            retry_after: asked,
        });
        let start_at = Instant::now();
        let h = start(settings(), fake, set(&[0]), true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(h.metrics.current_error(), Some("rate_limited"));
        // A change of the healthy set does not bring the try before the (clamped) wait.
        h.healthy.send(set(&[0, 1])).unwrap();
        tokio::time::sleep(crate::ddns::MAX_RETRY_AFTER).await;
        let reads = h.fake.state().reads.clone();
        assert!(reads.len() >= 2, "{asked:?}: no retry within 15 min");
        assert_eq!(
            reads[1] - start_at,
            crate::ddns::MAX_RETRY_AFTER,
            "{asked:?}: the retry is not 15 min after the 429"
        );
        assert_eq!(a_writes(&h), [vec![public(0), public(1)]]);
        h.cancel.cancel();
    }
}

#[test]
fn retry_wait_is_the_backoff_or_the_clamped_retry_after() {
    let limited = |secs: u64| DdnsError::RateLimited {
        message: "429".into(),
        retry_after: Duration::from_secs(secs),
    };
    let backoff = Duration::from_secs(4);
    let wait = |e: &DdnsError| super::retry_wait(e, backoff);
    assert_eq!(wait(&DdnsError::Transport("down".into())), backoff);
    assert_eq!(wait(&limited(1)), backoff);
    assert_eq!(wait(&limited(120)), Duration::from_secs(120));
    assert_eq!(wait(&limited(u64::MAX)), crate::ddns::MAX_RETRY_AFTER);
}

/// Settings the engine cannot fit in a deadline (a library caller's, not the config's) make
/// it wait, not panic.
#[tokio::test(start_paused = true)]
async fn settings_beyond_any_deadline_do_not_panic() {
    let mut s = settings();
    s.resync_interval = Duration::MAX;
    s.retry_initial = Duration::MAX;
    s.retry_max = Duration::MAX;
    let fake = Fake::default();
    fake.state()
        .fail_reads
        .push_back(DdnsError::Transport("down".into()));
    let h = start(s, fake, set(&[0]), true);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(h.fake.state().reads.len(), 1, "retried before the backoff");
    assert_eq!(h.metrics.current_error(), Some("transport"));
    // Still alive (a panicked task would have dropped the receiver): a new input retries.
    h.healthy
        .send(set(&[0, 1]))
        .expect("the engine task is gone (panicked?)");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a_writes(&h), [vec![public(0), public(1)]]);
    h.cancel.cancel();
}
