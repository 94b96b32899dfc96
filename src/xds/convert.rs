//! Conversion of workload-API resources into model types. Each resource is
//! checked on its own, so one invalid resource is reported by name (and
//! NACKed) while the others in the same response still apply.

use std::net::IpAddr;

use prost::Message;
use thiserror::Error;

use super::proto::workload as pb;
use crate::model::{
    Addresses, HealthPolicy, HealthStatus, LbMode, LoadBalancing, NetworkAddress, Placement,
    PortMapping, Service, ServiceRef, Waypoint, WaypointTarget, Workload, WorkloadExtra,
    MAX_SERVICE_PORTS,
};

#[derive(Debug, Error, PartialEq, Eq)]
#[error("resource {name:?}: {reason}")]
pub struct InvalidResource {
    pub name: String,
    pub reason: String,
}

/// A converted istio.workload.Address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Service(Service),
    Workload(Workload),
}

fn ip_from_bytes(b: &[u8], what: &str) -> Result<IpAddr, String> {
    match b.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(b).expect("len 4"))),
        // An IPv4 address sent in its v4-mapped form is that IPv4 address.
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(b).expect("len 16")).to_canonical()),
        n => Err(format!("{what} has {n} bytes; an IP address has 4 or 16")),
    }
}

/// A NetworkAddress that must be one address. A prefix length (a
/// ServiceEntry's CIDR, e.g. 10.0.0.0/24) is refused: km_vip matches exact
/// addresses, and installing the range's first address would redirect one
/// address and silently miss the rest. istiod leaves `length` unset for a
/// single address; a full-length prefix (/32, /128) is one address too.
fn single_address(a: &pb::NetworkAddress, what: &str) -> Result<IpAddr, String> {
    let ip = ip_from_bytes(&a.address, what)?;
    let full = if ip.is_ipv4() { 32 } else { 128 };
    match a.length {
        None => Ok(ip),
        Some(len) if len == full => Ok(ip),
        Some(len) if len > full => Err(format!(
            "{what} {ip}/{len}: a prefix length of {len} exceeds {full}"
        )),
        Some(len) => Err(format!(
            "{what} {ip}/{len} is a CIDR range; the data path matches single \
             addresses only (a /{full} or no length)"
        )),
    }
}

fn port(p: &pb::Port, what: &str) -> Result<PortMapping, String> {
    let narrow = |v: u32, field: &str| {
        u16::try_from(v).map_err(|_| format!("{what}.{field} {v} is not a port"))
    };
    Ok(PortMapping {
        service_port: narrow(p.service_port, "service_port")?,
        target_port: narrow(p.target_port, "target_port")?,
    })
}

fn load_balancing(lb: Option<&pb::LoadBalancing>) -> Result<LoadBalancing, String> {
    let Some(lb) = lb else {
        return Ok(LoadBalancing::default());
    };
    let mode = match pb::load_balancing::Mode::try_from(lb.mode) {
        Ok(pb::load_balancing::Mode::UnspecifiedMode) => LbMode::Random,
        Ok(pb::load_balancing::Mode::Strict) => LbMode::Strict,
        Ok(pb::load_balancing::Mode::Failover) => LbMode::Failover,
        Ok(pb::load_balancing::Mode::Passthrough) => LbMode::Passthrough,
        Err(_) => return Err(format!("load_balancing.mode {} is unknown", lb.mode)),
    };
    let routing_preference = lb
        .routing_preference
        .iter()
        .map(|s| {
            pb::load_balancing::Scope::try_from(*s)
                .map(|s| s.as_str_name().to_string())
                .map_err(|_| format!("load_balancing.routing_preference {s} is unknown"))
        })
        .collect::<Result<_, _>>()?;
    let health_policy = match pb::load_balancing::HealthPolicy::try_from(lb.health_policy) {
        Ok(pb::load_balancing::HealthPolicy::OnlyHealthy) => HealthPolicy::OnlyHealthy,
        Ok(pb::load_balancing::HealthPolicy::AllowAll) => HealthPolicy::AllowAll,
        Err(_) => {
            return Err(format!(
                "load_balancing.health_policy {} is unknown",
                lb.health_policy
            ))
        }
    };
    Ok(LoadBalancing {
        mode,
        routing_preference,
        health_policy,
    })
}

fn waypoint(g: Option<&pb::GatewayAddress>) -> Result<Option<Waypoint>, String> {
    let Some(g) = g else { return Ok(None) };
    let target = match &g.destination {
        Some(pb::gateway_address::Destination::Address(a)) => {
            WaypointTarget::Address(single_address(a, "waypoint.address")?)
        }
        Some(pb::gateway_address::Destination::Hostname(h)) => {
            WaypointTarget::Service(format!("{}/{}", h.namespace, h.hostname).into())
        }
        None => return Err("waypoint has neither address nor hostname".into()),
    };
    let port = u16::try_from(g.hbone_mtls_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            format!(
                "waypoint.hbone_mtls_port {} is not a port",
                g.hbone_mtls_port
            )
        })?;
    Ok(Some(Waypoint { target, port }))
}

