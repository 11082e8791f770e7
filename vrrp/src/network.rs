//! Raw IP protocol 112 sockets for VRRP adverts (Linux only), IPv4 and IPv6.
//!
//! Owns the socket options that make VRRP work on Linux: bound to the advert interface,
//! multicast group joined on it (or unicast peers), TTL / hop limit 255 outgoing, no multicast
//! loop, and the received TTL / hop limit and destination reported to the decoder. It sends
//! and receives bytes only: encoding, decoding and decisions belong to `packet` and `fsm`.
//!
//! IPv4 raw sockets deliver the IP header with the payload, so source, destination and TTL
//! are read from the header itself (the same value `IP_RECVTTL` would report, without a
//! second copy). IPv6 raw sockets strip the header, so hop limit and destination come from
//! `IPV6_RECVHOPLIMIT` / `IPV6_RECVPKTINFO` control messages. The source address is set per
//! packet with `IP_PKTINFO` / `IPV6_PKTINFO` instead of `bind()`, because binding a raw socket
//! to an address also filters what it receives by destination, which would drop multicast.

use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU16, Ordering};

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;

use crate::packet::{Family, RxMeta, IPPROTO_VRRP, MULTICAST_V4, MULTICAST_V6, REQUIRED_TTL};

/// Socket errors; each names the interface and the operation.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The interface does not exist.
    #[error("VRRP interface {interface}: not found ({source}); check vrrp[].interface")]
    NoInterface {
        /// Interface name.
        interface: String,
        /// OS error.
        source: nix::Error,
    },
    /// No usable source address on the interface.
    #[error("VRRP interface {interface}: no {family} address to send adverts from; add one")]
    NoSourceAddress {
        /// Interface name.
        interface: String,
        /// "IPv4", "IPv6 link-local", ...
        family: &'static str,
    },
    /// A socket call failed.
    #[error("VRRP interface {interface}: {op}: {source} (raw sockets need CAP_NET_RAW)")]
    Socket {
        /// Interface name.
        interface: String,
        /// What was being done.
        op: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// A protocol timer (a timerfd) could not be created.
    #[error("VRRP timer: timerfd_create: {0}")]
    Timer(std::io::Error),
}

