//! YAML node tree → typed config, key by key. Defaults live here, next to the key they belong
//! to (docs/configuration.md lists the same values; a test checks every key is documented).
//! Cross-field rules are in `validate`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};

use super::reader::{Obj, Reader};
use super::yaml::{Node, Value};
use super::*;

pub(crate) const TOP: &[&str] = &["api", "log", "vrrp", "gateways", "ingress", "ddns"];

pub(crate) const API_KEYS: &[&str] = &["listen"];
pub(crate) const LOG_KEYS: &[&str] = &["level", "format"];
pub(crate) const VIRTUAL_IP_KEYS: &[&str] = &["address", "interface"];
pub(crate) const TRACK_GATEWAYS_KEYS: &[&str] = &["min_healthy", "weight"];
pub(crate) const HEALTH_KEYS: &[&str] = &[
    "interval",
    "timeout",
    "rise",
    "fall",
    "control_server",
    "health_server_port",
    "checks",
    "probe",
];
pub(crate) const CONTROL_SERVER_KEYS: &[&str] = &["port", "auth"];
pub(crate) const AUTH_KEYS: &[&str] = &["basic", "api_key", "api_key_file"];
pub(crate) const BASIC_AUTH_KEYS: &[&str] = &["username", "password", "password_file"];
pub(crate) const PROBE_KEYS: &[&str] = &["target"];
pub(crate) const EGRESS_KEYS: &[&str] = &[
    "mode",
    "table",
    "rule_priority",
    "destinations",
    "exclude",
    "exclude_reserved",
    "hash_seed",
    "when_none_healthy",
];
pub(crate) const RETURN_ROUTING_KEYS: &[&str] = &["mark_base", "table_base", "rule_priority_base"];
pub(crate) const INGRESS_KEYS: &[&str] = &["sloppy_tcp", "virtual_servers"];
pub(crate) const HEALTH_CHECK_KEYS: &[&str] = &[
    "type",
    "interval",
    "timeout",
    "rise",
    "fall",
    "path",
    "expect_status",
    "send",
    "expect",
    "query",
];
pub(crate) const DDNS_KEYS: &[&str] = &[
    "hostname",
    "ttl",
    "only_when_master",
    "max_records",
    "provider",
];
pub(crate) const DDNS_PROVIDER_KEYS: &[&str] = &["rfc2136", "cloudflare", "dynu"];
pub(crate) const RFC2136_KEYS: &[&str] = &[
    "server",
    "zone",
    "key_name",
    "key_algorithm",
    "key_secret",
    "key_secret_file",
];
pub(crate) const CLOUDFLARE_KEYS: &[&str] = &[
    "zone_id",
    "api_token",
    "api_token_file",
    "api_url",
    "ca_file",
];
pub(crate) const DYNU_KEYS: &[&str] = &["api_key", "api_key_file", "api_url", "ca_file"];

/// Every mapping of the config and the keys it accepts, by its path in the file (`[]` marks a
/// list item; `""` is the top level). The same consts are what `Reader::object` checks against,
/// so this list cannot drift from what is accepted.
pub(crate) const KEY_SETS: &[(&str, &[&str])] = &[
    ("", TOP),
    ("api", API_KEYS),
    ("log", LOG_KEYS),
    ("vrrp[]", VRRP_KEYS),
    ("vrrp[].virtual_ips[]", VIRTUAL_IP_KEYS),
    ("vrrp[].track_gateways", TRACK_GATEWAYS_KEYS),
    ("gateways", GATEWAY_KEYS),
    ("gateways.health", HEALTH_KEYS),
    ("gateways.health.control_server", CONTROL_SERVER_KEYS),
    ("gateways.health.control_server.auth", AUTH_KEYS),
    ("gateways.health.control_server.auth.basic", BASIC_AUTH_KEYS),
    ("gateways.health.probe", PROBE_KEYS),
    ("gateways.egress", EGRESS_KEYS),
    ("gateways.return_routing", RETURN_ROUTING_KEYS),
    ("ingress", INGRESS_KEYS),
    ("ingress.virtual_servers[]", VS_KEYS),
    ("ingress.virtual_servers[].health_check", HEALTH_CHECK_KEYS),
    ("ddns", DDNS_KEYS),
    ("ddns.provider", DDNS_PROVIDER_KEYS),
    ("ddns.provider.rfc2136", RFC2136_KEYS),
    ("ddns.provider.cloudflare", CLOUDFLARE_KEYS),
    ("ddns.provider.dynu", DYNU_KEYS),
];

pub fn config(r: &mut Reader, root: &Node, base: &Path) -> Option<Config> {
    let top = r.object(root, "", TOP)?;
    let api = top
        .opt(r, "api", |r, n, p| {
            let o = r.object(n, p, API_KEYS)?;
            Some(Api {
                listen: o.or(r, "listen", Api::default().listen, Reader::listen_addr),
            })
        })
        .unwrap_or_default();
    let log = top.opt(r, "log", log).unwrap_or_default();
    let vrrp = top
        .opt(r, "vrrp", |r, n, p| r.list(n, p, vrrp_instance))
        .unwrap_or_default();
    let gateways = top.opt(r, "gateways", |r, n, p| gateways(r, n, p, base));
    let ingress = top.opt(r, "ingress", ingress);
    let ddns = top.opt(r, "ddns", |r, n, p| ddns(r, n, p, base));
    // A section that is present but failed to parse has its errors reported already; the
    // cross-field rules must not also call it "missing".
    for (key, parsed) in [
        ("gateways", gateways.is_some()),
        ("ingress", ingress.is_some()),
        ("ddns", ddns.is_some()),
    ] {
        if top.has(key) && !parsed {
            r.broken_sections.push(key);
        }
    }
    let vrrp_at = top.get("vrrp").map_or(top.at, |n| n.at);
    Some(Config {
        vrrp_at,
        api,
        log,
        vrrp,
        gateways,
        ingress,
        ddns,
    })
}

