//! The Cloudflare and Dynu providers against local HTTP servers that stand in for the SaaS.
//! The mocks are written from the providers' documented APIs (Cloudflare API v4: list DNS
//! records with `result_info` pagination, `POST .../dns_records/batch`, error 81058 "An
//! identical record already exists.", 429 with `Retry-After`; Dynu API v2: `GET
//! /dns/getroot/{hostname}`, `GET|POST /dns/{id}/record`, `DELETE /dns/{id}/record/{recordId}`,
//! errors reported as a `statusCode` inside HTTP 200 bodies). They are deliberately strict
//! about auth headers and serve other names and types next to ours, so a provider that touches
//! anything else fails the test. The same stand-ins also run behind TLS (rustls) with a test
//! CA and server certificates that Debian's `openssl` makes at test time, and misbehave on
//! request (a huge `Retry-After`, a huge body). Loopback only, no privileges.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::unwrap_used
)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use gateway_route_manager::ddns::{
    self, CaCertificates, CloudflareSettings, Credential, DdnsMetrics, DdnsSettings, DynuSettings,
    ProviderSettings,
};
use gateway_route_manager::health::{HealthyGateway, HealthyGateways};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const HOST: &str = "vpn.example.com";

// ---------------------------------------------------------------------------------------------
// A tiny HTTP server: every request goes to `handle` with the shared state.

type Handler<S> = fn(
    &mut S,
    &str,
    &str,
    &hyper::HeaderMap,
    &[u8],
) -> (StatusCode, Vec<(&'static str, String)>, Value);

/// Serves `handle` on 127.0.0.1: plain HTTP, or HTTPS when `tls` is set (a handshake the
/// client refuses never reaches `handle`).
async fn serve<S: Send + 'static>(
    state: Arc<Mutex<S>>,
    handle: Handler<S>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_connection(TokioIo::new(stream), state, handle).await,
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            serve_connection(TokioIo::new(stream), state, handle).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn serve_connection<S, IO>(io: IO, state: Arc<Mutex<S>>, handle: Handler<S>)
where
    S: Send + 'static,
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let state = state.clone();
        async move {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let headers = req.headers().clone();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let (status, extra, json) = {
                let mut s = state.lock().unwrap();
                handle(&mut s, &method, &uri, &headers, &body)
            };
            let mut resp = Response::builder()
                .status(status)
                .header("content-type", "application/json");
            for (k, v) in extra {
                resp = resp.header(k, v);
            }
            Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(json.to_string()))).unwrap())
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .await;
}

