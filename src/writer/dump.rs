//! Reads the live kernel maps back and decodes ids into service/workload
//! names, for `kmesh ctl dump`. It reads the maps, not the writer's shadow
//! copy, so a dump shows what the programs actually see.

use std::collections::{BTreeMap, HashMap};

use libbpf_rs::{MapCore, MapFlags};
use serde::Serialize;

use super::MapWriter;
use crate::{
    bpf::{
        addr_key, endpoint_key, endpoint_value, port_from_map, port_key, service_value,
        workload_value, MapId, Pod, MAX_PORTS,
    },
    model::{HealthPolicy, Layers},
};

#[derive(Debug, Serialize)]
pub struct Dump {
    pub services: Vec<ServiceDump>,
    pub workloads: Vec<WorkloadDump>,
    pub enrolled_netns: Vec<EnrolledDump>,
    /// Enroll entries of the config that could not be resolved (not in
    /// enrolled_netns), with the reason.
    pub enroll_errors: Vec<String>,
    /// Services whose connections keep their original destination
    /// (ServiceEntry resolution NONE, LoadBalancing PASSTHROUGH): they
    /// have no km_vip entry on purpose.
    pub passthrough: Vec<PassthroughDump>,
    /// Hostnames of DNS workloads → the addresses their endpoints carry
    /// (the newest answer, less unusable addresses, or the previous one if
    /// the newest did not fit); empty: not resolved or no such name.
    pub dns: BTreeMap<String, Vec<String>>,
    /// L4 authorization: the policies, where they are enforced, counters.
    pub authz: AuthzDump,
    /// Entries the last apply left out of the maps, with the reason
    /// (invalid, an address another entry holds, no room).
    pub rejected: Vec<super::Rejected>,
    /// What the last apply held back without refusing an entry.
    pub notes: Vec<String>,
    pub stats: BTreeMap<&'static str, u64>,
    pub maps: BTreeMap<&'static str, MapUsage>,
    /// Programs on the cgroup; sockops only once acceleration or a
    /// waypoint has been configured.
    pub attached: Vec<&'static str>,
    /// Kernel memory all the data path's maps hold (fdinfo memlock).
    pub map_memory_bytes: u64,
    /// What this kernel runs (features found at start, and why any is off).
    pub kernel: crate::bpf::KernelSupport,
    /// Weighted endpoints, circuit breakers and rate limits, with live
    /// counts (writer/limits.rs).
    pub traffic: Vec<super::TrafficDump>,
}