fn log(r: &mut Reader, n: &Node, p: &str) -> Option<Log> {
    let o = r.object(n, p, LOG_KEYS)?;
    let d = Log::default();
    Some(Log {
        level: o.or(r, "level", d.level, |r, n, p| {
            r.choice(
                n,
                p,
                &[
                    ("error", LogLevel::Error),
                    ("warn", LogLevel::Warn),
                    ("info", LogLevel::Info),
                    ("debug", LogLevel::Debug),
                    ("trace", LogLevel::Trace),
                ],
            )
        }),
        format: o.or(r, "format", d.format, |r, n, p| {
            r.choice(
                n,
                p,
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            )
        }),
    })
}

pub(crate) const VRRP_KEYS: &[&str] = &[
    "name",
    "interface",
    "vrid",
    "version",
    "priority",
    "advert_interval",
    "preempt",
    "preempt_delay",
    "unicast_peers",
    "vmac",
    "virtual_ips",
    "gateway_ingress_vips",
    "track_gateways",
    "v3_checksum_as_v2",
    "garp_master_repeat",
    "garp_master_refresh",
    "max_peer_advert_interval",
    "allowed_peers",
];

fn vrrp_instance(r: &mut Reader, n: &Node, p: &str) -> Option<VrrpInstance> {
    let o = r.object(n, p, VRRP_KEYS)?;
    let name = o.req(r, "name", "the instance's name, e.g. router", |r, n, p| {
        r.string(n, p).map(|value| At { value, at: n.at })
    });
    let interface = o.req(
        r,
        "interface",
        "the interface adverts are sent on",
        Reader::string,
    );
    let vrid = o.req(
        r,
        "vrid",
        "the virtual router id, an integer 1-255",
        |r, n, p| r.u8(n, p, 1, 255),
    );
    let version = o.or(r, "version", VrrpVersion::V3, |r, n, p| {
        r.choice(n, p, &[("3", VrrpVersion::V3), ("2", VrrpVersion::V2)])
    });
    let priority = o.or(r, "priority", 100, |r, n, p| r.u8(n, p, 1, 255));
    // VRRPv2 cannot carry less than a second (RFC 3768 §5.3.7): its default is the RFC's 1s.
    let default_interval = match version {
        VrrpVersion::V3 => Duration::from_millis(100),
        VrrpVersion::V2 => Duration::from_secs(1),
    };
    let errors_before = r.errors.len();
    let advert_interval = o.or(r, "advert_interval", default_interval, |r, n, p| {
        let d = r.duration(n, p)?;
        advert_interval_ok(r, n, p, d, version)
    });
    let advert_interval_valid = r.errors.len() == errors_before;
    // A default relative to another key: resolved here, once advert_interval is known, so
    // the loaded config holds the value in force and a reload that changes advert_interval
    // moves it along unless it is set. The rule is the vrrp crate's.
    let vrrp_version = match version {
        VrrpVersion::V3 => ::vrrp::Version::V3,
        VrrpVersion::V2 => ::vrrp::Version::V2,
    };
    let max_peer_advert_interval = o.or(
        r,
        "max_peer_advert_interval",
        ::vrrp::instance::default_max_peer_advert_interval(vrrp_version, advert_interval),
        |r, n, p| {
            let d = r.duration(n, p)?;
            let wire = ::vrrp::instance::max_wire_advert_interval(vrrp_version);
            let shown = humantime::format_duration(d);
            if d > wire {
                r.error(n.at, format!("{p}: {shown} is out of range; expected at most {}, the longest interval a VRRPv{} advert carries", humantime::format_duration(wire), if version == VrrpVersion::V3 { 3 } else { 2 }));
                return None;
            }
            if advert_interval_valid && d < advert_interval {
                r.error(n.at, format!("{p}: {shown} is shorter than advert_interval {}; expected at least the instance's own interval (a peer configured like this router must be heard)", humantime::format_duration(advert_interval)));
                return None;
            }
            Some(d)
        },
    );
    let preempt = o.or(r, "preempt", true, Reader::bool);
    let preempt_delay = o.or(r, "preempt_delay", Duration::ZERO, |r, n, p| {
        let d = r.duration(n, p)?;
        if d > Duration::from_secs(3600) {
            r.error(
                n.at,
                format!(
                    "{p}: {} is too long; expected at most 1h",
                    humantime::format_duration(d)
                ),
            );
            return None;
        }
        Some(d)
    });
    let unicast_peers = o.or(r, "unicast_peers", Vec::new(), |r, n, p| {
        r.list(n, p, Reader::ip)
    });
    let allowed_peers = o.or(r, "allowed_peers", Vec::new(), |r, n, p| {
        r.list(n, p, |r, n, p| {
            r.ip(n, p).map(|value| At { value, at: n.at })
        })
    });
    let allowed_peers_at = o.get("allowed_peers").map_or(o.at, |n| n.at);
    let vmac = o.or(r, "vmac", true, Reader::bool);
    let default_if = interface.clone().unwrap_or_default();
    let virtual_ips = o.req(
        r,
        "virtual_ips",
        "a list of { address: A/LEN, interface: IF }",
        |r, n, p| r.list(n, p, |r, n, p| virtual_ip(r, n, p, &default_if)),
    );
    let gateway_ingress_vips = o.or(r, "gateway_ingress_vips", false, Reader::bool);
    let track_gateways = o.opt(r, "track_gateways", |r, n, p| {
        let t = r.object(n, p, TRACK_GATEWAYS_KEYS)?;
        Some(TrackGateways {
            min_healthy: t.or(r, "min_healthy", 1, |r, n, p| r.u32(n, p, 1, 1024)),
            weight: t.or(r, "weight", -50, |r, n, p| {
                r.int(n, p, -254, -1).map(|v| v as i32)
            }),
        })
    });
    let v3_checksum_as_v2 = o.or(r, "v3_checksum_as_v2", false, Reader::bool);
    let garp_master_repeat = o.or(r, "garp_master_repeat", 5, |r, n, p| r.u32(n, p, 0, 100));
    let garp_master_refresh = o.or(
        r,
        "garp_master_refresh",
        Duration::ZERO,
        bounded(MAX_GARP_REFRESH, false),
    );
    Some(VrrpInstance {
        name: name?,
        interface: interface?,
        vrid: vrid?,
        version,
        priority,
        advert_interval,
        preempt,
        preempt_delay,
        unicast_peers,
        vmac,
        virtual_ips: virtual_ips?,
        gateway_ingress_vips,
        track_gateways,
        v3_checksum_as_v2,
        garp_master_repeat,
        garp_master_refresh,
        max_peer_advert_interval,
        allowed_peers,
        allowed_peers_at,
    })
}

