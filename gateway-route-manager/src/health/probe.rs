//! Data-plane probe: a TCP connect to a target, sent *through* one gateway.
//!
//! Owns: the marked socket. The socket gets `SO_MARK = mark` so the policy rule
//! `fwmark mark lookup table` (table holds `default via <gateway>`) routes the SYN through that
//! gateway and nowhere else; the per-gateway rule and table are return routing's (`return_routing`).
//! It must not choose the mark or the target, and sends nothing but one TCP handshake.
//!
//! The socket is also bound to the gateways' interface (`SO_BINDTODEVICE`): without the rule
//! (before return routing installed it, or after someone deleted it) the lookup falls through to
//! the main table, whose default route leaves by the pod's own network. Bound, such a probe
//! finds no route and fails, instead of succeeding around the tunnel it is meant to test.
//!
//! A connection *refused* by the target counts as a failure: the target is expected to listen
//! (e.g. 1.1.1.1:443), and a refusal may come from the gateway's own firewall rather than from
//! the far end of the tunnel.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpSocket;

/// Connects to `target` with `SO_MARK = mark` out of `interface` (none: any); returns the
/// connect time (tokio's clock). The error text names the failure (`timed out`, `no route to
/// host`, ...).
pub async fn probe_through(
    target: SocketAddr,
    mark: u32,
    interface: Option<&str>,
    timeout: Duration,
) -> Result<Duration, String> {
    let domain = if target.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("cannot create socket: {e}"))?;
    socket
        .set_mark(mark)
        .map_err(|e| format!("cannot set SO_MARK {mark:#x} (needs CAP_NET_ADMIN): {e}"))?;
    if let Some(dev) = interface {
        socket.bind_device(Some(dev.as_bytes())).map_err(|e| {
            format!("cannot bind the probe to {dev} (SO_BINDTODEVICE needs CAP_NET_RAW): {e}")
        })?;
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("cannot make socket non-blocking: {e}"))?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(timeout, socket.connect(target)).await {
        Ok(Ok(_stream)) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(format!("connect to {target} with mark {mark:#x}: {e}")),
        Err(_) => Err(format!(
            "connect to {target} with mark {mark:#x}: timed out after {timeout:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Loopback only: a mark does not change where loopback traffic goes when no rule uses it.
    #[tokio::test]
    async fn connects_to_a_listener_and_reports_rtt() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let rtt = probe_through(target, 0x1900, None, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(rtt < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn refused_is_a_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        drop(listener);
        let err = probe_through(target, 0x1900, None, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }
}