#[derive(Debug, Serialize)]
pub struct ServiceDump {
    pub id: u32,
    pub name: String,
    pub addresses: Vec<String>,
    pub lb_policy: &'static str,
    /// Whether unhealthy workloads are endpoints too (ALLOW_ALL), from the
    /// model: the maps hold only the resulting endpoint lists.
    pub health_policy: Option<HealthPolicy>,
    pub ports: Vec<PortDump>,
    /// Endpoint lists by priority, in index order (index = position + 1),
    /// as workload uid and the backend address the entry carries.
    pub endpoints: BTreeMap<u32, Vec<String>>,
    pub endpoint_addresses: BTreeMap<u32, Vec<Vec<String>>>,
    /// Workloads' own target ports: "uid: service port -> target port".
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub own_ports: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct AuthzDump {
    pub policies: Vec<PolicyDump>,
    /// Destinations enforced here (workload uids) by policy set (the keys
    /// of the policies that apply, in order).
    pub sets: BTreeMap<String, Vec<String>>,
    /// Enrolled netns with the authorization program attached.
    pub netns_attached: usize,
    /// Policy sets that did not fit the tables (their destinations deny).
    pub notes: Vec<String>,
    /// Config-file policies left out as invalid, naming the field.
    pub refused: Vec<String>,
    /// Why live connections cannot be closed when a policy starts denying
    /// them (the kernel cannot destroy sockets); absent when they can.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut_unavailable: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct PolicyDump {
    /// "namespace/name".
    pub key: String,
    pub scope: crate::authz::Scope,
    pub action: crate::authz::Action,
    pub dry_run: bool,
    pub rules: usize,
    /// "all workloads", "namespace X", or the selected workloads' uids.
    pub selects: Vec<String>,
    /// The workloads it applies to on this node (uids), where it is
    /// enforced.
    pub applies_to: Vec<String>,
    /// Connections it allowed (the first ALLOW that matched), denied, and
    /// would have denied (dry run), counted at the destination since it
    /// was loaded.
    pub allow: u64,
    pub deny: u64,
    pub dry_run_deny: u64,
}

#[derive(Debug, Serialize)]
pub struct PortDump {
    pub service_port: u16,
    pub target_port: u16,
}

#[derive(Debug, Serialize)]
pub struct WorkloadDump {
    pub id: u32,
    pub uid: String,
    pub addresses: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct EnrolledDump {
    pub cookie: u64,
    pub source: String,
}

#[derive(Debug, Serialize)]
pub struct PassthroughDump {
    pub name: String,
    pub addresses: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct MapUsage {
    pub entries: usize,
    pub capacity: u32,
    /// Kernel memory the map holds (fdinfo memlock).
    pub memory_bytes: u64,
}

fn entries<K: Pod, V: Pod>(w: &MapWriter, id: MapId) -> Vec<(K, V)> {
    let map = w.dp.map(id);
    map.keys()
        .filter_map(|k| {
            let v = map.lookup(&k, MapFlags::ANY).ok().flatten()?;
            Some((K::from_bytes(&k)?, V::from_bytes(&v)?))
        })
        .collect()
}

impl MapWriter {
    /// The maps as the programs see them; ids are named from `model` (the
    /// writer keeps no names of its own), so ids the model no longer has
    /// show as unknown.
    pub fn dump(&self, model: Layers) -> Dump {
        let svc_names = self.service_ids.names();
        let mut wl_names: HashMap<u32, String> = model
            .workloads()
            .map(|w| (w.id(), w.uid().to_string()))
            .collect();
        for (&(base, k), &id) in &self.extra_ids {
            if let Some(uid) = wl_names.get(&base) {
                wl_names.insert(id, format!("{uid}#{k}"));
            }
        }
        let svc_name = |id: u32| match svc_names.get(&id) {
            Some(k) => k.to_string(),
            None => format!("<unknown service id {id}>"),
        };
        let wl_name = |id: u32| match wl_names.get(&id) {
            Some(u) => u.to_string(),
            None => format!("<unknown workload id {id}>"),
        };

        // Every VIP of a service carries the same value; group by id.
        let mut by_service: BTreeMap<u32, (service_value, Vec<String>)> = BTreeMap::new();
        for (k, v) in entries::<addr_key, service_value>(self, MapId::Vip) {
            let e = by_service.entry(v.service_id).or_insert((v, Vec::new()));
            e.1.push(k.addr.to_ip().to_string());
        }
        let mut lists: BTreeMap<(u32, u32), BTreeMap<u32, endpoint_value>> = BTreeMap::new();
        for (k, v) in entries::<endpoint_key, endpoint_value>(self, MapId::Endpoint) {
            lists
                .entry((k.service_id, k.prio))
                .or_default()
                .insert(k.index, v);
        }
        let mut own_ports: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (k, v) in entries::<port_key, u32>(self, MapId::Port) {
            own_ports.entry(k.service_id).or_default().push(format!(
                "{}: {} -> {}",
                wl_name(k.workload_id),
                port_from_map(k.service_port),
                port_from_map(v)
            ));
        }
        let mut services: Vec<ServiceDump> = by_service
            .into_iter()
            .map(|(id, (v, mut addresses))| {
                addresses.sort();
                let ports = (0..MAX_PORTS)
                    .filter(|&i| v.service_port[i] != 0)
                    .map(|i| PortDump {
                        service_port: port_from_map(v.service_port[i]),
                        target_port: port_from_map(v.target_port[i]),
                    })
                    .collect();
                let mut endpoints = BTreeMap::new();
                let mut endpoint_addresses = BTreeMap::new();
                for (prio, &count) in v.prio_endpoint_count.iter().enumerate() {
                    if count == 0 {
                        continue;
                    }
                    let list = lists.get(&(id, prio as u32));
                    let (names, addrs) = (1..=count)
                        .map(|i| match list.and_then(|l| l.get(&i)) {
                            Some(e) => (
                                wl_name(e.workload_id),
                                e.addr.to_ips().iter().map(ToString::to_string).collect(),
                            ),
                            None => (format!("<missing index {i}>"), Vec::new()),
                        })
                        .unzip();
                    endpoints.insert(prio as u32, names);
                    endpoint_addresses.insert(prio as u32, addrs);
                }
                let name = svc_name(id);
                ServiceDump {
                    id,
                    health_policy: model.service(&name).map(|s| s.load_balancing.health_policy),
                    name,
                    addresses,
                    lb_policy: match v.lb_policy {
                        0 => "RANDOM",
                        1 => "STRICT",
                        2 => "FAILOVER",
                        _ => "UNKNOWN",
                    },
                    ports,
                    endpoints,
                    endpoint_addresses,
                    own_ports: own_ports.remove(&id).map_or_else(Vec::new, |mut v| {
                        v.sort();
                        v
                    }),
                }
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));

        let mut by_workload: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (k, v) in entries::<addr_key, workload_value>(self, MapId::Workload) {
            by_workload
                .entry(v.workload_id)
                .or_default()
                .push(k.addr.to_ip().to_string());
        }
        let mut workloads: Vec<WorkloadDump> = by_workload
            .into_iter()
            .map(|(id, mut addresses)| {
                addresses.sort();
                WorkloadDump {
                    id,
                    uid: wl_name(id),
                    addresses,
                }
            })
            .collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));

