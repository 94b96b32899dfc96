//! The data plane's own metrics, in the Prometheus/OpenMetrics text format.
//!
//! Most values live in the kernel (km_stats, the maps, the programs' run
//! statistics) or in other tasks (xDS status, DNS counters): they are read
//! at scrape time by a collector rather than mirrored, so a scrape shows
//! what the programs see right now and nothing is counted twice. Only what
//! the daemon itself does (applies) is recorded as it happens.
//!
//! Istio's TCP metrics (istio_tcp_*, src/telemetry) are the exception:
//! counted as the data path reports each connection.
//!
//! Label values come from fixed sets (map, program, counter, trigger) or
//! from the policies' keys, so the series count is bounded by the config,
//! never by traffic: there are no per-connection labels.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use libbpf_rs::MapCore;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use thiserror::Error;
use tokio::sync::watch;

use crate::{bpf::MapId, dns::DnsCounters, writer::MapWriter, xds::client::XdsStatus};

/// Content type of `Metrics::render`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("encoding the metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// Where the collector reads from at scrape time.
pub struct Sources {
    pub writer: Arc<Mutex<MapWriter>>,
    /// None without an xDS source: then no xds_* series are exported
    /// (zeros would read as "connected to nothing, never pushed").
    pub xds: Option<watch::Receiver<XdsStatus>>,
    pub dns: Option<Arc<DnsCounters>>,
    /// Whether the kernel's run-time accounting is on (--bpf-stats);
    /// without it the programs' counters stay 0 and are not exported.
    pub run_stats: bool,
}

type TriggerLabel = [(&'static str, &'static str); 1];

/// The registry plus the metrics the daemon records as it works.
pub struct Metrics {
    registry: Registry,
    applies: Family<TriggerLabel, Counter>,
    apply_failures: Family<TriggerLabel, Counter>,
    apply_seconds: Histogram,
    tcp: crate::telemetry::TcpMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The bounded label value of an apply's reason (the daemon's `why`).
pub fn trigger(why: &str) -> &'static str {
    match why {
        "start" => "start",
        "SIGHUP" => "sighup",
        "config file changed" => "file",
        "xDS update" => "xds",
        "xDS update (incremental)" => "xds_incremental",
        "DNS answers changed" => "dns",
        _ => "other",
    }
}

impl Metrics {
    pub fn new(sources: Sources) -> Metrics {
        // One root, two prefixes: the data plane's own kmesh_* and Istio's
        // standard istio_* names.
        let mut root = Registry::default();
        let tcp = crate::telemetry::TcpMetrics::register(root.sub_registry_with_prefix("istio"));
        let registry = root.sub_registry_with_prefix("kmesh");
        let applies = Family::<TriggerLabel, Counter>::default();
        let apply_failures = Family::<TriggerLabel, Counter>::default();
        // 0.5 ms (a small file) to ~16 s (100k workloads on a slow node).
        let apply_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "applies",
            "Applies of the config/xDS state to the maps, by what triggered them",
            applies.clone(),
        );
        registry.register(
            "apply_failures",
            "Applies the kernel refused as a whole (the maps converge at the next one)",
            apply_failures.clone(),
        );
        registry.register(
            "apply_duration_seconds",
            "Time to write one apply into the maps",
            apply_seconds.clone(),
        );
        registry.register(
            "telemetry_events_read",
            "Connection events the telemetry reader took from the ring buffer (see telemetry_events_lost)",
            tcp.events_read.clone(),
        );
        registry.register_collector(Box::new(DataPlane(sources)));
        Metrics {
            registry: root,
            applies,
            apply_failures,
            apply_seconds,
            tcp,
        }
    }

    /// Istio's TCP metric families, for the telemetry reader.
    pub fn tcp(&self) -> crate::telemetry::TcpMetrics {
        self.tcp.clone()
    }

    /// Records one apply of the sources to the maps.
    pub fn applied(&self, why: &str, took: Duration, failed: bool) {
        let label = [("trigger", trigger(why))];
        self.applies.get_or_create(&label).inc();
        if failed {
            self.apply_failures.get_or_create(&label).inc();
        }
        self.apply_seconds.observe(took.as_secs_f64());
    }

    /// The exposition text. Reads the maps under the writer's lock, so it
    /// is called off the async workers.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

struct DataPlane(Sources);

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane").finish_non_exhaustive()
    }
}