impl NetworkError {
    /// A send found the socket's buffer full (retrying later can succeed).
    pub fn would_block(&self) -> bool {
        matches!(self, NetworkError::Socket { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Where and how to open the advert socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketParams {
    /// Advert interface.
    pub interface: String,
    /// Address family.
    pub family: Family,
    /// Empty: multicast 224.0.0.18 / ff02::12. Otherwise unicast to each of these.
    pub unicast_peers: Vec<IpAddr>,
    /// Addresses never to use as source (the VIPs, when they share the interface).
    pub exclude_sources: Vec<IpAddr>,
}

/// One received VRRP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// IP-layer facts.
    pub meta: RxMeta,
    /// Byte range of the VRRP message inside the receive buffer.
    pub payload: std::ops::Range<usize>,
}

/// A bound, configured VRRP socket.
#[derive(Debug)]
pub struct VrrpSocket {
    fd: AsyncFd<Socket>,
    /// Socket on our VMAC when it sits on the advert interface; see
    /// `add_vmac_receiver`. IPv4 multicast adverts are also sent through it.
    vmac: Option<AsyncFd<Socket>>,
    interface: String,
    ifindex: u32,
    family: Family,
    source: IpAddr,
    destinations: Vec<IpAddr>,
    /// Identification of the next IPv4 advert.
    ip_id: AtomicU16,
}

fn sock_err<'a>(
    interface: &'a str,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> NetworkError + 'a {
    move |source| NetworkError::Socket {
        interface: interface.to_string(),
        op,
        source,
    }
}

/// Hands a socket to tokio's reactor, for reading only: adverts are sent without waiting
/// for writability (see [`VrrpSocket::try_send`]), and a write interest would wake the runtime
/// once more after every send (the send buffer's edge), doubling the idle master's wake-ups
/// at 10 ms adverts.
#[allow(unsafe_code)]
pub(crate) fn register(socket: Socket) -> std::io::Result<AsyncFd<Socket>> {
    // SAFETY: `Socket` owns its file descriptor: it stays open and unchanged until the
    // `Socket` is dropped, which happens only when the `AsyncFd` owning it is dropped.
    unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// A classic BPF program that accepts only frames whose Ethernet source is `mac` (read through
/// the link-layer offset: an IP raw socket's filter starts at the IP header).
fn from_mac_filter(mac: [u8; 6]) -> [socket2::SockFilter; 6] {
    use socket2::SockFilter;
    // linux/filter.h: BPF_LD|BPF_W|BPF_ABS, BPF_LD|BPF_H|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K,
    // BPF_RET|BPF_K; SKF_LL_OFF (-0x200000) addresses the link-layer header.
    const LD_W: u16 = 0x20;
    const LD_H: u16 = 0x28;
    const JEQ: u16 = 0x15;
    const RET: u16 = 0x06;
    const SKF_LL_OFF: i32 = -0x20_0000;
    let ll = |off: i32| (SKF_LL_OFF + off) as u32;
    let hi = u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]]);
    let lo = u32::from(u16::from_be_bytes([mac[4], mac[5]]));
    [
        SockFilter::new(LD_W, 0, 0, ll(6)),
        SockFilter::new(JEQ, 0, 3, hi),
        SockFilter::new(LD_H, 0, 0, ll(10)),
        SockFilter::new(JEQ, 0, 1, lo),
        SockFilter::new(RET, 0, 0, 0x0004_0000),
        SockFilter::new(RET, 0, 0, 0),
    ]
}

/// Index of an interface by name.
pub fn ifindex(interface: &str) -> Result<u32, NetworkError> {
    nix::net::if_::if_nametoindex(interface).map_err(|source| NetworkError::NoInterface {
        interface: interface.to_string(),
        source,
    })
}

/// The interface's primary address of `family`: the first IPv4 address the kernel lists
/// (primaries come before secondaries), or for IPv6 the link-local address (RFC 5798 §5.1.2.1)
/// unless `global` asks for a global one (unicast to non-link-local peers).
pub fn primary_address(
    interface: &str,
    family: Family,
    global: bool,
    exclude: &[IpAddr],
) -> Result<IpAddr, NetworkError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| NetworkError::Socket {
        interface: interface.to_string(),
        op: "getifaddrs",
        source: e.into(),
    })?;
    let mut found = None;
    for ifa in addrs.filter(|i| i.interface_name == interface) {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if exclude.contains(&ip) || Family::of(&ip) != family {
            continue;
        }
        let fits = match ip {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => is_link_local(&v6) != global,
        };
        if fits {
            found = Some(ip);
            break;
        }
    }
    found.ok_or_else(|| NetworkError::NoSourceAddress {
        interface: interface.to_string(),
        family: match (family, global) {
            (Family::V4, _) => "IPv4",
            (Family::V6, false) => "IPv6 link-local",
            (Family::V6, true) => "IPv6 global",
        },
    })
}

fn is_link_local(a: &Ipv6Addr) -> bool {
    (a.segments()[0] & 0xffc0) == 0xfe80
}

/// A raw IP protocol 112 socket bound to `iface` (ifindex `index`): non-blocking, IPv4 with
/// our own header (IP_HDRINCL), IPv6 with hop limit 255 on everything it sends, multicast
/// loop off, only the groups it joins itself, IPv6 receive metadata on; joined to
/// 224.0.0.18 / ff02::12 when `join`.
fn raw_socket(iface: &str, index: u32, family: Family, join: bool) -> Result<Socket, NetworkError> {
    let domain = match family {
        Family::V4 => Domain::IPV4,
        Family::V6 => Domain::IPV6,
    };
    let socket = Socket::new(
        domain,
        Type::RAW.nonblocking().cloexec(),
        Some(Protocol::from(i32::from(IPPROTO_VRRP))),
    )
    .map_err(sock_err(iface, "socket(IPPROTO_VRRP)"))?;
    socket
        .bind_device(Some(iface.as_bytes()))
        .map_err(sock_err(iface, "SO_BINDTODEVICE"))?;
    match family {
        Family::V4 => {
            // Adverts are sent with our own IPv4 header, TTL 255 included (see
            // `VrrpSocket::send_now`): IP_TTL and IP_MULTICAST_TTL have no say then.
            socket
                .set_header_included_v4(true)
                .map_err(sock_err(iface, "IP_HDRINCL"))?;
            socket
                .set_multicast_loop_v4(false)
                .map_err(sock_err(iface, "IP_MULTICAST_LOOP"))?;
            // Without this a raw socket also gets groups joined by other sockets.
            socket
                .set_multicast_all_v4(false)
                .map_err(sock_err(iface, "IP_MULTICAST_ALL"))?;
            if join {
                socket
                    .join_multicast_v4_n(&MULTICAST_V4, &InterfaceIndexOrAddress::Index(index))
                    .map_err(sock_err(iface, "IP_ADD_MEMBERSHIP 224.0.0.18"))?;
            }
        }
        Family::V6 => {
            socket
                .set_unicast_hops_v6(u32::from(REQUIRED_TTL))
                .map_err(sock_err(iface, "IPV6_UNICAST_HOPS"))?;
            socket
                .set_multicast_hops_v6(u32::from(REQUIRED_TTL))
                .map_err(sock_err(iface, "IPV6_MULTICAST_HOPS"))?;
            socket
                .set_multicast_loop_v6(false)
                .map_err(sock_err(iface, "IPV6_MULTICAST_LOOP"))?;
            socket
                .set_multicast_all_v6(false)
                .map_err(sock_err(iface, "IPV6_MULTICAST_ALL"))?;
            setsockopt(&socket, sockopt::Ipv6RecvHopLimit, &true)
                .map_err(|e| sock_err(iface, "IPV6_RECVHOPLIMIT")(e.into()))?;
            setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)
                .map_err(|e| sock_err(iface, "IPV6_RECVPKTINFO")(e.into()))?;
            if join {
                socket
                    .join_multicast_v6(&MULTICAST_V6, index)
                    .map_err(sock_err(iface, "IPV6_JOIN_GROUP ff02::12"))?;
            }
        }
    }
    Ok(socket)
}

