//! The authorization tables (bpf/lib/authz.h), compiled from the policies
//! (authz::compile) and written so that a connection being decided sees a
//! destination's old policy set or its new one, never a mix:
//! 1. a changed set is written whole under a new set id (ids are never
//!    reused), next to the old one;
//! 2. each destination address flips to its new set in one update;
//! 3. the workload entries take their new identity numbers (every set
//!    written in 1 knows the old and the new numbers);
//! 4. after a grace period (a program that read the old set id finishes
//!    within microseconds) the old sets' entries go.
//!
//! Identity numbers are never reused either, so an entry for one no
//! workload holds any more is dead, not wrong.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use libbpf_rs::{MapCore, MapFlags};

use super::{ApplyStats, MapWriter, WriterError};
use crate::{
    authz::{
        compile::{self, Compiled, Core, Destination, PolicyIndex},
        Identity, Policy, PolicyStore,
    },
    bpf::{
        addr_key, authz_class, authz_dst, authz_id_key, authz_port_key, authz_src_key,
        authz_verdict, authz_verdict_key, kmesh_addr, Datapath, MapId,
    },
    model::{canonical, Layers},
};

/// enum kmesh_authz_part.
const PART_DENY: u32 = 0;
const PART_ALLOW: u32 = 1;

/// Policy indices the counters have room for (km_authz_count holds three
/// counters per index, index 0 unused).
const MAX_POLICY_INDEX: u32 = 4095;

pub(super) struct WrittenSet {
    id: u32,
    /// What was (or, after a failure part-way, may have been) written.
    core: Core,
    identities: BTreeMap<u32, (u32, u32)>,
    /// Every entry is in: only then may a later apply reuse the set.
    complete: bool,
}

#[derive(Default)]
pub(super) struct AuthzState {
    identities: HashMap<Identity, u32>,
    next_identity: u32,
    /// Identity numbers the workload entries held after the last write.
    in_use: HashSet<u32>,
    policy_index: HashMap<Arc<str>, u32>,
    next_set: u32,
    sets: HashMap<Arc<str>, WrittenSet>,
    dsts: HashMap<IpAddr, authz_dst>,
    /// Set key → workloads it applies to here, as last written.
    pub(super) applied: Vec<(Arc<str>, Vec<String>)>,
    pub(super) notes: Vec<String>,
    /// Workload address → the identity number its entry holds (nonzero).
    ip_identity: HashMap<IpAddr, u32>,
    /// Whether a decision may have changed since `take_changed`.
    changed: bool,
    /// Sets no destination uses any more, to delete (kept across a failed
    /// apply, so none is forgotten).
    retired: Vec<WrittenSet>,
}

impl AuthzState {
    /// The number of an identity, allocated on first sight.
    pub(super) fn identity(&mut self, id: Identity) -> u32 {
        if let Some(n) = self.identities.get(&id) {
            return *n;
        }
        self.next_identity += 1;
        self.identities.insert(id, self.next_identity);
        self.next_identity
    }

    pub(super) fn ip_identity(&self, ip: &IpAddr) -> u32 {
        self.ip_identity.get(ip).copied().unwrap_or(0)
    }

    pub(super) fn set_ip_identity(&mut self, ip: IpAddr, n: u32) {
        self.changed = true;
        if n == 0 {
            self.ip_identity.remove(&ip);
        } else {
            self.ip_identity.insert(ip, n);
        }
    }

    pub(super) fn policy_index(&self, key: &str) -> u32 {
        self.policy_index.get(key).copied().unwrap_or(0)
    }
}

impl PolicyIndex for AuthzState {
    fn index(&self, key: &str) -> u32 {
        self.policy_index(key)
    }
}

/// The destinations this node enforces: workloads with an address of an
/// enrolled netns, with the policies that apply to each.
fn destinations<'a>(model: Layers<'a>, store: &PolicyStore) -> Vec<Destination<'a>> {
    let local = model.enrolled_addresses();
    if local.is_empty() || store.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for w in model.workloads().filter(|w| !w.host_network) {
        let addrs: Vec<IpAddr> = w
            .addresses
            .iter()
            .map(|a| canonical(*a))
            .filter(|a| local.contains(a))
            .collect();
        if addrs.is_empty() {
            continue;
        }
        let policies: Vec<Arc<Policy>> = store
            .applicable_shared(w.namespace(), w.policies())
            .cloned()
            .collect();
        out.push(Destination {
            uid: w.uid(),
            addrs,
            policies,
        });
    }
    out
}

