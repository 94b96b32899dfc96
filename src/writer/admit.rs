//! Admission: which entries of the sources' models go into the maps. An
//! entry that is invalid, claims a frontend address another entry holds,
//! or does not fit the maps is left out whole and named; everything else
//! still applies. (Refusing the whole model instead let one bad resource
//! freeze every later update.)

use std::{
    collections::{hash_map::Entry, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use serde::Serialize;

use super::{desired::Desired, MapWriter, WriterError};
use crate::{
    bpf::MapId,
    model::{canonical, EntryKey, Layers, LbMode, Workload},
};

/// An entry left out of the maps, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    pub entry: EntryKey,
    pub reason: String,
}

/// Who a frontend address (a VIP or a workload address) leads to.
#[derive(Clone, Copy)]
pub(super) enum Holder<'a> {
    Service(&'a Arc<str>),
    Workload(&'a Workload),
}

impl Holder<'_> {
    pub(super) fn key(&self) -> EntryKey {
        match self {
            Holder::Service(k) => EntryKey::Service((*k).clone()),
            Holder::Workload(w) => EntryKey::Workload(w.uid().into()),
        }
    }
}

/// Lower wins an address: what the maps already route there (so a newcomer
/// can never take over a live address), then services before workloads,
/// then the older entry (ids grow with arrival).
type Rank = (bool, u8, u32);

#[derive(Default)]
pub(super) struct Admission<'a> {
    /// The frontend addresses the maps get, each with its one holder.
    pub(super) frontends: HashMap<IpAddr, (Rank, Holder<'a>)>,
    /// Left out: service keys, workload ids, netns cookies.
    pub(super) services: HashSet<&'a str>,
    pub(super) workloads: HashSet<u32>,
    pub(super) cookies: HashSet<u64>,
    /// Hostname → the answer used instead of the resolver's newest, which
    /// did not fit.
    pub(super) answers: HashMap<Box<str>, Vec<IpAddr>>,
    pub(super) rejected: Vec<Rejected>,
    /// What was kept back without refusing an entry (an older DNS answer).
    pub(super) notes: Vec<String>,
}

impl<'a> Admission<'a> {
    fn reject(&mut self, entry: EntryKey, reason: String) {
        self.rejected.push(Rejected { entry, reason });
    }
}

/// How a refusal for want of room starts.
pub(super) const NO_ROOM: &str = "does not fit";

/// Whether an address on `network` is reachable from this node: its own
/// network, or none given.
pub(super) fn local_network(network: &str, local: &str) -> bool {
    network.is_empty() || network == local
}

/// Per map, the entries that would add to it, with how much each adds.
struct Growth {
    map: MapId,
    needed: usize,
    capacity: u32,
    flag: &'static str,
    /// (entry, entries it adds, tiebreak id: higher goes first)
    by_entry: Vec<(Victim, usize, u32)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Victim {
    Service(u32),
    Workload(u32),
    Cookie(u64),
}

impl MapWriter {
    /// Valid entries whose frontend addresses do not collide; capacity is
    /// checked later, against the desired state (`fit`).
    pub(super) fn admit<'a>(&mut self, model: Layers<'a>) -> Admission<'a> {
        let mut a = Admission::default();
        for (key, s) in model.services() {
            if let Err(e) = s.validate() {
                a.services.insert(key);
                a.reject(EntryKey::Service(key.clone()), e.to_string());
            }
        }
        for w in model.workloads() {
            if let Err(e) = w.validate() {
                a.workloads.insert(w.id());
                a.reject(EntryKey::Workload(w.uid().into()), e.to_string());
            }
        }
        // An entry refused for one address frees its others, which may
        // then go to an entry that lost them: claim again until stable.
        loop {
            let before = a.rejected.len();
            self.claim_frontends(model, &mut a);
            if a.rejected.len() == before {
                return a;
            }
        }
    }

    fn claim_frontends<'a>(&mut self, model: Layers<'a>, a: &mut Admission<'a>) {
        // Sized once: about one address per entry.
        let estimate = model
            .0
            .iter()
            .map(|m| m.services.len() + m.workloads.len())
            .sum();
        let mut best: HashMap<IpAddr, (Rank, Holder<'a>)> =
            HashMap::with_capacity(a.frontends.len().max(estimate));
        let mut losers: Vec<(Holder<'a>, IpAddr)> = Vec::new();
        let mut offer = |ip: IpAddr, rank: Rank, who: Holder<'a>| match best.entry(ip) {
            Entry::Vacant(v) => {
                v.insert((rank, who));
            }
            // The same entry listing an address twice.
            Entry::Occupied(o) if o.get().0 == rank => {}
            Entry::Occupied(mut o) => {
                if rank < o.get().0 {
                    let (_, lost) = o.insert((rank, who));
                    losers.push((lost, ip));
                } else {
                    losers.push((who, ip));
                }
            }
        };
        let local = self.local.network.clone();
        for (key, s) in model.services() {
            if s.load_balancing.mode == LbMode::Passthrough || a.services.contains(&**key) {
                continue;
            }
            let id = self.service_ids.get_or_alloc(key);
            for addr in s.addresses.iter() {
                if !local_network(&addr.network, &local) {
                    continue;
                }
                let ip = canonical(addr.address);
                let live = self.written.vips.get(&ip).is_some_and(|v| v.0 == id);
                offer(ip, (!live, 0, id), Holder::Service(key));
            }
        }
        for w in model.workloads() {
            if w.host_network
                || a.workloads.contains(&w.id())
                || !local_network(w.network(), &local)
            {
                continue;
            }
            for ip in w.addresses.iter().map(|ip| canonical(*ip)) {
                let live = self.written.workload_ips.get(&ip) == Some(&w.id());
                offer(ip, (!live, 1, w.id()), Holder::Workload(w));
            }
        }
        for (lost, ip) in losers {
            let fresh = match lost {
                Holder::Service(k) => a.services.insert(k),
                Holder::Workload(w) => a.workloads.insert(w.id()),
            };
            if fresh {
                let holder = best
                    .get(&ip)
                    .map(|b| b.1.key().to_string())
                    .unwrap_or_default();
                a.reject(
                    lost.key(),
                    format!(
                        "address {ip} is already held by {holder}; left out until that changes"
                    ),
                );
            }
        }
        a.frontends = best;
    }

    /// Leaves out entries until the desired state fits every map. Returns
    /// whether anything was left out (the desired state must then be
    /// computed again).
    pub(super) fn fit<'a>(
        &self,
        d: &Desired,
        model: Layers<'a>,
        a: &mut Admission<'a>,
    ) -> Result<bool, WriterError> {
        let mut any = false;
        for g in self.growth(d) {
            let mut over = g.needed - g.capacity as usize;
            let mut by_entry = g.by_entry;
            // The largest growth first: one oversized entry (a DNS answer
            // of hundreds of addresses) goes before many small ones.
            by_entry.sort_unstable_by_key(|e| std::cmp::Reverse((e.1, e.2)));
            let mut names: Option<HashMap<u32, &Workload>> = None;
            for (victim, adds, _) in by_entry {
                if over == 0 {
                    break;
                }
                let reason = format!(
                    "{NO_ROOM} {} ({} entries needed, capacity {}; raise --{}); left out",
                    g.map.name(),
                    g.needed,
                    g.capacity,
                    g.flag
                );
                match victim {
                    Victim::Service(id) => {
                        let Some((key, _)) = model
                            .services()
                            .find(|(k, _)| self.service_ids.by_key.get(*k) == Some(&id))
                        else {
                            continue;
                        };
                        a.services.insert(key);
                        a.reject(EntryKey::Service(key.clone()), reason);
                    }
                    Victim::Workload(id) => {
                        let names = names.get_or_insert_with(|| {
                            model.workloads().map(|w| (w.id(), w)).collect()
                        });
                        let Some(w) = names.get(&id) else { continue };
                        // A DNS answer that outgrew the maps: keep the one
                        // that fit before, rather than drop the name.
                        if let Some(host) = w.hostname() {
                            let before = self.answered.get(host);
                            if let Some(prev) = before.filter(|_| !a.answers.contains_key(host)) {
                                a.notes.push(format!(
                                    "DNS {host}: the newest answer {reason}; keeping the previous {} address(es)",
                                    prev.len()
                                ));
                                a.answers.insert(host.into(), prev.clone());
                                over = over.saturating_sub(adds);
                                any = true;
                                continue;
                            }
                        }
                        a.workloads.insert(id);
                        a.reject(EntryKey::Workload(w.uid().into()), reason);
                    }
                    Victim::Cookie(c) => {
                        a.cookies.insert(c);
                        let source = model
                            .enrolled()
                            .get(&c)
                            .map_or_else(|| format!("netns cookie {c}"), |e| e.source.clone());
                        a.reject(EntryKey::Enrollment(source.into()), reason);
                    }
                }
                over = over.saturating_sub(adds);
                any = true;
            }
            if over > 0 && !any {
                return Err(WriterError::Capacity {
                    map: g.map.name(),
                    needed: g.needed,
                    capacity: g.capacity,
                    flag: g.flag,
                });
            }
            if any {
                // The others are recounted once these are out.
                return Ok(true);
            }
        }
        Ok(any)
    }

    /// The maps `d` does not fit, each with what every entry adds to it
    /// beyond what the maps hold now. The write order deletes and shrinks
    /// before it adds, so a map needs room for the new state only.
    fn growth(&self, d: &Desired) -> Vec<Growth> {
        let w = &self.written;
        let owner = |eid: u32| d.owner.get(&eid).copied().unwrap_or(eid);
        let endpoints: usize = d.endpoints.values().map(|s| s.len()).sum();
        // Own ports still go in before the stale ones leave.
        let ports = d.ports.len() + w.ports.keys().filter(|k| !d.ports.contains_key(k)).count();
        let mut out = Vec::new();
        for (map, needed, flag) in [
            (MapId::Vip, d.vips().count(), "max-vips"),
            (MapId::Workload, d.workload_ips.len(), "max-workload-ips"),
            (MapId::Endpoint, endpoints, "max-endpoints"),
            (MapId::Manage, d.manage.len(), "max-enrolled-netns"),
            (MapId::Port, ports, "max-port-overrides"),
        ] {
            let capacity = self.dp.capacity(map);
            if needed <= capacity as usize {
                continue;
            }
            let mut adds: HashMap<Victim, usize> = HashMap::new();
            let mut add = |v: Victim| *adds.entry(v).or_default() += 1;
            match map {
                MapId::Vip => {
                    for (id, (_, vips)) in &d.services {
                        for ip in vips {
                            if w.vips.get(ip).map(|v| v.0) != Some(*id) {
                                add(Victim::Service(*id));
                            }
                        }
                    }
                }
                MapId::Workload => {
                    for (ip, v) in &d.workload_ips {
                        if w.workload_ips.get(ip) != Some(&v.workload_id) {
                            add(Victim::Workload(v.workload_id));
                        }
                    }
                }
                MapId::Endpoint => {
                    for (key, set) in &d.endpoints {
                        let old: HashSet<u32> = w
                            .endpoints
                            .get(key)
                            .map(|l| l.iter().copied().collect())
                            .unwrap_or_default();
                        for eid in set.iter().filter(|e| !old.contains(e)) {
                            add(Victim::Workload(owner(*eid)));
                        }
                    }
                }
                MapId::Manage => {
                    for c in d.manage.keys().filter(|c| !w.manage.contains_key(c)) {
                        add(Victim::Cookie(*c));
                    }
                }
                _ => {
                    for k in d.ports.keys().filter(|k| !w.ports.contains_key(k)) {
                        add(Victim::Workload(owner(k.1)));
                    }
                }
            }
            let by_entry = adds
                .into_iter()
                .map(|(v, n)| {
                    let tie = match v {
                        Victim::Service(id) | Victim::Workload(id) => id,
                        Victim::Cookie(c) => c as u32,
                    };
                    (v, n, tie)
                })
                .collect();
            out.push(Growth {
                map,
                needed,
                capacity,
                flag,
                by_entry,
            });
        }
        out
    }
}
