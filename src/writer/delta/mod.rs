//! Incremental apply: a source says which services and workloads it
//! changed, with the versions they replaced (model::Changes), and the
//! writer updates the desired state it kept from the last apply and the
//! map entries of just those (`write` with a `Scope`). One pod changing
//! at 100k workloads costs its own few map writes, not a recomputation
//! of the node's whole state (issue: a busy cluster's pushes otherwise
//! keep a core busy converting nothing).
//!
//! The full apply stays the reference: whenever a change is one the
//! incremental path does not do exactly as the full apply would, it
//! declines and the caller applies everything. It declines when:
//! - the last apply left an entry out (a change may let it in), or a
//!   change would be left out (invalid, or an address another entry
//!   holds), or the result does not fit the maps (the full apply picks
//!   what to leave out);
//! - authorization policies exist (identities and policy sets are
//!   compiled for the whole node);
//! - a changed entry is a hostname (DNS) workload, a weighted workload or
//!   a passthrough service, or is defined by more than one source;
//! - a change touches a service with a traffic policy (split, circuit
//!   breaker, rate limit) or with weighted endpoints;
//! - a service changes its load balancing or ports, or appears while
//!   workloads already name it (its members would have to be found among
//!   all workloads), or its first address changes while some waypoint
//!   names a service.
//!
//! The property tests check that both paths leave the same maps.

mod changed;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use self::changed::Change;
use super::{
    admit::{Admission, NO_ROOM},
    desired::{Desired, ServiceEntry},
    written::Written,
    ApplyReport, ApplyStats, MapWriter, WriterError,
};
use crate::{
    bpf::{MapId, MAX_PRIO},
    model::{canonical, Changes, Layers, Service, Waypoint, WaypointTarget, Workload},
};

/// What the last apply computed, kept for the next incremental one.
pub(super) struct Cache {
    /// The last apply's desired state less what the maps (and `Written`)
    /// hold already: during an apply, the entries of the services and
    /// workloads it touches (`open`).
    pub(super) d: Desired,
    /// Services with VIP entries, and those of them with weighted
    /// endpoints. Their values are computed again from the model when a
    /// change touches them: 10k of them kept would cost ~3 MB.
    routed: HashSet<u32>,
    weighted: HashSet<u32>,
    /// Service key → how many workloads name it (routable or not).
    refs: HashMap<Arc<str>, u32>,
    /// Services and workloads whose waypoint is a service: their entries
    /// carry that service's first VIP.
    service_waypoints: usize,
    vips: usize,
    endpoints: usize,
}

fn names_service(wp: Option<&Waypoint>) -> bool {
    wp.is_some_and(|w| matches!(w.target, WaypointTarget::Service(_)))
}

impl Cache {
    pub(super) fn new(d: Desired, model: Layers) -> Cache {
        let mut refs: HashMap<Arc<str>, u32> = HashMap::new();
        let mut service_waypoints = 0;
        for (_, s) in model.services() {
            service_waypoints += usize::from(names_service(s.waypoint.as_ref()));
        }
        for w in model.workloads() {
            for r in w.services.iter() {
                *refs.entry(r.key.clone()).or_default() += 1;
            }
            service_waypoints += usize::from(names_service(w.waypoint()));
        }
        let vips = d.services.values().map(|s| s.1.len()).sum();
        let endpoints = d.endpoints.values().map(|s| s.len()).sum();
        let routed = d.services.keys().copied().collect();
        let weighted = d
            .services
            .iter()
            .filter(|(_, (v, _))| v.weighted_prios != 0)
            .map(|(id, _)| *id)
            .collect();
        // What the maps (and `Written`) hold already is not kept twice:
        // the endpoint sets of the services a change touches are read back
        // from the written lists, and only the changed workloads' addresses
        // and endpoint values are computed (100k of each would cost ~15 MB).
        let d = Desired {
            services: HashMap::new(),
            workload_ips: HashMap::new(),
            endpoints: HashMap::new(),
            backends: HashMap::new(),
            ..d
        };
        Cache {
            d,
            routed,
            weighted,
            refs,
            service_waypoints,
            vips,
            endpoints,
        }
    }