impl VrrpSocket {
    /// Opens the socket: raw protocol 112, bound to the interface, group joined (multicast
    /// mode), TTL / hop limit 255, loop off, receive metadata on.
    pub fn open(params: &SocketParams) -> Result<VrrpSocket, NetworkError> {
        let iface = params.interface.as_str();
        let index = ifindex(iface)?;
        let global = params.family == Family::V6
            && params
                .unicast_peers
                .iter()
                .any(|p| matches!(p, IpAddr::V6(v6) if !is_link_local(v6)));
        let source = primary_address(iface, params.family, global, &params.exclude_sources)?;
        let multicast = params.unicast_peers.is_empty();
        let socket = raw_socket(iface, index, params.family, multicast)?;
        let destinations = if multicast {
            vec![match params.family {
                Family::V4 => IpAddr::V4(MULTICAST_V4),
                Family::V6 => IpAddr::V6(MULTICAST_V6),
            }]
        } else {
            params.unicast_peers.clone()
        };
        let fd = register(socket).map_err(sock_err(iface, "register with tokio"))?;
        Ok(VrrpSocket {
            fd,
            vmac: None,
            interface: iface.to_string(),
            ifindex: index,
            family: params.family,
            source,
            destinations,
            ip_id: AtomicU16::new(1),
        })
    }

    /// Also receives on our VMAC interface `vmac_if` (a macvlan on the advert interface), and
    /// sends IPv4 multicast adverts from it.
    ///
    /// Receiving: needed for peers that send adverts from the VMAC, as keepalived does (and we
    /// do): the macvlan driver treats a multicast frame whose *source* MAC is one of its own
    /// private-mode macvlans' MAC as looped back and hands it to that macvlan only, so a
    /// socket bound to the parent never sees it. Unicast frames are not affected.
    ///
    /// Sending: RFC 5798 §7.3, the virtual router MAC is the source of the master's periodic
    /// adverts, so that switches learn, with every advert, which port the VMAC is behind —
    /// after a healed partition or a backup's brief false takeover the bridge follows the
    /// master within one advert interval. IPv6 adverts stay on the parent: their source, the
    /// parent's link-local address, does not belong to the macvlan.
    ///
    /// Only frames from the VMAC itself are taken there (a socket filter on the source MAC):
    /// the macvlan also gets every other multicast frame, which the parent's socket receives
    /// already, and each would otherwise be handled and counted twice (a forged advert too).
    pub fn add_vmac_receiver(&mut self, vmac_if: &str, vmac: [u8; 6]) -> Result<(), NetworkError> {
        let index = ifindex(vmac_if)?;
        let socket = raw_socket(vmac_if, index, self.family, true)?;
        socket
            .attach_filter(&from_mac_filter(vmac))
            .map_err(sock_err(vmac_if, "SO_ATTACH_FILTER"))?;
        let fd = register(socket).map_err(sock_err(vmac_if, "register with tokio"))?;
        self.vmac = Some(fd);
        Ok(())
    }

