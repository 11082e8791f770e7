//! The HTTPS client of the API providers (Cloudflare, Dynu): hyper 1 with rustls and the
//! Mozilla root store (webpki-roots), so the daemon does not depend on the image's CA bundle,
//! or only the CA certificates of `ca_file` when one is set. Plain `http://` is accepted only
//! to a loopback host (a local test server): the credential must not cross a network in
//! cleartext.
//!
//! What an answer can do to the daemon is bounded here: the body is read up to
//! [`MAX_BODY_BYTES`], the whole exchange within the request timeout, and `Retry-After` is
//! clamped to [`MAX_RETRY_AFTER`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::header::{HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, DATE, RETRY_AFTER, USER_AGENT};
use hyper::{HeaderMap, Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::error::DdnsError;
use super::tls::{handshake_problem, CaCertificates};

/// The longest wait a provider's `Retry-After` can impose. The header comes from the network:
/// `u64::MAX` seconds overflowed the engine's deadline arithmetic (a panic, and the release
/// build aborts on panic), and a merely huge value stopped DDNS until a restart. Cloudflare
/// counts its API rate limit over 5-minute windows, so 15 minutes is three whole windows: more
/// than an honest provider asks, short enough that the name follows the gateways again soon.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// The largest answer body read from a provider. An answer about one name is a few KB (even
/// a full Cloudflare page of 100 records, a few hundred bytes each, stays in the tens of KB);
/// 1 MiB leaves room for that and keeps a broken or hostile endpoint from filling the
/// router's memory.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Without a usable `Retry-After` a 429 waits this long (or the backoff, if longer).
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why an `api_url` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiUrlError {
    #[error("not an API base URL; expected https://host/path (no user, query or fragment)")]
    NotAnApiUrl,
    #[error("http:// would send the API credential in cleartext, so it is accepted only for a loopback host (127.0.0.0/8, [::1], localhost) such as a local test server, and {host} is not one; use https://")]
    CleartextToRemoteHost { host: String },
}

/// Checks a provider's API base URL: `https://` with a host, or `http://` to a loopback host
/// only; no userinfo, query or fragment. The config parser and [`ApiClient`] both call it.
pub fn check_api_url(url: &str) -> Result<(), ApiUrlError> {
    let uri: Uri = url.parse().map_err(|_| ApiUrlError::NotAnApiUrl)?;
    let host = uri.host().unwrap_or_default();
    let userinfo = uri.authority().is_some_and(|a| a.as_str().contains('@'));
    if host.is_empty() || userinfo || uri.query().is_some() || url.contains(['#', ' ']) {
        return Err(ApiUrlError::NotAnApiUrl);
    }
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if is_loopback_host(host) => Ok(()),
        Some("http") => Err(ApiUrlError::CleartextToRemoteHost {
            host: host.to_owned(),
        }),
        _ => Err(ApiUrlError::NotAnApiUrl),
    }
}

/// 127.0.0.0/8, `::1` (written `[::1]` in a URL) or the name `localhost` (RFC 6761 §6.3: it
/// resolves to loopback). Nothing that needs a resolver to tell.
fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => bare.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
    }
}

/// `Retry-After` (RFC 9110 §10.2.3), clamped to [`MAX_RETRY_AFTER`]: the wait, and whether
/// the server asked for more. delay-seconds with more digits than a u64 holds is "very long"
/// too. An HTTP-date is taken relative to the answer's own `Date` header: both are the
/// server's clock, so our clock's skew does not matter (and library code does not read the
/// wall clock). A date without `Date`, or anything unreadable, gives `None`: the caller's
/// default applies.
pub(crate) fn parse_retry_after(headers: &HeaderMap) -> Option<(Duration, bool)> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let asked = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        let date = headers.get(DATE)?.to_str().ok()?;
        let now = httpdate::parse_http_date(date.trim()).ok()?;
        // A date in the past: retry now (the engine still waits its backoff).
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some((asked.min(MAX_RETRY_AFTER), asked > MAX_RETRY_AFTER))
}

/// What a request returned.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: StatusCode,
    /// `Retry-After`, when present and readable, at most [`MAX_RETRY_AFTER`].
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

