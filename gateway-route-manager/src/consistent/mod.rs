//! Flow-stable egress (`egress.mode: consistent`): the bucket table that maps
//! `jhash(flow) mod N` to a healthy gateway. Pure.
//!
//! Owns: the table size and the rendezvous (highest-random-weight) assignment of every bucket.
//! It must not do I/O and must not depend on history: the same configured size, seed and
//! healthy set give the same table on every router, so a router failover moves no flow.
//! The nftables side (map, rules) lives in `return_routing::nft`.
//!
//! Why HRW per bucket: bucket b goes to the healthy gateway with the highest weight
//! `w(seed, b, gateway address)`. Removing a gateway only changes the buckets where it was the
//! maximum (exactly its own); adding one only takes the buckets where it becomes the maximum.
//! Maglev tables move a few extra buckets on such changes; resilient nexthop groups depend on
//! each router's history.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The smallest table: 4093 (prime) gives every one of up to 40 gateways ≥ 100 buckets.
pub const MIN_BUCKETS: u32 = 4093;
/// Buckets per configured gateway at least (the bound: share granularity ≤ 1 %).
pub const BUCKETS_PER_GATEWAY: u32 = 100;

/// The table size for `configured` gateways: the smallest prime ≥ max(4093, 100 × configured).
///
/// It depends on the *configured* count only, never on health, so a gateway failure does not
/// resize the table (a resize would move almost every flow). Prime, so that `jhash mod N` uses
/// every bit of the hash (no common factor with structure in the 5-tuple).
pub fn table_size(configured: usize) -> u32 {
    let want = u32::try_from(configured)
        .unwrap_or(u32::MAX / BUCKETS_PER_GATEWAY)
        .saturating_mul(BUCKETS_PER_GATEWAY)
        .max(MIN_BUCKETS);
    (want..=u32::MAX).find(|&n| is_prime(n)).unwrap_or(want)
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// SplitMix64's finaliser: a fixed, well-mixing 64-bit permutation. Written out here (not
/// `std::hash`) because the result must never change across Rust versions or machines.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The rendezvous weight of `gateway` for `bucket`.
pub fn weight(seed: u32, bucket: u32, gateway: Ipv4Addr) -> u64 {
    let key = (u64::from(seed) << 32) | u64::from(bucket);
    mix64(mix64(key) ^ u64::from(u32::from(gateway)))
}

/// Bucket → gateway index (`None` for every bucket when no gateway is healthy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketTable {
    pub buckets: Vec<Option<usize>>,
}

impl BucketTable {
    /// Builds the table of `size` buckets over `healthy` = (gateway index, gateway address).
    /// The order of `healthy` does not matter; ties (equal weights) go to the lower address.
    pub fn build(size: u32, seed: u32, healthy: &[(usize, Ipv4Addr)]) -> BucketTable {
        let buckets = (0..size)
            .map(|b| {
                healthy
                    .iter()
                    .max_by(|(_, a), (_, c)| {
                        weight(seed, b, *a)
                            .cmp(&weight(seed, b, *c))
                            .then_with(|| c.cmp(a))
                    })
                    .map(|(i, _)| *i)
            })
            .collect();
        BucketTable { buckets }
    }

    pub fn size(&self) -> usize {
        self.buckets.len()
    }

    /// Buckets per gateway index (gateways with none are absent).
    pub fn shares(&self) -> BTreeMap<usize, u32> {
        let mut out = BTreeMap::new();
        for i in self.buckets.iter().flatten() {
            *out.entry(*i).or_insert(0) += 1;
        }
        out
    }