/// RFC 5798 §5.2.7: v3 carries the interval in centiseconds in 12 bits (10 ms – 40.95 s);
/// RFC 3768 §5.3.7: v2 carries whole seconds in 8 bits.
fn advert_interval_ok(
    r: &mut Reader,
    n: &Node,
    p: &str,
    d: Duration,
    version: VrrpVersion,
) -> Option<Duration> {
    let ms = d.as_millis();
    let shown = humantime::format_duration(d);
    match version {
        VrrpVersion::V3 => {
            if !ms.is_multiple_of(10) || !d.subsec_nanos().is_multiple_of(1_000_000) {
                r.error(n.at, format!("{p}: {shown} is not a multiple of 10ms; expected a VRRPv3 interval in 10ms steps (10ms-40.95s)"));
                None
            } else if !(10..=40_950).contains(&ms) {
                r.error(
                    n.at,
                    format!("{p}: {shown} is out of range; expected a VRRPv3 interval 10ms-40.95s"),
                );
                None
            } else {
                Some(d)
            }
        }
        VrrpVersion::V2 => {
            if d.subsec_nanos() != 0 || !(1..=255).contains(&d.as_secs()) {
                r.error(n.at, format!("{p}: {shown} is not a whole number of seconds 1s-255s; expected a VRRPv2 interval (version: 2 has 1s granularity)"));
                None
            } else {
                Some(d)
            }
        }
    }
}

fn virtual_ip(r: &mut Reader, n: &Node, p: &str, default_if: &str) -> Option<VirtualIp> {
    // A bare `192.168.26.254/22` is shorthand for `{ address: ..., interface: <instance's> }`.
    if let Value::Str(_) = n.value {
        let address = r.interface_address(n, p)?;
        return Some(VirtualIp {
            address: At {
                value: address,
                at: n.at,
            },
            interface: default_if.to_owned(),
        });
    }
    let o = r.object(n, p, VIRTUAL_IP_KEYS)?;
    let address = o.req(
        r,
        "address",
        "an address with prefix length, e.g. 192.168.26.254/22",
        |r, n, p| {
            r.interface_address(n, p)
                .map(|value| At { value, at: n.at })
        },
    )?;
    let interface = o.or(r, "interface", default_if.to_owned(), Reader::string);
    Some(VirtualIp { address, interface })
}

pub(crate) const GATEWAY_KEYS: &[&str] = &[
    "interface",
    "addresses",
    "ingress_vip_start",
    "tunnel_mtu",
    "clamp_mss",
    "health",
    "egress",
    "return_routing",
];

/// gluetun's `WIREGUARD_MTU` default (v3.40, v3.41): 1420 less room for the pod network's own
/// encapsulation.
pub(crate) const DEFAULT_TUNNEL_MTU: u32 = 1320;
/// The smallest MTU every IPv4 host must take whole (RFC 791), and IPv6's (RFC 8200): below
/// 576 an MSS clamp would cost more than fragments.
const MIN_TUNNEL_MTU: u32 = 576;

fn gateways(r: &mut Reader, n: &Node, p: &str, base: &Path) -> Option<Gateways> {
    let o = r.object(n, p, GATEWAY_KEYS)?;
    let interface = o.req(
        r,
        "interface",
        "the interface on the gateway network",
        Reader::string,
    );
    let addresses = o.req(
        r,
        "addresses",
        "a range A-B or a list of gateway addresses",
        |r, n, p| gateway_addresses(r, n, p).map(|value| At { value, at: n.at }),
    );
    let ingress_vip_start = o.or(
        r,
        "ingress_vip_start",
        At {
            value: Ipv4Addr::new(192, 168, 26, 128),
            at: o.at,
        },
        |r, n, p| r.ipv4(n, p).map(|value| At { value, at: n.at }),
    );
    let tunnel_mtu = o.or(
        r,
        "tunnel_mtu",
        At {
            value: DEFAULT_TUNNEL_MTU,
            at: o.at,
        },
        |r, n, p| {
            r.u32(n, p, MIN_TUNNEL_MTU, 65535)
                .map(|value| At { value, at: n.at })
        },
    );
    let clamp_mss = o.or(r, "clamp_mss", true, Reader::bool);
    let health = o.opt(r, "health", |r, n, p| health(r, n, p, base));
    let egress = o.opt(r, "egress", egress);
    let return_routing = o.opt(r, "return_routing", return_routing);
    let section_ok = |key: &str, parsed: bool| !o.has(key) || parsed;
    if !section_ok("health", health.is_some())
        || !section_ok("egress", egress.is_some())
        || !section_ok("return_routing", return_routing.is_some())
    {
        return None;
    }
    let at = o.at;
    Some(Gateways {
        at,
        interface: interface?,
        addresses: addresses?,
        ingress_vip_start,
        tunnel_mtu,
        clamp_mss,
        health: match health {
            Some(h) => h,
            None => health_defaults(at),
        },
        egress: egress.unwrap_or_else(|| egress_defaults(at)),
        return_routing: return_routing.unwrap_or_else(|| return_routing_defaults(at)),
    })
}

