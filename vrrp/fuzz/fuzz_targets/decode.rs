//! Fuzzes `vrrp::packet::decode` with every version/family/checksum combination: it must never
//! panic, and whatever it accepts must re-encode to the exact input bytes (v3) or to a packet
//! that decodes to the same advertisement (v2, whose auth data is optional on receipt).
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use vrrp::packet::{
    decode, Advertisement, ChecksumMode, DecodeContext, Family, RxMeta, Version, MULTICAST_V4,
    MULTICAST_V6,
};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (version, family) = match sel % 3 {
        0 => (Version::V3, Family::V4),
        1 => (Version::V3, Family::V6),
        _ => (Version::V2, Family::V4),
    };
    let mode = if sel & 0x80 != 0 {
        ChecksumMode::MessageOnly
    } else {
        ChecksumMode::PseudoHeader
    };
    let (src, dst): (IpAddr, IpAddr) = match family {
        Family::V4 => ("192.168.28.2".parse().unwrap(), MULTICAST_V4.into()),
        Family::V6 => ("fe80::2".parse().unwrap(), MULTICAST_V6.into()),
    };
    let ctx = DecodeContext {
        version,
        family,
        vrids: (0..=255).collect(),
        checksum_mode: mode,
    };
    let meta = RxMeta { src, dst, ttl: 255 };
    if let Ok(adv) = decode(rest, &meta, &ctx, None) {
        let again: Advertisement = adv.clone();
        let bytes = again.encode(src, dst, mode).expect("decoded advert re-encodes");
        let round = decode(&bytes, &meta, &ctx, None).expect("re-encoded advert decodes");
        assert_eq!(round, adv);
    }
});
