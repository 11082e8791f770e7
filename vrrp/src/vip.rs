//! The virtual addresses and their VMAC interfaces.
//!
//! Owns: one macvlan per (instance, VIP interface, family) with MAC 00:00:5e:00:01:VRID
//! (IPv4) or 00:00:5e:00:02:VRID (IPv6) (RFC 5798 §7.3), in private mode like keepalived,
//! named `vrrp<4|6>.<vrid>.<parent ifindex>` (≤ 15 characters); the sysctls that make it
//! answer ARP for the VIPs and nothing else; adding/removing the VIPs; the gratuitous
//! announcements. With `vmac: false` the VIPs go on the VIP interface itself. It does not
//! decide when: the runner calls it on the state machine's actions.
//!
//! The macvlans stay up in every state (creating one costs more than the whole failover
//! budget at 10 ms adverts); a backup's VMAC sends nothing because IPv6 address generation
//! is disabled on it, so switches never learn the VMAC at a backup. They are deleted only on
//! a clean stop, so after kill -9 the next start finds them with the VIPs and adopts them.

use std::net::IpAddr;

use crate::gratuitous::{Announcer, GratuitousError};
use crate::netlink::{Netlink, NetlinkError};
use crate::packet::Family;

/// One virtual address and the interface it serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct VirtualIp {
    /// Address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Interface whose clients use it (the macvlan's parent).
    pub interface: String,
}

/// VIP handling failures.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    /// Netlink failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The VIP interface does not exist.
    #[error("VIP interface {0}: not found; check vrrp[].virtual_ips[].interface")]
    NoInterface(String),
    /// A sysctl could not be written.
    #[error("sysctl {name}: write {value}: {source}{hint}")]
    Sysctl {
        /// Dotted name.
        name: String,
        /// Value written.
        value: String,
        /// OS error.
        source: std::io::Error,
        /// What to do instead (`; ...`), or empty.
        hint: String,
    },
    /// Gratuitous ARP/NA failed.
    #[error(transparent)]
    Gratuitous(#[from] GratuitousError),
}

/// VMAC for a VRID and family (RFC 5798 §7.3).
pub fn vmac(vrid: u8, family: Family) -> [u8; 6] {
    let f = match family {
        Family::V4 => 1,
        Family::V6 => 2,
    };
    [0x00, 0x00, 0x5e, 0x00, f, vrid]
}

/// Name of the VMAC interface; always ≤ 15 characters (IFNAMSIZ - 1).
pub fn vmac_name(vrid: u8, family: Family, parent_index: u32) -> String {
    let f = match family {
        Family::V4 => 4,
        Family::V6 => 6,
    };
    let name = format!("vrrp{f}.{vrid}.{parent_index}");
    if name.len() <= 15 {
        name
    } else {
        format!("v{f}.{vrid}.{parent_index:x}")
    }
}

/// Writes `/proc/sys/<path>`; the error names the sysctl in dotted form.
pub fn write_sysctl(path: &str, value: &str) -> Result<(), VipError> {
    std::fs::write(format!("/proc/sys/{path}"), value).map_err(|source| VipError::Sysctl {
        name: path.replace('/', "."),
        value: value.to_string(),
        source,
        hint: String::new(),
    })
}

/// Writes `/proc/sys/<path>` unless it already holds `value`. In a pod `/proc/sys` is
/// read-only; a macvlan inherits `net.ipv4.conf.default.*` when it is created and the CNI
/// `tuning` plugin can preset the parent's values, so a pod that prepared them runs with VMAC.
fn ensure_sysctl(
    path: &str,
    value: &str,
    pod_hint: impl FnOnce() -> String,
) -> Result<(), VipError> {
    if read_sysctl(path).as_deref() == Some(value) {
        return Ok(());
    }
    write_sysctl(path, value).map_err(|e| match e {
        VipError::Sysctl {
            name,
            value,
            source,
            ..
        } if source.kind() == std::io::ErrorKind::ReadOnlyFilesystem => VipError::Sysctl {
            name,
            value,
            source,
            hint: format!("; /proc/sys is read-only (a container): {}", pod_hint()),
        },
        e => e,
    })
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// One per-interface sysctl, `net.<family>.conf.<interface>.<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfSysctl {
    /// `ipv4` or `ipv6`.
    pub family: &'static str,
    /// The leaf name, e.g. `arp_ignore`.
    pub name: &'static str,
    /// The value a VMAC setup needs.
    pub value: &'static str,
}