        let mut enrolled_netns: Vec<EnrolledDump> = self
            .dp
            .map(MapId::Manage)
            .keys()
            .filter_map(|k| u64::from_bytes(&k))
            .map(|cookie| EnrolledDump {
                cookie,
                source: self
                    .enroll_source(cookie)
                    .unwrap_or("<unknown>")
                    .to_string(),
            })
            .collect();
        enrolled_netns.sort_by_key(|e| e.cookie);

        let maps = MapId::shown()
            .map(|id| {
                let usage = MapUsage {
                    entries: self.dp.map(id).keys().count(),
                    capacity: self.dp.capacity(id),
                    memory_bytes: self.dp.memlock(id),
                };
                (id.name(), usage)
            })
            .collect();
        let mut passthrough = self
            .passthrough
            .iter()
            .map(|(key, addrs)| PassthroughDump {
                name: key.to_string(),
                addresses: addrs.iter().map(ToString::to_string).collect(),
            })
            .collect::<Vec<_>>();
        passthrough.sort_by(|a, b| a.name.cmp(&b.name));
        let dns = self
            .dns_hosts
            .iter()
            .map(|h| {
                let addrs = self.answered.get(h.as_str()).map_or(&[][..], Vec::as_slice);
                (h.clone(), addrs.iter().map(ToString::to_string).collect())
            })
            .collect();
        // One pass over the workloads, not one per policy.
        let mut selected: HashMap<&str, Vec<String>> = HashMap::new();
        for w in model.workloads() {
            for k in w.policies() {
                selected.entry(k).or_default().push(w.uid().to_string());
            }
        }
        let counters = self.authz_counters();
        let mut enforced: HashMap<&str, Vec<String>> = HashMap::new();
        for (set, uids) in &self.authz.applied {
            for k in set.split(',') {
                enforced.entry(k).or_default().extend(uids.iter().cloned());
            }
        }
        let mut policies: Vec<PolicyDump> = model
            .policies()
            .map(|p| {
                use crate::authz::Scope;
                let key = p.key();
                let selects = match p.scope {
                    Scope::Global => vec!["all workloads".to_string()],
                    Scope::Namespace => vec![format!("namespace {}", p.namespace)],
                    Scope::WorkloadSelector => selected.remove(key.as_str()).unwrap_or_default(),
                };
                let [allow, deny, dry_run_deny] =
                    counters.get(key.as_str()).copied().unwrap_or_default();
                let mut applies_to = enforced.remove(key.as_str()).unwrap_or_default();
                applies_to.sort();
                applies_to.dedup();
                PolicyDump {
                    key,
                    scope: p.scope,
                    action: p.action,
                    dry_run: p.dry_run,
                    rules: p.rules.len(),
                    selects,
                    applies_to,
                    allow,
                    deny,
                    dry_run_deny,
                }
            })
            .collect();
        policies.sort_by(|a, b| a.key.cmp(&b.key));
        let authz = AuthzDump {
            policies,
            sets: self
                .authz
                .applied
                .iter()
                .map(|(k, uids)| (k.to_string(), uids.clone()))
                .collect(),
            netns_attached: self.dp.netns_attached(),
            notes: self.authz.notes.clone(),
            refused: model
                .0
                .iter()
                .flat_map(|m| &m.policy_errors)
                .map(|(field, message)| format!("{field}: {message}"))
                .collect(),
            cut_unavailable: None,
        };
        Dump {
            authz,
            services,
            workloads,
            enrolled_netns,
            enroll_errors: model
                .0
                .iter()
                .flat_map(|m| m.enroll_errors.clone())
                .collect(),
            passthrough,
            dns,
            rejected: self.last.rejected.clone(),
            notes: self.last.notes.clone(),
            stats: self.dp.stats().into_iter().collect(),
            maps,
            attached: self.dp.attached(),
            map_memory_bytes: self.dp.memlock_total(),
            kernel: self.dp.kernel().clone(),
            traffic: self.traffic_dump(model),
        }
    }
}
