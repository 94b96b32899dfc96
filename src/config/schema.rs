//! The config file's shape, as serde reads it: Istio's workload API names
//! (Service, Workload, PortList, LoadBalancing) flattened into JSON keys.
//! Strict where serde allows it (unknown fields are errors); what serde
//! cannot check is checked by `parse` in mod.rs, which turns this into the
//! model.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{de, Deserialize, Deserializer};

use super::traffic;
use crate::model::{HealthPolicy, NetworkAddress};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    #[serde(default)]
    pub(super) enroll: Enroll,
    /// Same-host sockmap acceleration (also the daemon's --accelerate).
    #[serde(default)]
    pub(super) accelerate: bool,
    /// Bytes an accelerated receiver may leave unread before its sender
    /// falls back to TCP's flow control (0: no limit).
    #[serde(default)]
    pub(super) accel_queue_limit: Option<u32>,
    /// One line per closed connection: "off", "text" or "json" (also the
    /// daemon's --access-log, and switchable at run time).
    #[serde(default)]
    pub(super) access_log: Option<String>,
    #[serde(default)]
    pub(super) services: Vec<ServiceEntry>,
    #[serde(default)]
    pub(super) workloads: Vec<WorkloadEntry>,
    /// L4 authorization policies, shaped like istio.security.Authorization.
    /// Read one by one (see `parse`): a bad policy is left out alone.
    #[serde(default)]
    pub(super) policies: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Enroll {
    /// Network namespaces whose sockets are redirected (/run/netns/NAME,
    /// /proc/PID/ns/net, …).
    #[serde(default)]
    pub(super) netns: Vec<NetnsEntry>,
}

/// A path, or {"path": …, "waypoint": true} for a waypoint's own netns.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum NetnsEntry {
    Path(PathBuf),
    Detailed(NetnsDetail),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NetnsDetail {
    pub(super) path: PathBuf,
    #[serde(default)]
    pub(super) waypoint: bool,
}

impl NetnsEntry {
    pub(super) fn parts(&self) -> (&Path, bool) {
        match self {
            NetnsEntry::Path(p) => (p, false),
            NetnsEntry::Detailed(d) => (&d.path, d.waypoint),
        }
    }
}

