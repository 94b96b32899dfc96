//! The map writer: the only code that writes the data-path maps.
//!
//! `apply` takes a whole desired `Model`, diffs it against what this writer
//! last wrote, and issues the minimal updates in an order that keeps every
//! state the BPF programs can observe consistent:
//! - a frontend is removed before the service/workload it points at;
//! - backends exist before an endpoint references them;
//! - endpoint indices 1..count always exist: additions are written before
//!   the count grows, and a removal moves the last entry into the hole before
//!   the count shrinks (the programs never see a gap).
//!
//! Re-applying the same model writes nothing.

mod dump;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use libbpf_rs::{MapCore, MapFlags};
use thiserror::Error;

use crate::{
    bpf::{
        backend_value, endpoint_key, endpoint_value, frontend_key, frontend_value, ip4_to_map,
        kmesh_addr, manage_value, port_to_map, service_value, Datapath, MapId, Pod,
        UPSTREAM_SERVICE, UPSTREAM_WORKLOAD,
    },
    model::{HealthStatus, LbMode, Model, ModelError},
};

pub use dump::Dump;

#[derive(Debug, Error)]
pub enum WriterError {
    #[error(transparent)]
    Invalid(#[from] ModelError),
    #[error("map {map} is too small: {needed} entries needed, capacity {capacity} (raise --{flag}); nothing was changed")]
    Capacity {
        map: &'static str,
        needed: usize,
        capacity: u32,
        flag: &'static str,
    },
    #[error("kernel rejected {op} on {map} for {what}: {source}")]
    Kernel {
        op: &'static str,
        map: &'static str,
        what: String,
        source: libbpf_rs::Error,
    },
}

/// Counts of map operations one `apply` issued.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    pub updates: usize,
    pub deletes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Upstream {
    Service(String),
    Workload(String),
}

impl Upstream {
    pub(crate) fn label(&self) -> &str {
        match self {
            Upstream::Service(k) | Upstream::Workload(k) => k,
        }
    }
}

/// Stable u32 ids for services and workloads (one id space: a frontend
/// entry names either). Ids are never reused within a process, so a stale
/// reference can only miss, never alias another upstream.
#[derive(Default)]
struct Ids {
    by_upstream: HashMap<Upstream, u32>,
    names: HashMap<u32, Upstream>,
    next: u32,
}

impl Ids {
    fn get_or_alloc(&mut self, u: Upstream) -> u32 {
        if let Some(id) = self.by_upstream.get(&u) {
            return *id;
        }
        self.next += 1;
        let id = self.next;
        self.by_upstream.insert(u.clone(), id);
        self.names.insert(id, u);
        id
    }

    fn release(&mut self, id: u32) {
        if let Some(u) = self.names.remove(&id) {
            self.by_upstream.remove(&u);
        }
    }
}

/// What the maps hold, as last written by this writer.
#[derive(Default)]
struct Written {
    frontends: HashMap<IpAddr, frontend_value>,
    services: HashMap<u32, service_value>,
    /// (service id, priority) → backend ids; position i is index i+1.
    endpoints: HashMap<(u32, u32), Vec<u32>>,
    backends: HashMap<u32, backend_value>,
    manage: BTreeSet<u64>,
}

/// The desired map contents for a model, before endpoint ordering.
struct Desired {
    frontends: HashMap<IpAddr, frontend_value>,
    /// Service values without endpoint counts (filled in during apply).
    services: HashMap<u32, service_value>,
    endpoints: HashMap<(u32, u32), BTreeSet<u32>>,
    backends: HashMap<u32, backend_value>,
    manage: BTreeSet<u64>,
}

pub struct MapWriter {
    dp: Datapath,
    ids: Ids,
    written: Written,
    enroll_sources: HashMap<u64, String>,
}

fn same<T: Pod>(a: &T, b: &T) -> bool {
    a.as_bytes() == b.as_bytes()
}

impl MapWriter {
    pub fn new(dp: Datapath) -> Self {
        MapWriter {
            dp,
            ids: Ids::default(),
            written: Written::default(),
            enroll_sources: HashMap::new(),
        }
    }

    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    /// Detaches (unless `keep_attached`) and unpins; see Datapath::shutdown.
    pub fn shutdown(&mut self, keep_attached: bool) {
        self.dp.shutdown(keep_attached);
    }

