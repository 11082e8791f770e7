//! The provider interface the engine drives. A provider reads and replaces the A or AAAA
//! records of the one configured name; it is told the current records (from its own read) so
//! it can write only the difference or, for RFC 2136, make the write conditional on them.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;

use super::error::DdnsError;
use super::records::RecordType;

/// One record of the configured name as the provider holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderRecord {
    /// The provider's record id (Cloudflare, Dynu); `None` for DNS.
    pub id: Option<String>,
    pub address: IpAddr,
    /// TTL in seconds when the provider reports one.
    pub ttl: Option<u32>,
}

pub trait Provider: Send + Sync + 'static {
    /// `rfc2136`, `cloudflare` or `dynu` (the `provider` metric label).
    fn name(&self) -> &'static str;

    /// The records of the configured name and `rtype`, nothing else.
    fn read(
        &self,
        rtype: RecordType,
    ) -> impl Future<Output = Result<Vec<ProviderRecord>, DdnsError>> + Send;

    /// Makes the name's `rtype` records exactly `wanted` (TTL `ttl`), given `current` as just
    /// read. Must touch no record of another name or type.
    fn replace(
        &self,
        rtype: RecordType,
        current: &[ProviderRecord],
        wanted: &BTreeSet<IpAddr>,
        ttl: u32,
    ) -> impl Future<Output = Result<(), DdnsError>> + Send;
}

/// True when `current` is exactly `wanted`: same addresses, no duplicates, and the TTL where
/// the provider reports one.
pub fn holds_exactly(current: &[ProviderRecord], wanted: &BTreeSet<IpAddr>, ttl: u32) -> bool {
    current.len() == wanted.len()
        && current.iter().all(|r| wanted.contains(&r.address))
        && current
            .iter()
            .map(|r| r.address)
            .collect::<BTreeSet<_>>()
            .len()
            == current.len()
        && current.iter().all(|r| r.ttl.is_none_or(|t| t == ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(a: &str, ttl: Option<u32>) -> ProviderRecord {
        ProviderRecord {
            id: None,
            address: a.parse().unwrap(),
            ttl,
        }
    }

    #[test]
    fn exact_match_needs_same_set_no_duplicates_and_ttl() {
        let want: BTreeSet<IpAddr> = [
            "203.0.113.10".parse().unwrap(),
            "203.0.113.11".parse().unwrap(),
        ]
        .into();
        assert!(holds_exactly(
            &[rec("203.0.113.11", Some(60)), rec("203.0.113.10", None)],
            &want,
            60
        ));
        assert!(!holds_exactly(&[rec("203.0.113.10", Some(60))], &want, 60));
        assert!(!holds_exactly(
            &[rec("203.0.113.10", Some(60)), rec("203.0.113.10", Some(60))],
            &want,
            60
        ));
        assert!(!holds_exactly(
            &[
                rec("203.0.113.10", Some(300)),
                rec("203.0.113.11", Some(60))
            ],
            &want,
            60
        ));
        assert!(holds_exactly(&[], &BTreeSet::new(), 60));
    }
}
