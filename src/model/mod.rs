//! The data plane's view of the mesh as plain Rust types. Every source (the
//! standalone config file, xDS) converts into these at its boundary; the map
//! writer consumes them. The shape follows Istio's workload API
//! (istio.workload.Service / Workload) so both sources fill the same fields.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use serde::Serialize;
use thiserror::Error;

mod layers;
mod traffic;
mod workload;

pub use layers::{Changes, Layers, MAX_TRACKED_CHANGES};

pub use traffic::{weight, RateLimit, SplitRule, TrafficPolicy, MAX_WEIGHT};
pub use workload::{
    fresh_id, Addresses, Compact, HealthStatus, Scope, ServiceRef, Workload, WorkloadExtra,
    Workloads,
};

/// Limits the kernel side imposes (bpf/include/kmesh.h).
pub const MAX_SERVICE_PORTS: usize = crate::bpf::MAX_PORTS;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("service {service}: {reason}")]
    Service { service: String, reason: String },
    #[error("workload {uid}: {reason}")]
    Workload { uid: String, reason: String },
    #[error("address {address} is claimed by both {first} and {second}")]
    AddressConflict {
        address: IpAddr,
        first: String,
        second: String,
    },
}

/// Istio's NetworkAddress: an IP qualified by the network it lives on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

impl NetworkAddress {
    /// The address in canonical form (see `canonical`).
    pub fn new(network: impl Into<String>, address: IpAddr) -> Self {
        NetworkAddress {
            network: network.into(),
            address: canonical(address),
        }
    }
}

/// One spelling per address: an IPv4 address written in its v4-mapped
/// IPv6 form (`::ffff:10.96.0.10`) is that IPv4 address. The data path
/// keys both forms identically, so every check and every piece of
/// bookkeeping above it must too, or one entry can silently replace or
/// delete the other's.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Istio's LoadBalancing.Scope names, in the order of the proto. Each may
/// appear once in a routing preference, so a priority is at most 6 and
/// always fits the data path's table of `MAX_PRIO` levels.
pub const ROUTING_SCOPES: [&str; 6] = ["REGION", "ZONE", "SUBZONE", "NODE", "CLUSTER", "NETWORK"];

/// An entry of the model, as named in refusals and in the dump.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", content = "key", rename_all = "snake_case")]
pub enum EntryKey {
    /// "namespace/hostname"
    Service(Arc<str>),
    /// uid
    Workload(Arc<str>),
    /// The netns path (or other source) of an enrollment.
    Enrollment(Arc<str>),
    /// An xDS resource refused before it became an entry (it did not
    /// convert), by resource name.
    Resource(Arc<str>),
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryKey::Service(k) => write!(f, "service {k}"),
            EntryKey::Workload(k) => write!(f, "workload {k}"),
            EntryKey::Enrollment(k) => write!(f, "enrollment {k}"),
            EntryKey::Resource(k) => write!(f, "xDS resource {k}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortMapping {
    pub service_port: u16,
    /// 0 means "same as service_port".
    pub target_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbMode {
    /// Istio's UNSPECIFIED_MODE: no locality preference, any endpoint.
    #[default]
    Random,
    /// Only endpoints matching every routing-preference scope.
    Strict,
    /// Prefer the best locality match, fall back level by level.
    Failover,
    /// Istio's PASSTHROUGH: connections go to their original destination;
    /// the data path gets no VIP entry for the service.
    Passthrough,
}

/// Istio's LoadBalancing.HealthPolicy: which workloads are endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthPolicy {
    #[default]
    OnlyHealthy,
    /// Unhealthy workloads too (Kubernetes' publishNotReadyAddresses).
    AllowAll,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct LoadBalancing {
    pub mode: LbMode,
    /// Istio's routing_preference scopes (REGION, ZONE, …), in order.
    pub routing_preference: Vec<String>,
    pub health_policy: HealthPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub addresses: Vec<NetworkAddress>,
    pub ports: Vec<PortMapping>,
    pub load_balancing: LoadBalancing,
    /// Connections to the service go to this waypoint instead.
    pub waypoint: Option<Waypoint>,
}

impl Service {
    /// Istio's key for a service: "namespace/hostname".
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |reason: String| ModelError::Service {
            service: self.key(),
            reason,
        };
        if self.hostname.is_empty() {
            return Err(err("hostname is empty".into()));
        }
        if self.ports.len() > MAX_SERVICE_PORTS {
            return Err(err(format!(
                "{} ports, the data path holds at most {MAX_SERVICE_PORTS}",
                self.ports.len()
            )));
        }
        check_routing_preference(&self.load_balancing.routing_preference).map_err(err)?;
        let mut seen = Vec::new();
        for p in &self.ports {
            if p.service_port == 0 {
                return Err(err("service_port 0 is not a port".into()));
            }
            if seen.contains(&p.service_port) {
                return Err(err(format!("service_port {} listed twice", p.service_port)));
            }
            seen.push(p.service_port);
        }
        Ok(())
    }
}

/// Each scope known and listed once: anything else would rank endpoints
/// by a level the data path has no slot for.
fn check_routing_preference(scopes: &[String]) -> Result<(), String> {
    for (i, scope) in scopes.iter().enumerate() {
        if !ROUTING_SCOPES.contains(&scope.as_str()) {
            return Err(format!(
                "load_balancing.routing_preference[{i}] {scope:?} is not a scope (one of {})",
                ROUTING_SCOPES.join(", ")
            ));
        }
        if scopes[..i].contains(scope) {
            return Err(format!(
                "load_balancing.routing_preference[{i}] {scope:?} is listed twice"
            ));
        }
    }
    Ok(())
}

/// Where a waypoint is: an address, or a service (its VIP, then one of its
/// pods, chosen by the data path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum WaypointTarget {
    Address(IpAddr),
    /// Service key "namespace/hostname".
    Service(Arc<str>),
}

