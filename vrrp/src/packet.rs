//! VRRP advertisement codec: VRRPv3 (RFC 5798, RFC 9568) over IPv4 and IPv6 and VRRPv2
//! (RFC 3768) over IPv4.
//!
//! Owns the wire format and every validity check that can be made from the bytes plus the
//! IP-layer facts the socket reports (source, destination, TTL / hop limit). It never touches
//! a socket or a clock and never panics on any input (a fuzz target in `fuzz/` holds it to
//! that). Decisions about *what to do* with a valid advert belong to `fsm`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// IP protocol number of VRRP (RFC 5798 §5.1.1.4).
pub const IPPROTO_VRRP: u8 = 112;
/// IPv4 multicast group of VRRP (RFC 5798 §5.1.1.2).
pub const MULTICAST_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// IPv6 multicast group of VRRP (RFC 5798 §5.1.2.2).
pub const MULTICAST_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);
/// TTL / hop limit every VRRP packet must carry (RFC 5798 §5.1.1.3, §5.1.2.3).
pub const REQUIRED_TTL: u8 = 255;

const HEADER_LEN: usize = 8;
/// VRRPv2 carries 8 bytes of authentication data after the addresses (RFC 3768 §5.3.10).
const V2_AUTH_DATA_LEN: usize = 8;
const TYPE_ADVERTISEMENT: u8 = 1;
/// VRRPv3's Max Adver Int is 12 bits of centiseconds (RFC 5798 §5.2.7).
pub const V3_MAX_ADVER_INT_CS: u16 = 0x0fff;

/// Protocol version on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Version {
    /// RFC 3768: IPv4 only, interval in whole seconds, authentication field.
    V2,
    /// RFC 5798 / RFC 9568: IPv4 and IPv6, interval in centiseconds.
    V3,
}

impl Version {
    fn wire(self) -> u8 {
        match self {
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }
}

/// Address family of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// `IPv4` or `IPv6`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// Family of an address.
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn addr_len(self) -> usize {
        match self {
            Family::V4 => 4,
            Family::V6 => 16,
        }
    }
}

/// Which bytes the VRRPv3-over-IPv4 checksum covers.
///
/// RFC 5798 §5.2.8 says the checksum covers a pseudo-header like every other upper-layer
/// protocol; keepalived does so by default, while some implementations (and keepalived with
/// `v3_checksum_as_v2`) checksum the VRRP message only, as VRRPv2 did. VRRPv2 always uses the
/// message only and VRRPv3 over IPv6 always uses the IPv6 pseudo-header, whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ChecksumMode {
    /// Pseudo-header + message (RFC 5798, keepalived default).
    #[default]
    PseudoHeader,
    /// Message only (keepalived `v3_checksum_as_v2`).
    MessageOnly,
}

/// One VRRP advertisement, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertisement {
    /// Protocol version.
    pub version: Version,
    /// Virtual router id, 1–255.
    pub vrid: u8,
    /// Sender's priority; 0 means "master is leaving", 255 the address owner.
    pub priority: u8,
    /// The interval field as on the wire: centiseconds (v3, 12 bits) or seconds (v2).
    pub adver_int: u16,
    /// The virtual addresses, all of the instance's family.
    pub addresses: Vec<IpAddr>,
}

impl Advertisement {
    /// The advertised interval as a duration.
    pub fn interval(&self) -> Duration {
        match self.version {
            Version::V2 => Duration::from_secs(u64::from(self.adver_int)),
            Version::V3 => Duration::from_millis(u64::from(self.adver_int) * 10),
        }
    }

    /// Converts an interval to the wire field of `version`, rounding down to the field's unit
    /// (at least one unit) and saturating at the field's maximum.
    pub fn adver_int_field(version: Version, interval: Duration) -> u16 {
        match version {
            Version::V2 => interval.as_secs().clamp(1, 255) as u16,
            Version::V3 => {
                let cs = interval.as_millis() / 10;
                cs.clamp(1, u128::from(V3_MAX_ADVER_INT_CS)) as u16
            }
        }
    }