impl IfSysctl {
    /// The dotted name for `interface` (`default`: what new interfaces inherit).
    pub fn key(&self, interface: &str) -> String {
        format!("net.{}.conf.{interface}.{}", self.family, self.name)
    }

    fn path(&self, interface: &str) -> String {
        format!("net/{}/conf/{interface}/{}", self.family, self.name)
    }
}

const fn v4(name: &'static str, value: &'static str) -> IfSysctl {
    IfSysctl {
        family: "ipv4",
        name,
        value,
    }
}

const fn v6(name: &'static str, value: &'static str) -> IfSysctl {
    IfSysctl {
        family: "ipv6",
        name,
        value,
    }
}

/// Sysctls keepalived sets for an IPv4 VMAC: on the macvlan answer ARP only for its own
/// addresses (arp_ignore=1), accept packets from local addresses (accept_local=1), no
/// reverse-path filter (traffic to the VIP arrives on the macvlan while routes point at the
/// parent), keep secondaries when the primary goes (promote_secondaries=1).
/// Plus: no IPv6 on an IPv4 VMAC (disable_ipv6=1), so a backup never sends from the shared
/// MAC; an interface created with `addr_gen_mode` 1 (no link-local address) sends no IPv6
/// either and is accepted instead, since that is what a pod that also runs an IPv6 VMAC can
/// preset through `net.ipv6.conf.default`.
pub const V4_VMAC_SYSCTLS: &[IfSysctl] = &[
    v4("arp_ignore", "1"),
    v4("accept_local", "1"),
    v4("rp_filter", "0"),
    v4("promote_secondaries", "1"),
    v6("disable_ipv6", "1"),
];

/// On the parent of an IPv4 VMAC: never answer ARP for addresses that live on the macvlan
/// (arp_ignore=1, arp_filter=1), and never use a VIP as sender of its own ARP requests
/// (arp_announce=2): a request "who has client? tell VIP" from the parent's MAC would repoint
/// the client's VIP entry away from the VMAC.
pub const V4_PARENT_SYSCTLS: &[IfSysctl] = &[
    v4("arp_ignore", "1"),
    v4("arp_filter", "1"),
    v4("arp_announce", "2"),
];

/// On an IPv6 VMAC: no link-local or SLAAC address, so only the VIPs (added as master) send
/// from it, and no DAD for them.
pub const V6_VMAC_SYSCTLS: &[IfSysctl] = &[v6("addr_gen_mode", "1"), v6("accept_dad", "0")];

/// What a VMAC of `family` needs on itself and on its parent interface.
pub fn vmac_sysctls(family: Family) -> (&'static [IfSysctl], &'static [IfSysctl]) {
    match family {
        Family::V4 => (V4_VMAC_SYSCTLS, V4_PARENT_SYSCTLS),
        Family::V6 => (V6_VMAC_SYSCTLS, &[]),
    }
}