/// Istio's GatewayAddress, flattened: exactly one of address / service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WaypointEntry {
    #[serde(default)]
    pub(super) address: Option<IpAddrField>,
    /// "namespace/hostname" of the waypoint's service.
    #[serde(default)]
    pub(super) service: Option<String>,
    pub(super) port: u16,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct LocalityEntry {
    #[serde(default)]
    pub(super) region: String,
    #[serde(default)]
    pub(super) zone: String,
    #[serde(default)]
    pub(super) subzone: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceEntry {
    pub(super) name: String,
    #[serde(default = "default_namespace")]
    pub(super) namespace: String,
    pub(super) hostname: String,
    #[serde(default)]
    pub(super) addresses: Vec<Addr>,
    #[serde(default)]
    pub(super) ports: Vec<PortEntry>,
    #[serde(default)]
    pub(super) load_balancing: Option<LbEntry>,
    #[serde(default)]
    pub(super) waypoint: Option<WaypointEntry>,
    /// ServiceEntry's resolution.
    #[serde(default)]
    pub(super) resolution: Resolution,
    /// Canary: shares of the connections by workload labels (traffic.rs).
    #[serde(default)]
    pub(super) split: Vec<traffic::SplitEntry>,
    /// Circuit breaker: concurrent connections from this node.
    #[serde(default)]
    pub(super) max_connections: Option<u32>,
    /// Connects per client pod: a token bucket.
    #[serde(default)]
    pub(super) rate_limit: Option<traffic::RateLimitEntry>,
}

/// Istio ServiceEntry resolution: STATIC (endpoints are the workloads
/// listed with addresses), DNS (the hostname, or the workloads' hostnames,
/// are resolved), NONE (connections keep their original destination).
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resolution {
    #[default]
    #[serde(rename = "STATIC")]
    Static,
    #[serde(rename = "DNS")]
    Dns,
    #[serde(rename = "NONE")]
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PortEntry {
    pub(super) service_port: u16,
    #[serde(default)]
    pub(super) target_port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LbEntry {
    #[serde(default)]
    pub(super) mode: LbModeEntry,
    #[serde(default)]
    pub(super) routing_preference: Vec<String>,
    /// ONLY_HEALTHY or ALLOW_ALL, as Istio names them.
    #[serde(default)]
    pub(super) health_policy: HealthPolicy,
}

/// Istio's LoadBalancing.Mode names.
#[derive(Debug, Deserialize, Default, Clone, Copy)]
pub(super) enum LbModeEntry {
    #[default]
    #[serde(rename = "UNSPECIFIED_MODE")]
    Unspecified,
    #[serde(rename = "STRICT")]
    Strict,
    #[serde(rename = "FAILOVER")]
    Failover,
    #[serde(rename = "PASSTHROUGH")]
    Passthrough,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WorkloadEntry {
    pub(super) uid: String,
    pub(super) name: String,
    #[serde(default = "default_namespace")]
    pub(super) namespace: String,
    #[serde(default)]
    pub(super) network: String,
    #[serde(default)]
    pub(super) addresses: Vec<IpAddrField>,
    /// Resolved by DNS instead of listing addresses.
    #[serde(default)]
    pub(super) hostname: Option<String>,
    /// Istio's `services` map: "namespace/hostname" → PortList.
    #[serde(default)]
    pub(super) services: BTreeMap<String, PortList>,
    #[serde(default)]
    pub(super) status: StatusEntry,
    /// Istio's network_mode HOST_NETWORK.
    #[serde(default)]
    pub(super) host_network: bool,
    #[serde(default)]
    pub(super) waypoint: Option<WaypointEntry>,
    #[serde(default)]
    pub(super) locality: Option<LocalityEntry>,
    #[serde(default)]
    pub(super) node: String,
    #[serde(default)]
    pub(super) cluster_id: String,
    /// The identity its connections carry for authorization (Istio's
    /// defaults when empty: "default", "cluster.local").
    #[serde(default)]
    pub(super) service_account: String,
    #[serde(default)]
    pub(super) trust_domain: String,
    /// WORKLOAD_SELECTOR policies selecting this workload, "namespace/name".
    #[serde(default)]
    pub(super) authorization_policies: Vec<String>,
    /// Share relative to the service's other endpoints (1..=1000, default 1).
    #[serde(default)]
    pub(super) weight: Option<u32>,
    /// What a service's split selects by.
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct PortList {
    #[serde(default)]
    pub(super) ports: Vec<PortEntry>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy)]
pub(super) enum StatusEntry {
    #[default]
    #[serde(rename = "HEALTHY")]
    Healthy,
    #[serde(rename = "UNHEALTHY")]
    Unhealthy,
}

fn default_namespace() -> String {
    "default".into()
}

/// "[network/]ip", Istio's textual NetworkAddress.
#[derive(Debug)]
pub(super) struct Addr(pub(super) NetworkAddress);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (network, ip) = match s.rsplit_once('/') {
            Some((n, ip)) => (n.to_string(), ip),
            None => (String::new(), s.as_str()),
        };
        let address: IpAddr = ip
            .parse()
            .map_err(|_| de::Error::custom(format!("{s:?} is not an IP address ([network/]ip)")))?;
        Ok(Addr(NetworkAddress::new(network, address)))
    }
}

#[derive(Debug)]
pub(super) struct IpAddrField(pub(super) IpAddr);

impl<'de> Deserialize<'de> for IpAddrField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map(|ip: IpAddr| IpAddrField(ip.to_canonical()))
            .map_err(|_| de::Error::custom(format!("{s:?} is not an IP address")))
    }
}
