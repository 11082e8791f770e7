//! RFC 2136 provider: DNS UPDATE signed with TSIG (RFC 8945), through hickory.
//!
//! Reads with a plain query to the primary itself, never through a resolver, so the answer is
//! the zone's current state and not a cached one (hickory signs UPDATEs only, not queries;
//! a name's A/AAAA records are public anyway). Writes one UPDATE per record type that
//! is atomic on the server (RFC 2136 §3.2-3.4): a prerequisite on the set just read
//! (§2.4.2 "RRset exists, value dependent", or §2.4.3 "RRset does not exist" when it was
//! empty), then "delete the RRset" (§2.5.2) and "add" each wanted record (§2.5.1). If another
//! writer changed the set in between, the server answers NXRRSET/YXRRSET and nothing changes:
//! a compare-and-swap. Only the configured name and type are in the message.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use hickory_client::client::Client;
use hickory_proto::dnssec::rdata::tsig::TsigAlgorithm as HickoryTsigAlgorithm;
use hickory_proto::dnssec::tsig::TSigner;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode, UpdateMessage as _};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType as HickoryRecordType};
use hickory_proto::runtime::TokioRuntimeProvider;
use hickory_proto::udp::UdpClientStream;
use hickory_proto::xfer::DnsResponse;
use hickory_proto::{DnsHandle as _, ProtoError};

use super::error::DdnsError;
use super::provider::{Provider, ProviderRecord};
use super::records::RecordType;
use super::{DdnsSettings, Rfc2136Settings, TsigAlgorithm};

/// RFC 8945 §10 recommends 300 s of allowed clock skew.
const TSIG_FUDGE_SECS: u16 = 300;

pub struct Rfc2136 {
    server: SocketAddr,
    zone: Name,
    name: Name,
    key_name: String,
    algorithm: TsigAlgorithm,
    signer: TSigner,
    timeout: Duration,
}