/// Istio's GatewayAddress as used for waypoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Waypoint {
    pub target: WaypointTarget,
    /// The port the waypoint accepts redirected connections on.
    pub port: u16,
}

/// Where a workload (or this node) runs, for locality-aware load
/// balancing: Istio's Locality plus the node and cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Placement {
    pub region: String,
    pub zone: String,
    pub subzone: String,
    pub node: String,
    pub cluster: String,
}

/// This node's placement and network; endpoints are ranked against it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct LocalNode {
    pub placement: Placement,
    pub network: String,
}

/// The endpoint priority level of `w` for a service balanced by `lb`, seen
/// from `local`: the number of routing-preference scopes minus the number
/// of leading scopes that match. None: not an endpoint at all (STRICT and
/// not a full match, or PASSTHROUGH).
pub fn endpoint_priority(lb: &LoadBalancing, local: &LocalNode, w: &Workload) -> Option<u32> {
    match lb.mode {
        LbMode::Random => return Some(0),
        LbMode::Passthrough => return None,
        LbMode::Strict | LbMode::Failover => {}
    }
    let none = Placement::default();
    let p = w.placement().unwrap_or(&none);
    let l = &local.placement;
    let matched = lb
        .routing_preference
        .iter()
        .take_while(|scope| match scope.as_str() {
            "REGION" => p.region == l.region,
            "ZONE" => p.zone == l.zone,
            "SUBZONE" => p.subzone == l.subzone,
            "NODE" => p.node == l.node,
            "CLUSTER" => p.cluster == l.cluster,
            "NETWORK" => w.network() == local.network,
            _ => false,
        })
        .count();
    let prio = (lb.routing_preference.len() - matched) as u32;
    match lb.mode {
        LbMode::Strict if prio != 0 => None,
        // Validation keeps routing preferences to distinct known scopes;
        // a priority past the data path's table is never an endpoint.
        _ if prio as usize >= crate::bpf::MAX_PRIO => None,
        _ => Some(prio),
    }
}

