//! Standalone source: a JSON file describing services, workloads and the
//! network namespaces to enroll, for hosts without a control plane.
//!
//! The shape follows Istio's workload API (Service, Workload, PortList,
//! LoadBalancing) so the same model is filled as from xDS. Parsing is
//! strict: unknown fields, bad addresses, and references to undefined
//! services are errors that name the field; a rejected file changes nothing.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use thiserror::Error;

use crate::model::{
    Enrollment, HealthStatus, LbMode, LoadBalancing, Model, ModelError, Placement, PortMapping,
    Service, ServiceRef, Waypoint, WaypointTarget, Workload, WorkloadExtra,
};

mod input;
mod schema;
mod traffic;

use schema::*;

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

fn waypoint(w: &WaypointEntry) -> Result<Waypoint, String> {
    let target = match (&w.address, &w.service) {
        (Some(a), None) => WaypointTarget::Address(a.0),
        (None, Some(s)) if s.contains('/') => WaypointTarget::Service(s.as_str().into()),
        (None, Some(s)) => return Err(format!("service {s:?} is not \"namespace/hostname\"")),
        _ => return Err("give exactly one of address and service".into()),
    };
    if w.port == 0 {
        return Err("port 0 is not a port".into());
    }
    Ok(Waypoint {
        target,
        port: w.port,
    })
}

fn ports(list: &[PortEntry]) -> Vec<PortMapping> {
    list.iter()
        .map(|p| PortMapping {
            service_port: p.service_port,
            target_port: p.target_port,
        })
        .collect()
}

/// A workload's own port list: each entry maps one of the service's ports,
/// so service_port 0 (also "0 -> 0") matches nothing a client can dial.
fn own_ports(list: &[PortEntry]) -> Result<Vec<PortMapping>, String> {
    if let Some(i) = list.iter().position(|p| p.service_port == 0) {
        return Err(format!("ports[{i}]: service_port 0 is not a port"));
    }
    Ok(ports(list))
}

/// An enroll path must be absolute: the daemon's working directory is no
/// place to look for a pod's namespace.
fn check_netns_path(p: &Path) -> Result<(), String> {
    if p.as_os_str().is_empty() {
        return Err("empty path (give /run/netns/NAME or /proc/PID/ns/net)".into());
    }
    if !p.is_absolute() {
        return Err(format!(
            "{} is a relative path; give an absolute one (/run/netns/NAME or /proc/PID/ns/net)",
            p.display()
        ));
    }
    Ok(())
}

