//! Writer tests against real kernel maps (programs loaded, not attached).

use std::collections::BTreeMap;

use libbpf_rs::MapCore;

use super::*;
use crate::{
    bpf::{endpoint_key, endpoint_value, service_value, MapSizes, EP_PORTS},
    model::{
        Addresses, HealthStatus, LbMode, LoadBalancing, NetworkAddress, PortMapping, Service,
        ServiceRef, Workload, WorkloadExtra, Workloads,
    },
};

pub(super) fn writer(sizes: MapSizes) -> MapWriter {
    MapWriter::new(Datapath::load(sizes).expect("load BPF"))
}

pub(super) fn service(name: &str, vip: &str) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        hostname: format!("{name}.default.svc.cluster.local"),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: vip.parse().unwrap(),
        }],
        ports: vec![PortMapping {
            service_port: 80,
            target_port: 8080,
        }],
        load_balancing: LoadBalancing::default(),
        waypoint: None,
    }
}

/// A workload with its id already given, so that it is the same workload
/// to the writer in each model built from it (as with a source that keeps
/// its store).
pub(super) fn workload(uid: &str, ip: &str, svc: &Service) -> Workload {
    let mut w = Workload::new(uid, uid, "default");
    w.addresses = Addresses::One(ip.parse().unwrap());
    w.services = Arc::new([ServiceRef {
        key: svc.key().into(),
        ports: vec![],
    }]);
    let mut ids = Workloads::default();
    ids.insert(w);
    ids.remove(uid).unwrap()
}

pub(super) fn model(services: &[&Service], workloads: &[Workload]) -> Model {
    let mut m = Model::default();
    for s in services {
        m.insert_service((*s).clone());
    }
    for w in workloads {
        m.insert_workload(w.clone());
    }
    m
}

/// Endpoint map contents for the one service in the dump, by index.
pub(super) fn kernel_endpoints(w: &MapWriter, m: &Model) -> BTreeMap<u32, String> {
    let map = w.datapath().map(MapId::Endpoint);
    map.keys()
        .map(|k| {
            let key = endpoint_key::from_bytes(&k).unwrap();
            let v = map.lookup(&k, MapFlags::ANY).unwrap().unwrap();
            let b = endpoint_value::from_bytes(&v).unwrap().workload_id;
            (key.index, w.workload_uid(Layers(&[m]), b).unwrap())
        })
        .collect()
}

#[test]
fn apply_is_idempotent_and_dump_matches() {
    let mut w = writer(MapSizes::default());
    let web = service("web", "10.96.0.10");
    let m = model(
        &[&web],
        &[
            workload("w1", "10.244.0.11", &web),
            workload("w2", "10.244.0.12", &web),
        ],
    );
    let first = w.apply(&m).unwrap().stats;
    // 1 VIP, 2 workload addresses, 2 endpoints, the settings.
    assert_eq!(
        first,
        ApplyStats {
            updates: 6,
            deletes: 0
        }
    );
    assert_eq!(w.apply(&m).unwrap().stats, ApplyStats::default());

    let d = w.dump(Layers(&[&m]));
    assert_eq!(d.services.len(), 1);
    let s = &d.services[0];
    assert_eq!(s.name, "default/web.default.svc.cluster.local");
    assert_eq!(s.addresses, vec!["10.96.0.10"]);
    assert_eq!(
        (s.ports[0].service_port, s.ports[0].target_port),
        (80, 8080)
    );
    let mut eps = s.endpoints[&0].clone();
    eps.sort();
    assert_eq!(eps, vec!["w1", "w2"]);
    assert_eq!(d.maps["km_vip"].entries, 1);
    assert_eq!(d.maps["km_workload"].entries, 2);
}

