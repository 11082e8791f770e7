//! Prometheus metrics of the ingress engine: real servers up per virtual server, each real
//! server's state, check results and latency, and the kernel's own IPVS counters per service
//! and destination (read on every resync and shown as they were read). The reconciler's own
//! counters are `ipvs::IpvsMetrics` (`vpn_router_ipvs_*`), held here so one struct registers all.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VsLabels {
    pub virtual_server: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub virtual_server: String,
    pub real_server: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub virtual_server: String,
    /// ok | failed
    pub result: &'static str,
}

type HistogramFamily = Family<VsLabels, Histogram, fn() -> Histogram>;

fn check_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ])
}

/// Kernel counters of one service or destination, as last read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub conns: u64,
    pub in_packets: u64,
    pub out_packets: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
}

impl From<&ipvs::Stats> for KernelCounters {
    fn from(s: &ipvs::Stats) -> Self {
        Self {
            conns: s.conns,
            in_packets: s.in_packets,
            out_packets: s.out_packets,
            in_bytes: s.in_bytes,
            out_bytes: s.out_bytes,
        }
    }
}

/// One service of a virtual server with its destinations, as last read from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelServiceStats {
    pub virtual_server: String,
    /// `TCP 192.168.26.128:6666`, as ipvsadm names it.
    pub service: String,
    pub counters: KernelCounters,
    /// (destination `addr:port`, counters, active connections, inactive connections).
    pub destinations: Vec<(String, KernelCounters, u32, u32)>,
}

/// The last kernel read, encoded at scrape time.
#[derive(Debug, Default)]
pub struct KernelStats {
    snapshot: Mutex<Vec<KernelServiceStats>>,
}

