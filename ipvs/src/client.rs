//! Async client for the kernel's IPVS generic-netlink family, on netlink-proto (the same netlink
//! stack rtnetlink uses): family-id lookup, every IPVS command, dumps, pipelined writes.
//!
//! Owns the socket and the mapping of kernel errors to messages that name the object. It holds
//! no policy: what to write is decided by `reconcile`. It never panics on what the kernel sends.

use std::fmt::Debug;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use netlink_packet_core::{
    DecodeError, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, NlasIterator, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::constants::GENL_ID_CTRL;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_proto::sys::protocols::NETLINK_GENERIC;
use netlink_proto::sys::SocketAddr as NetlinkAddr;
use netlink_proto::ConnectionHandle;

use crate::codec::{CodecError, IpvsMessage};
use crate::errno;
use crate::model::{
    Destination, DestinationEntry, Info, Service, ServiceEntry, ServiceKey, Timeouts,
};

/// What went wrong talking to IPVS. Every message names the operation and its object.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error("the kernel has no IPVS (modprobe ip_vs)")]
    NoIpvs,
    #[error("open generic netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("{op}: {}", errno::describe(*errno))]
    Kernel { op: String, errno: i32 },
    #[error("{op}: cannot encode the request: {source}")]
    Encode {
        op: String,
        #[source]
        source: CodecError,
    },
    #[error("{op}: cannot decode the kernel's reply: {reason}")]
    Decode { op: String, reason: String },
    #[error("{op}: the netlink connection is closed")]
    Closed { op: String },
    #[error("{op}: the kernel dropped replies (netlink overrun); dump again")]
    Overrun { op: String },
}

impl IpvsError {
    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// How each operation is named in errors and logs.
pub mod describe {
    use super::*;

    pub fn new_service(key: &ServiceKey) -> String {
        format!("add service {key}")
    }
    pub fn set_service(key: &ServiceKey) -> String {
        format!("update service {key}")
    }
    pub fn del_service(key: &ServiceKey) -> String {
        format!("delete service {key}")
    }
    pub fn get_service(key: &ServiceKey) -> String {
        format!("get service {key}")
    }
    pub fn new_dest(key: &ServiceKey, addr: SocketAddr) -> String {
        format!("add destination {addr} to {key}")
    }
    pub fn set_dest(key: &ServiceKey, addr: SocketAddr) -> String {
        format!("update destination {addr} in {key}")
    }
    pub fn del_dest(key: &ServiceKey, addr: SocketAddr) -> String {
        format!("delete destination {addr} from {key}")
    }
    pub fn get_dests(key: &ServiceKey) -> String {
        format!("list destinations of {key}")
    }
}

/// Messages on our generic-netlink socket: controller (family lookup) or IPVS. Replies that
/// fail to decode are kept as `Undecodable` instead of being dropped, so that netlink-proto
/// still completes the request and the caller gets an error rather than a hang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenlPacket {
    /// A controller request we send (CTRL_CMD_GETFAMILY).
    CtrlRequest(GenlMessage<GenlCtrl>),
    /// A controller reply, reduced to the family id. netlink-packet-generic's own reply parser
    /// is not used: it panics on some malformed policy attributes (found by our fuzz target,
    /// netlink-packet-generic 0.5.0 `PolicyAttr::parse`).
    CtrlReply {
        family_id: Option<u16>,
    },
    Ipvs(GenlMessage<IpvsMessage>),
    Undecodable {
        message_type: u16,
        reason: String,
    },
}

/// `CTRL_ATTR_FAMILY_ID` (include/uapi/linux/genetlink.h).
const CTRL_ATTR_FAMILY_ID: u16 = 1;

fn decode_ctrl_reply(payload: &[u8]) -> Result<Option<u16>, String> {
    GenlHeader::parse(payload).map_err(|e| e.to_string())?;
    let attrs = payload.get(4..).unwrap_or_default();
    for nla in NlasIterator::new(attrs) {
        let nla = nla.map_err(|e| e.to_string())?;
        if nla.kind() == CTRL_ATTR_FAMILY_ID {
            let v = <[u8; 2]>::try_from(nla.value())
                .map_err(|_| format!("CTRL_ATTR_FAMILY_ID has {} bytes", nla.value().len()))?;
            return Ok(Some(u16::from_ne_bytes(v)));
        }
    }
    Ok(None)
}

