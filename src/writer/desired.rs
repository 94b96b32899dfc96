//! What the maps should hold for a model: ids, VIP and workload entries,
//! endpoint sets by priority, DNS answers as endpoints, own target ports.
//! Pure computation; `MapWriter::write` turns the difference into map
//! operations.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use super::{
    admit::{local_network, Admission},
    MapWriter,
};
use crate::{
    bpf::{
        backend_addr, config_value, endpoint_value, kmesh_addr, manage_value, port_to_map,
        service_value, waypoint, workload_value, EP_PORTS, NETNS_WAYPOINT,
    },
    model::{
        canonical, endpoint_priority, fresh_id, HealthPolicy, HealthStatus, Layers, LbMode,
        LoadBalancing, PortMapping, Service, Waypoint, WaypointTarget, Workload,
    },
};

/// Stable u32 service ids. Never reused within a process, so a program
/// still holding an old id can only miss, never alias another. Keys are
/// the model's own allocations (Arc), not copies. There is no reverse
/// index: id → key is a scan, done only for error messages, and once per
/// dump. (Workloads carry their ids in the model.)
#[derive(Default)]
pub(super) struct IdSpace {
    pub(super) by_key: HashMap<Arc<str>, u32>,
    next: u32,
}

impl IdSpace {
    pub(super) fn get_or_alloc(&mut self, key: &Arc<str>) -> u32 {
        if let Some(id) = self.by_key.get(key) {
            return *id;
        }
        self.next += 1;
        let id = self.next;
        self.by_key.insert(key.clone(), id);
        id
    }

    pub(super) fn key(&self, id: u32) -> Option<&str> {
        self.by_key
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(k, _)| &**k)
    }

    pub(super) fn names(&self) -> HashMap<u32, &str> {
        self.by_key.iter().map(|(k, v)| (*v, &**k)).collect()
    }

    pub(super) fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        self.by_key.retain(|_, id| keep(*id));
    }
}

/// (service id, workload id, service port) → the workload's own target
/// port, where it differs from the service's.
pub(super) type PortOverrides = HashMap<(u32, u32, u16), u16>;

/// The entries of a workload's port list for a service that change where
/// its connections go: a target port other than the service's own.
fn own_ports<'a>(
    svc: &'a [PortMapping],
    own: &'a [PortMapping],
) -> impl Iterator<Item = &'a PortMapping> {
    own.iter().filter(|p| {
        let effective = |t: u16| if t == 0 { p.service_port } else { t };
        p.target_port != 0
            && svc.iter().any(|s| {
                s.service_port == p.service_port
                    && effective(s.target_port) != effective(p.target_port)
            })
    })
}

/// A netns's km_manage value: its one global address per family is where
/// its unbound sockets connect from (two or more: left to the kernel's
/// choice, so not used).
fn enrolled_value(flags: u32, addrs: &[IpAddr]) -> manage_value {
    let one = |v4: bool| {
        let mut of = addrs
            .iter()
            .map(|a| canonical(*a))
            .filter(|a| a.is_ipv4() == v4);
        match (of.next(), of.next()) {
            (Some(a), None) => Some(a),
            _ => None,
        }
    };
    manage_value {
        enrolled: 1,
        flags,
        src4: match one(true) {
            Some(IpAddr::V4(a)) => crate::bpf::ip4_to_map(a),
            _ => 0,
        },
        src6: one(false).map(kmesh_addr::from_ip).unwrap_or_default(),
    }
}