/// A DNS name as a resolver accepts it: dot-separated labels of letters,
/// digits, '-' and '_', each 1..=63 bytes, 253 in all; one trailing dot
/// allowed. Not an IP address (that would be a static workload).
pub fn check_hostname(h: &str) -> Result<(), String> {
    let name = h.strip_suffix('.').unwrap_or(h);
    if name.is_empty() || name.len() > 253 {
        return Err("a DNS name has 1 to 253 characters".into());
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err("is an IP address; put it in addresses".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("label {label:?} must have 1 to 63 characters"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!("{c:?} is not allowed in a DNS name"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// Hostname → the addresses it currently resolves to (IPv4 then IPv6), as
/// the daemon's resolver last answered. A name missing here has no
/// addresses yet (or none at all).
pub type ResolvedHosts = HashMap<Box<str>, Vec<IpAddr>>;

/// Shares equal values (namespaces, networks, placements) between the
/// workloads of a source.
#[derive(Debug)]
pub struct Interner<T: ?Sized> {
    set: std::collections::HashSet<Arc<T>>,
    /// Values added since the last prune: what it can have to drop.
    added: usize,
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            set: Default::default(),
            added: 0,
        }
    }
}

impl<T: ?Sized + std::hash::Hash + Eq> Interner<T> {
    /// The shared copy of `a`'s value (`a` itself if it is the first).
    pub fn intern(&mut self, a: Arc<T>) -> Arc<T> {
        if let Some(shared) = self.set.get(&a) {
            return shared.clone();
        }
        self.set.insert(a.clone());
        self.added += 1;
        a
    }

    /// `intern` for a borrowed value: allocates only if it is new.
    pub fn intern_ref(&mut self, v: &T) -> Arc<T>
    where
        for<'b> Arc<T>: From<&'b T>,
    {
        if let Some(shared) = self.set.get(v) {
            return shared.clone();
        }
        let a: Arc<T> = Arc::from(v);
        self.set.insert(a.clone());
        self.added += 1;
        a
    }

    /// Drops values nothing else holds any more, once enough were added
    /// since the last time that it pays: a walk over every value per xDS
    /// response was a few percent of the daemon's CPU under churn, and
    /// what is left over is at most a quarter of what is held (or 64).
    pub fn prune(&mut self) {
        if self.added * 4 < self.set.len().max(256) {
            return;
        }
        self.set.retain(|a| Arc::strong_count(a) > 1);
        self.added = 0;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.set.len()
    }
}

#[cfg(test)]
mod interner_tests {
    use super::*;

    #[test]
    fn prune_drops_unheld_values_once_enough_were_added() {
        let mut i = Interner::<str>::default();
        let held: Vec<Arc<str>> = (0..300).map(|n| i.intern_ref(&n.to_string())).collect();
        i.prune();
        assert_eq!(i.len(), 300);
        for n in 300..399 {
            i.intern_ref(&n.to_string());
        }
        i.prune();
        assert_eq!(i.len(), 399, "99 added to 300: not yet worth a walk");
        i.intern_ref("one more");
        i.prune();
        assert_eq!(i.len(), 300, "the 100 values nothing holds are gone");
        assert!(Arc::ptr_eq(&i.intern_ref("7"), &held[7]));
    }
}

/// A network namespace whose sockets the data path acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enrollment {
    /// Where it came from (a netns path), for dumps and logs.
    pub source: String,
    /// A waypoint's netns: its own connections are never sent to a
    /// waypoint (that would loop).
    pub waypoint: bool,
    /// Its global addresses when it was enrolled: the destinations this
    /// node enforces authorization for, and the source of its sockets.
    pub addrs: Vec<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// By service key ("namespace/hostname"). A hash map, not a B-tree
    /// (half-full nodes), of boxes: a table sized for 10k services would
    /// otherwise hold a whole Service in each of its 16k buckets, empty
    /// ones included.
    pub services: HashMap<Arc<str>, Box<Service>>,
    pub workloads: Workloads,
    /// netns cookie → enrollment.
    pub enrolled: BTreeMap<u64, Enrollment>,
    /// L4 authorization policies (istio.security.Authorization).
    pub policies: crate::authz::PolicyStore,
    /// Enroll entries left out because they could not be resolved (e.g. a
    /// deleted pod netns), one line each, for the log and the dump.
    pub enroll_errors: Vec<String>,
    /// Config-file policies left out as invalid: (field, what is wrong).
    pub policy_errors: Vec<(String, String)>,
    /// Their keys ("namespace/name"), where the entry names one: a reload
    /// keeps the previous version of each (as xDS keeps a NACKed one's).
    pub refused_policies: Vec<String>,
    /// Same-host sockmap acceleration.
    pub accelerate: bool,
    /// Unread bytes an accelerated receiver may hold before its sender falls
    /// back to TCP (0: no limit); None leaves it to another layer or the
    /// default.
    pub accel_queue_limit: Option<u32>,
    /// The access log's format (config file key access_log); None leaves
    /// it to the daemon's flag and run-time switches.
    pub access_log: Option<crate::telemetry::Format>,
    /// Service key → its traffic settings (only non-default ones).
    pub traffic: HashMap<Arc<str>, TrafficPolicy>,
}

/// Default for `accel_queue_limit`: as much as plain TCP lets a sender
/// queue toward a stalled reader at most (net.ipv4.tcp_wmem max, 4 MiB).
/// A bulk sender that outruns its reader by this much also falls back;
/// raising it trades memory per slow reader for bulk throughput.
pub const DEFAULT_ACCEL_QUEUE_LIMIT: u32 = 4 << 20;

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} services, {} workloads, {} enrolled netns",
            self.services.len(),
            self.workloads.len(),
            self.enrolled.len()
        )
    }
}