impl NetlinkSerializable for GenlPacket {
    fn message_type(&self) -> u16 {
        match self {
            Self::CtrlRequest(m) => m.message_type(),
            Self::CtrlReply { .. } => GENL_ID_CTRL,
            Self::Ipvs(m) => m.message_type(),
            Self::Undecodable { message_type, .. } => *message_type,
        }
    }

    fn buffer_len(&self) -> usize {
        match self {
            Self::CtrlRequest(m) => NetlinkSerializable::buffer_len(m),
            Self::Ipvs(m) => NetlinkSerializable::buffer_len(m),
            Self::CtrlReply { .. } | Self::Undecodable { .. } => 0,
        }
    }

    fn serialize(&self, buffer: &mut [u8]) {
        match self {
            Self::CtrlRequest(m) => m.serialize(buffer),
            Self::Ipvs(m) => m.serialize(buffer),
            Self::CtrlReply { .. } | Self::Undecodable { .. } => {}
        }
    }
}

impl NetlinkDeserializable for GenlPacket {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Self::Error> {
        let parsed = if header.message_type == GENL_ID_CTRL {
            decode_ctrl_reply(payload).map(|family_id| Self::CtrlReply { family_id })
        } else {
            GenlMessage::<IpvsMessage>::deserialize(header, payload)
                .map(Self::Ipvs)
                .map_err(|e| e.to_string())
        };
        Ok(parsed.unwrap_or_else(|reason| Self::Undecodable {
            message_type: header.message_type,
            reason,
        }))
    }
}

impl From<GenlPacket> for NetlinkPayload<GenlPacket> {
    fn from(p: GenlPacket) -> Self {
        NetlinkPayload::InnerMessage(p)
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = NetlinkMessage<GenlPacket>> + Send>>;

/// A request already handed to the socket; await [`PendingReply::finish`] for its outcome.
/// Requests reach the kernel in the order they were started.
pub struct PendingReply {
    op: String,
    stream: Result<ReplyStream, IpvsError>,
}

impl Debug for PendingReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingReply")
            .field("op", &self.op)
            .finish_non_exhaustive()
    }
}

