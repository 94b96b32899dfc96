//! Circuit breaker and rate limit (bpf/lib/limits.h): the limits in each
//! service value, the connection counters the programs keep (made here,
//! never reset while connections may count in them), the sweep of token
//! buckets nobody uses any more, and the dump's view of all of it.

use std::collections::{BTreeMap, HashSet};

use libbpf_rs::{MapCore, MapFlags};
use serde::Serialize;

use super::{desired::Desired, ApplyStats, MapWriter, WriterError};
use crate::{
    bpf::{
        addr_key, bucket_key, conn_note, limit_id, service_value, svc_conns, MapId, Pod, MAX_PRIO,
    },
    model::{Layers, RateLimit, TrafficPolicy},
};

/// A service's id for its counters: its key hashed (FNV-1a, 64 bits), so
/// that the next daemon, which numbers services anew, finds the counts of
/// the connections still open.
pub(super) fn limit_key(key: &str) -> [u32; 2] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    [h as u32, (h >> 32) as u32]
}

/// Puts the limits of `tp` into a service's value.
pub(super) fn set_limits(v: &mut service_value, key: &str, tp: Option<&TrafficPolicy>) {
    let Some(tp) = tp else { return };
    if tp.max_connections.is_none() && tp.rate_limit.is_none() {
        return;
    }
    v.limit_id = limit_key(key);
    v.max_connections = tp.max_connections.unwrap_or(0);
    if let Some(r) = tp.rate_limit {
        v.rl_max_tokens = r.max_tokens;
        v.rl_tokens_per_fill = r.tokens_per_fill;
        v.rl_fill_interval_ms = r.fill_interval_ms;
    }
}

/// KMESH_NOTE_LIMIT_COUNTED (bpf/include/kmesh.h).
const NOTE_LIMIT_COUNTED: u32 = 4;
/// Past every SYN retry of a connect (tcp_syn_retries 6 gives up after
/// about 127 s): a note this old that the breaker does not count belongs
/// to no handshake any more.
const NOTE_MAX_AGE_NS: u64 = 300 * 1_000_000_000;

fn id_of(v: &service_value) -> limit_id {
    limit_id { id: v.limit_id }
}

impl MapWriter {
    /// Makes a counter for each service with a breaker (keeping one that
    /// exists: it counts open connections), and removes counters no
    /// service uses and no connection counts in, and the token buckets
    /// of services without a rate limit or of netns no longer enrolled.
    pub(super) fn sync_limits(
        &mut self,
        d: &Desired,
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        let mut breakers = HashSet::new();
        let mut limited = HashSet::new();
        for (v, _) in d.services.values() {
            if v.max_connections != 0 {
                breakers.insert(v.limit_id);
                let map = self.dp.map(MapId::SvcConns);
                let zero = svc_conns::default();
                match map.update(id_of(v).as_bytes(), zero.as_bytes(), MapFlags::NO_EXIST) {
                    Ok(()) => st.updates += 1,
                    Err(e) if e.kind() == libbpf_rs::ErrorKind::AlreadyExists => {}
                    Err(source) => {
                        return Err(WriterError::Kernel {
                            op: "update",
                            map: MapId::SvcConns.name(),
                            what: self.service_name(v.service_id),
                            source,
                        })
                    }
                }
            }
            if v.rl_max_tokens != 0 {
                limited.insert(v.limit_id);
            }
        }
        let idle: Vec<limit_id> = entries::<limit_id, svc_conns>(self, MapId::SvcConns)
            .into_iter()
            .filter(|(k, c)| !breakers.contains(&k.id) && c.active <= 0)
            .map(|(k, _)| k)
            .collect();
        for k in idle {
            self.delete(
                MapId::SvcConns,
                &k,
                || "an unused connection counter".into(),
                st,
            )?;
        }
        let stale: Vec<bucket_key> = self
            .dp
            .map(MapId::Bucket)
            .keys()
            .filter_map(|k| bucket_key::from_bytes(&k))
            .filter(|k| !limited.contains(&k.id) || !d.manage.contains_key(&k.netns))
            .collect();
        for k in stale {
            self.delete(MapId::Bucket, &k, || "an unused token bucket".into(), st)?;
        }
        Ok(())
    }