impl Model {
    pub fn insert_service(&mut self, svc: Service) -> Option<Service> {
        let old = self.services.insert(svc.key().into(), Box::new(svc));
        old.map(|b| *b)
    }

    pub fn insert_workload(&mut self, w: Workload) -> Option<Workload> {
        self.workloads.insert(w)
    }

    /// The key allocation for `key` if the service is known, so that
    /// references to it can share it.
    pub fn intern_service_key(&self, key: &str) -> Arc<str> {
        self.services
            .get_key_value(key)
            .map_or_else(|| key.into(), |(k, _)| k.clone())
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        Layers(&[self]).validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn svc(ns: &str, host: &str, vip: &str, ports: &[(u16, u16)]) -> Service {
        Service {
            name: host.split('.').next().unwrap().to_string(),
            namespace: ns.into(),
            hostname: host.into(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vip.parse().unwrap(),
            }],
            ports: ports
                .iter()
                .map(|&(service_port, target_port)| PortMapping {
                    service_port,
                    target_port,
                })
                .collect(),
            load_balancing: LoadBalancing::default(),
            waypoint: None,
        }
    }

    #[test]
    fn priority_counts_leading_matches() {
        let here = Placement {
            region: "r1".into(),
            zone: "z1".into(),
            subzone: "s1".into(),
            node: "n1".into(),
            cluster: "c1".into(),
        };
        let local = LocalNode {
            placement: here.clone(),
            network: String::new(),
        };
        let at = |zone: &str, node: &str| {
            let mut w = Workload::new("w", "w", "default");
            w.set_placement(Some(Placement {
                zone: zone.into(),
                node: node.into(),
                ..here.clone()
            }));
            w
        };
        let prefs = |mode| LoadBalancing {
            mode,
            routing_preference: ["REGION", "ZONE", "NODE"].map(String::from).to_vec(),
            ..Default::default()
        };
        let f = prefs(LbMode::Failover);
        assert_eq!(endpoint_priority(&f, &local, &at("z1", "n1")), Some(0));
        assert_eq!(endpoint_priority(&f, &local, &at("z1", "n2")), Some(1));
        // A later scope cannot match once an earlier one failed.
        assert_eq!(endpoint_priority(&f, &local, &at("z2", "n1")), Some(2));
        let s = prefs(LbMode::Strict);
        assert_eq!(endpoint_priority(&s, &local, &at("z1", "n1")), Some(0));
        assert_eq!(endpoint_priority(&s, &local, &at("z1", "n2")), None);
        let r = prefs(LbMode::Random);
        assert_eq!(endpoint_priority(&r, &local, &at("z2", "n2")), Some(0));
    }

    #[test]
    fn hostnames_are_checked() {
        assert!(check_hostname("api.example.com").is_ok());
        assert!(check_hostname("api.example.com.").is_ok());
        assert!(check_hostname("_svc.x-y.test").is_ok());
        for bad in ["", ".", "a..b", "-a.b", "a b.c", "10.0.0.1", "::1"] {
            assert!(check_hostname(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_hostname(&"a".repeat(64)).is_err());
    }

    #[test]
    fn too_many_ports_is_named() {
        let ports: Vec<(u16, u16)> = (1..=11).map(|p| (p, 0)).collect();
        let s = svc("default", "web.default.svc", "10.96.0.1", &ports);
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("default/web.default.svc") && e.contains("11 ports"),
            "{e}"
        );
    }

    #[test]
    fn vip_shared_with_workload_address_conflicts() {
        let mut m = Model::default();
        let s = svc("default", "web.default.svc", "10.96.0.1", &[(80, 8080)]);
        m.insert_service(s);
        let mut w = Workload::new("w1", "w1", "default");
        w.addresses = Addresses::One("10.96.0.1".parse().unwrap());
        m.insert_workload(w);
        let e = m.validate().unwrap_err();
        assert!(matches!(e, ModelError::AddressConflict { .. }), "{e}");
    }
}