/// `192.168.25.128-192.168.25.135` or a list of addresses (each item may itself be a range).
fn gateway_addresses(r: &mut Reader, n: &Node, p: &str) -> Option<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    match &n.value {
        Value::Seq(items) => {
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                match address_range(r, item, &format!("{p}[{i}]")) {
                    Some(mut v) => out.append(&mut v),
                    None => ok = false,
                }
            }
            if !ok {
                return None;
            }
        }
        _ => out = address_range(r, n, p)?,
    }
    if out.is_empty() {
        r.error(
            n.at,
            format!("{p}: no addresses; expected at least one gateway"),
        );
        return None;
    }
    let mut sorted = out.clone();
    sorted.sort();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        r.error(
            n.at,
            format!("{p}: {} is listed twice; expected each gateway once", w[0]),
        );
        return None;
    }
    // Gateway i owns mark_base+i, table_base+i and ingress VIP start+i: 64 is far beyond any
    // real VPN account and keeps those ranges small.
    if out.len() > 64 {
        r.error(
            n.at,
            format!("{p}: {} gateways; expected at most 64", out.len()),
        );
        return None;
    }
    Some(out)
}

fn address_range(r: &mut Reader, n: &Node, p: &str) -> Option<Vec<Ipv4Addr>> {
    let Value::Str(s) = &n.value else {
        r.error(
            n.at,
            format!(
                "{p}: found {}; expected an IPv4 address or a range A-B",
                n.value.kind()
            ),
        );
        return None;
    };
    let parse = |t: &str| t.trim().parse::<Ipv4Addr>().ok();
    match s.split_once('-') {
        Some((a, b)) => {
            let (Some(a), Some(b)) = (parse(a), parse(b)) else {
                r.error(n.at, format!("{p}: {s:?} is not a range; expected A-B with IPv4 addresses, e.g. 192.168.25.128-192.168.25.135"));
                return None;
            };
            if a > b {
                r.error(
                    n.at,
                    format!("{p}: range {a}-{b} is reversed; expected the lower address first"),
                );
                return None;
            }
            let (a, b) = (u32::from(a), u32::from(b));
            if b - a >= 64 {
                r.error(
                    n.at,
                    format!(
                        "{p}: range {s} has {} addresses; expected at most 64 gateways",
                        b - a + 1
                    ),
                );
                return None;
            }
            Some((a..=b).map(Ipv4Addr::from).collect())
        }
        None => match parse(s) {
            Some(a) => Some(vec![a]),
            None => {
                r.error(n.at, format!("{p}: {s:?} is not an IPv4 address; expected e.g. 192.168.25.128 or a range A-B"));
                None
            }
        },
    }
}

fn health_defaults(at: Location) -> Health {
    Health {
        at,
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(750),
        rise: 2,
        fall: 2,
        control_server: ControlServer {
            port: 8000,
            auth: None,
        },
        health_server_port: 9999,
        checks: vec![HealthCheckKind::VpnStatus, HealthCheckKind::PublicIp],
        probe: Probe {
            target: SocketAddr::from(([1, 1, 1, 1], 443)),
        },
    }
}

fn health(r: &mut Reader, n: &Node, p: &str, base: &Path) -> Option<Health> {
    let o = r.object(n, p, HEALTH_KEYS)?;
    let d = health_defaults(o.at);
    let control_server = o.opt(r, "control_server", |r, n, p| {
        let c = r.object(n, p, CONTROL_SERVER_KEYS)?;
        let port = c.or(r, "port", 8000, |r, n, p| r.u16(n, p, 1, 65535));
        let auth = match c.get("auth") {
            Some(a) => Some(control_auth(r, a, &c.child("auth"), base)?),
            None => None,
        };
        Some(ControlServer { port, auth })
    });
    if o.has("control_server") && control_server.is_none() {
        return None;
    }
    Some(Health {
        at: o.at,
        interval: o.or(r, "interval", d.interval, bounded(MAX_CHECK_INTERVAL, true)),
        timeout: o.or(r, "timeout", d.timeout, bounded(MAX_CHECK_TIMEOUT, true)),
        rise: o.or(r, "rise", d.rise, |r, n, p| r.u32(n, p, 1, 100)),
        fall: o.or(r, "fall", d.fall, |r, n, p| r.u32(n, p, 1, 100)),
        control_server: control_server.unwrap_or(d.control_server),
        health_server_port: o.or(r, "health_server_port", d.health_server_port, |r, n, p| {
            r.u16(n, p, 1, 65535)
        }),
        checks: o.or(r, "checks", d.checks, |r, n, p| {
            r.list(n, p, |r, n, p| {
                r.choice(
                    n,
                    p,
                    &[
                        ("vpn_status", HealthCheckKind::VpnStatus),
                        ("public_ip", HealthCheckKind::PublicIp),
                        ("health_server", HealthCheckKind::HealthServer),
                        ("probe", HealthCheckKind::Probe),
                    ],
                )
            })
        }),
        probe: o.or(r, "probe", d.probe, |r, n, p| {
            let pr = r.object(n, p, PROBE_KEYS)?;
            Some(Probe {
                target: pr.or(
                    r,
                    "target",
                    SocketAddr::from(([1, 1, 1, 1], 443)),
                    Reader::socket_addr,
                ),
            })
        }),
    })
}

