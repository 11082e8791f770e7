//! Config contract tests: the reference config is accepted with the documented defaults, and
//! each broken config gives the expected message at the expected line and column.

use std::path::{Path, PathBuf};

use super::*;

/// Writes the secret files the reference config names into a scratch directory and points
/// the config at them.
pub(crate) fn reference_config_text(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("gluetun"), "s3cret-gluetun\n").unwrap();
    std::fs::write(dir.join("tsig"), "c2VjcmV0LXRzaWcta2V5LWJ5dGVz\n").unwrap();
    let text = include_str!("../../tests/data/reference.yaml");
    text.replace("/run/secrets/", &format!("{}/", dir.display()))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vpn-router-cfg-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load_text(text: &str) -> Result<Loaded, ConfigErrors> {
    load_str(Path::new("c.yaml"), text)
}

#[test]
fn reference_config_is_accepted_with_its_values() {
    let dir = scratch("ref");
    let text = reference_config_text(&dir);
    let loaded = load_text(&text).unwrap_or_else(|e| panic!("{e}"));
    let c = &loaded.config;
    assert_eq!(c.api.listen.to_string(), "0.0.0.0:9090");
    let v = &c.vrrp[0];
    assert_eq!(
        (v.name.value.as_str(), v.vrid, v.priority),
        ("router", 51, 100)
    );
    assert_eq!(v.advert_interval, Duration::from_millis(100));
    assert_eq!(v.version, VrrpVersion::V3);
    assert!(v.vmac && v.preempt && v.gateway_ingress_vips);
    assert_eq!(
        v.virtual_ips[0].address.value.to_string(),
        "192.168.26.254/22"
    );
    assert_eq!(v.virtual_ips[0].interface, "vpn-gw-veth0");
    let t = v.track_gateways.unwrap();
    assert_eq!((t.min_healthy, t.weight), (1, -50));
    let g = c.gateways.as_ref().unwrap();
    assert_eq!(g.addresses.value.len(), 8);
    assert_eq!(g.addresses.value[7].to_string(), "192.168.25.135");
    assert_eq!(g.ingress_vip(3).to_string(), "192.168.26.131");
    assert_eq!(g.health.timeout, Duration::from_millis(750));
    match &g.health.control_server.auth {
        Some(ControlServerAuth::Basic { username, password }) => {
            assert_eq!(username, "router");
            assert_eq!(password.expose(), "s3cret-gluetun");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(g.egress.hash_seed, 0xdead_beef);
    assert_eq!(g.egress.table.value, 180);
    assert_eq!(g.return_routing.mark_base.value, 0x1900);
    let i = c.ingress.as_ref().unwrap();
    let vs = &i.virtual_servers[0];
    assert_eq!(vs.scheduler, "mh");
    assert_eq!(
        vs.scheduler_flags,
        vec![SchedulerFlag::Fallback, SchedulerFlag::Port]
    );
    assert_eq!(vs.protocols, vec![Protocol::Tcp, Protocol::Udp]);
    let d = c.ddns.as_ref().unwrap();
    assert_eq!(d.provider.name(), "rfc2136");
    assert_eq!(d.only_when_master.as_ref().unwrap().value, "router");
}

#[test]
fn empty_file_is_a_valid_config_of_defaults() {
    let c = load_text("").unwrap().config;
    assert!(c.vrrp.is_empty() && c.gateways.is_none() && c.ingress.is_none() && c.ddns.is_none());
    assert_eq!(c.api.listen.port(), 9090);
}

#[test]
fn minimal_sections_get_the_documented_defaults() {
    let text = "vrrp:\n  - { name: r, interface: eth0, vrid: 1, virtual_ips: [192.168.26.254/22] }\ngateways:\n  interface: eth1\n  addresses: [192.168.25.128, 192.168.25.130-192.168.25.131]\n";
    let c = load_text(text).unwrap().config;
    let v = &c.vrrp[0];
    assert_eq!(v.priority, 100);
    assert_eq!(v.advert_interval, Duration::from_millis(100));
    assert_eq!(
        v.virtual_ips[0].interface, "eth0",
        "VIP interface defaults to the instance's"
    );
    assert!(v.track_gateways.is_none() && !v.gateway_ingress_vips);
    let g = c.gateways.unwrap();
    assert_eq!(
        g.addresses
            .value
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>(),
        ["192.168.25.128", "192.168.25.130", "192.168.25.131"]
    );
    assert_eq!(
        g.health.checks,
        vec![HealthCheckKind::VpnStatus, HealthCheckKind::PublicIp]
    );
    assert_eq!(g.egress.rule_priority.value, 10888);
    assert_eq!(g.egress.destinations, vec![Ipv4Net::default()]);
    assert!(g.egress.exclude_reserved);
    assert_eq!(g.return_routing.table_base.value, 50);
    assert_eq!((g.tunnel_mtu.value, g.clamp_mss), (1320, true));
    assert_eq!(g.mss_clamp(), Some(1280), "gluetun's WireGuard MTU less 40");
}

#[test]
fn mss_clamp_follows_tunnel_mtu_and_can_be_off() {
    let base = "gateways:\n  interface: eth1\n  addresses: 192.168.25.128\n";
    let g = |extra: &str| {
        load_text(&format!("{base}{extra}"))
            .unwrap()
            .config
            .gateways
            .unwrap()
    };
    assert_eq!(g("  tunnel_mtu: 1420\n").mss_clamp(), Some(1380));
    assert_eq!(g("  tunnel_mtu: 65535\n").mss_clamp(), Some(65495));
    assert_eq!(g("  clamp_mss: false\n").mss_clamp(), None);
}

/// (name, config text, expected "LINE:COL: message fragment" for each error, in order)
const BROKEN: &[(&str, &str, &[&str])] = &[
    ("vrid out of range", "vrrp:\n  - name: r\n    interface: eth0\n    vrid: 300\n    virtual_ips: [10.1.1.1/24]\n", &["4:11: vrrp[0].vrid: 300 is out of range; expected an integer 1-255"]),
    ("vrid zero", "vrrp:\n  - { name: r, interface: eth0, vrid: 0, virtual_ips: [10.1.1.1/24] }\n", &["2:39: vrrp[0].vrid: 0 is out of range"]),
    ("priority zero", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, priority: 0, virtual_ips: [10.1.1.1/24] }\n", &["2:52: vrrp[0].priority: 0 is out of range; expected an integer 1-255"]),
    ("v3 interval not 10ms multiple", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, advert_interval: 15ms, virtual_ips: [10.1.1.1/24] }\n", &["2:59: vrrp[0].advert_interval: 15ms is not a multiple of 10ms"]),
    ("v3 interval too long", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, advert_interval: 41s, virtual_ips: [10.1.1.1/24] }\n", &["2:59: vrrp[0].advert_interval: 41s is out of range; expected a VRRPv3 interval 10ms-40.95s"]),
    ("v2 interval fractional", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, version: 2, advert_interval: 1500ms, virtual_ips: [10.1.1.1/24] }\n", &["2:71: vrrp[0].advert_interval: 1s 500ms is not a whole number of seconds"]),
    ("max_peer_advert_interval above the v3 field", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, max_peer_advert_interval: 41s, virtual_ips: [10.1.1.1/24] }\n", &["2:68: vrrp[0].max_peer_advert_interval: 41s is out of range; expected at most 40s 950ms, the longest interval a VRRPv3 advert carries"]),
    ("max_peer_advert_interval above the v2 field", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, version: 2, max_peer_advert_interval: 256s, virtual_ips: [10.1.1.1/24] }\n", &["2:80: vrrp[0].max_peer_advert_interval: 4m 16s is out of range; expected at most 4m 15s, the longest interval a VRRPv2 advert carries"]),
    ("max_peer_advert_interval below our own", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, advert_interval: 1s, max_peer_advert_interval: 500ms, virtual_ips: [10.1.1.1/24] }\n", &["2:89: vrrp[0].max_peer_advert_interval: 500ms is shorter than advert_interval 1s; expected at least the instance's own interval"]),
    ("max_peer_advert_interval not judged against a broken advert_interval", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, advert_interval: 15ms, max_peer_advert_interval: 10ms, virtual_ips: [10.1.1.1/24] }\n", &["2:59: vrrp[0].advert_interval: 15ms is not a multiple of 10ms"]),
    ("allowed_peers of the other family", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, virtual_ips: [10.1.1.1/24], allowed_peers: [10.1.1.2, fd00::1] }\n", &["2:96: vrrp[0].allowed_peers[1]: fd00::1 is not of the instance's address family"]),
    ("allowed_peers not an address", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, virtual_ips: [10.1.1.1/24], allowed_peers: [10.1.1.300] }\n", &["2:86: vrrp[0].allowed_peers[0]: \"10.1.1.300\" is not an IP address"]),
    ("allowed_peers differ from unicast_peers", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, virtual_ips: [10.1.1.1/24], unicast_peers: [10.1.1.2, 10.1.1.3], allowed_peers: [10.1.1.2, 10.1.1.9] }\n", &["2:122: vrrp[0].allowed_peers: unicast peer 10.1.1.3 is missing; expected the same addresses as unicast_peers, or no allowed_peers", "2:133: vrrp[0].allowed_peers[1]: 10.1.1.9 is not one of unicast_peers"]),
    ("unknown key with suggestion", "vrrp:\n  - name: r\n    interface: eth0\n    vrid: 1\n    prority: 100\n    virtual_ips: [10.1.1.1/24]\n", &["5:5: vrrp[0]: unknown key `prority` (did you mean `priority`?)"]),
    ("unknown top-level key", "gateway:\n  interface: eth0\n", &["1:1: top level: unknown key `gateway` (did you mean `gateways`?)"]),
    ("missing required keys", "vrrp:\n  - name: r\n    vrid: 1\n", &["2:5: vrrp[0]: missing required key `interface`", "2:5: vrrp[0]: missing required key `virtual_ips`"]),
    ("duration without unit", "gateways:\n  interface: eth1\n  addresses: 192.168.25.128\n  health: { interval: 5 }\n", &["4:23: gateways.health.interval: 5 has no unit; expected a duration such as 5s or 5ms"]),
    ("health interval absurdly long", "gateways:\n  interface: eth1\n  addresses: 192.168.25.128\n  health: { interval: 500years, timeout: 2m }\n", &["4:23: gateways.health.interval: 500years is too long; expected at most 1h", "4:42: gateways.health.timeout: 2m is too long; expected at most 1m"]),
    ("garp refresh absurdly long", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, garp_master_refresh: 9999999999s, virtual_ips: [10.1.1.1/24] }\n", &["2:63: vrrp[0].garp_master_refresh: 316years 10months 17days 8h 10m 39s is too long; expected at most 1h"]),
    ("tunnel_mtu below IPv4's minimum datagram", "gateways:\n  interface: eth1\n  addresses: 192.168.25.128\n  tunnel_mtu: 500\n", &["4:15: gateways.tunnel_mtu: 500 is out of range; expected an integer 576-65535"]),
    ("clamp_mss not a boolean", "gateways:\n  interface: eth1\n  addresses: 192.168.25.128\n  clamp_mss: 1280\n", &["4:14: gateways.clamp_mss: "]),
    ("local_route on the ingress VIPs", "gateways: { interface: eth1, addresses: 192.168.25.128 }\ningress:\n  virtual_servers:\n    - { name: a, port: 80, local_route: true, real_servers: [10.2.0.1] }\n", &["4:41: ingress.virtual_servers[0].local_route: the gateways' ingress VIPs are held by VRRP"]),
    ("local_route on a VRRP VIP", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, virtual_ips: [192.168.26.254/22] }\ningress:\n  virtual_servers:\n    - { name: dns, port: 53, addresses: [192.168.26.254], local_route: true, real_servers: [192.168.27.128] }\n", &["5:72: ingress.virtual_servers[0].local_route: 192.168.26.254 is a virtual IP of a vrrp instance"]),
    ("local_route on IPv6", "ingress:\n  virtual_servers:\n    - { name: dns, port: 53, addresses: [\"fd00::53\"], local_route: true, real_servers: [\"fd00::1\"] }\n", &["3:68: ingress.virtual_servers[0].local_route: fd00::53 is IPv6"]),
    ("reversed range", "gateways:\n  interface: eth1\n  addresses: 192.168.25.135-192.168.25.128\n", &["3:14: gateways.addresses: range 192.168.25.135-192.168.25.128 is reversed"]),
    ("bad address in list", "gateways:\n  interface: eth1\n  addresses: [192.168.25.128, 192.168.25.300]\n", &["3:31: gateways.addresses[1]: \"192.168.25.300\" is not an IPv4 address"]),
    ("cidr with host bits", "gateways:\n  interface: eth1\n  addresses: 192.168.25.128\n  egress: { exclude: [10.0.0.1/8] }\n", &["4:23: gateways.egress.exclude[0]: 10.0.0.1/8 has host bits set; expected the network address 10.0.0.0/8"]),
    ("ingress VIPs overlap gateways", "gateways:\n  interface: eth1\n  addresses: 192.168.25.128-192.168.25.131\n  ingress_vip_start: 192.168.25.130\n", &["4:22: gateways.ingress_vip_start: the ingress VIPs 192.168.25.130-192.168.25.133 include gateway address 192.168.25.130", "4:22: gateways.ingress_vip_start: the ingress VIPs 192.168.25.130-192.168.25.133 include gateway address 192.168.25.131"]),
    ("egress VIP inside ingress range", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, virtual_ips: [192.168.26.129/22] }\ngateways:\n  interface: eth1\n  addresses: 192.168.25.128-192.168.25.131\n", &["2:56: vrrp `r`: virtual IP 192.168.26.129 lies in the ingress VIP range 192.168.26.128-192.168.26.131"]),
    ("duplicate instance names", "vrrp:\n  - { name: r, interface: eth0, vrid: 1, virtual_ips: [10.1.1.1/24] }\n  - { name: r, interface: eth0, vrid: 2, virtual_ips: [10.1.1.2/24] }\n", &["3:13: vrrp[1].name: `r` is already used at line 2"]),
    ("only_when_master names nothing", "vrrp:\n  - { name: router, interface: eth0, vrid: 1, virtual_ips: [10.1.1.1/24] }\ngateways: { interface: eth1, addresses: 192.168.25.128 }\nddns:\n  hostname: vpn.example.com\n  only_when_master: routre\n  provider: { dynu: { api_key: \"${VPN_ROUTER_TEST_DYNU}\" } }\n", &["6:21: ddns.only_when_master: no vrrp instance is named `routre`; expected one of: router"]),
    ("secret file unreadable", "gateways:\n  interface: eth1\n  addresses: 192.168.25.128\n  health:\n    control_server:\n      auth: { api_key_file: /nonexistent/vpn-router/key }\n", &["6:29: gateways.health.control_server.auth.api_key_file: cannot read secret file /nonexistent/vpn-router/key"]),
    ("literal secret refused", "gateways:\n  interface: eth1\n  addresses: 192.168.25.128\n  health:\n    control_server:\n      auth: { basic: { username: u, password: hunter2 } }\n", &["6:47: gateways.health.control_server.auth.basic.password: secrets are not written in the config"]),
    ("timeout not below interval", "gateways:\n  interface: eth1\n  addresses: 192.168.25.128\n  health: { interval: 1s, timeout: 1s }\n", &["4:11: gateways.health.timeout: 1s is not shorter than the interval 1s"]),
    ("reserved table", "gateways:\n  interface: eth1\n  addresses: 192.168.25.128\n  egress: { table: 254 }\n", &["4:20: gateways.egress.table: table 254 is reserved"]),
    ("scheduler typo", "ingress:\n  virtual_servers:\n    - { name: a, port: 80, addresses: [10.1.1.1], scheduler: mhh, real_servers: [10.2.0.0/28] }\n", &["3:62: ingress.virtual_servers[0].scheduler: \"mhh\" is not allowed (did you mean `mh`?)"]),
    ("flags on rr", "ingress:\n  virtual_servers:\n    - { name: a, port: 80, addresses: [10.1.1.1], scheduler: rr, scheduler_flags: [port], real_servers: [10.2.0.0/28] }\n", &["3:83: ingress.virtual_servers[0].scheduler_flags: flags apply to the mh and sh schedulers only"]),
    ("huge real-server network", "ingress:\n  virtual_servers:\n    - { name: a, port: 80, addresses: [10.1.1.1], real_servers: [10.2.0.0/16] }\n", &["3:66: ingress.virtual_servers[0].real_servers[0]: 10.2.0.0/16 has more than 1024 hosts"]),
    ("gateway_ingress_vips without gateways", "ingress:\n  virtual_servers:\n    - { name: a, port: 80, real_servers: [10.2.0.1] }\n", &["3:7: ingress.virtual_servers[0].addresses: gateway_ingress_vips needs a `gateways` section"]),
    ("two ddns providers", "gateways: { interface: eth1, addresses: 192.168.25.128 }\nddns:\n  hostname: vpn.example.com\n  provider: { dynu: {}, cloudflare: {} }\n", &["4:13: ddns.provider: 2 providers set; expected exactly one"]),
    ("hostname outside zone", "gateways: { interface: eth1, addresses: 192.168.25.128 }\nddns:\n  hostname: vpn.example.org\n  provider:\n    rfc2136: { server: 127.0.0.1:53, zone: example.com, key_name: k, key_secret: \"${VPN_ROUTER_TEST_TSIG}\" }\n", &["3:13: ddns.hostname: vpn.example.org is not inside zone example.com"]),
    ("bucket marks overflow", "gateways:\n  interface: eth1\n  addresses: 192.168.25.128\n  egress: { mode: consistent }\n  return_routing: { mark_base: 0xffffff00 }\n", &["5:32: gateways.return_routing.mark_base: 0xffffff00 leaves no room for the 4093 bucket marks of egress.mode consistent above mark_base+256; expected at most 0xffffef03"]),
    ("yaml syntax error", "vrrp: [\n  {name: r\n", &["invalid YAML"]),
    ("wrong type", "api: 9090\n", &["1:6: api: found an integer; expected a mapping"]),
];

