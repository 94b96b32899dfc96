//! Conversion of workload-API resources into model types. Each resource is
//! checked on its own, so one invalid resource is reported by name (and
//! NACKed) while the others in the same response still apply.

use std::{net::IpAddr, sync::Arc};

use prost::Message;
use thiserror::Error;

use super::proto::{security, workload as pb};
use crate::model::{
    Addresses, HealthStatus, LbMode, LoadBalancing, NetworkAddress, Placement, PortMapping,
    Service, ServiceRef, Waypoint, WaypointTarget, Workload, WorkloadExtra, MAX_SERVICE_PORTS,
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
    Ok(LoadBalancing {
        mode,
        routing_preference,
    })
}

fn waypoint(g: Option<&pb::GatewayAddress>) -> Result<Option<Waypoint>, String> {
    let Some(g) = g else { return Ok(None) };
    let target = match &g.destination {
        Some(pb::gateway_address::Destination::Address(a)) => {
            WaypointTarget::Address(ip_from_bytes(&a.address, "waypoint.address")?)
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
    let addresses = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Ok(NetworkAddress {
                network: a.network.clone(),
                address: ip_from_bytes(&a.address, &format!("addresses[{i}]"))?,
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
    wl.set_extra(WorkloadExtra {
        hostname: (!w.hostname.is_empty()).then(|| w.hostname.as_str().into()),
        waypoint: waypoint(w.waypoint.as_ref())?,
    });
    wl.placement =
        (w.locality.is_some() || !w.node.is_empty() || !w.cluster_id.is_empty()).then(|| {
            let l = w.locality.clone().unwrap_or_default();
            Arc::new(Placement {
                region: l.region,
                zone: l.zone,
                subzone: l.subzone,
                node: w.node.clone(),
                cluster: w.cluster_id.clone(),
            })
        });
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

/// Decodes one istio.security.Authorization resource. Policies are kept
/// (and counted in dumps) for the L4 authorization data path to come.
pub fn authorization(name: &str, bytes: &[u8]) -> Result<security::Authorization, InvalidResource> {
    let a = security::Authorization::decode(bytes).map_err(|e| InvalidResource {
        name: name.to_string(),
        reason: format!("not an istio.security.Authorization: {e}"),
    })?;
    if a.name.is_empty() {
        return Err(InvalidResource {
            name: name.to_string(),
            reason: "authorization has no name".into(),
        });
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc_pb() -> pb::Service {
        pb::Service {
            name: "web".into(),
            namespace: "default".into(),
            hostname: "web.default.svc.cluster.local".into(),
            addresses: vec![pb::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 10],
            }],
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 8080,
            }],
            ..Default::default()
        }
    }

    fn enc(t: pb::address::Type) -> Vec<u8> {
        pb::Address { r#type: Some(t) }.encode_to_vec()
    }

    #[test]
    fn service_converts() {
        let r = address("default/web", &enc(pb::address::Type::Service(svc_pb()))).unwrap();
        let Resource::Service(s) = r else {
            panic!("{r:?}")
        };
        assert_eq!(s.key(), "default/web.default.svc.cluster.local");
        assert_eq!(
            s.addresses[0].address,
            "10.96.0.10".parse::<IpAddr>().unwrap()
        );
        assert_eq!(s.ports[0].target_port, 8080);
    }

    #[test]
    fn bad_ip_bytes_named() {
        let mut s = svc_pb();
        s.addresses[0].address = vec![10, 96, 0, 10, 1];
        let e = address("default/web", &enc(pb::address::Type::Service(s))).unwrap_err();
        assert!(e.to_string().contains("addresses[0] has 5 bytes"), "{e}");
        assert_eq!(e.name, "default/web");
    }

    #[test]
    fn too_many_ports_named() {
        let mut s = svc_pb();
        s.ports = (1..=11)
            .map(|p| pb::Port {
                service_port: p,
                target_port: 0,
            })
            .collect();
        let e = address("default/web", &enc(pb::address::Type::Service(s))).unwrap_err();
        assert!(e.reason.contains("11 ports"), "{e}");
    }

    #[test]
    fn workload_without_uid_rejected() {
        let w = pb::Workload {
            name: "w".into(),
            addresses: vec![vec![10, 244, 0, 1]],
            ..Default::default()
        };
        let e = address("x", &enc(pb::address::Type::Workload(w))).unwrap_err();
        assert!(e.reason.contains("no uid"), "{e}");
    }

    #[test]
    fn workload_converts_with_services_and_host_network() {
        let w = pb::Workload {
            uid: "cluster1//Pod/default/w".into(),
            name: "w".into(),
            namespace: "default".into(),
            addresses: vec![
                vec![10, 244, 0, 1],
                "fd00::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets()
                    .to_vec(),
            ],
            services: [(
                "default/web.default.svc.cluster.local".to_string(),
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: 80,
                        target_port: 9090,
                    }],
                },
            )]
            .into(),
            status: pb::WorkloadStatus::Unhealthy as i32,
            network_mode: pb::NetworkMode::HostNetwork as i32,
            ..Default::default()
        };
        let Resource::Workload(w) = address(
            "cluster1//Pod/default/w",
            &enc(pb::address::Type::Workload(w)),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(w.addresses.len(), 2);
        assert_eq!(w.status, HealthStatus::Unhealthy);
        assert!(w.host_network);
        assert_eq!(&*w.services[0].key, "default/web.default.svc.cluster.local");
        assert_eq!(w.services[0].ports[0].target_port, 9090);
    }

    #[test]
    fn garbage_bytes_are_not_an_address() {
        let e = address("x", &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(e.reason.contains("not an istio.workload.Address"), "{e}");
    }

    #[test]
    fn hostname_workload_converts_and_excludes_addresses() {
        let w = pb::Workload {
            uid: "Kubernetes/networking.istio.io/ServiceEntry/default/ext/api.example.com".into(),
            name: "ext".into(),
            namespace: "default".into(),
            hostname: "api.example.com".into(),
            ..Default::default()
        };
        let Resource::Workload(m) =
            address("x", &enc(pb::address::Type::Workload(w.clone()))).unwrap()
        else {
            panic!()
        };
        assert_eq!(m.hostname(), Some("api.example.com"));
        let both = pb::Workload {
            addresses: vec![vec![10, 0, 0, 1]],
            ..w.clone()
        };
        let e = address("x", &enc(pb::address::Type::Workload(both))).unwrap_err();
        assert!(e.reason.contains("exclusive"), "{e}");
        let bad = pb::Workload {
            hostname: "api..example.com".into(),
            ..w
        };
        let e = address("x", &enc(pb::address::Type::Workload(bad))).unwrap_err();
        assert!(e.reason.contains("api..example.com"), "{e}");
    }
}