    /// Encodes the advertisement; `src` and `dst` are the IP header's addresses, needed for the
    /// pseudo-header checksum.
    pub fn encode(
        &self,
        src: IpAddr,
        dst: IpAddr,
        mode: ChecksumMode,
    ) -> Result<Vec<u8>, EncodeError> {
        let family = Family::of(&src);
        if Family::of(&dst) != family {
            return Err(EncodeError::FamilyMismatch);
        }
        if self.version == Version::V2 && family == Family::V6 {
            return Err(EncodeError::V2OverIpv6);
        }
        if self.addresses.iter().any(|a| Family::of(a) != family) {
            return Err(EncodeError::FamilyMismatch);
        }
        let count = u8::try_from(self.addresses.len())
            .map_err(|_| EncodeError::TooManyAddresses(self.addresses.len()))?;
        let mut buf = Vec::with_capacity(
            HEADER_LEN + self.addresses.len() * family.addr_len() + V2_AUTH_DATA_LEN,
        );
        buf.push((self.version.wire() << 4) | TYPE_ADVERTISEMENT);
        buf.push(self.vrid);
        buf.push(self.priority);
        buf.push(count);
        match self.version {
            Version::V2 => {
                // Auth type 0 (RFC 3768 §5.3.6.1), interval in seconds.
                buf.push(0);
                buf.push(u8::try_from(self.adver_int).unwrap_or(u8::MAX));
            }
            Version::V3 => {
                let field = self.adver_int & V3_MAX_ADVER_INT_CS;
                buf.extend_from_slice(&field.to_be_bytes());
            }
        }
        buf.extend_from_slice(&[0, 0]);
        for addr in &self.addresses {
            match addr {
                IpAddr::V4(a) => buf.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => buf.extend_from_slice(&a.octets()),
            }
        }
        if self.version == Version::V2 {
            buf.extend_from_slice(&[0; V2_AUTH_DATA_LEN]);
        }
        let sum = checksum(self.version, mode, src, dst, &buf);
        buf[6..8].copy_from_slice(&sum.to_be_bytes());
        Ok(buf)
    }
}

/// Why an advertisement could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Source, destination and virtual addresses must share one family.
    #[error("VRRP advert: source, destination and virtual addresses must all be IPv4 or all IPv6")]
    FamilyMismatch,
    /// VRRPv2 is defined for IPv4 only.
    #[error("VRRP advert: VRRPv2 is IPv4 only; use version 3 for IPv6")]
    V2OverIpv6,
    /// More than 255 addresses do not fit the count field.
    #[error("VRRP advert: {0} virtual addresses do not fit the 8-bit count; split the instance")]
    TooManyAddresses(usize),
}

/// IP-layer facts about a received packet, from the IP header or the socket's control
/// messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxMeta {
    /// IP source address.
    pub src: IpAddr,
    /// IP destination address (the multicast group or our unicast address).
    pub dst: IpAddr,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
}

/// What the receiver expects; everything else is rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeContext {
    /// Version this instance runs.
    pub version: Version,
    /// Family this instance runs.
    pub family: Family,
    /// VRIDs configured on this socket.
    pub vrids: BTreeSet<u8>,
    /// Checksum variant for VRRPv3 over IPv4.
    pub checksum_mode: ChecksumMode,
}

/// Why a received packet was rejected. `reason()` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// TTL / hop limit was not 255: the packet was routed, or forged off-link.
    #[error("TTL/hop limit {0}, must be 255 (packet was routed or forged)")]
    Ttl(u8),
    /// Version nibble is not the configured version.
    #[error("version {got}, instance runs version {want}")]
    Version {
        /// Version on the wire.
        got: u8,
        /// Configured version.
        want: u8,
    },
    /// Type nibble is not 1 (advertisement).
    #[error("type {0}, only 1 (advertisement) exists")]
    Type(u8),
    /// Too short for the header, or the length disagrees with the address count.
    #[error("length {len} does not match {count} addresses")]
    Length {
        /// Bytes received.
        len: usize,
        /// Address count field.
        count: u8,
    },
    /// Address count 0 (RFC 5798 §5.2.5: the minimum is 1).
    #[error("address count 0 (the minimum is 1)")]
    AddressCount,
    /// Checksum mismatch.
    #[error(
        "checksum 0x{got:04x}, computed 0x{want:04x} (check v3_checksum_as_v2 / checksum mode)"
    )]
    Checksum {
        /// Checksum on the wire.
        got: u16,
        /// Checksum computed.
        want: u16,
    },
    /// VRID is not configured here.
    #[error("VRID {0} is not configured here")]
    UnknownVrid(u8),
    /// IP family of the packet differs from the instance's (or v2 over IPv6).
    #[error("address family does not match the instance")]
    AddressFamily,
    /// VRRPv2 authentication other than none (RFC 3768 §5.3.6; types 1 and 2 are deprecated).
    #[error("VRRPv2 auth type {0}, only 0 (none) is supported; remove authentication on the peer")]
    AuthType(u8),
    /// VRRPv2 advert interval differs from ours (RFC 3768 §7.1 requires discarding it).
    #[error("VRRPv2 advert interval {got}s, configured {want}s")]
    IntervalMismatch {
        /// Interval on the wire, seconds.
        got: u8,
        /// Configured interval, seconds.
        want: u8,
    },
}

