//! Codec for nexthop objects (`RTM_{NEW,DEL,GET}NEXTHOP`, `struct nhmsg`, `NHA_*`), which
//! netlink-packet-route 0.34 and rtnetlink 0.24 do not know.
//!
//! Owns: the byte layout from the kernel's `include/uapi/linux/nexthop.h`. Only the attributes
//! this crate uses are typed; every other attribute is kept as raw bytes so a dump from a newer
//! kernel still decodes. It must not open sockets: `netlink::RouteSocket` does.

use std::net::Ipv4Addr;

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, Nla, NlaBuffer, NlasIterator, Parseable, NLA_F_NESTED,
};

pub(crate) const RTM_NEWNEXTHOP: u16 = 104;
pub(crate) const RTM_DELNEXTHOP: u16 = 105;
pub(crate) const RTM_GETNEXTHOP: u16 = 106;

const NHMSG_LEN: usize = 8;

const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_GROUP_TYPE: u16 = 3;
const NHA_BLACKHOLE: u16 = 4;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const NHA_RES_GROUP: u16 = 12;

const NHA_RES_GROUP_BUCKETS: u16 = 1;
const NHA_RES_GROUP_IDLE_TIMER: u16 = 2;
const NHA_RES_GROUP_UNBALANCED_TIMER: u16 = 3;

pub(crate) const NEXTHOP_GRP_TYPE_MPATH: u16 = 0;
pub(crate) const NEXTHOP_GRP_TYPE_RES: u16 = 1;

/// One entry of `NHA_GROUP` (`struct nexthop_grp`). The kernel stores `weight - 1` in the
/// first weight byte (so 0 means weight 1); 6.12+ adds a high byte we always send as 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupEntry {
    pub id: u32,
    /// Real weight, 1..=256.
    pub weight: u16,
}

/// `NHA_RES_GROUP` nested attributes (timers in clock_t, i.e. USER_HZ = 100 per second).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ResGroup {
    pub buckets: Option<u16>,
    pub idle_timer: Option<u32>,
    pub unbalanced_timer: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NexthopAttribute {
    Id(u32),
    Group(Vec<GroupEntry>),
    GroupType(u16),
    Blackhole,
    Oif(u32),
    Gateway(Ipv4Addr),
    ResGroup(ResGroup),
    Other(DefaultNla),
}