#[test]
fn broken_configs_report_position_and_expectation() {
    // SAFETY-free env setup for the `${ENV}` cases; names are unique to this test.
    std::env::set_var("VPN_ROUTER_TEST_DYNU", "dynu-key");
    std::env::set_var("VPN_ROUTER_TEST_TSIG", "c2VjcmV0");
    let mut failures = Vec::new();
    for (name, text, expected) in BROKEN {
        match load_text(text) {
            Ok(_) => failures.push(format!("{name}: accepted, expected errors {expected:?}")),
            Err(errs) => {
                let lines = errs.lines();
                for (i, want) in expected.iter().enumerate() {
                    let got = lines.get(i).map(String::as_str).unwrap_or("<none>");
                    let want_full = format!("c.yaml:{want}");
                    let matches = got.starts_with(&want_full)
                        || (want.starts_with("invalid") && got.contains(want));
                    if !matches {
                        failures.push(format!("{name}: error {i}\n   got: {got}\n  want: {want_full}…\n  all: {lines:#?}"));
                    }
                }
                if lines.len() != expected.len() && !expected[0].starts_with("invalid") {
                    failures.push(format!(
                        "{name}: {} errors, expected {}: {lines:#?}",
                        lines.len(),
                        expected.len()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn vrrp_v2_defaults_to_a_one_second_interval() {
    let c = load_text("vrrp:\n  - { name: r, interface: eth0, vrid: 1, version: 2, virtual_ips: [10.1.1.1/24] }\n").unwrap().config;
    assert_eq!(c.vrrp[0].advert_interval, Duration::from_secs(1));
}

#[test]
fn max_peer_advert_interval_defaults_to_ten_own_intervals_within_the_wire_format() {
    let one = |extra: &str| {
        let text = format!("vrrp:\n  - {{ name: r, interface: eth0, vrid: 1, virtual_ips: [10.1.1.1/24]{extra} }}\n");
        let c = load_text(&text)
            .unwrap_or_else(|e| panic!("{extra}: {e}"))
            .config;
        c.vrrp[0].clone()
    };
    assert_eq!(one("").max_peer_advert_interval, Duration::from_secs(1));
    assert_eq!(
        one(", advert_interval: 10ms").max_peer_advert_interval,
        Duration::from_millis(100)
    );
    // 10 × 5s is more than a VRRPv3 advert can say: no bound beyond the RFC's.
    assert_eq!(
        one(", advert_interval: 5s").max_peer_advert_interval,
        Duration::from_millis(40_950)
    );
    assert_eq!(
        one(", version: 2").max_peer_advert_interval,
        Duration::from_secs(10)
    );
    assert_eq!(
        one(", version: 2, advert_interval: 30s").max_peer_advert_interval,
        Duration::from_secs(255)
    );
    // Set: taken as is, from our own interval up to the field's maximum.
    assert_eq!(
        one(", max_peer_advert_interval: 40950ms").max_peer_advert_interval,
        Duration::from_millis(40_950)
    );
    assert_eq!(
        one(", max_peer_advert_interval: 100ms").max_peer_advert_interval,
        Duration::from_millis(100)
    );
    let v = one("");
    assert!(v.allowed_peers.is_empty());
    // The same set as unicast_peers, in any order, is accepted.
    let v = one(", unicast_peers: [10.1.1.2, 10.1.1.3], allowed_peers: [10.1.1.3, 10.1.1.2]");
    let allowed: Vec<String> = v
        .allowed_peers
        .iter()
        .map(|a| a.value.to_string())
        .collect();
    assert_eq!(allowed, ["10.1.1.3", "10.1.1.2"]);
}

#[test]
fn a_broken_section_is_not_also_reported_as_missing() {
    let text = "vrrp:\n  - { name: r, interface: eth0, vrid: 1, virtual_ips: [10.1.1.1/24], track_gateways: {} }\ngateways:\n  interface: eth1\n  addresses: 192.168.25.128\n  health:\n    control_server:\n      auth: { api_key_file: /nonexistent/key }\n";
    let lines = load_text(text).unwrap_err().lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("cannot read secret file /nonexistent/key"),
        "{lines:#?}"
    );
}

#[test]
fn several_errors_are_reported_at_once() {
    let text = "vrrp:\n  - name: r\n    interface: eth0\n    vrid: 300\n    priority: 0\n    colour: blue\n    virtual_ips: [10.1.1.1/24]\n";
    let errs = load_text(text).unwrap_err();
    let lines = errs.lines();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines[0].starts_with("c.yaml:4:11:"));
    assert!(lines[1].starts_with("c.yaml:5:15:"));
    assert!(lines[2].starts_with("c.yaml:6:5:"));
}

#[test]
fn secrets_never_show_in_debug_or_json() {
    let dir = scratch("secret");
    let text = reference_config_text(&dir);
    let c = load_text(&text).unwrap().config;
    let dbg = format!("{c:?}{c:#?}");
    let json = serde_json::to_string(&c).unwrap();
    for out in [&dbg, &json] {
        assert!(!out.contains("s3cret-gluetun"), "password leaked");
        assert!(
            !out.contains("c2VjcmV0LXRzaWcta2V5LWJ5dGVz"),
            "TSIG secret leaked"
        );
    }
    assert!(json.contains("<redacted>"));
}

#[test]
fn ddns_api_url_is_optional_checked_and_trimmed() {
    std::env::set_var("VPN_ROUTER_TEST_CF_TOKEN", "cf-token");
    let base = "gateways: { interface: eth1, addresses: 192.168.25.128 }\nddns:\n  hostname: vpn.example.com\n  provider:\n";
    let cf = |extra: &str| {
        format!("{base}    cloudflare: {{ zone_id: abc, api_token: \"${{VPN_ROUTER_TEST_CF_TOKEN}}\"{extra} }}\n")
    };
    let url = |text: &str| match load_text(text).unwrap().config.ddns.unwrap().provider {
        DdnsProvider::Cloudflare { api_url, .. } => api_url,
        p => panic!("{p:?}"),
    };
    assert_eq!(url(&cf("")), None);
    assert_eq!(
        url(&cf(", api_url: http://127.0.0.1:8080/client/v4/")).as_deref(),
        Some("http://127.0.0.1:8080/client/v4")
    );
    let errs = load_text(&cf(", api_url: ftp://example.com"))
        .unwrap_err()
        .lines();
    assert!(
        errs[0].contains("ddns.provider.cloudflare.api_url")
            && errs[0].contains("expected https://"),
        "{errs:?}"
    );
    std::env::set_var("VPN_ROUTER_TEST_DYNU_KEY", "dynu-key");
    let dynu = format!("{base}    dynu: {{ api_key: \"${{VPN_ROUTER_TEST_DYNU_KEY}}\", api_url: \"https://api.dynu.com/v2\" }}\n");
    match load_text(&dynu).unwrap().config.ddns.unwrap().provider {
        DdnsProvider::Dynu { api_url, .. } => {
            assert_eq!(api_url.as_deref(), Some("https://api.dynu.com/v2"))
        }
        p => panic!("{p:?}"),
    }
}
