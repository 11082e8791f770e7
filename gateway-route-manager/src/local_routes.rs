//! Local routes: addresses that no interface of the router holds, but that it must accept as
//! its own so IPVS sees their packets (a virtual server on the cluster DNS service IP, which
//! clients route to the egress VIP). Each is `local ADDR dev lo table local proto 245 scope
//! host src SRC`, on every router whatever its VRRP role (only the egress VIP, which the
//! clients' route points at, moves on failover).
//!
//! `src` is the router's own address on the gateway network. Without it the router's own
//! packets to ADDR (the pod's resolv.conf names the cluster DNS IP) would leave with ADDR as
//! their source, IPVS would hand them to a real server, and its answer to ADDR would go
//! elsewhere: the router's own lookups would fail. With it the real server answers the router
//! on the gateway network and IPVS undoes its NAT.
//!
//! Owns: the `local` routes of protocol 245 (`RTPROT_VPN_ROUTER`) in table local, and nothing
//! else there (the kernel's own local routes are protocol kernel). A sync adds what is missing
//! and deletes ours that are no longer wanted; a restarted daemon adopts what it finds.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::egress::RTPROT_VPN_ROUTER;
use crate::error::NetlinkError;
use crate::netlink::{Route, RouteSocket, RouteTarget};

/// The kernel's `local` table.
pub const TABLE_LOCAL: u32 = 255;

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalRoutesReport {
    /// Addresses whose route was added, and ours that were deleted.
    pub added: Vec<Ipv4Addr>,
    pub deleted: Vec<Ipv4Addr>,
    /// Wanted addresses whose route is in the kernel after the sync.
    pub in_force: BTreeSet<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalRoutesError {
    #[error("local routes: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("local routes: {count} change(s) failed; first: {first}")]
    Apply { count: usize, first: NetlinkError },
}

fn ours(r: &Route) -> Option<Ipv4Addr> {
    (r.table == TABLE_LOCAL
        && r.protocol == RTPROT_VPN_ROUTER
        && matches!(r.target, RouteTarget::Local { .. })
        && r.dst.prefix_len() == 32)
        .then(|| r.dst.addr())
}

fn route(addr: Ipv4Addr, target: RouteTarget) -> Route {
    Route {
        table: TABLE_LOCAL,
        dst: Ipv4Net::from(addr),
        metric: 0,
        protocol: RTPROT_VPN_ROUTER,
        target,
    }
}

/// A netlink connection for syncing the local routes (opened once by the engine that keeps
/// them).
#[derive(Debug)]
pub struct LocalRoutes {
    socket: RouteSocket,
}

impl LocalRoutes {
    /// Opens the socket in the caller's network namespace (inside a tokio runtime).
    pub fn open() -> Result<Self, LocalRoutesError> {
        Ok(LocalRoutes {
            socket: RouteSocket::open()?,
        })
    }

    /// Makes our local routes exactly `wanted`, with the first primary IPv4 address of
    /// `src_interface` as their source (none while it has no address; a later sync adds it):
    /// one dump, then only the differences.
    pub async fn sync(
        &self,
        wanted: &BTreeSet<Ipv4Addr>,
        src_interface: Option<&str>,
    ) -> Result<LocalRoutesReport, LocalRoutesError> {
        let socket = &self.socket;
        let lo = socket.link_index("lo").await?;
        let prefsrc = match src_interface {
            None => None,
            Some(name) => match socket.link_index(name).await {
                Ok(i) => socket.primary_ipv4(i).await?.first().copied(),
                Err(NetlinkError::NoSuchInterface { .. }) => None,
                Err(e) => return Err(e.into()),
            },
        };
        let target = RouteTarget::Local { oif: lo, prefsrc };
        let kernel: Vec<Route> = socket.dump_routes().await?;
        // Ours and as wanted; one of ours that differs (another interface, another source)
        // is replaced.
        let right: BTreeSet<Ipv4Addr> = kernel
            .iter()
            .filter(|r| r.target == target)
            .filter_map(ours)
            .collect();
        let mut report = LocalRoutesReport::default();
        let mut failed = Vec::new();
        for a in wanted.difference(&right) {
            match socket.set_route(&route(*a, target.clone())).await {
                Ok(()) => report.added.push(*a),
                Err(e) => failed.push(e),
            }
        }
        for r in kernel
            .iter()
            .filter(|r| ours(r).is_some_and(|a| !wanted.contains(&a)))
        {
            match socket.delete_route(r).await {
                Ok(()) => report.deleted.extend(ours(r)),
                Err(NetlinkError::Kernel { errno, .. }) if errno == libc::ESRCH => {}
                Err(e) => failed.push(e),
            }
        }
        report.in_force = wanted
            .intersection(&right)
            .chain(&report.added)
            .copied()
            .collect();
        let count = failed.len();
        match failed.into_iter().next() {
            None => Ok(report),
            Some(first) => Err(LocalRoutesError::Apply { count, first }),
        }
    }
}
