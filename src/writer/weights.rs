//! Weighted endpoints (bpf/lib/lb.h): which (service, priority) lists
//! pick by weight, each endpoint's share there, and the pick tables in
//! km_lb. Lists whose endpoints all weigh the same get no table and no
//! bit in their service value, so the data path's pick stays one lookup.
//!
//! Shares: without a split, an endpoint's share is its workload's weight.
//! With a split, a rule's percentage is divided among the endpoints that
//! carry its labels in proportion to their weights, per priority; a
//! priority where a rule has no endpoint spreads that rule's share over
//! the others (a canary that is not there takes nothing), and endpoints
//! no rule selects get none.

use std::collections::{HashMap, HashSet};

use super::{desired::Desired, ApplyStats, MapWriter, WriterError};
use crate::{
    bpf::{lb_key, lb_table, MapId, LB_SLOTS},
    model::{SplitRule, TrafficPolicy, Workload},
};

/// An endpoint as noted: (endpoint id, weight, split rule).
type Noted = (u32, u32, Option<usize>);

/// What `desired` learns of weights while it builds the endpoint lists.
#[derive(Default)]
pub(super) struct Weights {
    /// Service id → its split rules (services with a split only).
    splits: HashMap<u32, Vec<SplitRule>>,
    /// (service id, priority) → (endpoint id, weight, split rule).
    noted: HashMap<(u32, u32), Vec<Noted>>,
    /// The result (`finish`): weighted lists only, endpoint id → share;
    /// an endpoint not listed has share 1.
    pub(super) shares: HashMap<(u32, u32), HashMap<u32, f64>>,
}

impl Weights {
    pub(super) fn service(&mut self, id: u32, tp: Option<&TrafficPolicy>) {
        if let Some(tp) = tp.filter(|t| !t.split.is_empty()) {
            self.splits.insert(id, tp.split.clone());
        }
    }

    /// `ids` (one workload's endpoints) joined list (sid, prio).
    pub(super) fn note(&mut self, sid: u32, prio: u32, ids: &[u32], w: &Workload) {
        let rule = match self.splits.get(&sid) {
            Some(rules) => {
                let empty = Default::default();
                let labels = w.labels().unwrap_or(&empty);
                rules
                    .iter()
                    .position(|r| r.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
            }
            None if w.weight() == 1 => return,
            None => None,
        };
        let list = self.noted.entry((sid, prio)).or_default();
        list.extend(ids.iter().map(|&id| (id, w.weight(), rule)));
    }

    /// Shares per list, and the weighted bits in the service values.
    pub(super) fn finish(d: &mut Desired) {
        let noted = std::mem::take(&mut d.weights.noted);
        for (key, list) in noted {
            let shares: HashMap<u32, f64> = match d.weights.splits.get(&key.0) {
                None => list.iter().map(|&(id, w, _)| (id, w as f64)).collect(),
                Some(rules) => {
                    let mut total = vec![0u64; rules.len()];
                    for &(_, w, r) in &list {
                        if let Some(r) = r {
                            total[r] += w as u64;
                        }
                    }
                    list.iter()
                        .map(|&(id, w, r)| {
                            let share = r.map_or(0.0, |r| {
                                rules[r].weight as f64 * w as f64 / total[r] as f64
                            });
                            (id, share)
                        })
                        .collect()
                }
            };
            let members = d.endpoints.get(&key).map_or(0, |s| s.len());
            let share = |id: &u32| shares.get(id).copied().unwrap_or(1.0);
            let first = d.endpoints.get(&key).and_then(|s| s.first()).map(share);
            let equal = d
                .endpoints
                .get(&key)
                .is_none_or(|s| s.iter().all(|id| Some(share(id)) == first));
            // All equal (or none has a share: no rule matches here) is
            // the uniform pick.
            if members < 2 || equal {
                continue;
            }
            if let Some((v, _)) = d.services.get_mut(&key.0) {
                v.weighted_prios |= 1 << key.1;
            }
            d.weights.shares.insert(key, shares);
        }
    }
}

/// The pick table for `list` (endpoint ids in index order): slots in
/// proportion to the shares, by largest remainder, so every slot goes to
/// some endpoint and no endpoint gets more than one slot more than its
/// exact share. Indices are 1-based; an endpoint with share 0 gets none.
pub(super) fn table(list: &[u32], share: impl Fn(u32) -> f64) -> lb_table {
    let mut t = lb_table::default();
    let shares: Vec<f64> = list.iter().map(|&id| share(id).max(0.0)).collect();
    let sum: f64 = shares.iter().sum();
    if sum <= 0.0 || list.is_empty() {
        return t;
    }
    let exact: Vec<f64> = shares.iter().map(|s| s / sum * LB_SLOTS as f64).collect();
    let mut n: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut left = LB_SLOTS - n.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..list.len()).filter(|&i| shares[i] > 0.0).collect();
    order.sort_by(|&a, &b| (exact[b] - n[b] as f64).total_cmp(&(exact[a] - n[a] as f64)));
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        n[i] += 1;
        left -= 1;
    }
    let mut slot = 0;
    for (i, &k) in n.iter().enumerate() {
        for _ in 0..k {
            // Lists beyond u16 indices cannot be weighted: their slots
            // stay 0 (the uniform pick).
            t.slot[slot] = u16::try_from(i + 1).unwrap_or(0);
            slot += 1;
        }
    }
    t
}