impl DecodeError {
    /// Low-cardinality label for metrics and status.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Ttl(_) => "ttl",
            DecodeError::Version { .. } => "version",
            DecodeError::Type(_) => "type",
            DecodeError::Length { .. } => "length",
            DecodeError::AddressCount => "address_count",
            DecodeError::Checksum { .. } => "checksum",
            DecodeError::UnknownVrid(_) => "unknown_vrid",
            DecodeError::AddressFamily => "address_family",
            DecodeError::AuthType(_) => "auth_type",
            DecodeError::IntervalMismatch { .. } => "interval_mismatch",
        }
    }

    /// Every label `reason()` can return, for pre-registering metric series.
    pub const REASONS: [&'static str; 10] = [
        "ttl",
        "version",
        "type",
        "length",
        "address_count",
        "checksum",
        "unknown_vrid",
        "address_family",
        "auth_type",
        "interval_mismatch",
    ];
}

/// Decodes a VRRP message (the IP payload) and applies the RFC 5798 §7.1 / RFC 3768 §7.1
/// receive checks that need no instance state. `v2_interval_s` is the configured VRRPv2
/// interval in seconds, used for the v2 interval check (ignored for v3).
pub fn decode(
    buf: &[u8],
    meta: &RxMeta,
    ctx: &DecodeContext,
    v2_interval_s: Option<u8>,
) -> Result<Advertisement, DecodeError> {
    if Family::of(&meta.src) != ctx.family || Family::of(&meta.dst) != ctx.family {
        return Err(DecodeError::AddressFamily);
    }
    if ctx.version == Version::V2 && ctx.family == Family::V6 {
        return Err(DecodeError::AddressFamily);
    }
    if meta.ttl != REQUIRED_TTL {
        return Err(DecodeError::Ttl(meta.ttl));
    }
    let Some(&[ver_type, vrid, priority, count, b4, b5, _, _]) = buf.get(..HEADER_LEN) else {
        return Err(DecodeError::Length {
            len: buf.len(),
            count: buf.get(3).copied().unwrap_or(0),
        });
    };
    let got_version = ver_type >> 4;
    if got_version != ctx.version.wire() {
        return Err(DecodeError::Version {
            got: got_version,
            want: ctx.version.wire(),
        });
    }
    let ty = ver_type & 0x0f;
    if ty != TYPE_ADVERTISEMENT {
        return Err(DecodeError::Type(ty));
    }
    if count == 0 {
        return Err(DecodeError::AddressCount);
    }
    let addr_len = ctx.family.addr_len();
    let addrs_end = HEADER_LEN + usize::from(count) * addr_len;
    let length_ok = match ctx.version {
        Version::V3 => buf.len() == addrs_end,
        // RFC 3768 puts 8 bytes of authentication data after the addresses; accept senders
        // that leave it out, since with auth type 0 it carries nothing.
        Version::V2 => buf.len() == addrs_end + V2_AUTH_DATA_LEN || buf.len() == addrs_end,
    };
    if !length_ok {
        return Err(DecodeError::Length {
            len: buf.len(),
            count,
        });
    }
    let got_sum = u16::from_be_bytes([buf[6], buf[7]]);
    let want_sum = checksum_for_verify(ctx.version, ctx.checksum_mode, meta.src, meta.dst, buf);
    if got_sum != want_sum {
        return Err(DecodeError::Checksum {
            got: got_sum,
            want: want_sum,
        });
    }
    if !ctx.vrids.contains(&vrid) {
        return Err(DecodeError::UnknownVrid(vrid));
    }
    let adver_int = match ctx.version {
        Version::V2 => {
            if b4 != 0 {
                return Err(DecodeError::AuthType(b4));
            }
            if let Some(want) = v2_interval_s {
                if b5 != want {
                    return Err(DecodeError::IntervalMismatch { got: b5, want });
                }
            }
            u16::from(b5)
        }
        // The top 4 bits are reserved: ignored on receipt (RFC 5798 §5.2.6).
        Version::V3 => u16::from_be_bytes([b4, b5]) & V3_MAX_ADVER_INT_CS,
    };
    let addresses = buf[HEADER_LEN..addrs_end]
        .chunks_exact(addr_len)
        .map(|c| match ctx.family {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(c[0], c[1], c[2], c[3])),
            Family::V6 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(c);
                IpAddr::V6(Ipv6Addr::from(o))
            }
        })
        .collect();
    Ok(Advertisement {
        version: ctx.version,
        vrid,
        priority,
        adver_int,
        addresses,
    })
}

