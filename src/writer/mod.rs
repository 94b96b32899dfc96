//! The map writer: the only code that writes the data-path maps.
//!
//! `apply` takes a whole desired `Model`, diffs it against what this writer
//! last wrote, and issues the minimal updates in an order that keeps every
//! state the BPF programs can observe consistent:
//! - a VIP or workload address is removed before anything it leads to;
//! - endpoint indices 1..count always exist, and the lists change without
//!   needing more room than the larger of the old and new state (lists.rs);
//! - entries that cannot go in (invalid, an address another entry holds,
//!   no room) are left out one by one and reported; the rest applies
//!   (admit.rs);
//! - the layout is denormalized (see bpf/include/kmesh.h): every VIP entry
//!   carries its whole service, every endpoint entry its backend's
//!   addresses, so a service change rewrites all its VIPs and a workload
//!   address change rewrites all its endpoint entries.
//!
//! Re-applying the same model writes nothing.

mod admit;
mod authz;
mod clock;
mod delta;
mod desired;
mod dump;
mod limits; // traffic:
mod lists;
mod weights; // traffic:
mod write;
mod written;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use libbpf_rs::{MapCore, MapFlags};
use thiserror::Error;

use crate::{
    bpf::{port_key, port_to_map, BpfError, Datapath, MapId, Pod},
    model::{Layers, LocalNode, Model, ModelError, ResolvedHosts},
};
use clock::StageClock;
use delta::{Cache, Scope};
use desired::IdSpace;
use written::Written;

pub use admit::Rejected;
pub use dump::Dump;
pub use limits::TrafficDump; // traffic:

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
    #[error("{0}; nothing was changed")]
    Attach(#[from] BpfError),
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

/// What one `apply` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub stats: ApplyStats,
    /// Entries left out of the maps, each with the reason.
    pub rejected: Vec<Rejected>,
    /// What was held back without refusing an entry (an older DNS answer
    /// kept because the newest did not fit).
    pub notes: Vec<String>,
}

pub struct MapWriter {
    dp: Datapath,
    service_ids: IdSpace,
    /// (workload id, k) → the id of a DNS workload's k-th endpoint (k ≥ 1;
    /// the first is the workload's own id).
    extra_ids: HashMap<(u32, u32), u32>,
    written: Written,
    enroll_sources: HashMap<u64, String>,
    local: LocalNode,
    resolved: ResolvedHosts,
    /// Keyed per process, so no input can aim for a collision.
    fingerprint: std::hash::RandomState,
    /// As of the last successful apply, for the dump.
    passthrough: Vec<(Arc<str>, Vec<IpAddr>)>,
    dns_hosts: BTreeSet<String>,
    /// Hostname → the answer its endpoints carry, as last written.
    answered: HashMap<Box<str>, Vec<IpAddr>>,
    /// DNS answers already logged as unusable.
    refused_answers: HashSet<(Box<str>, IpAddr)>,
    /// As of the last successful apply, for the dump.
    last: ApplyReport,
    authz: authz::AuthzState,
    /// The desired state of the last apply, for the next incremental one
    /// (delta.rs); None after anything that changes it otherwise.
    cache: Option<Cache>,
    traffic: weights::TrafficState, // traffic:
}

fn own_port_key(service_id: u32, workload_id: u32, port: u16) -> port_key {
    port_key {
        service_id,
        workload_id,
        service_port: port_to_map(port),
    }
}

fn same<T: Pod>(a: &T, b: &T) -> bool {
    a.as_bytes() == b.as_bytes()
}

impl MapWriter {
    pub fn new(dp: Datapath) -> Self {
        MapWriter {
            dp,
            service_ids: IdSpace::default(),
            extra_ids: HashMap::new(),
            written: Written::default(),
            enroll_sources: HashMap::new(),
            local: LocalNode::default(),
            resolved: ResolvedHosts::new(),
            fingerprint: std::hash::RandomState::new(),
            passthrough: Vec::new(),
            dns_hosts: BTreeSet::new(),
            answered: HashMap::new(),
            refused_answers: HashSet::new(),
            last: ApplyReport::default(),
            authz: authz::AuthzState::default(),
            cache: None,
            traffic: Default::default(), // traffic:
        }
    }

