//! Standalone source: a JSON file describing services, workloads and the
//! network namespaces to enroll, for hosts without a control plane.
//!
//! The shape follows Istio's workload API (Service, Workload, PortList,
//! LoadBalancing) so the same model is filled as from xDS. Parsing is
//! strict: unknown fields, bad addresses, and references to undefined
//! services are errors that name the field; a rejected file changes nothing.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{de, Deserialize, Deserializer};
use thiserror::Error;

use crate::model::{
    Enrollment, HealthStatus, LbMode, LoadBalancing, Model, ModelError, NetworkAddress,
    PortMapping, Service, ServiceRef, Workload,
};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {field}: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("config {path}: {source}")]
    Model { path: PathBuf, source: ModelError },
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    enroll: Enroll,
    #[serde(default)]
    services: Vec<ServiceEntry>,
    #[serde(default)]
    workloads: Vec<WorkloadEntry>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Enroll {
    /// Network namespaces whose sockets are redirected (/run/netns/NAME,
    /// /proc/PID/ns/net, …).
    #[serde(default)]
    netns: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    hostname: String,
    #[serde(default)]
    addresses: Vec<Addr>,
    #[serde(default)]
    ports: Vec<PortEntry>,
    #[serde(default)]
    load_balancing: Option<LbEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortEntry {
    service_port: u16,
    #[serde(default)]
    target_port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LbEntry {
    #[serde(default)]
    mode: LbModeEntry,
    #[serde(default)]
    routing_preference: Vec<String>,
}

/// Istio's LoadBalancing.Mode names.
#[derive(Debug, Deserialize, Default, Clone, Copy)]
enum LbModeEntry {
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
struct WorkloadEntry {
    uid: String,
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    network: String,
    #[serde(default)]
    addresses: Vec<IpAddrField>,
    /// Istio's `services` map: "namespace/hostname" → PortList.
    #[serde(default)]
    services: BTreeMap<String, PortList>,
    #[serde(default)]
    status: StatusEntry,
    /// Istio's network_mode HOST_NETWORK.
    #[serde(default)]
    host_network: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PortList {
    #[serde(default)]
    ports: Vec<PortEntry>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy)]
enum StatusEntry {
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
struct Addr(NetworkAddress);

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
        Ok(Addr(NetworkAddress { network, address }))
    }
}

#[derive(Debug)]
struct IpAddrField(IpAddr);

impl<'de> Deserialize<'de> for IpAddrField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map(IpAddrField)
            .map_err(|_| de::Error::custom(format!("{s:?} is not an IP address")))
    }
}

fn ports(list: &[PortEntry]) -> Vec<PortMapping> {
    list.iter()
        .map(|p| PortMapping {
            service_port: p.service_port,
            target_port: p.target_port,
        })
        .collect()
}

/// Parses and validates config text without touching the OS: enrollment
/// paths are returned unresolved.
fn parse(path: &Path, text: &str) -> Result<(Model, Vec<PathBuf>), ConfigError> {
    let field_err = |field: String, message: String| ConfigError::Field {
        path: path.to_path_buf(),
        field,
        message,
    };
    let de = &mut serde_json::Deserializer::from_str(text);
    let file: File = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let field = if field == "." {
            format!("line {}", inner.line())
        } else {
            field
        };
        field_err(field, inner.to_string())
    })?;

    let mut model = Model::default();
    for (i, s) in file.services.iter().enumerate() {
        let svc = Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            addresses: s.addresses.iter().map(|a| a.0.clone()).collect(),
            ports: ports(&s.ports),
            load_balancing: s
                .load_balancing
                .as_ref()
                .map(|lb| LoadBalancing {
                    mode: match lb.mode {
                        LbModeEntry::Unspecified => LbMode::Random,
                        LbModeEntry::Strict => LbMode::Strict,
                        LbModeEntry::Failover => LbMode::Failover,
                        LbModeEntry::Passthrough => LbMode::Passthrough,
                    },
                    routing_preference: lb.routing_preference.clone(),
                })
                .unwrap_or_default(),
        };
        svc.validate()
            .map_err(|e| field_err(format!("services[{i}]"), e.to_string()))?;
        if model.insert_service(svc).is_some() {
            return Err(field_err(
                format!("services[{i}]"),
                format!("service {}/{} defined twice", s.namespace, s.hostname),
            ));
        }
    }
    for (i, w) in file.workloads.iter().enumerate() {
        let mut services = Vec::new();
        for (key, list) in &w.services {
            if !model.services.contains_key(key.as_str()) {
                return Err(field_err(
                    format!("workloads[{i}].services"),
                    format!("{key:?} is not a defined service (keys are \"namespace/hostname\")"),
                ));
            }
            services.push(ServiceRef {
                key: model.intern_service_key(key),
                ports: ports(&list.ports),
            });
        }
        let wl = Workload {
            uid: w.uid.as_str().into(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            network: w.network.clone(),
            addresses: w.addresses.iter().map(|a| a.0).collect(),
            services,
            status: match w.status {
                StatusEntry::Healthy => HealthStatus::Healthy,
                StatusEntry::Unhealthy => HealthStatus::Unhealthy,
            },
            host_network: w.host_network,
        };
        wl.validate()
            .map_err(|e| field_err(format!("workloads[{i}]"), e.to_string()))?;
        if model.insert_workload(wl).is_some() {
            return Err(field_err(
                format!("workloads[{i}].uid"),
                format!("uid {:?} used twice", w.uid),
            ));
        }
    }
    model.validate().map_err(|source| ConfigError::Model {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((model, file.enroll.netns))
}

/// Checks a config file without touching the kernel or namespaces.
pub fn check(path: &Path) -> Result<Model, ConfigError> {
    let text = read(path)?;
    parse(path, &text).map(|(m, _)| m)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads, validates and resolves a config file into a model (enrolled
/// namespaces resolved to their cookies).
pub fn load(path: &Path) -> Result<Model, ConfigError> {
    let text = read(path)?;
    let (mut model, netns) = parse(path, &text)?;
    for (i, ns) in netns.iter().enumerate() {
        let cookie = crate::sys::netns_cookie(ns).map_err(|e| ConfigError::Field {
            path: path.to_path_buf(),
            field: format!("enroll.netns[{i}]"),
            message: e.to_string(),
        })?;
        model.enrolled.insert(
            cookie,
            Enrollment {
                source: ns.display().to_string(),
            },
        );
    }
    Ok(model)
}

#[cfg(test)]
mod tests;