    /// How many buckets differ between two tables of the same size.
    pub fn moved(&self, other: &BucketTable) -> usize {
        self.buckets
            .iter()
            .zip(&other.buckets)
            .filter(|(a, b)| a != b)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(i: usize) -> (usize, Ipv4Addr) {
        (
            i,
            Ipv4Addr::new(192, 168, 25, 128 + u8::try_from(i).unwrap()),
        )
    }

    fn gws(idx: &[usize]) -> Vec<(usize, Ipv4Addr)> {
        idx.iter().map(|&i| gw(i)).collect()
    }

    const SEED: u32 = 0xdead_beef;

    #[test]
    fn size_is_a_prime_of_at_least_100_per_gateway() {
        assert_eq!(table_size(0), 4093);
        assert_eq!(table_size(4), 4093);
        assert_eq!(table_size(40), 4093);
        assert_eq!(table_size(41), 4111, "first prime ≥ 4100");
        assert_eq!(table_size(256), 25601);
        for n in [1, 8, 41, 100, 256] {
            let s = table_size(n);
            assert!(is_prime(s) && s >= 100 * u32::try_from(n).unwrap());
        }
    }

    #[test]
    fn deterministic_and_order_independent() {
        let a = BucketTable::build(4093, SEED, &gws(&[0, 1, 2, 3]));
        let b = BucketTable::build(4093, SEED, &gws(&[3, 1, 0, 2]));
        assert_eq!(a, b);
        // Fixed values: a change in the hash would move every flow on upgrade (and differ
        // between routers running different versions), so it must be deliberate.
        assert_eq!(weight(SEED, 0, gw(0).1), weight(SEED, 0, gw(0).1));
        let first: Vec<_> = a.buckets[..8].iter().map(|b| b.unwrap()).collect();
        assert_eq!(first, GOLDEN_FIRST_8, "the bucket hash changed");
        let other_seed = BucketTable::build(4093, 1, &gws(&[0, 1, 2, 3]));
        assert!(a.moved(&other_seed) > 2000, "the seed matters");
    }

    const GOLDEN_FIRST_8: [usize; 8] = [1, 3, 0, 0, 2, 2, 1, 0];

    #[test]
    fn balanced() {
        for n in [2usize, 4, 8, 16] {
            let all: Vec<usize> = (0..n).collect();
            let t = BucketTable::build(table_size(n), SEED, &gws(&all));
            let shares = t.shares();
            assert_eq!(shares.len(), n);
            let max = *shares.values().max().unwrap();
            let min = *shares.values().min().unwrap();
            let ratio = f64::from(max) / f64::from(min);
            assert!(ratio < 1.25, "n={n}: max {max} min {min} ({shares:?})");
        }
    }

    #[test]
    fn removing_a_gateway_moves_exactly_its_buckets() {
        let before = BucketTable::build(4093, SEED, &gws(&[0, 1, 2, 3]));
        for dead in 0..4 {
            let rest: Vec<usize> = (0..4).filter(|&i| i != dead).collect();
            let after = BucketTable::build(4093, SEED, &gws(&rest));
            for (b, (x, y)) in before.buckets.iter().zip(&after.buckets).enumerate() {
                if *x == Some(dead) {
                    assert_ne!(*y, Some(dead), "bucket {b}");
                } else {
                    assert_eq!(x, y, "bucket {b} moved although it was not on {dead}");
                }
            }
            assert_eq!(
                before.moved(&after),
                usize::try_from(before.shares()[&dead]).unwrap()
            );
        }
    }

    #[test]
    fn adding_a_gateway_takes_only_buckets_it_wins() {
        let before = BucketTable::build(4093, SEED, &gws(&[0, 1, 2]));
        let after = BucketTable::build(4093, SEED, &gws(&[0, 1, 2, 3]));
        let mut taken = 0;
        for (x, y) in before.buckets.iter().zip(&after.buckets) {
            if x != y {
                assert_eq!(*y, Some(3), "a bucket moved between old gateways");
                taken += 1;
            }
        }
        assert_eq!(taken, usize::try_from(after.shares()[&3]).unwrap());
        assert!(taken > 900 && taken < 1150, "about a quarter: {taken}");
    }

    #[test]
    fn none_healthy_is_an_empty_table() {
        let t = BucketTable::build(4093, SEED, &[]);
        assert_eq!(t.size(), 4093);
        assert!(t.buckets.iter().all(Option::is_none));
        assert!(t.shares().is_empty());
    }
}