    fn desired(&mut self, model: &Model) -> Desired {
        let mut d = Desired {
            frontends: HashMap::new(),
            services: HashMap::new(),
            endpoints: HashMap::new(),
            backends: HashMap::new(),
            manage: model.enrolled.keys().copied().collect(),
        };
        for (key, svc) in &model.services {
            let id = self.ids.get_or_alloc(Upstream::Service(key.clone()));
            let mut v = service_value {
                lb_policy: match svc.load_balancing.mode {
                    LbMode::Random => 0,
                    LbMode::Strict => 1,
                    LbMode::Failover => 2,
                },
                ..Default::default()
            };
            for (i, p) in svc.ports.iter().enumerate() {
                v.service_port[i] = port_to_map(p.service_port);
                v.target_port[i] = if p.target_port == 0 {
                    0
                } else {
                    port_to_map(p.target_port)
                };
            }
            d.services.insert(id, v);
            for a in &svc.addresses {
                d.frontends.insert(
                    a.address,
                    frontend_value {
                        upstream_id: id,
                        kind: UPSTREAM_SERVICE,
                    },
                );
            }
        }
        for (uid, w) in &model.workloads {
            let id = self.ids.get_or_alloc(Upstream::Workload(uid.clone()));
            let mut b = backend_value::default();
            for a in &w.addresses {
                match a {
                    IpAddr::V4(v4) => {
                        b.has_ip4 = 1;
                        b.ip4 = ip4_to_map(*v4);
                    }
                    IpAddr::V6(_) => {
                        b.has_ip6 = 1;
                        b.ip6 = kmesh_addr::from_ip(*a);
                    }
                }
                d.frontends.insert(
                    *a,
                    frontend_value {
                        upstream_id: id,
                        kind: UPSTREAM_WORKLOAD,
                    },
                );
            }
            d.backends.insert(id, b);
            // Unhealthy workloads stay reachable directly but take no new
            // service traffic.
            if w.status != HealthStatus::Healthy {
                continue;
            }
            for skey in w.services.keys() {
                if !model.services.contains_key(skey) {
                    continue; // xDS may send a workload before its service
                }
                let sid = self.ids.get_or_alloc(Upstream::Service(skey.clone()));
                d.endpoints.entry((sid, 0)).or_default().insert(id);
            }
        }
        d
    }

    fn check_capacity(&self, d: &Desired) -> Result<(), WriterError> {
        let w = &self.written;
        let union = |new: usize, old_only: usize| new + old_only;
        let backends = union(
            d.backends.len(),
            w.backends
                .keys()
                .filter(|k| !d.backends.contains_key(k))
                .count(),
        );
        let services = union(
            d.services.len(),
            w.services
                .keys()
                .filter(|k| !d.services.contains_key(k))
                .count(),
        );
        // Lists shrink after they grow, and lists of removed services go last.
        let mut endpoints = 0;
        for (k, new) in &d.endpoints {
            endpoints += new.len().max(w.endpoints.get(k).map_or(0, Vec::len));
        }
        for (k, old) in &w.endpoints {
            if !d.endpoints.contains_key(k) {
                endpoints += old.len();
            }
        }
        let manage = union(
            d.manage.len(),
            w.manage.iter().filter(|k| !d.manage.contains(k)).count(),
        );
        for (id, needed, flag) in [
            (MapId::Frontend, d.frontends.len(), "max-frontends"),
            (MapId::Service, services, "max-services"),
            (MapId::Endpoint, endpoints, "max-endpoints"),
            (MapId::Backend, backends, "max-backends"),
            (MapId::Manage, manage, "max-enrolled-netns"),
        ] {
            let capacity = self.dp.capacity(id);
            if needed > capacity as usize {
                return Err(WriterError::Capacity {
                    map: id.name(),
                    needed,
                    capacity,
                    flag,
                });
            }
        }
        Ok(())
    }

    /// Makes the maps hold exactly `model`. On a validation or capacity
    /// error nothing is written. A kernel error part-way leaves the maps
    /// consistent (the ordering above) and the next apply converges.
    pub fn apply(&mut self, model: &Model) -> Result<ApplyStats, WriterError> {
        model.validate()?;
        let known_before: HashSet<u32> = self.ids.names.keys().copied().collect();
        let d = self.desired(model);
        if let Err(e) = self.check_capacity(&d) {
            // Forget ids allocated for entries that were never written.
            for id in self.ids.names.keys().copied().collect::<Vec<_>>() {
                if !known_before.contains(&id) {
                    self.ids.release(id);
                }
            }
            return Err(e);
        }
        self.enroll_sources = model
            .enrolled
            .iter()
            .map(|(c, e)| (*c, e.source.clone()))
            .collect();
        let mut st = ApplyStats::default();
        let r = self.write(&d, &mut st);
        // Ids no longer referenced anywhere can go.
        let live: HashSet<u32> = self
            .written
            .services
            .keys()
            .chain(self.written.backends.keys())
            .copied()
            .collect();
        let dead: Vec<u32> = self
            .ids
            .names
            .keys()
            .filter(|id| {
                !live.contains(id) && !d.services.contains_key(id) && !d.backends.contains_key(id)
            })
            .copied()
            .collect();
        for id in dead {
            self.ids.release(id);
        }
        r.map(|()| st)
    }

