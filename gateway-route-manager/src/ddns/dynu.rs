//! Dynu provider: API v2 with the `API-Key` header.
//!
//! `GET /dns/getroot/{hostname}` gives the domain id and the node (the part of the name left
//! of the domain; empty for the apex), kept after the first success. Records are listed with
//! `GET /dns/{id}/record` and only those of that node and type are used; changes are `POST
//! /dns/{id}/record` (adds first, so the name is never empty during a change) and `DELETE
//! /dns/{id}/record/{recordId}`. Dynu reports some errors inside a 200 answer (a JSON
//! `statusCode` other than 200, with `type` and `message`): every answer is checked for it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use hyper::header::HeaderName;
use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Mutex;

use super::error::DdnsError;
use super::http::{query_value, rate_limited, ApiClient, Reply};
use super::provider::{Provider, ProviderRecord};
use super::records::RecordType;
use super::{DdnsSettings, DynuSettings};

/// The real API; `ddns.provider.dynu.api_url` overrides it (tests).
pub const DYNU_API_URL: &str = "https://api.dynu.com/v2";

#[derive(Debug)]
pub struct Dynu {
    api: ApiClient,
    hostname: String,
    root: Mutex<Option<Root>>,
}

#[derive(Debug, Clone, Deserialize)]
struct Root {
    id: i64,
    #[serde(default)]
    node: String,
    #[serde(default, rename = "domainName")]
    domain_name: String,
}

#[derive(Debug, Deserialize)]
struct Status {
    #[serde(rename = "statusCode")]
    status_code: Option<i64>,
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
    exception: Option<Exception>,
}

#[derive(Debug, Deserialize)]
struct Exception {
    #[serde(rename = "statusCode")]
    status_code: Option<i64>,
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RecordList {
    #[serde(default, rename = "dnsRecords")]
    dns_records: Vec<DynuRecord>,
}

#[derive(Debug, Deserialize)]
struct DynuRecord {
    id: i64,
    #[serde(default, rename = "nodeName")]
    node_name: String,
    #[serde(default, rename = "recordType")]
    record_type: String,
    #[serde(default)]
    ttl: Option<u32>,
    #[serde(default, rename = "ipv4Address")]
    ipv4_address: Option<String>,
    #[serde(default, rename = "ipv6Address")]
    ipv6_address: Option<String>,
    #[serde(default)]
    content: Option<String>,
}

impl Dynu {
    pub fn new(settings: &DdnsSettings, p: &DynuSettings) -> Result<Self, DdnsError> {
        let api = ApiClient::new(
            "dynu",
            &p.api_url,
            HeaderName::from_static("api-key"),
            p.api_key.expose(),
            settings.request_timeout,
            p.ca_certificates.as_ref(),
        )?;
        Ok(Dynu {
            api,
            hostname: settings.hostname.clone(),
            root: Mutex::new(None),
        })
    }

    /// Checks the HTTP status and the `statusCode` inside the body, then decodes.
    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        reply: &Reply,
    ) -> Result<T, DdnsError> {
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            return Err(rate_limited("dynu", what, reply));
        }
        let text = || {
            String::from_utf8_lossy(&reply.body)
                .chars()
                .take(200)
                .collect::<String>()
        };
        let status: Option<Status> = serde_json::from_slice(&reply.body).ok();
        let (code, kind, message) = match &status {
            Some(s) => match &s.exception {
                Some(e) => (
                    e.status_code.or(s.status_code),
                    e.kind.clone(),
                    e.message.clone(),
                ),
                None => (s.status_code, s.kind.clone(), s.message.clone()),
            },
            None => (None, None, None),
        };
        let http = reply.status.as_u16();
        let inner = code.unwrap_or(i64::from(http));
        if reply.status.is_success() && (inner == 200 || code.is_none()) {
            return serde_json::from_slice(&reply.body).map_err(|e| {
                DdnsError::Protocol(format!("dynu: {what}: unexpected answer ({e}): {}", text()))
            });
        }
        let detail = format!(
            "{}{}: {}",
            if inner == i64::from(http) {
                format!("{http}")
            } else {
                format!("HTTP {http}, statusCode {inner}")
            },
            kind.as_deref().map(|k| format!(" {k}")).unwrap_or_default(),
            message.unwrap_or_else(text)
        );
        let is_auth = matches!(inner, 401 | 403)
            || matches!(http, 401 | 403)
            || kind
                .as_deref()
                .is_some_and(|k| k.to_ascii_lowercase().contains("authentication"));
        if is_auth {
            Err(DdnsError::Auth(format!(
                "dynu: {what}: {detail}; check the API key in ddns.provider.dynu.api_key_file"
            )))
        } else {
            Err(DdnsError::Rejected(format!("dynu: {what}: {detail}")))
        }
    }

    async fn root(&self) -> Result<Root, DdnsError> {
        let mut cached = self.root.lock().await;
        if let Some(r) = cached.as_ref() {
            return Ok(r.clone());
        }
        let what = format!("getroot {}", self.hostname);
        let path = format!("/dns/getroot/{}", query_value(&self.hostname));
        let reply = self.api.request(Method::GET, &path, None).await?;
        let root: Root = self.decode(&what, &reply)?;
        tracing::debug!(hostname = %self.hostname, domain = %root.domain_name, id = root.id, node = %root.node, "dynu: domain of the name");
        *cached = Some(root.clone());
        Ok(root)
    }
}

