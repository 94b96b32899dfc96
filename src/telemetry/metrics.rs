//! Istio's standard TCP metrics, named and labelled as ztunnel exports
//! them (istio_tcp_*), so Kiali and the Istio dashboards read them as is.
//! Labels come from workloads and services, never from a connection's
//! addresses or ports: the series count is bounded by the mesh's size.

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::index::{ServiceInfo, WorkloadInfo};

pub type Labels = Vec<(&'static str, std::sync::Arc<str>)>;

/// response_flags values: ztunnel's "-" (none) and "CONNECT" (no upstream
/// connection), and Envoy's "UC"/"DC" for a connection reset while open
/// (seen from the source: its upstream; from the destination: its
/// downstream).
pub const FLAG_NONE: &str = "-";
pub const FLAG_CONNECT: &str = "CONNECT";
pub const FLAG_UPSTREAM_RESET: &str = "UC";
pub const FLAG_DOWNSTREAM_RESET: &str = "DC";

#[derive(Debug, Default, Clone)]
pub struct TcpMetrics {
    pub opened: Family<Labels, Counter>,
    pub closed: Family<Labels, Counter>,
    pub failed: Family<Labels, Counter>,
    pub sent: Family<Labels, Counter>,
    pub received: Family<Labels, Counter>,
    /// Events the reader took from the ring (connects, opens, closes),
    /// beside km_stats' lost ones: registered with the kmesh_* metrics.
    pub events_read: Counter,
}

impl TcpMetrics {
    /// Registers the five families in `istio`, a registry (or
    /// sub-registry) whose prefix is "istio".
    pub fn register(istio: &mut Registry) -> TcpMetrics {
        let m = TcpMetrics::default();
        istio.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            m.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            m.closed.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "The total number of TCP connections that could not be established",
            m.failed.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            m.received.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            m.sent.clone(),
        );
        m
    }
}

/// Who is on each side of a connection, as far as the model knows.
pub struct Parties<'a> {
    pub source: bool,
    pub src: Option<&'a WorkloadInfo>,
    pub dst: Option<&'a WorkloadInfo>,
    pub service: Option<&'a ServiceInfo>,
}

/// The label set, in ztunnel's order; "unknown" where the model has no
/// value. App and version are the canonical service and revision, as
/// ztunnel reports them.
pub fn labels(p: &Parties, response_flags: &'static str) -> Labels {
    use std::sync::Arc;
    let unknown: Arc<str> = Arc::from("unknown");
    let s = |a: Arc<str>| a;
    let mut l: Labels = Vec::with_capacity(23);
    l.push((
        "reporter",
        Arc::from(if p.source { "source" } else { "destination" }),
    ));
    let side = |l: &mut Labels, w: Option<&WorkloadInfo>, names: [&'static str; 8]| {
        let (name, canonical, ns, principal, cluster, rev) = match w {
            Some(w) => (
                w.name.clone(),
                w.canonical_name.clone(),
                w.namespace.clone(),
                w.principal.clone(),
                w.cluster.clone(),
                w.canonical_revision.clone(),
            ),
            None => (
                unknown.clone(),
                unknown.clone(),
                unknown.clone(),
                unknown.clone(),
                unknown.clone(),
                unknown.clone(),
            ),
        };
        let [workload, canon, canon_rev, wns, princ, app, version, clus] = names;
        l.push((workload, name));
        l.push((canon, canonical.clone()));
        l.push((canon_rev, rev.clone()));
        l.push((wns, ns));
        l.push((princ, principal));
        l.push((app, canonical));
        l.push((version, rev));
        l.push((clus, cluster));
    };
    side(
        &mut l,
        p.src,
        [
            "source_workload",
            "source_canonical_service",
            "source_canonical_revision",
            "source_workload_namespace",
            "source_principal",
            "source_app",
            "source_version",
            "source_cluster",
        ],
    );
    let (host, sname, sns) = match p.service {
        Some(svc) => (
            svc.hostname.clone(),
            svc.name.clone(),
            svc.namespace.clone(),
        ),
        None => (unknown.clone(), unknown.clone(), unknown.clone()),
    };
    l.push(("destination_service", s(host)));
    l.push(("destination_service_namespace", sns));
    l.push(("destination_service_name", sname));
    side(
        &mut l,
        p.dst,
        [
            "destination_workload",
            "destination_canonical_service",
            "destination_canonical_revision",
            "destination_workload_namespace",
            "destination_principal",
            "destination_app",
            "destination_version",
            "destination_cluster",
        ],
    );
    l.push(("request_protocol", Arc::from("tcp")));
    l.push(("response_flags", Arc::from(response_flags)));
    // No mTLS here: the kernel carries the bytes as the workloads sent them.
    l.push(("connection_security_policy", unknown));
    l
}