    fn unref(&mut self, key: &Arc<str>) {
        if let Some(n) = self.refs.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(key);
            }
        }
    }

    /// Drops what `open` and the changed workloads put in.
    fn close(&mut self) {
        self.d.services = HashMap::new();
        self.d.endpoints = HashMap::new();
        self.d.workload_ips = HashMap::new();
        self.d.backends = HashMap::new();
    }

    /// Endpoint entries the lists of `sid` hold.
    fn members(&self, sid: u32) -> usize {
        (0..MAX_PRIO as u32)
            .filter_map(|p| self.d.endpoints.get(&(sid, p)))
            .map(|s| s.len())
            .sum()
    }
}

/// The entries an incremental apply looks at (see `MapWriter::write`).
#[derive(Default)]
pub(super) struct Scope {
    /// Services whose VIP entries or endpoint lists may change.
    pub(super) sids: BTreeSet<u32>,
    /// VIPs the changed services had.
    old_vips: Vec<IpAddr>,
    /// Addresses the changed workloads had or have.
    pub(super) ips: Vec<IpAddr>,
    /// Endpoint ids the changed workloads had or have.
    pub(super) wids: Vec<u32>,
    /// Own-port keys the changed workloads had or have.
    pub(super) ports: Vec<(u32, u32, u16)>,
}

