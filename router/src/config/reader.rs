//! Typed reading of the YAML node tree, collecting every error instead of stopping at the
//! first. Each reader returns `None` after recording an error, so the caller can carry on with
//! a default and find the next problem. Messages follow one shape:
//! `PATH: what was found; expected what`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use super::error::{ConfigError, Location};
use super::yaml::{Node, Value};

#[derive(Debug, Default)]
pub struct Reader {
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<ConfigError>,
    /// Top-level sections that are present but did not parse.
    pub broken_sections: Vec<&'static str>,
}

/// A mapping whose keys were checked against the allowed set.
#[derive(Debug)]
pub struct Obj<'n> {
    pub path: String,
    pub at: Location,
    entries: Vec<(&'n str, &'n Node)>,
}

impl<'n> Obj<'n> {
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn child(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value of `key` read with `f`, or `None` when absent or invalid.
    pub fn opt<T>(
        &self,
        r: &mut Reader,
        key: &str,
        f: impl FnOnce(&mut Reader, &'n Node, &str) -> Option<T>,
    ) -> Option<T> {
        let node = self.get(key)?;
        f(r, node, &self.child(key))
    }

    /// Like [`Obj::opt`] with a default for an absent (or invalid, already reported) key.
    pub fn or<T>(
        &self,
        r: &mut Reader,
        key: &str,
        default: T,
        f: impl FnOnce(&mut Reader, &'n Node, &str) -> Option<T>,
    ) -> T {
        self.opt(r, key, f).unwrap_or(default)
    }

    /// A required key: reports `missing required key` at the mapping's position.
    pub fn req<T>(
        &self,
        r: &mut Reader,
        key: &str,
        what: &str,
        f: impl FnOnce(&mut Reader, &'n Node, &str) -> Option<T>,
    ) -> Option<T> {
        if !self.has(key) {
            let here = if self.path.is_empty() {
                "top level"
            } else {
                &self.path
            };
            r.error(
                self.at,
                format!("{here}: missing required key `{key}`; expected {what}"),
            );
            return None;
        }
        self.opt(r, key, f)
    }
}

impl Reader {
    pub fn error(&mut self, at: Location, message: impl Into<String>) {
        self.errors.push(ConfigError::new(at, message));
    }

    pub fn warn(&mut self, at: Location, message: impl Into<String>) {
        self.warnings.push(ConfigError::new(at, message));
    }

    fn mismatch(&mut self, node: &Node, path: &str, expected: &str) {
        self.error(
            node.at,
            format!("{path}: found {}; expected {expected}", node.value.kind()),
        );
    }

    /// A mapping with only the `allowed` keys. `null` (a key with nothing under it) reads as an
    /// empty mapping, so `api:` alone means "all defaults".
    pub fn object<'n>(&mut self, node: &'n Node, path: &str, allowed: &[&str]) -> Option<Obj<'n>> {
        let entries = match &node.value {
            Value::Map(entries) => entries,
            Value::Null => {
                return Some(Obj {
                    path: path.to_owned(),
                    at: node.at,
                    entries: Vec::new(),
                })
            }
            _ => {
                self.mismatch(node, display_path(path), "a mapping");
                return None;
            }
        };
        let mut seen: Vec<(&'n str, &'n Node)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let Value::Str(key) = &k.value else {
                self.error(
                    k.at,
                    format!("{}: keys must be plain strings", display_path(path)),
                );
                continue;
            };
            if !allowed.contains(&key.as_str()) {
                let hint = closest(key, allowed)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                self.error(
                    k.at,
                    format!(
                        "{}: unknown key `{key}`{hint}; expected one of: {}",
                        display_path(path),
                        allowed.join(", ")
                    ),
                );
                continue;
            }
            if seen.iter().any(|(s, _)| *s == key) {
                self.error(
                    k.at,
                    format!(
                        "{}: duplicate key `{key}`; each key may appear once",
                        display_path(path)
                    ),
                );
                continue;
            }
            seen.push((key.as_str(), v));
        }
        Some(Obj {
            path: path.to_owned(),
            at: node.at,
            entries: seen,
        })
    }

    pub fn list<'n, T>(
        &mut self,
        node: &'n Node,
        path: &str,
        mut item: impl FnMut(&mut Reader, &'n Node, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        match &node.value {
            Value::Seq(items) => {
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, n) in items.iter().enumerate() {
                    match item(self, n, &format!("{path}[{i}]")) {
                        Some(v) => out.push(v),
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
            Value::Null => Some(Vec::new()),
            _ => {
                self.mismatch(node, path, "a list");
                None
            }
        }
    }

    pub fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) if !s.is_empty() => Some(s.clone()),
            Value::Str(_) => {
                self.error(node.at, format!("{path}: empty string; expected a value"));
                None
            }
            _ => {
                self.mismatch(node, path, "a string");
                None
            }
        }
    }

    pub fn bool(&mut self, node: &Node, path: &str) -> Option<bool> {
        match node.value {
            Value::Bool(b) => Some(b),
            _ => {
                self.mismatch(node, path, "true or false");
                None
            }
        }
    }

    /// An integer in `min..=max`. Hex (`0x1900`) is accepted, as YAML reads it.
    pub fn int(&mut self, node: &Node, path: &str, min: i128, max: i128) -> Option<i128> {
        let v = match &node.value {
            Value::Int(i) => *i,
            Value::Str(s) => match parse_int(s) {
                Some(i) => i,
                None => {
                    self.error(
                        node.at,
                        format!("{path}: {s:?} is not an integer; expected an integer {min}-{max}"),
                    );
                    return None;
                }
            },
            _ => {
                self.mismatch(node, path, &format!("an integer {min}-{max}"));
                return None;
            }
        };
        if v < min || v > max {
            self.error(
                node.at,
                format!("{path}: {v} is out of range; expected an integer {min}-{max}"),
            );
            return None;
        }
        Some(v)
    }

    pub fn u8(&mut self, node: &Node, path: &str, min: u8, max: u8) -> Option<u8> {
        self.int(node, path, min.into(), max.into())
            .map(|v| v as u8)
    }

    pub fn u16(&mut self, node: &Node, path: &str, min: u16, max: u16) -> Option<u16> {
        self.int(node, path, min.into(), max.into())
            .map(|v| v as u16)
    }

    pub fn u32(&mut self, node: &Node, path: &str, min: u32, max: u32) -> Option<u32> {
        self.int(node, path, min.into(), max.into())
            .map(|v| v as u32)
    }

    /// A humantime duration (`10ms`, `1s`, `1m 30s`). A bare number is refused: its unit would
    /// be a guess.
    pub fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        match &node.value {
            Value::Str(s) => {
                match humantime::parse_duration(s) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        self.error(
                        node.at,
                        format!("{path}: {s:?} is not a duration ({e}); expected e.g. 100ms, 1s, 2m"),
                    );
                        None
                    }
                }
            }
            Value::Int(i) => {
                self.error(
                    node.at,
                    format!("{path}: {i} has no unit; expected a duration such as {i}s or {i}ms"),
                );
                None
            }
            _ => {
                self.mismatch(node, path, "a duration such as 100ms or 1s");
                None
            }
        }
    }

    fn scalar_text(&mut self, node: &Node, path: &str, expected: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) => Some(s.trim().to_owned()),
            _ => {
                self.mismatch(node, path, expected);
                None
            }
        }
    }

    pub fn ip(&mut self, node: &Node, path: &str) -> Option<IpAddr> {
        let s = self.scalar_text(node, path, "an IP address")?;
        match s.parse::<IpAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(node.at, format!("{path}: {s:?} is not an IP address; expected e.g. 192.168.25.128 or fd00::1"));
                None
            }
        }
    }

    pub fn ipv4(&mut self, node: &Node, path: &str) -> Option<Ipv4Addr> {
        match self.ip(node, path)? {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(a) => {
                self.error(
                    node.at,
                    format!("{path}: {a} is IPv6; expected an IPv4 address"),
                );
                None
            }
        }
    }

    /// An address with a prefix length (`192.168.26.254/22`); the host bits are kept, because
    /// a VIP is an address on a subnet, not the subnet.
    pub fn interface_address(&mut self, node: &Node, path: &str) -> Option<IpNet> {
        let s = self.scalar_text(node, path, "an address with prefix length")?;
        match s.parse::<IpNet>() {
            Ok(n) => Some(n),
            Err(_) => {
                self.error(
                    node.at,
                    format!(
                        "{path}: {s:?} is not an address/prefix; expected e.g. 192.168.26.254/22"
                    ),
                );
                None
            }
        }
    }

    /// A network in CIDR form; host bits must be zero so `10.0.0.1/8` (likely a typo) is caught.
    pub fn cidr(&mut self, node: &Node, path: &str) -> Option<IpNet> {
        let s = self.scalar_text(node, path, "a CIDR such as 10.0.0.0/8")?;
        let net = match s.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => {
                self.error(
                    node.at,
                    format!("{path}: {s:?} is not a CIDR; expected e.g. 10.0.0.0/8"),
                );
                return None;
            }
        };
        if net.trunc() != net {
            self.error(
                node.at,
                format!(
                    "{path}: {s} has host bits set; expected the network address {}",
                    net.trunc()
                ),
            );
            return None;
        }
        Some(net)
    }

    /// An address or a CIDR (`192.168.27.5` or `192.168.27.0/28`).
    pub fn address_or_cidr(&mut self, node: &Node, path: &str) -> Option<IpNet> {
        let s = self.scalar_text(node, path, "an address or CIDR")?;
        if s.contains('/') {
            return self.cidr(node, path);
        }
        match s.parse::<IpAddr>() {
            Ok(a) => Some(IpNet::from(a)),
            Err(_) => {
                self.error(node.at, format!("{path}: {s:?} is not an address or CIDR; expected e.g. 192.168.27.5 or 192.168.27.0/28"));
                None
            }
        }
    }

    pub fn socket_addr(&mut self, node: &Node, path: &str) -> Option<SocketAddr> {
        let s = self.scalar_text(node, path, "an address:port")?;
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    node.at,
                    format!(
                        "{path}: {s:?} is not address:port; expected e.g. 0.0.0.0:9090 or [::1]:53"
                    ),
                );
                None
            }
        }
    }

    /// `api.listen`: `address:port`, where the address may be one `${NAME}` environment
    /// reference (`${POD_IP}:9090`, with `POD_IP` from the downward API's `status.podIP`, binds
    /// the api to the pod's own address). An IPv6 address from the environment needs no
    /// brackets: the port is what follows the last `:`.
    pub fn listen_addr(&mut self, node: &Node, path: &str) -> Option<SocketAddr> {
        let s = self.scalar_text(node, path, "an address:port")?;
        if !s.contains("${") {
            return self.socket_addr(node, path);
        }
        let expanded = expand_listen(&s, |name| std::env::var(name).ok());
        match expanded {
            Ok(a) => Some(a),
            Err(msg) => {
                self.error(node.at, format!("{path}: {msg}"));
                None
            }
        }
    }

    /// One of a fixed set of words.
    pub fn choice<T: Copy>(&mut self, node: &Node, path: &str, options: &[(&str, T)]) -> Option<T> {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let text = match &node.value {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            _ => {
                self.mismatch(node, path, &format!("one of: {}", names.join(", ")));
                return None;
            }
        };
        if let Some((_, v)) = options.iter().find(|(n, _)| *n == text) {
            return Some(*v);
        }
        let hint = closest(&text, &names)
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        self.error(
            node.at,
            format!(
                "{path}: {text:?} is not allowed{hint}; expected one of: {}",
                names.join(", ")
            ),
        );
        None
    }
}

fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "top level"
    } else {
        path
    }
}

fn parse_int(s: &str) -> Option<i128> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        i128::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// The allowed word nearest to a misspelt one, when it is close enough to be a typo.
fn closest<'a>(word: &str, options: &[&'a str]) -> Option<&'a str> {
    options
        .iter()
        .map(|o| (edit_distance(word, o), *o))
        .filter(|(d, o)| *d <= 2.max(o.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, o)| o)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_near_misses_only() {
        assert_eq!(
            closest("prority", &["priority", "preempt"]),
            Some("priority")
        );
        assert_eq!(closest("zzzzzz", &["priority", "preempt"]), None);
    }

    #[test]
    fn reads_hex_and_decimal_strings() {
        assert_eq!(parse_int("0x1900"), Some(0x1900));
        assert_eq!(parse_int("42"), Some(42));
        assert_eq!(parse_int("4x2"), None);
    }
}

/// Expands `${NAME}:PORT` or `[${NAME}]:PORT` with `env` and parses the result.
pub(crate) fn expand_listen(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<SocketAddr, String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} has no port; expected e.g. \"${{POD_IP}}:9090\""))?;
    let name = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .strip_prefix("${")
        .and_then(|h| h.strip_suffix('}'))
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .ok_or_else(|| {
            format!("{text:?}: the address must be an IP address or one ${{NAME}} reference, e.g. \"${{POD_IP}}:9090\"")
        })?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{text:?}: port {port:?} is not a number 0-65535"))?;
    let value = env(name).ok_or_else(|| {
        format!(
            "{text:?}: environment variable {name} is not set; in Kubernetes set it from the downward API \
             (env: [{{name: {name}, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}])"
        )
    })?;
    let ip: IpAddr = value.trim().parse().map_err(|_| {
        format!("{text:?}: environment variable {name} is {value:?}, not an IP address")
    })?;
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod listen_tests {
    use super::expand_listen;

    fn env(name: &str) -> Option<String> {
        match name {
            "POD_IP" => Some("10.42.1.7".into()),
            "POD_IP6" => Some("fd00::7".into()),
            "BAD" => Some("not-an-ip".into()),
            _ => None,
        }
    }

    #[test]
    fn pod_ip_reference_expands() {
        assert_eq!(
            expand_listen("${POD_IP}:9090", env).unwrap().to_string(),
            "10.42.1.7:9090"
        );
        assert_eq!(
            expand_listen("${POD_IP6}:9090", env).unwrap().to_string(),
            "[fd00::7]:9090"
        );
        assert_eq!(
            expand_listen("[${POD_IP6}]:9090", env).unwrap().to_string(),
            "[fd00::7]:9090"
        );
    }

    #[test]
    fn bad_references_say_what_to_do() {
        let e = expand_listen("${NOPE}:9090", env).unwrap_err();
        assert!(
            e.contains("NOPE is not set") && e.contains("status.podIP"),
            "{e}"
        );
        let e = expand_listen("${BAD}:9090", env).unwrap_err();
        assert!(e.contains("not an IP address"), "{e}");
        let e = expand_listen("${POD_IP}:99999", env).unwrap_err();
        assert!(e.contains("port"), "{e}");
        let e = expand_listen("x${POD_IP}:9090", env).unwrap_err();
        assert!(e.contains("one ${NAME} reference"), "{e}");
        let e = expand_listen("${POD_IP}", env).unwrap_err();
        assert!(e.contains("no port"), "{e}");
    }
}
