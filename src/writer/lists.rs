//! Endpoint lists: dense indices 1..count per (service, priority), changed
//! without a gap the programs could see, and in an order that never needs
//! more map room than the larger of the old and the new state:
//! - a member that stays keeps its index; a new member takes the index of
//!   a leaving one (rewritten in place: no room needed);
//! - lists that shrink move their last members into the remaining holes,
//!   lower their service's count, then lose their tail;
//! - only then do lists that grow append, before their count rises.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::{desired::Desired, ApplyStats, MapWriter, Scope, WriterError};
use libbpf_rs::{MapCore, MapFlags};

use crate::bpf::{endpoint_key, endpoint_value, MapId, Pod, MAX_PRIO};

/// The new order of a list: see the module comment.
pub(super) fn plan_list(old: &[u32], want: &BTreeSet<u32>) -> Vec<u32> {
    let present: HashSet<u32> = old.iter().copied().collect();
    let mut arrivals = want.iter().copied().filter(|b| !present.contains(b));
    let mut slots: Vec<Option<u32>> = old.iter().map(|b| want.contains(b).then_some(*b)).collect();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match arrivals.next() {
            Some(b) => *slot = Some(b),
            None => break,
        }
    }
    // Holes are left only if the list shrinks: fill them from the tail.
    let mut i = 0;
    while i < slots.len() {
        if slots[i].is_none() {
            while slots.last().is_some_and(Option::is_none) {
                slots.pop();
            }
            if i >= slots.len() {
                break;
            }
            slots[i] = slots.pop().flatten();
        }
        i += 1;
    }
    let mut list: Vec<u32> = slots.into_iter().flatten().collect();
    list.extend(arrivals);
    list
}

impl MapWriter {
    /// The (service, priority) lists an apply looks at: every list of
    /// `d`'s services, written or wanted, or only those of the scope's.
    pub(super) fn list_keys(&self, d: &Desired, scope: Option<&Scope>) -> BTreeSet<(u32, u32)> {
        match scope {
            None => {
                let mut keys: BTreeSet<(u32, u32)> = d.endpoints.keys().copied().collect();
                keys.extend(
                    self.written
                        .endpoints
                        .keys()
                        .filter(|(s, _)| d.services.contains_key(s)),
                );
                keys
            }
            Some(s) => s
                .sids
                .iter()
                .filter(|sid| d.services.contains_key(sid))
                .flat_map(|&sid| (0..MAX_PRIO as u32).map(move |p| (sid, p)))
                .filter(|k| d.endpoints.contains_key(k) || self.written.endpoints.contains_key(k))
                .collect(),
        }
    }

    /// Brings the endpoint lists `keys` to their wanted members in `d`
    /// (rewriting entries of `moved` backends), VIP counts included where a
    /// list shrinks. Returns the final counts per service.
    pub(super) fn sync_lists(
        &mut self,
        d: &Desired,
        keys: BTreeSet<(u32, u32)>,
        moved: &HashSet<u32>,
        st: &mut ApplyStats,
    ) -> Result<HashMap<u32, [u32; MAX_PRIO]>, WriterError> {
        let empty = BTreeSet::new();
        // (key, new list, old length)
        let mut plans = Vec::with_capacity(keys.len());
        let mut counts: HashMap<u32, [u32; MAX_PRIO]> = HashMap::new();
        let mut interim: HashMap<u32, [u32; MAX_PRIO]> = HashMap::new();
        for key in keys {
            let old = self
                .written
                .endpoints
                .get(&key)
                .cloned()
                .unwrap_or_default();
            let list = plan_list(&old, d.endpoints.get(&key).unwrap_or(&empty));
            let both = old.len().min(list.len());
            for pos in 0..both {
                if old[pos] != list[pos] || moved.contains(&list[pos]) {
                    self.write_endpoint(key, pos, list[pos], d, &old, st)?;
                    self.written.endpoints.get_mut(&key).expect("old")[pos] = list[pos];
                }
            }
            counts.entry(key.0).or_default()[key.1 as usize] = list.len() as u32;
            // While lists shrink, a list holds only what both states share.
            interim.entry(key.0).or_default()[key.1 as usize] = both as u32;
            plans.push((key, list, old.len()));
        }
        // Shrinking services: the lower counts, then the tails go.
        let shrinking: BTreeSet<u32> = plans
            .iter()
            .filter(|(_, list, old)| list.len() < *old)
            .map(|((s, _), _, _)| *s)
            .collect();
        for sid in shrinking {
            let low = interim.get(&sid).copied().unwrap_or_default();
            let (template, vips) = &d.services[&sid];
            self.write_vips(sid, template, vips, low, st)?;
            self.trim_endpoints(sid, &low, st)?;
        }
        // Growing lists append; their counts rise with the VIPs (step 4).
        for (key, list, old) in plans {
            for (pos, wid) in list.iter().enumerate().skip(old) {
                self.write_endpoint(key, pos, *wid, d, &[], st)?;
            }
            if list.is_empty() {
                self.written.endpoints.remove(&key);
            } else {
                self.written.endpoints.insert(key, list);
            }
        }
        Ok(counts)
    }

