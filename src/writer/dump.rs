//! Reads the live kernel maps back and decodes ids into service/workload
//! names, for `kmesh ctl dump`. It reads the maps, not the writer's shadow
//! copy, so a dump shows what the programs actually see.

use std::collections::BTreeMap;

use libbpf_rs::{MapCore, MapFlags};
use serde::Serialize;

use super::MapWriter;
use crate::bpf::{
    backend_value, endpoint_key, endpoint_value, frontend_key, frontend_value, ip4_from_map,
    port_from_map, service_value, MapId, Pod, MAX_PORTS, UPSTREAM_SERVICE,
};

#[derive(Debug, Serialize)]
pub struct Dump {
    pub services: Vec<ServiceDump>,
    pub workloads: Vec<WorkloadDump>,
    pub enrolled_netns: Vec<EnrolledDump>,
    pub stats: BTreeMap<&'static str, u64>,
    pub maps: BTreeMap<&'static str, MapUsage>,
}

#[derive(Debug, Serialize)]
pub struct ServiceDump {
    pub id: u32,
    pub name: String,
    pub addresses: Vec<String>,
    pub lb_policy: &'static str,
    pub ports: Vec<PortDump>,
    /// Endpoint lists by priority, in index order (index = position + 1).
    pub endpoints: BTreeMap<u32, Vec<String>>,
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
pub struct MapUsage {
    pub entries: usize,
    pub capacity: u32,
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
    pub fn dump(&self) -> Dump {
        let name = |id: u32| match self.upstream(id) {
            Some(u) => u.label().to_string(),
            None => format!("<unknown id {id}>"),
        };
        let frontends: Vec<(frontend_key, frontend_value)> = entries(self, MapId::Frontend);
        let mut vips: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        // Frontends naming a workload are direct-access entries; their
        // addresses already appear under workloads.
        for (k, v) in frontends.iter().filter(|(_, v)| v.kind == UPSTREAM_SERVICE) {
            vips.entry(v.upstream_id)
                .or_default()
                .push(k.addr.to_ip().to_string());
        }
        let mut endpoints: BTreeMap<(u32, u32), BTreeMap<u32, u32>> = BTreeMap::new();
        for (k, v) in entries::<endpoint_key, endpoint_value>(self, MapId::Endpoint) {
            endpoints
                .entry((k.service_id, k.prio))
                .or_default()
                .insert(k.index, v.backend_id);
        }
        let mut services: Vec<ServiceDump> = entries::<u32, service_value>(self, MapId::Service)
            .into_iter()
            .map(|(id, v)| {
                let ports = (0..MAX_PORTS)
                    .filter(|&i| v.service_port[i] != 0)
                    .map(|i| PortDump {
                        service_port: port_from_map(v.service_port[i]),
                        target_port: port_from_map(v.target_port[i]),
                    })
                    .collect();
                let mut eps = BTreeMap::new();
                for (prio, &count) in v.prio_endpoint_count.iter().enumerate() {
                    if count == 0 {
                        continue;
                    }
                    let list = endpoints.get(&(id, prio as u32));
                    let names = (1..=count)
                        .map(|i| match list.and_then(|l| l.get(&i)) {
                            Some(b) => name(*b),
                            None => format!("<missing index {i}>"),
                        })
                        .collect();
                    eps.insert(prio as u32, names);
                }
                let mut addresses = vips.get(&id).cloned().unwrap_or_default();
                addresses.sort();
                ServiceDump {
                    id,
                    name: name(id),
                    addresses,
                    lb_policy: match v.lb_policy {
                        0 => "RANDOM",
                        1 => "STRICT",
                        2 => "FAILOVER",
                        _ => "UNKNOWN",
                    },
                    ports,
                    endpoints: eps,
                }
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let mut workloads: Vec<WorkloadDump> = entries::<u32, backend_value>(self, MapId::Backend)
            .into_iter()
            .map(|(id, b)| {
                let mut addresses = Vec::new();
                if b.has_ip4 != 0 {
                    addresses.push(ip4_from_map(b.ip4).to_string());
                }
                if b.has_ip6 != 0 {
                    addresses.push(b.ip6.to_ip().to_string());
                }
                WorkloadDump {
                    id,
                    uid: name(id),
                    addresses,
                }
            })
            .collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let map = self.dp.map(MapId::Manage);
        let mut enrolled_netns: Vec<EnrolledDump> = map
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
        let maps = MapId::ALL
            .iter()
            .map(|&id| {
                (
                    id.name(),
                    MapUsage {
                        entries: self.dp.map(id).keys().count(),
                        capacity: self.dp.capacity(id),
                    },
                )
            })
            .collect();
        Dump {
            services,
            workloads,
            enrolled_netns,
            stats: self.dp.stats().into_iter().collect(),
            maps,
        }
    }
}
