//! One bad entry never blocks the others (issue 17): refusals by entry,
//! one spelling per address, networks, priorities, capacity as the maps
//! will hold it, DNS answers. Against real kernel maps.

use libbpf_rs::MapCore;

use super::tests::{kernel_endpoints, model, service, workload, writer};
use super::*;
use crate::bpf::addr_key;
use crate::{
    bpf::{service_value, MapSizes},
    model::{
        Addresses, EntryKey, LbMode, LoadBalancing, NetworkAddress, Placement, Service, Workload,
        WorkloadExtra,
    },
};

fn rejected(r: &ApplyReport) -> Vec<String> {
    r.rejected
        .iter()
        .map(|x| format!("{}: {}", x.entry, x.reason))
        .collect()
}

/// The service id the kernel's km_vip entry for `vip` names, if any.
fn vip_service(w: &MapWriter, vip: &str) -> Option<u32> {
    let key = addr_key::from_ip(vip.parse().unwrap());
    let v = w
        .datapath()
        .map(MapId::Vip)
        .lookup(key.as_bytes(), MapFlags::ANY)
        .unwrap()?;
    Some(service_value::from_bytes(&v).unwrap().service_id)
}

fn vip_entries(w: &MapWriter) -> usize {
    w.datapath().map(MapId::Vip).keys().count()
}

/// Item 2: `::ffff:10.96.0.10` is `10.96.0.10`. Before, service B took
/// all of A's traffic, and removing B deleted A's VIP entry.
#[test]
fn a_v4_mapped_vip_is_the_same_address() {
    let mut w = writer(MapSizes::default());
    let a = service("a", "10.96.0.10");
    let b = service("b", "::ffff:10.96.0.10");
    w.apply(&model(&[&a], &[])).unwrap();
    let a_id = vip_service(&w, "10.96.0.10").unwrap();
    let r = w.apply(&model(&[&a, &b], &[])).unwrap();
    assert_eq!(
        rejected(&r),
        [
            "service default/b.default.svc.cluster.local: address 10.96.0.10 is already held by \
          service default/a.default.svc.cluster.local; left out until that changes"
        ]
    );
    assert_eq!(vip_service(&w, "10.96.0.10"), Some(a_id), "A keeps its VIP");
    assert_eq!(vip_entries(&w), 1);
    // B goes: A's entry stays, also after another apply.
    for _ in 0..2 {
        let r = w.apply(&model(&[&a], &[])).unwrap();
        assert!(r.rejected.is_empty());
        assert_eq!(vip_service(&w, "10.96.0.10"), Some(a_id));
    }
    // The same for workload addresses, and the file check sees it too.
    let w1 = workload("w1", "10.244.0.11", &a);
    let w2 = workload("w2", "::ffff:10.244.0.11", &a);
    let both = model(&[&a], &[w1, w2]);
    let e = both.validate().unwrap_err().to_string();
    assert!(
        e.contains("10.244.0.11") && e.contains("w1") && e.contains("w2"),
        "{e}"
    );
    let r = w.apply(&both).unwrap();
    assert_eq!(r.rejected.len(), 1, "{:?}", rejected(&r));
    assert_eq!(w.datapath().map(MapId::Workload).keys().count(), 1);
    // One workload listing both spellings has two IPv4 addresses.
    let mut w3 = workload("w3", "10.244.0.12", &a);
    w3.addresses = vec![
        "10.244.0.12".parse().unwrap(),
        "::ffff:10.244.0.12".parse().unwrap(),
    ]
    .into();
    let e = w3.validate().unwrap_err().to_string();
    assert!(e.contains("2 IPv4"), "{e}");
}

