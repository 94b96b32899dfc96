//! What the writer remembers of what it wrote: just enough to diff the
//! next desired state against (keys, ids, fingerprints), kept small
//! because at 100k workloads every byte per entry is 100 kB.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::desired::PortOverrides;
use crate::bpf::{config_value, manage_value};

/// What the maps hold, as last written by this writer.
#[derive(Default)]
pub(super) struct Written {
    /// VIP → (service id, fingerprint of the value).
    pub(super) vips: IpMap<(u32, u64)>,
    /// Workload address → workload id; the rest of the value (the
    /// waypoint) is in the backend's fingerprint.
    pub(super) workload_ips: IpMap<u32>,
    /// (service id, priority) → workload ids; position i is index i+1.
    /// Longer than the service's count until the tail is trimmed.
    pub(super) endpoints: HashMap<(u32, u32), Vec<u32>>,
    /// Fingerprints of the endpoint values (addresses, waypoint, flags) the
    /// entries carry: enough to see which changed.
    pub(super) backends: Prints,
    pub(super) ports: PortOverrides,
    pub(super) manage: BTreeMap<u64, manage_value>,
    pub(super) config: Option<config_value>,
}

/// Addresses to values, IPv4 and IPv6 apart: an IPv4 key takes 4 bytes
/// where an IpAddr takes 17 (100k workload addresses: 1.2 MB, not 3.3).
pub(super) struct IpMap<V> {
    v4: HashMap<Ipv4Addr, V>,
    v6: HashMap<Ipv6Addr, V>,
}

impl<V> Default for IpMap<V> {
    fn default() -> Self {
        IpMap {
            v4: HashMap::new(),
            v6: HashMap::new(),
        }
    }
}

impl<V> IpMap<V> {
    pub(super) fn get(&self, ip: &IpAddr) -> Option<&V> {
        match ip {
            IpAddr::V4(a) => self.v4.get(a),
            IpAddr::V6(a) => self.v6.get(a),
        }
    }

    pub(super) fn insert(&mut self, ip: IpAddr, v: V) {
        match ip {
            IpAddr::V4(a) => insert_compact(&mut self.v4, a, v),
            IpAddr::V6(a) => insert_compact(&mut self.v6, a, v),
        };
    }

    pub(super) fn remove(&mut self, ip: &IpAddr) {
        match ip {
            IpAddr::V4(a) => self.v4.remove(a),
            IpAddr::V6(a) => self.v6.remove(a),
        };
    }

    pub(super) fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.v4.keys().map(|a| IpAddr::V4(*a));
        v4.chain(self.v6.keys().map(|a| IpAddr::V6(*a)))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.v4.values().chain(self.v6.values())
    }
}

/// Inserts without letting deleted slots double the table. Pods that move
/// remove one address and add another; a hash table keeps the removed
/// slots as tombstones, which use up its room for growth (`capacity()`
/// counts what is left), and at 100k addresses its next insert doubled it:
/// +1.2 MB of RSS for good, ~50 s into bench/xds_scale's churn. Rebuilt
/// at the size it holds instead, once per ~15k moves at 100k (a few ms).
fn insert_compact<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>, k: K, v: V) {
    if m.len() == m.capacity() && !m.contains_key(&k) {
        let mut fresh = HashMap::with_capacity(m.len() + 1);
        fresh.extend(m.drain());
        *m = fresh;
    }
    m.insert(k, v);
}

/// Workload id → fingerprint, as two sorted arrays: 12 bytes an entry
/// where a hash map takes 16 at 76% load (100k backends: 1.2 MB, not 2.2).
#[derive(Default)]
pub(super) struct Prints {
    ids: Vec<u32>,
    prints: Vec<u64>,
}

impl Prints {
    pub(super) fn new(it: impl Iterator<Item = (u32, u64)>) -> Prints {
        let mut v: Vec<(u32, u64)> = it.collect();
        v.sort_unstable_by_key(|e| e.0);
        Prints {
            ids: v.iter().map(|e| e.0).collect(),
            prints: v.iter().map(|e| e.1).collect(),
        }
    }