/// What one scrape reads from the kernel, taken under the writer's lock
/// and encoded after it is released.
struct Snapshot {
    stats: Vec<(&'static str, u64)>,
    maps: Vec<(&'static str, usize, u32, u64)>,
    policies: Vec<(String, [u64; 3])>,
    progs: Vec<crate::bpf::ProgRunStats>,
}

impl DataPlane {
    fn snapshot(&self) -> Snapshot {
        let w = self.0.writer.lock().unwrap_or_else(|e| e.into_inner());
        let dp = w.datapath();
        // The dump's set of maps. Counting keys is one syscall per entry,
        // which is what a scrape of 100k workloads costs (~tens of ms).
        let maps = MapId::shown()
            .map(|id| {
                (
                    id.name(),
                    dp.map(id).keys().count(),
                    dp.capacity(id),
                    dp.memlock(id),
                )
            })
            .collect();
        let mut policies: Vec<(String, [u64; 3])> = w
            .authz_counters()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        policies.sort();
        Snapshot {
            stats: dp.stats(),
            maps,
            policies,
            progs: if self.0.run_stats {
                dp.run_stats()
            } else {
                Vec::new()
            },
        }
    }
}

fn counter<N>(e: &mut DescriptorEncoder, name: &str, help: &str, v: N) -> std::fmt::Result
where
    ConstCounter<N>: EncodeMetric,
{
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric with a series per label set.
fn counters<'a, N: 'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels<'a>, N)>,
) -> std::fmt::Result
where
    ConstCounter<N>: EncodeMetric,
{
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels<'a>, i64)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for DataPlane {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = self.snapshot();
        let mut help = String::new();
        for (name, v) in &s.stats {
            help.clear();
            let _ = write!(help, "Data path counter {name} (km_stats, all CPUs)");
            counter(&mut e, name, &help, *v)?;
        }
        let maps = |f: fn(&(&'static str, usize, u32, u64)) -> i64| {
            s.maps
                .iter()
                .map(move |m| (vec![("map", m.0)], f(m)))
                .collect::<Vec<_>>()
        };
        gauges(
            &mut e,
            "map_entries",
            "Entries in each data-path map (arrays count every slot)",
            maps(|m| m.1 as i64),
        )?;
        gauges(
            &mut e,
            "map_capacity",
            "Capacity (max_entries) of each data-path map",
            maps(|m| i64::from(m.2)),
        )?;
        gauges(
            &mut e,
            "map_memory_bytes",
            "Kernel memory each data-path map holds (fdinfo memlock)",
            maps(|m| m.3 as i64),
        )?;
        let decisions = ["allow", "deny", "dry_run_deny"];
        counters(
            &mut e,
            "authz_policy_connections",
            "Connections each authorization policy decided, counted at the destination",
            s.policies.iter().flat_map(|(key, v)| {
                decisions
                    .iter()
                    .zip(v)
                    .map(move |(d, n)| (vec![("policy", key.as_str()), ("decision", *d)], *n))
            }),
        )?;
        if self.0.run_stats {
            counters(
                &mut e,
                "bpf_program_runs",
                "Runs of each BPF program (kernel run-time statistics, --bpf-stats)",
                s.progs.iter().map(|p| (vec![("program", p.prog)], p.runs)),
            )?;
            counters(
                &mut e,
                "bpf_program_run_seconds",
                "Time spent in each BPF program (kernel run-time statistics, --bpf-stats)",
                s.progs
                    .iter()
                    .map(|p| (vec![("program", p.prog)], p.run_time_ns as f64 / 1e9)),
            )?;
        }
        if let Some(rx) = &self.0.xds {
            let st = *rx.borrow();
            gauge(
                &mut e,
                "xds_connected",
                "1 while the xDS stream to the control plane is up",
                i64::from(st.connected),
            )?;
            counter(
                &mut e,
                "xds_responses",
                "xDS responses (pushes) received and handled, over all streams",
                st.responses,
            )?;
            counter(
                &mut e,
                "xds_nacks",
                "xDS responses NACKed (some resource was refused)",
                st.nacks,
            )?;
        }
        if let Some(d) = &self.0.dns {
            use std::sync::atomic::Ordering::Relaxed;
            counter(
                &mut e,
                "dns_lookups",
                "Lookups of DNS-resolved hostnames (A and AAAA together count once)",
                d.lookups.load(Relaxed),
            )?;
            counter(
                &mut e,
                "dns_lookup_failures",
                "Lookups without a usable answer (timeout, unreachable, SERVFAIL)",
                d.failures.load(Relaxed),
            )?;
            counter(
                &mut e,
                "dns_not_found",
                "Lookups that found the name has no address (NXDOMAIN, no records)",
                d.not_found.load(Relaxed),
            )?;
        }
        Ok(())
    }
}