/// Item 1: 7 routing-preference scopes made the writer index past the
/// 7-level table (daemon exit 101 at every start). Unknown or repeated
/// scopes are refused by name; 6 distinct ones fit.
#[test]
fn routing_preferences_never_index_past_the_table() {
    let mut w = writer(MapSizes::default());
    let prefs = |scopes: &[&str]| LoadBalancing {
        mode: LbMode::Failover,
        routing_preference: scopes.iter().map(|s| s.to_string()).collect(),
        ..LoadBalancing::default()
    };
    let mut far = workload("far", "10.244.9.1", &service("x", "10.96.0.1"));
    far.set_placement(Some(Placement {
        region: "elsewhere".into(),
        ..Placement::default()
    }));
    let mut bad = service("bad", "10.96.0.20");
    bad.load_balancing = prefs(&["REGION", "ZONE", "ZONE", "NODE", "CLUSTER", "NETWORK", "X"]);
    let mut unknown = service("unknown", "10.96.0.21");
    unknown.load_balancing = prefs(&["REGION", "GALAXY"]);
    let mut six = service("six", "10.96.0.22");
    six.load_balancing = prefs(&["REGION", "ZONE", "SUBZONE", "NODE", "CLUSTER", "NETWORK"]);
    let mut member = far.clone();
    member.services = [&bad, &unknown, &six]
        .iter()
        .map(|s| crate::model::ServiceRef {
            key: s.key().into(),
            ports: vec![],
        })
        .collect();
    let m = model(&[&bad, &unknown, &six], &[member]);
    let r = w.apply(&m).unwrap();
    let msgs = rejected(&r).join("\n");
    assert!(
        msgs.contains("default/bad") && msgs.contains("\"ZONE\" is listed twice"),
        "{msgs}"
    );
    assert!(
        msgs.contains("default/unknown") && msgs.contains("\"GALAXY\" is not a scope"),
        "{msgs}"
    );
    assert_eq!(r.rejected.len(), 2, "{msgs}");
    // The far workload matches none of six scopes: priority 6, the last.
    let d = w.dump(Layers(&[&m]));
    let six_dump = d.services.iter().find(|s| s.name.contains("six")).unwrap();
    assert_eq!(six_dump.endpoints.keys().copied().collect::<Vec<_>>(), [6]);
    assert!(m.validate().is_err(), "check-config refuses the file");
}

/// Item 4: an address is keyed by (network, address), as Istio does. The
/// same pod IP on another network is no conflict (only addresses on this
/// node's network are frontends here), and a real conflict leaves out one
/// entry while every later change still applies.
#[test]
fn a_conflict_leaves_out_one_entry_and_later_changes_apply() {
    let mut w = writer(MapSizes::default());
    let web = service("web", "10.96.0.10");
    let local = workload("c1//Pod/default/p", "10.244.0.11", &web);
    let mut remote = workload("cluster2//Pod/default/p", "10.244.0.11", &web);
    remote.set_network("network2");
    let r = w
        .apply(&model(&[&web], &[local.clone(), remote.clone()]))
        .unwrap();
    assert!(r.rejected.is_empty(), "{:?}", rejected(&r));
    assert_eq!(w.datapath().map(MapId::Workload).keys().count(), 1);

    // A ServiceEntry whose VIP is a pod's address: the newcomer is left
    // out, the pod keeps its address.
    let mut se = service("se", "10.244.0.11");
    se.hostname = "db.example.com".into();
    let r = w
        .apply(&model(&[&web, &se], &[local.clone(), remote.clone()]))
        .unwrap();
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(
        r.rejected[0].entry,
        EntryKey::Service("default/db.example.com".into())
    );
    assert!(r.rejected[0].reason.contains("workload c1//Pod/default/p"));
    // A later, unrelated change still reaches the maps.
    let api = service("api", "10.96.0.11");
    let r = w
        .apply(&model(&[&web, &se, &api], &[local.clone(), remote]))
        .unwrap();
    assert_eq!(r.rejected.len(), 1);
    assert!(vip_service(&w, "10.96.0.11").is_some());
    assert!(vip_service(&w, "10.244.0.11").is_none());
    // The conflict goes (the pod leaves): the ServiceEntry gets its VIP.
    let r = w.apply(&model(&[&web, &se, &api], &[])).unwrap();
    assert!(r.rejected.is_empty());
    assert!(vip_service(&w, "10.244.0.11").is_some());
    // With no incumbent, a service wins over a workload.
    let mut fresh = writer(MapSizes::default());
    let r = fresh.apply(&model(&[&web, &se], &[local])).unwrap();
    assert_eq!(
        r.rejected[0].entry,
        EntryKey::Workload("c1//Pod/default/p".into())
    );
}