pub(crate) struct ApiClient {
    provider: &'static str,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    /// The host of `base`, for TLS error messages.
    host: String,
    own_ca: bool,
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
    /// never shows it. `ca`, when set, replaces the Mozilla roots as the trust anchors.
    pub fn new(
        provider: &'static str,
        base: &str,
        auth_name: HeaderName,
        auth_value: &str,
        timeout: Duration,
        ca: Option<&CaCertificates>,
    ) -> Result<Self, DdnsError> {
        let base = base.trim_end_matches('/').to_owned();
        // The config parser checks the same; this holds for any caller of the library.
        check_api_url(&base).map_err(|e| {
            DdnsError::Config(format!(
                "{provider}: ddns.provider.{provider}.api_url {base:?}: {e}"
            ))
        })?;
        let host = base
            .parse::<Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_owned))
            .unwrap_or_default();
        let mut value = HeaderValue::from_str(auth_value).map_err(|_| {
            DdnsError::Config(format!(
                "{provider}: the credential contains characters not allowed in an HTTP header; check the secret file"
            ))
        })?;
        value.set_sensitive(true);
        // ring, named here rather than taken as the process default: building the client
        // cannot then depend on (or panic over) what else installed a default.
        let crypto = Arc::new(rustls::crypto::ring::default_provider());
        let tls_error =
            |e: rustls::Error| DdnsError::Config(format!("{provider}: cannot set up TLS: {e}"));
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match ca {
            None => builder
                .with_provider_and_webpki_roots(crypto)
                .map_err(tls_error)?,
            Some(ca) => builder.with_tls_config(
                rustls::ClientConfig::builder_with_provider(crypto)
                    .with_safe_default_protocol_versions()
                    .map_err(tls_error)?
                    .with_root_certificates(ca.root_store())
                    .with_no_client_auth(),
            ),
        };
        let https = builder.https_or_http().enable_http1().build();
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(ApiClient {
            provider,
            http,
            base,
            host,
            own_ca: ca.is_some(),
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
                let key = format!("ddns.provider.{}", self.provider);
                let detail = handshake_problem(&e, &key, &self.host, self.own_ca)
                    .unwrap_or_else(|| error_chain(&e));
                DdnsError::Transport(format!("{}: {what}: {detail}", self.provider))
            })?;
            let status = resp.status();
            let retry_after = parse_retry_after(resp.headers()).map(|(wait, clamped)| {
                if clamped {
                    let asked = resp.headers().get(RETRY_AFTER);
                    tracing::warn!(provider = self.provider, request = %what, retry_after = ?asked, "ddns: Retry-After is longer than {}; waiting {} instead", humantime::format_duration(MAX_RETRY_AFTER), humantime::format_duration(wait));
                }
                wait
            });
            let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<LengthLimitError>().is_some() {
                        DdnsError::Protocol(format!(
                            "{}: {what}: the answer is larger than {MAX_BODY_BYTES} bytes, the most read from a provider (an answer about one name is a few KB); check that ddns.provider.{}.api_url points at the provider's API",
                            self.provider, self.provider
                        ))
                    } else {
                        DdnsError::Transport(format!(
                            "{}: {what}: reading the body: {e}",
                            self.provider
                        ))
                    }
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
        retry_after: reply.retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(retry_after: &str, date: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(retry_after).unwrap());
        if let Some(d) = date {
            h.insert(DATE, HeaderValue::from_str(d).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_is_clamped_to_fifteen_minutes() {
        let r = |v: &str| parse_retry_after(&headers(v, None));
        assert_eq!(r("120"), Some((Duration::from_secs(120), false)));
        assert_eq!(r(" 0 "), Some((Duration::ZERO, false)));
        assert_eq!(r("900"), Some((MAX_RETRY_AFTER, false)));
        assert_eq!(r("901"), Some((MAX_RETRY_AFTER, true)));
        assert_eq!(r("18446744073709551615"), Some((MAX_RETRY_AFTER, true)));
        // More digits than a u64 holds is still a (very long) number of seconds.
        assert_eq!(r("99999999999999999999999"), Some((MAX_RETRY_AFTER, true)));
        assert_eq!(r("-1"), None);
        assert_eq!(r("soon"), None);
        assert_eq!(MAX_RETRY_AFTER, Duration::from_secs(900));
    }

    #[test]
    fn retry_after_as_an_http_date_is_relative_to_the_answers_date() {
        let now = "Sun, 06 Nov 1994 08:49:37 GMT";
        let r = |v: &str, d: Option<&str>| parse_retry_after(&headers(v, d));
        assert_eq!(
            r("Sun, 06 Nov 1994 08:51:37 GMT", Some(now)),
            Some((Duration::from_secs(120), false))
        );
        assert_eq!(
            r("Mon, 07 Nov 1994 08:49:37 GMT", Some(now)),
            Some((MAX_RETRY_AFTER, true))
        );
        assert_eq!(
            r("Sun, 06 Nov 1994 08:00:00 GMT", Some(now)),
            Some((Duration::ZERO, false)),
            "a date in the past: now"
        );
        assert_eq!(
            r("Sun, 06 Nov 1994 08:51:37 GMT", None),
            None,
            "no Date: the default"
        );
    }

    #[test]
    fn cleartext_http_only_to_loopback() {
        for ok in [
            "https://api.cloudflare.com/client/v4",
            "https://127.0.0.1:8443",
            "http://127.0.0.1:8080/client/v4",
            "http://127.3.4.5/v2",
            "http://[::1]:8080/v2",
            "http://localhost:8080",
            "http://LOCALHOST./v2",
        ] {
            assert_eq!(check_api_url(ok), Ok(()), "{ok}");
        }
        for (bad, host) in [
            ("http://api.dynu.com/v2", "api.dynu.com"),
            ("http://192.168.1.10:8080/v2", "192.168.1.10"),
            ("http://[::ffff:127.0.0.1]/v2", "[::ffff:127.0.0.1]"),
            ("http://localhost.example.com/", "localhost.example.com"),
            ("http://0.0.0.0:8080/", "0.0.0.0"),
        ] {
            assert_eq!(
                check_api_url(bad),
                Err(ApiUrlError::CleartextToRemoteHost { host: host.into() }),
                "{bad}"
            );
        }
        for bad in [
            "ftp://example.com",
            "api.cloudflare.com",
            "https://",
            "https://example.com/v4?x=1",
            "https://example.com/v4#frag",
            "http://127.0.0.1@evil.example/",
        ] {
            assert_eq!(check_api_url(bad), Err(ApiUrlError::NotAnApiUrl), "{bad}");
        }
        let msg = check_api_url("http://api.dynu.com/v2")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("cleartext") && msg.contains("use https://"),
            "{msg}"
        );
    }
}