impl std::fmt::Debug for Rfc2136 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rfc2136")
            .field("server", &self.server)
            .field("zone", &self.zone)
            .field("name", &self.name)
            .field("key_name", &self.key_name)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Rfc2136 {
    pub fn new(settings: &DdnsSettings, p: &Rfc2136Settings) -> Result<Self, DdnsError> {
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD
            .decode(p.key_secret_base64.expose().trim())
            .map_err(|e| {
                DdnsError::Config(format!(
                    "rfc2136: TSIG key `{}`: the secret is not base64 ({e}); expected the `secret` of a BIND key clause",
                    p.key_name
                ))
            })?;
        let fqdn = |what: &str, s: &str| -> Result<Name, DdnsError> {
            let mut n = Name::from_ascii(s).map_err(|e| {
                DdnsError::Config(format!("rfc2136: {what} {s:?} is not a DNS name: {e}"))
            })?;
            n.set_fqdn(true);
            Ok(n)
        };
        let zone = fqdn("zone", &p.zone)?;
        let name = fqdn("hostname", &settings.hostname)?;
        if !zone.zone_of(&name) {
            return Err(DdnsError::Config(format!(
                "rfc2136: {} is not inside zone {}; set ddns.hostname to a name in the zone",
                settings.hostname, p.zone
            )));
        }
        let algorithm = match p.key_algorithm {
            TsigAlgorithm::HmacSha256 => HickoryTsigAlgorithm::HmacSha256,
            TsigAlgorithm::HmacSha512 => HickoryTsigAlgorithm::HmacSha512,
        };
        let signer = TSigner::new(
            key,
            algorithm,
            fqdn("key_name", &p.key_name)?,
            TSIG_FUDGE_SECS,
        )
        .map_err(|e| DdnsError::Config(format!("rfc2136: TSIG key `{}`: {e}", p.key_name)))?;
        Ok(Rfc2136 {
            server: p.server,
            zone,
            name,
            key_name: p.key_name.clone(),
            algorithm: p.key_algorithm,
            signer,
            timeout: settings.request_timeout,
        })
    }

    fn hickory_type(rtype: RecordType) -> HickoryRecordType {
        match rtype {
            RecordType::A => HickoryRecordType::A,
            RecordType::Aaaa => HickoryRecordType::AAAA,
        }
    }

    fn record(&self, address: IpAddr, ttl: u32) -> Record {
        let rdata = match address {
            IpAddr::V4(a) => RData::A(A(a)),
            IpAddr::V6(a) => RData::AAAA(AAAA(a)),
        };
        Record::from_rdata(self.name.clone(), ttl, rdata)
    }

    /// Sends one signed message and returns the verified answer.
    async fn exchange(&self, message: Message, what: &str) -> Result<DnsResponse, DdnsError> {
        let stream = UdpClientStream::builder(self.server, TokioRuntimeProvider::new())
            .with_timeout(Some(self.timeout))
            .with_signer(Some(Arc::new(self.signer.clone())))
            .build();
        let (client, background) = Client::connect(stream).await.map_err(|e| {
            DdnsError::Transport(format!(
                "rfc2136 {}: {what}: cannot open a socket: {e}",
                self.server
            ))
        })?;
        let background = tokio::spawn(background);
        // hickory times the UDP exchange out itself (and reads each datagram into a buffer of
        // at most 4096 bytes, so an answer cannot make it allocate more); this bound holds
        // whatever hickory does, e.g. for a server that floods forged answers it drops.
        let answer = tokio::time::timeout(self.timeout, client.send(message).next()).await;
        background.abort();
        match answer {
            Ok(Some(Ok(r))) => Ok(r),
            Ok(Some(Err(e))) => Err(self.classify(e, what)),
            // hickory ends the stream without an item when its own timeout fires.
            Ok(None) | Err(_) => Err(self.no_answer(what)),
        }
    }

    fn no_answer(&self, what: &str) -> DdnsError {
        DdnsError::Transport(format!(
            "rfc2136 {}: {what}: no answer within {:?}; check ddns.provider.rfc2136.server and that the server is reachable",
            self.server, self.timeout
        ))
    }

    fn classify(&self, e: ProtoError, what: &str) -> DdnsError {
        let text = e.to_string();
        if matches!(e.kind(), hickory_proto::ProtoErrorKind::Timeout) || text.contains("timed out")
        {
            return self.no_answer(what);
        }
        let lower = text.to_ascii_lowercase();
        if lower.contains("truncated hmac") {
            // RFC 8945 §5.3.2: a BADKEY/BADSIG answer carries a TSIG RR with an empty MAC,
            // which hickory reports as an unsupported truncated MAC.
            return self.auth_error(
                what,
                "the answer is a TSIG error without a MAC (BADKEY or BADSIG: the server does not know this key name, or the secret differs)",
            );
        }
        if lower.contains("tsig") {
            return self.auth_error(what, &text);
        }
        DdnsError::Transport(format!("rfc2136 {}: {what}: {text}", self.server))
    }

    fn auth_error(&self, what: &str, detail: &str) -> DdnsError {
        DdnsError::Auth(format!(
            "rfc2136 {}: {what}: the server rejected TSIG key `{}` ({}): {detail}; check that ddns.provider.rfc2136.key_name, key_algorithm and the secret in key_secret_file match the server's key clause",
            self.server,
            self.key_name,
            self.algorithm.as_str()
        ))
    }

    fn check_rcode(&self, response: &Message, what: &str) -> Result<(), DdnsError> {
        let rcode = response.response_code();
        let zone = self.zone.to_string();
        let zone = zone.trim_end_matches('.');
        match rcode {
            ResponseCode::NoError => Ok(()),
            ResponseCode::NotAuth | ResponseCode::BADKEY | ResponseCode::BADSIG | ResponseCode::BADTIME => {
                Err(self.auth_error(what, &format!("{rcode}")))
            }
            ResponseCode::Refused => Err(DdnsError::Rejected(format!(
                "rfc2136 {}: {what}: REFUSED; the zone {zone}'s update policy (allow-update/update-policy) must allow key `{}`",
                self.server, self.key_name
            ))),
            ResponseCode::NotZone => Err(DdnsError::Rejected(format!(
                "rfc2136 {}: {what}: NOTZONE; the server is not primary for {zone}: check ddns.provider.rfc2136.zone and server",
                self.server
            ))),
            ResponseCode::NXRRSet | ResponseCode::YXRRSet => Err(DdnsError::Conflict(format!(
                "rfc2136 {}: {what}: {rcode}: the records changed since they were read; retrying",
                self.server
            ))),
            other => Err(DdnsError::Rejected(format!(
                "rfc2136 {}: {what}: the server answered {other}",
                self.server
            ))),
        }
    }
}