/// Item 5, capacity: an entry that does not fit is left out and named;
/// what fits applies, and the entry goes in once there is room.
#[test]
fn an_entry_that_does_not_fit_is_left_out_alone() {
    let mut w = writer(MapSizes {
        workload_ips: 2,
        ..MapSizes::default()
    });
    let web = service("web", "10.96.0.10");
    let w1 = workload("w1", "10.244.0.1", &web);
    let w2 = workload("w2", "10.244.0.2", &web);
    let w3 = workload("w3", "10.244.0.3", &web);
    w.apply(&model(&[&web], &[w1.clone(), w2.clone()])).unwrap();
    let api = service("api", "10.96.0.11");
    let r = w
        .apply(&model(&[&web, &api], &[w1.clone(), w2.clone(), w3.clone()]))
        .unwrap();
    assert_eq!(
        rejected(&r),
        [
            "workload w3: does not fit km_workload (3 entries needed, capacity 2; raise \
          --max-workload-ips); left out"
        ]
    );
    assert!(
        vip_service(&w, "10.96.0.11").is_some(),
        "the new service applied"
    );
    assert_eq!(w.datapath().map(MapId::Workload).keys().count(), 2);
    let m = model(&[&web], &[w1, w2, w3.clone()]);
    assert_eq!(w.dump(Layers(&[&m])).rejected.len(), 1);
    // w1 leaves: w3 fits now.
    let m = model(&[&web], &[w3, workload("w2", "10.244.0.2", &web)]);
    let r = w.apply(&m).unwrap();
    assert!(r.rejected.is_empty(), "{:?}", rejected(&r));
    assert_eq!(kernel_endpoints(&w, &m).len(), 2);
}

/// Item 6: a model that exactly fills the maps applies on a running
/// writer as at start. Before, a list shrinking 4 -> 2 while another grew
/// 2 -> 4 was counted as 8 entries against 6.
#[test]
fn a_model_that_exactly_fills_the_maps_applies_while_running() {
    let mut w = writer(MapSizes {
        endpoints: 6,
        ..MapSizes::default()
    });
    let a = service("a", "10.96.0.1");
    let b = service("b", "10.96.0.2");
    let on = |svc: &Service, from: u8, n: u8| -> Vec<Workload> {
        (from..from + n)
            .map(|i| workload(&format!("{}{i}", svc.name), &format!("10.244.0.{i}"), svc))
            .collect()
    };
    let first = [on(&a, 1, 4), on(&b, 11, 2)].concat();
    w.apply(&model(&[&a, &b], &first)).unwrap();
    let second = [on(&a, 1, 2), on(&b, 11, 4)].concat();
    let m = model(&[&a, &b], &second);
    let r = w.apply(&m).unwrap();
    assert!(r.rejected.is_empty(), "{:?}", rejected(&r));
    assert_eq!(w.datapath().map(MapId::Endpoint).keys().count(), 6);
    let d = w.dump(Layers(&[&m]));
    for s in &d.services {
        let mut eps = s.endpoints[&0].clone();
        eps.sort();
        let want: Vec<String> = if s.name.contains("/a.") {
            vec!["a1".into(), "a2".into()]
        } else {
            ["b11", "b12", "b13", "b14"].map(String::from).to_vec()
        };
        assert_eq!(eps, want, "{}", s.name);
    }
    // A full replacement of every endpoint, at capacity, too.
    let third = [on(&a, 21, 3), on(&b, 31, 3)].concat();
    let r = w.apply(&model(&[&a, &b], &third)).unwrap();
    assert!(r.rejected.is_empty(), "{:?}", rejected(&r));
    assert_eq!(w.datapath().map(MapId::Endpoint).keys().count(), 6);
}

fn dns_workload(uid: &str, host: &str, svc: &Service) -> Workload {
    let mut dw = workload(uid, "10.0.0.1", svc);
    dw.addresses = Addresses::None;
    dw.set_extra(WorkloadExtra {
        hostname: Some(host.into()),
        ..Default::default()
    });
    dw
}