/// Sets the VMAC's and its parent's sysctls (see [`vmac_sysctls`]), leaving values that are
/// already right alone.
pub fn set_vmac_sysctls(vmac_if: &str, parent: &str, family: Family) -> Result<(), VipError> {
    let ipv6 = std::path::Path::new("/proc/sys/net/ipv6").exists();
    let (own, on_parent) = vmac_sysctls(family);
    for s in own {
        if s.family == "ipv6" && !ipv6 {
            continue;
        }
        if family == Family::V4
            && s.name == "disable_ipv6"
            && read_sysctl(&v6("addr_gen_mode", "1").path(vmac_if)).as_deref() == Some("1")
        {
            continue;
        }
        ensure_sysctl(&s.path(vmac_if), s.value, || {
            format!(
                "preset {}={} in the pod's securityContext.sysctls, which a new VMAC inherits",
                s.key("default"),
                s.value
            )
        })?;
    }
    for s in on_parent {
        ensure_sysctl(&s.path(parent), s.value, || {
            format!(
                "set it with the CNI tuning plugin of the attachment ({{\"type\": \"tuning\", \"sysctl\": {{\"{}\": \"{}\"}}}})",
                s.key("IFNAME"),
                s.value
            )
        })?;
    }
    if read_sysctl("net/ipv4/conf/all/rp_filter").is_some_and(|v| v != "0") {
        tracing::warn!(
            interface = vmac_if,
            "net.ipv4.conf.all.rp_filter is non-zero: the kernel uses max(all, {vmac_if}), so \
             traffic to the VIPs may be dropped; set it to 0 and rp_filter per interface instead"
        );
    }
    Ok(())
}

#[derive(Debug)]
struct Group {
    family: Family,
    parent: String,
    target_name: String,
    target_index: u32,
    mac: [u8; 6],
    vips: Vec<(IpAddr, u8)>,
    announcer: Announcer,
}

/// The VIPs of one instance.
#[derive(Debug)]
pub struct VipSet {
    nl: Netlink,
    vmac: bool,
    groups: Vec<Group>,
}

impl VipSet {
    /// Resolves the interfaces and, with `vmac`, creates (or adopts) the macvlans with their
    /// sysctls and brings them up. Nothing is added or removed here.
    pub async fn prepare(
        nl: Netlink,
        vrid: u8,
        use_vmac: bool,
        vips: &[VirtualIp],
    ) -> Result<VipSet, VipError> {
        let mut groups: Vec<Group> = Vec::new();
        for vip in vips {
            let family = Family::of(&vip.addr);
            if let Some(g) = groups
                .iter_mut()
                .find(|g| g.parent == vip.interface && g.family == family)
            {
                g.vips.push((vip.addr, vip.prefix_len));
                continue;
            }
            let parent = nl
                .link(&vip.interface)
                .await?
                .ok_or_else(|| VipError::NoInterface(vip.interface.clone()))?;
            let (target_name, target_index, mac) = if use_vmac {
                let name = vmac_name(vrid, family, parent.index);
                let mac = vmac(vrid, family);
                let existing = nl.link(&name).await?;
                let reusable = existing
                    .as_ref()
                    .is_some_and(|l| l.mac == mac && l.parent == Some(parent.index));
                if let (Some(l), false) = (&existing, reusable) {
                    nl.del_link(l.index, &name).await?;
                }
                if !reusable {
                    nl.add_macvlan(&name, parent.index, mac).await?;
                }
                let link = nl
                    .link(&name)
                    .await?
                    .ok_or_else(|| VipError::NoInterface(name.clone()))?;
                set_vmac_sysctls(&name, &vip.interface, family)?;
                if !link.up {
                    nl.set_up(link.index, &name).await?;
                }
                (name, link.index, mac)
            } else {
                let mut mac = [0u8; 6];
                if parent.mac.len() == 6 {
                    mac.copy_from_slice(&parent.mac);
                }
                (vip.interface.clone(), parent.index, mac)
            };
            let announcer = Announcer::open(
                &target_name,
                target_index,
                mac,
                family == Family::V4,
                family == Family::V6,
            )?;
            groups.push(Group {
                family,
                parent: vip.interface.clone(),
                target_name,
                target_index,
                mac,
                vips: vec![(vip.addr, vip.prefix_len)],
                announcer,
            });
        }
        Ok(VipSet {
            nl,
            vmac: use_vmac,
            groups,
        })
    }

    /// Interfaces holding the VIPs (the macvlans, or the VIP interfaces without VMAC).
    pub fn interfaces(&self) -> Vec<String> {
        self.groups.iter().map(|g| g.target_name.clone()).collect()
    }