    /// Our source address in adverts (the interface's primary address).
    pub fn source(&self) -> IpAddr {
        self.source
    }

    /// Where adverts go: the multicast group, or every unicast peer.
    pub fn destinations(&self) -> &[IpAddr] {
        &self.destinations
    }

    /// Sends one VRRP message to `dst` from our primary address, without waiting: a full
    /// send buffer gives `WouldBlock` (the caller decides whether to wait; see
    /// `instance::Runner::send_advert`). IPv4 multicast goes out through the VMAC when there
    /// is one.
    pub fn try_send(&self, msg: &[u8], dst: IpAddr) -> Result<(), NetworkError> {
        let (socket, interface) = match (&self.vmac, dst) {
            (Some(vmac), IpAddr::V4(d)) if d.is_multicast() => (vmac.get_ref(), "the VMAC"),
            _ => (self.fd.get_ref(), self.interface.as_str()),
        };
        self.send_now(socket, msg, dst)
            .map_err(sock_err(interface, "sendmsg advert"))
    }

    /// The receiving sockets, for a loop that waits on them without the runtime.
    pub(crate) fn fds(&self) -> Vec<BorrowedFd<'_>> {
        std::iter::once(self.fd.get_ref().as_fd())
            .chain(self.vmac.as_ref().map(|v| v.get_ref().as_fd()))
            .collect()
    }

    fn send_now(&self, socket: &Socket, msg: &[u8], dst: IpAddr) -> std::io::Result<()> {
        let raw = socket.as_raw_fd();
        let sent = match (self.source, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                // IPv4 sockets are IP_HDRINCL, as keepalived's are: the kernel then neither
                // builds the header nor picks an identification or checks the source (an
                // IP_PKTINFO per advert), which was a tenth of the idle master's kernel time.
                // The socket is bound to its interface, which routes the packet as
                // IP_PKTINFO's ifindex did; the kernel fills in length and checksum.
                let id = self.ip_id.fetch_add(1, Ordering::Relaxed);
                let header = ipv4_header(src, dst, id);
                let iov = [IoSlice::new(&header), IoSlice::new(msg)];
                let to = SockaddrIn::from(std::net::SocketAddrV4::new(dst, 0));
                sendmsg(raw, &iov, &[], MsgFlags::empty(), Some(&to))
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let iov = [IoSlice::new(msg)];
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: src.octets(),
                    },
                    ipi6_ifindex: self.ifindex,
                };
                let scope = if is_link_local(&dst) || dst.is_multicast() {
                    self.ifindex
                } else {
                    0
                };
                let to = SockaddrIn6::from(std::net::SocketAddrV6::new(dst, 0, 0, scope));
                sendmsg(
                    raw,
                    &iov,
                    &[ControlMessage::Ipv6PacketInfo(&info)],
                    MsgFlags::empty(),
                    Some(&to),
                )
            }
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "destination family differs from the socket's",
                ))
            }
        };
        sent.map(|_| ()).map_err(std::io::Error::from)
    }

    /// Receives the next packet into `buf`. Packets too short to carry an IP header are
    /// skipped; everything else is reported, valid or not, for the decoder to judge.
    pub async fn recv(&self, buf: &mut [u8]) -> Result<Received, NetworkError> {
        loop {
            let ready = match &self.vmac {
                None => self.fd.readable().await,
                Some(vmac) => tokio::select! {
                    g = self.fd.readable() => g,
                    g = vmac.readable() => g,
                },
            };
            let mut guard = ready.map_err(sock_err(&self.interface, "poll readable"))?;
            let res = guard.try_io(|fd| self.recv_now(fd.get_ref(), buf));
            match res {
                Ok(Ok(Some(r))) => return Ok(r),
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => return Err(sock_err(&self.interface, "recvmsg")(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn recv_now(&self, socket: &Socket, buf: &mut [u8]) -> std::io::Result<Option<Received>> {
        match self.family {
            Family::V4 => {
                let n = {
                    let mut iov = [IoSliceMut::new(buf)];
                    let msg = recvmsg::<SockaddrStorage>(
                        socket.as_raw_fd(),
                        &mut iov,
                        None,
                        MsgFlags::MSG_DONTWAIT,
                    )?;
                    msg.bytes
                };
                Ok(parse_ipv4(&buf[..n]))
            }
            Family::V6 => {
                let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo, libc::c_int);
                let mut iov = [IoSliceMut::new(buf)];
                let msg = recvmsg::<SockaddrIn6>(
                    socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_DONTWAIT,
                )?;
                let Some(src) = msg.address.map(|a| a.ip()) else {
                    return Ok(None);
                };
                let mut hop = None;
                let mut dst = None;
                for c in msg.cmsgs()? {
                    match c {
                        ControlMessageOwned::Ipv6HopLimit(h) => hop = u8::try_from(h).ok(),
                        ControlMessageOwned::Ipv6PacketInfo(info) => {
                            dst = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr))
                        }
                        _ => {}
                    }
                }
                let (Some(ttl), Some(dst)) = (hop, dst) else {
                    return Ok(None);
                };
                Ok(Some(Received {
                    meta: RxMeta {
                        src: IpAddr::V6(src),
                        dst: IpAddr::V6(dst),
                        ttl,
                    },
                    payload: 0..msg.bytes,
                }))
            }
        }
    }
}

/// Type of service of our IPv4 adverts: precedence 6, internetwork control (DSCP CS6, the
/// class RFC 4594 gives routing protocols), as keepalived sends them.
const TOS_NETWORK_CONTROL: u8 = 0xc0;

/// The IPv4 header of an advert from `src` to `dst`: TTL 255, protocol 112, don't fragment;
/// total length and checksum are left to the kernel (IP_HDRINCL fills them in).
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[1] = TOS_NETWORK_CONTROL;
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6] = 0x40;
    h[8] = REQUIRED_TTL;
    h[9] = IPPROTO_VRRP;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h
}