fn positive_duration(r: &mut Reader, n: &Node, p: &str) -> Option<Duration> {
    let d = r.duration(n, p)?;
    if d.is_zero() {
        r.error(n.at, format!("{p}: 0s; expected a positive duration"));
        return None;
    }
    Some(d)
}

/// Upper bounds of the durations that become timers: a value the daemon adds to "now" must
/// not overflow (`Instant + 500 years` panics), and anything longer than these is a typo.
pub(crate) const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
pub(crate) const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const MAX_GARP_REFRESH: Duration = Duration::from_secs(3600);

/// A duration of at most `max` (and positive when `positive`).
fn bounded(max: Duration, positive: bool) -> impl Fn(&mut Reader, &Node, &str) -> Option<Duration> {
    move |r, n, p| {
        let d = if positive {
            positive_duration(r, n, p)?
        } else {
            r.duration(n, p)?
        };
        if d > max {
            r.error(
                n.at,
                format!(
                    "{p}: {} is too long; expected at most {}",
                    humantime::format_duration(d),
                    humantime::format_duration(max)
                ),
            );
            return None;
        }
        Some(d)
    }
}

fn control_auth(r: &mut Reader, n: &Node, p: &str, base: &Path) -> Option<ControlServerAuth> {
    let o = r.object(n, p, AUTH_KEYS)?;
    let kinds = AUTH_KEYS.iter().filter(|k| o.has(k)).count();
    if kinds != 1 {
        r.error(o.at, format!("{p}: expected exactly one of `basic`, `api_key_file` (or `api_key: ${{ENV}}`); found {kinds}"));
        return None;
    }
    if let Some(b) = o.get("basic") {
        let bp = o.child("basic");
        let bo = r.object(b, &bp, BASIC_AUTH_KEYS)?;
        let username = bo.req(
            r,
            "username",
            "the control server's user name",
            Reader::string,
        );
        let password = secret(r, &bo, "password", base);
        return Some(ControlServerAuth::Basic {
            username: username?,
            password: password?,
        });
    }
    secret(r, &o, "api_key", base).map(ControlServerAuth::ApiKey)
}

/// A secret given as `KEY_file: PATH` (relative paths are relative to the config file) or
/// `KEY: ${ENV}` — exactly one of the two.
fn secret(r: &mut Reader, o: &Obj<'_>, key: &str, base: &Path) -> Option<Secret> {
    let file_key = format!("{key}_file");
    match (o.get(key), o.get(&file_key)) {
        (Some(_), Some(n)) => {
            r.error(
                n.at,
                format!(
                    "{}: both `{key}` and `{file_key}` are set; expected one",
                    o.path
                ),
            );
            None
        }
        (None, None) => {
            r.error(o.at, format!("{}: missing `{file_key}`; expected a file holding the secret (or `{key}: ${{ENV}}`)", o.path));
            None
        }
        (Some(n), None) => {
            let text = r.string(n, &o.child(key))?;
            match Secret::from_env_reference(&text) {
                Ok(s) => Some(s),
                Err(e) => {
                    // Never echo the value: it may be the secret itself.
                    r.error(n.at, format!("{}: {e}", o.child(key)));
                    None
                }
            }
        }
        (None, Some(n)) => {
            let path = r.string(n, &o.child(&file_key))?;
            let path = base.join(path);
            match Secret::from_file(&path) {
                Ok(s) => Some(s),
                Err(e) => {
                    r.error(
                        n.at,
                        format!("{}: {e}; expected a readable file", o.child(&file_key)),
                    );
                    None
                }
            }
        }
    }
}

fn egress_defaults(at: Location) -> Egress {
    Egress {
        mode: EgressMode::Ecmp,
        table: At { value: 180, at },
        rule_priority: At { value: 10888, at },
        destinations: vec![Ipv4Net::default()],
        exclude: Vec::new(),
        exclude_reserved: true,
        hash_seed: 0xdead_beef,
        when_none_healthy: NoneHealthy::Blackhole,
    }
}

fn egress(r: &mut Reader, n: &Node, p: &str) -> Option<Egress> {
    let o = r.object(n, p, EGRESS_KEYS)?;
    let d = egress_defaults(o.at);
    let ipv4_cidrs = |r: &mut Reader, n: &Node, p: &str| {
        r.list(n, p, |r, n, p| match r.cidr(n, p)? {
            IpNet::V4(v4) => Some(v4),
            IpNet::V6(v6) => {
                r.error(
                    n.at,
                    format!("{p}: {v6} is IPv6; expected an IPv4 network (egress is IPv4 in v0)"),
                );
                None
            }
        })
    };
    Some(Egress {
        mode: o.or(r, "mode", d.mode, |r, n, p| {
            r.choice(
                n,
                p,
                &[
                    ("ecmp", EgressMode::Ecmp),
                    ("ecmp_resilient", EgressMode::EcmpResilient),
                    ("consistent", EgressMode::Consistent),
                ],
            )
        }),
        table: o.or(r, "table", d.table, table_id),
        rule_priority: o.or(r, "rule_priority", d.rule_priority, rule_priority),
        destinations: o.or(r, "destinations", d.destinations, ipv4_cidrs),
        exclude: o.or(r, "exclude", d.exclude, ipv4_cidrs),
        exclude_reserved: o.or(r, "exclude_reserved", d.exclude_reserved, Reader::bool),
        hash_seed: o.or(r, "hash_seed", d.hash_seed, |r, n, p| {
            r.u32(n, p, 0, u32::MAX)
        }),
        when_none_healthy: o.or(r, "when_none_healthy", d.when_none_healthy, |r, n, p| {
            r.choice(
                n,
                p,
                &[
                    ("blackhole", NoneHealthy::Blackhole),
                    ("unreachable", NoneHealthy::Unreachable),
                ],
            )
        }),
    })
}