impl Scope {
    /// Of the VIPs the changed services had, those the maps hold and `d`
    /// no longer routes. (A VIP has one holder, and only a changed service
    /// can have given one up.)
    pub(super) fn stale_vips(&self, d: &Desired, written: &Written) -> Vec<IpAddr> {
        let wanted: HashSet<&IpAddr> = self
            .sids
            .iter()
            .filter_map(|s| d.services.get(s))
            .flat_map(|(_, vips)| vips)
            .collect();
        let mut out: Vec<IpAddr> = self
            .old_vips
            .iter()
            .filter(|ip| written.vips.get(ip).is_some() && !wanted.contains(ip))
            .copied()
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl MapWriter {
    /// Applies `changes` to the maps in proportion to their size, when the
    /// maps hold `model` less those changes; None when this cannot be
    /// done exactly as a full apply would (see the module comment): the
    /// caller then applies the whole model.
    pub fn apply_changes(
        &mut self,
        model: Layers,
        changes: &Changes,
    ) -> Option<Result<ApplyReport, WriterError>> {
        // Taken: a failure or a decline leaves no cache, so the next apply
        // is a full one, which makes a new one.
        let decline = |why: &str| {
            tracing::debug!("incremental apply declined ({why}): applying everything");
            None
        };
        let Some(mut cache) = self.cache.take() else {
            return decline("no state kept from the last apply");
        };
        if changes.whole {
            return decline("not tracked one by one");
        }
        if !self.last.notes.is_empty() {
            return decline("the last apply kept an older DNS answer");
        }
        if self
            .last
            .rejected
            .iter()
            .any(|r| r.reason.starts_with(NO_ROOM))
        {
            return decline("the last apply left entries out for want of room");
        }
        if model.policies().next().is_some() {
            return decline("authorization policies");
        }
        let (services, workloads) = match self.changed(model, changes, &cache) {
            Ok(c) => c,
            Err(why) => return decline(why),
        };
        let scope = match self.update_cache(&mut cache, model, &services, &workloads) {
            Ok(s) => s,
            Err(why) => return decline(why),
        };
        // A weighted list's shares depend on all its members; a limit's
        // counters on every limited service (weights.rs, limits.rs).
        let traffic = scope.sids.iter().any(|s| {
            cache.weighted.contains(s)
                || cache
                    .d
                    .services
                    .get(s)
                    .is_some_and(|(v, _)| v.max_connections != 0 || v.rl_max_tokens != 0)
        });
        if traffic {
            return decline("a service with weighted endpoints or limits");
        }
        // The same room as the full apply needs (admit.rs, `growth`).
        // The cache holds only the changed workloads' addresses: the
        // others are counted in what was written.
        let mut workload_ips = self.written.workload_ips.len();
        let touched: HashSet<&IpAddr> = scope.ips.iter().collect();
        for ip in touched {
            let had = self.written.workload_ips.get(ip).is_some();
            match (had, cache.d.workload_ips.contains_key(ip)) {
                (true, false) => workload_ips -= 1,
                (false, true) => workload_ips += 1,
                _ => {}
            }
        }
        let stale_ports = scope
            .ports
            .iter()
            .filter(|k| !cache.d.ports.contains_key(k) && self.written.ports.contains_key(k))
            .count();
        for (map, needed) in [
            (MapId::Vip, cache.vips),
            (MapId::Workload, workload_ips),
            (MapId::Endpoint, cache.endpoints),
            (MapId::Port, cache.d.ports.len() + stale_ports),
        ] {
            if needed > self.dp.capacity(map) as usize {
                return decline(map.name());
            }
        }
        let mut st = ApplyStats::default();
        let result = (|| {
            let waypoints = services
                .iter()
                .any(|c| c.new.is_some_and(|s| s.waypoint.is_some()))
                || workloads
                    .iter()
                    .any(|c| c.new.is_some_and(|w| w.waypoint().is_some()));
            if waypoints {
                self.dp.want_sockops()?;
            }
            self.write(&cache.d, None, model, &mut st, Some(&scope))
        })();
        if let Err(e) = result {
            return Some(Err(e));
        }
        cache.close();
        // Ids of services gone from the maps go, as after a full apply.
        for c in &services {
            if let Some(&id) = self.service_ids.by_key.get(c.key) {
                let live = cache.routed.contains(&id)
                    || (0..MAX_PRIO as u32).any(|p| self.written.endpoints.contains_key(&(id, p)));
                if !live {
                    self.service_ids.by_key.remove(c.key);
                }
            }
        }
        self.cache = Some(cache);
        self.last = ApplyReport {
            stats: st,
            // What was left out stays out: nothing it needs changed.
            rejected: std::mem::take(&mut self.last.rejected),
            notes: Vec::new(),
        };
        Some(Ok(self.last.clone()))
    }

    /// Takes the changed entries' old contributions out of the cached
    /// desired state and puts their new ones in; returns what the maps
    /// must be brought to. An error: the change turned out not to be for
    /// the incremental path (the cache is then dropped).
    fn update_cache(
        &mut self,
        cache: &mut Cache,
        model: Layers,
        services: &[Change<Service>],
        workloads: &[Change<Workload>],
    ) -> Result<Scope, &'static str> {
        let mut scope = Scope::default();
        for c in services {
            cache.service_waypoints -=
                usize::from(names_service(c.old.and_then(|s| s.waypoint.as_ref())));
            cache.service_waypoints +=
                usize::from(names_service(c.new.and_then(|s| s.waypoint.as_ref())));
            let old = self.service_ids.by_key.get(c.key).copied();
            let key: Arc<str> = match self.service_ids.by_key.get_key_value(c.key) {
                Some((k, _)) => k.clone(),
                None => c.key.into(),
            };
            if let Some(id) = old.filter(|id| cache.routed.remove(id)) {
                if cache.weighted.contains(&id) {
                    return Err("a service with weighted endpoints or limits");
                }
                // Its VIPs as written: the old version's (a routed service
                // always has one, see `changed`).
                cache.d.services.remove(&id);
                if let Some(ServiceEntry::Routed(_, _, vips)) =
                    c.old.map(|s| self.service_entry(&key, s, model))
                {
                    cache.vips -= vips.len();
                    scope.old_vips.extend(vips);
                }
            }
            let entry = c.new.map(|s| self.service_entry(&key, s, model));
            match entry {
                Some(ServiceEntry::Routed(id, v, vips)) => {
                    cache.vips += vips.len();
                    cache.routed.insert(id);
                    cache.d.services.insert(id, (v, vips));
                    self.open(cache, &mut scope, id, &key, model);
                }
                Some(ServiceEntry::Passthrough(_)) => return Err("a passthrough service"),
                Some(ServiceEntry::NoVip) | None => {}
            }
            // No longer routed: its lists and own ports go.
            if let Some(id) = old.filter(|id| !cache.routed.contains(id)) {
                scope.sids.insert(id);
                for p in 0..MAX_PRIO as u32 {
                    cache.d.endpoints.remove(&(id, p));
                    if let Some(list) = self.written.endpoints.get(&(id, p)) {
                        cache.endpoints -= list.len();
                    }
                }
                let ports: Vec<_> = cache
                    .d
                    .ports
                    .keys()
                    .filter(|k| k.0 == id)
                    .copied()
                    .collect();
                for k in ports {
                    cache.d.ports.remove(&k);
                    scope.ports.push(k);
                }
            }
        }
        for c in workloads {
            if let Some(o) = c.old {
                self.take_out(cache, o, &mut scope, model);
            }
        }
        let none = Admission::default();
        for c in workloads {
            let Some(n) = c.new else { continue };
            let id = n.id();
            let mut members = Vec::new();
            for r in n.services.iter() {
                *cache.refs.entry(r.key.clone()).or_default() += 1;
                let Some(&sid) = self.service_ids.by_key.get(&r.key) else {
                    continue;
                };
                let Some(svc) = model
                    .service(&r.key)
                    .filter(|_| cache.routed.contains(&sid))
                else {
                    continue;
                };
                self.open(cache, &mut scope, sid, &r.key, model);
                scope
                    .ports
                    .extend(r.ports.iter().map(|p| (sid, id, p.service_port)));
                members.push((sid, &svc.load_balancing, &svc.ports[..], &r.ports[..]));
            }
            cache.service_waypoints += usize::from(names_service(n.waypoint()));
            let sids: BTreeSet<u32> = members.iter().map(|m| m.0).collect();
            let before: usize = sids.iter().map(|s| cache.members(*s)).sum();
            self.add_workload(&mut cache.d, n, model, &none, &members, false);
            let after: usize = sids.iter().map(|s| cache.members(*s)).sum();
            cache.endpoints += after - before;
            scope.wids.push(id);
            if !n.host_network {
                scope.ips.extend(n.addresses.iter().map(|a| canonical(*a)));
            }
        }
        Ok(scope)
    }

    /// Makes `sid`'s endpoint sets those its written lists hold, and its
    /// VIP entry (a routed service's) what the model makes of it, once per
    /// apply (`scope.sids` records it).
    fn open(
        &mut self,
        cache: &mut Cache,
        scope: &mut Scope,
        sid: u32,
        key: &Arc<str>,
        model: Layers,
    ) {
        if !scope.sids.insert(sid) {
            return;
        }
        for p in 0..MAX_PRIO as u32 {
            if let Some(list) = self.written.endpoints.get(&(sid, p)) {
                cache
                    .d
                    .endpoints
                    .insert((sid, p), list.iter().copied().collect());
            }
        }
        if !cache.routed.contains(&sid) || cache.d.services.contains_key(&sid) {
            return;
        }
        if let Some(ServiceEntry::Routed(id, v, vips)) = model
            .service(key)
            .map(|s| self.service_entry(key, s, model))
        {
            cache.d.services.insert(id, (v, vips));
        }
    }

    /// Takes what `old` put in the cached desired state out of it.
    fn take_out(&mut self, cache: &mut Cache, old: &Workload, scope: &mut Scope, model: Layers) {
        let id = old.id();
        for ip in old.addresses.iter().map(|a| canonical(*a)) {
            if self.written.workload_ips.get(&ip) == Some(&id) {
                scope.ips.push(ip);
            }
        }
        scope.wids.push(id);
        cache.service_waypoints -= usize::from(names_service(old.waypoint()));
        for r in old.services.iter() {
            cache.unref(&r.key);
            let Some(&sid) = self.service_ids.by_key.get(&r.key) else {
                continue;
            };
            if !cache.routed.contains(&sid) {
                continue;
            }
            self.open(cache, scope, sid, &r.key, model);
            for p in 0..MAX_PRIO as u32 {
                let Some(set) = cache.d.endpoints.get_mut(&(sid, p)) else {
                    continue;
                };
                if set.remove(&id) {
                    cache.endpoints -= 1;
                    if set.is_empty() {
                        cache.d.endpoints.remove(&(sid, p));
                    }
                }
            }
            for p in &r.ports {
                let k = (sid, id, p.service_port);
                if cache.d.ports.remove(&k).is_some() {
                    scope.ports.push(k);
                }
            }
        }
    }
}