/// Computes the checksum of `msg` with its checksum field treated as zero.
fn checksum_for_verify(
    version: Version,
    mode: ChecksumMode,
    src: IpAddr,
    dst: IpAddr,
    msg: &[u8],
) -> u16 {
    let mut acc = Accumulator::default();
    add_pseudo_header(&mut acc, version, mode, src, dst, msg.len());
    acc.add(&msg[..6]);
    acc.add(&msg[8..]);
    acc.finish()
}

/// Computes the checksum of `msg`, whose checksum field must be zero.
pub fn checksum(version: Version, mode: ChecksumMode, src: IpAddr, dst: IpAddr, msg: &[u8]) -> u16 {
    let mut acc = Accumulator::default();
    add_pseudo_header(&mut acc, version, mode, src, dst, msg.len());
    acc.add(msg);
    acc.finish()
}

fn add_pseudo_header(
    acc: &mut Accumulator,
    version: Version,
    mode: ChecksumMode,
    src: IpAddr,
    dst: IpAddr,
    len: usize,
) {
    match (version, src, dst) {
        (Version::V2, _, _) => {}
        (Version::V3, IpAddr::V4(s), IpAddr::V4(d)) => {
            if mode == ChecksumMode::PseudoHeader {
                acc.add(&s.octets());
                acc.add(&d.octets());
                acc.add(&[0, IPPROTO_VRRP]);
                acc.add(&(len as u16).to_be_bytes());
            }
        }
        // RFC 8200 §8.1: the IPv6 pseudo-header is mandatory for every upper-layer checksum.
        (Version::V3, IpAddr::V6(s), IpAddr::V6(d)) => {
            acc.add(&s.octets());
            acc.add(&d.octets());
            acc.add(&(len as u32).to_be_bytes());
            acc.add(&[0, 0, 0, IPPROTO_VRRP]);
        }
        // Mixed families are rejected before any checksum is computed.
        (Version::V3, _, _) => {}
    }
}

/// RFC 1071 one's-complement sum. Every chunk added here has an even length except possibly
/// the last, so odd bytes are padded with zero as the RFC requires.
#[derive(Default)]
struct Accumulator {
    sum: u32,
}

impl Accumulator {
    fn add(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(2);
        for c in &mut chunks {
            self.sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            self.sum += u32::from(*last) << 8;
        }
        self.sum = (self.sum & 0xffff) + (self.sum >> 16);
    }

