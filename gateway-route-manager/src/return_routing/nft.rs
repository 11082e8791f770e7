//! The nftables side of return routing (and of consistent egress): renders [`NftModel`] as
//! libnftables JSON, reads our table back (`nft -j list table ip NAME`), compares, and applies
//! one transaction per change through the `nftables` crate.
//!
//! Owns: the JSON shapes, the comparison, the transaction. It touches only its own table; it
//! never runs `nft list ruleset` (nft 1.0.6 crashes printing some maps), never flushes anything
//! else.
//!
//! The table (family `ip`, default name `vpn_router_return`):
//! ```text
//! map ingress_vips { type ipv4_addr : mark; }       # VIP i -> mark_base+i
//! chain prerouting { type filter hook prerouting priority mangle; policy accept;
//!   ct state new ct mark set ip daddr map @ingress_vips
//!   ct mark MB-MB+255 meta mark set ct mark return    # ingress wins over egress hashing
//!   # consistent egress only:
//!   ip daddr @egress_dst ip daddr != @egress_excl meta l4proto { tcp, udp }
//!     meta mark set jhash ip saddr . ip daddr . th sport . th dport mod N seed S offset SB
//!     meta mark set meta mark map @buckets return
//!   ip daddr @egress_dst ... meta l4proto != { tcp, udp }
//!     meta mark set jhash ip saddr . ip daddr . ip protocol mod N seed S offset SB
//!     meta mark set meta mark map @buckets return
//!   meta mark SB-SB+N-1 meta mark set 0               # bucket without gateway: unmarked
//! }
//! chain output { type route hook output priority mangle; policy accept;
//!   ct state new meta mark MB-MB+255 ct mark set meta mark   # probes: the gateway in conntrack
//!   ct mark MB-MB+255 meta mark set ct mark }         # local replies are re-routed
//! ```
//! With `gateways.clamp_mss` (`M` = `tunnel_mtu - 40`), three more rules, each
//! `tcp flags syn / syn,rst tcp option maxseg size > M tcp option maxseg size set M`, in
//! ```text
//! chain forward { type filter hook forward priority mangle; ...  oifname IF ...    # egress, IPVS answers
//! chain input { type filter hook input priority mangle; ...  ct mark MB-MB+255 ... # ingress SYNs (before IPVS)
//! chain output: ct mark MB-MB+255 ...                       # the router's own SYN-ACKs and probes
//! ```
//! The kernel's exthdr write only ever lowers an MSS; the `> M` match says so in the rule.
//!
//! The first output rule puts a probe's gateway (its socket's `SO_MARK`) into the connection's
//! ct mark. Packets the kernel sends for that connection without the socket — the bare RST it
//! answers a late segment with once the socket is gone — carry no mark of their own; with the
//! ct mark the second rule routes them through the probe's gateway too, not by the main table
//! out of the pod's own network.
//! ```text
//! ```
//! The egress rules match on destination only, like egress's `to <destination> lookup
//! <table>` rules: client packets arrive on the VRRP VMAC interface (or any other), and
//! packets to the router's own addresses are delivered locally whatever their mark (the local
//! table comes first). Packets of ingress connections were already sent on by the ct-mark
//! rule above.
//!
//! Why two steps for the bucket lookup: a map keyed by `jhash` needs `typeof`, which nft
//! 1.0.6's JSON cannot express (and its text listing of such a map segfaults), so the hash
//! goes through the packet mark (`offset SB` keeps it apart from the gateway marks) and the map
//! is `type mark : mark`. A bucket absent from the map (no healthy gateway) leaves the packet
//! unmarked, so it meets egress's kill switch in the egress table.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{json, Value};

use super::plan::{EgressNft, MssClamp, NftModel};

const FAMILY: &str = "ip";
const PRE: &str = "prerouting";
const OUT: &str = "output";
const FWD: &str = "forward";
const IN: &str = "input";
/// `priority mangle`.
const MANGLE: i32 = -150;
const BUCKETS: &str = "buckets";