impl Provider for Dynu {
    fn name(&self) -> &'static str {
        "dynu"
    }

    async fn read(&self, rtype: RecordType) -> Result<Vec<ProviderRecord>, DdnsError> {
        let root = self.root().await?;
        let what = format!("list records of {} (domain id {})", self.hostname, root.id);
        let reply = self
            .api
            .request(Method::GET, &format!("/dns/{}/record", root.id), None)
            .await?;
        let list: RecordList = self.decode(&what, &reply)?;
        let mut out = Vec::new();
        for r in list.dns_records {
            if r.record_type != rtype.as_str() || !r.node_name.eq_ignore_ascii_case(&root.node) {
                continue;
            }
            let text = match rtype {
                RecordType::A => r.ipv4_address.clone(),
                RecordType::Aaaa => r.ipv6_address.clone(),
            }
            .or(r.content.clone())
            .unwrap_or_default();
            let address: IpAddr = text.trim().parse().map_err(|_| {
                DdnsError::Protocol(format!(
                    "dynu: {what}: record {} has address {text:?}",
                    r.id
                ))
            })?;
            out.push(ProviderRecord {
                id: Some(r.id.to_string()),
                address,
                ttl: r.ttl,
            });
        }
        Ok(out)
    }

    async fn replace(
        &self,
        rtype: RecordType,
        current: &[ProviderRecord],
        wanted: &BTreeSet<IpAddr>,
        ttl: u32,
    ) -> Result<(), DdnsError> {
        let root = self.root().await?;
        let mut kept = BTreeSet::new();
        let mut deletes = Vec::new();
        for r in current {
            let keep = wanted.contains(&r.address)
                && r.ttl.is_none_or(|t| t == ttl)
                && kept.insert(r.address);
            if !keep {
                if let Some(id) = &r.id {
                    deletes.push(id.clone());
                }
            }
        }
        for a in wanted.iter().filter(|a| !kept.contains(*a)) {
            let field = match a {
                IpAddr::V4(_) => "ipv4Address",
                IpAddr::V6(_) => "ipv6Address",
            };
            let body = json!({
                "nodeName": root.node,
                "recordType": rtype.as_str(),
                "ttl": ttl,
                "state": true,
                "group": "",
                field: a.to_string(),
            });
            let what = format!("add {} {rtype} {a}", self.hostname);
            let reply = self
                .api
                .request(
                    Method::POST,
                    &format!("/dns/{}/record", root.id),
                    Some(&body),
                )
                .await?;
            self.decode::<serde_json::Value>(&what, &reply)?;
        }
        for id in deletes {
            let what = format!("delete {} {rtype} record {id}", self.hostname);
            let reply = self
                .api
                .request(
                    Method::DELETE,
                    &format!("/dns/{}/record/{id}", root.id),
                    None,
                )
                .await?;
            self.decode::<serde_json::Value>(&what, &reply)?;
        }
        Ok(())
    }
}