/// Splits an IPv4 packet as delivered by a raw socket into header facts and payload range.
/// Returns None for anything that is not a whole IPv4 header of protocol 112.
pub fn parse_ipv4(pkt: &[u8]) -> Option<Received> {
    let first = *pkt.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 || pkt.len() < ihl {
        return None;
    }
    if pkt[9] != IPPROTO_VRRP {
        return None;
    }
    // The kernel rewrites tot_len to the host's view; trust the received length but never
    // read past either.
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    let end = if total >= ihl {
        total.min(pkt.len())
    } else {
        pkt.len()
    };
    Some(Received {
        meta: RxMeta {
            src: IpAddr::V4(Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15])),
            dst: IpAddr::V4(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19])),
            ttl: pkt[8],
        },
        payload: ihl..end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_is_an_advert_header_the_receiver_accepts() {
        let src = Ipv4Addr::new(192, 168, 28, 1);
        let h = ipv4_header(src, MULTICAST_V4, 0x1234);
        // A whole header with our message behind it parses back to the same facts.
        let mut pkt = h.to_vec();
        pkt[2..4].copy_from_slice(&28u16.to_be_bytes());
        pkt.extend_from_slice(&[0u8; 8]);
        let rx = parse_ipv4(&pkt).expect("not parsed as VRRP");
        assert_eq!(rx.meta.src, IpAddr::V4(src));
        assert_eq!(rx.meta.dst, IpAddr::V4(MULTICAST_V4));
        assert_eq!(rx.meta.ttl, REQUIRED_TTL);
        assert_eq!(rx.payload, 20..28);
        assert_eq!(&h[4..6], &[0x12, 0x34], "identification");
        assert_eq!(h[1], 0xc0, "TOS: internetwork control");
        assert_eq!(h[6] & 0x40, 0x40, "don't fragment");
    }

    #[test]
    fn ipv4_header_is_parsed_without_panics() {
        let mut pkt = vec![
            0x45, 0, 0, 32, 0, 0, 0, 0, 255, 112, 0, 0, 192, 168, 28, 2, 224, 0, 0, 18,
        ];
        pkt.extend_from_slice(&[0x31, 51, 100, 1, 0, 100, 0, 0, 192, 168, 26, 254]);
        let r = parse_ipv4(&pkt).unwrap();
        assert_eq!(r.meta.ttl, 255);
        assert_eq!(r.meta.src, "192.168.28.2".parse::<IpAddr>().unwrap());
        assert_eq!(r.meta.dst, IpAddr::V4(MULTICAST_V4));
        assert_eq!(r.payload, 20..32);
        for n in 0..pkt.len() {
            let _ = parse_ipv4(&pkt[..n]);
        }
        pkt[9] = 17;
        assert!(parse_ipv4(&pkt).is_none());
        pkt[9] = 112;
        pkt[0] = 0x4f; // IHL 60 > length
        assert!(parse_ipv4(&pkt).is_none());
    }
}