/// Errors talking to `nft`.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft: cannot run the `nft` binary ({0}); install nftables (apt-get install nftables)")]
    Missing(String),
    #[error("nft: listing table ip {table} failed: {detail}")]
    List { table: String, detail: String },
    #[error("nft: table ip {table}: the kernel refused the transaction ({what}): {detail}")]
    Apply {
        table: String,
        what: String,
        detail: String,
    },
    #[error("nft: table ip {table}: cannot parse `nft -j` output: {detail}")]
    Parse { table: String, detail: String },
    #[error("nft {what}: no answer within {after:?}; killed it (the kernel or nft hangs: try `nft list tables` in the pod)")]
    Timeout {
        what: String,
        after: std::time::Duration,
    },
}

/// Longest time one `nft` run may take. A transaction of the 4093-bucket map takes about
/// 50 ms here; nft stuck on a lock or a wedged netlink socket must not stall reconciles forever.
pub const NFT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How `program` ended.
#[derive(Debug)]
pub enum RunError {
    /// It could not be started.
    Spawn(std::io::Error),
    /// It exited non-zero; its stderr.
    Failed(String),
    /// It did not finish within the timeout and was killed.
    Timeout,
}

/// Runs `program args` with `input` on stdin and returns stdout; kills it after `timeout`
/// (dropping a tokio child with `kill_on_drop` kills it, and tokio reaps it).
pub async fn run_command(
    program: &str,
    args: &[&str],
    input: Option<&str>,
    timeout: std::time::Duration,
) -> Result<String, RunError> {
    use tokio::io::AsyncWriteExt as _;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let run = async {
        let mut child = cmd.spawn().map_err(RunError::Spawn)?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(text.as_bytes())
                .await
                .map_err(RunError::Spawn)?;
        }
        let out = child.wait_with_output().await.map_err(RunError::Spawn)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(RunError::Failed(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ))
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or(Err(RunError::Timeout))
}

fn match_eq(left: Value, right: Value) -> Value {
    json!({ "match": { "op": "==", "left": left, "right": right } })
}
fn match_op(op: &str, left: Value, right: Value) -> Value {
    json!({ "match": { "op": op, "left": left, "right": right } })
}
fn meta(key: &str) -> Value {
    json!({ "meta": { "key": key } })
}
fn ct(key: &str) -> Value {
    json!({ "ct": { "key": key } })
}
fn payload(protocol: &str, field: &str) -> Value {
    json!({ "payload": { "protocol": protocol, "field": field } })
}
fn mangle(key: Value, value: Value) -> Value {
    json!({ "mangle": { "key": key, "value": value } })
}
fn range(a: u32, b: u32) -> Value {
    json!({ "range": [a, b] })
}

fn interval_elems(nets: &[Ipv4Net]) -> Vec<Value> {
    nets.iter()
        .map(|n| json!({ "prefix": { "addr": n.network().to_string(), "len": n.prefix_len() } }))
        .collect()
}

