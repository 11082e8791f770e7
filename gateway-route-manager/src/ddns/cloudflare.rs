//! Cloudflare provider: API v4 with a bearer token.
//!
//! Lists the zone's records filtered by type and exact name (every page, `result_info`), and
//! keeps only those whose name and type really match (a filter the API ignores must not make
//! us touch other records). Writes with one call to the batch endpoint
//! (`POST /zones/{zone}/dns_records/batch`: deletes run before posts in one transaction), so
//! the name never holds a half-applied set. A 429 becomes [`DdnsError::RateLimited`] with the
//! `Retry-After` delay; error 81058 "An identical record already exists" means the record is
//! already there: the read-back decides.

use std::collections::BTreeSet;
use std::net::IpAddr;

use hyper::header::AUTHORIZATION;
use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::error::DdnsError;
use super::http::{query_value, rate_limited, ApiClient, Reply};
use super::provider::{Provider, ProviderRecord};
use super::records::RecordType;
use super::{CloudflareSettings, DdnsSettings};

/// The real API; `ddns.provider.cloudflare.api_url` overrides it (tests).
pub const CLOUDFLARE_API_URL: &str = "https://api.cloudflare.com/client/v4";

/// "An identical record already exists." (and 81057 "The record already exists.").
const ALREADY_EXISTS: [i64; 2] = [81057, 81058];
const PER_PAGE: u32 = 100;
/// A name has a handful of records; more pages than this is a server that never says "last".
const MAX_PAGES: u32 = 50;

#[derive(Debug)]
pub struct Cloudflare {
    api: ApiClient,
    zone_id: String,
    hostname: String,
}

#[derive(Debug, Deserialize)]
struct Envelope<T> {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    errors: Vec<ApiMessage>,
    result: Option<T>,
    result_info: Option<ResultInfo>,
}

#[derive(Debug, Deserialize)]
struct ApiMessage {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Deserialize)]
struct ResultInfo {
    #[serde(default)]
    page: u32,
    #[serde(default)]
    total_pages: u32,
}

#[derive(Debug, Deserialize)]
struct DnsRecord {
    id: String,
    #[serde(rename = "type")]
    rtype: String,
    name: String,
    content: String,
    #[serde(default)]
    ttl: Option<u32>,
}

impl Cloudflare {
    pub fn new(settings: &DdnsSettings, p: &CloudflareSettings) -> Result<Self, DdnsError> {
        if p.zone_id.is_empty() || !p.zone_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(DdnsError::Config(format!(
                "cloudflare: zone_id {:?} is not a Cloudflare zone id (32 hex digits, shown on the zone's overview page)",
                p.zone_id
            )));
        }
        let api = ApiClient::new(
            "cloudflare",
            &p.api_url,
            AUTHORIZATION,
            &format!("Bearer {}", p.api_token.expose()),
            settings.request_timeout,
            p.ca_certificates.as_ref(),
        )?;
        Ok(Cloudflare {
            api,
            zone_id: p.zone_id.clone(),
            hostname: settings.hostname.clone(),
        })
    }

    /// Decodes a reply, mapping HTTP and API errors to [`DdnsError`]s that say what to do.
    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        reply: &Reply,
    ) -> Result<Envelope<T>, DdnsError> {
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            return Err(rate_limited("cloudflare", what, reply));
        }
        let env: Option<Envelope<T>> = serde_json::from_slice(&reply.body).ok();
        let errors = env
            .as_ref()
            .map(|e| show_errors(&e.errors))
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&reply.body)
                    .chars()
                    .take(200)
                    .collect()
            });
        match reply.status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(DdnsError::Auth(format!(
                    "cloudflare: {what}: {} {errors}; the API token (ddns.provider.cloudflare.api_token_file) needs Zone:DNS:Edit on zone {}",
                    reply.status, self.zone_id
                )))
            }
            s if !s.is_success() => {
                return Err(DdnsError::Rejected(format!("cloudflare: {what}: {s} {errors}")))
            }
            _ => {}
        }
        let env = env.ok_or_else(|| {
            DdnsError::Protocol(format!(
                "cloudflare: {what}: the answer is not an API v4 envelope: {errors}"
            ))
        })?;
        if !env.success {
            return Err(DdnsError::Rejected(format!("cloudflare: {what}: {errors}")));
        }
        Ok(env)
    }
}