impl MapWriter {
    /// Compiles the policies for this node's destinations; `used`: the
    /// identity numbers the workload entries will hold.
    pub(super) fn compile_authz(&mut self, model: Layers, used: &HashSet<u32>) -> Compiled {
        let store = model.policy_store();
        // Indices for the counters: kept while the policy is, the freed
        // ones reused lowest first.
        self.authz
            .policy_index
            .retain(|k, _| store.get(k).is_some());
        let mut taken: Vec<u32> = self.authz.policy_index.values().copied().collect();
        taken.sort_unstable();
        let mut keys: Vec<Arc<str>> = store
            .iter()
            .map(|p| Arc::<str>::from(p.key()))
            .filter(|k| !self.authz.policy_index.contains_key(k))
            .collect();
        keys.sort();
        let mut next = 1;
        for k in keys {
            while taken.binary_search(&next).is_ok() {
                next += 1;
            }
            if next > MAX_POLICY_INDEX {
                break;
            }
            taken.push(next);
            taken.sort_unstable();
            self.authz.policy_index.insert(k, next);
            self.authz_zero_counters(next);
        }
        let dsts = destinations(model, &store);
        // Old and new numbers both: see the module comment, step 3.
        let mut known: Vec<(u32, &Identity)> = self
            .authz
            .identities
            .iter()
            .filter(|(_, n)| used.contains(n) || self.authz.in_use.contains(n))
            .map(|(id, n)| (*n, id))
            .collect();
        // Class numbers follow the order identities are met in: a stable
        // order keeps an unchanged set's tables unchanged.
        known.sort_unstable_by_key(|(n, _)| *n);
        let cap = [
            MapId::AuthzVerdict,
            MapId::AuthzId,
            MapId::AuthzPort,
            MapId::AuthzSrc,
        ]
        .into_iter()
        .map(|m| self.dp.capacity(m))
        .min()
        .unwrap_or(0) as usize;
        // Half: a replaced set and its successor are in the maps together.
        compile::compile(&dsts, &known, &self.authz, cap / 2)
    }

    fn authz_zero_counters(&self, index: u32) {
        let map = self.dp.map(MapId::AuthzCount);
        let cpus = libbpf_rs::num_possible_cpus().unwrap_or(1);
        let zeros = vec![vec![0u8; 8]; cpus];
        for k in 0..3 {
            let key = (index * 3 + k).to_ne_bytes();
            let _ = map.update_percpu(&key, &zeros, MapFlags::ANY);
        }
    }