/// Pick tables as last written: (service, priority) → fingerprint.
#[derive(Default)]
pub(super) struct WrittenTables(HashMap<(u32, u32), u64>);

/// The writer's traffic-management state.
#[derive(Default)]
pub(super) struct TrafficState {
    pub(super) tables: WrittenTables,
}

impl MapWriter {
    /// Writes the pick table of every weighted list of `d` (after the
    /// lists are in place: the table holds their indices) and deletes the
    /// tables of lists no longer weighted. A table lagging its list for
    /// a moment is safe: lb.h checks each slot against the count.
    pub(super) fn sync_weights(
        &mut self,
        d: &Desired,
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        let mut keys: HashSet<(u32, u32)> = d.weights.shares.keys().copied().collect();
        keys.extend(self.traffic.tables.0.keys().copied());
        self.sync_weights_for(keys, d, st)
    }

    /// `sync_weights` for the lists `keys` only (an incremental apply
    /// passes the lists it changed).
    pub(super) fn sync_weights_for(
        &mut self,
        keys: impl IntoIterator<Item = (u32, u32)>,
        d: &Desired,
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        for key in keys {
            let k = lb_key {
                service_id: key.0,
                prio: key.1,
            };
            let (Some(shares), Some(list)) =
                (d.weights.shares.get(&key), self.written.endpoints.get(&key))
            else {
                if self.traffic.tables.0.remove(&key).is_some() {
                    self.delete(MapId::Lb, &k, || self.service_name(key.0), st)?;
                }
                continue;
            };
            let t = table(list, |id| shares.get(&id).copied().unwrap_or(1.0));
            let print = self.print(&t);
            if self.traffic.tables.0.get(&key) == Some(&print) {
                continue;
            }
            self.update(MapId::Lb, &k, &t, || self.service_name(key.0), st)?;
            self.traffic.tables.0.insert(key, print);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(t: &lb_table, n: usize) -> Vec<usize> {
        (1..=n)
            .map(|i| t.slot.iter().filter(|&&s| s as usize == i).count())
            .collect()
    }

    #[test]
    fn slots_follow_the_shares() {
        let t = table(&[7, 8], |id| if id == 7 { 80.0 } else { 20.0 });
        assert_eq!(counts(&t, 2), [819, 205]);
        let t = table(&[1, 2, 3], |id| [0.0, 9.0, 1.0, 0.0][id as usize]);
        assert_eq!(counts(&t, 3), [922, 102, 0]);
        assert!(t.slot.iter().all(|&s| s != 0));
        // 1000:1 still reaches the light one.
        let t = table(&[1, 2], |id| if id == 1 { 1000.0 } else { 1.0 });
        assert_eq!(counts(&t, 2), [1023, 1]);
        // Nothing to share: no table content (uniform).
        let t = table(&[1, 2], |_| 0.0);
        assert!(t.slot.iter().all(|&s| s == 0));
    }
}
