//! The wanted record set: pure, no I/O.
//!
//! The public IPs of the healthy gateways, lowest gateway index first, at most `max_records`
//! distinct addresses (A and AAAA together). Choosing by index, not by address or arrival
//! order, keeps the set stable: a gateway that is added with a higher index does not push out
//! one already published.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use crate::health::HealthyGateways;

/// The two record types this module manages; nothing else is ever touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordType {
    A,
    Aaaa,
}

impl RecordType {
    pub const ALL: [RecordType; 2] = [RecordType::A, RecordType::Aaaa];

    pub fn as_str(&self) -> &'static str {
        match self {
            RecordType::A => "A",
            RecordType::Aaaa => "AAAA",
        }
    }

    pub fn of(address: &IpAddr) -> RecordType {
        match address {
            IpAddr::V4(_) => RecordType::A,
            IpAddr::V6(_) => RecordType::Aaaa,
        }
    }
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the name should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WantedRecords {
    pub a: BTreeSet<IpAddr>,
    pub aaaa: BTreeSet<IpAddr>,
}

impl WantedRecords {
    pub fn of(&self, rtype: RecordType) -> &BTreeSet<IpAddr> {
        match rtype {
            RecordType::A => &self.a,
            RecordType::Aaaa => &self.aaaa,
        }
    }
    pub fn len(&self) -> usize {
        self.a.len() + self.aaaa.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The record set for `healthy`: gateways in index order, their public IP if known and
/// usable, duplicates (two gateways sharing an exit) counted once, at most `max_records`.
pub fn wanted_records(healthy: &HealthyGateways, max_records: usize) -> WantedRecords {
    let mut seen = BTreeSet::new();
    let mut wanted = WantedRecords::default();
    for gw in healthy.gateways.values() {
        if seen.len() >= max_records {
            break;
        }
        // gluetun answers "" while the tunnel is down (no address reaches us then); an
        // unspecified address would be an unusable record.
        let Some(ip) = gw.public_ip.filter(|ip| !ip.is_unspecified()) else {
            continue;
        };
        if !seen.insert(ip) {
            continue;
        }
        match ip {
            IpAddr::V4(_) => wanted.a.insert(ip),
            IpAddr::V6(_) => wanted.aaaa.insert(ip),
        };
    }
    wanted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthyGateway;
    use std::net::Ipv4Addr;

    fn set(gws: &[(usize, Option<&str>)]) -> HealthyGateways {
        HealthyGateways {
            complete: true,
            gateways: gws
                .iter()
                .map(|(i, ip)| {
                    let address = Ipv4Addr::new(192, 168, 25, 128 + *i as u8);
                    let public_ip = ip.map(|s| s.parse().unwrap());
                    (*i, HealthyGateway { address, public_ip })
                })
                .collect(),
        }
    }

    fn ips(s: &BTreeSet<IpAddr>) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn v4_goes_to_a_and_v6_to_aaaa() {
        let w = wanted_records(
            &set(&[(0, Some("203.0.113.10")), (1, Some("2001:db8::1"))]),
            4,
        );
        assert_eq!(ips(&w.a), ["203.0.113.10"]);
        assert_eq!(ips(&w.aaaa), ["2001:db8::1"]);
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn lowest_index_first_up_to_max_records() {
        // Addresses sort the other way round from the indexes: the choice must follow the index.
        let h = set(&[
            (0, Some("203.0.113.40")),
            (1, Some("203.0.113.30")),
            (2, Some("203.0.113.20")),
            (3, Some("203.0.113.10")),
        ]);
        let w = wanted_records(&h, 2);
        assert_eq!(ips(&w.a), ["203.0.113.30", "203.0.113.40"]);
        // Gateway 0 leaves: gateway 2 takes its place, gateway 1 stays.
        let mut h2 = h.clone();
        h2.gateways.remove(&0);
        assert_eq!(
            ips(&wanted_records(&h2, 2).a),
            ["203.0.113.20", "203.0.113.30"]
        );
    }

    #[test]
    fn max_records_counts_both_families() {
        let h = set(&[
            (0, Some("2001:db8::1")),
            (1, Some("203.0.113.11")),
            (2, Some("203.0.113.12")),
        ]);
        let w = wanted_records(&h, 2);
        assert_eq!(ips(&w.aaaa), ["2001:db8::1"]);
        assert_eq!(ips(&w.a), ["203.0.113.11"]);
    }

    #[test]
    fn unknown_unspecified_and_duplicate_ips_are_skipped() {
        let h = set(&[
            (0, None),
            (1, Some("0.0.0.0")),
            (2, Some("203.0.113.12")),
            (3, Some("203.0.113.12")),
            (4, Some("::")),
            (5, Some("203.0.113.15")),
        ]);
        let w = wanted_records(&h, 2);
        // The duplicate does not use up a slot.
        assert_eq!(ips(&w.a), ["203.0.113.12", "203.0.113.15"]);
        assert!(w.aaaa.is_empty());
    }

    #[test]
    fn no_healthy_gateway_is_an_empty_set() {
        assert!(wanted_records(&set(&[]), 4).is_empty());
        assert!(wanted_records(&set(&[(0, None)]), 4).is_empty());
    }
}