    /// Steps 1 and 2: new sets written, destinations flipped to them. The
    /// sets replaced wait in `retired` for step 4.
    pub(super) fn write_authz(
        &mut self,
        c: &Compiled,
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        let before = st.updates + st.deletes;
        let retired_before = self.authz.retired.len();
        let mut ids = Vec::with_capacity(c.sets.len());
        for set in &c.sets {
            let reusable = self.authz.sets.get(&set.key).is_some_and(|old| {
                old.complete
                    && old.core == set.core
                    && old
                        .identities
                        .iter()
                        .all(|(n, class)| set.identities.get(n).is_none_or(|c| c == class))
            });
            if reusable {
                let old = self.authz.sets.get_mut(&set.key).expect("checked");
                let id = old.id;
                let add: Vec<(u32, (u32, u32))> = set
                    .identities
                    .iter()
                    .filter(|(n, _)| !old.identities.contains_key(n))
                    .map(|(n, c)| (*n, *c))
                    .collect();
                for (n, class) in add {
                    let key = authz_id_key {
                        set: id,
                        identity: n,
                    };
                    update(&self.dp, MapId::AuthzId, &key, &class_value(class), st)?;
                    old.identities.insert(n, class);
                }
                ids.push(id);
                continue;
            }
            self.authz.next_set += 1;
            let id = self.authz.next_set;
            let mut w = WrittenSet {
                id,
                core: set.core.clone(),
                identities: set.identities.clone(),
                complete: false,
            };
            let r = write_set(&self.dp, &w, st);
            w.complete = r.is_ok();
            if let Some(old) = self.authz.sets.insert(set.key.clone(), w) {
                self.authz.retired.push(old);
            }
            r?;
            ids.push(id);
        }
        let wanted: HashSet<&Arc<str>> = c.sets.iter().map(|s| &s.key).collect();
        let gone: Vec<Arc<str>> = self
            .authz
            .sets
            .keys()
            .filter(|k| !wanted.contains(k))
            .cloned()
            .collect();
        let flags: Vec<u32> = c
            .sets
            .iter()
            .map(|s| {
                let w = &self.authz.sets[&s.key];
                needs(&w.core, &w.identities)
            })
            .collect();
        for (ip, &(si, (deny_class, allow_class))) in &c.dsts {
            let v = authz_dst {
                set: ids[si],
                deny_class,
                allow_class,
                flags: flags[si],
            };
            if self
                .authz
                .dsts
                .get(ip)
                .is_some_and(|o| crate::bpf::Pod::as_bytes(o) == crate::bpf::Pod::as_bytes(&v))
            {
                continue;
            }
            update(&self.dp, MapId::AuthzDst, &addr_key::from_ip(*ip), &v, st)?;
            self.authz.dsts.insert(*ip, v);
        }
        let stale: Vec<IpAddr> = self
            .authz
            .dsts
            .keys()
            .filter(|ip| !c.dsts.contains_key(ip))
            .copied()
            .collect();
        for ip in stale {
            delete(&self.dp, MapId::AuthzDst, &addr_key::from_ip(ip), st)?;
            self.authz.dsts.remove(&ip);
        }
        for k in gone {
            if let Some(old) = self.authz.sets.remove(&k) {
                self.authz.retired.push(old);
            }
        }
        self.authz.applied = c
            .sets
            .iter()
            .map(|s| (s.key.clone(), s.workloads.clone()))
            .collect();
        for n in c.notes.iter().filter(|n| !self.authz.notes.contains(n)) {
            tracing::warn!("{n}");
        }
        self.authz.notes = c.notes.clone();
        self.authz.changed |=
            st.updates + st.deletes != before || self.authz.retired.len() != retired_before;
        Ok(())
    }

    /// Step 4: what no destination uses any more goes.
    pub(super) fn retire_authz(
        &mut self,
        used: HashSet<u32>,
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        if !self.authz.retired.is_empty() {
            // The BPF programs run under RCU and decide in microseconds; a
            // connection that read an old set id before its flip is done.
            std::thread::sleep(Duration::from_millis(2));
        }
        while let Some(set) = self.authz.retired.pop() {
            if let Err(e) = delete_set(&self.dp, &set, st) {
                self.authz.retired.push(set);
                return Err(e);
            }
        }
        for set in self.authz.sets.values_mut() {
            let dead: Vec<u32> = set
                .identities
                .keys()
                .filter(|n| !used.contains(n))
                .copied()
                .collect();
            for n in dead {
                let key = authz_id_key {
                    set: set.id,
                    identity: n,
                };
                delete(&self.dp, MapId::AuthzId, &key, st)?;
                set.identities.remove(&n);
            }
        }
        self.authz.identities.retain(|_, n| used.contains(n));
        self.authz.in_use = used;
        Ok(())
    }

    /// Whether an apply since the last call may have changed a decision
    /// (tables, destinations or identities rewritten).
    pub fn take_authz_changed(&mut self) -> bool {
        std::mem::take(&mut self.authz.changed)
    }

    /// Per policy key: (allow, deny, dry-run deny) counted by the data
    /// path since the policy got its index.
    pub fn authz_counters(&self) -> HashMap<&str, [u64; 3]> {
        let map = self.dp.map(MapId::AuthzCount);
        let sum = |i: u32| crate::bpf::percpu_sum(map, i);
        self.authz
            .policy_index
            .iter()
            .map(|(k, &i)| (&**k, [sum(i * 3), sum(i * 3 + 1), sum(i * 3 + 2)]))
            .collect()
    }

    /// The policy key behind a counter index (for the denial log).
    pub fn policy_key(&self, index: u32) -> Option<&str> {
        self.authz
            .policy_index
            .iter()
            .find(|(_, &i)| i == index)
            .map(|(k, _)| &**k)
    }
}

fn src_key(set: u32, addr: IpAddr, len: u8) -> authz_src_key {
    let bits = if addr.is_ipv4() { 96 } else { 0 };
    authz_src_key {
        prefixlen: 32 + bits + u32::from(len),
        set: set.to_be(),
        addr: kmesh_addr::from_ip(addr),
    }
}

