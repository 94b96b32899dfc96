//! Several sources' models seen as one (`Layers`), and what a source
//! changed since the maps were last written (`Changes`).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use super::{
    canonical, Enrollment, EntryKey, Model, ModelError, Service, TrafficPolicy, Workload,
    DEFAULT_ACCEL_QUEUE_LIMIT,
};

/// What a source changed since the maps were last written, with the
/// versions it replaced, so that the writer's work is proportional to the
/// change (writer/delta.rs). A key may appear more than once; its first
/// entry holds the version the maps were written from.
#[derive(Debug, Default)]
pub struct Changes {
    /// Service key → the version before (None: there was none).
    pub services: Vec<(Arc<str>, Option<Box<Service>>)>,
    /// Workload uid → the version before.
    pub workloads: Vec<(Box<str>, Option<Workload>)>,
    /// Something changed that is not tracked here (policies, or more
    /// entries than are worth tracking one by one): only a full apply
    /// will do.
    pub whole: bool,
    /// Resources the source received for these changes, changed or not.
    pub resources: usize,
}

/// Beyond this many entries one push is applied whole: its cost is then
/// the full apply's anyway, and the old versions are not kept.
pub const MAX_TRACKED_CHANGES: usize = 4096;

impl Changes {
    fn full(&self) -> bool {
        self.whole || self.services.len() + self.workloads.len() >= MAX_TRACKED_CHANGES
    }

    fn give_up(&mut self) {
        self.whole = true;
        self.services = Vec::new();
        self.workloads = Vec::new();
    }

    pub fn service(&mut self, key: Arc<str>, old: Option<Box<Service>>) {
        if self.full() {
            return self.give_up();
        }
        self.services.push((key, old));
    }

    pub fn workload(&mut self, uid: &str, old: Option<Workload>) {
        if self.full() {
            return self.give_up();
        }
        self.workloads.push((uid.into(), old));
    }

    pub fn everything(&mut self) {
        self.give_up();
    }
}

/// Several sources' models seen as one, without copying them: where two
/// layers define the same service key or workload uid, the later layer
/// wins (the daemon puts xDS above the config file). Enrolled netns are
/// the union.
#[derive(Clone, Copy)]
pub struct Layers<'a>(pub &'a [&'a Model]);

impl<'a> Layers<'a> {
    /// Effective services, each key once.
    pub fn services(self) -> impl Iterator<Item = (&'a Arc<str>, &'a Service)> {
        let layers = self.0;
        layers.iter().enumerate().flat_map(move |(i, m)| {
            m.services
                .iter()
                .filter(move |(k, _)| !layers[i + 1..].iter().any(|l| l.services.contains_key(*k)))
                .map(|(k, s)| (k, &**s))
        })
    }

    /// Effective workloads, each uid once.
    pub fn workloads(self) -> impl Iterator<Item = &'a Workload> {
        let layers = self.0;
        layers.iter().enumerate().flat_map(move |(i, m)| {
            m.workloads.iter().filter(move |w| {
                !layers[i + 1..]
                    .iter()
                    .any(|l| l.workloads.contains_key(w.uid()))
            })
        })
    }

    /// The effective service for a key.
    pub fn service(self, key: &str) -> Option<&'a Service> {
        self.0
            .iter()
            .rev()
            .find_map(|m| m.services.get(key).map(|s| &**s))
    }

    /// The effective workload for a uid.
    pub fn workload(self, uid: &str) -> Option<&'a Workload> {
        self.0.iter().rev().find_map(|m| m.workloads.get(uid))
    }

    pub fn accelerate(self) -> bool {
        self.0.iter().any(|m| m.accelerate)
    }

    /// A service's traffic settings: the topmost layer's that has some.
    pub fn traffic(self, key: &str) -> Option<&'a TrafficPolicy> {
        self.0.iter().rev().find_map(|m| m.traffic.get(key))
    }

    /// The topmost layer's setting, else the default.
    pub fn accel_queue_limit(self) -> u32 {
        self.0
            .iter()
            .rev()
            .find_map(|m| m.accel_queue_limit)
            .unwrap_or(DEFAULT_ACCEL_QUEUE_LIMIT)
    }

    /// Effective authorization policies, each key once (the later layer
    /// wins).
    pub fn policies(self) -> impl Iterator<Item = &'a crate::authz::Policy> {
        self.policy_arcs().map(|p| &**p)
    }

    /// Every effective policy, in one store (for `applicable`).
    pub fn policy_store(self) -> crate::authz::PolicyStore {
        let mut store = crate::authz::PolicyStore::default();
        for p in self.policy_arcs() {
            store.insert_shared(p.clone());
        }
        store
    }

    /// `policies`, as shared handles.
    pub fn policy_arcs(self) -> impl Iterator<Item = &'a Arc<crate::authz::Policy>> {
        let layers = self.0;
        layers.iter().enumerate().flat_map(move |(i, m)| {
            m.policies.iter_shared().filter(move |p| {
                let key = p.key();
                !layers[i + 1..]
                    .iter()
                    .any(|l| l.policies.get(&key).is_some())
            })
        })
    }

    /// The names of hostname (DNS) workloads, each once.
    pub fn hostnames(self) -> std::collections::BTreeSet<String> {
        self.workloads()
            .filter_map(Workload::hostname)
            .map(str::to_string)
            .collect()
    }

    /// Every enrolled netns's global addresses: the destinations this node
    /// enforces authorization for.
    pub fn enrolled_addresses(self) -> std::collections::HashSet<IpAddr> {
        self.0
            .iter()
            .flat_map(|m| m.enrolled.values())
            .flat_map(|e| e.addrs.iter().map(|a| canonical(*a)))
            .collect()
    }

    pub fn enrolled(self) -> BTreeMap<u64, &'a Enrollment> {
        self.0
            .iter()
            .flat_map(|m| &m.enrolled)
            .map(|(c, e)| (*c, e))
            .collect()
    }

    /// Keys defined by more than one layer (the later one is used).
    pub fn shadowed(self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, m) in self.0.iter().enumerate() {
            for l in &self.0[i + 1..] {
                let s = m.services.keys().filter(|k| l.services.contains_key(*k));
                out.extend(s.map(|k| k.to_string()));
                let w = m.workloads.keys().filter(|k| l.workloads.contains_key(k));
                out.extend(w.map(str::to_string));
            }
        }
        out
    }

    /// Checks each entry and the cross-entry invariants the data path
    /// relies on: one owner per frontend address on a network. For a
    /// single source (a config file), where any problem refuses the file;
    /// the daemon instead admits entries one by one (writer::admit).
    pub fn validate(self) -> Result<(), ModelError> {
        let mut owner: HashMap<(&str, IpAddr), EntryKey> = HashMap::new();
        let mut claim = |network: &'a str, ip: IpAddr, who: EntryKey| match owner
            .entry((network, canonical(ip)))
        {
            std::collections::hash_map::Entry::Occupied(first) if *first.get() != who => {
                Err(ModelError::AddressConflict {
                    address: canonical(ip),
                    first: first.get().to_string(),
                    second: who.to_string(),
                })
            }
            e => {
                e.or_insert(who);
                Ok(())
            }
        };
        for (key, s) in self.services() {
            s.validate()?;
            for a in &s.addresses {
                claim(&a.network, a.address, EntryKey::Service(key.clone()))?;
            }
        }
        for w in self.workloads() {
            w.validate()?;
            if !w.host_network {
                for a in w.addresses.iter() {
                    claim(w.network(), *a, EntryKey::Workload(w.uid().into()))?;
                }
            }
        }
        Ok(())
    }
}