fn answers(host: &str, ips: impl IntoIterator<Item = String>) -> ResolvedHosts {
    let ips = ips.into_iter().map(|a| a.parse().unwrap()).collect();
    ResolvedHosts::from([(host.into(), ips)])
}

/// Item 5, DNS: an answer larger than the maps (100 records against 64
/// endpoint slots) made every apply fail. Now the name keeps its previous
/// answer, the rest applies; a name with no previous answer is left out.
#[test]
fn a_dns_answer_larger_than_the_maps_keeps_the_previous_one() {
    let mut w = writer(MapSizes {
        endpoints: 64,
        ..MapSizes::default()
    });
    let ext = service("ext", "240.0.0.10");
    let dw = dns_workload("se-ext", "api.example.test", &ext);
    let m = model(&[&ext], std::slice::from_ref(&dw));
    let few = (1..=3).map(|i| format!("192.0.2.{i}"));
    w.set_resolved(answers("api.example.test", few));
    w.apply(&m).unwrap();
    assert_eq!(kernel_endpoints(&w, &m).len(), 3);

    let many = (1..=100).map(|i| format!("198.18.0.{i}"));
    w.set_resolved(answers("api.example.test", many.clone()));
    let api = service("api", "10.96.0.11");
    let m2 = model(&[&ext, &api], std::slice::from_ref(&dw));
    let r = w.apply(&m2).unwrap();
    assert!(r.rejected.is_empty(), "{:?}", rejected(&r));
    assert!(r.notes[0].contains("api.example.test") && r.notes[0].contains("km_endpoint"));
    assert_eq!(
        kernel_endpoints(&w, &m2).len(),
        3,
        "the previous answer stays"
    );
    assert!(vip_service(&w, "10.96.0.11").is_some(), "the rest applies");
    assert_eq!(w.dump(Layers(&[&m2])).dns["api.example.test"].len(), 3);

    // A name never answered before that does not fit is left out.
    let mut fresh = writer(MapSizes {
        endpoints: 64,
        ..MapSizes::default()
    });
    fresh.set_resolved(answers("api.example.test", many));
    let r = fresh.apply(&m2).unwrap();
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(r.rejected[0].entry, EntryKey::Workload("se-ext".into()));
    assert!(vip_service(&fresh, "10.96.0.11").is_some());
}

/// Item 8 (the part only the writer can see): an answer that is the
/// address of a service or workload of the mesh is not an endpoint.
#[test]
fn a_dns_answer_naming_a_mesh_address_is_not_an_endpoint() {
    let mut w = writer(MapSizes::default());
    let ext = service("ext", "240.0.0.10");
    let web = service("web", "10.96.0.10");
    let pod = workload("pod", "10.244.0.5", &web);
    let dw = dns_workload("se-ext", "api.example.test", &ext);
    let m = model(&[&ext, &web], &[dw, pod]);
    let ips = ["10.96.0.10", "10.244.0.5", "::ffff:192.0.2.9", "192.0.2.9"];
    w.set_resolved(answers("api.example.test", ips.map(String::from)));
    w.apply(&m).unwrap();
    let d = w.dump(Layers(&[&m]));
    assert_eq!(d.dns["api.example.test"], ["192.0.2.9"]);
}

/// Addresses on another network are not frontends here, whatever the
/// source: a service VIP of network2 gets no km_vip entry on network1.
#[test]
fn addresses_of_other_networks_are_not_frontends() {
    let mut w = writer(MapSizes::default());
    w.set_local_node(LocalNode {
        network: "network1".into(),
        ..LocalNode::default()
    });
    let mut svc = service("web", "10.96.0.10");
    svc.addresses.push(NetworkAddress::new(
        "network2",
        "10.96.1.10".parse().unwrap(),
    ));
    svc.addresses.push(NetworkAddress::new(
        "network1",
        "10.96.2.10".parse().unwrap(),
    ));
    let r = w.apply(&model(&[&svc], &[])).unwrap();
    assert!(r.rejected.is_empty());
    assert!(vip_service(&w, "10.96.0.10").is_some(), "no network: local");
    assert!(vip_service(&w, "10.96.1.10").is_none());
    assert!(vip_service(&w, "10.96.2.10").is_some());
}