impl Nla for NexthopAttribute {
    fn value_len(&self) -> usize {
        match self {
            NexthopAttribute::Id(_) | NexthopAttribute::Oif(_) | NexthopAttribute::Gateway(_) => 4,
            NexthopAttribute::Group(entries) => entries.len() * 8,
            NexthopAttribute::GroupType(_) => 2,
            NexthopAttribute::Blackhole => 0,
            NexthopAttribute::ResGroup(res) => res_group_nlas(res).as_slice().buffer_len(),
            NexthopAttribute::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            NexthopAttribute::Id(_) => NHA_ID,
            NexthopAttribute::Group(_) => NHA_GROUP,
            NexthopAttribute::GroupType(_) => NHA_GROUP_TYPE,
            NexthopAttribute::Blackhole => NHA_BLACKHOLE,
            NexthopAttribute::Oif(_) => NHA_OIF,
            NexthopAttribute::Gateway(_) => NHA_GATEWAY,
            NexthopAttribute::ResGroup(_) => NHA_RES_GROUP | NLA_F_NESTED,
            NexthopAttribute::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            NexthopAttribute::Id(v) | NexthopAttribute::Oif(v) => {
                buffer[..4].copy_from_slice(&v.to_ne_bytes())
            }
            NexthopAttribute::Gateway(addr) => buffer[..4].copy_from_slice(&addr.octets()),
            NexthopAttribute::GroupType(t) => buffer[..2].copy_from_slice(&t.to_ne_bytes()),
            NexthopAttribute::Blackhole => {}
            NexthopAttribute::Group(entries) => {
                for (chunk, entry) in buffer.chunks_exact_mut(8).zip(entries) {
                    chunk[..4].copy_from_slice(&entry.id.to_ne_bytes());
                    let stored = entry.weight.clamp(1, 256) - 1;
                    chunk[4] = (stored & 0xff) as u8;
                    chunk[5] = (stored >> 8) as u8;
                    chunk[6] = 0;
                    chunk[7] = 0;
                }
            }
            NexthopAttribute::ResGroup(res) => res_group_nlas(res).as_slice().emit(buffer),
            NexthopAttribute::Other(nla) => nla.emit_value(buffer),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct U16Nla(u16, u16);
impl Nla for U16Nla {
    fn value_len(&self) -> usize {
        2
    }
    fn kind(&self) -> u16 {
        self.0
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        buffer[..2].copy_from_slice(&self.1.to_ne_bytes())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ResNla {
    U16(U16Nla),
    U32(u16, u32),
}
impl Nla for ResNla {
    fn value_len(&self) -> usize {
        match self {
            ResNla::U16(n) => n.value_len(),
            ResNla::U32(..) => 4,
        }
    }
    fn kind(&self) -> u16 {
        match self {
            ResNla::U16(n) => n.kind(),
            ResNla::U32(kind, _) => *kind,
        }
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            ResNla::U16(n) => n.emit_value(buffer),
            ResNla::U32(_, v) => buffer[..4].copy_from_slice(&v.to_ne_bytes()),
        }
    }
}

fn res_group_nlas(res: &ResGroup) -> Vec<ResNla> {
    let mut nlas = Vec::new();
    if let Some(b) = res.buckets {
        nlas.push(ResNla::U16(U16Nla(NHA_RES_GROUP_BUCKETS, b)));
    }
    if let Some(t) = res.idle_timer {
        nlas.push(ResNla::U32(NHA_RES_GROUP_IDLE_TIMER, t));
    }
    if let Some(t) = res.unbalanced_timer {
        nlas.push(ResNla::U32(NHA_RES_GROUP_UNBALANCED_TIMER, t));
    }
    nlas
}

/// `struct nhmsg` + attributes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct NexthopMessage {
    pub family: u8,
    pub scope: u8,
    pub protocol: u8,
    pub flags: u32,
    pub attributes: Vec<NexthopAttribute>,
}

impl NexthopMessage {
    pub fn buffer_len(&self) -> usize {
        NHMSG_LEN + self.attributes.as_slice().buffer_len()
    }

    pub fn emit(&self, buffer: &mut [u8]) {
        buffer[0] = self.family;
        buffer[1] = self.scope;
        buffer[2] = self.protocol;
        buffer[3] = 0;
        buffer[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        self.attributes.as_slice().emit(&mut buffer[NHMSG_LEN..]);
    }

    pub fn parse(buf: &[u8]) -> Result<Self, DecodeError> {
        if buf.len() < NHMSG_LEN {
            return Err(DecodeError::from(format!(
                "nhmsg too short: {} bytes, need {NHMSG_LEN}",
                buf.len()
            )));
        }
        let mut message = NexthopMessage {
            family: buf[0],
            scope: buf[1],
            protocol: buf[2],
            flags: u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]),
            attributes: Vec::new(),
        };
        for nla in NlasIterator::new(&buf[NHMSG_LEN..]) {
            let nla = nla?;
            message.attributes.push(parse_attribute(&nla)?);
        }
        Ok(message)
    }
}

fn u32_of(value: &[u8], what: &str) -> Result<u32, DecodeError> {
    let bytes: [u8; 4] = value
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            DecodeError::from(format!("{what}: expected 4 bytes, got {}", value.len()))
        })?;
    Ok(u32::from_ne_bytes(bytes))
}

fn u16_of(value: &[u8], what: &str) -> Result<u16, DecodeError> {
    let bytes: [u8; 2] = value
        .get(..2)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            DecodeError::from(format!("{what}: expected 2 bytes, got {}", value.len()))
        })?;
    Ok(u16::from_ne_bytes(bytes))
}