/// Routing table ids 1-252 and 256+; 0 (unspec), 253 (default), 254 (main) and 255 (local)
/// belong to the kernel.
fn table_id(r: &mut Reader, n: &Node, p: &str) -> Option<At<u32>> {
    let v = r.u32(n, p, 1, u32::MAX)?;
    if (253..=255).contains(&v) {
        r.error(n.at, format!("{p}: table {v} is reserved (253 default, 254 main, 255 local); expected 1-252 or 256 and above"));
        return None;
    }
    Some(At { value: v, at: n.at })
}

/// Rule priority 0 is the `local` table's rule, 32766/32767 are main/default.
fn rule_priority(r: &mut Reader, n: &Node, p: &str) -> Option<At<u32>> {
    let v = r.u32(n, p, 1, 32765)?;
    Some(At { value: v, at: n.at })
}

fn return_routing_defaults(at: Location) -> ReturnRouting {
    ReturnRouting {
        mark_base: At { value: 0x1900, at },
        table_base: At { value: 50, at },
        rule_priority_base: At { value: 1000, at },
    }
}

fn return_routing(r: &mut Reader, n: &Node, p: &str) -> Option<ReturnRouting> {
    let o = r.object(n, p, RETURN_ROUTING_KEYS)?;
    let d = return_routing_defaults(o.at);
    Some(ReturnRouting {
        mark_base: o.or(r, "mark_base", d.mark_base, |r, n, p| {
            r.u32(n, p, 1, u32::MAX - 64)
                .map(|value| At { value, at: n.at })
        }),
        table_base: o.or(r, "table_base", d.table_base, table_id),
        rule_priority_base: o.or(r, "rule_priority_base", d.rule_priority_base, rule_priority),
    })
}

fn ingress(r: &mut Reader, n: &Node, p: &str) -> Option<Ingress> {
    let o = r.object(n, p, INGRESS_KEYS)?;
    let virtual_servers = o.or(r, "virtual_servers", Vec::new(), |r, n, p| {
        r.list(n, p, virtual_server)
    });
    Some(Ingress {
        sloppy_tcp: o.or(r, "sloppy_tcp", true, Reader::bool),
        virtual_servers,
    })
}

/// The IPVS schedulers of the mainline kernel (net/netfilter/ipvs/ip_vs_*.c).
const SCHEDULERS: &[(&str, &str)] = &[
    ("rr", "rr"),
    ("wrr", "wrr"),
    ("lc", "lc"),
    ("wlc", "wlc"),
    ("lblc", "lblc"),
    ("lblcr", "lblcr"),
    ("dh", "dh"),
    ("sh", "sh"),
    ("sed", "sed"),
    ("nq", "nq"),
    ("fo", "fo"),
    ("ovf", "ovf"),
    ("mh", "mh"),
    ("twos", "twos"),
];

pub(crate) const VS_KEYS: &[&str] = &[
    "name",
    "port",
    "protocols",
    "addresses",
    "scheduler",
    "scheduler_flags",
    "real_servers",
    "real_port",
    "health_check",
    "on_failure",
    "local_route",
];

fn virtual_server(r: &mut Reader, n: &Node, p: &str) -> Option<VirtualServer> {
    let o = r.object(n, p, VS_KEYS)?;
    let name = o.req(
        r,
        "name",
        "the virtual server's name, e.g. port-1",
        |r, n, p| r.string(n, p).map(|value| At { value, at: n.at }),
    );
    let port = o.req(r, "port", "the port 1-65535", |r, n, p| {
        r.u16(n, p, 1, 65535)
    });
    let protocols = o.or(r, "protocols", vec![Protocol::Tcp], |r, n, p| {
        let list = r.list(n, p, |r, n, p| {
            r.choice(
                n,
                p,
                &[
                    ("tcp", Protocol::Tcp),
                    ("udp", Protocol::Udp),
                    ("sctp", Protocol::Sctp),
                ],
            )
        })?;
        if list.is_empty() {
            r.error(
                n.at,
                format!("{p}: empty; expected at least one of tcp, udp, sctp"),
            );
            return None;
        }
        Some(list)
    });
    let addresses = o.or(
        r,
        "addresses",
        At {
            value: VsAddresses::GatewayIngressVips,
            at: o.at,
        },
        |r, n, p| {
            let value = match &n.value {
                Value::Str(s) if s == "gateway_ingress_vips" => VsAddresses::GatewayIngressVips,
                Value::Seq(_) => VsAddresses::List(r.list(n, p, Reader::ip)?),
                _ => {
                    r.error(
                        n.at,
                        format!(
                            "{p}: found {}; expected `gateway_ingress_vips` or a list of addresses",
                            n.value
                        ),
                    );
                    return None;
                }
            };
            Some(At { value, at: n.at })
        },
    );
    let scheduler = o.or(r, "scheduler", "mh", |r, n, p| r.choice(n, p, SCHEDULERS));
    let scheduler_flags = o.or(r, "scheduler_flags", Vec::new(), |r, n, p| {
        r.list(n, p, |r, n, p| {
            r.choice(
                n,
                p,
                &[
                    ("fallback", SchedulerFlag::Fallback),
                    ("port", SchedulerFlag::Port),
                ],
            )
        })
    });
    if !scheduler_flags.is_empty() && !matches!(scheduler, "mh" | "sh") {
        if let Some(f) = o.get("scheduler_flags") {
            r.error(f.at, format!("{}: flags apply to the mh and sh schedulers only; expected no flags for `{scheduler}`", o.child("scheduler_flags")));
        }
    }
    let real_servers = o.req(r, "real_servers", "a list of addresses and CIDRs", |r, n, p| {
        let list = r.list(n, p, |r, n, p| {
            let net = r.address_or_cidr(n, p)?;
            // Every host of a network is checked: a /16 would be 65534 health checks.
            if net.max_prefix_len() - net.prefix_len() > 10 {
                r.error(n.at, format!("{p}: {net} has more than 1024 hosts; expected a smaller network (each host is health-checked)"));
                return None;
            }
            Some(net)
        })?;
        if list.is_empty() {
            r.error(n.at, format!("{p}: empty; expected at least one address or CIDR"));
            return None;
        }
        Some(list)
    });
    let real_port = o.opt(r, "real_port", |r, n, p| r.u16(n, p, 1, 65535));
    let health_check = o.opt(r, "health_check", real_server_check);
    if o.has("health_check") && health_check.is_none() {
        return None;
    }
    let on_failure = o.or(r, "on_failure", OnFailure::Quiesce, |r, n, p| {
        r.choice(
            n,
            p,
            &[
                ("quiesce", OnFailure::Quiesce),
                ("remove", OnFailure::Remove),
            ],
        )
    });
    let local_route = o.or(
        r,
        "local_route",
        At {
            value: false,
            at: o.at,
        },
        |r, n, p| r.bool(n, p).map(|value| At { value, at: n.at }),
    );
    let port = port?;
    Some(VirtualServer {
        name: name?,
        port,
        protocols,
        addresses,
        scheduler: scheduler.to_owned(),
        scheduler_flags,
        real_servers: real_servers?,
        real_port: real_port.unwrap_or(port),
        health_check: health_check.unwrap_or_else(real_server_check_defaults),
        on_failure,
        local_route,
    })
}

