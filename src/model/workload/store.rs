//! The store of workloads: dense slots with an index of slot numbers
//! instead of a hash map of whole workloads, and the ids it hands out.

use std::{
    fmt,
    hash::BuildHasher,
    ops::Index,
    sync::atomic::{AtomicU32, Ordering},
};

use hashbrown::HashTable;

use super::Workload;

/// Process-wide, so that workloads of different sources (config file,
/// xDS) never share one, and never reused: a data-path entry still naming
/// an old id can only miss, never alias another workload.
static NEXT_ID: AtomicU32 = AtomicU32::new(1);

/// A workload id no other workload has had in this process.
pub fn fresh_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Workloads by uid. A uid keeps its id for as long as it stays here,
/// across replacements; a new uid gets a fresh one.
#[derive(Clone, Default)]
pub struct Workloads {
    slots: Vec<Workload>,
    /// Slot numbers, hashed by their workload's uid: 4 bytes per entry
    /// where a map of uid to workload would hold key and value in every
    /// bucket, empty ones included.
    index: HashTable<u32>,
    hasher: std::hash::RandomState,
}

impl Workloads {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Workload> {
        self.slots.iter()
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(Workload::uid)
    }

    fn slot(&self, uid: &str) -> Option<usize> {
        let h = self.hasher.hash_one(uid);
        let slots = &self.slots;
        self.index
            .find(h, |&i| slots[i as usize].uid() == uid)
            .map(|&i| i as usize)
    }

    pub fn get(&self, uid: &str) -> Option<&Workload> {
        self.slot(uid).map(|i| &self.slots[i])
    }

    pub fn contains_key(&self, uid: &str) -> bool {
        self.slot(uid).is_some()
    }

    /// Room for `additional` more without the doubling a Vec does: at 100k
    /// workloads doubling would leave megabytes unused.
    pub fn reserve(&mut self, additional: usize) {
        let free = self.slots.capacity() - self.slots.len();
        if additional > free {
            let step = additional.max(self.slots.len() / 8);
            self.slots.reserve_exact(step);
        }
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index
            .reserve(additional, |&i| hasher.hash_one(slots[i as usize].uid()));
    }

    /// Inserts or replaces by uid; a replacement keeps the uid's id. A new
    /// uid keeps the id `w` already has (moved from another `Workloads`)
    /// or gets a fresh one.
    pub fn insert(&mut self, mut w: Workload) -> Option<Workload> {
        if let Some(i) = self.slot(w.uid()) {
            w.id = self.slots[i].id;
            return Some(std::mem::replace(&mut self.slots[i], w));
        }
        if w.id == 0 {
            w.id = fresh_id();
        }
        self.reserve(1);
        let h = self.hasher.hash_one(w.uid());
        self.slots.push(w);
        let i = (self.slots.len() - 1) as u32;
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index
            .insert_unique(h, i, |&j| hasher.hash_one(slots[j as usize].uid()));
        None
    }

    pub fn remove(&mut self, uid: &str) -> Option<Workload> {
        let h = self.hasher.hash_one(uid);
        let slots = &self.slots;
        let entry = self
            .index
            .find_entry(h, |&i| slots[i as usize].uid() == uid)
            .ok()?;
        let (i, _) = entry.remove();
        let last = (self.slots.len() - 1) as u32;
        if i != last {
            // The last slot moves into the hole.
            let hl = self.hasher.hash_one(self.slots[last as usize].uid());
            *self
                .index
                .find_mut(hl, |&j| j == last)
                .expect("every slot is indexed") = i;
        }
        let w = self.slots.swap_remove(i as usize);
        // Give back what a mass removal left unused.
        if self.slots.capacity() > 64 && self.slots.capacity() / 2 > self.slots.len() {
            self.slots
                .shrink_to(self.slots.len() + self.slots.len() / 8);
        }
        Some(w)
    }

    /// Gives workloads that `old` also has the ids they had there, so a
    /// source rebuilt from scratch (a config file reload) rewrites nothing
    /// that did not change.
    pub fn inherit_ids(&mut self, old: &Workloads) {
        for w in &mut self.slots {
            if let Some(o) = old.get(w.uid()) {
                w.id = o.id;
            }
        }
    }
}

impl PartialEq for Workloads {
    fn eq(&self, o: &Self) -> bool {
        self.len() == o.len() && self.iter().all(|w| o.get(w.uid()) == Some(w))
    }
}

impl Eq for Workloads {}

impl fmt::Debug for Workloads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|w| (w.uid(), w)))
            .finish()
    }
}

impl Index<&str> for Workloads {
    type Output = Workload;
    fn index(&self, uid: &str) -> &Workload {
        self.get(uid)
            .unwrap_or_else(|| panic!("no workload {uid:?}"))
    }
}

impl<'a> IntoIterator for &'a Workloads {
    type Item = &'a Workload;
    type IntoIter = std::slice::Iter<'a, Workload>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::workload::tests::wl;

    #[test]
    fn ids_survive_replacement_and_swap_removal() {
        let mut ws = Workloads::default();
        for i in 0..100 {
            assert!(ws.insert(wl(&format!("c//Pod/ns/p{i}"))).is_none());
        }
        let id = |ws: &Workloads, uid: &str| ws.get(uid).map(Workload::id);
        let p7 = id(&ws, "c//Pod/ns/p7").unwrap();
        let p99 = id(&ws, "c//Pod/ns/p99").unwrap();
        // Replacing keeps the id; removing moves the last slot, which
        // must stay findable.
        let mut again = wl("c//Pod/ns/p7");
        again.host_network = true;
        assert!(ws.insert(again).is_some());
        assert_eq!(id(&ws, "c//Pod/ns/p7"), Some(p7));
        assert!(ws.get("c//Pod/ns/p7").unwrap().host_network);
        assert!(ws.remove("c//Pod/ns/p3").is_some());
        assert!(ws.remove("c//Pod/ns/p3").is_none());
        assert_eq!(id(&ws, "c//Pod/ns/p99"), Some(p99));
        assert_eq!(ws.len(), 99);
        for i in (0..100).filter(|&i| i != 3) {
            assert!(ws.contains_key(&format!("c//Pod/ns/p{i}")), "p{i}");
        }
        // A uid that comes back is a new workload: a new id.
        ws.insert(wl("c//Pod/ns/p3"));
        assert!(id(&ws, "c//Pod/ns/p3").unwrap() > p99);
        // Mass removal gives memory back and keeps the rest findable.
        for i in 0..90 {
            ws.remove(&format!("c//Pod/ns/p{i}"));
        }
        assert_eq!(ws.keys().count(), 10);
        assert_eq!(id(&ws, "c//Pod/ns/p99"), Some(p99));
    }

    #[test]
    fn a_rebuilt_source_inherits_ids() {
        let mut old = Workloads::default();
        old.insert(wl("a"));
        old.insert(wl("b"));
        let mut new = Workloads::default();
        new.insert(wl("b"));
        new.insert(wl("c"));
        new.inherit_ids(&old);
        assert_eq!(new["b"].id(), old["b"].id());
        assert_ne!(new["c"].id(), old["a"].id());
        assert_eq!(new, {
            let mut m = Workloads::default();
            m.insert(wl("c"));
            m.insert(wl("b"));
            m
        });
    }
}