/// The desired map contents for a model, before endpoint ordering.
pub(super) struct Desired {
    /// Service id → (value without endpoint counts, VIPs).
    pub(super) services: HashMap<u32, (service_value, Vec<IpAddr>)>,
    pub(super) workload_ips: HashMap<IpAddr, workload_value>,
    pub(super) endpoints: HashMap<(u32, u32), BTreeSet<u32>>,
    pub(super) backends: HashMap<u32, endpoint_value>,
    pub(super) ports: PortOverrides,
    pub(super) manage: BTreeMap<u64, manage_value>,
    pub(super) config: config_value,
    /// Services whose connections keep their original destination.
    pub(super) passthrough: Vec<(Arc<str>, Vec<IpAddr>)>,
    /// A DNS workload's k-th endpoint id (k ≥ 1) → the workload's id.
    pub(super) owner: HashMap<u32, u32>,
    /// Hostname → the answer its endpoints carry.
    pub(super) answers: HashMap<Box<str>, Vec<IpAddr>>,
    /// Identity numbers the workload entries hold (none without policies).
    pub(super) identities: std::collections::HashSet<u32>,
    pub(super) weights: super::weights::Weights, // traffic:
}

impl Desired {
    pub(super) fn vips(&self) -> impl Iterator<Item = &IpAddr> {
        self.services.values().flat_map(|(_, vips)| vips)
    }

    /// Whether connections need the sockops program: to be accelerated,
    /// or to carry a waypoint's TLV.
    pub(super) fn needs_sockops(&self) -> bool {
        self.config.accelerate != 0
            || self.services.values().any(|(s, _)| s.waypoint.port != 0)
            || self.workload_ips.values().any(|w| w.waypoint.port != 0)
            || self.backends.values().any(|b| b.waypoint.port != 0)
            // traffic: the breaker counts in sockops
            || self.services.values().any(|(s, _)| s.max_connections != 0)
    }
}

/// A DNS answer as endpoint addresses: an endpoint holds one address per
/// family, so the k-th endpoint pairs the k-th IPv4 and IPv6 answers (the
/// shorter list wraps). Every endpoint then serves both families when the
/// name has both, and each answered address is some endpoint's.
fn pair_families(ips: &[IpAddr]) -> Vec<backend_addr> {
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = ips.iter().partition(|a| a.is_ipv4());
    let n = v4.len().max(v6.len());
    (0..n)
        .map(|k| {
            let pick = |l: &[IpAddr]| (!l.is_empty()).then(|| l[k % l.len()]);
            let both: Vec<IpAddr> = [pick(&v4), pick(&v6)].into_iter().flatten().collect();
            backend_addr::from_ips(&both)
        })
        .collect()
}

/// The data path's form of a waypoint; a service waypoint becomes that
/// service's first VIP (the programs then pick one of its pods). An
/// unknown service leaves no waypoint, with a warning naming both ends.
fn resolve_waypoint(wp: Option<&Waypoint>, model: Layers, owner: &str) -> waypoint {
    let Some(wp) = wp else {
        return waypoint::default();
    };
    let ip = match &wp.target {
        WaypointTarget::Address(ip) => Some(*ip),
        WaypointTarget::Service(key) => model
            .service(key)
            .and_then(|s| s.addresses.first())
            .map(|a| a.address),
    };
    match ip {
        Some(ip) => waypoint {
            addr: kmesh_addr::from_ip(ip),
            port: port_to_map(wp.port),
        },
        None => {
            tracing::warn!(
                "{owner}: waypoint {:?} has no address; connections go direct",
                wp.target
            );
            waypoint::default()
        }
    }
}