fn real_server_check_defaults() -> RealServerCheck {
    RealServerCheck {
        kind: RealServerCheckKind::Tcp,
        interval: Duration::from_secs(3),
        timeout: Duration::from_secs(1),
        rise: 1,
        fall: 2,
    }
}

fn real_server_check(r: &mut Reader, n: &Node, p: &str) -> Option<RealServerCheck> {
    let o = r.object(n, p, HEALTH_CHECK_KEYS)?;
    #[derive(Clone, Copy, PartialEq)]
    enum T {
        Tcp,
        Http,
        Udp,
        Dns,
        None,
    }
    let t = o.or(r, "type", T::Tcp, |r, n, p| {
        r.choice(
            n,
            p,
            &[
                ("tcp", T::Tcp),
                ("http", T::Http),
                ("udp", T::Udp),
                ("dns", T::Dns),
                ("none", T::None),
            ],
        )
    });
    // Keys that belong to another check type are mistakes, not options.
    let only_for: &[(&str, T)] = &[
        ("path", T::Http),
        ("expect_status", T::Http),
        ("send", T::Udp),
        ("expect", T::Udp),
        ("query", T::Dns),
    ];
    for (key, owner) in only_for {
        if let Some(kn) = o.get(key) {
            if *owner != t {
                r.error(
                    kn.at,
                    format!(
                        "{}: `{key}` does not apply to this check type",
                        o.child(key)
                    ),
                );
            }
        }
    }
    let kind = match t {
        T::Tcp => RealServerCheckKind::Tcp,
        T::None => RealServerCheckKind::None,
        T::Http => RealServerCheckKind::Http {
            path: o.or(r, "path", "/".to_owned(), |r, n, p| {
                let s = r.string(n, p)?;
                if !s.starts_with('/') {
                    r.error(n.at, format!("{p}: {s:?} does not start with /; expected a URL path such as /healthz"));
                    return None;
                }
                Some(s)
            }),
            expect_status: o.or(r, "expect_status", 200, |r, n, p| r.u16(n, p, 100, 599)),
        },
        T::Udp => RealServerCheckKind::Udp {
            send: o.req(r, "send", "the datagram to send (text)", Reader::string)?,
            expect: o.opt(r, "expect", Reader::string),
        },
        T::Dns => RealServerCheckKind::Dns {
            query: o.req(r, "query", "a name to resolve, e.g. kubernetes.default.svc.cluster.local", Reader::string)?,
        },
    };
    let d = real_server_check_defaults();
    Some(RealServerCheck {
        kind,
        interval: o.or(r, "interval", d.interval, bounded(MAX_CHECK_INTERVAL, true)),
        timeout: o.or(r, "timeout", d.timeout, bounded(MAX_CHECK_TIMEOUT, true)),
        rise: o.or(r, "rise", d.rise, |r, n, p| r.u32(n, p, 1, 100)),
        fall: o.or(r, "fall", d.fall, |r, n, p| r.u32(n, p, 1, 100)),
    })
}

fn ddns(r: &mut Reader, n: &Node, p: &str, base: &Path) -> Option<Ddns> {
    let o = r.object(n, p, DDNS_KEYS)?;
    let hostname = o.req(r, "hostname", "the DNS name to keep updated, e.g. vpn.example.com", |r, n, p| {
        let h = r.string(n, p)?;
        if !is_dns_name(&h) {
            r.error(n.at, format!("{p}: {h:?} is not a valid DNS name; expected labels of letters, digits and hyphens, e.g. vpn.example.com"));
            return None;
        }
        Some(At { value: h.trim_end_matches('.').to_ascii_lowercase(), at: n.at })
    });
    let ttl = o.or(r, "ttl", Duration::from_secs(60), |r, n, p| {
        let d = r.duration(n, p)?;
        if d.subsec_nanos() != 0 || d.as_secs() == 0 || d.as_secs() > i32::MAX as u64 {
            r.error(
                n.at,
                format!(
                    "{p}: {}; expected whole seconds, at least 1s",
                    humantime::format_duration(d)
                ),
            );
            return None;
        }
        Some(d)
    });
    let only_when_master = o.opt(r, "only_when_master", |r, n, p| {
        r.string(n, p).map(|value| At { value, at: n.at })
    });
    let max_records = o.or(r, "max_records", 4, |r, n, p| r.u32(n, p, 1, 64));
    let provider = o.req(
        r,
        "provider",
        "one of rfc2136, cloudflare, dynu",
        |r, n, p| ddns_provider(r, n, p, base),
    );
    Some(Ddns {
        hostname: hostname?,
        ttl,
        only_when_master,
        max_records,
        provider: provider?,
    })
}