/// The objects of our table, in the shape `nft -j list table` prints them (no handles).
pub fn render(model: &NftModel) -> Vec<Value> {
    let t = model.table.as_str();
    let mut out = vec![json!({ "table": { "family": FAMILY, "name": t } })];
    let mut vips = json!({ "family": FAMILY, "name": "ingress_vips", "table": t,
        "type": "ipv4_addr", "map": "mark" });
    if !model.ingress.is_empty() {
        vips["elem"] = Value::Array(
            model
                .ingress
                .iter()
                .map(|(a, m)| json!([a.to_string(), m]))
                .collect(),
        );
    }
    out.push(json!({ "map": vips }));
    if let Some(e) = &model.egress {
        let mut buckets = json!({ "family": FAMILY, "name": BUCKETS, "table": t,
            "type": "mark", "map": "mark" });
        if let Some(b) = e.buckets.as_ref().filter(|b| !b.is_empty()) {
            buckets["elem"] = Value::Array(b.iter().map(|(k, v)| json!([k, v])).collect());
        }
        out.push(json!({ "map": buckets }));
        for (name, nets) in [("egress_dst", &e.destinations), ("egress_excl", &e.exclude)] {
            let mut set = json!({ "family": FAMILY, "name": name, "table": t,
                "type": "ipv4_addr", "flags": ["interval"] });
            if !nets.is_empty() {
                set["elem"] = Value::Array(interval_elems(nets));
            }
            out.push(json!({ "set": set }));
        }
    }
    out.push(
        json!({ "chain": { "family": FAMILY, "table": t, "name": PRE, "type": "filter",
        "hook": "prerouting", "prio": MANGLE, "policy": "accept" } }),
    );
    out.push(
        json!({ "chain": { "family": FAMILY, "table": t, "name": OUT, "type": "route",
        "hook": "output", "prio": MANGLE, "policy": "accept" } }),
    );

    if model.mss_clamp.is_some() {
        for (name, hook) in [(FWD, "forward"), (IN, "input")] {
            out.push(
                json!({ "chain": { "family": FAMILY, "table": t, "name": name,
                "type": "filter", "hook": hook, "prio": MANGLE, "policy": "accept" } }),
            );
        }
    }

    let (lo, hi) = model.mark_range;
    let rule = |chain: &str, expr: Vec<Value>| json!({ "rule": { "family": FAMILY, "table": t, "chain": chain, "expr": expr } });
    out.push(rule(
        PRE,
        vec![
            match_op("in", ct("state"), json!("new")),
            mangle(
                ct("mark"),
                json!({ "map": { "key": payload("ip", "daddr"), "data": "@ingress_vips" } }),
            ),
        ],
    ));
    out.push(rule(
        PRE,
        vec![
            match_eq(ct("mark"), range(lo, hi)),
            mangle(meta("mark"), ct("mark")),
            json!({ "return": null }),
        ],
    ));
    if let Some(e) = &model.egress {
        for (op, tuple) in [
            ("==", vec![payload("th", "sport"), payload("th", "dport")]),
            ("!=", vec![payload("ip", "protocol")]),
        ] {
            let mut concat = vec![payload("ip", "saddr"), payload("ip", "daddr")];
            concat.extend(tuple);
            out.push(rule(PRE, egress_rule(e, op, concat)));
        }
        let last = e.scratch_base.saturating_add(e.size.saturating_sub(1));
        out.push(rule(
            PRE,
            vec![
                match_eq(meta("mark"), range(e.scratch_base, last)),
                mangle(meta("mark"), json!(0)),
            ],
        ));
    }
    out.push(rule(
        OUT,
        vec![
            match_op("in", ct("state"), json!("new")),
            match_eq(meta("mark"), range(lo, hi)),
            mangle(ct("mark"), meta("mark")),
        ],
    ));
    out.push(rule(
        OUT,
        vec![
            match_eq(ct("mark"), range(lo, hi)),
            mangle(meta("mark"), ct("mark")),
        ],
    ));
    if let Some(m) = &model.mss_clamp {
        let by_interface = match_eq(meta("oifname"), json!(m.interface));
        out.push(rule(FWD, clamp_rule(by_interface, m)));
        out.push(rule(IN, clamp_rule(match_eq(ct("mark"), range(lo, hi)), m)));
        out.push(rule(
            OUT,
            clamp_rule(match_eq(ct("mark"), range(lo, hi)), m),
        ));
    }
    out
}

/// `<which> tcp flags syn / syn,rst tcp option maxseg size > M tcp option maxseg size set M`:
/// SYN and SYN-ACK, never a segment with RST.
fn clamp_rule(which: Value, m: &MssClamp) -> Vec<Value> {
    let maxseg = || json!({ "tcp option": { "name": "maxseg", "field": "size" } });
    vec![
        which,
        match_eq(
            json!({ "&": [payload("tcp", "flags"), ["syn", "rst"]] }),
            json!("syn"),
        ),
        match_op(">", maxseg(), json!(m.mss)),
        mangle(maxseg(), json!(m.mss)),
    ]
}

fn egress_rule(e: &EgressNft, l4_op: &str, concat: Vec<Value>) -> Vec<Value> {
    vec![
        match_eq(payload("ip", "daddr"), json!("@egress_dst")),
        match_op("!=", payload("ip", "daddr"), json!("@egress_excl")),
        match_op(l4_op, meta("l4proto"), json!({ "set": ["tcp", "udp"] })),
        mangle(
            meta("mark"),
            json!({ "jhash": { "mod": e.size, "seed": e.seed, "offset": e.scratch_base,
                "expr": { "concat": concat } } }),
        ),
        mangle(
            meta("mark"),
            json!({ "map": { "key": meta("mark"), "data": format!("@{BUCKETS}") } }),
        ),
        json!({ "return": null }),
    ]
}

