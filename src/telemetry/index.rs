//! Addresses to the names Istio's metrics carry, rebuilt from the model
//! after each apply (the reader never takes the sources' locks).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use foldhash::HashMap;

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
            ix.add_workload(w);
        }
        for (_, s) in layers.services() {
            ix.add_service(s);
        }
        ix
    }

    /// `build` for the entries `changes` names only: the old versions'
    /// addresses out, the current ones in. (Only for changes the writer
    /// applied incrementally: no address is then contested.)
    pub fn update(&mut self, layers: Layers, changes: &Changes) {
        for w in changes.workloads.iter().filter_map(|(_, old)| old.as_ref()) {
            if !w.host_network {
                for a in w.addresses.iter() {
                    self.workloads.remove(&canonical(*a));
                }
            }
        }
        for s in changes
            .services
            .iter()
            .filter_map(|(_, old)| old.as_deref())
        {
            for a in &s.addresses {
                let ip = canonical(a.address);
                self.vips.remove(&ip);
                for p in &s.ports {
                    self.vip_ports.remove(&(ip, p.service_port));
                }
            }
        }
        for (uid, _) in &changes.workloads {
            if let Some(w) = layers.workload(uid) {
                self.add_workload(w);
            }
        }
        for (key, _) in &changes.services {
            if let Some(s) = layers.service(key) {
                self.add_service(s);
            }
        }
    }

    /// A workload's addresses, where no other workload has them.
    fn add_workload(&mut self, w: &Workload) {
        // A hostNetwork pod's address is the node's, not its own.
        if w.host_network {
            return;
        }
        let info = workload_info(w);
        for a in w.addresses.iter() {
            self.workloads.entry(canonical(*a)).or_insert(info.clone());
        }
    }

    fn add_service(&mut self, s: &Service) {
        let info = service_info(s);
        for a in &s.addresses {
            let ip = canonical(a.address);
            for p in &s.ports {
                self.vip_ports.insert((ip, p.service_port), info.clone());
            }
            self.vips.entry(ip).or_insert(info.clone());
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
