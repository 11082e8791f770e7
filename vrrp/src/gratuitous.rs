//! Gratuitous ARP (IPv4) and unsolicited Neighbor Advertisement (IPv6) on becoming master,
//! so hosts and switches move the VIPs to us at once (RFC 5798 §6.4.2, RFC 4861 §7.2.6).
//!
//! Owns frame construction (pure, unit-tested) and the two sending sockets: an AF_PACKET
//! socket for ARP, because the frame must come from the VMAC with a chosen sender, and an
//! ICMPv6 raw socket for NA (the kernel fills in the checksum). Scheduling of bursts is the
//! runner's job; this module sends one round when asked.

use std::io::IoSlice;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn6};
use socket2::{Domain, Protocol, Socket, Type};

/// How many announcements and when; defaults follow keepalived
/// (`garp_master_repeat 5`, `garp_master_delay 5`, `garp_master_refresh` off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GratuitousConfig {
    /// Announcements per address in each burst.
    pub repeat: u32,
    /// A second burst this long after becoming master (None: no second burst).
    pub second_burst_after: Option<Duration>,
    /// Periodic re-announcement while master (None: off).
    pub refresh: Option<Duration>,
}

impl Default for GratuitousConfig {
    fn default() -> Self {
        GratuitousConfig {
            repeat: 5,
            second_burst_after: Some(Duration::from_secs(5)),
            refresh: None,
        }
    }
}

/// Errors name the interface and the address.
#[derive(Debug, thiserror::Error)]
pub enum GratuitousError {
    /// Socket setup or send failed.
    #[error("gratuitous {what} on {interface}: {source}")]
    Io {
        /// "ARP socket", "NA for 2001:db8::1", ...
        what: String,
        /// Interface.
        interface: String,
        /// OS error.
        source: std::io::Error,
    },
}

const ETH_P_ARP: u16 = 0x0806;

/// A gratuitous ARP *reply* (RFC 5944 §4.6): broadcast, sender and target IP both the
/// announced address, sender and target MAC ours.
///
/// Not an RFC 5227 announcement (a request): during a takeover the old master still holds
/// the VIP for a moment, and Linux answers a request for its own address — from the old
/// master's VMAC, which has the same MAC as ours, so the switch moves the VMAC back to the
/// old master's port just before that router lets the VIP go, and frames for the VIP go
/// nowhere until the VMAC sends again (seen in the lab: 1.4 s of lost pings after a SIGTERM
/// handoff). Nobody answers a reply; switches learn from it and Linux neighbours update
/// their entries from it the same way.
pub fn arp_announcement(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&2u16.to_be_bytes()); // reply
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    f[32..38].copy_from_slice(&mac);
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// An unsolicited Neighbor Advertisement (RFC 4861 §4.4) body with the Override flag, the
/// Router flag when `router`, and the target link-layer address option. The checksum field is
/// left zero: the kernel computes it for ICMPv6 raw sockets.
pub fn neighbor_advertisement(mac: [u8; 6], target: Ipv6Addr, router: bool) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[0] = 136;
    let mut flags: u8 = 0x20; // Override
    if router {
        flags |= 0x80;
    }
    m[4] = flags;
    m[8..24].copy_from_slice(&target.octets());
    m[24] = 2; // target link-layer address
    m[25] = 1; // length in units of 8 bytes
    m[26..32].copy_from_slice(&mac);
    m
}

/// Sends announcements on one interface.
#[derive(Debug)]
pub struct Announcer {
    interface: String,
    ifindex: u32,
    mac: [u8; 6],
    arp: Option<Socket>,
    icmp6: Option<Socket>,
    router: bool,
}