impl MapWriter {
    /// What the maps should hold for the entries `a` admitted.
    pub(super) fn desired<'a>(&mut self, model: Layers<'a>, a: &Admission<'a>) -> Desired {
        let mut d = Desired {
            services: HashMap::new(),
            workload_ips: HashMap::new(),
            endpoints: HashMap::new(),
            backends: HashMap::new(),
            ports: PortOverrides::new(),
            manage: model
                .enrolled()
                .into_iter()
                .filter(|(cookie, _)| !a.cookies.contains(cookie))
                .map(|(cookie, e)| {
                    let flags = if e.waypoint { NETNS_WAYPOINT } else { 0 };
                    (cookie, enrolled_value(flags, &e.addrs))
                })
                .collect(),
            config: config_value {
                accelerate: model.accelerate().into(),
                queue_limit: model.accel_queue_limit(),
            },
            passthrough: Vec::new(),
            owner: HashMap::new(),
            answers: HashMap::new(),
            identities: Default::default(),
            weights: Default::default(), // traffic:
        };
        let authz_on = model.policies().next().is_some();
        // A service without a VIP cannot be connected to: nothing to write.
        let mut routable: HashMap<&str, Member<'a>> = HashMap::new();
        for (key, svc) in model.services() {
            if a.services.contains(&**key) {
                continue;
            }
            match self.service_entry(key, svc, model) {
                ServiceEntry::Passthrough(addrs) => d.passthrough.push((key.clone(), addrs)),
                ServiceEntry::Routed(id, v, vips) => {
                    routable.insert(key, (id, &svc.load_balancing, &svc.ports));
                    d.weights.service(id, model.traffic(key)); // traffic:
                    d.services.insert(id, (v, vips));
                }
                ServiceEntry::NoVip => {}
            }
        }
        let mut members = Vec::new();
        for w in model.workloads() {
            if a.workloads.contains(&w.id()) {
                continue;
            }
            // xDS may send a workload before its service.
            members.clear();
            members.extend(w.services.iter().filter_map(|r| {
                let &(sid, lb, ports) = routable.get(&*r.key)?;
                Some((sid, lb, ports, &r.ports[..]))
            }));
            self.add_workload(&mut d, w, model, a, &members, authz_on);
        }
        super::weights::Weights::finish(&mut d); // traffic:
        d
    }

    /// A service's VIP entry (its value without endpoint counts, and its
    /// VIPs on this node's network).
    pub(super) fn service_entry(
        &mut self,
        key: &Arc<str>,
        svc: &Service,
        model: Layers,
    ) -> ServiceEntry {
        if svc.load_balancing.mode == LbMode::Passthrough {
            return ServiceEntry::Passthrough(svc.addresses.iter().map(|a| a.address).collect());
        }
        // Only addresses on this node's network are frontends here.
        let local = &self.local.network;
        let mut vips: Vec<IpAddr> = svc
            .addresses
            .iter()
            .filter(|x| local_network(&x.network, local))
            .map(|x| canonical(x.address))
            .collect();
        vips.dedup();
        if vips.is_empty() {
            return ServiceEntry::NoVip;
        }
        let id = self.service_ids.get_or_alloc(key);
        let mut v = service_value {
            service_id: id,
            waypoint: resolve_waypoint(svc.waypoint.as_ref(), model, key),
            lb_policy: match svc.load_balancing.mode {
                LbMode::Random => 0,
                LbMode::Strict => 1,
                LbMode::Failover => 2,
                LbMode::Passthrough => unreachable!("passthrough services get no VIP entry"),
            },
            ..Default::default()
        };
        for (i, p) in svc.ports.iter().enumerate() {
            v.service_port[i] = port_to_map(p.service_port);
            if p.target_port != 0 {
                v.target_port[i] = port_to_map(p.target_port);
            }
        }
        super::limits::set_limits(&mut v, key, model.traffic(key)); // traffic:
        ServiceEntry::Routed(id, v, vips)
    }

    /// Adds what one workload puts in the maps to `d`: its addresses, its
    /// endpoint entries, and its membership in each of `members` (the
    /// routable services it names: id, load balancing, the service's
    /// ports, its own port list).
    pub(super) fn add_workload(
        &mut self,
        d: &mut Desired,
        w: &Workload,
        model: Layers,
        a: &Admission,
        members: &[(u32, &LoadBalancing, &[PortMapping], &[PortMapping])],
        authz_on: bool,
    ) {
        let id = w.id();
        let wp = resolve_waypoint(w.waypoint(), model, w.uid());
        if !w.host_network && local_network(w.network(), &self.local.network) {
            let identity = if authz_on {
                let n = self.authz.identity(w.identity());
                d.identities.insert(n);
                n
            } else {
                0
            };
            for ip in w.addresses.iter() {
                let v = workload_value {
                    workload_id: id,
                    waypoint: wp,
                    identity,
                };
                d.workload_ips.insert(canonical(*ip), v);
            }
        }
        // A static workload is one endpoint; a hostname workload one per
        // address pair of its current answer (none until resolved).
        // (No allocation for the common, static case: 100k per apply.)
        let (single, pairs);
        let addrs: &[backend_addr] = match w.hostname() {
            None => {
                single = [backend_addr::from_ips(&w.addresses)];
                &single
            }
            Some(host) => {
                let answer = a
                    .answers
                    .get(host)
                    .or_else(|| self.resolved.get(host))
                    .map_or(&[][..], Vec::as_slice);
                let answer = usable_answer(&mut self.refused_answers, host, answer, a);
                pairs = pair_families(&answer);
                d.answers.insert(host.into(), answer);
                &pairs
            }
        };
        // (Pushed to only for a DNS workload's second endpoint on.)
        let mut extra = Vec::new();
        for (k, &addr) in addrs.iter().enumerate() {
            let eid = match k {
                0 => id,
                _ => {
                    let eid = *self
                        .extra_ids
                        .entry((id, k as u32))
                        .or_insert_with(fresh_id);
                    d.owner.insert(eid, id);
                    eid
                }
            };
            let v = endpoint_value {
                workload_id: eid,
                addr,
                waypoint: wp,
                ..Default::default()
            };
            d.backends.insert(eid, v);
            if k > 0 {
                extra.push(eid);
            }
        }
        let first = [id];
        let ids: Vec<u32>;
        let ids: &[u32] = match addrs.len() {
            0 => &[],
            1 => &first,
            _ => {
                ids = first.iter().chain(&extra).copied().collect();
                &ids
            }
        };
        for &(sid, lb, svc_ports, own) in members {
            // Unhealthy workloads stay reachable directly but take no
            // new service traffic, unless the service takes them all.
            if w.status != HealthStatus::Healthy && lb.health_policy != HealthPolicy::AllowAll {
                continue;
            }
            let Some(prio) = endpoint_priority(lb, &self.local, w) else {
                continue;
            };
            d.endpoints.entry((sid, prio)).or_default().extend(ids);
            d.weights.note(sid, prio, ids, w); // traffic:
            for p in own_ports(svc_ports, own) {
                for eid in ids {
                    d.ports.insert((sid, *eid, p.service_port), p.target_port);
                    if let Some(b) = d.backends.get_mut(eid) {
                        b.flags |= EP_PORTS;
                    }
                }
            }
        }
    }
}

/// A routable service a workload names: its id, load balancing and
/// ports.
type Member<'a> = (u32, &'a LoadBalancing, &'a [PortMapping]);

/// What a service puts in the VIP map.
pub(super) enum ServiceEntry {
    /// Connections keep their original destination: no entry.
    Passthrough(Vec<IpAddr>),
    /// No address on this node's network: no entry.
    NoVip,
    Routed(u32, service_value, Vec<IpAddr>),
}

/// A DNS answer's addresses that may become endpoints: not the address
/// of a service or workload the maps route (a name answering with another
/// service's VIP would hand its connections to that service). Each address
/// left out is logged once (`logged` remembers).
fn usable_answer(
    logged: &mut std::collections::HashSet<(Box<str>, IpAddr)>,
    host: &str,
    answer: &[IpAddr],
    a: &Admission,
) -> Vec<IpAddr> {
    let mut out = Vec::with_capacity(answer.len());
    for ip in answer.iter().map(|ip| canonical(*ip)) {
        if let Some((_, holder)) = a.frontends.get(&ip) {
            if logged.insert((host.into(), ip)) {
                tracing::warn!(
                    "DNS {host}: answer {ip} is the address of {}; not used as an endpoint",
                    holder.key()
                );
            }
            continue;
        }
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}