    /// The resolver's current answers for hostname workloads; takes effect
    /// at the next apply.
    pub fn set_resolved(&mut self, resolved: ResolvedHosts) {
        self.cache = None;
        self.resolved = resolved;
    }

    /// This node's placement, for locality-aware load balancing; takes
    /// effect at the next apply.
    pub fn set_local_node(&mut self, local: LocalNode) {
        self.cache = None;
        self.local = local;
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

    /// Makes the maps hold `model`, less the entries that cannot go in
    /// (reported, each named). A kernel error part-way leaves the maps
    /// consistent (the ordering above) and the next apply converges.
    pub fn apply(&mut self, model: &Model) -> Result<ApplyReport, WriterError> {
        self.apply_layers(Layers(&[model]))
    }

    /// The entries an apply of `model` would leave out as invalid or for
    /// an address another entry holds (room is not checked); writes
    /// nothing.
    pub fn preview(&mut self, model: Layers) -> Vec<Rejected> {
        self.admit(model).rejected
    }

    /// `apply` for several sources at once (see model::Layers).
    pub fn apply_layers(&mut self, model: Layers) -> Result<ApplyReport, WriterError> {
        // Where an apply's time goes, stage by stage (debug log): the
        // input to making each stage proportional to the change.
        let mut clock = StageClock::new();
        self.cache = None;
        let mut a = self.admit(model);
        clock.lap("admit");
        let mut d = self.desired(model, &a);
        clock.lap("desired");
        // Each round leaves out at least one more entry, so this ends.
        let mut fitted = self.fit(&d, model, &mut a);
        while let Ok(true) = fitted {
            d = self.desired(model, &a);
            fitted = self.fit(&d, model, &mut a);
        }
        clock.lap("fit");
        let mut st = ApplyStats::default();
        let compiled = self.compile_authz(model, &d.identities);
        clock.lap("authz");
        let result = fitted.and_then(|_| {
            // Before any entry that routes to a waypoint or turns on
            // acceleration is visible to connect().
            if d.needs_sockops() {
                self.dp.want_sockops()?;
            }
            self.enroll_sources = model
                .enrolled()
                .into_iter()
                .map(|(c, e)| (c, e.source.clone()))
                .collect();
            a.notes.extend(self.sync_netns());
            self.write(&d, Some(&compiled), model, &mut st, None)
        });
        clock.lap("write");
        // Ids neither wanted nor still referenced by a map entry go.
        let w = &self.written;
        let svc_live: HashSet<u32> = w
            .endpoints
            .keys()
            .map(|k| k.0)
            .chain(w.vips.values().map(|v| v.0))
            .chain(w.ports.keys().map(|k| k.0))
            .collect();
        let wl_live: HashSet<u32> = w
            .endpoints
            .values()
            .flatten()
            .copied()
            .chain(w.workload_ips.values().copied())
            .chain(w.ports.keys().map(|k| k.1))
            .collect();
        self.service_ids.retain(|id| {
            svc_live.contains(&id) || (result.is_ok() && d.services.contains_key(&id))
        });
        self.extra_ids.retain(|_, id| {
            wl_live.contains(id) || (result.is_ok() && d.backends.contains_key(id))
        });
        clock.lap("ids");
        result?;
        self.passthrough = std::mem::take(&mut d.passthrough);
        self.dns_hosts = model.hostnames();
        self.answered = std::mem::take(&mut d.answers);
        // Each refusal is logged when it starts and when it ends, not at
        // every apply it lasts through.
        for r in a
            .rejected
            .iter()
            .filter(|r| !self.last.rejected.contains(r))
        {
            tracing::warn!("left out {}: {}", r.entry, r.reason);
        }
        for r in &self.last.rejected {
            if !a.rejected.iter().any(|x| x.entry == r.entry) {
                tracing::info!("{} is no longer left out", r.entry);
            }
        }
        for n in a.notes.iter().filter(|n| !self.last.notes.contains(n)) {
            tracing::warn!("{n}");
        }
        a.notes.extend(compiled.notes);
        if a.notes.is_empty() {
            self.cache = Some(Cache::new(d, model));
        }
        clock.lap("report");
        tracing::debug!("apply stages: {clock}");
        self.last = ApplyReport {
            stats: st,
            rejected: a.rejected,
            notes: a.notes,
        };
        Ok(self.last.clone())
    }

    /// Name of a service id, if this writer allocated it.
    pub(crate) fn service_key(&self, id: u32) -> Option<&str> {
        self.service_ids.key(id)
    }

    /// Uid of a workload id in `model` ("uid#k" for a DNS workload's k-th
    /// endpoint). A scan: for error messages and dumps only.
    pub(crate) fn workload_uid(&self, model: Layers, id: u32) -> Option<String> {
        let (base, k) = self
            .extra_ids
            .iter()
            .find(|(_, v)| **v == id)
            .map_or((id, 0), |(k, _)| *k);
        let uid = model.workloads().find(|w| w.id() == base)?.uid();
        Some(match k {
            0 => uid.to_string(),
            k => format!("{uid}#{k}"),
        })
    }

    /// Fingerprint of a map value: enough to see that it changed, at 8
    /// bytes instead of its size.
    fn print<T: Pod>(&self, v: &T) -> u64 {
        std::hash::BuildHasher::hash_one(&self.fingerprint, v.as_bytes())
    }

    fn service_name(&self, id: u32) -> String {
        self.service_key(id)
            .map_or_else(|| format!("service id {id}"), str::to_string)
    }

    fn workload_name(&self, model: Layers, id: u32) -> String {
        self.workload_uid(model, id)
            .unwrap_or_else(|| format!("workload id {id}"))
    }

    /// Puts the authorization program on each enrolled netns, once the
    /// data path is attached (see Datapath::sync_netns_links); returns
    /// the netns it could not go on.
    pub fn sync_netns(&mut self) -> Vec<String> {
        if !self.dp.attached().contains(&"connect4") {
            return Vec::new();
        }
        let enrolled = self
            .enroll_sources
            .iter()
            .map(|(c, s)| (*c, s.clone()))
            .collect();
        let errors = self.dp.sync_netns_links(&enrolled);
        for e in errors.iter().filter(|e| !self.last.notes.contains(e)) {
            tracing::warn!("{e}");
        }
        errors
    }

    pub(crate) fn enroll_source(&self, cookie: u64) -> Option<&str> {
        self.enroll_sources.get(&cookie).map(String::as_str)
    }

    fn update<K: Pod, V: Pod>(
        &self,
        map: MapId,
        key: &K,
        value: &V,
        what: impl FnOnce() -> String,
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        put(&self.dp, map, key, value, what, st)
    }

    fn delete<K: Pod>(
        &self,
        map: MapId,
        key: &K,
        what: impl FnOnce() -> String,
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        remove(&self.dp, map, key, what, st)
    }
}

/// One map update; `what` names the entry in an error (only called on
/// one).
fn put<K: Pod, V: Pod>(
    dp: &Datapath,
    map: MapId,
    key: &K,
    value: &V,
    what: impl FnOnce() -> String,
    st: &mut ApplyStats,
) -> Result<(), WriterError> {
    dp.map(map)
        .update(key.as_bytes(), value.as_bytes(), MapFlags::ANY)
        .map_err(|source| WriterError::Kernel {
            op: "update",
            map: map.name(),
            what: what(),
            source,
        })?;
    st.updates += 1;
    Ok(())
}

fn remove<K: Pod>(
    dp: &Datapath,
    map: MapId,
    key: &K,
    what: impl FnOnce() -> String,
    st: &mut ApplyStats,
) -> Result<(), WriterError> {
    match dp.map(map).delete(key.as_bytes()) {
        Ok(()) => {}
        // Already gone (e.g. a retry after a partial failure): fine.
        Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(WriterError::Kernel {
                op: "delete",
                map: map.name(),
                what: what(),
                source,
            })
        }
    }
    st.deletes += 1;
    Ok(())
}

#[cfg(test)]
mod prop_authz;
#[cfg(test)]
mod prop_delta;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod robust_tests;
#[cfg(test)]
mod tests;
