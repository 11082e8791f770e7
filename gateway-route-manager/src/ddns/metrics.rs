//! `vpn_router_ddns_*` metrics. Labels: `provider` (rfc2136, cloudflare, dynu), `result`
//! (written, unchanged, failed), `record_type` (A, AAAA), `kind` (an error kind, see
//! [`DdnsError::kind`]): all low cardinality. Register once with [`DdnsMetrics::register`] on a
//! registry without a prefix.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::error::DdnsError;
use super::records::RecordType;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateLabels {
    pub provider: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordTypeLabels {
    pub record_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

/// All DDNS metrics. Cheap to clone (handles to shared atomics).
#[derive(Clone, Debug, Default)]
pub struct DdnsMetrics {
    /// Update attempts by provider and result.
    pub updates: Family<UpdateLabels, Counter>,
    /// Records the provider holds for the name after the last successful update.
    pub records: Family<RecordTypeLabels, Gauge>,
    /// Unix time of the last successful update (0 until one succeeds).
    pub last_success: Gauge<f64, AtomicU64>,
    /// 1 for the kind of the current error, 0 for every other kind (all 0 when fine).
    pub error: Family<ErrorLabels, Gauge>,
    /// 1 while this router writes the name (master of `only_when_master`, or no such key).
    pub writer: Gauge,
    current_error: Arc<Mutex<Option<&'static str>>>,
    last_error_message: Arc<Mutex<Option<String>>>,
}

impl DdnsMetrics {
    pub fn new() -> Self {
        let m = Self::default();
        for kind in DdnsError::KINDS {
            m.error
                .get_or_create(&ErrorLabels {
                    kind: kind.to_owned(),
                })
                .set(0);
        }
        for t in RecordType::ALL {
            m.set_records(t, 0);
        }
        m
    }

    /// Registers every metric under its full `vpn_router_ddns_...` name.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vpn_router_ddns_updates",
            "DDNS update attempts, by provider and result (written, unchanged, failed)",
            self.updates.clone(),
        );
        registry.register(
            "vpn_router_ddns_records",
            "Records the DDNS provider holds for the name after the last successful update, by record type",
            self.records.clone(),
        );
        registry.register(
            "vpn_router_ddns_last_success_timestamp_seconds",
            "Unix time of the last successful DDNS update (written or confirmed unchanged)",
            self.last_success.clone(),
        );
        registry.register(
            "vpn_router_ddns_error",
            "1 for the kind of the error the last DDNS update failed with, 0 otherwise",
            self.error.clone(),
        );
        registry.register(
            "vpn_router_ddns_writer",
            "1 while this router writes the DDNS name (it is master of ddns.only_when_master)",
            self.writer.clone(),
        );
    }

    pub(crate) fn count_update(&self, provider: &str, result: &str) {
        self.updates
            .get_or_create(&UpdateLabels {
                provider: provider.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    pub(crate) fn set_records(&self, rtype: RecordType, n: usize) {
        self.records
            .get_or_create(&RecordTypeLabels {
                record_type: rtype.as_str().to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets the current error (`None`: no error).
    pub(crate) fn set_error_message(&self, error: Option<&DdnsError>) {
        self.set_error(error.map(DdnsError::kind));
        let mut m = match self.last_error_message.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *m = error.map(|e| e.to_string());
    }

    /// The message of the error the last attempt failed with (for /status and tests).
    pub fn last_error(&self) -> Option<String> {
        match self.last_error_message.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Sets the current error kind (`None`: no error).
    pub(crate) fn set_error(&self, kind: Option<&'static str>) {
        let mut cur = match self.current_error.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(old) = cur.take() {
            self.error
                .get_or_create(&ErrorLabels {
                    kind: old.to_owned(),
                })
                .set(0);
        }
        if let Some(k) = kind {
            self.error
                .get_or_create(&ErrorLabels { kind: k.to_owned() })
                .set(1);
        }
        *cur = kind;
    }

    /// Value of the `updates` counter (tests and /status).
    pub fn updates_count(&self, provider: &str, result: &str) -> u64 {
        self.updates
            .get_or_create(&UpdateLabels {
                provider: provider.to_owned(),
                result: result.to_owned(),
            })
            .get()
    }

    /// Records published by type after the last successful update (for /status).
    pub fn records_published(&self) -> std::collections::BTreeMap<&'static str, i64> {
        RecordType::ALL
            .iter()
            .map(|t| {
                let g = self.records.get_or_create(&RecordTypeLabels {
                    record_type: t.as_str().to_owned(),
                });
                (t.as_str(), g.get())
            })
            .collect()
    }

    /// The current error kind, if the last attempt failed.
    pub fn current_error(&self) -> Option<&'static str> {
        match self.current_error.lock() {
            Ok(g) => *g,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }
}