/// A table reduced to what matters for comparison: no handles, set elements as sorted
/// intervals or sorted pairs, rules in chain order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableView {
    pub exists: bool,
    /// Set/map declarations without `elem`, by name.
    pub sets: BTreeMap<String, Value>,
    pub elems: BTreeMap<String, Elems>,
    pub chains: BTreeMap<String, Value>,
    pub rules: BTreeMap<String, Vec<Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elems {
    /// Interval sets: merged `[start, end]` address ranges.
    Intervals(Vec<(u32, u32)>),
    /// Maps: key → value, both as JSON text.
    Pairs(BTreeMap<String, String>),
}

fn strip_handle(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("handle");
    }
    v
}

fn interval_of(v: &Value) -> Option<(u32, u32)> {
    if let Some(p) = v.get("prefix") {
        let addr: Ipv4Addr = p.get("addr")?.as_str()?.parse().ok()?;
        let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
        let net = Ipv4Net::new(addr, len).ok()?;
        return Some((u32::from(net.network()), u32::from(net.broadcast())));
    }
    if let Some(r) = v.get("range").and_then(Value::as_array) {
        let a: Ipv4Addr = r.first()?.as_str()?.parse().ok()?;
        let b: Ipv4Addr = r.get(1)?.as_str()?.parse().ok()?;
        return Some((u32::from(a), u32::from(b)));
    }
    let a: Ipv4Addr = v.as_str()?.parse().ok()?;
    Some((u32::from(a), u32::from(a)))
}

fn merge(mut v: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    v.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if u64::from(a) <= u64::from(last.1) + 1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// IP protocols as numbers wherever a rule compares `meta l4proto`: `nft -j list` prints the
/// names only where /etc/protocols exists (netbase), and numbers elsewhere (a minimal image),
/// while we render names. Without this, every resync in such an image saw drift and rebuilt
/// the table.
fn protocol_numbers(v: &mut Value) {
    fn number(name: &Value) -> Value {
        match name.as_str() {
            Some("tcp") => json!(6),
            Some("udp") => json!(17),
            Some("icmp") => json!(1),
            Some("sctp") => json!(132),
            _ => name.clone(),
        }
    }
    match v {
        Value::Object(m) => {
            let l4 = m
                .get("left")
                .and_then(|l| l.get("meta"))
                .and_then(|x| x.get("key"))
                .is_some_and(|k| k == "l4proto");
            if l4 {
                if let Some(right) = m.get_mut("right") {
                    match right.get_mut("set").and_then(Value::as_array_mut) {
                        Some(items) => items.iter_mut().for_each(|x| *x = number(x)),
                        None => *right = number(right),
                    }
                }
            }
            m.values_mut().for_each(protocol_numbers);
        }
        Value::Array(a) => a.iter_mut().for_each(protocol_numbers),
        _ => {}
    }
}

/// Reduces a list of objects (rendered, or parsed from `nft -j list table`) to a view.
pub fn view(objects: &[Value]) -> TableView {
    let mut out = TableView::default();
    for o in objects {
        let Some((kind, body)) = o.as_object().and_then(|m| m.iter().next()) else {
            continue;
        };
        match kind.as_str() {
            "table" => out.exists = true,
            "set" | "map" => {
                let name = body.get("name").and_then(Value::as_str).unwrap_or_default();
                let mut decl = strip_handle(body);
                let elem = decl
                    .as_object_mut()
                    .and_then(|m| m.remove("elem"))
                    .and_then(|e| e.as_array().cloned())
                    .unwrap_or_default();
                let elems = if kind == "map" {
                    Elems::Pairs(
                        elem.iter()
                            .filter_map(|p| {
                                let p = p.as_array()?;
                                Some((p.first()?.to_string(), p.get(1)?.to_string()))
                            })
                            .collect(),
                    )
                } else {
                    Elems::Intervals(merge(elem.iter().filter_map(interval_of).collect()))
                };
                out.sets
                    .insert(name.to_owned(), json!({ kind.as_str(): decl }));
                out.elems.insert(name.to_owned(), elems);
            }
            "chain" => {
                let name = body.get("name").and_then(Value::as_str).unwrap_or_default();
                out.chains.insert(name.to_owned(), strip_handle(body));
            }
            "rule" => {
                let chain = body
                    .get("chain")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let mut expr = body.get("expr").cloned().unwrap_or(Value::Null);
                protocol_numbers(&mut expr);
                out.rules.entry(chain.to_owned()).or_default().push(expr);
            }
            _ => {}
        }
    }
    out
}

/// Parses `nft -j list table ip NAME` output into its objects.
pub fn parse_listing(table: &str, text: &str) -> Result<Vec<Value>, NftError> {
    let v: Value = serde_json::from_str(text).map_err(|e| NftError::Parse {
        table: table.to_owned(),
        detail: e.to_string(),
    })?;
    v.get("nftables")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| NftError::Parse {
            table: table.to_owned(),
            detail: "no `nftables` array".to_owned(),
        })
}

