//! Addresses to the names Istio's metrics carry, rebuilt from the model
//! after each apply (the reader never takes the sources' locks).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::model::{canonical, Layers};

/// What a workload contributes to the labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// SPIFFE id, as ztunnel's principal labels show it.
    pub principal: Arc<str>,
    pub cluster: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub hostname: Arc<str>,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
}

/// Lookups by address, built once per apply.
#[derive(Debug, Default)]
pub struct Index {
    workloads: HashMap<IpAddr, Arc<WorkloadInfo>>,
    /// VIP → service; (VIP, port) where a VIP's services differ by port.
    vips: HashMap<IpAddr, Arc<ServiceInfo>>,
    vip_ports: HashMap<(IpAddr, u16), Arc<ServiceInfo>>,
}

fn or_unknown(s: &str) -> Arc<str> {
    Arc::from(if s.is_empty() { "unknown" } else { s })
}

impl Index {
    pub fn build(layers: Layers) -> Index {
        let mut ix = Index::default();
        for w in layers.workloads() {
            // A hostNetwork pod's address is the node's, not its own.
            if w.host_network {
                continue;
            }
            let id = w.identity();
            let info = Arc::new(WorkloadInfo {
                name: or_unknown(w.name()),
                namespace: or_unknown(w.namespace()),
                principal: Arc::from(format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    id.trust_domain, id.namespace, id.service_account
                )),
                cluster: or_unknown(w.placement().map_or("", |p| p.cluster.as_str())),
            });
            for a in w.addresses.iter() {
                ix.workloads.entry(canonical(*a)).or_insert(info.clone());
            }
        }
        for (_, s) in layers.services() {
            let info = Arc::new(ServiceInfo {
                hostname: or_unknown(&s.hostname),
                name: or_unknown(&s.name),
                namespace: or_unknown(&s.namespace),
            });
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
