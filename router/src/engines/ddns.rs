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
            ca_file,
        } => ProviderSettings::Cloudflare(ddns::CloudflareSettings {
            api_url: api_url
                .clone()
                .unwrap_or_else(|| ddns::CLOUDFLARE_API_URL.to_owned()),
            zone_id: zone_id.clone(),
            api_token: Credential::new(api_token.expose()),
            ca_certificates: ca_file.as_ref().map(|c| c.certificates.clone()),
        }),
        DdnsProvider::Dynu {
            api_key,
            api_url,
            ca_file,
        } => ProviderSettings::Dynu(ddns::DynuSettings {
            api_url: api_url
                .clone()
                .unwrap_or_else(|| ddns::DYNU_API_URL.to_owned()),
            api_key: Credential::new(api_key.expose()),
            ca_certificates: ca_file.as_ref().map(|c| c.certificates.clone()),
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
    // On the board at once, not only at the publisher's first tick: a /status read right after
    // the start must list the engine.
    board.set(
        "ddns",
        ComponentStatus {
            state: ComponentState::Running,
            ready: true,
            detail: serde_json::json!({
                "hostname": hostname,
                "provider": provider,
                "writer": *writer_rx.borrow(),
                "records": metrics.records_published(),
                "last_success_timestamp_seconds": metrics.last_success.get(),
                "error": null,
            }),
        },
    );
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
                ca_file: None,
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
                ca_file: None,
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

    // The `ddns.provider.cloudflare|dynu` keys of issue "what a DDNS provider's API can do":
    // parsed from YAML, then mapped to the library settings.

    /// A self-signed test CA (P-256, valid until 2126): only parsed here, never trusted.
    const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBrjCCAVWgAwIBAgIUMyc0J/PF/VCsfH//MuG5RvEhXTYwCgYIKoZIzj0EAwIw
JDEiMCAGA1UEAwwZdnBuLXJvdXRlciBjb25maWcgdGVzdCBDQTAgFw0yNjEyMDQy
MTE4MTJaGA8yMTI2MTExMDIxMTgxMlowJDEiMCAGA1UEAwwZdnBuLXJvdXRlciBj
b25maWcgdGVzdCBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABAR6L362OQEH
ng9uTvxQBU4m9NbYEZBKPH7CW2iwyf9g0XxslEXkzbLEDs0muefmPxurIlBbZhfW
f4OS5mAkb6SjYzBhMB0GA1UdDgQWBBSBuVFV9/mHoLTJzLnJk/UOY3yMijAfBgNV
HSMEGDAWgBSBuVFV9/mHoLTJzLnJk/UOY3yMijAPBgNVHRMBAf8EBTADAQH/MA4G
A1UdDwEB/wQEAwIBBjAKBggqhkjOPQQDAgNHADBEAiBAXYfDtb72VgM/M7FUJTah
rCEOvoEtroDOXtYPKN417QIgfo6IVYL8coec+hYrHtYbKbNNv9p5C6kutq2sN8VI
LYs=
-----END CERTIFICATE-----
";

    fn scratch(name: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("vpn-router-ddns-cfg-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("token"), "t0ken\n").unwrap();
        d
    }

    /// A config whose provider is `provider` (one YAML flow mapping, on line 6), loaded from
    /// `dir/c.yaml` so relative paths resolve against `dir`.
    fn load(
        dir: &std::path::Path,
        provider: &str,
    ) -> Result<crate::config::Loaded, crate::config::ConfigErrors> {
        let text = format!("gateways: {{ interface: eth1, addresses: 192.168.25.128 }}\nddns:\n  hostname: vpn.example.com\n  provider:\n    # the provider\n    {provider}\n");
        crate::config::load_str(&dir.join("c.yaml"), &text)
    }

    fn errors(dir: &std::path::Path, provider: &str) -> Vec<String> {
        match load(dir, provider) {
            Ok(_) => panic!("accepted: {provider}"),
            Err(e) => e.lines(),
        }
    }

    #[test]
    fn api_url_in_cleartext_only_to_loopback_with_the_position() {
        let dir = scratch("url");
        for ok in [
            "http://127.0.0.1:8080/client/v4",
            "http://[::1]:8080/client/v4",
            "http://localhost:8080/client/v4",
            "https://api.cloudflare.com/client/v4",
        ] {
            let p =
                format!("cloudflare: {{ zone_id: abc, api_token_file: token, api_url: \"{ok}\" }}");
            if let Err(e) = load(&dir, &p) {
                panic!("{ok}: {e}");
            }
        }
        let errs = errors(
            &dir,
            "dynu: { api_key_file: token, api_url: \"http://api.dynu.com/v2\" }",
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        // Line 6, column of the value.
        assert!(
            errs[0].starts_with(&format!(
                "{}:6:43: ddns.provider.dynu.api_url: ",
                dir.join("c.yaml").display()
            )) && errs[0].contains("cleartext")
                && errs[0].contains("loopback")
                && errs[0].contains("use https://"),
            "{errs:?}"
        );
        let errs = errors(
            &dir,
            "cloudflare: { zone_id: abc, api_token_file: token, api_url: \"http://10.0.0.8/client/v4\" }",
        );
        assert!(errs[0].contains("10.0.0.8 is not one"), "{errs:?}");
    }

    #[test]
    fn ca_file_is_read_at_load_and_reaches_the_provider_settings() {
        let dir = scratch("ca");
        std::fs::write(dir.join("proxy-ca.pem"), TEST_CA_PEM).unwrap();
        std::fs::write(dir.join("not-pem.txt"), "hello\n").unwrap();
        let c = dir.join("c.yaml").display().to_string();

        // Relative to the config file; reaches the library as its trust anchors.
        let loaded = load(
            &dir,
            "cloudflare: { zone_id: abc, api_token_file: token, ca_file: proxy-ca.pem }",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let d = loaded.config.ddns.unwrap();
        let json = serde_json::to_string(&d.provider).unwrap();
        assert!(
            json.contains("proxy-ca.pem (1 certificate(s), fingerprint "),
            "{json}"
        );
        match &settings(&d, SystemTime::UNIX_EPOCH).provider {
            ProviderSettings::Cloudflare(p) => {
                assert_eq!(p.ca_certificates.as_ref().map(|c| c.len()), Some(1))
            }
            p => panic!("{p:?}"),
        }
        let loaded = load(&dir, "dynu: { api_key_file: token, ca_file: proxy-ca.pem }").unwrap();
        match &settings(&loaded.config.ddns.unwrap(), SystemTime::UNIX_EPOCH).provider {
            ProviderSettings::Dynu(p) => assert!(p.ca_certificates.is_some()),
            p => panic!("{p:?}"),
        }
        // Unset: the Mozilla roots.
        let loaded = load(&dir, "dynu: { api_key_file: token }").unwrap();
        match &settings(&loaded.config.ddns.unwrap(), SystemTime::UNIX_EPOCH).provider {
            ProviderSettings::Dynu(p) => assert!(p.ca_certificates.is_none()),
            p => panic!("{p:?}"),
        }

        // Missing and unparsable files are config errors at the value's position.
        let errs = errors(&dir, "dynu: { api_key_file: token, ca_file: missing.pem }");
        assert!(
            errs[0].starts_with(&format!(
                "{c}:6:43: ddns.provider.dynu.ca_file: cannot read "
            )) && errs[0].contains("missing.pem")
                && errs[0].contains("expected a readable PEM file"),
            "{errs:?}"
        );
        let errs = errors(
            &dir,
            "cloudflare: { zone_id: abc, api_token_file: token, ca_file: not-pem.txt }",
        );
        assert!(
            errs[0].starts_with(&format!("{c}:6:65: ddns.provider.cloudflare.ca_file: "))
                && errs[0].contains("not-pem.txt")
                && errs[0].contains("BEGIN CERTIFICATE"),
            "{errs:?}"
        );
    }
}
