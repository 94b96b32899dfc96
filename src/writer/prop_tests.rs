//! Random sequences of models applied one after another (services and
//! workloads added, changed and removed; memberships, locality, health,
//! waypoints (by address and by service), identities, authorization
//! policies, DNS answers, address conflicts and full maps) must leave the
//! kernel maps consistent after every apply, and, where nothing was left
//! out, holding what a new writer's full apply of the same model into new
//! maps holds: the same entries by name, and the same authorization
//! decision for every probed connection. Seeded, so a failure names the
//! seed that reproduces it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use libbpf_rs::MapCore;
use serde_json::json;

use super::prop_authz::decisions;
use super::tests::{service, workload, writer};
use super::*;
use crate::{
    authz::Policy,
    bpf::{endpoint_key, endpoint_value, service_value, workload_value, MapSizes},
    model::{
        Addresses, HealthStatus, LbMode, LoadBalancing, Placement, Scope, Service, ServiceRef,
        Waypoint, WaypointTarget, Workload, WorkloadExtra, Workloads,
    },
};

pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub(super) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The mutable world the sequence edits; workloads keep their ids across
/// steps as a source's store does.
#[derive(Default)]
pub(super) struct World {
    pub(super) services: BTreeMap<String, Service>,
    pub(super) workloads: Workloads,
    policies: BTreeMap<String, Policy>,
    /// Netns cookie → its address: the node's pods, whose addresses are
    /// the destinations authorization is enforced for.
    enrolled: BTreeMap<u64, IpAddr>,
}

/// A policy over what the sequence varies: source ranges, namespaces,
/// service accounts, ports; ALLOW or DENY, some dry-run.
fn random_policy(r: &mut Rng, i: u64) -> Policy {
    let mut m = serde_json::Map::new();
    if r.chance(40) {
        let cidr = [
            "10.244.0.0/26",
            "10.244.0.64/27",
            "192.0.2.0/24",
            "0.0.0.0/0",
        ];
        m.insert("source_ips".into(), json!([cidr[r.below(4) as usize]]));
    }
    if r.chance(30) {
        m.insert("namespaces".into(), json!([{"exact": "a"}]));
    }
    if r.chance(30) {
        m.insert(
            "service_accounts".into(),
            json!([{"namespace": "default", "service_account": "x"}]),
        );
    }
    if r.chance(40) {
        let port = [8080, 80, 22][r.below(3) as usize];
        m.insert("destination_ports".into(), json!([port]));
    }
    let namespace = ["default", "a"][r.below(2) as usize];
    let scope = ["GLOBAL", "NAMESPACE"][r.below(2) as usize];
    let action = ["ALLOW", "DENY"][r.below(2) as usize];
    let p = json!({
        "name": format!("p{i}"),
        "namespace": namespace,
        "scope": scope,
        "action": action,
        "dry_run": r.chance(20),
        "rules": [{"clauses": [{"matches": [m]}]}],
    });
    serde_json::from_value(p).expect("a valid policy")
}

pub(super) const SERVICES: u64 = 8;
pub(super) const WORKLOADS: u64 = 24;

pub(super) fn random_service(r: &mut Rng, i: u64) -> Service {
    // VIPs and addresses from pools that make collisions occasional.
    let vip = format!("10.96.0.{}", r.below(SERVICES * 3));
    let mut s = service(&format!("s{i}"), &vip);
    if r.chance(20) {
        s.addresses.push(crate::model::NetworkAddress::new(
            "",
            format!("fd00::{}", r.below(12)).parse().unwrap(),
        ));
    }
    let scopes = ["REGION", "ZONE", "NODE"];
    s.load_balancing = LoadBalancing {
        mode: [LbMode::Random, LbMode::Strict, LbMode::Failover][r.below(3) as usize],
        routing_preference: scopes[..r.below(4) as usize]
            .iter()
            .map(|x| x.to_string())
            .collect(),
        ..LoadBalancing::default()
    };
    s.ports[0].target_port = [0, 8080, 9090][r.below(3) as usize];
    if r.chance(10) {
        s.waypoint = Some(Waypoint {
            target: WaypointTarget::Address("10.244.9.1".parse().unwrap()),
            port: 15008,
        });
    } else if r.chance(10) {
        // Another service's first VIP: a change there changes this one.
        s.waypoint = Some(service_waypoint(r));
    }
    s
}