/// Parses and validates config text without touching the OS: enrollment
/// paths are returned unresolved.
fn parse(path: &Path, text: &str) -> Result<(Model, Vec<NetnsEntry>), ConfigError> {
    let field_err = |field: String, message: String| ConfigError::Field {
        path: path.to_path_buf(),
        field,
        message,
    };
    let de = &mut serde_json::Deserializer::from_str(text);
    let file: File = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let field = if field == "." {
            format!("line {}", inner.line())
        } else {
            field
        };
        field_err(field, inner.to_string())
    })?;
    // A second document or stray bytes after the first: the file is not
    // what its writer meant (a concatenation, a half-done edit).
    de.end().map_err(|e| {
        field_err(
            format!("line {}", e.line()),
            format!("{e}: the file must hold exactly one JSON object"),
        )
    })?;
    let tree: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| field_err(format!("line {}", e.line()), e.to_string()))?;
    if let Some(at) = input::misplaced_array(&tree) {
        let at = if at == "." { "top level".into() } else { at };
        return Err(field_err(
            at,
            "must be a JSON object ({...}), not an array".into(),
        ));
    }
    drop(tree);
    for (i, entry) in file.enroll.netns.iter().enumerate() {
        check_netns_path(entry.parts().0)
            .map_err(|e| field_err(format!("enroll.netns[{i}]"), e))?;
    }

    let mut model = Model::default();
    for (i, s) in file.services.iter().enumerate() {
        let svc = Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            addresses: s.addresses.iter().map(|a| a.0.clone()).collect(),
            ports: ports(&s.ports),
            load_balancing: match (s.resolution, &s.load_balancing) {
                (Resolution::None, Some(lb)) if !matches!(lb.mode, LbModeEntry::Passthrough | LbModeEntry::Unspecified) => {
                    return Err(field_err(
                        format!("services[{i}].load_balancing.mode"),
                        "resolution NONE passes connections through; it takes no load-balancing mode".into(),
                    ))
                }
                (Resolution::None, _) => LoadBalancing {
                    mode: LbMode::Passthrough,
                    ..Default::default()
                },
                (_, lb) => lb
                .as_ref()
                .map(|lb| LoadBalancing {
                    mode: match lb.mode {
                        LbModeEntry::Unspecified => LbMode::Random,
                        LbModeEntry::Strict => LbMode::Strict,
                        LbModeEntry::Failover => LbMode::Failover,
                        LbModeEntry::Passthrough => LbMode::Passthrough,
                    },
                    routing_preference: lb.routing_preference.clone(),
                    health_policy: lb.health_policy,
                })
                .unwrap_or_default(),
            },
            waypoint: s
                .waypoint
                .as_ref()
                .map(waypoint)
                .transpose()
                .map_err(|e| field_err(format!("services[{i}].waypoint"), e))?,
        };
        svc.validate()
            .map_err(|e| field_err(format!("services[{i}]"), e.to_string()))?;
        let tp = traffic::policy(&s.split, s.max_connections, s.rate_limit.as_ref())
            .map_err(|(f, m)| field_err(format!("services[{i}].{f}"), m))?;
        if !tp.is_default() {
            model.traffic.insert(svc.key().into(), tp);
        }
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
            let ports = own_ports(&list.ports)
                .map_err(|e| field_err(format!("workloads[{i}].services.{key}"), e))?;
            services.push(ServiceRef {
                key: model.intern_service_key(key),
                ports,
            });
        }
        let mut wl = Workload::new(&w.uid, &w.name, w.namespace.as_str());
        wl.set_network(&w.network);
        wl.addresses = w.addresses.iter().map(|a| a.0).collect();
        wl.services = services.into();
        wl.status = match w.status {
            StatusEntry::Healthy => HealthStatus::Healthy,
            StatusEntry::Unhealthy => HealthStatus::Unhealthy,
        };
        wl.host_network = w.host_network;
        wl.set_identity(&w.trust_domain, &w.service_account);
        wl.set_extra(WorkloadExtra {
            hostname: w.hostname.as_deref().map(Into::into),
            policies: w.authorization_policies.clone(),
            weight: traffic::weight(w.weight)
                .map_err(|e| field_err(format!("workloads[{i}].weight"), e))?,
            labels: w.labels.clone(),
            waypoint: w
                .waypoint
                .as_ref()
                .map(waypoint)
                .transpose()
                .map_err(|e| field_err(format!("workloads[{i}].waypoint"), e))?,
        });
        wl.set_placement(
            (w.locality.is_some() || !w.node.is_empty() || !w.cluster_id.is_empty()).then(|| {
                let l = w.locality.as_ref();
                Placement {
                    region: l.map(|l| l.region.clone()).unwrap_or_default(),
                    zone: l.map(|l| l.zone.clone()).unwrap_or_default(),
                    subzone: l.map(|l| l.subzone.clone()).unwrap_or_default(),
                    node: w.node.clone(),
                    cluster: w.cluster_id.clone(),
                }
            }),
        );
        wl.validate()
            .map_err(|e| field_err(format!("workloads[{i}]"), e.to_string()))?;
        if model.insert_workload(wl).is_some() {
            return Err(field_err(
                format!("workloads[{i}].uid"),
                format!("uid {:?} used twice", w.uid),
            ));
        }
    }
    // Policies one by one, as xDS NACKs one resource: leaving a DENY out
    // or keeping the whole previous file would both be wrong for the others.
    for (i, v) in file.policies.iter().enumerate() {
        if let (Some(ns), Some(name)) = (v["namespace"].as_str(), v["name"].as_str()) {
            // Taken back out below if the entry is good.
            model.refused_policies.push(format!("{ns}/{name}"));
        }
        let p: crate::authz::Policy = match serde_path_to_error::deserialize(v) {
            Ok(p) => p,
            Err(e) => {
                let at = e.path().to_string();
                let field = if at == "." {
                    format!("policies[{i}]")
                } else {
                    format!("policies[{i}].{at}")
                };
                model
                    .policy_errors
                    .push((field, e.into_inner().to_string()));
                continue;
            }
        };
        if let Err(e) = p.validate() {
            model
                .policy_errors
                .push((format!("policies[{i}]"), e.to_string()));
        } else if model.policies.get(&p.key()).is_some() {
            model.policy_errors.push((
                format!("policies[{i}]"),
                format!("policy {} defined twice", p.key()),
            ));
        } else {
            model.policies.insert(p);
        }
    }
    let good = &model.policies;
    model.refused_policies.retain(|k| good.get(k).is_none());
    for (i, s) in file.services.iter().enumerate() {
        let key = format!("{}/{}", s.namespace, s.hostname);
        if let Some(tp) = model.traffic.get(key.as_str()) {
            traffic::check_split(&model, &key, tp)
                .map_err(|(f, m)| field_err(format!("services[{i}].{f}"), m))?;
        }
    }
    // A DNS service no workload backs resolves its own hostname, as
    // istiod does for a ServiceEntry without endpoints.
    let backed: std::collections::HashSet<Arc<str>> = model
        .workloads
        .iter()
        .flat_map(|w| w.services.iter().map(|r| r.key.clone()))
        .collect();
    for (i, s) in file.services.iter().enumerate() {
        let key = format!("{}/{}", s.namespace, s.hostname);
        if s.resolution != Resolution::Dns || backed.contains(key.as_str()) {
            continue;
        }
        let uid = format!("ServiceEntry/{key}");
        let mut wl = Workload::new(&uid, &s.name, s.namespace.as_str());
        wl.services = Arc::new([ServiceRef {
            key: model.intern_service_key(&key),
            ports: Vec::new(),
        }]);
        wl.set_extra(WorkloadExtra {
            hostname: Some(s.hostname.as_str().into()),
            ..Default::default()
        });
        wl.validate()
            .map_err(|e| field_err(format!("services[{i}].hostname"), e.to_string()))?;
        if model.insert_workload(wl).is_some() {
            return Err(field_err(
                format!("services[{i}]"),
                format!("uid {uid:?} of its DNS workload is also a workload's uid"),
            ));
        }
    }
    model.validate().map_err(|source| ConfigError::Model {
        path: path.to_path_buf(),
        source,
    })?;
    model.accelerate = file.accelerate;
    model.accel_queue_limit = file.accel_queue_limit;
    model.access_log = match file.access_log.as_deref().map(str::parse) {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(e)) => return Err(field_err("access_log".into(), format!("{e}"))),
    };
    Ok((model, file.enroll.netns))
}

