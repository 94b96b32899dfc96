//! The changes an incremental apply takes: each changed entry once, with
//! its versions before and now, or the reason it must go to the full
//! apply. Apart from `apply_changes` because these checks only read (the
//! model, the written maps, the cache) and decide; nothing here writes.

use std::{collections::HashSet, net::IpAddr};

use super::Cache;
use crate::{
    model::{canonical, Changes, EntryKey, Layers, LbMode, Service, Workload},
    writer::{admit::local_network, MapWriter},
};

/// A changed entry, as the model has it now.
pub(super) struct Change<'a, T> {
    pub(super) key: &'a str,
    pub(super) old: Option<&'a T>,
    pub(super) new: Option<&'a T>,
}

impl MapWriter {
    /// Each changed entry once, with its version before and now; an error
    /// naming why if one of them is not for the incremental path.
    #[allow(clippy::type_complexity)]
    pub(super) fn changed<'a>(
        &self,
        model: Layers<'a>,
        changes: &'a Changes,
        cache: &Cache,
    ) -> Result<(Vec<Change<'a, Service>>, Vec<Change<'a, Workload>>), &'static str> {
        let mut seen = HashSet::new();
        let mut services = Vec::new();
        for (key, old) in &changes.services {
            if !seen.insert(&**key) {
                continue;
            }
            if model
                .0
                .iter()
                .filter(|m| m.services.contains_key(&**key))
                .count()
                > 1
            {
                return Err("a service defined by two sources");
            }
            let c = Change {
                key,
                old: old.as_deref(),
                new: model.service(key),
            };
            let passthrough = |s: Option<&Service>| {
                s.is_some_and(|s| s.load_balancing.mode == LbMode::Passthrough)
            };
            if passthrough(c.old) || passthrough(c.new) {
                return Err("a passthrough service");
            }
            if c.new.is_some_and(|s| s.validate().is_err()) {
                return Err("an invalid service");
            }
            // Splits and limits: see the module comment.
            if model.traffic(key).is_some() {
                return Err("a service with a traffic policy");
            }
            let first = |s: Option<&Service>| s.and_then(|s| s.addresses.first()).cloned();
            if cache.service_waypoints > 0 && first(c.old) != first(c.new) {
                return Err("a waypoint service's address");
            }
            let routed = self
                .service_ids
                .by_key
                .get(&**key)
                .is_some_and(|id| cache.routed.contains(id));
            let why = match (c.old, c.new) {
                // Its members are whoever names it: unchanged only if how
                // they are members is.
                (Some(o), Some(n)) if routed => (o.load_balancing != n.load_balancing
                    || o.ports != n.ports)
                    .then_some("a service's load balancing or ports"),
                (None, _) if routed => Some("a service with no version before"),
                // Not routed before: members would have to be found.
                (_, Some(_)) if !routed && cache.refs.contains_key(&**key) => {
                    Some("a service that workloads already name")
                }
                _ => None,
            };
            if let Some(why) = why {
                return Err(why);
            }
            services.push(c);
        }
        let mut seen = HashSet::new();
        let mut workloads = Vec::new();
        for (uid, old) in &changes.workloads {
            if !seen.insert(&**uid) {
                continue;
            }
            let mut holders = model.0.iter().rev().filter_map(|m| m.workloads.get(uid));
            let new = holders.next();
            if holders.next().is_some() {
                return Err("a workload defined by two sources");
            }
            let c = Change {
                key: uid,
                old: old.as_ref(),
                new,
            };
            let dns = |w: Option<&Workload>| w.is_some_and(|w| w.hostname().is_some());
            if dns(c.old) || dns(c.new) {
                return Err("a hostname workload");
            }
            let weighted = |w: Option<&Workload>| w.is_some_and(|w| w.weight() != 1);
            if weighted(c.old) || weighted(c.new) {
                return Err("a weighted workload");
            }
            if c.new.is_some_and(|w| w.validate().is_err()) {
                return Err("an invalid workload");
            }
            workloads.push(c);
        }
        // Entries left out stay out only if nothing they need changes: not
        // themselves, no address they hold or want.
        let left_out: HashSet<&EntryKey> = self.last.rejected.iter().map(|r| &r.entry).collect();
        if !left_out.is_empty() {
            let named = services
                .iter()
                .any(|c| left_out.contains(&EntryKey::Service(c.key.into())))
                || workloads
                    .iter()
                    .any(|c| left_out.contains(&EntryKey::Workload(c.key.into())));
            if named {
                return Err("an entry the last apply left out");
            }
        }
        let wanted = self.wanted_by(model, &left_out);
        if !self.claims_are_free(&services, &workloads, &wanted) {
            return Err("an address another entry holds, wants or gives up");
        }
        Ok((services, workloads))
    }

    /// The frontend addresses the entries left out would claim.
    fn wanted_by(&self, model: Layers, left_out: &HashSet<&EntryKey>) -> HashSet<IpAddr> {
        let mut out = HashSet::new();
        for e in left_out {
            match e {
                EntryKey::Service(k) => {
                    let s = model.service(k).into_iter();
                    out.extend(s.flat_map(|s| &s.addresses).map(|a| canonical(a.address)));
                }
                EntryKey::Workload(uid) => {
                    let w = model.workload(uid);
                    out.extend(
                        w.into_iter()
                            .flat_map(|w| w.addresses.iter().map(|a| canonical(*a))),
                    );
                }
                EntryKey::Enrollment(_) | EntryKey::Resource(_) => {}
            }
        }
        out
    }

    /// Whether every address the changed entries claim is free for them:
    /// held by no one, by themselves, or by a changed entry that gives it
    /// up. (Anything else is a conflict the full apply decides.)
    fn claims_are_free(
        &self,
        services: &[Change<Service>],
        workloads: &[Change<Workload>],
        wanted: &HashSet<IpAddr>,
    ) -> bool {
        let local = &self.local.network;
        let vips = |s: Option<&Service>| -> Vec<IpAddr> {
            let mut v: Vec<IpAddr> = s
                .into_iter()
                .flat_map(|s| &s.addresses)
                .filter(|a| local_network(&a.network, local))
                .map(|a| canonical(a.address))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let ips = |w: Option<&Workload>| -> Vec<IpAddr> {
            let mut v: Vec<IpAddr> = w
                .filter(|w| !w.host_network && local_network(w.network(), local))
                .into_iter()
                .flat_map(|w| w.addresses.iter().map(|a| canonical(*a)))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        // (address, who: Ok(service key) / Err(workload id))
        let mut released: HashSet<IpAddr> = HashSet::new();
        let mut claims: Vec<(IpAddr, Result<&str, u32>)> = Vec::new();
        for c in services {
            let (old, new) = (vips(c.old), vips(c.new));
            released.extend(old.iter().filter(|a| !new.contains(a)));
            claims.extend(new.into_iter().map(|a| (a, Ok(c.key))));
        }
        for c in workloads {
            let (old, new) = (ips(c.old), ips(c.new));
            released.extend(old.iter().filter(|a| !new.contains(a)));
            let id = c.new.map_or(0, Workload::id);
            claims.extend(new.into_iter().map(|a| (a, Err(id))));
        }
        // An entry left out may want what is given up or claimed.
        if !wanted.is_empty()
            && (!released.is_empty() || claims.iter().any(|c| wanted.contains(&c.0)))
        {
            return false;
        }
        let mut claimed = HashSet::new();
        for (ip, who) in claims {
            if !claimed.insert(ip) {
                return false;
            }
            let free = match (
                self.written.vips.get(&ip),
                self.written.workload_ips.get(&ip),
            ) {
                (None, None) => true,
                (Some((sid, _)), None) => {
                    released.contains(&ip)
                        || who.is_ok_and(|k| self.service_ids.by_key.get(k) == Some(sid))
                }
                (None, Some(wid)) => released.contains(&ip) || who == Err(*wid),
                (Some(_), Some(_)) => false,
            };
            if !free {
                return false;
            }
        }
        true
    }
}
