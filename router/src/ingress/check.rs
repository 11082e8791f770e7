//! One health check of one real server: `tcp` connect, `http` GET with an expected status,
//! `udp` send (and expect), `dns` query expecting an answer. Owns the probe wire formats; knows
//! nothing about rise/fall or IPVS. Every probe is bounded by the check's timeout.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::config::RealServerCheckKind;

/// Why a check failed, said so an operator can act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Io(String),
    #[error("HTTP status {got}, expected {expected}")]
    Status { got: u16, expected: u16 },
    #[error("not an HTTP response: {0}")]
    BadHttp(String),
    #[error("reply {got:?} does not contain {expected:?}")]
    UnexpectedReply { got: String, expected: String },
    #[error("DNS: {0}")]
    Dns(String),
}

/// Runs one check against `addr`; `Ok` when the server passes.
pub async fn run(
    kind: &RealServerCheckKind,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), CheckError> {
    if matches!(kind, RealServerCheckKind::None) {
        return Ok(());
    }
    match tokio::time::timeout(timeout, probe(kind, addr)).await {
        Ok(r) => r,
        Err(_) => Err(CheckError::Timeout(timeout)),
    }
}

async fn probe(kind: &RealServerCheckKind, addr: SocketAddr) -> Result<(), CheckError> {
    match kind {
        RealServerCheckKind::None => Ok(()),
        RealServerCheckKind::Tcp => {
            TcpStream::connect(addr)
                .await
                .map_err(|e| CheckError::Connect(e.to_string()))?;
            Ok(())
        }
        RealServerCheckKind::Http {
            path,
            expect_status,
        } => http(addr, path, *expect_status).await,
        RealServerCheckKind::Udp { send, expect } => {
            udp(addr, send.as_bytes(), expect.as_deref()).await
        }
        RealServerCheckKind::Dns { query } => dns(addr, query).await,
    }
}

async fn http(addr: SocketAddr, path: &str, expected: u16) -> Result<(), CheckError> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| CheckError::Connect(e.to_string()))?;
    let host = match addr.ip() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: vpn-router-check\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| CheckError::Io(format!("send request: {e}")))?;
    // The status line is all we need: read until its end (or 512 bytes).
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.contains(&b'\n') && buf.len() < 512 {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| CheckError::Io(format!("read response: {e}")))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let got = parse_status(&buf)?;
    if got != expected {
        return Err(CheckError::Status { got, expected });
    }
    Ok(())
}

/// The status code of an HTTP/1.x status line.
pub fn parse_status(buf: &[u8]) -> Result<u16, CheckError> {
    let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let line = String::from_utf8_lossy(&buf[..line_end]);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code
            .parse()
            .map_err(|_| CheckError::BadHttp(line.trim().chars().take(60).collect())),
        _ if buf.is_empty() => Err(CheckError::BadHttp(
            "connection closed without a reply".into(),
        )),
        _ => Err(CheckError::BadHttp(line.trim().chars().take(60).collect())),
    }
}

async fn connected_udp(addr: SocketAddr) -> Result<UdpSocket, CheckError> {
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let s = UdpSocket::bind(bind)
        .await
        .map_err(|e| CheckError::Io(format!("UDP socket: {e}")))?;
    s.connect(addr)
        .await
        .map_err(|e| CheckError::Connect(e.to_string()))?;
    Ok(s)
}