    /// Removes the notes of connects that never sent a SYN (the kernel
    /// refused them after connect4/6 let them through, e.g. no local port
    /// left), which sockops never sees: a note not counted by the breaker
    /// and older than any handshake. Counted notes go with their socket's
    /// close. Returns how many went. The daemon calls it once a minute
    /// (notes go at 300 s): not from applies, where it would read every
    /// note, one syscall each, whatever the apply changed.
    pub fn sweep_notes(&self) -> usize {
        let map = self.dp.map(MapId::ConnNote);
        let now = monotonic_ns();
        let old: Vec<Vec<u8>> = map
            .keys()
            .filter(|k| {
                map.lookup(k, MapFlags::ANY)
                    .ok()
                    .flatten()
                    .and_then(|v| conn_note::from_bytes(&v))
                    .is_some_and(|n| {
                        n.flags & NOTE_LIMIT_COUNTED == 0
                            && now.saturating_sub(n.start_ns) > NOTE_MAX_AGE_NS
                    })
            })
            .collect();
        old.iter().filter(|k| map.delete(k).is_ok()).count()
    }

    /// Weighted lists and limits with their live counts, for the dump.
    pub(super) fn traffic_dump(&self, model: Layers) -> Vec<TrafficDump> {
        let mut by_service: BTreeMap<u32, service_value> = BTreeMap::new();
        for (_, v) in entries::<addr_key, service_value>(self, MapId::Vip) {
            by_service.insert(v.service_id, v);
        }
        let counts: BTreeMap<[u32; 2], svc_conns> =
            entries::<limit_id, svc_conns>(self, MapId::SvcConns)
                .into_iter()
                .map(|(k, v)| (k.id, v))
                .collect();
        let buckets = self.read_buckets();
        let now = monotonic_ns();
        let breaker_off = self.dp.kernel().circuit_breaker.clone();
        let mut out = Vec::new();
        for (id, v) in by_service {
            if v.weighted_prios == 0 && v.max_connections == 0 && v.rl_max_tokens == 0 {
                continue;
            }
            let name = self.service_name(id);
            let c = counts.get(&v.limit_id);
            let rate_limit = (v.rl_max_tokens != 0).then_some(RateLimit {
                max_tokens: v.rl_max_tokens,
                tokens_per_fill: v.rl_tokens_per_fill,
                fill_interval_ms: v.rl_fill_interval_ms,
            });
            let pods = buckets
                .iter()
                .filter(|(k, _)| k.id == v.limit_id && rate_limit.is_some())
                .map(|(k, b)| BucketDump {
                    netns: k.netns,
                    source: self.enroll_source(k.netns).map(str::to_string),
                    tokens: refilled(b, &v, now),
                    rejected: b.rejected,
                })
                .collect();
            let weighted = (0..MAX_PRIO as u32)
                .filter(|p| v.weighted_prios & (1 << p) != 0)
                .map(|p| (p, self.slot_counts(model, id, p)))
                .collect();
            out.push(TrafficDump {
                service: name,
                weighted,
                max_connections: (v.max_connections != 0).then_some(v.max_connections),
                breaker_off: breaker_off.clone().filter(|_| v.max_connections != 0),
                active_connections: c.map(|c| c.active),
                breaker_rejected: c.map(|c| c.rejected),
                rate_limit,
                pods,
            });
        }
        out
    }