#[test]
fn removing_a_middle_endpoint_keeps_indices_dense() {
    let mut w = writer(MapSizes::default());
    let web = service("web", "10.96.0.10");
    let ws: Vec<Workload> = (1..=4)
        .map(|i| workload(&format!("w{i}"), &format!("10.244.0.{i}"), &web))
        .collect();
    let m = model(&[&web], &ws);
    w.apply(&m).unwrap();
    let before = kernel_endpoints(&w, &m);
    assert_eq!(before.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);

    let victim = before[&2].clone();
    let rest: Vec<Workload> = ws.iter().filter(|x| x.uid() != victim).cloned().collect();
    let m = model(&[&web], &rest);
    w.apply(&m).unwrap();
    let after = kernel_endpoints(&w, &m);
    assert_eq!(after.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    // The last entry moved into the hole; the others kept their index.
    assert_eq!(after[&2], before[&4]);
    assert_eq!(after[&1], before[&1]);
    assert_eq!(after[&3], before[&3]);
    assert!(!after.values().any(|u| *u == victim));
    assert_eq!(w.dump(Layers(&[&m])).services[0].endpoints[&0].len(), 3);
}

#[test]
fn unhealthy_workload_leaves_endpoints_but_stays_addressable() {
    let mut w = writer(MapSizes::default());
    let web = service("web", "10.96.0.10");
    let mut sick = workload("w2", "10.244.0.12", &web);
    sick.status = HealthStatus::Unhealthy;
    let m = model(&[&web], &[workload("w1", "10.244.0.11", &web), sick]);
    w.apply(&m).unwrap();
    let d = w.dump(Layers(&[&m]));
    assert_eq!(d.services[0].endpoints[&0], vec!["w1"]);
    assert_eq!(d.workloads.len(), 2);
    assert_eq!(d.maps["km_vip"].entries, 1);
    assert_eq!(d.maps["km_workload"].entries, 2);
}

#[test]
fn removing_everything_empties_every_map() {
    let mut w = writer(MapSizes::default());
    let web = service("web", "10.96.0.10");
    w.apply(&model(&[&web], &[workload("w1", "10.244.0.11", &web)]))
        .unwrap();
    w.apply(&Model::default()).unwrap();
    for id in [MapId::Vip, MapId::Workload, MapId::Endpoint, MapId::Manage] {
        assert_eq!(w.datapath().map(id).keys().count(), 0, "{}", id.name());
    }
}

#[test]
fn workload_address_change_rewrites_its_endpoint_entries() {
    let mut w = writer(MapSizes::default());
    let web = service("web", "10.96.0.10");
    let api = service("api", "10.96.0.11");
    let mut w1 = workload("w1", "10.244.0.1", &web);
    // Sorted by key.
    let api_ref = ServiceRef {
        key: api.key().into(),
        ports: vec![],
    };
    w1.services = Arc::new([api_ref, w1.services[0].clone()]);
    w.apply(&model(&[&web, &api], &[w1.clone()])).unwrap();

    w1.addresses = Addresses::One("10.244.0.99".parse().unwrap());
    let m = model(&[&web, &api], &[w1]);
    let st = w.apply(&m).unwrap().stats;
    // One endpoint entry per service, plus the workload address swap.
    assert_eq!(
        st,
        ApplyStats {
            updates: 3,
            deletes: 1
        }
    );
    let d = w.dump(Layers(&[&m]));
    for s in &d.services {
        assert_eq!(
            s.endpoint_addresses[&0],
            vec![vec!["10.244.0.99".to_string()]],
            "{}",
            s.name
        );
    }
    assert_eq!(d.workloads[0].addresses, vec!["10.244.0.99"]);
}

#[test]
fn service_change_rewrites_every_vip() {
    let mut w = writer(MapSizes::default());
    let mut web = service("web", "10.96.0.10");
    web.addresses.push(NetworkAddress {
        network: String::new(),
        address: "fd00:96::10".parse().unwrap(),
    });
    let w1 = workload("w1", "10.244.0.1", &web);
    w.apply(&model(&[&web], std::slice::from_ref(&w1))).unwrap();
    web.ports[0].target_port = 9090;
    let st = w.apply(&model(&[&web], &[w1])).unwrap().stats;
    assert_eq!(
        st,
        ApplyStats {
            updates: 2,
            deletes: 0
        }
    );
    let map = w.datapath().map(MapId::Vip);
    for k in map.keys() {
        let v =
            service_value::from_bytes(&map.lookup(&k, MapFlags::ANY).unwrap().unwrap()).unwrap();
        assert_eq!(crate::bpf::port_from_map(v.target_port[0]), 9090);
        assert_eq!(v.prio_endpoint_count[0], 1);
    }
}

/// A hostname workload's endpoints follow the resolver's answers: one per
/// address pair, entries of vanished addresses removed, nothing written
/// for the name itself as a direct-access address.
#[test]
fn dns_workload_endpoints_follow_answers() {
    let mut w = writer(MapSizes::default());
    let ext = service("ext", "240.0.0.10");
    let mut dw = workload("se-ext", "10.0.0.1", &ext);
    dw.addresses = Addresses::None;
    dw.set_extra(WorkloadExtra {
        hostname: Some("api.example.test".into()),
        ..Default::default()
    });
    let m = model(&[&ext], &[dw]);
    let set = |w: &mut MapWriter, ips: &[&str]| {
        let ips = ips.iter().map(|a| a.parse().unwrap()).collect();
        w.set_resolved(ResolvedHosts::from([("api.example.test".into(), ips)]));
        w.apply(&m).unwrap();
        let d = w.dump(Layers(&[&m]));
        assert_eq!(
            d.workloads.len(),
            0,
            "resolved IPs are not workload addresses"
        );
        let mut addrs: Vec<Vec<String>> = d.services[0]
            .endpoint_addresses
            .get(&0)
            .cloned()
            .unwrap_or_default();
        addrs.sort();
        (addrs, d.dns["api.example.test"].clone())
    };
    // Not resolved yet: the VIP exists, with no endpoints.
    w.apply(&m).unwrap();
    let d = w.dump(Layers(&[&m]));
    assert_eq!(d.services[0].endpoints.len(), 0);
    assert_eq!(d.dns["api.example.test"], Vec::<String>::new());

    let (eps, dns) = set(&mut w, &["192.0.2.1", "192.0.2.2", "2001:db8::1"]);
    // Two endpoints; the single IPv6 answer is paired with both.
    assert_eq!(
        eps,
        vec![
            vec!["192.0.2.1".to_string(), "2001:db8::1".into()],
            vec!["192.0.2.2".to_string(), "2001:db8::1".into()],
        ]
    );
    assert_eq!(dns.len(), 3);
    assert_eq!(kernel_endpoints(&w, &m).len(), 2);

    let (eps, _) = set(&mut w, &["192.0.2.3"]);
    assert_eq!(eps, vec![vec!["192.0.2.3".to_string()]]);
    assert_eq!(
        kernel_endpoints(&w, &m).len(),
        1,
        "the second entry is deleted"
    );

    let (eps, _) = set(&mut w, &[]);
    assert!(eps.is_empty());
    assert_eq!(kernel_endpoints(&w, &m).len(), 0);
}

#[test]
fn passthrough_service_has_no_vip_and_is_listed() {
    let mut w = writer(MapSizes::default());
    let mut ext = service("ext", "198.51.100.7");
    ext.load_balancing.mode = LbMode::Passthrough;
    let m = model(&[&ext], &[]);
    w.apply(&m).unwrap();
    let d = w.dump(Layers(&[&m]));
    assert!(d.services.is_empty());
    assert_eq!(d.maps["km_vip"].entries, 0);
    assert_eq!(d.passthrough.len(), 1);
    assert_eq!(
        d.passthrough[0].name,
        "default/ext.default.svc.cluster.local"
    );
    assert_eq!(d.passthrough[0].addresses, vec!["198.51.100.7"]);
}

/// Only a workload port list that changes the target port becomes a
/// km_port entry, and only its endpoint is flagged to look one up.
#[test]
fn own_target_ports_only_where_they_differ() {
    let mut w = writer(MapSizes::default());
    let web = service("web", "10.96.0.10");
    let own = |wl: &mut Workload, target: u16| {
        Arc::make_mut(&mut wl.services)[0].ports = vec![PortMapping {
            service_port: 80,
            target_port: target,
        }];
    };
    let (mut same, mut differs) = (
        workload("same", "10.244.0.11", &web),
        workload("differs", "10.244.0.12", &web),
    );
    own(&mut same, 8080);
    own(&mut differs, 9090);
    let m = model(&[&web], &[same.clone(), differs.clone()]);
    w.apply(&m).unwrap();
    let d = w.dump(Layers(&[&m]));
    assert_eq!(d.services[0].own_ports, vec!["differs: 80 -> 9090"]);
    assert_eq!(d.maps["km_port"].entries, 1);
    let flags: BTreeMap<u32, u32> = {
        let map = w.datapath().map(MapId::Endpoint);
        map.keys()
            .map(|k| {
                let v = map.lookup(&k, MapFlags::ANY).unwrap().unwrap();
                let v = endpoint_value::from_bytes(&v).unwrap();
                (v.workload_id, v.flags)
            })
            .collect()
    };
    let id = |uid: &str| m.workloads[uid].id();
    assert_eq!(flags[&id("differs")], EP_PORTS);
    assert_eq!(flags[&id("same")], 0);
    // Back to the service's mapping: the entry and the flag go.
    own(&mut differs, 8080);
    let m = model(&[&web], &[same, differs]);
    w.apply(&m).unwrap();
    let d = w.dump(Layers(&[&m]));
    assert_eq!(d.maps["km_port"].entries, 0);
    assert!(d.services[0].own_ports.is_empty());
}