/// Checks a config file without touching the kernel: every enroll path
/// must be a network namespace now (opened, never entered).
pub fn check(path: &Path) -> Result<Model, ConfigError> {
    let text = read(path)?;
    let (model, netns) = parse(path, &text)?;
    // What the daemon would leave out is an error here.
    if let Some((field, message)) = model.policy_errors.first() {
        return Err(ConfigError::Field {
            path: path.to_path_buf(),
            field: field.clone(),
            message: message.clone(),
        });
    }
    for (i, entry) in netns.iter().enumerate() {
        let (ns, _) = entry.parts();
        input::open_netns(ns).map_err(|message| ConfigError::Field {
            path: path.to_path_buf(),
            field: format!("enroll.netns[{i}]"),
            message: format!("{}: {message}", ns.display()),
        })?;
    }
    Ok(model)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    input::read_file(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads, validates and resolves a config file into a model (enrolled
/// namespaces resolved to their cookies). An enroll entry that cannot be
/// resolved (a pod's netns deleted while still listed) is left out and
/// reported in `Model::enroll_errors`: one gone pod must not hold back
/// every other change in the file.
pub fn load(path: &Path) -> Result<Model, ConfigError> {
    let text = read(path)?;
    let (mut model, netns) = parse(path, &text)?;
    for (field, message) in &model.policy_errors {
        tracing::warn!(
            "config {}: {field}: {message}; policy left out, the others apply",
            path.display()
        );
    }
    for (i, entry) in netns.iter().enumerate() {
        let (ns, waypoint) = entry.parts();
        match input::open_netns(ns).and_then(input::netns_cookie) {
            Ok((cookie, addrs)) => {
                model.enrolled.insert(
                    cookie,
                    Enrollment {
                        source: ns.display().to_string(),
                        waypoint,
                        addrs,
                    },
                );
            }
            Err(e) => {
                let msg = format!("enroll.netns[{i}] {}: {e}", ns.display());
                tracing::warn!("config {}: {msg}; not enrolled", path.display());
                model.enroll_errors.push(msg);
            }
        }
    }
    Ok(model)
}

/// Cookie and global addresses of the network namespace at `path`, as an
/// enroll entry resolves (for the CNI enrollment source).
pub fn resolve_netns(path: &Path) -> Result<(u64, Vec<std::net::IpAddr>), String> {
    input::open_netns(path).and_then(input::netns_cookie)
}

#[cfg(test)]
mod tests;
