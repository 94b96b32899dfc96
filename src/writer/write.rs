//! Writing the difference between a desired state and the maps, in the
//! order the module comment of mod.rs gives.

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
};

use super::{
    delta::Scope, desired::Desired, own_port_key, same, written::Prints, ApplyStats, MapWriter,
    WriterError,
};
use crate::{
    bpf::{addr_key, port_to_map, service_value, MapId, MAX_PRIO},
    model::Layers,
};

impl MapWriter {
    /// Writes the difference between `d` and the maps. With a `scope`
    /// (an incremental apply, delta.rs) only the entries it names are
    /// looked at, and `d`'s settings, enrollments and authorization are
    /// taken as unchanged.
    pub(super) fn write(
        &mut self,
        d: &Desired,
        authz: Option<&crate::authz::compile::Compiled>,
        model: Layers,
        st: &mut ApplyStats,
        scope: Option<&Scope>,
    ) -> Result<(), WriterError> {
        // 1. Stop routing to anything going away, and free its room before
        // anything new needs it: VIPs and workload addresses, the endpoint
        // lists behind removed VIPs, removed enrollments.
        let stale: Vec<IpAddr> = match scope {
            None => {
                let wanted: HashSet<&IpAddr> = d.vips().collect();
                let w = &self.written.vips;
                w.keys().filter(|ip| !wanted.contains(ip)).collect()
            }
            Some(s) => s.stale_vips(d, &self.written),
        };
        for ip in stale {
            self.delete(MapId::Vip, &addr_key::from_ip(ip), || ip.to_string(), st)?;
            self.written.vips.remove(&ip);
        }
        let stale: Vec<IpAddr> = match scope {
            None => self.written.workload_ips.keys().collect(),
            Some(s) => s
                .ips
                .iter()
                .copied()
                .filter(|ip| self.written.workload_ips.get(ip).is_some())
                .collect(),
        };
        for ip in stale
            .into_iter()
            .filter(|ip| !d.workload_ips.contains_key(ip))
        {
            self.delete(
                MapId::Workload,
                &addr_key::from_ip(ip),
                || ip.to_string(),
                st,
            )?;
            self.written.workload_ips.remove(&ip);
            self.authz.set_ip_identity(ip, 0);
        }
        let gone: BTreeSet<u32> = match scope {
            None => self.written.endpoints.keys().map(|(s, _)| *s).collect(),
            Some(s) => s.sids.clone(),
        };
        for sid in gone.into_iter().filter(|s| !d.services.contains_key(s)) {
            self.trim_endpoints(sid, &[0; MAX_PRIO], st)?;
        }
        if scope.is_none() {
            let gone: Vec<u64> = self
                .written
                .manage
                .keys()
                .filter(|c| !d.manage.contains_key(c))
                .copied()
                .collect();
            for cookie in gone {
                self.delete(
                    MapId::Manage,
                    &cookie,
                    || format!("netns cookie {cookie}"),
                    st,
                )?;
                self.written.manage.remove(&cookie);
            }
            // 2. Enrollment and settings.
            for (cookie, v) in &d.manage {
                if self
                    .written
                    .manage
                    .get(cookie)
                    .is_some_and(|old| same(old, v))
                {
                    continue;
                }
                self.update(
                    MapId::Manage,
                    cookie,
                    v,
                    || format!("netns cookie {cookie}"),
                    st,
                )?;
                self.written.manage.insert(*cookie, *v);
            }
            if !self.written.config.is_some_and(|old| same(&old, &d.config)) {
                self.update(MapId::Config, &0u32, &d.config, || "settings".into(), st)?;
                self.written.config = Some(d.config);
            }
        }
        // Own target ports go in before the endpoint entries flagged to
        // use them.
        let ports: Vec<((u32, u32, u16), u16)> = match scope {
            None => d.ports.iter().map(|(k, t)| (*k, *t)).collect(),
            Some(s) => s
                .ports
                .iter()
                .filter_map(|k| Some((*k, *d.ports.get(k)?)))
                .collect(),
        };
        for ((sid, wid, port), target) in ports {
            if self.written.ports.get(&(sid, wid, port)) == Some(&target) {
                continue;
            }
            let what = || format!("{} port {port}", self.workload_name(model, wid));
            self.update(
                MapId::Port,
                &own_port_key(sid, wid, port),
                &port_to_map(target),
                what,
                st,
            )?;
            self.written.ports.insert((sid, wid, port), target);
        }
        // 3. Endpoint lists (lists.rs): in place and shrinking first, then
        // growing, so the map never holds old and new lists at once. The
        // fingerprints are kept only once the workload addresses (step 5),
        // which rely on them too, are written.
        let (prints, moved): (Vec<(u32, Option<u64>)>, HashSet<u32>) = {
            let ids: Vec<u32> = match scope {
                None => d.backends.keys().copied().collect(),
                Some(s) => s.wids.clone(),
            };
            let prints: Vec<(u32, Option<u64>)> = ids
                .into_iter()
                .map(|id| (id, d.backends.get(&id).map(|v| self.print(v))))
                .collect();
            let moved = prints
                .iter()
                .filter(|(id, p)| p.is_some() && self.written.backends.get(*id) != *p)
                .map(|(id, _)| *id)
                .collect();
            (prints, moved)
        };
        let keys = self.list_keys(d, scope);
        let counts = self.sync_lists(d, keys, &moved, st)?;
        // traffic: pick tables of weighted lists (their indices are now in
        // place), and the breakers' counters, before the VIP values that
        // turn them on. (An incremental apply declines where either
        // changes: delta.rs.)
        if scope.is_none() {
            self.sync_weights(d, st)?;
            self.sync_limits(d, st)?;
        }
        // 4. Services: every VIP carries the full value, counts included.
        let services: Vec<u32> = match scope {
            None => d.services.keys().copied().collect(),
            Some(s) => s
                .sids
                .iter()
                .copied()
                .filter(|s| d.services.contains_key(s))
                .collect(),
        };
        for id in services {
            let (template, vips) = &d.services[&id];
            let counts = counts.get(&id).copied().unwrap_or_default();
            self.write_vips(id, template, vips, counts, st)?;
            self.trim_endpoints(id, &counts, st)?;
        }
        // Authorization: new policy sets in, destinations flipped to them
        // (writer/authz.rs), before the workload entries change identity.
        if let Some(authz) = authz {
            self.write_authz(authz, st)?;
        }
        // 5. Workload addresses: the value is the workload id, the
        // backend's waypoint and the identity number, so it changed if any
        // did.
        let ips: Vec<IpAddr> = match scope {
            None => d.workload_ips.keys().copied().collect(),
            Some(s) => s
                .ips
                .iter()
                .copied()
                .filter(|ip| d.workload_ips.contains_key(ip))
                .collect(),
        };
        for ip in &ips {
            let v = &d.workload_ips[ip];
            let wid = v.workload_id;
            if self.written.workload_ips.get(ip) == Some(&wid)
                && !moved.contains(&wid)
                && self.authz.ip_identity(ip) == v.identity
            {
                continue;
            }
            self.update(
                MapId::Workload,
                &addr_key::from_ip(*ip),
                v,
                || self.workload_name(model, wid),
                st,
            )?;
            self.written.workload_ips.insert(*ip, wid);
            self.authz.set_ip_identity(*ip, v.identity);
        }
        if authz.is_some() {
            self.retire_authz(d.identities.clone(), st)?;
        }
        match scope {
            None => {
                let all = prints.into_iter().filter_map(|(id, p)| Some((id, p?)));
                self.written.backends = Prints::new(all);
            }
            Some(_) => self.written.backends.set_many(prints),
        }
        // 6. Own ports no endpoint entry is flagged for any more.
        let gone: Vec<(u32, u32, u16)> = match scope {
            None => self.written.ports.keys().copied().collect(),
            Some(s) => s.ports.clone(),
        };
        for (sid, wid, port) in gone.into_iter().filter(|k| !d.ports.contains_key(k)) {
            if !self.written.ports.contains_key(&(sid, wid, port)) {
                continue;
            }
            let what = || format!("{} port {port}", self.workload_name(model, wid));
            self.delete(MapId::Port, &own_port_key(sid, wid, port), what, st)?;
            self.written.ports.remove(&(sid, wid, port));
        }
        Ok(())
    }

    /// Writes a service's value, with `counts`, to each of its VIPs whose
    /// entry differs.
    pub(super) fn write_vips(
        &mut self,
        id: u32,
        template: &service_value,
        vips: &[IpAddr],
        counts: [u32; MAX_PRIO],
        st: &mut ApplyStats,
    ) -> Result<(), WriterError> {
        let mut v = *template;
        v.prio_endpoint_count = counts;
        let print = (id, self.print(&v));
        for ip in vips {
            if self.written.vips.get(ip) == Some(&print) {
                continue;
            }
            self.update(
                MapId::Vip,
                &addr_key::from_ip(*ip),
                &v,
                || self.service_name(id),
                st,
            )?;
            self.written.vips.insert(*ip, print);
        }
        Ok(())
    }
}