fn service_waypoint(r: &mut Rng) -> Waypoint {
    let key = format!("default/s{}.default.svc.cluster.local", r.below(SERVICES));
    Waypoint {
        target: WaypointTarget::Service(key.into()),
        port: 15008,
    }
}

pub(super) fn random_workload(r: &mut Rng, w: &World, uid: &str) -> Workload {
    let keys: Vec<&Service> = w.services.values().collect();
    let ip = format!("10.244.0.{}", r.below(WORKLOADS * 8));
    let mut wl = match keys.first() {
        Some(s) => workload(uid, &ip, s),
        None => workload(uid, &ip, &service("none", "10.96.9.9")),
    };
    let mut members: Vec<ServiceRef> = Vec::new();
    for s in &keys {
        if !r.chance(35) {
            continue;
        }
        let ports = if r.chance(15) {
            vec![crate::model::PortMapping {
                service_port: 80,
                target_port: 7000 + r.below(3) as u16,
            }]
        } else {
            vec![]
        };
        members.push(ServiceRef {
            key: s.key().into(),
            ports,
        });
    }
    wl.services = members.into();
    wl.scope = Arc::new(Scope {
        namespace: ["default", "a"][r.below(2) as usize].into(),
        service_account: ["x", "y"][r.below(2) as usize].into(),
        ..Scope::default()
    });
    let waypoint = r.chance(10).then(|| service_waypoint(r));
    if r.chance(20) {
        wl.addresses = Addresses::None;
        wl.set_extra(WorkloadExtra {
            hostname: Some(format!("h{}.example.test", r.below(3)).into()),
            waypoint,
            ..Default::default()
        });
    } else if waypoint.is_some() {
        wl.set_extra(WorkloadExtra {
            waypoint,
            ..Default::default()
        });
    }
    if r.chance(15) {
        wl.status = HealthStatus::Unhealthy;
    }
    if r.chance(40) {
        wl.set_placement(Some(Placement {
            region: ["r1", "r2"][r.below(2) as usize].into(),
            zone: ["z1", "z2"][r.below(2) as usize].into(),
            node: ["n1", "n2"][r.below(2) as usize].into(),
            ..Placement::default()
        }));
    }
    wl
}

impl World {
    /// Enrolls or unenrolls a netns of this node.
    fn enroll(&mut self, r: &mut Rng) {
        // A pod of this node: usually a workload's address.
        let c = 1 + r.below(6);
        let ips: Vec<IpAddr> = self
            .workloads
            .iter()
            .flat_map(|w| w.addresses.iter().copied().collect::<Vec<_>>())
            .collect();
        match r.below(4) {
            0 => {
                self.enrolled.remove(&c);
            }
            _ if !ips.is_empty() => {
                let ip = ips[r.below(ips.len() as u64) as usize];
                if !self.enrolled.values().any(|x| *x == ip) {
                    self.enrolled.insert(c, ip);
                }
            }
            _ => {}
        }
    }

    fn step(&mut self, r: &mut Rng) {
        if r.chance(25) {
            self.enroll(r);
        }
        for _ in 0..=r.below(4) {
            match r.below(8) {
                6 if r.chance(50) => {
                    let i = r.below(4);
                    let p = random_policy(r, i);
                    self.policies.insert(p.key(), p);
                }
                6 => self.enroll(r),
                7 => {
                    let key = format!("{}/p{}", ["default", "a"][r.below(2) as usize], r.below(4));
                    self.policies.remove(&key);
                }
                0 | 1 => {
                    let i = r.below(SERVICES);
                    let s = random_service(r, i);
                    self.services.insert(s.key(), s);
                }
                2 => {
                    let i = r.below(SERVICES);
                    self.services
                        .remove(&format!("default/s{i}.default.svc.cluster.local"));
                }
                3 | 4 => {
                    let uid = format!("w{}", r.below(WORKLOADS));
                    let wl = random_workload(r, self, &uid);
                    self.workloads.insert(wl);
                }
                _ => {
                    let uid = format!("w{}", r.below(WORKLOADS));
                    self.workloads.remove(&uid);
                }
            }
        }
    }

    pub(super) fn model(&self) -> Model {
        let mut m = Model::default();
        for s in self.services.values() {
            m.insert_service(s.clone());
        }
        m.workloads = self.workloads.clone();
        for p in self.policies.values() {
            m.policies.insert(p.clone());
        }
        for (c, ip) in &self.enrolled {
            let e = crate::model::Enrollment {
                source: format!("netns {c}"),
                waypoint: false,
                addrs: vec![*ip],
            };
            m.enrolled.insert(*c, e);
        }
        m
    }
}