/// What to do to bring the kernel's table to the desired one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftChange {
    None,
    /// Replace the whole table atomically (delete + create in one transaction).
    Full,
    /// Only the bucket map differs: delete these keys, then add these pairs.
    Buckets {
        delete: Vec<u32>,
        add: Vec<(u32, u32)>,
    },
}

fn pairs(e: Option<&Elems>) -> BTreeMap<String, String> {
    match e {
        Some(Elems::Pairs(p)) => p.clone(),
        _ => BTreeMap::new(),
    }
}

/// Compares. `desired_buckets: None` keeps the kernel's bucket elements (adoption before the
/// first complete healthy set) — unless the table must be rebuilt, when they are carried over.
pub fn compare(desired: &TableView, kernel: &TableView, keep_buckets: bool) -> NftChange {
    let mut d = desired.clone();
    let mut k = kernel.clone();
    let kb = pairs(k.elems.remove(BUCKETS).as_ref());
    let db = pairs(d.elems.remove(BUCKETS).as_ref());
    if d != k {
        return NftChange::Full;
    }
    if keep_buckets || kb == db {
        return NftChange::None;
    }
    let parse = |s: &String| s.parse::<u32>().ok();
    let mut delete = Vec::new();
    let mut add = Vec::new();
    for (key, value) in &kb {
        match db.get(key) {
            Some(v) if v == value => {}
            Some(_) | None => delete.extend(parse(key)),
        }
    }
    for (key, value) in &db {
        if kb.get(key) != Some(value) {
            if let (Some(k), Some(v)) = (parse(key), parse(value)) {
                add.push((k, v));
            }
        }
    }
    NftChange::Buckets { delete, add }
}

/// The transaction for `change`. `objects` are the rendered desired objects; for a full
/// rebuild that keeps the kernel's buckets, `carry` holds them.
pub fn transaction(
    table: &str,
    objects: &[Value],
    change: &NftChange,
    carry: Option<&BTreeMap<String, String>>,
) -> Value {
    let mut cmds: Vec<Value> = Vec::new();
    match change {
        NftChange::None => {}
        NftChange::Full => {
            let t = json!({ "table": { "family": FAMILY, "name": table } });
            // `add` first so `delete` cannot fail on a missing table; all in one batch, so
            // packets see either the old table or the new one, never none.
            cmds.push(json!({ "add": t.clone() }));
            cmds.push(json!({ "delete": t }));
            for o in objects {
                let mut o = o.clone();
                if let (Some(carry), Some(m)) = (carry, o.get_mut("map")) {
                    if m.get("name").and_then(Value::as_str) == Some(BUCKETS) && !carry.is_empty() {
                        let elems: Vec<Value> = carry
                            .iter()
                            .filter_map(|(k, v)| {
                                Some(json!([k.parse::<u64>().ok()?, v.parse::<u64>().ok()?]))
                            })
                            .collect();
                        m["elem"] = Value::Array(elems);
                    }
                }
                cmds.push(json!({ "add": o }));
            }
        }
        NftChange::Buckets { delete, add } => {
            let el = |elem: Value| {
                json!({ "element": { "family": FAMILY, "table": table, "name": BUCKETS,
                    "elem": elem } })
            };
            if !delete.is_empty() {
                cmds.push(json!({ "delete": el(json!(delete)) }));
            }
            if !add.is_empty() {
                let pairs: Vec<Value> = add.iter().map(|(k, v)| json!([k, v])).collect();
                cmds.push(json!({ "add": el(Value::Array(pairs)) }));
            }
        }
    }
    json!({ "nftables": cmds })
}

/// The kernel's bucket pairs in a view (to carry them over a rebuild).
pub fn kernel_buckets(kernel: &TableView) -> BTreeMap<String, String> {
    pairs(kernel.elems.get(BUCKETS))
}