fn service(s: &pb::Service) -> Result<Service, String> {
    if s.hostname.is_empty() || s.namespace.is_empty() {
        return Err("service needs namespace and hostname".into());
    }
    if s.ports.len() > MAX_SERVICE_PORTS {
        return Err(format!(
            "{} ports, the data path holds at most {MAX_SERVICE_PORTS}",
            s.ports.len()
        ));
    }
    // A namespace-scoped service (Istio's "safer ServiceEntry") must not
    // capture other namespaces' connections, and km_vip serves every
    // enrolled pod alike: refused rather than widened.
    match pb::service::Visibility::try_from(s.visibility) {
        Ok(pb::service::Visibility::Public) => {}
        Ok(pb::service::Visibility::Namespace) => {
            return Err(format!(
                "visibility NAMESPACE (only clients in {:?}) cannot be honoured: \
                 the data path does not tell one client's namespace from another's",
                s.namespace
            ))
        }
        Err(_) => return Err(format!("visibility {} is unknown", s.visibility)),
    }
    // weighted_waypoints is not used: `waypoint` stays the primary, which
    // Istio keeps set for data planes that do not split.
    let addresses = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Ok(NetworkAddress {
                network: a.network.clone(),
                address: single_address(a, &format!("addresses[{i}]"))?,
            })
        })
        .collect::<Result<_, String>>()?;
    let ports = s
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| port(p, &format!("ports[{i}]")))
        .collect::<Result<_, _>>()?;
    let svc = Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses,
        ports,
        load_balancing: load_balancing(s.load_balancing.as_ref())?,
        waypoint: waypoint(s.waypoint.as_ref())?,
    };
    svc.validate().map_err(|e| e.to_string())?;
    Ok(svc)
}

fn workload(w: &pb::Workload) -> Result<Workload, String> {
    if w.uid.is_empty() {
        return Err("workload has no uid".into());
    }
    let addresses = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip_from_bytes(a, &format!("addresses[{i}]")))
        .collect::<Result<Addresses, _>>()?;
    let mut services = Vec::with_capacity(w.services.len());
    for (key, list) in &w.services {
        let ports = list
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| port(p, &format!("services[{key:?}].ports[{i}]")))
            .collect::<Result<_, _>>()?;
        services.push(ServiceRef {
            key: key.as_str().into(),
            ports,
        });
    }
    // The protobuf map has no order; the model's list is sorted.
    services.sort_by(|a, b| a.key.cmp(&b.key));
    let mut wl = Workload::new(&w.uid, &w.name, w.namespace.as_str());
    wl.set_network(&w.network);
    wl.addresses = addresses;
    wl.services = services.into();
    wl.status = match pb::WorkloadStatus::try_from(w.status) {
        Ok(pb::WorkloadStatus::Healthy) => HealthStatus::Healthy,
        Ok(pb::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
        Err(_) => return Err(format!("status {} is unknown", w.status)),
    };
    wl.host_network = w.network_mode == pb::NetworkMode::HostNetwork as i32;
    wl.set_identity(&w.trust_domain, &w.service_account);
    wl.set_canonical(&w.canonical_name, &w.canonical_revision);
    wl.set_extra(WorkloadExtra {
        hostname: (!w.hostname.is_empty()).then(|| w.hostname.as_str().into()),
        waypoint: waypoint(w.waypoint.as_ref())?,
        policies: w.authorization_policies.clone(),
        // Istio's capacity: absent is 1, as ztunnel reads it; 0, which
        // ztunnel would keep, is read as 1 too (an endpoint no pick can
        // reach is what health status is for). 1 is stored as the
        // default, so most workloads carry no extra box.
        weight: w.capacity.filter(|&c| c > 1).unwrap_or(0),
        labels: Default::default(),
    });
    wl.set_placement(
        (w.locality.is_some() || !w.node.is_empty() || !w.cluster_id.is_empty()).then(|| {
            let l = w.locality.clone().unwrap_or_default();
            Placement {
                region: l.region,
                zone: l.zone,
                subzone: l.subzone,
                node: w.node.clone(),
                cluster: w.cluster_id.clone(),
            }
        }),
    );
    wl.validate().map_err(|e| e.to_string())?;
    Ok(wl)
}

/// Whether an encoded istio.workload.Address holds a service: its first
/// field is `service` (2, length-delimited). Only an ordering hint (see
/// XdsStore::apply_response); `address` decides for real.
pub fn is_service(bytes: &[u8]) -> bool {
    bytes.first() == Some(&((2 << 3) | 2))
}

/// Decodes and converts one istio.workload.Address resource.
pub fn address(name: &str, bytes: &[u8]) -> Result<Resource, InvalidResource> {
    let err = |reason: String| InvalidResource {
        name: name.to_string(),
        reason,
    };
    let addr = pb::Address::decode(bytes)
        .map_err(|e| err(format!("not an istio.workload.Address: {e}")))?;
    match addr.r#type {
        Some(pb::address::Type::Service(s)) => service(&s).map(Resource::Service).map_err(err),
        Some(pb::address::Type::Workload(w)) => workload(&w).map(Resource::Workload).map_err(err),
        None => Err(err(
            "Address carries neither a workload nor a service".into()
        )),
    }
}

mod authz;
pub use authz::authorization;

#[cfg(test)]
mod tests;