pub(super) fn answers(r: &mut Rng) -> ResolvedHosts {
    (0..3)
        .map(|h| {
            let n = r.below(4);
            let ips: Vec<IpAddr> = (0..n)
                .map(|_| format!("192.0.2.{}", r.below(6)).parse().unwrap())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            (format!("h{h}.example.test").into(), ips)
        })
        .collect()
}

/// The maps as names: VIP → (service name, lb, ports, per priority the
/// set of (workload uid, addresses)); workload address → uid; own ports.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Seen {
    vips: BTreeMap<String, (String, String)>,
    endpoints: BTreeMap<String, BTreeMap<u32, BTreeSet<String>>>,
    workloads: BTreeMap<String, String>,
    entries: BTreeMap<&'static str, usize>,
    /// "src -> dst:port" → the decision, where dst has policies.
    authz: BTreeMap<String, String>,
}

/// Probed connections: from some workloads, an outside address and the
/// node's, to every workload address, on the policies' ports and another.
fn probes(model: &Model) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let dsts: Vec<IpAddr> = model
        .workloads
        .iter()
        .flat_map(|w| w.addresses.iter().copied().collect::<Vec<_>>())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut srcs: Vec<IpAddr> = dsts.iter().step_by(3).copied().collect();
    srcs.extend(["192.0.2.7", "10.1.2.3", "fd00::7"].map(|a| a.parse::<IpAddr>().unwrap()));
    (srcs, dsts)
}

/// Reads the kernel maps, checking the invariants the programs rely on:
/// every VIP's endpoint indices 1..count exist, no index past a count, no
/// entry of a service no VIP leads to.
pub(super) fn read(w: &MapWriter, model: &Model) -> Result<Seen, String> {
    let dp = w.datapath();
    let mut counts: HashMap<u32, [u32; crate::bpf::MAX_PRIO]> = HashMap::new();
    let mut vips = BTreeMap::new();
    let mut endpoints: BTreeMap<String, BTreeMap<u32, BTreeSet<String>>> = BTreeMap::new();
    let name = |id: u32| w.service_key(id).map_or(format!("?{id}"), str::to_string);
    let uid = |id: u32| {
        w.workload_uid(Layers(&[model]), id)
            .unwrap_or_else(|| format!("?{id}"))
    };
    let vmap = dp.map(MapId::Vip);
    for k in vmap.keys() {
        let v = service_value::from_bytes(&vmap.lookup(&k, MapFlags::ANY).unwrap().unwrap())
            .unwrap()
            .to_owned();
        let ip = crate::bpf::addr_key::from_bytes(&k).unwrap().addr.to_ip();
        if let Some(old) = counts.insert(v.service_id, v.prio_endpoint_count) {
            if old != v.prio_endpoint_count {
                return Err(format!("{ip}: VIPs of one service disagree on counts"));
            }
        }
        let mut shape = v;
        shape.prio_endpoint_count = Default::default();
        shape.service_id = 0;
        vips.insert(
            ip.to_string(),
            (name(v.service_id), format!("{:?}", shape.as_bytes())),
        );
    }
    let emap = dp.map(MapId::Endpoint);
    let mut seen_keys = BTreeSet::new();
    for k in emap.keys() {
        let key = endpoint_key::from_bytes(&k).unwrap().to_owned();
        let v = endpoint_value::from_bytes(&emap.lookup(&k, MapFlags::ANY).unwrap().unwrap())
            .unwrap()
            .to_owned();
        let Some(c) = counts.get(&key.service_id) else {
            return Err(format!("endpoint of {} with no VIP", name(key.service_id)));
        };
        if key.index == 0 || key.index > c[key.prio as usize] {
            return Err(format!(
                "{} prio {} index {} past count {}",
                name(key.service_id),
                key.prio,
                key.index,
                c[key.prio as usize]
            ));
        }
        seen_keys.insert((key.service_id, key.prio, key.index));
        let addrs: Vec<String> = v.addr.to_ips().iter().map(|a| a.to_string()).collect();
        let base = uid(v.workload_id);
        let base = base.split('#').next().unwrap_or_default().to_string();
        endpoints
            .entry(name(key.service_id))
            .or_default()
            .entry(key.prio)
            .or_default()
            .insert(format!(
                "{base} {addrs:?} {:x} {:?}",
                v.flags,
                v.waypoint.as_bytes()
            ));
    }
    for (sid, c) in &counts {
        for (prio, n) in c.iter().enumerate() {
            for index in 1..=*n {
                if !seen_keys.contains(&(*sid, prio as u32, index)) {
                    return Err(format!("{} prio {prio}: a gap at {index}", name(*sid)));
                }
            }
        }
    }
    let wmap = dp.map(MapId::Workload);
    let mut held = Vec::new();
    for k in wmap.keys() {
        let v = workload_value::from_bytes(&wmap.lookup(&k, MapFlags::ANY).unwrap().unwrap())
            .unwrap()
            .to_owned();
        let ip = crate::bpf::addr_key::from_bytes(&k).unwrap().addr.to_ip();
        held.push((ip, uid(v.workload_id), v));
    }
    // Identity numbers depend on the writer's history; which entries
    // share one does not: each is named by the first uid holding it.
    held.sort_by(|a, b| a.1.cmp(&b.1));
    let mut ident: HashMap<u32, String> = HashMap::from([(0, "-".to_string())]);
    for (_, uid, v) in &held {
        ident.entry(v.identity).or_insert_with(|| uid.clone());
    }
    let workloads = held
        .iter()
        .map(|(ip, uid, v)| {
            let wp = format!("{:?}", v.waypoint.as_bytes());
            (
                ip.to_string(),
                format!("{uid} id={} wp={wp}", ident[&v.identity]),
            )
        })
        .collect();
    let (srcs, dsts) = probes(model);
    let authz = decisions(w, &srcs, &dsts, &[80, 8080, 22]);
    let entries = [MapId::Vip, MapId::Workload, MapId::Endpoint, MapId::Port]
        .into_iter()
        .map(|id| (id.name(), dp.map(id).keys().count()))
        .collect();
    Ok(Seen {
        vips,
        endpoints,
        workloads,
        entries,
        authz,
    })
}