/// Lists our table; `Ok(None)` when it does not exist.
pub async fn list_table(table: &str) -> Result<Option<Vec<Value>>, NftError> {
    let args = ["-j", "list", "table", FAMILY, table];
    match run_command("nft", &args, None, NFT_TIMEOUT).await {
        Ok(text) => parse_listing(table, &text).map(Some),
        Err(RunError::Spawn(e)) => Err(NftError::Missing(e.to_string())),
        Err(RunError::Failed(detail)) if detail.contains("No such file or directory") => Ok(None),
        Err(RunError::Failed(detail)) => Err(NftError::List {
            table: table.to_owned(),
            detail,
        }),
        Err(RunError::Timeout) => Err(NftError::Timeout {
            what: format!("list table {FAMILY} {table}"),
            after: NFT_TIMEOUT,
        }),
    }
}

/// Applies one transaction.
pub async fn apply(table: &str, what: &str, batch: &Value) -> Result<(), NftError> {
    let payload = batch.to_string();
    match run_command("nft", &["-j", "-f", "-"], Some(&payload), NFT_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(RunError::Spawn(e)) => Err(NftError::Missing(e.to_string())),
        Err(RunError::Failed(detail)) => Err(NftError::Apply {
            table: table.to_owned(),
            what: what.to_owned(),
            detail,
        }),
        Err(RunError::Timeout) => Err(NftError::Timeout {
            what: format!("-f - ({what})"),
            after: NFT_TIMEOUT,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A command that does not finish is killed at the timeout (no process left running).
    #[tokio::test]
    async fn a_hanging_command_is_killed_at_its_timeout() {
        let pidfile = std::env::temp_dir().join(format!("nft-timeout-{}", std::process::id()));
        let script = format!("echo $$ > {}; exec sleep 30", pidfile.display());
        let started = tokio::time::Instant::now();
        let r = run_command(
            "sh",
            &["-c", &script],
            None,
            std::time::Duration::from_millis(300),
        )
        .await;
        assert!(matches!(r, Err(RunError::Timeout)), "{r:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
        let _ = std::fs::remove_file(&pidfile);
        let pid = pid.trim();
        assert!(!pid.is_empty(), "the script did not start");
        // Killed: gone, or a zombie until tokio reaps it.
        for _ in 0..50 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned));
            if !matches!(state.as_deref(), Some("S") | Some("R") | Some("D")) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("process {pid} still runs after the timeout");
    }

    #[tokio::test]
    async fn failures_carry_stderr() {
        let r = run_command(
            "sh",
            &["-c", "echo oops >&2; exit 3"],
            None,
            std::time::Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(&r, Err(RunError::Failed(e)) if e == "oops"),
            "{r:?}"
        );
        let r = run_command(
            "/nonexistent/nft",
            &[],
            None,
            std::time::Duration::from_secs(5),
        )
        .await;
        assert!(matches!(r, Err(RunError::Spawn(_))), "{r:?}");
    }

    fn model(buckets: Option<BTreeMap<u32, u32>>) -> NftModel {
        NftModel {
            table: "t".into(),
            mark_range: (0x1900, 0x19ff),
            ingress: vec![(Ipv4Addr::new(192, 168, 26, 128), 0x1900)],
            egress: Some(EgressNft {
                destinations: vec!["0.0.0.0/0".parse().unwrap()],
                exclude: vec!["10.0.0.0/8".parse().unwrap()],
                seed: 1,
                size: 5,
                scratch_base: 0x1a00,
                buckets,
            }),
            mss_clamp: Some(MssClamp {
                interface: "gw0".into(),
                mss: 1280,
            }),
        }
    }

    #[test]
    fn a_table_compares_equal_to_itself() {
        let b = BTreeMap::from([(0x1a00, 0x1900), (0x1a01, 0x1901)]);
        let v = view(&render(&model(Some(b))));
        assert!(v.exists);
        assert_eq!(compare(&v, &v, false), NftChange::None);
        assert_eq!(v.rules["prerouting"].len(), 5);
        assert_eq!(v.rules["output"].len(), 3);
        assert_eq!(v.rules["forward"].len(), 1);
        assert_eq!(v.rules["input"].len(), 1);
    }

    #[test]
    fn mss_clamping_is_three_rules_or_nothing() {
        let mut m = model(None);
        let on = view(&render(&m));
        let fwd = serde_json::to_string(&on.rules["forward"]).unwrap();
        assert!(
            fwd.contains(
                r#"{"match":{"left":{"meta":{"key":"oifname"}},"op":"==","right":"gw0"}}"#
            ),
            "{fwd}"
        );
        assert!(fwd.contains(r#"{"match":{"left":{"tcp option":{"field":"size","name":"maxseg"}},"op":">","right":1280}}"#), "{fwd}");
        assert!(
            fwd.contains(
                r#"{"mangle":{"key":{"tcp option":{"field":"size","name":"maxseg"}},"value":1280}}"#
            ),
            "{fwd}"
        );
        m.mss_clamp = None;
        let off = view(&render(&m));
        assert!(!off.chains.contains_key("forward") && !off.chains.contains_key("input"));
        assert_eq!(off.rules["output"].len(), 2);
        // Turning it off (or changing the MSS) is a rebuild, which drops the chains too.
        assert_eq!(compare(&off, &on, false), NftChange::Full);
    }

    /// Where /etc/protocols is missing (a minimal container image), nft lists protocol
    /// numbers instead of the names we render: still no drift.
    #[test]
    fn protocol_numbers_in_a_listing_are_no_drift() {
        let objects = render(&model(None));
        let listed: Vec<Value> = serde_json::from_str(
            &serde_json::to_string(&objects)
                .unwrap()
                .replace(r#"["tcp","udp"]"#, "[6,17]"),
        )
        .unwrap();
        assert_ne!(objects, listed, "the substitution found nothing to replace");
        assert_eq!(
            compare(&view(&objects), &view(&listed), true),
            NftChange::None
        );
    }

    #[test]
    fn only_changed_buckets_are_written() {
        let old = view(&render(&model(Some(BTreeMap::from([
            (0x1a00, 0x1900),
            (0x1a01, 0x1901),
            (0x1a02, 0x1901),
        ])))));
        let new = view(&render(&model(Some(BTreeMap::from([
            (0x1a00, 0x1900),
            (0x1a01, 0x1900),
            (0x1a03, 0x1900),
        ])))));
        assert_eq!(
            compare(&new, &old, false),
            NftChange::Buckets {
                delete: vec![0x1a01, 0x1a02],
                add: vec![(0x1a01, 0x1900), (0x1a03, 0x1900)]
            }
        );
        assert_eq!(compare(&new, &old, true), NftChange::None);
    }

    #[test]
    fn a_hand_edit_or_a_missing_table_means_a_rebuild() {
        let desired = view(&render(&model(None)));
        assert_eq!(
            compare(&desired, &TableView::default(), true),
            NftChange::Full
        );
        let mut edited = desired.clone();
        edited.rules.get_mut("prerouting").unwrap().pop();
        assert_eq!(compare(&desired, &edited, true), NftChange::Full);
        let mut edited = desired.clone();
        edited
            .elems
            .insert("egress_excl".into(), Elems::Intervals(vec![]));
        assert_eq!(compare(&desired, &edited, true), NftChange::Full);
    }

    #[test]
    fn listing_shapes_normalise() {
        // nft prints a non-prefix interval as a range, adjacent prefixes may be merged.
        let a = vec![
            json!({"prefix": {"addr": "10.0.0.0", "len": 8}}),
            json!({"prefix": {"addr": "11.0.0.0", "len": 16}}),
        ];
        let b = vec![json!({"range": ["10.0.0.0", "11.0.255.255"]})];
        let f = |v: &Vec<Value>| merge(v.iter().filter_map(interval_of).collect());
        assert_eq!(f(&a), f(&b));
    }

    #[test]
    fn full_rebuild_is_one_batch_and_can_carry_buckets() {
        let objects = render(&model(None));
        let carry = BTreeMap::from([("6656".to_owned(), "6400".to_owned())]);
        let t = transaction("t", &objects, &NftChange::Full, Some(&carry));
        let cmds = t["nftables"].as_array().unwrap();
        assert_eq!(
            cmds[0],
            json!({"add": {"table": {"family": "ip", "name": "t"}}})
        );
        assert_eq!(
            cmds[1],
            json!({"delete": {"table": {"family": "ip", "name": "t"}}})
        );
        let buckets = cmds
            .iter()
            .find(|c| c["add"]["map"]["name"] == "buckets")
            .unwrap();
        assert_eq!(buckets["add"]["map"]["elem"], json!([[6656, 6400]]));
    }
}
