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
            IpAddr::V4(a) => self.v4.insert(a, v),
            IpAddr::V6(a) => self.v6.insert(a, v),
        };
    }

    pub(super) fn remove(&mut self, ip: &IpAddr) {
        match ip {
            IpAddr::V4(a) => self.v4.remove(a),
            IpAddr::V6(a) => self.v6.remove(a),
        };
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.v4.keys().map(|a| IpAddr::V4(*a));
        v4.chain(self.v6.keys().map(|a| IpAddr::V6(*a)))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.v4.values().chain(self.v6.values())
    }
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

    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.ids.iter().copied().zip(self.prints.iter().copied())
    }
}
