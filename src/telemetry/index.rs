//! Addresses to the names Istio's metrics carry, rebuilt from the model
//! after each apply (the reader never takes the sources' locks).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::model::{canonical, Changes, Layers, Service, Workload};

/// What a workload contributes to the labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// SPIFFE id, as ztunnel's principal labels show it.
    pub principal: Arc<str>,
    pub cluster: Arc<str>,
    pub canonical_name: Arc<str>,
    pub canonical_revision: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub hostname: Arc<str>,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
}

/// Lookups by address, built once per apply.
#[derive(Debug, Default, Clone)]
pub struct Index {
    workloads: HashMap<IpAddr, Arc<WorkloadInfo>>,
    /// VIP → service; (VIP, port) where a VIP's services differ by port.
    vips: HashMap<IpAddr, Arc<ServiceInfo>>,
    vip_ports: HashMap<(IpAddr, u16), Arc<ServiceInfo>>,
}

fn or_unknown(s: &str) -> Arc<str> {
    Arc::from(if s.is_empty() { "unknown" } else { s })
}

fn workload_info(w: &Workload) -> Arc<WorkloadInfo> {
    let id = w.identity();
    Arc::new(WorkloadInfo {
        name: or_unknown(w.name()),
        namespace: or_unknown(w.namespace()),
        principal: Arc::from(format!(
            "spiffe://{}/ns/{}/sa/{}",
            id.trust_domain, id.namespace, id.service_account
        )),
        cluster: or_unknown(w.placement().map_or("", |p| p.cluster.as_str())),
        canonical_name: or_unknown(w.canonical_name()),
        canonical_revision: or_unknown(w.canonical_revision()),
    })
}

fn service_info(s: &Service) -> Arc<ServiceInfo> {
    Arc::new(ServiceInfo {
        hostname: or_unknown(&s.hostname),
        name: or_unknown(&s.name),
        namespace: or_unknown(&s.namespace),
    })
}

impl Index {
    pub fn build(layers: Layers) -> Index {
        let mut ix = Index::default();
        for w in layers.workloads() {
            // A hostNetwork pod's address is the node's, not its own.
            if w.host_network {
                continue;
            }
            let info = workload_info(w);
            for a in w.addresses.iter() {
                ix.workloads.entry(canonical(*a)).or_insert(info.clone());
            }
        }
        for (_, s) in layers.services() {
            let info = service_info(s);
            for a in &s.addresses {
                let ip = canonical(a.address);
                for p in &s.ports {
                    ix.vip_ports.insert((ip, p.service_port), info.clone());
                }
                ix.vips.entry(ip).or_insert(info.clone());
            }
        }
        ix
    }

    /// `build` for the entries `changes` names only: the old versions'
    /// addresses out, the current ones in. (Only for changes the writer
    /// applied incrementally: no address is then contested.)
    pub fn update(&mut self, layers: Layers, changes: &Changes) {
        for (_, old) in &changes.workloads {
            for a in old
                .iter()
                .filter(|w| !w.host_network)
                .flat_map(|w| w.addresses.iter())
            {
                self.workloads.remove(&canonical(*a));
            }
        }
        for (_, old) in &changes.services {
            for s in old.iter() {
                for a in &s.addresses {
                    let ip = canonical(a.address);
                    self.vips.remove(&ip);
                    for p in &s.ports {
                        self.vip_ports.remove(&(ip, p.service_port));
                    }
                }
            }
        }
        for (uid, _) in &changes.workloads {
            let w = layers.0.iter().rev().find_map(|m| m.workloads.get(uid));
            if let Some(w) = w.filter(|w| !w.host_network) {
                let info = workload_info(w);
                for a in w.addresses.iter() {
                    self.workloads.insert(canonical(*a), info.clone());
                }
            }
        }
        for (key, _) in &changes.services {
            if let Some(s) = layers.service(key) {
                let info = service_info(s);
                for a in &s.addresses {
                    let ip = canonical(a.address);
                    for p in &s.ports {
                        self.vip_ports.insert((ip, p.service_port), info.clone());
                    }
                    self.vips.insert(ip, info.clone());
                }
            }
        }
    }

    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.workloads.get(&canonical(ip))
    }

    /// The service a client addressed (its original destination).
    pub fn service(&self, dst: SocketAddr) -> Option<&Arc<ServiceInfo>> {
        let ip = canonical(dst.ip());
        self.vip_ports
            .get(&(ip, dst.port()))
            .or_else(|| self.vips.get(&ip))
    }
}