/// enum kmesh_authz_dst_flag: the lookups a set's tables make worth it.
fn needs(core: &Core, identities: &BTreeMap<u32, (u32, u32)>) -> u32 {
    let mut f = 0;
    if !core.deny.ports.is_empty() || !core.allow.ports.is_empty() {
        f |= 1;
    }
    if !identities.is_empty() {
        f |= 2;
    }
    if !core.deny.sources.is_empty() || !core.allow.sources.is_empty() {
        f |= 4;
    }
    if core.deny.has_policies {
        f |= 8;
    }
    if core.allow.has_policies {
        f |= 16;
    }
    f
}

fn class_value((deny, allow): (u32, u32)) -> authz_class {
    authz_class { deny, allow }
}

fn verdict_key(set: u32, part: u32, (id, src, dst, port): compile::Combo) -> authz_verdict_key {
    authz_verdict_key {
        set,
        part,
        id_class: id,
        src_class: src,
        dst_class: dst,
        port_class: port,
    }
}

/// The data path's form of each part's table entries.
fn outcomes(core: &Core) -> impl Iterator<Item = (u32, compile::Combo, authz_verdict)> + '_ {
    let deny = core.deny.table.iter().map(|(c, o)| {
        let v = authz_verdict {
            flags: u32::from(o.denied) | (u32::from(o.dry_denied) << 1),
            policy: o.policy,
            dry_policy: o.dry_policy,
        };
        (PART_DENY, *c, v)
    });
    let allow = core.allow.table.iter().map(|(c, o)| {
        let v = authz_verdict {
            flags: u32::from(o.not_allowed) | (u32::from(o.dry_not_allowed) << 1),
            policy: o.policy,
            dry_policy: o.dry_policy,
        };
        (PART_ALLOW, *c, v)
    });
    deny.chain(allow)
}

/// Writes a whole set (`w` says what and under which id); a failure
/// part-way leaves `w` naming every key to delete.
fn write_set(dp: &Datapath, w: &WrittenSet, st: &mut ApplyStats) -> Result<(), WriterError> {
    for (port, class) in w.core.ports() {
        let key = authz_port_key {
            set: w.id,
            port: port.into(),
        };
        update(dp, MapId::AuthzPort, &key, &class_value(class), st)?;
    }
    for ((addr, len), class) in w.core.sources() {
        update(
            dp,
            MapId::AuthzSrc,
            &src_key(w.id, addr, len),
            &class_value(class),
            st,
        )?;
    }
    for (&n, &class) in &w.identities {
        let key = authz_id_key {
            set: w.id,
            identity: n,
        };
        update(dp, MapId::AuthzId, &key, &class_value(class), st)?;
    }
    for (part, combo, v) in outcomes(&w.core) {
        update(
            dp,
            MapId::AuthzVerdict,
            &verdict_key(w.id, part, combo),
            &v,
            st,
        )?;
    }
    Ok(())
}

fn delete_set(dp: &Datapath, w: &WrittenSet, st: &mut ApplyStats) -> Result<(), WriterError> {
    for port in w.core.ports().keys() {
        let key = authz_port_key {
            set: w.id,
            port: (*port).into(),
        };
        delete(dp, MapId::AuthzPort, &key, st)?;
    }
    for &(addr, len) in w.core.sources().keys() {
        delete(dp, MapId::AuthzSrc, &src_key(w.id, addr, len), st)?;
    }
    for n in w.identities.keys() {
        let key = authz_id_key {
            set: w.id,
            identity: *n,
        };
        delete(dp, MapId::AuthzId, &key, st)?;
    }
    for (part, combo, _) in outcomes(&w.core) {
        delete(dp, MapId::AuthzVerdict, &verdict_key(w.id, part, combo), st)?;
    }
    Ok(())
}

fn update<K: crate::bpf::Pod, V: crate::bpf::Pod>(
    dp: &Datapath,
    map: MapId,
    key: &K,
    value: &V,
    st: &mut ApplyStats,
) -> Result<(), WriterError> {
    super::put(dp, map, key, value, || "authorization tables".into(), st)
}

fn delete<K: crate::bpf::Pod>(
    dp: &Datapath,
    map: MapId,
    key: &K,
    st: &mut ApplyStats,
) -> Result<(), WriterError> {
    super::remove(dp, map, key, || "authorization tables".into(), st)
}