    /// Slots per endpoint of a weighted list, by workload uid.
    fn slot_counts(&self, model: Layers, sid: u32, prio: u32) -> Vec<(String, u32)> {
        let k = crate::bpf::lb_key {
            service_id: sid,
            prio,
        };
        let Some(t) = self
            .dp
            .map(MapId::Lb)
            .lookup(k.as_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .and_then(|b| crate::bpf::lb_table::from_bytes(&b))
        else {
            return Vec::new();
        };
        let list = self
            .written
            .endpoints
            .get(&(sid, prio))
            .cloned()
            .unwrap_or_default();
        list.iter()
            .enumerate()
            .map(|(i, &eid)| {
                let n = t.slot.iter().filter(|&&s| s as usize == i + 1).count() as u32;
                let uid = self
                    .workload_uid(model, eid)
                    .unwrap_or_else(|| format!("workload id {eid}"));
                (uid, n)
            })
            .collect()
    }

    fn read_buckets(&self) -> Vec<(bucket_key, RawBucket)> {
        let map = self.dp.map(MapId::Bucket);
        map.keys()
            .filter_map(|k| {
                let v = map.lookup(&k, MapFlags::ANY).ok().flatten()?;
                Some((bucket_key::from_bytes(&k)?, RawBucket::from_bytes(&v)?))
            })
            .collect()
    }
}

/// struct bucket as read (the kernel leaves its lock word zero).
#[derive(Debug, Clone, Copy)]
struct RawBucket {
    tokens: u32,
    last_fill_ns: u64,
    rejected: u64,
}

impl RawBucket {
    fn from_bytes(b: &[u8]) -> Option<Self> {
        let u32_at = |o: usize| Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_ne_bytes(b.get(o..o + 8)?.try_into().ok()?));
        // lock (4), tokens (4), last_fill_ns (8), rejected (8)
        Some(RawBucket {
            tokens: u32_at(4)?,
            last_fill_ns: u64_at(8)?,
            rejected: u64_at(16)?,
        })
    }
}

/// The tokens a connect would find now: the stored count plus the fills
/// due since, as the program will add them.
fn refilled(b: &RawBucket, v: &service_value, now: u64) -> u32 {
    let interval = v.rl_fill_interval_ms as u64 * 1_000_000;
    let fills = match interval {
        0 => 0,
        i => now.saturating_sub(b.last_fill_ns) / i,
    };
    let t = b.tokens as u64 + fills.saturating_mul(v.rl_tokens_per_fill as u64);
    t.min(v.rl_max_tokens as u64) as u32
}

/// bpf_ktime_get_ns's clock.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: t is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn entries<K: Pod, V: Pod>(w: &MapWriter, id: MapId) -> Vec<(K, V)> {
    let map = w.dp.map(id);
    map.keys()
        .filter_map(|k| {
            let v = map.lookup(&k, MapFlags::ANY).ok().flatten()?;
            Some((K::from_bytes(&k)?, V::from_bytes(&v)?))
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct TrafficDump {
    pub service: String,
    /// Weighted priorities: slots of the 1,024 per endpoint, in index order.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub weighted: BTreeMap<u32, Vec<(String, u32)>>,
    pub max_connections: Option<u32>,
    /// Why this kernel cannot count for the breaker (it then never refuses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker_off: Option<String>,
    /// Connections from this node open now (counted by the kernel).
    pub active_connections: Option<i64>,
    /// Connects the breaker refused.
    pub breaker_rejected: Option<u64>,
    pub rate_limit: Option<RateLimit>,
    /// Token buckets, one per client netns that connected.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<BucketDump>,
}

#[derive(Debug, Serialize)]
pub struct BucketDump {
    pub netns: u64,
    pub source: Option<String>,
    pub tokens: u32,
    /// Connects refused for want of a token.
    pub rejected: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::MapSizes;

    /// Only notes no breaker counts by and older than any handshake go.
    #[test]
    fn the_sweep_takes_only_old_uncounted_notes() {
        let w = super::super::tests::writer(MapSizes::default());
        let now = monotonic_ns();
        let old = now.saturating_sub(NOTE_MAX_AGE_NS + 1_000_000_000);
        let notes: [(u64, u32, u64); 4] = [
            (1, 2, old),                  // pending, never counted: goes
            (2, NOTE_LIMIT_COUNTED, old), // counted until its close: stays
            (3, 1, now),                  // a handshake going on: stays
            (4, 1, old),                  // telemetry only, long gone: goes
        ];
        let map = w.dp.map(MapId::ConnNote);
        for (cookie, flags, start_ns) in notes {
            let n = conn_note {
                flags,
                start_ns,
                ..Default::default()
            };
            map.update(&cookie.to_ne_bytes(), n.as_bytes(), MapFlags::ANY)
                .unwrap();
        }
        assert_eq!(w.sweep_notes(), 2);
        let mut left: Vec<u64> = map
            .keys()
            .map(|k| u64::from_ne_bytes(k[..8].try_into().unwrap()))
            .collect();
        left.sort();
        assert_eq!(left, [2, 3]);
    }
}