    fn write(&mut self, d: &Desired, st: &mut ApplyStats) -> Result<(), WriterError> {
        // 1. Stop routing to anything going away.
        let stale: Vec<IpAddr> = self
            .written
            .frontends
            .keys()
            .filter(|ip| !d.frontends.contains_key(ip))
            .copied()
            .collect();
        for ip in stale {
            self.delete(
                MapId::Frontend,
                &frontend_key {
                    addr: kmesh_addr::from_ip(ip),
                },
                &ip.to_string(),
                st,
            )?;
            self.written.frontends.remove(&ip);
        }
        // 2. Enrollment and backends.
        for cookie in d.manage.difference(&self.written.manage.clone()) {
            self.update(
                MapId::Manage,
                cookie,
                &manage_value { enrolled: 1 },
                &format!("netns cookie {cookie}"),
                st,
            )?;
            self.written.manage.insert(*cookie);
        }
        for (id, b) in &d.backends {
            if self
                .written
                .backends
                .get(id)
                .is_some_and(|old| same(old, b))
            {
                continue;
            }
            self.update(MapId::Backend, id, b, &self.name(*id), st)?;
            self.written.backends.insert(*id, *b);
        }
        // 3. Endpoint lists and services (counts follow the lists).
        let mut keys: BTreeSet<(u32, u32)> = d.endpoints.keys().copied().collect();
        keys.extend(
            self.written
                .endpoints
                .keys()
                .filter(|(s, _)| d.services.contains_key(s)),
        );
        let mut counts: HashMap<u32, [u32; crate::bpf::MAX_PRIO]> = HashMap::new();
        for key in keys {
            let want = d.endpoints.get(&key).cloned().unwrap_or_default();
            let len = self.sync_endpoints(key, &want, st)?;
            counts.entry(key.0).or_default()[key.1 as usize] = len;
        }
        for (id, v) in &d.services {
            let mut v = *v;
            v.prio_endpoint_count = counts.get(id).copied().unwrap_or_default();
            if !self
                .written
                .services
                .get(id)
                .is_some_and(|old| same(old, &v))
            {
                self.update(MapId::Service, id, &v, &self.name(*id), st)?;
                self.written.services.insert(*id, v);
            }
            if let Some(c) = counts.get(id) {
                self.trim_endpoints(*id, c, st)?;
            }
        }
        // 4. New and changed frontends, now that their targets exist.
        for (ip, v) in &d.frontends {
            if self
                .written
                .frontends
                .get(ip)
                .is_some_and(|old| same(old, v))
            {
                continue;
            }
            self.update(
                MapId::Frontend,
                &frontend_key {
                    addr: kmesh_addr::from_ip(*ip),
                },
                v,
                &ip.to_string(),
                st,
            )?;
            self.written.frontends.insert(*ip, *v);
        }
        // 5. Removed services (with their endpoints), backends, enrollments.
        let gone: Vec<u32> = self
            .written
            .services
            .keys()
            .filter(|id| !d.services.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            let what = self.name(id);
            self.delete(MapId::Service, &id, &what, st)?;
            self.written.services.remove(&id);
            let lists: Vec<(u32, u32)> = self
                .written
                .endpoints
                .keys()
                .filter(|(s, _)| *s == id)
                .copied()
                .collect();
            for key in lists {
                let n = self.written.endpoints[&key].len() as u32;
                for index in (1..=n).rev() {
                    self.delete(
                        MapId::Endpoint,
                        &endpoint_key {
                            service_id: key.0,
                            prio: key.1,
                            index,
                        },
                        &what,
                        st,
                    )?;
                    self.written.endpoints.get_mut(&key).expect("listed").pop();
                }
                self.written.endpoints.remove(&key);
            }
        }
        let gone: Vec<u32> = self
            .written
            .backends
            .keys()
            .filter(|id| !d.backends.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.delete(MapId::Backend, &id, &self.name(id), st)?;
            self.written.backends.remove(&id);
        }
        let gone: Vec<u64> = self.written.manage.difference(&d.manage).copied().collect();
        for cookie in gone {
            self.delete(
                MapId::Manage,
                &cookie,
                &format!("netns cookie {cookie}"),
                st,
            )?;
            self.written.manage.remove(&cookie);
        }
        Ok(())
    }

