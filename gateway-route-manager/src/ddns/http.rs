//! The HTTPS client of the API providers (Cloudflare, Dynu): hyper 1 with rustls and the
//! Mozilla root store (webpki-roots), so the daemon does not depend on the image's CA bundle.
//! Plain `http://` base URLs are accepted too: the tests point the providers at local servers.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::error::DdnsError;

/// What a request returned.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: StatusCode,
    /// `Retry-After` in seconds, when present and numeric.
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

pub(crate) struct ApiClient {
    provider: &'static str,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    auth: (HeaderName, HeaderValue),
    timeout: Duration,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("provider", &self.provider)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// `auth` is the one header that carries the credential; it is marked sensitive so hyper
    /// never shows it.
    pub fn new(
        provider: &'static str,
        base: &str,
        auth_name: HeaderName,
        auth_value: &str,
        timeout: Duration,
    ) -> Result<Self, DdnsError> {
        let base = base.trim_end_matches('/').to_owned();
        if base.parse::<hyper::Uri>().is_err()
            || !(base.starts_with("https://") || base.starts_with("http://"))
        {
            return Err(DdnsError::Config(format!(
                "{provider}: api_url {base:?} is not an http(s) URL"
            )));
        }
        let mut value = HeaderValue::from_str(auth_value).map_err(|_| {
            DdnsError::Config(format!(
                "{provider}: the credential contains characters not allowed in an HTTP header; check the secret file"
            ))
        })?;
        value.set_sensitive(true);
        // Only the ring provider is compiled in (see the workspace's hyper-rustls features), so
        // rustls picks it as the process default.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(ApiClient {
            provider,
            http,
            base,
            auth: (auth_name, value),
            timeout,
        })
    }

    /// One request to `base + path`; the body, if any, is sent as JSON.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, DdnsError> {
        let url = format!("{}{path}", self.base);
        let what = format!("{} {}{path}", method, self.base);
        let mut req = Request::builder()
            .method(method)
            .uri(url.as_str())
            .header(USER_AGENT, "vpn-router")
            .header(ACCEPT, "application/json")
            .header(self.auth.0.clone(), self.auth.1.clone());
        let payload = match body {
            Some(b) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(payload)).map_err(|e| {
            DdnsError::Config(format!(
                "{}: {what}: cannot build the request: {e}",
                self.provider
            ))
        })?;
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| {
                DdnsError::Transport(format!("{}: {what}: {}", self.provider, error_chain(&e)))
            })?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| {
                    DdnsError::Transport(format!(
                        "{}: {what}: reading the body: {e}",
                        self.provider
                    ))
                })?
                .to_bytes();
            Ok(Reply {
                status,
                retry_after,
                body,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(DdnsError::Transport(format!(
                "{}: {what}: no answer within {:?}",
                self.provider, self.timeout
            ))),
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A 429 as an error (the engine waits `Retry-After`, or its backoff when absent).
pub(crate) fn rate_limited(provider: &str, what: &str, reply: &Reply) -> DdnsError {
    DdnsError::RateLimited {
        message: format!("{provider}: {what}: 429 Too Many Requests"),
        retry_after: reply.retry_after.unwrap_or(Duration::from_secs(5)),
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
pub(crate) fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