fn parse_attribute(nla: &NlaBuffer<&[u8]>) -> Result<NexthopAttribute, DecodeError> {
    let value = nla.value();
    Ok(match nla.kind() {
        NHA_ID => NexthopAttribute::Id(u32_of(value, "NHA_ID")?),
        NHA_OIF => NexthopAttribute::Oif(u32_of(value, "NHA_OIF")?),
        NHA_GATEWAY if value.len() == 4 => {
            NexthopAttribute::Gateway(Ipv4Addr::new(value[0], value[1], value[2], value[3]))
        }
        NHA_GROUP_TYPE => NexthopAttribute::GroupType(u16_of(value, "NHA_GROUP_TYPE")?),
        NHA_BLACKHOLE => NexthopAttribute::Blackhole,
        NHA_GROUP => {
            if !value.len().is_multiple_of(8) {
                return Err(DecodeError::from(format!(
                    "NHA_GROUP: length {} is not a multiple of 8",
                    value.len()
                )));
            }
            NexthopAttribute::Group(
                value
                    .chunks_exact(8)
                    .map(|c| GroupEntry {
                        id: u32::from_ne_bytes([c[0], c[1], c[2], c[3]]),
                        weight: (u16::from(c[5]) << 8 | u16::from(c[4])) + 1,
                    })
                    .collect(),
            )
        }
        NHA_RES_GROUP => {
            let mut res = ResGroup::default();
            for inner in NlasIterator::new(value) {
                let inner = inner?;
                match inner.kind() {
                    NHA_RES_GROUP_BUCKETS => {
                        res.buckets = Some(u16_of(inner.value(), "NHA_RES_GROUP_BUCKETS")?)
                    }
                    NHA_RES_GROUP_IDLE_TIMER => {
                        res.idle_timer = Some(u32_of(inner.value(), "NHA_RES_GROUP_IDLE_TIMER")?)
                    }
                    NHA_RES_GROUP_UNBALANCED_TIMER => {
                        res.unbalanced_timer =
                            Some(u32_of(inner.value(), "NHA_RES_GROUP_UNBALANCED_TIMER")?)
                    }
                    _ => {}
                }
            }
            NexthopAttribute::ResGroup(res)
        }
        _ => NexthopAttribute::Other(DefaultNla::parse(nla)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_nexthop_round_trips() {
        let msg = NexthopMessage {
            family: 2,
            protocol: 245,
            attributes: vec![
                NexthopAttribute::Id(1800),
                NexthopAttribute::Oif(7),
                NexthopAttribute::Gateway(Ipv4Addr::new(192, 168, 25, 128)),
            ],
            ..Default::default()
        };
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        // nhmsg, then NHA_ID (len 8, type 1, value 1800 in host order).
        assert_eq!(&buf[..8], &[2, 0, 245, 0, 0, 0, 0, 0]);
        assert_eq!(&buf[8..12], &[8, 0, 1, 0]);
        assert_eq!(&buf[12..16], &1800u32.to_ne_bytes());
        // NHA_GATEWAY is network order bytes.
        assert_eq!(&buf[buf.len() - 4..], &[192, 168, 25, 128]);
        assert_eq!(NexthopMessage::parse(&buf).unwrap(), msg);
    }

    #[test]
    fn resilient_group_round_trips_with_weight_minus_one() {
        let msg = NexthopMessage {
            protocol: 245,
            attributes: vec![
                NexthopAttribute::Id(2056),
                NexthopAttribute::Group(vec![
                    GroupEntry {
                        id: 1800,
                        weight: 1,
                    },
                    GroupEntry {
                        id: 1802,
                        weight: 3,
                    },
                ]),
                NexthopAttribute::GroupType(NEXTHOP_GRP_TYPE_RES),
                NexthopAttribute::ResGroup(ResGroup {
                    buckets: Some(128),
                    idle_timer: Some(12000),
                    unbalanced_timer: Some(0),
                }),
            ],
            ..Default::default()
        };
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        // NHA_GROUP entries: id, then weight-1.
        let group_at = 8 + 8;
        assert_eq!(&buf[group_at..group_at + 4], &[20, 0, 2, 0]);
        assert_eq!(buf[group_at + 4 + 4], 0);
        assert_eq!(buf[group_at + 4 + 8 + 4], 2);
        assert_eq!(NexthopMessage::parse(&buf).unwrap(), msg);
    }

    #[test]
    fn short_header_is_an_error() {
        assert!(NexthopMessage::parse(&[2, 0, 0]).is_err());
    }
}