    fn finish(self) -> u16 {
        let mut s = self.sum;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn ctx(version: Version, family: Family, mode: ChecksumMode) -> DecodeContext {
        DecodeContext {
            version,
            family,
            vrids: [51].into_iter().collect(),
            checksum_mode: mode,
        }
    }

    fn meta4(ttl: u8) -> RxMeta {
        RxMeta {
            src: "192.168.28.2".parse().unwrap(),
            dst: MULTICAST_V4.into(),
            ttl,
        }
    }

    // keepalived-style VRRPv3 advert, built by hand from RFC 5798 §5.1:
    // 0x31 (v3, type 1), VRID 51 (0x33), priority 150 (0x96), 1 address,
    // max adver int 100 cs (0x064), checksum, 192.168.26.254.
    // Checksum by hand over the pseudo-header (RFC 5798 §5.2.8) + message, 16-bit words:
    //   c0a8 + 1c02 (src 192.168.28.2) + e000 + 0012 (dst 224.0.0.18) + 0070 (proto 112)
    //   + 000c (length 12) + 3133 + 9601 + 0064 + 0000 + c0a8 + 1afe
    //   = 0x3_6076 -> fold: 0x6076 + 3 = 0x6079 -> complement 0x9f86.
    const V3_V4_PSEUDO: &str = "3133 9601 0064 9f86 c0a8 1afe";
    // Same message, checksum over the message only (keepalived v3_checksum_as_v2):
    //   3133 + 9601 + 0064 + c0a8 + 1afe = 0x1_a33e -> 0xa33f -> complement 0x5cc0.
    const V3_V4_MSG_ONLY: &str = "3133 9601 0064 5cc0 c0a8 1afe";
    // VRRPv2, VRID 51, priority 100 (0x64), 1 address, auth 0, interval 1 s, 8 bytes auth data:
    //   2133 + 6401 + 0001 + c0a8 + 1afe = 0x1_60db -> 0x60dc -> complement 0x9f23.
    const V2_V4: &str = "2133 6401 0001 9f23 c0a8 1afe 0000 0000 0000 0000";

    #[test]
    fn v3_ipv4_pseudo_header_fixture_round_trips() {
        let bytes = hex(V3_V4_PSEUDO);
        let adv = decode(
            &bytes,
            &meta4(255),
            &ctx(Version::V3, Family::V4, ChecksumMode::PseudoHeader),
            None,
        )
        .unwrap();
        assert_eq!(adv.vrid, 51);
        assert_eq!(adv.priority, 150);
        assert_eq!(adv.adver_int, 100);
        assert_eq!(adv.interval(), Duration::from_secs(1));
        assert_eq!(
            adv.addresses,
            vec!["192.168.26.254".parse::<IpAddr>().unwrap()]
        );
        let m = meta4(255);
        assert_eq!(
            adv.encode(m.src, m.dst, ChecksumMode::PseudoHeader)
                .unwrap(),
            bytes
        );
    }

    #[test]
    fn v3_ipv4_message_only_fixture_round_trips_and_modes_do_not_mix() {
        let bytes = hex(V3_V4_MSG_ONLY);
        let m = meta4(255);
        let adv = decode(
            &bytes,
            &m,
            &ctx(Version::V3, Family::V4, ChecksumMode::MessageOnly),
            None,
        )
        .unwrap();
        assert_eq!(
            adv.encode(m.src, m.dst, ChecksumMode::MessageOnly).unwrap(),
            bytes
        );
        let err = decode(
            &bytes,
            &m,
            &ctx(Version::V3, Family::V4, ChecksumMode::PseudoHeader),
            None,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "checksum");
        let err = decode(
            &hex(V3_V4_PSEUDO),
            &m,
            &ctx(Version::V3, Family::V4, ChecksumMode::MessageOnly),
            None,
        )
        .unwrap_err();
        assert_eq!(
            err,
            DecodeError::Checksum {
                got: 0x9f86,
                want: 0x5cc0
            }
        );
    }

    #[test]
    fn v2_fixture_round_trips() {
        let bytes = hex(V2_V4);
        let m = meta4(255);
        let c = ctx(Version::V2, Family::V4, ChecksumMode::PseudoHeader);
        let adv = decode(&bytes, &m, &c, Some(1)).unwrap();
        assert_eq!(adv.version, Version::V2);
        assert_eq!(adv.priority, 100);
        assert_eq!(adv.interval(), Duration::from_secs(1));
        // v2 ignores the checksum mode: the message alone is summed.
        assert_eq!(
            adv.encode(m.src, m.dst, ChecksumMode::PseudoHeader)
                .unwrap(),
            bytes
        );
        assert_eq!(
            decode(&bytes, &m, &c, Some(2)).unwrap_err(),
            DecodeError::IntervalMismatch { got: 1, want: 2 }
        );
        // Without the trailing auth data it is still accepted.
        let short = &bytes[..12];
        let mut short = short.to_vec();
        short[6..8].copy_from_slice(&[0, 0]);
        let sum = checksum(
            Version::V2,
            ChecksumMode::PseudoHeader,
            m.src,
            m.dst,
            &short,
        );
        short[6..8].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(sum, 0x9f23);
        assert!(decode(&short, &m, &c, Some(1)).is_ok());
    }

    /// An advert captured with tcpdump from keepalived 2.2.7 (vrrp_version 3, advert_int 0.1,
    /// priority 100, VRID 51, 192.168.28.2 -> 224.0.0.18): our checksum agrees with its
    /// pseudo-header default.
    #[test]
    fn decodes_keepalived_capture() {
        let bytes = hex("3133 6401 000a cfe0 c0a8 1cfe");
        let adv = decode(
            &bytes,
            &meta4(255),
            &ctx(Version::V3, Family::V4, ChecksumMode::PseudoHeader),
            None,
        )
        .unwrap();
        assert_eq!(adv.priority, 100);
        assert_eq!(adv.interval(), Duration::from_millis(100));
        let m = meta4(255);
        assert_eq!(
            adv.encode(m.src, m.dst, ChecksumMode::PseudoHeader)
                .unwrap(),
            bytes
        );
    }

    #[test]
    fn v2_rejects_authentication() {
        let mut bytes = hex(V2_V4);
        bytes[4] = 1; // simple text password
        let m = meta4(255);
        bytes[6..8].copy_from_slice(&[0, 0]);
        let sum = checksum(
            Version::V2,
            ChecksumMode::PseudoHeader,
            m.src,
            m.dst,
            &bytes,
        );
        bytes[6..8].copy_from_slice(&sum.to_be_bytes());
        let err = decode(
            &bytes,
            &m,
            &ctx(Version::V2, Family::V4, ChecksumMode::PseudoHeader),
            None,
        )
        .unwrap_err();
        assert_eq!(err, DecodeError::AuthType(1));
        assert_eq!(err.reason(), "auth_type");
    }

    #[test]
    fn v3_ipv6_uses_pseudo_header() {
        let src: IpAddr = "fe80::1".parse().unwrap();
        let dst: IpAddr = MULTICAST_V6.into();
        let adv = Advertisement {
            version: Version::V3,
            vrid: 51,
            priority: 100,
            adver_int: 1,
            addresses: vec![
                "fe80::51".parse().unwrap(),
                "2001:db8::254".parse().unwrap(),
            ],
        };
        let bytes = adv.encode(src, dst, ChecksumMode::MessageOnly).unwrap();
        assert_eq!(bytes.len(), 8 + 32);
        // Hand-summed: pseudo-header fe80+0001 (src) + ff02+0012 (dst) + 0028 (len 40)
        // + 0070 (next header), message 3133+6402+0001, fe80+0051, 2001+0db8+0254
        //   = 0x3_c241 -> 0xc244 -> complement 0x3dbb.
        assert_eq!(&bytes[6..8], &[0x3d, 0xbb]);
        let meta = RxMeta { src, dst, ttl: 255 };
        let c = ctx(Version::V3, Family::V6, ChecksumMode::MessageOnly);
        assert_eq!(decode(&bytes, &meta, &c, None).unwrap(), adv);
        // A different source breaks the pseudo-header sum.
        let other = RxMeta {
            src: "fe80::2".parse().unwrap(),
            ..meta
        };
        assert_eq!(
            decode(&bytes, &other, &c, None).unwrap_err().reason(),
            "checksum"
        );
    }

    #[test]
    fn rejects_with_reasons() {
        let good = hex(V3_V4_PSEUDO);
        let c = ctx(Version::V3, Family::V4, ChecksumMode::PseudoHeader);
        let m = meta4(255);
        assert_eq!(
            decode(&good, &meta4(254), &c, None).unwrap_err(),
            DecodeError::Ttl(254)
        );
        let c2 = ctx(Version::V2, Family::V4, ChecksumMode::PseudoHeader);
        assert_eq!(
            decode(&good, &m, &c2, None).unwrap_err().reason(),
            "version"
        );
        let mut t = good.clone();
        t[0] = 0x32;
        assert_eq!(decode(&t, &m, &c, None).unwrap_err(), DecodeError::Type(2));
        assert_eq!(
            decode(&good[..11], &m, &c, None).unwrap_err().reason(),
            "length"
        );
        assert_eq!(
            decode(&good[..3], &m, &c, None).unwrap_err().reason(),
            "length"
        );
        let mut n = good.clone();
        n[3] = 2;
        assert_eq!(decode(&n, &m, &c, None).unwrap_err().reason(), "length");
        n[3] = 0;
        assert_eq!(
            decode(&n, &m, &c, None).unwrap_err(),
            DecodeError::AddressCount
        );
        let mut cs = good.clone();
        cs[7] ^= 1;
        assert_eq!(decode(&cs, &m, &c, None).unwrap_err().reason(), "checksum");
        let mut other = c.clone();
        other.vrids = [52].into_iter().collect();
        assert_eq!(
            decode(&good, &m, &other, None).unwrap_err(),
            DecodeError::UnknownVrid(51)
        );
        let m6 = RxMeta {
            src: "fe80::1".parse().unwrap(),
            dst: MULTICAST_V6.into(),
            ttl: 255,
        };
        assert_eq!(
            decode(&good, &m6, &c, None).unwrap_err(),
            DecodeError::AddressFamily
        );
        for r in [
            DecodeError::Ttl(1),
            DecodeError::AddressFamily,
            DecodeError::AuthType(2),
        ] {
            assert!(DecodeError::REASONS.contains(&r.reason()));
        }
    }

    #[test]
    fn interval_field_conversions() {
        assert_eq!(
            Advertisement::adver_int_field(Version::V3, Duration::from_millis(10)),
            1
        );
        assert_eq!(
            Advertisement::adver_int_field(Version::V3, Duration::from_millis(100)),
            10
        );
        assert_eq!(
            Advertisement::adver_int_field(Version::V3, Duration::from_secs(100)),
            4095
        );
        assert_eq!(
            Advertisement::adver_int_field(Version::V3, Duration::from_millis(1)),
            1
        );
        assert_eq!(
            Advertisement::adver_int_field(Version::V2, Duration::from_millis(100)),
            1
        );
        assert_eq!(
            Advertisement::adver_int_field(Version::V2, Duration::from_secs(3)),
            3
        );
    }

    #[test]
    fn encode_rejects_inconsistent_input() {
        let adv = Advertisement {
            version: Version::V2,
            vrid: 1,
            priority: 100,
            adver_int: 1,
            addresses: vec!["fe80::1".parse().unwrap()],
        };
        let s: IpAddr = "fe80::2".parse().unwrap();
        assert_eq!(
            adv.encode(s, MULTICAST_V6.into(), ChecksumMode::PseudoHeader),
            Err(EncodeError::V2OverIpv6)
        );
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            adv.encode(v4, MULTICAST_V4.into(), ChecksumMode::PseudoHeader),
            Err(EncodeError::FamilyMismatch)
        );
    }

    /// Cheap deterministic fuzzing in the unit tests (the real fuzzer lives in `fuzz/`):
    /// mutate valid packets and random lengths; decode must never panic, and whatever it
    /// accepts must re-encode to the same bytes.
    #[test]
    fn decode_never_panics_on_mutations() {
        let seeds = [hex(V3_V4_PSEUDO), hex(V2_V4), hex(V3_V4_MSG_ONLY)];
        let contexts = [
            ctx(Version::V3, Family::V4, ChecksumMode::PseudoHeader),
            ctx(Version::V2, Family::V4, ChecksumMode::PseudoHeader),
            ctx(Version::V3, Family::V6, ChecksumMode::PseudoHeader),
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000 {
            let mut b = seeds[i % seeds.len()].clone();
            let n = (next() % 4) as usize;
            for _ in 0..n {
                let pos = (next() as usize) % (b.len() + 1);
                match next() % 3 {
                    0 if pos < b.len() => b[pos] = next() as u8,
                    1 => b.truncate(pos),
                    _ => b.push(next() as u8),
                }
            }
            let c = &contexts[i % contexts.len()];
            let _ = decode(&b, &meta4(255), c, Some(1));
        }
    }
}