async fn udp(addr: SocketAddr, send: &[u8], expect: Option<&str>) -> Result<(), CheckError> {
    let s = connected_udp(addr).await?;
    s.send(send)
        .await
        .map_err(|e| CheckError::Io(format!("send: {e}")))?;
    // A reply must come back (any reply without `expect`). A connected socket turns an ICMP
    // port unreachable into ECONNREFUSED on recv, so a closed port fails at once.
    let mut buf = [0u8; 1500];
    let n = s
        .recv(&mut buf)
        .await
        .map_err(|e| CheckError::Io(format!("receive: {e}")))?;
    let got = String::from_utf8_lossy(&buf[..n]);
    match expect {
        Some(want) if !got.contains(want) => Err(CheckError::UnexpectedReply {
            got: got.chars().take(60).collect(),
            expected: want.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// A DNS query (type A, recursion desired) for `name` with message id `id`.
pub fn dns_query(name: &str, id: u16) -> Result<Vec<u8>, CheckError> {
    let mut q = Vec::with_capacity(name.len() + 18);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(CheckError::Dns(format!("{name:?} is not a valid name")));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]);
    Ok(q)
}

/// Checks a reply to [`dns_query`]: same id, a response, RCODE NOERROR, at least one answer.
pub fn dns_answer_ok(reply: &[u8], id: u16) -> Result<(), CheckError> {
    if reply.len() < 12 {
        return Err(CheckError::Dns(format!(
            "short reply ({} bytes)",
            reply.len()
        )));
    }
    if reply[0..2] != id.to_be_bytes() {
        return Err(CheckError::Dns("reply to another query".into()));
    }
    if reply[2] & 0x80 == 0 {
        return Err(CheckError::Dns("not a response".into()));
    }
    let rcode = reply[3] & 0x0f;
    if rcode != 0 {
        let name = match rcode {
            1 => "FORMERR",
            2 => "SERVFAIL",
            3 => "NXDOMAIN",
            4 => "NOTIMP",
            5 => "REFUSED",
            _ => "error",
        };
        return Err(CheckError::Dns(format!("rcode {rcode} ({name})")));
    }
    let answers = u16::from_be_bytes([reply[6], reply[7]]);
    if answers == 0 {
        return Err(CheckError::Dns("no answer records".into()));
    }
    Ok(())
}

async fn dns(addr: SocketAddr, name: &str) -> Result<(), CheckError> {
    let id: u16 = rand::random();
    let q = dns_query(name, id)?;
    let s = connected_udp(addr).await?;
    s.send(&q)
        .await
        .map_err(|e| CheckError::Io(format!("send query: {e}")))?;
    let mut buf = [0u8; 1500];
    loop {
        let n = s
            .recv(&mut buf)
            .await
            .map_err(|e| CheckError::Io(format!("receive: {e}")))?;
        // A late reply to an earlier query of ours: keep waiting for this one.
        if n >= 2 && buf[0..2] != id.to_be_bytes() {
            continue;
        }
        return dns_answer_ok(&buf[..n], id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_line() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Ok(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\nx"),
            Ok(503)
        );
        assert!(parse_status(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_status(b"").is_err());
    }

    #[test]
    fn dns_wire() {
        let q = dns_query("example.com.", 0x1234).unwrap();
        assert_eq!(
            q,
            [
                0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x', b'a', b'm', b'p', b'l',
                b'e', 3, b'c', b'o', b'm', 0, 0, 1, 0, 1
            ]
        );
        assert!(dns_query("a..b", 1).is_err());
        let mut reply = q.clone();
        reply[2] |= 0x80;
        assert!(dns_answer_ok(&reply, 0x1234).is_err(), "no answers");
        reply[7] = 1;
        assert_eq!(dns_answer_ok(&reply, 0x1234), Ok(()));
        assert!(dns_answer_ok(&reply, 0x1235).is_err());
        reply[3] = 3;
        assert!(dns_answer_ok(&reply, 0x1234)
            .unwrap_err()
            .to_string()
            .contains("NXDOMAIN"));
    }

    #[tokio::test]
    async fn probes_on_loopback() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 512];
                let n = s.read(&mut b).await.unwrap_or(0);
                let code = if b[..n].starts_with(b"GET /healthz ") {
                    200
                } else {
                    404
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let t = Duration::from_secs(2);
        assert_eq!(run(&RealServerCheckKind::Tcp, addr, t).await, Ok(()));
        let ok = RealServerCheckKind::Http {
            path: "/healthz".into(),
            expect_status: 200,
        };
        assert_eq!(run(&ok, addr, t).await, Ok(()));
        let bad = RealServerCheckKind::Http {
            path: "/nope".into(),
            expect_status: 200,
        };
        assert_eq!(
            run(&bad, addr, t).await,
            Err(CheckError::Status {
                got: 404,
                expected: 200
            })
        );
        // A closed port is refused.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(matches!(
            run(&RealServerCheckKind::Tcp, closed, t).await,
            Err(CheckError::Connect(_))
        ));

        // UDP echo with an expected text; a closed UDP port is refused (ICMP).
        let u = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let uaddr = u.local_addr().unwrap();
        tokio::spawn(async move {
            let mut b = [0u8; 1500];
            loop {
                let (n, from) = u.recv_from(&mut b).await.unwrap();
                let _ = u.send_to(&b[..n], from).await;
            }
        });
        let echo = RealServerCheckKind::Udp {
            send: "ping".into(),
            expect: Some("ping".into()),
        };
        assert_eq!(run(&echo, uaddr, t).await, Ok(()));
        let wrong = RealServerCheckKind::Udp {
            send: "ping".into(),
            expect: Some("pong".into()),
        };
        assert!(matches!(
            run(&wrong, uaddr, t).await,
            Err(CheckError::UnexpectedReply { .. })
        ));
        let uclosed = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        assert!(run(&echo, uclosed, t).await.is_err());
        let any = RealServerCheckKind::Udp {
            send: "x".into(),
            expect: None,
        };
        assert_eq!(run(&any, uaddr, t).await, Ok(()));
        assert!(run(
            &RealServerCheckKind::Udp {
                send: "x".into(),
                expect: None
            },
            uclosed,
            t
        )
        .await
        .is_err());
    }

    #[tokio::test]
    async fn dns_probe_against_a_tiny_responder() {
        let u = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = u.local_addr().unwrap();
        tokio::spawn(async move {
            let mut b = [0u8; 1500];
            loop {
                let (n, from) = u.recv_from(&mut b).await.unwrap();
                let mut r = b[..n].to_vec();
                r[2] |= 0x80;
                // "known.test" gets one answer, anything else NXDOMAIN.
                if r.windows(5).any(|w| w == b"known") {
                    r[7] = 1;
                } else {
                    r[3] = 3;
                }
                let _ = u.send_to(&r, from).await;
            }
        });
        let t = Duration::from_secs(2);
        let known = RealServerCheckKind::Dns {
            query: "known.test".into(),
        };
        assert_eq!(run(&known, addr, t).await, Ok(()));
        let unknown = RealServerCheckKind::Dns {
            query: "other.test".into(),
        };
        assert!(run(&unknown, addr, t).await.is_err());
    }
}