    /// True if any VIP is already on its interface (restart while master).
    pub async fn any_present(&self) -> Result<bool, VipError> {
        for g in &self.groups {
            let have = self.nl.addresses(g.target_index).await?;
            if g.vips.iter().any(|(a, _)| have.iter().any(|(h, _)| h == a)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Adds the VIPs that are missing; present ones are untouched (no flap).
    pub async fn add_all(&self) -> Result<(), VipError> {
        for g in &self.groups {
            let have = self.nl.addresses(g.target_index).await?;
            for (a, p) in &g.vips {
                if !have.iter().any(|(h, hp)| h == a && hp == p) {
                    self.nl.add_address(g.target_index, *a, *p).await?;
                }
            }
        }
        Ok(())
    }

    /// Removes the VIPs.
    pub async fn remove_all(&self) -> Result<(), VipError> {
        for g in &self.groups {
            for (a, p) in &g.vips {
                self.nl.del_address(g.target_index, *a, *p).await?;
            }
        }
        Ok(())
    }

    /// One round of announcements: `repeat` gratuitous ARPs / NAs per VIP. Errors are
    /// returned after trying every address.
    pub fn announce(&self, repeat: u32) -> Result<(), VipError> {
        let mut first_err = None;
        for _ in 0..repeat {
            for g in &self.groups {
                for (a, _) in &g.vips {
                    let r = match a {
                        IpAddr::V4(v4) => g.announcer.announce_v4(*v4),
                        IpAddr::V6(v6) => g.announcer.announce_v6(*v6),
                    };
                    if let Err(e) = r {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Deletes the macvlans (clean stop only; the VIPs go with them).
    pub async fn teardown(&self) -> Result<(), VipError> {
        if !self.vmac {
            return Ok(());
        }
        for g in &self.groups {
            self.nl.del_link(g.target_index, &g.target_name).await?;
        }
        Ok(())
    }

    /// Our VMAC interface on `parent`, if VMACs are in use there.
    pub fn vmac_on(&self, parent: &str) -> Option<String> {
        if !self.vmac {
            return None;
        }
        self.groups
            .iter()
            .find(|g| g.parent == parent)
            .map(|g| g.target_name.clone())
    }

    /// The MAC the VIPs answer with, per interface (for tests and status).
    pub fn macs(&self) -> Vec<(String, [u8; 6])> {
        self.groups
            .iter()
            .map(|g| (g.target_name.clone(), g.mac))
            .collect()
    }
}

/// Removes `vips` from where an instance with `vrid` and `use_vmac` keeps them, without
/// creating anything: for a daemon that restarts an instance with a smaller VIP set and lets
/// the new run adopt the rest, so addresses no longer configured do not linger. Missing
/// interfaces and addresses are fine.
pub async fn remove_addresses(
    nl: &Netlink,
    vrid: u8,
    use_vmac: bool,
    vips: &[VirtualIp],
) -> Result<(), VipError> {
    for vip in vips {
        let Some(parent) = nl.link(&vip.interface).await? else {
            continue;
        };
        let target = if use_vmac {
            match nl
                .link(&vmac_name(vrid, Family::of(&vip.addr), parent.index))
                .await?
            {
                Some(l) => l.index,
                None => continue,
            }
        } else {
            parent.index
        };
        nl.del_address(target, vip.addr, vip.prefix_len).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz() {
        assert_eq!(vmac_name(51, Family::V4, 3), "vrrp4.51.3");
        assert_eq!(vmac_name(255, Family::V6, 99999), "vrrp6.255.99999");
        for idx in [0, 7, 123_456, u32::MAX] {
            for vrid in [1, 255] {
                assert!(vmac_name(vrid, Family::V6, idx).len() <= 15);
            }
        }
        assert_eq!(vmac(51, Family::V4), [0, 0, 0x5e, 0, 1, 51]);
        assert_eq!(vmac(51, Family::V6), [0, 0, 0x5e, 0, 2, 51]);
    }

    #[test]
    fn sysctl_error_names_the_sysctl() {
        let e = write_sysctl("net/ipv4/conf/no-such-if-xyz/arp_ignore", "1").unwrap_err();
        assert!(
            e.to_string()
                .contains("net.ipv4.conf.no-such-if-xyz.arp_ignore"),
            "{e}"
        );
    }
}