impl Announcer {
    /// Opens the sockets needed for the families in use on `interface`.
    pub fn open(
        interface: &str,
        ifindex: u32,
        mac: [u8; 6],
        v4: bool,
        v6: bool,
    ) -> Result<Announcer, GratuitousError> {
        let err = |what: &str| {
            let interface = interface.to_string();
            let what = what.to_string();
            move |source| GratuitousError::Io {
                what,
                interface,
                source,
            }
        };
        let arp = if v4 {
            // Protocol 0: this socket only sends, the kernel queues nothing to it.
            let s = Socket::new(Domain::PACKET, Type::RAW.cloexec(), None)
                .map_err(err("ARP socket"))?;
            Some(s)
        } else {
            None
        };
        let icmp6 = if v6 {
            let s = Socket::new(Domain::IPV6, Type::RAW.cloexec(), Some(Protocol::ICMPV6))
                .map_err(err("ICMPv6 socket"))?;
            s.bind_device(Some(interface.as_bytes()))
                .map_err(err("ICMPv6 SO_BINDTODEVICE"))?;
            // RFC 4861 §7.1.2: receivers drop ND messages whose hop limit is not 255.
            s.set_multicast_hops_v6(255)
                .map_err(err("ICMPv6 hop limit"))?;
            s.set_multicast_loop_v6(false).map_err(err("ICMPv6 loop"))?;
            Some(s)
        } else {
            None
        };
        // RFC 4861 §4.4: R flag set when the sender is a router, else hosts drop us from their
        // default router list.
        let router =
            std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{interface}/forwarding"))
                .map(|s| s.trim() == "1")
                .unwrap_or(false);
        Ok(Announcer {
            interface: interface.to_string(),
            ifindex,
            mac,
            arp,
            icmp6,
            router,
        })
    }

    /// Sends one gratuitous ARP for `ip`.
    pub fn announce_v4(&self, ip: Ipv4Addr) -> Result<(), GratuitousError> {
        let Some(sock) = &self.arp else {
            return Ok(());
        };
        let frame = arp_announcement(self.mac, ip);
        send_packet(sock.as_raw_fd(), self.ifindex, &frame).map_err(|source| GratuitousError::Io {
            what: format!("ARP for {ip}"),
            interface: self.interface.clone(),
            source,
        })
    }

    /// Sends one unsolicited NA for `ip` to all-nodes, from `ip` itself.
    pub fn announce_v6(&self, ip: Ipv6Addr) -> Result<(), GratuitousError> {
        let Some(sock) = &self.icmp6 else {
            return Ok(());
        };
        let body = neighbor_advertisement(self.mac, ip, self.router);
        let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        let to = SockaddrIn6::from(std::net::SocketAddrV6::new(all_nodes, 0, 0, self.ifindex));
        let info = libc::in6_pktinfo {
            ipi6_addr: libc::in6_addr {
                s6_addr: ip.octets(),
            },
            ipi6_ifindex: self.ifindex,
        };
        sendmsg(
            sock.as_raw_fd(),
            &[IoSlice::new(&body)],
            &[ControlMessage::Ipv6PacketInfo(&info)],
            MsgFlags::MSG_DONTWAIT,
            Some(&to),
        )
        .map(|_| ())
        .map_err(|e| GratuitousError::Io {
            what: format!("NA for {ip}"),
            interface: self.interface.clone(),
            source: e.into(),
        })
    }
}

/// sendto() on an AF_PACKET socket with a link-layer destination: neither socket2 nor nix
/// offers a safe constructor for `sockaddr_ll`.
#[allow(unsafe_code)]
fn send_packet(fd: i32, ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
    let mut addr: libc::sockaddr_ll = unsafe {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        std::mem::zeroed()
    };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ARP.to_be();
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: `frame` is a valid buffer of `frame.len()` bytes; `addr` is a fully initialised
    // sockaddr_ll and the length passed is its size.
    let rc = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_announcement_layout() {
        let mac = [0, 0, 0x5e, 0, 1, 51];
        let f = arp_announcement(mac, Ipv4Addr::new(192, 168, 26, 254));
        let hex: String = f.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ffffffffffff00005e000133080600010800060400020000\
             5e000133c0a81afe00005e000133c0a81afe"
        );
    }

    #[test]
    fn neighbor_advertisement_layout() {
        let mac = [0, 0, 0x5e, 0, 2, 51];
        let m = neighbor_advertisement(mac, "2001:db8::254".parse().unwrap(), true);
        assert_eq!(m[0], 136);
        assert_eq!(m[4], 0xa0);
        assert_eq!(&m[8..10], &[0x20, 0x01]);
        assert_eq!(&m[24..32], &[2, 1, 0, 0, 0x5e, 0, 2, 51]);
    }
}