fn query(uri: &str) -> BTreeMap<String, String> {
    uri.split_once('?')
        .map(|(_, q)| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn path(uri: &str) -> &str {
    uri.split('?').next().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Cloudflare API v4 stand-in.

#[derive(Debug, Clone, PartialEq)]
struct CfRecord {
    id: String,
    rtype: String,
    name: String,
    content: String,
    ttl: u32,
}

#[derive(Debug, Default)]
struct Cf {
    token: String,
    zone: String,
    records: Vec<CfRecord>,
    next_id: u32,
    /// Page size cap, whatever `per_page` asks (forces pagination with few records).
    page_cap: usize,
    /// Answer the next N requests with 429 and this Retry-After.
    throttle: u32,
    retry_after_secs: u64,
    /// Before applying the next batch, add its posts as if another writer just did, and fail
    /// the batch with 81058 as Cloudflare does.
    race_identical: bool,
    /// Pad every list answer with this many bytes (a broken or hostile endpoint).
    pad_list_answer: usize,
    list_calls: u32,
    batch_calls: u32,
    request_times: Vec<Instant>,
}

impl Cf {
    fn add(&mut self, rtype: &str, name: &str, content: &str, ttl: u32) {
        self.next_id += 1;
        self.records.push(CfRecord {
            id: format!("{:032x}", self.next_id),
            rtype: rtype.into(),
            name: name.into(),
            content: content.into(),
            ttl,
        });
    }
    fn ours(&self, rtype: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .records
            .iter()
            .filter(|r| r.name == HOST && r.rtype == rtype)
            .map(|r| r.content.clone())
            .collect();
        v.sort();
        v
    }
}

fn cf_error(code: i64, message: &str) -> Value {
    json!({ "success": false, "errors": [{ "code": code, "message": message }], "messages": [], "result": null })
}

fn cloudflare(
    s: &mut Cf,
    method: &str,
    uri: &str,
    headers: &hyper::HeaderMap,
    body: &[u8],
) -> (StatusCode, Vec<(&'static str, String)>, Value) {
    s.request_times.push(Instant::now());
    if s.throttle > 0 {
        s.throttle -= 1;
        return (
            StatusCode::TOO_MANY_REQUESTS,
            vec![("retry-after", s.retry_after_secs.to_string())],
            cf_error(
                971,
                "Please wait and consider throttling your request speed",
            ),
        );
    }
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {}", s.token))
    {
        return (
            StatusCode::FORBIDDEN,
            vec![],
            cf_error(10000, "Authentication error"),
        );
    }
    let base = format!("/client/v4/zones/{}/dns_records", s.zone);
    let p = path(uri);
    if method == "GET" && p == base {
        s.list_calls += 1;
        let q = query(uri);
        let name = q.get("name.exact").or(q.get("name")).cloned();
        let matching: Vec<&CfRecord> = s
            .records
            .iter()
            .filter(|r| {
                q.get("type").is_none_or(|t| *t == r.rtype)
                    && name.as_ref().is_none_or(|n| *n == r.name)
            })
            .collect();
        let per_page: usize = q
            .get("per_page")
            .and_then(|v| v.parse().ok())
            .unwrap_or(100)
            .min(s.page_cap);
        let page: usize = q.get("page").and_then(|v| v.parse().ok()).unwrap_or(1);
        let total_pages = matching.len().div_ceil(per_page).max(1);
        let items: Vec<Value> = matching
            .iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .map(|r| json!({ "id": r.id, "type": r.rtype, "name": r.name, "content": r.content, "ttl": r.ttl, "proxied": false }))
            .collect();
        let count = items.len();
        let mut answer = json!({ "success": true, "errors": [], "messages": [], "result": items,
                    "result_info": { "page": page, "per_page": per_page, "count": count, "total_count": matching.len(), "total_pages": total_pages } });
        if s.pad_list_answer > 0 {
            answer["padding"] = json!("x".repeat(s.pad_list_answer));
        }
        return (StatusCode::OK, vec![], answer);
    }
    if method == "POST" && p == format!("{base}/batch") {
        s.batch_calls += 1;
        let b: Value = serde_json::from_slice(body).unwrap();
        let posts: Vec<Value> = b["posts"].as_array().cloned().unwrap_or_default();
        if std::mem::take(&mut s.race_identical) {
            for r in &posts {
                s.add(
                    r["type"].as_str().unwrap(),
                    r["name"].as_str().unwrap(),
                    r["content"].as_str().unwrap(),
                    r["ttl"].as_u64().unwrap() as u32,
                );
            }
        }
        // One transaction: validate everything first, apply only if all is well.
        let mut after = s.records.clone();
        for d in b["deletes"].as_array().cloned().unwrap_or_default() {
            let id = d["id"].as_str().unwrap_or_default();
            let Some(i) = after.iter().position(|r| r.id == id) else {
                return (
                    StatusCode::BAD_REQUEST,
                    vec![],
                    cf_error(81044, "Record does not exist."),
                );
            };
            after.remove(i);
        }
        for r in &posts {
            let (t, n, c) = (
                r["type"].as_str().unwrap(),
                r["name"].as_str().unwrap(),
                r["content"].as_str().unwrap(),
            );
            if after
                .iter()
                .any(|x| x.rtype == t && x.name == n && x.content == c)
            {
                return (
                    StatusCode::BAD_REQUEST,
                    vec![],
                    cf_error(81058, "An identical record already exists."),
                );
            }
            s.next_id += 1;
            after.push(CfRecord {
                id: format!("{:032x}", s.next_id),
                rtype: t.into(),
                name: n.into(),
                content: c.into(),
                ttl: r["ttl"].as_u64().unwrap() as u32,
            });
        }
        s.records = after;
        return (
            StatusCode::OK,
            vec![],
            json!({ "success": true, "errors": [], "messages": [], "result": { "deletes": [], "posts": posts } }),
        );
    }
    (
        StatusCode::NOT_FOUND,
        vec![],
        cf_error(7003, "Could not route to the requested path"),
    )
}

// ---------------------------------------------------------------------------------------------
// Dynu API v2 stand-in.

#[derive(Debug, Clone)]
struct DynuRecord {
    id: i64,
    node: String,
    rtype: String,
    address: String,
    ttl: u32,
}

#[derive(Debug, Default)]
struct Dy {
    key: String,
    records: Vec<DynuRecord>,
    next_id: i64,
    /// Answer the next POST with HTTP 200 and an error `statusCode` inside, as Dynu does.
    fail_post_in_200: u32,
    errors_served: u32,
    posts: u32,
    deletes: u32,
}

const DYNU_DOMAIN_ID: i64 = 98765;

impl Dy {
    fn add(&mut self, node: &str, rtype: &str, address: &str, ttl: u32) {
        self.next_id += 1;
        self.records.push(DynuRecord {
            id: self.next_id,
            node: node.into(),
            rtype: rtype.into(),
            address: address.into(),
            ttl,
        });
    }
    fn ours(&self, rtype: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .records
            .iter()
            .filter(|r| r.node == "vpn" && r.rtype == rtype)
            .map(|r| r.address.clone())
            .collect();
        v.sort();
        v
    }
}

fn dynu(
    s: &mut Dy,
    method: &str,
    uri: &str,
    headers: &hyper::HeaderMap,
    body: &[u8],
) -> (StatusCode, Vec<(&'static str, String)>, Value) {
    if headers.get("api-key").and_then(|v| v.to_str().ok()) != Some(s.key.as_str()) {
        s.errors_served += 1;
        return (
            StatusCode::OK,
            vec![],
            json!({ "statusCode": 401, "type": "Authentication Exception", "message": "Invalid API credential." }),
        );
    }
    let p = path(uri).trim_start_matches("/v2");
    let records_path = format!("/dns/{DYNU_DOMAIN_ID}/record");
    if method == "GET" && p == format!("/dns/getroot/{HOST}") {
        return (
            StatusCode::OK,
            vec![],
            json!({ "statusCode": 200, "id": DYNU_DOMAIN_ID, "domainName": "example.com", "hostname": HOST, "node": "vpn" }),
        );
    }
    if method == "GET" && p == records_path {
        let recs: Vec<Value> = s
            .records
            .iter()
            .map(|r| {
                let mut v = json!({ "id": r.id, "domainId": DYNU_DOMAIN_ID, "domainName": "example.com", "nodeName": r.node,
                                    "hostname": if r.node.is_empty() { "example.com".to_owned() } else { format!("{}.example.com", r.node) },
                                    "recordType": r.rtype, "ttl": r.ttl, "state": true, "content": format!("{} IN {} {}", r.node, r.rtype, r.address) });
                match r.rtype.as_str() {
                    "A" => v["ipv4Address"] = json!(r.address),
                    "AAAA" => v["ipv6Address"] = json!(r.address),
                    _ => v["textData"] = json!(r.address),
                }
                v
            })
            .collect();
        return (
            StatusCode::OK,
            vec![],
            json!({ "statusCode": 200, "dnsRecords": recs }),
        );
    }
    if method == "POST" && p == records_path {
        s.posts += 1;
        if s.fail_post_in_200 > 0 {
            s.fail_post_in_200 -= 1;
            s.errors_served += 1;
            return (
                StatusCode::OK,
                vec![],
                json!({ "statusCode": 501, "type": "Argument Exception", "message": "The service is temporarily unable to add records." }),
            );
        }
        let b: Value = serde_json::from_slice(body).unwrap();
        let rtype = b["recordType"].as_str().unwrap().to_owned();
        let address = b["ipv4Address"]
            .as_str()
            .or(b["ipv6Address"].as_str())
            .unwrap()
            .to_owned();
        s.add(
            b["nodeName"].as_str().unwrap(),
            &rtype,
            &address,
            b["ttl"].as_u64().unwrap() as u32,
        );
        return (
            StatusCode::OK,
            vec![],
            json!({ "statusCode": 200, "id": s.next_id, "recordType": rtype }),
        );
    }
    if method == "DELETE" {
        if let Some(id) = p
            .strip_prefix(&format!("{records_path}/"))
            .and_then(|i| i.parse::<i64>().ok())
        {
            s.deletes += 1;
            let before = s.records.len();
            s.records.retain(|r| r.id != id);
            if s.records.len() == before {
                return (
                    StatusCode::OK,
                    vec![],
                    json!({ "statusCode": 404, "type": "Not Found Exception", "message": "DNS record not found." }),
                );
            }
            return (StatusCode::OK, vec![], json!({ "statusCode": 200 }));
        }
    }
    (
        StatusCode::NOT_FOUND,
        vec![],
        json!({ "statusCode": 404, "type": "Not Found Exception", "message": "Not found." }),
    )
}

// ---------------------------------------------------------------------------------------------

fn healthy(publics: &[&str]) -> HealthyGateways {
    HealthyGateways {
        complete: true,
        gateways: publics
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    i,
                    HealthyGateway {
                        address: Ipv4Addr::new(192, 168, 25, 128 + i as u8),
                        public_ip: Some(p.parse::<IpAddr>().unwrap()),
                    },
                )
            })
            .collect(),
    }
}

fn settings(provider: ProviderSettings) -> DdnsSettings {
    let mut s = DdnsSettings::new(
        HOST,
        Duration::from_secs(60),
        4,
        provider,
        SystemTime::now(),
    );
    s.debounce = Duration::from_millis(50);
    s.retry_initial = Duration::from_millis(100);
    s.retry_max = Duration::from_millis(400);
    s.resync_interval = Duration::from_millis(300);
    s.request_timeout = Duration::from_secs(2);
    s
}

struct Engine {
    healthy: watch::Sender<HealthyGateways>,
    metrics: DdnsMetrics,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(s: DdnsSettings, set: HealthyGateways) -> Engine {
    let (healthy, rx) = watch::channel(set);
    let (_m, master) = watch::channel(true);
    let metrics = DdnsMetrics::new();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(ddns::run(s, rx, master, metrics.clone(), cancel.clone()));
    Engine {
        healthy,
        metrics,
        cancel,
        task,
    }
}

async fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How the client reaches a stand-in: plain HTTP on 127.0.0.1, or HTTPS with the server's
/// certificate, the host written in `api_url` and the client's `ca_file`.
#[derive(Clone, Default)]
struct Reach {
    tls: Option<tokio_rustls::TlsAcceptor>,
    host: Option<&'static str>,
    ca: Option<CaCertificates>,
}

impl Reach {
    fn base(&self, addr: SocketAddr) -> String {
        match (&self.tls, self.host) {
            (None, _) => format!("http://{addr}"),
            (Some(_), host) => format!("https://{}:{}", host.unwrap_or("127.0.0.1"), addr.port()),
        }
    }
}

async fn cf_server(setup: impl FnOnce(&mut Cf)) -> (Arc<Mutex<Cf>>, ProviderSettings) {
    cf_server_at(setup, Reach::default()).await
}

async fn cf_server_at(
    setup: impl FnOnce(&mut Cf),
    reach: Reach,
) -> (Arc<Mutex<Cf>>, ProviderSettings) {
    let mut cf = Cf {
        token: "cf-token".into(),
        zone: "0123456789abcdef0123456789abcdef".into(),
        page_cap: 2,
        retry_after_secs: 1,
        ..Default::default()
    };
    setup(&mut cf);
    let zone = cf.zone.clone();
    let state = Arc::new(Mutex::new(cf));
    let addr = serve(state.clone(), cloudflare, reach.tls.clone()).await;
    let p = ProviderSettings::Cloudflare(CloudflareSettings {
        api_url: format!("{}/client/v4", reach.base(addr)),
        zone_id: zone,
        api_token: Credential::new("cf-token"),
        ca_certificates: reach.ca,
    });
    (state, p)
}

async fn dynu_server(setup: impl FnOnce(&mut Dy)) -> (Arc<Mutex<Dy>>, ProviderSettings) {
    dynu_server_at(setup, Reach::default()).await
}

async fn dynu_server_at(
    setup: impl FnOnce(&mut Dy),
    reach: Reach,
) -> (Arc<Mutex<Dy>>, ProviderSettings) {
    let mut dy = Dy {
        key: "dynu-key".into(),
        ..Default::default()
    };
    setup(&mut dy);
    let state = Arc::new(Mutex::new(dy));
    let addr = serve(state.clone(), dynu, reach.tls.clone()).await;
    let p = ProviderSettings::Dynu(DynuSettings {
        api_url: format!("{}/v2", reach.base(addr)),
        api_key: Credential::new("dynu-key"),
        ca_certificates: reach.ca,
    });
    (state, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudflare_replaces_paginated_set_in_one_batch_and_leaves_other_records() {
    let (cf, p) = cf_server(|cf| {
        for i in 1..=5 {
            cf.add("A", HOST, &format!("198.51.100.{i}"), 60);
        }
        cf.add("A", HOST, "203.0.113.10", 60);
        cf.add("A", "www.example.com", "198.51.100.80", 300);
        cf.add("TXT", HOST, "\"keep me\"", 300);
    })
    .await;
    let e = start(
        settings(p),
        healthy(&["203.0.113.10", "203.0.113.11", "2001:db8::12"]),
    );
    wait_until("cloudflare holds the set", Duration::from_secs(5), || {
        let s = cf.lock().unwrap();
        s.ours("A") == ["203.0.113.10", "203.0.113.11"] && s.ours("AAAA") == ["2001:db8::12"]
    })
    .await;
    wait_until("update counted", Duration::from_secs(2), || {
        e.metrics.updates_count("cloudflare", "written") == 1
    })
    .await;
    {
        let s = cf.lock().unwrap();
        // 6 stale + kept records over pages of 2: the provider read every page.
        assert!(
            s.list_calls >= 4,
            "pagination not followed: {} list calls",
            s.list_calls
        );
        assert_eq!(s.batch_calls, 2, "one batch per record type");
        assert!(
            s.records.iter().any(|r| r.name == "www.example.com"),
            "another name was touched"
        );
        assert!(
            s.records.iter().any(|r| r.rtype == "TXT"),
            "another type was touched"
        );
    }
    // Resyncs find the set in place and write nothing.
    let batches = cf.lock().unwrap().batch_calls;
    wait_until("two resyncs", Duration::from_secs(3), || {
        e.metrics.updates_count("cloudflare", "unchanged") >= 2
    })
    .await;
    assert_eq!(cf.lock().unwrap().batch_calls, batches, "a resync wrote");
    // A change: gateway 1 leaves.
    e.healthy.send(healthy(&["203.0.113.10"])).unwrap();
    wait_until("cloudflare follows", Duration::from_secs(3), || {
        let s = cf.lock().unwrap();
        s.ours("A") == ["203.0.113.10"] && s.ours("AAAA").is_empty()
    })
    .await;
    assert_eq!(
        e.metrics.updates_count("cloudflare", "failed"),
        0,
        "{:?}",
        e.metrics.last_error()
    );
    e.cancel.cancel();
    e.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudflare_429_waits_for_retry_after() {
    let (cf, p) = cf_server(|cf| cf.throttle = 1).await;
    let e = start(settings(p), healthy(&["203.0.113.10"]));
    // Written and read back: the engine counts the update only after the read-back.
    wait_until(
        "the update is done and the error cleared",
        Duration::from_secs(5),
        || {
            e.metrics.updates_count("cloudflare", "written") == 1
                && e.metrics.current_error().is_none()
        },
    )
    .await;
    assert_eq!(cf.lock().unwrap().ours("A"), ["203.0.113.10"]);
    assert_eq!(e.metrics.updates_count("cloudflare", "failed"), 1);
    let s = cf.lock().unwrap();
    let gap = s.request_times[1] - s.request_times[0];
    assert!(
        gap >= Duration::from_millis(950),
        "retried {gap:?} after a 429 with Retry-After: 1 (backoff alone would be 100 ms)"
    );
    assert_eq!(e.metrics.current_error(), None);
    e.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudflare_identical_record_already_exists_is_done() {
    let (cf, p) = cf_server(|cf| cf.race_identical = true).await;
    let e = start(settings(p), healthy(&["203.0.113.10"]));
    wait_until("update counted", Duration::from_secs(5), || {
        e.metrics.updates_count("cloudflare", "written") == 1
    })
    .await;
    assert_eq!(cf.lock().unwrap().ours("A"), ["203.0.113.10"]);
    assert_eq!(
        e.metrics.updates_count("cloudflare", "failed"),
        0,
        "81058 was treated as a failure: {:?}",
        e.metrics.last_error()
    );
    e.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudflare_bad_token_is_an_auth_error_that_says_what_to_fix() {
    let (cf, p) = cf_server(|cf| cf.token = "another-token".into()).await;
    let e = start(settings(p), healthy(&["203.0.113.10"]));
    wait_until("retries", Duration::from_secs(5), || {
        e.metrics.updates_count("cloudflare", "failed") >= 3
    })
    .await;
    assert_eq!(e.metrics.current_error(), Some("auth"));
    let msg = e.metrics.last_error().unwrap();
    assert!(
        msg.contains("api_token_file") && msg.contains("Authentication error"),
        "{msg}"
    );
    assert!(cf.lock().unwrap().records.is_empty());
    assert!(!e.task.is_finished());
    e.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynu_manages_only_its_node_and_type() {
    let (dy, p) = dynu_server(|d| {
        d.add("vpn", "A", "198.51.100.1", 60);
        d.add("vpn", "A", "203.0.113.10", 60);
        d.add("www", "A", "198.51.100.80", 300);
        d.add("vpn", "TXT", "keep me", 300);
    })
    .await;
    let e = start(settings(p), healthy(&["203.0.113.10", "2001:db8::11"]));
    wait_until("dynu holds the set", Duration::from_secs(5), || {
        let s = dy.lock().unwrap();
        s.ours("A") == ["203.0.113.10"] && s.ours("AAAA") == ["2001:db8::11"]
    })
    .await;
    {
        let s = dy.lock().unwrap();
        assert!(
            s.records.iter().any(|r| r.node == "www"),
            "another node was touched"
        );
        assert!(
            s.records.iter().any(|r| r.rtype == "TXT"),
            "another type was touched"
        );
        assert_eq!(
            (s.posts, s.deletes),
            (1, 1),
            "only the difference is written"
        );
    }
    let posts = dy.lock().unwrap().posts;
    wait_until("two resyncs", Duration::from_secs(3), || {
        e.metrics.updates_count("dynu", "unchanged") >= 2
    })
    .await;
    assert_eq!(dy.lock().unwrap().posts, posts, "a resync wrote");
    e.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynu_error_inside_200_is_detected_and_retried() {
    let (dy, p) = dynu_server(|d| d.fail_post_in_200 = 2).await;
    let e = start(settings(p), healthy(&["203.0.113.10"]));
    wait_until("first failure", Duration::from_secs(5), || {
        e.metrics.updates_count("dynu", "failed") >= 1
    })
    .await;
    let msg = e.metrics.last_error().unwrap_or_default();
    assert!(
        msg.contains("statusCode 501") && msg.contains("Argument Exception"),
        "{msg}"
    );
    wait_until("dynu holds the set", Duration::from_secs(5), || {
        dy.lock().unwrap().ours("A") == ["203.0.113.10"]
    })
    .await;
    wait_until("success", Duration::from_secs(2), || {
        e.metrics.current_error().is_none()
    })
    .await;
    assert_eq!(e.metrics.updates_count("dynu", "failed"), 2);
    e.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynu_bad_key_in_200_is_an_auth_error() {
    let (dy, p) = dynu_server(|d| d.key = "another-key".into()).await;
    let e = start(settings(p), healthy(&["203.0.113.10"]));
    wait_until("retries", Duration::from_secs(5), || {
        e.metrics.updates_count("dynu", "failed") >= 2
    })
    .await;
    assert_eq!(e.metrics.current_error(), Some("auth"));
    let msg = e.metrics.last_error().unwrap();
    assert!(
        msg.contains("api_key_file") && msg.contains("Authentication Exception"),
        "{msg}"
    );
    assert!(dy.lock().unwrap().records.is_empty());
    e.cancel.cancel();
}

// ---------------------------------------------------------------------------------------------
// What a provider's answer can do to the daemon: a huge Retry-After, a huge body.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudflare_429_with_a_huge_retry_after_is_clamped_not_fatal() {
    let (cf, p) = cf_server(|cf| {
        cf.throttle = 1;
        cf.retry_after_secs = u64::MAX;
    })
    .await;
    let e = start(settings(p), healthy(&["203.0.113.10"]));
    wait_until("the 429 is seen", Duration::from_secs(5), || {
        e.metrics.updates_count("cloudflare", "failed") == 1
    })
    .await;
    assert_eq!(e.metrics.current_error(), Some("rate_limited"));
    let msg = e.metrics.last_error().unwrap();
    assert!(
        msg.contains("429") && msg.contains("retry after 900s"),
        "Retry-After not clamped to 15 min: {msg}"
    );
    // A panic in the engine (Instant + Duration overflow) would end the task.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!e.task.is_finished(), "the engine stopped after the 429");
    assert_eq!(
        cf.lock().unwrap().request_times.len(),
        1,
        "retried before the clamped Retry-After"
    );
    e.cancel.cancel();
    e.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_larger_than_the_cap_is_an_error_naming_provider_request_and_limit() {
    let (cf, p) = cf_server(|cf| cf.pad_list_answer = 2 * 1024 * 1024).await;
    let e = start(settings(p), healthy(&["203.0.113.10"]));
    wait_until("retries", Duration::from_secs(5), || {
        e.metrics.updates_count("cloudflare", "failed") >= 2
    })
    .await;
    assert_eq!(e.metrics.current_error(), Some("protocol"));
    let msg = e.metrics.last_error().unwrap();
    assert!(
        msg.starts_with("cloudflare: GET http://127.0.0.1:")
            && msg.contains("/dns_records?type=A")
            && msg.contains(&format!("larger than {} bytes", ddns::MAX_BODY_BYTES)),
        "{msg}"
    );
    assert_eq!(ddns::MAX_BODY_BYTES, 1024 * 1024);
    assert_eq!(
        cf.lock().unwrap().batch_calls,
        0,
        "wrote after a refused read"
    );
    e.cancel.cancel();
}

#[test]
fn the_library_refuses_cleartext_to_a_remote_api() {
    let p = ProviderSettings::Dynu(DynuSettings {
        api_url: "http://api.dynu.com/v2".into(),
        api_key: Credential::new("dynu-key"),
        ca_certificates: None,
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let e = start(settings(p), healthy(&["203.0.113.10"]));
        wait_until("the provider is refused", Duration::from_secs(5), || {
            e.metrics.current_error().is_some()
        })
        .await;
        assert_eq!(e.metrics.current_error(), Some("config"));
        let msg = e.metrics.last_error().unwrap();
        assert!(
            msg.contains("ddns.provider.dynu.api_url") && msg.contains("cleartext"),
            "{msg}"
        );
        e.cancel.cancel();
    });
}

// ---------------------------------------------------------------------------------------------
// HTTPS: a test CA made with Debian's `openssl` at test time, stand-ins behind rustls.

/// A CA, a second CA nobody trusts, and server certificates made with them.
struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("vpn-router-ddns-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir };
        pki.ca("ca");
        pki.ca("rogue-ca");
        pki.leaf("good", "ca", "IP:127.0.0.1,DNS:localhost");
        pki.leaf("rogue", "rogue-ca", "IP:127.0.0.1,DNS:localhost");
        pki.leaf("other-name", "ca", "DNS:api.example.net");
        pki
    }

    fn openssl(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("openssl: {e}; install it with `apt-get install openssl`"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ca(&self, name: &str) {
        std::fs::write(
            self.dir.join(format!("{name}.cnf")),
            format!("[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = v3\n[dn]\nCN = vpn-router test {name}\n[v3]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n"),
        )
        .unwrap();
        self.openssl(&[
            "req",
            "-x509",
            "-config",
            &format!("{name}.cnf"),
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
        ]);
    }

    fn leaf(&self, name: &str, ca: &str, san: &str) {
        std::fs::write(
            self.dir.join(format!("{name}.cnf")),
            format!("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {name}\n"),
        )
        .unwrap();
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!("basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\nsubjectAltName = {san}\n"),
        )
        .unwrap();
        self.openssl(&[
            "req",
            "-new",
            "-config",
            &format!("{name}.cnf"),
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// The trust anchors of a `ca_file` holding `name`.pem, as the router reads it.
    fn ca_file(&self, name: &str) -> CaCertificates {
        CaCertificates::from_pem(&std::fs::read(self.dir.join(format!("{name}.pem"))).unwrap())
            .unwrap()
    }

    /// A TLS server presenting `name`.pem.
    fn acceptor(&self, name: &str) -> tokio_rustls::TlsAcceptor {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(self.dir.join(format!("{name}.pem")))
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
        let key = PrivateKeyDer::from_pem_file(self.dir.join(format!("{name}.key"))).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_ca_file_updates_cloudflare_by_ip_and_dynu_by_name() {
    let pki = Pki::new("ok");
    // Cloudflare at https://127.0.0.1:PORT (the certificate's IP SAN) ...
    let (cf, p) = cf_server_at(
        |_| {},
        Reach {
            tls: Some(pki.acceptor("good")),
            host: Some("127.0.0.1"),
            ca: Some(pki.ca_file("ca")),
        },
    )
    .await;
    let e = start(settings(p), healthy(&["203.0.113.10", "2001:db8::11"]));
    wait_until("cloudflare holds the set", Duration::from_secs(5), || {
        let s = cf.lock().unwrap();
        s.ours("A") == ["203.0.113.10"] && s.ours("AAAA") == ["2001:db8::11"]
    })
    .await;
    wait_until("update counted", Duration::from_secs(2), || {
        e.metrics.updates_count("cloudflare", "written") == 1
    })
    .await;
    assert_eq!(
        e.metrics.updates_count("cloudflare", "failed"),
        0,
        "{:?}",
        e.metrics.last_error()
    );
    e.cancel.cancel();
    // ... and Dynu at https://localhost:PORT (its DNS SAN).
    let (dy, p) = dynu_server_at(
        |_| {},
        Reach {
            tls: Some(pki.acceptor("good")),
            host: Some("localhost"),
            ca: Some(pki.ca_file("ca")),
        },
    )
    .await;
    let e = start(settings(p), healthy(&["203.0.113.10"]));
    wait_until("dynu holds the set", Duration::from_secs(5), || {
        dy.lock().unwrap().ours("A") == ["203.0.113.10"]
    })
    .await;
    wait_until("update counted", Duration::from_secs(2), || {
        e.metrics.updates_count("dynu", "written") == 1
    })
    .await;
    assert_eq!(
        e.metrics.updates_count("dynu", "failed"),
        0,
        "{:?}",
        e.metrics.last_error()
    );
    e.cancel.cancel();
}

/// Runs the engine against a stand-in the client must refuse; returns the error message
/// after at least two attempts (the engine's backoff retries), and checks no request reached
/// the stand-in.
async fn refused_cloudflare(reach: Reach) -> String {
    let (cf, p) = cf_server_at(|_| {}, reach).await;
    let e = start(settings(p), healthy(&["203.0.113.10"]));
    wait_until("retries", Duration::from_secs(5), || {
        e.metrics.updates_count("cloudflare", "failed") >= 2
    })
    .await;
    assert_eq!(e.metrics.current_error(), Some("transport"));
    assert!(!e.task.is_finished());
    {
        let s = cf.lock().unwrap();
        assert!(s.records.is_empty(), "written through a refused connection");
        assert_eq!(
            (s.list_calls, s.batch_calls),
            (0, 0),
            "a request reached the server"
        );
    }
    e.cancel.cancel();
    e.metrics.last_error().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_certificate_not_signed_by_the_ca_is_refused_and_retried() {
    let pki = Pki::new("rogue");
    let msg = refused_cloudflare(Reach {
        tls: Some(pki.acceptor("rogue")),
        host: Some("127.0.0.1"),
        ca: Some(pki.ca_file("ca")),
    })
    .await;
    assert!(
        msg.contains("certificate is not signed by a trusted CA")
            && msg.contains("ddns.provider.cloudflare.ca_file"),
        "{msg}"
    );
    // Without ca_file the Mozilla roots are the anchors: the test CA is not among them, and
    // the message says what would make it trusted.
    let msg = refused_cloudflare(Reach {
        tls: Some(pki.acceptor("good")),
        host: Some("127.0.0.1"),
        ca: None,
    })
    .await;
    assert!(
        msg.contains("not signed by a trusted CA")
            && msg.contains("Mozilla root CAs")
            && msg.contains("set ddns.provider.cloudflare.ca_file"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_certificate_for_another_hostname_is_refused_and_retried() {
    let pki = Pki::new("name");
    let msg = refused_cloudflare(Reach {
        tls: Some(pki.acceptor("other-name")),
        host: Some("127.0.0.1"),
        ca: Some(pki.ca_file("ca")),
    })
    .await;
    assert!(
        msg.contains("certificate is not valid for the hostname 127.0.0.1")
            && msg.contains("ddns.provider.cloudflare.api_url"),
        "{msg}"
    );
    // The same by name: a certificate for api.example.net does not cover localhost.
    let msg = refused_cloudflare(Reach {
        tls: Some(pki.acceptor("other-name")),
        host: Some("localhost"),
        ca: Some(pki.ca_file("ca")),
    })
    .await;
    assert!(
        msg.contains("certificate is not valid for the hostname localhost"),
        "{msg}"
    );
}