    fn write_endpoint(
        &mut self,
        key: (u32, u32),
        pos: usize,
        wid: u32,
        d: &Desired,
        old: &[u32],
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        let k = endpoint_key {
            service_id: key.0,
            prio: key.1,
            index: pos as u32 + 1,
        };
        let v = match d.backends.get(&wid) {
            Some(v) => *v,
            // An incremental apply computes only the changed workloads'
            // values: one that is not changed moves within its list, and its
            // entry is read where it is now.
            None => self.read_endpoint(key, old, wid)?,
        };
        self.update(MapId::Endpoint, &k, &v, || self.service_name(key.0), st)
    }

    fn read_endpoint(
        &self,
        key: (u32, u32),
        old: &[u32],
        wid: u32,
    ) -> Result<endpoint_value, WriterError> {
        let at = old.iter().position(|x| *x == wid);
        let k = at.map(|i| endpoint_key {
            service_id: key.0,
            prio: key.1,
            index: i as u32 + 1,
        });
        let raw = k.and_then(|k| {
            self.dp
                .map(MapId::Endpoint)
                .lookup(k.as_bytes(), MapFlags::ANY)
                .ok()
                .flatten()
        });
        raw.and_then(|r| endpoint_value::from_bytes(&r))
            .ok_or_else(|| WriterError::Kernel {
                op: "lookup",
                map: MapId::Endpoint.name(),
                what: format!("{} endpoint {wid}", self.service_name(key.0)),
                source: libbpf_rs::Error::from(std::io::Error::from(std::io::ErrorKind::NotFound)),
            })
    }

    /// Deletes endpoint indices beyond each list's count, once no VIP entry
    /// covers them any more.
    pub(super) fn trim_endpoints(
        &mut self,
        service: u32,
        counts: &[u32; MAX_PRIO],
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        for (prio, &count) in counts.iter().enumerate() {
            let key = (service, prio as u32);
            let Some(tracked) = self.written.endpoints.get(&key) else {
                continue;
            };
            for index in (count + 1..=tracked.len() as u32).rev() {
                let k = endpoint_key {
                    service_id: service,
                    prio: prio as u32,
                    index,
                };
                self.delete(MapId::Endpoint, &k, || self.service_name(service), st)?;
                self.written.endpoints.get_mut(&key).expect("tracked").pop();
            }
            if count == 0 {
                self.written.endpoints.remove(&key);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::plan_list;
    use std::collections::BTreeSet;

    fn set(v: &[u32]) -> BTreeSet<u32> {
        v.iter().copied().collect()
    }

    #[test]
    fn members_that_stay_keep_their_index() {
        // A leaving member's index goes to a new one, in place.
        assert_eq!(plan_list(&[1, 2, 3], &set(&[1, 3, 9])), [1, 9, 3]);
        // Shrinking: the last member fills the hole.
        assert_eq!(plan_list(&[1, 2, 3, 4], &set(&[1, 3, 4])), [1, 4, 3]);
        assert_eq!(plan_list(&[1, 2, 3, 4], &set(&[4])), [4]);
        assert_eq!(plan_list(&[1, 2, 3, 4], &set(&[2, 3])), [3, 2]);
        // Growing: holes first, then the tail.
        assert_eq!(plan_list(&[1, 2], &set(&[1, 7, 8, 9])), [1, 7, 8, 9]);
        assert_eq!(plan_list(&[], &set(&[5, 6])), [5, 6]);
        assert_eq!(plan_list(&[5, 6], &set(&[])), Vec::<u32>::new());
    }
}
