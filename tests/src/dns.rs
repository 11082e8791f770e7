//! The lab's DNS server: BIND's `named` as primary for `lab.test`, accepting RFC 2136 updates
//! signed with the TSIG key `ddns-key` (hmac-sha256). Generates its config and zone file in
//! the lab directory; the lab runs `named -g` (foreground, logs to stderr) inside the Internet
//! namespace. Must not touch /etc/bind or any system path.

use std::fmt::Write as _;
use std::path::Path;

use crate::topo;

/// named.conf for a server listening only on `listen`, working in `dir`.
pub fn named_conf(dir: &Path, listen: std::net::Ipv4Addr, tsig_secret_b64: &str) -> String {
    named_conf_for(
        dir,
        listen,
        topo::DNS_ZONE,
        &Tsig {
            name: "ddns-key",
            algorithm: "hmac-sha256",
            secret_b64: tsig_secret_b64,
        },
    )
}

/// A TSIG key as in a BIND `key` clause.
#[derive(Debug, Clone, Copy)]
pub struct Tsig<'a> {
    pub name: &'a str,
    pub algorithm: &'a str,
    pub secret_b64: &'a str,
}

/// named.conf: primary for `zone` (file `<dir>/<zone>.zone`), updates signed with `key` only.
pub fn named_conf_for(
    dir: &Path,
    listen: std::net::Ipv4Addr,
    zone: &str,
    key: &Tsig<'_>,
) -> String {
    let d = dir.display();
    let mut c = String::new();
    let _ = writeln!(c, "options {{");
    let _ = writeln!(c, "  directory \"{d}\";");
    let _ = writeln!(c, "  pid-file \"{d}/named.pid\";");
    let _ = writeln!(c, "  session-keyfile \"{d}/session.key\";");
    let _ = writeln!(c, "  managed-keys-directory \"{d}\";");
    let _ = writeln!(c, "  listen-on port 53 {{ {listen}; }};");
    let _ = writeln!(c, "  listen-on-v6 {{ none; }};");
    let _ = writeln!(c, "  recursion no;");
    let _ = writeln!(c, "  dnssec-validation no;");
    let _ = writeln!(c, "  notify no;");
    let _ = writeln!(c, "}};");
    let _ = writeln!(c, "controls {{ }};");
    let _ = writeln!(c, "key \"{}\" {{", key.name);
    let _ = writeln!(c, "  algorithm {};", key.algorithm);
    let _ = writeln!(c, "  secret \"{}\";", key.secret_b64);
    let _ = writeln!(c, "}};");
    let _ = writeln!(c, "zone \"{zone}\" {{");
    let _ = writeln!(c, "  type primary;");
    let _ = writeln!(c, "  file \"{d}/{zone}.zone\";");
    let _ = writeln!(c, "  allow-update {{ key \"{}\"; }};", key.name);
    let _ = writeln!(c, "}};");
    c
}

/// The initial zone: SOA, NS, the name server's address, and no `vpn` records.
pub fn zone_file() -> String {
    zone_file_for(topo::DNS_ZONE, topo::INTERNET_DNS)
}

/// The initial `zone`, served by `ns` (`ns1.<zone>`).
pub fn zone_file_for(zone: &str, ns: std::net::Ipv4Addr) -> String {
    format!(
        "$TTL 60\n@ IN SOA ns1.{zone}. hostmaster.{zone}. 1 60 60 600 60\n@ IN NS ns1.{zone}.\nns1 IN A {ns}\n"
    )
}