fn ddns_provider(r: &mut Reader, n: &Node, p: &str, base: &Path) -> Option<DdnsProvider> {
    let o = r.object(n, p, DDNS_PROVIDER_KEYS)?;
    let set: Vec<&str> = DDNS_PROVIDER_KEYS
        .iter()
        .copied()
        .filter(|k| o.has(k))
        .collect();
    if set.len() != 1 {
        r.error(
            o.at,
            format!(
                "{p}: {} providers set; expected exactly one of rfc2136, cloudflare, dynu",
                set.len()
            ),
        );
        return None;
    }
    let key = set[0];
    let node = o.get(key)?;
    let pp = o.child(key);
    match key {
        "rfc2136" => {
            let q = r.object(node, &pp, RFC2136_KEYS)?;
            let server = q.req(
                r,
                "server",
                "the primary server's address:port, e.g. 10.0.0.53:53",
                Reader::socket_addr,
            );
            let zone = q.req(
                r,
                "zone",
                "the zone to update, e.g. example.com",
                |r, n, p| {
                    let z = r.string(n, p)?;
                    if !is_dns_name(&z) {
                        r.error(n.at, format!("{p}: {z:?} is not a valid zone name"));
                        return None;
                    }
                    Some(z.trim_end_matches('.').to_ascii_lowercase())
                },
            );
            let key_name = q.req(r, "key_name", "the TSIG key's name", Reader::string);
            let key_algorithm = q.or(r, "key_algorithm", TsigAlgorithm::HmacSha256, |r, n, p| {
                r.choice(
                    n,
                    p,
                    &[
                        ("hmac-sha256", TsigAlgorithm::HmacSha256),
                        ("hmac-sha512", TsigAlgorithm::HmacSha512),
                    ],
                )
            });
            let key_secret = secret(r, &q, "key_secret", base).and_then(|s| {
                use base64::Engine as _;
                match base64::engine::general_purpose::STANDARD.decode(s.expose().trim()) {
                    Ok(bytes) if !bytes.is_empty() => Some(s),
                    _ => {
                        let at = q.get("key_secret_file").or(q.get("key_secret")).map_or(q.at, |n| n.at);
                        r.error(at, format!("{pp}: the TSIG secret (from {}) is not base64; expected the `secret` of a BIND key clause", s.source()));
                        None
                    }
                }
            });
            Some(DdnsProvider::Rfc2136 {
                server: server?,
                zone: zone?,
                key_name: key_name?,
                key_algorithm,
                key_secret: key_secret?,
            })
        }
        "cloudflare" => {
            let q = r.object(node, &pp, CLOUDFLARE_KEYS)?;
            let zone_id = q.req(r, "zone_id", "the Cloudflare zone id", Reader::string);
            let api_token = secret(r, &q, "api_token", base);
            let api_url = q.opt(r, "api_url", api_url);
            let ca_file = q.opt(r, "ca_file", |r, n, p| ca_file(r, n, p, base));
            Some(DdnsProvider::Cloudflare {
                zone_id: zone_id?,
                api_token: api_token?,
                api_url,
                ca_file,
            })
        }
        _ => {
            let q = r.object(node, &pp, DYNU_KEYS)?;
            let api_key = secret(r, &q, "api_key", base);
            let api_url = q.opt(r, "api_url", api_url);
            let ca_file = q.opt(r, "ca_file", |r, n, p| ca_file(r, n, p, base));
            Some(DdnsProvider::Dynu {
                api_key: api_key?,
                api_url,
                ca_file,
            })
        }
    }
}

/// A provider's API base URL: `https://`, or `http://` to a loopback host only (the
/// credential must not cross a network in cleartext); no query. Trailing slashes dropped.
fn api_url(r: &mut Reader, n: &Node, p: &str) -> Option<String> {
    let u = r.string(n, p)?;
    let u = u.trim_end_matches('/');
    if let Err(e) = gateway_route_manager::ddns::check_api_url(u) {
        r.error(n.at, format!("{p}: {u:?}: {e}"));
        return None;
    }
    Some(u.to_owned())
}

/// `ca_file`: a PEM file of one or more CA certificates (relative paths are relative to the
/// config file), read and checked now so a missing or broken file is a config error here and
/// not a failed update later.
fn ca_file(r: &mut Reader, n: &Node, p: &str, base: &Path) -> Option<CaFile> {
    let path = base.join(r.string(n, p)?);
    let pem = match std::fs::read(&path) {
        Ok(pem) => pem,
        Err(e) => {
            r.error(
                n.at,
                format!(
                    "{p}: cannot read {}: {e}; expected a readable PEM file of CA certificates",
                    path.display()
                ),
            );
            return None;
        }
    };
    match gateway_route_manager::ddns::CaCertificates::from_pem(&pem) {
        Ok(certificates) => Some(CaFile { path, certificates }),
        Err(e) => {
            r.error(n.at, format!("{p}: {}: {e}", path.display()));
            None
        }
    }
}

/// RFC 1035 §2.3.1 host names (letters, digits, hyphens; labels 1-63; name ≤ 253), with the
/// underscore allowed as DNS itself does.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}