fn show_errors(errors: &[ApiMessage]) -> String {
    let v: Vec<String> = errors
        .iter()
        .map(|e| format!("error {}: {}", e.code, e.message))
        .collect();
    v.join("; ")
}

impl Provider for Cloudflare {
    fn name(&self) -> &'static str {
        "cloudflare"
    }

    async fn read(&self, rtype: RecordType) -> Result<Vec<ProviderRecord>, DdnsError> {
        let mut out = Vec::new();
        let mut page = 1;
        loop {
            let path = format!(
                "/zones/{}/dns_records?type={}&name.exact={}&per_page={PER_PAGE}&page={page}",
                self.zone_id,
                rtype.as_str(),
                query_value(&self.hostname)
            );
            let what = format!("list {} {rtype} records (page {page})", self.hostname);
            let reply = self.api.request(Method::GET, &path, None).await?;
            let env: Envelope<Vec<DnsRecord>> = self.decode(&what, &reply)?;
            let records = env.result.unwrap_or_default();
            let n = records.len();
            for r in records {
                if r.rtype != rtype.as_str()
                    || !r
                        .name
                        .trim_end_matches('.')
                        .eq_ignore_ascii_case(&self.hostname)
                {
                    continue;
                }
                let address: IpAddr = r.content.parse().map_err(|_| {
                    DdnsError::Protocol(format!(
                        "cloudflare: {what}: record {} has content {:?}, not an address",
                        r.id, r.content
                    ))
                })?;
                out.push(ProviderRecord {
                    id: Some(r.id),
                    address,
                    ttl: r.ttl,
                });
            }
            let last = match env.result_info {
                Some(info) => info.total_pages <= info.page.max(page) || n == 0,
                None => true,
            };
            if last {
                return Ok(out);
            }
            page += 1;
            if page > MAX_PAGES {
                return Err(DdnsError::Protocol(format!(
                    "cloudflare: list {} {rtype} records: more than {MAX_PAGES} pages",
                    self.hostname
                )));
            }
        }
    }

    async fn replace(
        &self,
        rtype: RecordType,
        current: &[ProviderRecord],
        wanted: &BTreeSet<IpAddr>,
        ttl: u32,
    ) -> Result<(), DdnsError> {
        // Keep one record per wanted address that already has the right TTL; delete the rest.
        let mut kept = BTreeSet::new();
        let mut deletes = Vec::new();
        for r in current {
            let keep = wanted.contains(&r.address)
                && r.ttl.is_none_or(|t| t == ttl)
                && kept.insert(r.address);
            if !keep {
                if let Some(id) = &r.id {
                    deletes.push(json!({ "id": id }));
                }
            }
        }
        let posts: Vec<_> = wanted
            .iter()
            .filter(|a| !kept.contains(*a))
            .map(|a| {
                json!({
                    "type": rtype.as_str(),
                    "name": self.hostname,
                    "content": a.to_string(),
                    "ttl": ttl,
                    "proxied": false,
                    "comment": "vpn-router ddns",
                })
            })
            .collect();
        if deletes.is_empty() && posts.is_empty() {
            return Ok(());
        }
        let what = format!(
            "batch {} {rtype}: {} deletes, {} posts",
            self.hostname,
            deletes.len(),
            posts.len()
        );
        let body = json!({ "deletes": deletes, "posts": posts });
        let path = format!("/zones/{}/dns_records/batch", self.zone_id);
        let reply = self.api.request(Method::POST, &path, Some(&body)).await?;
        match self.decode::<serde_json::Value>(&what, &reply) {
            Ok(_) => Ok(()),
            Err(DdnsError::Rejected(msg)) => {
                let env: Option<Envelope<serde_json::Value>> =
                    serde_json::from_slice(&reply.body).ok();
                let identical = env.is_some_and(|e| {
                    !e.errors.is_empty()
                        && e.errors.iter().all(|m| ALREADY_EXISTS.contains(&m.code))
                });
                if identical {
                    tracing::debug!(hostname = %self.hostname, "cloudflare: record already exists; reading back");
                    Ok(())
                } else {
                    Err(DdnsError::Rejected(msg))
                }
            }
            Err(e) => Err(e),
        }
    }
}