impl Provider for Rfc2136 {
    fn name(&self) -> &'static str {
        "rfc2136"
    }

    async fn read(&self, rtype: RecordType) -> Result<Vec<ProviderRecord>, DdnsError> {
        let what = format!("query {} {rtype}", self.name);
        let mut q = Message::new();
        q.set_id(rand::random())
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(false);
        q.add_query(Query::query(self.name.clone(), Self::hickory_type(rtype)));
        let response = self.exchange(q, &what).await?;
        // NXDOMAIN: the name has no records of any type yet.
        if response.response_code() != ResponseCode::NXDomain {
            self.check_rcode(&response, &what)?;
        }
        let records = response
            .answers()
            .iter()
            .filter(|r| r.name() == &self.name && r.dns_class() == DNSClass::IN)
            .filter_map(|r| {
                let address = match r.data() {
                    RData::A(a) if rtype == RecordType::A => IpAddr::V4(a.0),
                    RData::AAAA(a) if rtype == RecordType::Aaaa => IpAddr::V6(a.0),
                    _ => return None,
                };
                Some(ProviderRecord {
                    id: None,
                    address,
                    ttl: Some(r.ttl()),
                })
            })
            .collect();
        Ok(records)
    }

    async fn replace(
        &self,
        rtype: RecordType,
        current: &[ProviderRecord],
        wanted: &BTreeSet<IpAddr>,
        ttl: u32,
    ) -> Result<(), DdnsError> {
        let htype = Self::hickory_type(rtype);
        let what = format!("update {} {rtype}", self.name);
        let mut m = Message::new();
        m.set_id(rand::random())
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Update)
            .set_recursion_desired(false);
        let mut zone = Query::new();
        zone.set_name(self.zone.clone())
            .set_query_class(DNSClass::IN)
            .set_query_type(HickoryRecordType::SOA);
        m.add_zone(zone);
        if current.is_empty() {
            // §2.4.3: class NONE, TTL 0, empty RDATA.
            let mut none = Record::update0(self.name.clone(), 0, htype);
            none.set_dns_class(DNSClass::NONE);
            m.add_pre_requisite(none);
        } else {
            // §2.4.2: the whole RRset as read, class of the zone, TTL 0.
            let set: BTreeSet<IpAddr> = current.iter().map(|r| r.address).collect();
            for a in set {
                m.add_pre_requisite(self.record(a, 0));
            }
        }
        // §2.5.2: class ANY, TTL 0, empty RDATA deletes the RRset of this name and type only.
        let mut delete = Record::update0(self.name.clone(), 0, htype);
        delete.set_dns_class(DNSClass::ANY);
        m.add_update(delete);
        for a in wanted {
            m.add_update(self.record(*a, ttl));
        }
        let response = self.exchange(m, &what).await?;
        self.check_rcode(&response, &what)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use tokio::net::UdpSocket;
    use tokio::time::Instant;

    use super::*;
    use crate::ddns::{Credential, ProviderSettings};

    fn provider(server: SocketAddr, timeout: Duration) -> Rfc2136 {
        let p = Rfc2136Settings {
            server,
            zone: "example.com".into(),
            key_name: "ddns-key".into(),
            key_algorithm: TsigAlgorithm::HmacSha256,
            key_secret_base64: Credential::new("c2VjcmV0LXRzaWcta2V5LWJ5dGVz"),
        };
        let mut s = DdnsSettings::new(
            "vpn.example.com",
            Duration::from_secs(60),
            4,
            ProviderSettings::Rfc2136(p.clone()),
            SystemTime::UNIX_EPOCH,
        );
        s.request_timeout = timeout;
        Rfc2136::new(&s, &p).unwrap()
    }

    /// A server that answers each query with a flood of 60 KB datagrams carrying the query's
    /// id: neither the size nor the number of answers makes the read last longer than the
    /// request timeout (or grow memory: hickory reads into a fixed buffer and drops them).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flooding_server_cannot_hold_a_read_past_the_timeout() {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = sock.local_addr().unwrap();
        let flood = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (_, peer) = sock.recv_from(&mut buf).await.unwrap();
            let mut big = vec![0xffu8; 60_000];
            big[..2].copy_from_slice(&buf[..2]);
            big[2] = 0x80; // QR: an answer
            for _ in 0..2_000 {
                if sock.send_to(&big, peer).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let timeout = Duration::from_millis(300);
        let p = provider(server, timeout);
        let started = Instant::now();
        let e = p.read(RecordType::A).await.unwrap_err();
        let took = started.elapsed();
        flood.abort();
        assert!(
            took < timeout + Duration::from_millis(700),
            "read lasted {took:?} with a {timeout:?} timeout"
        );
        assert_eq!(e.kind(), "transport", "{e}");
        assert!(e.to_string().contains("no answer within"), "{e}");
    }
}
