//! Feeds arbitrary bytes to every IPVS decoder: a whole netlink frame (as netlink-proto would
//! hand it over), a generic-netlink payload, and the nested attribute sets. Decoding must
//! return Ok or Err, never panic; what decodes must convert to the model and re-encode.
#![no_main]

use ipvs::client::GenlPacket;
use ipvs::codec::{dest_entry_from_attrs, service_entry_from_attrs, DaemonAttrs, DestAttrs, IpvsMessage, ServiceAttrs};
use ipvs::AddressFamily;
use libfuzzer_sys::fuzz_target;
use netlink_packet_core::NetlinkMessage;

fuzz_target!(|data: &[u8]| {
    let _ = NetlinkMessage::<GenlPacket>::deserialize(data);

    if let Some((&cmd, attrs)) = data.split_first() {
        if let Ok(m) = IpvsMessage::decode(cmd, attrs) {
            let _ = m.to_service_entry();
            let _ = m.to_dest_entry(AddressFamily::Inet);
            let _ = m.to_dest_entry(AddressFamily::Inet6);
            let _ = m.to_info();
            let _ = m.to_timeouts();
            let _ = m.to_attr_bytes();
        }
    }
    let _ = IpvsMessage::decode_genl(data);
    if let Ok(a) = ServiceAttrs::decode(data) {
        let _ = service_entry_from_attrs(&a);
    }
    if let Ok(a) = DestAttrs::decode(data) {
        let _ = dest_entry_from_attrs(&a, AddressFamily::Inet6);
    }
    let _ = DaemonAttrs::decode(data);
});