impl KernelStats {
    pub fn set(&self, s: Vec<KernelServiceStats>) {
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SvcLabels {
    virtual_server: String,
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SvcDirLabels {
    virtual_server: String,
    service: String,
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestLabels {
    virtual_server: String,
    service: String,
    destination: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestDirLabels {
    virtual_server: String,
    service: String,
    destination: String,
    direction: &'static str,
}

impl Collector for KernelStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        {
            let mut m = encoder.encode_descriptor(
                "vpn_router_ipvs_service_connections",
                "Connections the kernel scheduled for an IPVS service (kernel counter, read at each resync)",
                None,
                MetricType::Counter,
            )?;
            for s in &snap {
                let l = SvcLabels {
                    virtual_server: s.virtual_server.clone(),
                    service: s.service.clone(),
                };
                ConstCounter::new(s.counters.conns).encode(m.encode_family(&l)?)?;
            }
        }
        for (name, help, pick) in [
            (
                "vpn_router_ipvs_service_packets",
                "Packets of an IPVS service by direction (kernel counter)",
                (|c: &KernelCounters| (c.in_packets, c.out_packets))
                    as fn(&KernelCounters) -> (u64, u64),
            ),
            (
                "vpn_router_ipvs_service_bytes",
                "Bytes of an IPVS service by direction (kernel counter)",
                |c: &KernelCounters| (c.in_bytes, c.out_bytes),
            ),
        ] {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &snap {
                let (i, o) = pick(&s.counters);
                for (direction, v) in [("in", i), ("out", o)] {
                    let l = SvcDirLabels {
                        virtual_server: s.virtual_server.clone(),
                        service: s.service.clone(),
                        direction,
                    };
                    ConstCounter::new(v).encode(m.encode_family(&l)?)?;
                }
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "vpn_router_ipvs_destination_connections",
                "Connections the kernel scheduled to a real server of an IPVS service (kernel counter)",
                None,
                MetricType::Counter,
            )?;
            for s in &snap {
                for (d, c, _, _) in &s.destinations {
                    let l = DestLabels {
                        virtual_server: s.virtual_server.clone(),
                        service: s.service.clone(),
                        destination: d.clone(),
                    };
                    ConstCounter::new(c.conns).encode(m.encode_family(&l)?)?;
                }
            }
        }
        for (name, help, pick) in [
            (
                "vpn_router_ipvs_destination_packets",
                "Packets to/from a real server of an IPVS service by direction (kernel counter)",
                (|c: &KernelCounters| (c.in_packets, c.out_packets))
                    as fn(&KernelCounters) -> (u64, u64),
            ),
            (
                "vpn_router_ipvs_destination_bytes",
                "Bytes to/from a real server of an IPVS service by direction (kernel counter)",
                |c: &KernelCounters| (c.in_bytes, c.out_bytes),
            ),
        ] {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &snap {
                for (d, c, _, _) in &s.destinations {
                    let (i, o) = pick(c);
                    for (direction, v) in [("in", i), ("out", o)] {
                        let l = DestDirLabels {
                            virtual_server: s.virtual_server.clone(),
                            service: s.service.clone(),
                            destination: d.clone(),
                            direction,
                        };
                        ConstCounter::new(v).encode(m.encode_family(&l)?)?;
                    }
                }
            }
        }
        for (name, help, active) in [
            ("vpn_router_ipvs_destination_active_connections", "Active connections of a real server of an IPVS service (kernel, at the last resync)", true),
            ("vpn_router_ipvs_destination_inactive_connections", "Inactive connections of a real server of an IPVS service (kernel, at the last resync)", false),
        ] {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &snap {
                for (d, _, a, i) in &s.destinations {
                    let l = DestLabels { virtual_server: s.virtual_server.clone(), service: s.service.clone(), destination: d.clone() };
                    let v = i64::from(if active { *a } else { *i });
                    ConstGauge::new(v).encode(m.encode_family(&l)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Every ingress metric. Cloning shares the series.
#[derive(Debug, Clone)]
pub struct IngressMetrics {
    pub ipvs: ipvs::IpvsMetrics,
    /// Real servers passing their checks, per virtual server.
    pub real_servers_up: Family<VsLabels, Gauge>,
    /// Candidate real servers, per virtual server.
    pub real_servers: Family<VsLabels, Gauge>,
    /// 1 when a real server passes its checks, else 0.
    pub real_server_up: Family<ServerLabels, Gauge>,
    pub checks: Family<CheckLabels, Counter>,
    pub check_duration: HistogramFamily,
    pub kernel: Arc<KernelStats>,
    /// `local_route` addresses whose local route is in the kernel.
    pub local_routes: Gauge,
}

impl Default for IngressMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl IngressMetrics {
    pub fn new() -> Self {
        Self {
            ipvs: ipvs::IpvsMetrics::new(),
            real_servers_up: Family::default(),
            real_servers: Family::default(),
            real_server_up: Family::default(),
            checks: Family::default(),
            check_duration: Family::new_with_constructor(check_histogram),
            kernel: Arc::new(KernelStats::default()),
            local_routes: Gauge::default(),
        }
    }

    /// Drops every per-virtual-server series (the engine restarts with a new config).
    pub fn clear(&self) {
        self.real_servers_up.clear();
        self.real_servers.clear();
        self.real_server_up.clear();
        self.kernel.set(Vec::new());
        self.local_routes.set(0);
    }

    pub fn register(&self, registry: &mut Registry) {
        self.ipvs.register(registry);
        let r = registry.sub_registry_with_prefix("vpn_router_ingress");
        r.register(
            "local_routes",
            "Addresses of local_route virtual servers whose local route (table local) is in force",
            self.local_routes.clone(),
        );
        r.register(
            "real_servers_up",
            "Real servers passing their health checks, per virtual server",
            self.real_servers_up.clone(),
        );
        r.register(
            "real_servers",
            "Candidate real servers (hosts of real_servers), per virtual server",
            self.real_servers.clone(),
        );
        r.register(
            "real_server_up",
            "1 when the real server passes its health checks, 0 when it is down or not checked yet",
            self.real_server_up.clone(),
        );
        r.register(
            "checks",
            "Real-server health checks run, by virtual server and result",
            self.checks.clone(),
        );
        r.register(
            "check_duration_seconds",
            "Duration of real-server health checks, per virtual server",
            self.check_duration.clone(),
        );
        registry.register_collector(Box::new(self.kernel.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_are_encoded() {
        let m = IngressMetrics::new();
        let mut registry = Registry::default();
        m.register(&mut registry);
        m.kernel.set(vec![KernelServiceStats {
            virtual_server: "port-1".into(),
            service: "TCP 192.168.26.128:6666".into(),
            counters: KernelCounters {
                conns: 5,
                in_packets: 7,
                out_packets: 6,
                in_bytes: 700,
                out_bytes: 600,
            },
            destinations: vec![(
                "192.168.27.1:6666".into(),
                KernelCounters {
                    conns: 3,
                    ..Default::default()
                },
                2,
                1,
            )],
        }]);
        m.real_servers_up
            .get_or_create(&VsLabels {
                virtual_server: "port-1".into(),
            })
            .set(3);
        m.check_duration
            .get_or_create(&VsLabels {
                virtual_server: "port-1".into(),
            })
            .observe(0.002);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for want in [
            r#"vpn_router_ipvs_service_connections_total{virtual_server="port-1",service="TCP 192.168.26.128:6666"} 5"#,
            r#"vpn_router_ipvs_service_bytes_total{virtual_server="port-1",service="TCP 192.168.26.128:6666",direction="out"} 600"#,
            r#"vpn_router_ipvs_destination_connections_total{virtual_server="port-1",service="TCP 192.168.26.128:6666",destination="192.168.27.1:6666"} 3"#,
            r#"vpn_router_ipvs_destination_active_connections{virtual_server="port-1",service="TCP 192.168.26.128:6666",destination="192.168.27.1:6666"} 2"#,
            r#"vpn_router_ingress_real_servers_up{virtual_server="port-1"} 3"#,
            r#"vpn_router_ingress_check_duration_seconds_count{virtual_server="port-1"} 1"#,
            "vpn_router_ipvs_reconcile_passes_total",
        ] {
            assert!(text.contains(want), "missing {want}\n{text}");
        }
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    /// Every family this module registers (including the ipvs crate's) has a row in
    /// docs/metrics.md naming its type and labels.
    #[test]
    fn documented_in_metrics_md() {
        let md =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
                .unwrap();
        let m = IngressMetrics::new();
        let mut registry = Registry::default();
        m.register(&mut registry);
        m.kernel.set(vec![KernelServiceStats {
            virtual_server: "v".into(),
            service: "s".into(),
            counters: KernelCounters::default(),
            destinations: vec![("d".into(), KernelCounters::default(), 0, 0)],
        }]);
        let l = VsLabels {
            virtual_server: "v".into(),
        };
        m.real_servers_up.get_or_create(&l).set(1);
        m.real_servers.get_or_create(&l).set(1);
        m.check_duration.get_or_create(&l).observe(0.1);
        m.real_server_up
            .get_or_create(&ServerLabels {
                virtual_server: "v".into(),
                real_server: "r".into(),
            })
            .set(1);
        m.checks
            .get_or_create(&CheckLabels {
                virtual_server: "v".into(),
                result: "ok",
            })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
        let mut missing = Vec::new();
        let mut families = 0;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            families += 1;
            let served = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            match rows.iter().find(|r| r.contains(&format!("`{served}`"))) {
                None => missing.push(format!("{served}: no row")),
                Some(r) if !r.contains(kind) => missing.push(format!("{served}: type {kind}")),
                Some(r) => {
                    let labels: std::collections::BTreeSet<String> = text
                        .lines()
                        .filter(|l| l.starts_with(name) && l.contains('{'))
                        .flat_map(|l| {
                            let inner = l.split_once('{').unwrap().1.split_once('}').unwrap().0;
                            inner
                                .split("\",")
                                .filter_map(|kv| {
                                    kv.split_once('=').map(|(k, _)| k.trim().to_owned())
                                })
                                .collect::<Vec<_>>()
                        })
                        .filter(|k| k != "le")
                        .collect();
                    for k in labels {
                        if !r.contains(&format!("`{k}`")) {
                            missing.push(format!("{served}: label {k}"));
                        }
                    }
                }
            }
        }
        assert!(families >= 17, "{text}");
        // Prometheus' own checker on what /metrics serves by default.
        let prom = crate::metrics::to_prometheus_text(&text);
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool is missing: install the Debian package `prometheus`");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(prom.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}\n{prom}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(missing.is_empty(), "docs/metrics.md is behind: {missing:?}");
    }
}
