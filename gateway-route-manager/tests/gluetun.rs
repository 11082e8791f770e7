//! The gluetun client and the health checker against a tiny gluetun-like HTTP server on
//! loopback (written here, no privileges needed).

// Test harness helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gateway_route_manager::error::FailureReason;
use gateway_route_manager::gluetun::{ControlAuth, GluetunClient, GluetunSettings, Secret};
use gateway_route_manager::health::{CheckKind, GatewayState, HealthChecker, HealthSettings};
use gateway_route_manager::Metrics;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// path → (status, body, delay)
type Routes = Arc<Mutex<HashMap<String, (u16, String, Duration)>>>;

struct MockGluetun {
    addr: SocketAddr,
    routes: Routes,
    /// Expected `Authorization` or `X-API-Key` header, as (name, value).
    auth: Arc<Mutex<Option<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockGluetun {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockGluetun {
    async fn start(ip: Ipv4Addr, port: u16) -> MockGluetun {
        let listener = TcpListener::bind((ip, port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: Routes = Arc::default();
        let auth: Arc<Mutex<Option<(String, String)>>> = Arc::default();
        let (r, a) = (routes.clone(), auth.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (r, a) = (r.clone(), a.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (r, a) = (r.clone(), a.clone());
                        async move { Ok::<_, Infallible>(answer(&r, &a, &req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MockGluetun {
            addr,
            routes,
            auth,
            task,
        }
    }

    fn set(&self, path: &str, status: u16, body: &str) {
        self.set_delayed(path, status, body, Duration::ZERO);
    }

    fn set_delayed(&self, path: &str, status: u16, body: &str, delay: Duration) {
        self.routes
            .lock()
            .unwrap()
            .insert(path.to_owned(), (status, body.to_owned(), delay));
    }

    fn healthy(&self, ip: &str) {
        self.set("/v1/vpn/status", 200, r#"{"status":"running"}"#);
        self.set(
            "/v1/publicip/ip",
            200,
            &format!(r#"{{"public_ip":"{ip}","country":"X"}}"#),
        );
        self.set("/v1/portforward", 200, r#"{"port":0}"#);
    }
}

async fn answer(
    routes: &Routes,
    auth: &Arc<Mutex<Option<(String, String)>>>,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let expected = auth.lock().unwrap().clone();
    if let Some((name, value)) = expected {
        let got = req
            .headers()
            .get(name.as_str())
            .and_then(|v| v.to_str().ok());
        if got != Some(value.as_str()) {
            return reply(401, "Unauthorized");
        }
    }
    let route = routes.lock().unwrap().get(req.uri().path()).cloned();
    match route {
        Some((status, body, delay)) => {
            tokio::time::sleep(delay).await;
            reply(status, &body)
        }
        None => reply(404, "404 page not found"),
    }
}

fn reply(status: u16, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

fn client(port: u16, auth: Option<ControlAuth>, timeout: Duration) -> GluetunClient {
    GluetunClient::new(GluetunSettings {
        control_port: port,
        health_port: port,
        auth,
        timeout,
    })
}

const GW: Ipv4Addr = Ipv4Addr::LOCALHOST;

#[tokio::test]
async fn running_gateway_answers() {
    let mock = MockGluetun::start(GW, 0).await;
    mock.healthy("203.0.113.7");
    let c = client(mock.addr.port(), None, Duration::from_secs(2));
    c.vpn_status(GW).await.unwrap();
    assert_eq!(c.public_ip(GW).await.unwrap().to_string(), "203.0.113.7");
    assert_eq!(c.forwarded_ports(GW).await.unwrap(), Vec::<u16>::new());
}

#[tokio::test]
async fn connection_refused() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = client(port, None, Duration::from_secs(2))
        .vpn_status(GW)
        .await
        .unwrap_err();
    assert_eq!(err.reason, FailureReason::ConnectionRefused);
    let text = err.to_string();
    assert!(
        text.starts_with("gateway 127.0.0.1: GET /v1/vpn/status: connection refused"),
        "{text}"
    );
}

#[tokio::test]
async fn timeout() {
    let mock = MockGluetun::start(GW, 0).await;
    mock.set_delayed(
        "/v1/vpn/status",
        200,
        r#"{"status":"running"}"#,
        Duration::from_secs(5),
    );
    let c = client(mock.addr.port(), None, Duration::from_millis(200));
    let started = tokio::time::Instant::now();
    let err = c.vpn_status(GW).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::Timeout);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(err.to_string().contains("timed out"));
}

#[tokio::test]
async fn unauthorized_says_what_to_set() {
    let mock = MockGluetun::start(GW, 0).await;
    mock.healthy("203.0.113.7");
    *mock.auth.lock().unwrap() =
        Some(("authorization".into(), "Basic cm91dGVyOnMzY3JldA==".into()));
    let c = client(mock.addr.port(), None, Duration::from_secs(2));
    let err = c.vpn_status(GW).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::Unauthorized);
    assert!(
        err.to_string()
            .contains("set gateways.health.control_server.auth"),
        "{err}"
    );

    // With the right credentials (router:s3cret) it passes.
    let basic = ControlAuth::Basic {
        username: "router".into(),
        password: Secret::new("s3cret"),
    };
    client(mock.addr.port(), Some(basic), Duration::from_secs(2))
        .vpn_status(GW)
        .await
        .unwrap();
}

#[tokio::test]
async fn api_key_header() {
    let mock = MockGluetun::start(GW, 0).await;
    mock.healthy("203.0.113.7");
    *mock.auth.lock().unwrap() = Some(("x-api-key".into(), "k3y".into()));
    let wrong = ControlAuth::ApiKey(Secret::new("nope"));
    let err = client(mock.addr.port(), Some(wrong), Duration::from_secs(2))
        .public_ip(GW)
        .await
        .unwrap_err();
    assert_eq!(err.reason, FailureReason::Unauthorized);
    let right = ControlAuth::ApiKey(Secret::new("k3y"));
    client(mock.addr.port(), Some(right), Duration::from_secs(2))
        .public_ip(GW)
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_json_and_other_statuses() {
    let mock = MockGluetun::start(GW, 0).await;
    mock.set("/v1/vpn/status", 200, "<html>not json</html>");
    mock.set("/v1/publicip/ip", 503, "busy");
    let c = client(mock.addr.port(), None, Duration::from_secs(2));
    let err = c.vpn_status(GW).await.unwrap_err();
    assert!(matches!(err.reason, FailureReason::BadJson(_)), "{err}");
    assert_eq!(
        c.public_ip(GW).await.unwrap_err().reason,
        FailureReason::HttpStatus(503)
    );
    mock.set("/v1/publicip/ip", 200, r#"{"public_ip":"not-an-ip"}"#);
    assert!(matches!(
        c.public_ip(GW).await.unwrap_err().reason,
        FailureReason::BadJson(_)
    ));
}

#[tokio::test]
async fn vpn_not_running() {
    let mock = MockGluetun::start(GW, 0).await;
    let c = client(mock.addr.port(), None, Duration::from_secs(2));
    for status in ["starting", "stopping", "stopped", "crashed", "completed"] {
        mock.set(
            "/v1/vpn/status",
            200,
            &format!(r#"{{"status":"{status}"}}"#),
        );
        let err = c.vpn_status(GW).await.unwrap_err();
        assert_eq!(err.reason, FailureReason::VpnNotRunning(status.into()));
    }
}

#[tokio::test]
async fn empty_public_ip() {
    let mock = MockGluetun::start(GW, 0).await;
    mock.set("/v1/publicip/ip", 200, r#"{"public_ip":""}"#);
    let err = client(mock.addr.port(), None, Duration::from_secs(2))
        .public_ip(GW)
        .await
        .unwrap_err();
    assert_eq!(err.reason, FailureReason::EmptyPublicIp);
    assert!(err.to_string().contains("GET /v1/publicip/ip"));
}

#[tokio::test]
async fn port_forward_new_list_and_old_endpoint_fallback() {
    let mock = MockGluetun::start(GW, 0).await;
    let c = client(mock.addr.port(), None, Duration::from_secs(2));
    mock.set("/v1/portforward", 200, r#"{"ports":[6667,6666]}"#);
    assert_eq!(c.forwarded_ports(GW).await.unwrap(), vec![6666, 6667]);
    mock.set("/v1/portforward", 200, r#"{"port":6666}"#);
    assert_eq!(c.forwarded_ports(GW).await.unwrap(), vec![6666]);
    // gluetun v3.41.2+: both keys; "none" with an empty list, or null before it ever ran.
    mock.set("/v1/portforward", 200, r#"{"port":6666,"ports":[6666]}"#);
    assert_eq!(c.forwarded_ports(GW).await.unwrap(), vec![6666]);
    mock.set("/v1/portforward", 200, r#"{"port":0,"ports":[]}"#);
    assert_eq!(c.forwarded_ports(GW).await.unwrap(), Vec::<u16>::new());
    mock.set("/v1/portforward", 200, r#"{"port":0,"ports":null}"#);
    assert_eq!(c.forwarded_ports(GW).await.unwrap(), Vec::<u16>::new());
    // Bad input: a 0 in the list, a port out of range, not JSON.
    for bad in [r#"{"port":5,"ports":[0,5]}"#, r#"{"port":70000}"#, "<html>"] {
        mock.set("/v1/portforward", 200, bad);
        let err = c.forwarded_ports(GW).await.unwrap_err();
        assert!(
            matches!(err.reason, FailureReason::BadJson(_)),
            "{bad}: {err}"
        );
        assert!(
            err.to_string().contains("127.0.0.1"),
            "names the gateway: {err}"
        );
    }
    // An older gluetun: /v1/portforward is 404, the old route answers.
    mock.routes.lock().unwrap().remove("/v1/portforward");
    mock.set("/v1/openvpn/portforwarded", 200, r#"{"port":5555}"#);
    assert_eq!(c.forwarded_ports(GW).await.unwrap(), vec![5555]);
    mock.routes
        .lock()
        .unwrap()
        .remove("/v1/openvpn/portforwarded");
    let err = c.forwarded_ports(GW).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::HttpStatus(404));
    assert!(
        err.to_string().contains("/v1/openvpn/portforwarded"),
        "{err}"
    );
}

#[tokio::test]
async fn health_server() {
    let mock = MockGluetun::start(GW, 0).await;
    let c = client(mock.addr.port(), None, Duration::from_secs(2));
    mock.set("/", 200, "");
    c.health_server(GW).await.unwrap();
    mock.set("/", 500, "lookup github.com: i/o timeout\n");
    let err = c.health_server(GW).await.unwrap_err();
    assert_eq!(
        err.reason,
        FailureReason::HealthServerUnhealthy("lookup github.com: i/o timeout".into())
    );
    assert!(
        err.to_string()
            .contains(&format!("health server :{}", mock.addr.port())),
        "{err}"
    );
}

/// The checker end to end on loopback: two gateways (127.0.0.1 and 127.0.0.2, same port),
/// one breaks and returns; rise/fall are respected and the reason is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_publishes_the_healthy_set() {
    let a = MockGluetun::start(Ipv4Addr::new(127, 0, 0, 1), 0).await;
    let b = MockGluetun::start(Ipv4Addr::new(127, 0, 0, 2), a.addr.port()).await;
    a.healthy("198.51.100.1");
    b.healthy("198.51.100.2");
    let settings = HealthSettings {
        gateways: vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)],
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        rise: 3,
        fall: 2,
        checks: vec![CheckKind::VpnStatus, CheckKind::PublicIp],
        control_port: a.addr.port(),
        ..Default::default()
    };
    let metrics = Metrics::new();
    let (checker, mut healthy) = HealthChecker::new(settings, metrics.clone()).unwrap();
    let status = checker.status();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(checker.run(cancel.clone()));

    let wait_for =
        |rx: &mut tokio::sync::watch::Receiver<gateway_route_manager::HealthyGateways>,
         want: Vec<usize>| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        let set: gateway_route_manager::HealthyGateways =
                            rx.borrow_and_update().clone();
                        if set.complete && set.indexes().collect::<Vec<_>>() == want {
                            return set;
                        }
                        rx.changed().await.unwrap();
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("healthy set never became {want:?}"))
            }
        };
    let set = wait_for(&mut healthy, vec![0, 1]).await;
    assert_eq!(
        set.gateways[&1].public_ip.unwrap().to_string(),
        "198.51.100.2"
    );

    b.set("/v1/vpn/status", 200, r#"{"status":"crashed"}"#);
    let removed_at = tokio::time::Instant::now();
    wait_for(&mut healthy, vec![0]).await;
    let took = removed_at.elapsed();
    // fall = 2 checks at 50 ms: well under a second, and not on the first failure.
    assert!(
        took >= Duration::from_millis(40) && took < Duration::from_secs(1),
        "{took:?}"
    );
    let s = status.borrow().clone();
    assert_eq!(s[1].state, GatewayState::Unhealthy);
    assert_eq!(s[1].last_reason_kind, Some("vpn_not_running"));
    assert!(s[1].last_reason.as_deref().unwrap().contains("127.0.0.2"));

    b.set("/v1/vpn/status", 200, r#"{"status":"running"}"#);
    let back_at = tokio::time::Instant::now();
    wait_for(&mut healthy, vec![0, 1]).await;
    assert!(
        back_at.elapsed() >= Duration::from_millis(90),
        "rise = 3 needs 3 good checks"
    );
    assert_eq!(status.borrow()[1].last_reason, None);

    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains("vpn_router_gateways_healthy 2"), "{text}");
    assert!(text.contains(
        "vpn_router_gateway_check_failures_total{gateway=\"127.0.0.2\",reason=\"vpn_not_running\"}"
    ));
    cancel.cancel();
    task.await.unwrap();
}