    pub(super) fn get(&self, id: u32) -> Option<u64> {
        self.ids.binary_search(&id).ok().map(|i| self.prints[i])
    }

    /// Sets (Some) or removes (None) the prints of `changes`: in place
    /// where an id stays (a pod that moves keeps its id: a churn push is
    /// all such), else in one merge, so a change of k entries costs
    /// O(k log n) or O(n + k log k), never k shifts of the arrays.
    pub(super) fn set_many(&mut self, mut changes: Vec<(u32, Option<u64>)>) {
        if changes.is_empty() {
            return;
        }
        // The last word on an id wins.
        changes.reverse();
        changes.sort_by_key(|c| c.0);
        changes.dedup_by_key(|c| c.0);
        // Prints of present ids change in place; what is left adds or
        // removes an id.
        changes.retain(|&(id, p)| match (self.ids.binary_search(&id), p) {
            (Ok(i), Some(p)) => {
                self.prints[i] = p;
                false
            }
            (Err(_), None) => false,
            _ => true,
        });
        if changes.is_empty() {
            return;
        }
        let small = changes.len() <= 8;
        if small {
            for (id, p) in changes {
                match (self.ids.binary_search(&id), p) {
                    (Ok(i), Some(p)) => self.prints[i] = p,
                    (Ok(i), None) => {
                        self.ids.remove(i);
                        self.prints.remove(i);
                    }
                    (Err(i), Some(p)) => {
                        self.ids.insert(i, id);
                        self.prints.insert(i, p);
                    }
                    (Err(_), None) => {}
                }
            }
            return;
        }
        let (mut ids, mut prints) = (Vec::with_capacity(self.ids.len()), Vec::new());
        prints.reserve(self.ids.len());
        let mut c = changes.into_iter().peekable();
        for (id, p) in self.ids.iter().copied().zip(self.prints.iter().copied()) {
            while let Some(&(cid, cp)) = c.peek().filter(|x| x.0 < id) {
                if let Some(cp) = cp {
                    ids.push(cid);
                    prints.push(cp);
                }
                c.next();
            }
            match c.peek().copied().filter(|x| x.0 == id) {
                Some((_, np)) => {
                    c.next();
                    if let Some(np) = np {
                        ids.push(id);
                        prints.push(np);
                    }
                }
                None => {
                    ids.push(id);
                    prints.push(p);
                }
            }
        }
        for (cid, cp) in c {
            if let Some(cp) = cp {
                ids.push(cid);
                prints.push(cp);
            }
        }
        self.ids = ids;
        self.prints = prints;
    }
}

#[cfg(test)]
mod tests {
    use super::Prints;
    use std::collections::BTreeMap;

    /// set_many's three paths (in place, a few shifts, a merge) against a
    /// plain map, over batches of every size.
    #[test]
    fn set_many_matches_a_map() {
        let mut seed = 7u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut p = Prints::default();
        let mut want = BTreeMap::new();
        for round in 0..300 {
            let k = [1, 5, 9, 40][round % 4];
            let batch: Vec<(u32, Option<u64>)> = (0..k)
                .map(|_| {
                    let id = next(200) as u32;
                    (id, (next(3) != 0).then(|| next(1000)))
                })
                .collect();
            for &(id, v) in &batch {
                match v {
                    Some(v) => want.insert(id, v),
                    None => want.remove(&id),
                };
            }
            p.set_many(batch);
            let got: Vec<(u32, u64)> = p
                .ids
                .iter()
                .copied()
                .zip(p.prints.iter().copied())
                .collect();
            let want: Vec<(u32, u64)> = want.iter().map(|(a, b)| (*a, *b)).collect();
            assert_eq!(got, want, "round {round}");
        }
    }
}
