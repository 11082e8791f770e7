//! The only module that talks rtnetlink: links (the VMAC macvlans) and addresses (the VIPs).
//!
//! Owns the translation between our small operations and rtnetlink's message builders, so a
//! breaking rtnetlink release touches this file only. It makes no VRRP decisions and every
//! operation is idempotent (adding what exists or deleting what is gone is success).

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, MacVlanMode};
use rtnetlink::{Handle, LinkMacVlan, LinkUnspec};

/// Netlink failures, naming the object.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Opening the netlink socket failed.
    #[error("rtnetlink: open socket: {0}")]
    Connect(std::io::Error),
    /// A request failed.
    #[error("rtnetlink: {op} {object}: {source}")]
    Request {
        /// Operation.
        op: &'static str,
        /// Interface or address.
        object: String,
        /// Kernel / library error.
        source: rtnetlink::Error,
    },
}

const EEXIST: i32 = libc::EEXIST;
const ENODEV: i32 = libc::ENODEV;
const EADDRNOTAVAIL: i32 = libc::EADDRNOTAVAIL;

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// A link as we care about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// ifindex.
    pub index: u32,
    /// MAC address.
    pub mac: Vec<u8>,
    /// Parent (IFLA_LINK), for macvlans.
    pub parent: Option<u32>,
    /// Administratively up.
    pub up: bool,
}

/// An rtnetlink handle; its connection task runs on the current tokio runtime.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the netlink socket and spawns its connection task.
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// Looks a link up by name.
    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_info(&msg))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(source) => Err(NetlinkError::Request {
                op: "get link",
                object: name.to_string(),
                source,
            }),
        }
    }

    /// Creates a private-mode macvlan `name` on `parent` with `mac`, left down so the caller
    /// can set sysctls before it sends anything. Existing links are left alone.
    pub async fn add_macvlan(
        &self,
        name: &str,
        parent: u32,
        mac: [u8; 6],
    ) -> Result<(), NetlinkError> {
        let msg = LinkMacVlan::new(name, parent, MacVlanMode::Private)
            .address(mac.to_vec())
            .build();
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                op: "add macvlan",
                object: name.to_string(),
                source,
            }),
        }
    }

    /// Sets a link up.
    pub async fn set_up(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "set up",
                object: name.to_string(),
                source,
            })
    }

    /// Deletes a link; a missing link is success.
    pub async fn del_link(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                op: "delete link",
                object: name.to_string(),
                source,
            }),
        }
    }

    /// Addresses on a link, with prefix lengths.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(IpAddr, u8)>, NetlinkError> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        loop {
            match stream.try_next().await {
                Ok(Some(msg)) => {
                    if msg.header.index != index {
                        continue;
                    }
                    // IFA_LOCAL is the interface's own address on point-to-point links;
                    // IFA_ADDRESS otherwise. Prefer LOCAL when present.
                    let mut addr = None;
                    for a in &msg.attributes {
                        match a {
                            AddressAttribute::Local(ip) => addr = Some(*ip),
                            AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
                            _ => {}
                        }
                    }
                    if let Some(ip) = addr {
                        out.push((ip, msg.header.prefix_len));
                    }
                }
                Ok(None) => return Ok(out),
                Err(source) => {
                    return Err(NetlinkError::Request {
                        op: "list addresses",
                        object: format!("ifindex {index}"),
                        source,
                    })
                }
            }
        }
    }

    /// Adds an address; IPv6 ones without duplicate address detection (the VRRP election
    /// already decided who owns it, and DAD would delay it by a second). Existing is success.
    pub async fn add_address(
        &self,
        index: u32,
        addr: IpAddr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let mut req = self.handle.address().add(index, addr, prefix);
        if addr.is_ipv6() {
            req.message_mut().header.flags = AddressHeaderFlags::Nodad;
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                op: "add address",
                object: format!("{addr}/{prefix} on ifindex {index}"),
                source,
            }),
        }
    }

    /// Deletes an address; a missing one is success.
    pub async fn del_address(
        &self,
        index: u32,
        addr: IpAddr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let mut msg = netlink_packet_route::address::AddressMessage::default();
        msg.header.index = index;
        msg.header.prefix_len = prefix;
        msg.header.family = match addr {
            IpAddr::V4(_) => netlink_packet_route::AddressFamily::Inet,
            IpAddr::V6(_) => netlink_packet_route::AddressFamily::Inet6,
        };
        // Like iproute2: both attributes, so IPv4 (matched on LOCAL) and IPv6 (ADDRESS) work.
        msg.attributes.push(AddressAttribute::Local(addr));
        msg.attributes.push(AddressAttribute::Address(addr));
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(EADDRNOTAVAIL) | Some(ENODEV)) => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                op: "delete address",
                object: format!("{addr}/{prefix} on ifindex {index}"),
                source,
            }),
        }
    }
}

fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        mac: Vec::new(),
        parent: None,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::Address(m) => info.mac = m.clone(),
            LinkAttribute::Link(p) => info.parent = Some(*p),
            _ => {}
        }
    }
    info
}