impl PendingReply {
    /// Collects the IPVS messages of the reply; the first kernel or decode error wins, but
    /// the stream is always drained so the connection stays in sync.
    pub async fn finish(self) -> Result<Vec<IpvsMessage>, IpvsError> {
        let op = self.op;
        let mut stream = self.stream?;
        let mut out = Vec::new();
        let mut failure: Option<IpvsError> = None;
        while let Some(msg) = stream.next().await {
            match msg.payload {
                NetlinkPayload::InnerMessage(GenlPacket::Ipvs(m)) => out.push(m.payload),
                NetlinkPayload::InnerMessage(GenlPacket::CtrlRequest(_))
                | NetlinkPayload::InnerMessage(GenlPacket::CtrlReply { .. }) => {}
                NetlinkPayload::InnerMessage(GenlPacket::Undecodable { reason, .. }) => {
                    failure.get_or_insert(IpvsError::Decode {
                        op: op.clone(),
                        reason,
                    });
                }
                NetlinkPayload::Error(e) => {
                    if let Some(code) = e.code {
                        failure.get_or_insert(IpvsError::Kernel {
                            op: op.clone(),
                            errno: code.get().saturating_abs(),
                        });
                    }
                }
                NetlinkPayload::Done(d) if d.code < 0 => {
                    failure.get_or_insert(IpvsError::Kernel {
                        op: op.clone(),
                        errno: d.code.saturating_abs(),
                    });
                }
                NetlinkPayload::Overrun(_) => {
                    failure.get_or_insert(IpvsError::Overrun { op: op.clone() });
                }
                _ => {}
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// A handle on the IPVS family. Cheap to clone; all clones share one socket.
#[derive(Clone, Debug)]
pub struct IpvsClient {
    handle: ConnectionHandle<GenlPacket>,
    family_id: u16,
    writes: Arc<AtomicU64>,
}

impl IpvsClient {
    /// Opens a generic-netlink socket (its connection task is spawned on the current tokio
    /// runtime) and resolves the IPVS family id.
    pub async fn connect() -> Result<Self, IpvsError> {
        let (conn, handle, _unsolicited) =
            netlink_proto::new_connection::<GenlPacket>(NETLINK_GENERIC)
                .map_err(IpvsError::Socket)?;
        tokio::spawn(conn);
        let family_id = resolve_family(&handle).await?;
        tracing::debug!(family_id, "resolved IPVS generic netlink family");
        Ok(Self {
            handle,
            family_id,
            writes: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn family_id(&self) -> u16 {
        self.family_id
    }

    /// How many write requests (NEW/SET/DEL, SET_CONFIG, FLUSH) this client sent so far.
    pub fn writes_sent(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn start(&self, op: String, msg: IpvsMessage, flags: u16) -> PendingReply {
        let mut genl = GenlMessage::from_payload(msg);
        genl.set_resolved_family_id(self.family_id);
        let mut nl = NetlinkMessage::from(GenlPacket::Ipvs(genl));
        nl.header.flags = flags;
        nl.finalize();
        let stream = match self.handle.request(nl, NetlinkAddr::new(0, 0)) {
            Ok(s) => Ok(Box::pin(s) as ReplyStream),
            Err(_) => Err(IpvsError::Closed { op: op.clone() }),
        };
        PendingReply { op, stream }
    }

    /// Sends a write (acknowledged) request without waiting; see [`PendingReply`].
    pub fn start_write(&self, op: String, msg: IpvsMessage) -> PendingReply {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.start(op, msg, NLM_F_REQUEST | NLM_F_ACK)
    }

    async fn write(
        &self,
        op: String,
        msg: Result<IpvsMessage, CodecError>,
    ) -> Result<(), IpvsError> {
        let msg = msg.map_err(|source| IpvsError::Encode {
            op: op.clone(),
            source,
        })?;
        self.start_write(op, msg).finish().await.map(|_| ())
    }

    fn start_dump(&self, op: String, msg: IpvsMessage) -> PendingReply {
        self.start(op, msg, NLM_F_REQUEST | NLM_F_DUMP)
    }

    async fn get_one(&self, op: String, msg: IpvsMessage) -> Result<IpvsMessage, IpvsError> {
        let mut replies = self.start(op.clone(), msg, NLM_F_REQUEST).finish().await?;
        match replies.pop() {
            Some(m) if replies.is_empty() => Ok(m),
            Some(_) => Err(IpvsError::Decode {
                op,
                reason: "more than one reply".into(),
            }),
            None => Err(IpvsError::Decode {
                op,
                reason: "no reply".into(),
            }),
        }
    }

    pub async fn info(&self) -> Result<Info, IpvsError> {
        let op = "get IPVS info".to_owned();
        let m = self.get_one(op.clone(), IpvsMessage::get_info()).await?;
        m.to_info().map_err(|e| IpvsError::Decode {
            op,
            reason: e.to_string(),
        })
    }

    pub async fn timeouts(&self) -> Result<Timeouts, IpvsError> {
        let m = self
            .get_one("get IPVS timeouts".into(), IpvsMessage::get_config())
            .await?;
        Ok(m.to_timeouts())
    }

    /// A zero timeout leaves that timeout unchanged (kernel behaviour).
    pub async fn set_timeouts(&self, t: &Timeouts) -> Result<(), IpvsError> {
        let op = format!(
            "set IPVS timeouts tcp {}s tcpfin {}s udp {}s",
            t.tcp, t.tcp_fin, t.udp
        );
        self.write(op, Ok(IpvsMessage::set_config(t))).await
    }

    /// Deletes every service and destination, ours or not.
    pub async fn flush(&self) -> Result<(), IpvsError> {
        self.write("flush IPVS".into(), Ok(IpvsMessage::flush()))
            .await
    }

    pub async fn new_service(&self, svc: &Service) -> Result<(), IpvsError> {
        self.write(
            describe::new_service(&svc.key),
            IpvsMessage::new_service(svc),
        )
        .await
    }

    /// Changes scheduler, flags, persistence timeout and netmask of an existing service.
    pub async fn set_service(&self, svc: &Service) -> Result<(), IpvsError> {
        self.write(
            describe::set_service(&svc.key),
            IpvsMessage::set_service(svc),
        )
        .await
    }

    pub async fn del_service(&self, key: &ServiceKey) -> Result<(), IpvsError> {
        self.write(
            describe::del_service(key),
            Ok(IpvsMessage::del_service(key)),
        )
        .await
    }

    /// One service; `Ok(None)` when the kernel has no such service.
    pub async fn service(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>, IpvsError> {
        let op = describe::get_service(key);
        match self
            .get_one(op.clone(), IpvsMessage::get_service(Some(key)))
            .await
        {
            Ok(m) => m
                .to_service_entry()
                .map(Some)
                .map_err(|e| IpvsError::Decode {
                    op,
                    reason: e.to_string(),
                }),
            Err(e) if matches!(e.errno(), Some(errno::ESRCH) | Some(errno::ENOENT)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every service of this network namespace, with statistics.
    pub async fn services(&self) -> Result<Vec<ServiceEntry>, IpvsError> {
        let op = "list services".to_owned();
        let replies = self
            .start_dump(op.clone(), IpvsMessage::get_service(None))
            .finish()
            .await?;
        replies
            .iter()
            .map(|m| {
                m.to_service_entry().map_err(|e| IpvsError::Decode {
                    op: op.clone(),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    pub async fn new_dest(&self, key: &ServiceKey, d: &Destination) -> Result<(), IpvsError> {
        self.write(
            describe::new_dest(key, d.addr),
            Ok(IpvsMessage::new_dest(key, d)),
        )
        .await
    }

    /// Changes weight, forward method, thresholds (and tunnel settings) in place.
    pub async fn set_dest(&self, key: &ServiceKey, d: &Destination) -> Result<(), IpvsError> {
        self.write(
            describe::set_dest(key, d.addr),
            Ok(IpvsMessage::set_dest(key, d)),
        )
        .await
    }

    pub async fn del_dest(&self, key: &ServiceKey, addr: SocketAddr) -> Result<(), IpvsError> {
        self.write(
            describe::del_dest(key, addr),
            Ok(IpvsMessage::del_dest(key, addr)),
        )
        .await
    }

    /// Starts a destination dump without waiting (see [`IpvsClient::finish_dests`]).
    pub fn start_dests(&self, key: &ServiceKey) -> PendingReply {
        self.start_dump(describe::get_dests(key), IpvsMessage::get_dests(key))
    }

    pub async fn finish_dests(
        key: &ServiceKey,
        pending: PendingReply,
    ) -> Result<Vec<DestinationEntry>, IpvsError> {
        let op = pending.op.clone();
        let replies = pending.finish().await?;
        replies
            .iter()
            .map(|m| {
                m.to_dest_entry(key.af()).map_err(|e| IpvsError::Decode {
                    op: op.clone(),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// The destinations of one service, with connection counts and statistics.
    pub async fn dests(&self, key: &ServiceKey) -> Result<Vec<DestinationEntry>, IpvsError> {
        Self::finish_dests(key, self.start_dests(key)).await
    }
}

async fn resolve_family(handle: &ConnectionHandle<GenlPacket>) -> Result<u16, IpvsError> {
    let op = "look up generic netlink family IPVS";
    let mut genl = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(
            IpvsMessage::family_name().to_owned(),
        )],
    });
    genl.finalize();
    let mut nl = NetlinkMessage::from(GenlPacket::CtrlRequest(genl));
    nl.header.flags = NLM_F_REQUEST;
    nl.finalize();
    let mut stream = handle
        .request(nl, NetlinkAddr::new(0, 0))
        .map_err(|_| IpvsError::Closed { op: op.into() })?;
    let mut family = None;
    let mut failure = None;
    while let Some(msg) = stream.next().await {
        match msg.payload {
            NetlinkPayload::InnerMessage(GenlPacket::CtrlReply { family_id }) => {
                family = family.or(family_id);
            }
            NetlinkPayload::InnerMessage(GenlPacket::Undecodable { reason, .. }) => {
                failure.get_or_insert(IpvsError::Decode {
                    op: op.into(),
                    reason,
                });
            }
            NetlinkPayload::Error(e) => match e.code.map(|c| c.get().saturating_abs()) {
                // The controller answers ENOENT for an unregistered family.
                Some(errno::ENOENT) => {
                    failure.get_or_insert(IpvsError::NoIpvs);
                }
                Some(errno) => {
                    failure.get_or_insert(IpvsError::Kernel {
                        op: op.into(),
                        errno,
                    });
                }
                None => {}
            },
            _ => {}
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    family.ok_or(IpvsError::Decode {
        op: op.into(),
        reason: "no CTRL_ATTR_FAMILY_ID in reply".into(),
    })
}