/// Maps small enough that some steps do not fit.
pub(super) fn small_maps() -> MapSizes {
    MapSizes {
        endpoints: 40,
        ..MapSizes::default()
    }
}

/// The node the sequences' localities are ranked from.
pub(super) fn local_node() -> LocalNode {
    LocalNode {
        placement: Placement {
            region: "r1".into(),
            zone: "z1".into(),
            node: "n1".into(),
            ..Placement::default()
        },
        network: String::new(),
    }
}

#[test]
fn random_update_sequences_match_a_fresh_full_apply() {
    for seed in 1..=6u64 {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let small = small_maps();
        let mut w = writer(small);
        w.set_local_node(local_node());
        // Reused, emptied and checked empty before each comparison (a
        // new writer loads the programs: ~0.25 s each), and replaced by a
        // new one on new maps every 8th.
        let mut fresh = writer(small);
        let mut world = World::default();
        let (mut compared, mut refused, mut decided) = (0, 0, 0);
        for step in 0..60 {
            world.step(&mut r);
            let resolved = answers(&mut r);
            w.set_resolved(resolved.clone());
            let m = world.model();
            let report = w
                .apply(&m)
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            let seen = read(&w, &m).unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            if !report.rejected.is_empty() || !report.notes.is_empty() {
                refused += 1;
                continue;
            }
            if compared % 8 == 0 {
                fresh = writer(small);
            } else {
                fresh.apply(&Model::default()).unwrap();
                // (Config and the policy counters are arrays.)
                let hashes = MapId::WRITTEN
                    .into_iter()
                    .filter(|id| ![MapId::Config, MapId::AuthzCount].contains(id));
                for id in hashes {
                    let left = fresh.datapath().map(id).keys().count();
                    assert_eq!(
                        left,
                        0,
                        "seed {seed} step {step}: {} not emptied",
                        id.name()
                    );
                }
            }
            fresh.set_local_node(w.local.clone());
            fresh.set_resolved(resolved);
            let fr = fresh.apply(&m).unwrap();
            assert!(fr.rejected.is_empty(), "seed {seed} step {step}: {fr:?}");
            let want = read(&fresh, &m).unwrap();
            assert_eq!(seen, want, "seed {seed} step {step}");
            compared += 1;
            decided += usize::from(!want.authz.is_empty());
        }
        assert!(
            compared >= 15,
            "seed {seed}: only {compared} steps compared"
        );
        assert!(refused >= 1, "seed {seed}: no step left anything out");
        assert!(
            decided >= 5,
            "seed {seed}: policies decided in only {decided} steps"
        );
    }
}
