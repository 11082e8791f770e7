//! The DDNS engine: maps the `ddns` section to `gateway_route_manager::ddns::DdnsSettings`,
//! turns the VRRP roles into "this router writes" (`only_when_master`: the master of that
//! instance writes; unset: every router writes) and runs the DDNS task on the daemon-wide
//! healthy set. Owns the status board entry `ddns`. It decides nothing about records: that is
//! the library's job.

use std::time::{Duration, SystemTime};

use gateway_route_manager::ddns::{self, Credential, DdnsMetrics, DdnsSettings, ProviderSettings};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Roles, Shared};
use crate::config::{Config, Ddns, DdnsProvider, TsigAlgorithm};
use crate::status::{ComponentState, ComponentStatus};

/// Wall-clock start for the last-success timestamp metric (the library reads only tokio's
/// clock).
#[allow(clippy::disallowed_methods)]
fn wall_clock_now() -> SystemTime {
    SystemTime::now()
}

/// The library settings for `d`.
pub(super) fn settings(d: &Ddns, wall_clock_at_start: SystemTime) -> DdnsSettings {
    let provider = match &d.provider {
        DdnsProvider::Rfc2136 {
            server,
            zone,
            key_name,
            key_algorithm,
            key_secret,
        } => ProviderSettings::Rfc2136(ddns::Rfc2136Settings {
            server: *server,
            zone: zone.clone(),
            key_name: key_name.clone(),
            key_algorithm: match key_algorithm {
                TsigAlgorithm::HmacSha256 => ddns::TsigAlgorithm::HmacSha256,
                TsigAlgorithm::HmacSha512 => ddns::TsigAlgorithm::HmacSha512,
            },
            key_secret_base64: Credential::new(key_secret.expose()),
        }),
        DdnsProvider::Cloudflare {
            zone_id,
            api_token,
            api_url,
        } => ProviderSettings::Cloudflare(ddns::CloudflareSettings {
            api_url: api_url
                .clone()
                .unwrap_or_else(|| ddns::CLOUDFLARE_API_URL.to_owned()),
            zone_id: zone_id.clone(),
            api_token: Credential::new(api_token.expose()),
        }),
        DdnsProvider::Dynu { api_key, api_url } => ProviderSettings::Dynu(ddns::DynuSettings {
            api_url: api_url
                .clone()
                .unwrap_or_else(|| ddns::DYNU_API_URL.to_owned()),
            api_key: Credential::new(api_key.expose()),
        }),
    };
    DdnsSettings::new(
        d.hostname.value.clone(),
        d.ttl,
        usize::try_from(d.max_records).unwrap_or(usize::MAX),
        provider,
        wall_clock_at_start,
    )
}

/// Whether this router writes, given the roles: the master of `only_when_master`, or always
/// when that key is unset.
pub(super) fn is_writer(only_when_master: Option<&str>, roles: &Roles) -> bool {
    match only_when_master {
        None => true,
        Some(name) => roles.get(name) == Some(&::vrrp::State::Master),
    }
}

/// Starts the DDNS task, the roles → writer forwarder and the status publisher.
pub(super) fn start(
    cfg: &Config,
    shared: &Shared,
    metrics: &DdnsMetrics,
    cancel: CancellationToken,
) -> Result<Vec<JoinHandle<()>>, String> {
    let Some(d) = &cfg.ddns else {
        return Ok(Vec::new());
    };
    let settings = settings(d, wall_clock_now());
    let only = d.only_when_master.as_ref().map(|m| m.value.clone());
    let mut roles = shared.roles.clone();
    let (writer_tx, writer_rx) =
        watch::channel(is_writer(only.as_deref(), &roles.borrow_and_update()));
    let mut tasks = Vec::new();
    let c = cancel.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = c.cancelled() => return,
                r = roles.changed() => {
                    if r.is_err() {
                        c.cancelled().await;
                        return;
                    }
                    let w = is_writer(only.as_deref(), &roles.borrow_and_update());
                    writer_tx.send_if_modified(|old| std::mem::replace(old, w) != w);
                }
            }
        }
    }));
    tasks.push(tokio::spawn(ddns::run(
        settings.clone(),
        shared.healthy.clone(),
        writer_rx.clone(),
        metrics.clone(),
        cancel.clone(),
    )));
    let board = shared.board.clone();
    let metrics = metrics.clone();
    let mut writer_rx = writer_rx;
    let hostname = settings.hostname.clone();
    let provider = settings.provider.name();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            // Every second (errors, last success) and at once when the role changes.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
                r = writer_rx.changed() => {
                    if r.is_err() {
                        cancel.cancelled().await;
                        return;
                    }
                }
            }
            if cancel.is_cancelled() {
                // The section was removed or replaced: do not bring the entry back.
                return;
            }
            let error = metrics.last_error();
            board.set(
                "ddns",
                ComponentStatus {
                    state: if error.is_some() {
                        ComponentState::Degraded
                    } else {
                        ComponentState::Running
                    },
                    // A backup never writes and a provider outage must not take the router
                    // out of service: DDNS does not hold readiness back.
                    ready: true,
                    detail: serde_json::json!({
                        "hostname": hostname,
                        "provider": provider,
                        "writer": *writer_rx.borrow_and_update(),
                        "records": metrics.records_published(),
                        "last_success_timestamp_seconds": metrics.last_success.get(),
                        "error": error,
                    }),
                },
            );
        }
    }));
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{At, Secret, SecretSource};

    #[test]
    fn provider_urls_default_to_the_real_apis() {
        let secret = Secret::new("k".into(), SecretSource::Env("K".into()));
        let d = |provider| Ddns {
            hostname: At {
                value: "vpn.example.com".into(),
                at: crate::config::Location { line: 1, column: 1 },
            },
            ttl: Duration::from_secs(60),
            only_when_master: None,
            max_records: 4,
            provider,
        };
        let s = settings(
            &d(DdnsProvider::Cloudflare {
                zone_id: "z".into(),
                api_token: secret.clone(),
                api_url: None,
            }),
            SystemTime::UNIX_EPOCH,
        );
        match &s.provider {
            ProviderSettings::Cloudflare(c) => assert_eq!(c.api_url, ddns::CLOUDFLARE_API_URL),
            p => panic!("{p:?}"),
        }
        let s = settings(
            &d(DdnsProvider::Dynu {
                api_key: secret,
                api_url: Some("http://127.0.0.1:1/v2".into()),
            }),
            SystemTime::UNIX_EPOCH,
        );
        match &s.provider {
            ProviderSettings::Dynu(c) => assert_eq!(c.api_url, "http://127.0.0.1:1/v2"),
            p => panic!("{p:?}"),
        }
        assert_eq!(
            (s.hostname.as_str(), s.max_records, s.ttl_secs()),
            ("vpn.example.com", 4, 60)
        );
    }

    #[test]
    fn writer_follows_the_named_instance_only() {
        let mut roles = Roles::new();
        assert!(is_writer(None, &roles), "no only_when_master: always write");
        assert!(
            !is_writer(Some("router"), &roles),
            "unknown role: do not write"
        );
        roles.insert("router".into(), ::vrrp::State::Backup);
        roles.insert("other".into(), ::vrrp::State::Master);
        assert!(!is_writer(Some("router"), &roles));
        roles.insert("router".into(), ::vrrp::State::Master);
        assert!(is_writer(Some("router"), &roles));
    }
}