    /// Brings one (service, priority) list to the set `want` without gaps:
    /// removals swap the last entry into the hole, additions append. Entries
    /// past the new length are deleted later by `trim_endpoints`, after the
    /// service's count has shrunk. Returns the new length.
    fn sync_endpoints(
        &mut self,
        key: (u32, u32),
        want: &BTreeSet<u32>,
        st: &mut ApplyStats,
    ) -> Result<u32, WriterError> {
        let old = self
            .written
            .endpoints
            .get(&key)
            .cloned()
            .unwrap_or_default();
        let mut list = old.clone();
        let mut i = 0;
        while i < list.len() {
            if want.contains(&list[i]) {
                i += 1;
            } else {
                list.swap_remove(i);
            }
        }
        let present: HashSet<u32> = list.iter().copied().collect();
        list.extend(want.iter().filter(|b| !present.contains(b)));
        let what = self.name(key.0);
        for (pos, backend) in list.iter().enumerate() {
            if old.get(pos) == Some(backend) {
                continue;
            }
            let k = endpoint_key {
                service_id: key.0,
                prio: key.1,
                index: pos as u32 + 1,
            };
            self.update(
                MapId::Endpoint,
                &k,
                &endpoint_value {
                    backend_id: *backend,
                },
                &what,
                st,
            )?;
        }
        // Remember the longer of the two: indices beyond the new length are
        // still in the map until trimmed.
        let mut tracked = list.clone();
        if old.len() > list.len() {
            tracked.extend_from_slice(&old[list.len()..]);
        }
        let len = list.len() as u32;
        self.written.endpoints.insert(key, tracked);
        Ok(len)
    }

    /// Deletes endpoint indices beyond each list's count, once the service
    /// value no longer covers them.
    fn trim_endpoints(
        &mut self,
        service: u32,
        counts: &[u32; crate::bpf::MAX_PRIO],
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        let what = self.name(service);
        for (prio, &count) in counts.iter().enumerate() {
            let key = (service, prio as u32);
            let Some(tracked) = self.written.endpoints.get(&key) else {
                continue;
            };
            let tracked_len = tracked.len() as u32;
            for index in (count + 1..=tracked_len).rev() {
                let k = endpoint_key {
                    service_id: service,
                    prio: prio as u32,
                    index,
                };
                self.delete(MapId::Endpoint, &k, &what, st)?;
                self.written.endpoints.get_mut(&key).expect("tracked").pop();
            }
            if count == 0 {
                self.written.endpoints.remove(&key);
            }
        }
        Ok(())
    }

    fn name(&self, id: u32) -> String {
        self.ids
            .names
            .get(&id)
            .map_or_else(|| format!("id {id}"), |u| u.label().to_string())
    }

    fn update<K: Pod, V: Pod>(
        &self,
        map: MapId,
        key: &K,
        value: &V,
        what: &str,
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        self.dp
            .map(map)
            .update(key.as_bytes(), value.as_bytes(), MapFlags::ANY)
            .map_err(|source| WriterError::Kernel {
                op: "update",
                map: map.name(),
                what: what.to_string(),
                source,
            })?;
        st.updates += 1;
        Ok(())
    }

    fn delete<K: Pod>(
        &self,
        map: MapId,
        key: &K,
        what: &str,
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        match self.dp.map(map).delete(key.as_bytes()) {
            Ok(()) => {}
            // Already gone (e.g. a retry after a partial failure): fine.
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(WriterError::Kernel {
                    op: "delete",
                    map: map.name(),
                    what: what.to_string(),
                    source,
                })
            }
        }
        st.deletes += 1;
        Ok(())
    }

    /// Name of an upstream id, if this writer allocated it.
    pub(crate) fn upstream(&self, id: u32) -> Option<&Upstream> {
        self.ids.names.get(&id)
    }

    pub(crate) fn enroll_source(&self, cookie: u64) -> Option<&str> {
        self.enroll_sources.get(&cookie).map(String::as_str)
    }
}

#[cfg(test)]
mod tests;
