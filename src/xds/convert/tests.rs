//! Conversion tests: resources as istiod encodes them, refusals by name.

use super::*;

fn svc_pb() -> pb::Service {
    pb::Service {
        name: "web".into(),
        namespace: "default".into(),
        hostname: "web.default.svc.cluster.local".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 10],
            ..Default::default()
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn enc(t: pb::address::Type) -> Vec<u8> {
    pb::Address { r#type: Some(t) }.encode_to_vec()
}

#[test]
fn service_converts() {
    let r = address("default/web", &enc(pb::address::Type::Service(svc_pb()))).unwrap();
    let Resource::Service(s) = r else {
        panic!("{r:?}")
    };
    assert_eq!(s.key(), "default/web.default.svc.cluster.local");
    assert_eq!(
        s.addresses[0].address,
        "10.96.0.10".parse::<IpAddr>().unwrap()
    );
    assert_eq!(s.ports[0].target_port, 8080);
}

#[test]
fn bad_ip_bytes_named() {
    let mut s = svc_pb();
    s.addresses[0].address = vec![10, 96, 0, 10, 1];
    let e = address("default/web", &enc(pb::address::Type::Service(s))).unwrap_err();
    assert!(e.to_string().contains("addresses[0] has 5 bytes"), "{e}");
    assert_eq!(e.name, "default/web");
}

#[test]
fn too_many_ports_named() {
    let mut s = svc_pb();
    s.ports = (1..=11)
        .map(|p| pb::Port {
            service_port: p,
            target_port: 0,
            ..Default::default()
        })
        .collect();
    let e = address("default/web", &enc(pb::address::Type::Service(s))).unwrap_err();
    assert!(e.reason.contains("11 ports"), "{e}");
}

#[test]
fn workload_without_uid_rejected() {
    let w = pb::Workload {
        name: "w".into(),
        addresses: vec![vec![10, 244, 0, 1]],
        ..Default::default()
    };
    let e = address("x", &enc(pb::address::Type::Workload(w))).unwrap_err();
    assert!(e.reason.contains("no uid"), "{e}");
}

#[test]
fn workload_converts_with_services_and_host_network() {
    let w = pb::Workload {
        uid: "cluster1//Pod/default/w".into(),
        name: "w".into(),
        namespace: "default".into(),
        addresses: vec![
            vec![10, 244, 0, 1],
            "fd00::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
                .to_vec(),
        ],
        services: [(
            "default/web.default.svc.cluster.local".to_string(),
            pb::PortList {
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 9090,
                    ..Default::default()
                }],
            },
        )]
        .into(),
        status: pb::WorkloadStatus::Unhealthy as i32,
        network_mode: pb::NetworkMode::HostNetwork as i32,
        canonical_name: "web".into(),
        canonical_revision: "v2".into(),
        ..Default::default()
    };
    let Resource::Workload(w) = address(
        "cluster1//Pod/default/w",
        &enc(pb::address::Type::Workload(w)),
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!((w.canonical_name(), w.canonical_revision()), ("web", "v2"));
    assert_eq!(w.addresses.len(), 2);
    assert_eq!(w.status, HealthStatus::Unhealthy);
    assert!(w.host_network);
    assert_eq!(&*w.services[0].key, "default/web.default.svc.cluster.local");
    assert_eq!(w.services[0].ports[0].target_port, 9090);
}

#[test]
fn garbage_bytes_are_not_an_address() {
    let e = address("x", &[0xff, 0xff, 0xff]).unwrap_err();
    assert!(e.reason.contains("not an istio.workload.Address"), "{e}");
}

#[test]
fn hostname_workload_converts_and_excludes_addresses() {
    let w = pb::Workload {
        uid: "Kubernetes/networking.istio.io/ServiceEntry/default/ext/api.example.com".into(),
        name: "ext".into(),
        namespace: "default".into(),
        hostname: "api.example.com".into(),
        ..Default::default()
    };
    let Resource::Workload(m) = address("x", &enc(pb::address::Type::Workload(w.clone()))).unwrap()
    else {
        panic!()
    };
    assert_eq!(m.hostname(), Some("api.example.com"));
    let both = pb::Workload {
        addresses: vec![vec![10, 0, 0, 1]],
        ..w.clone()
    };
    let e = address("x", &enc(pb::address::Type::Workload(both))).unwrap_err();
    assert!(e.reason.contains("exclusive"), "{e}");
    let bad = pb::Workload {
        hostname: "api..example.com".into(),
        ..w
    };
    let e = address("x", &enc(pb::address::Type::Workload(bad))).unwrap_err();
    assert!(e.reason.contains("api..example.com"), "{e}");
}

/// Protobuf written by hand, field number by field number, so that the
/// tests check Istio's numbers rather than whatever proto/ says.
mod wire {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub fn uint(field: u64, v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(field << 3, &mut out);
        varint(v, &mut out);
        out
    }

    pub fn bytes(field: u64, b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint((field << 3) | 2, &mut out);
        varint(b.len() as u64, &mut out);
        out.extend_from_slice(b);
        out
    }

    pub fn str(field: u64, s: &str) -> Vec<u8> {
        bytes(field, s.as_bytes())
    }

    pub fn msg(field: u64, parts: &[Vec<u8>]) -> Vec<u8> {
        bytes(field, &parts.concat())
    }
}

/// An encoded Address holding service `name` (namespace default) with
/// one port 80 -> 8080; `extra` are more encoded Service fields.
fn service_wire(name: &str, extra: &[Vec<u8>]) -> Vec<u8> {
    let mut fields = vec![
        wire::str(1, name),
        wire::str(2, "default"),
        wire::str(3, &format!("{name}.default.svc.cluster.local")),
        wire::msg(5, &[wire::uint(1, 80), wire::uint(2, 8080)]),
    ];
    fields.extend_from_slice(extra);
    wire::msg(2, &fields)
}

/// NetworkAddress (as Service.addresses, field 4) with an optional
/// prefix length.
fn vip_wire(ip: &str, length: Option<u64>) -> Vec<u8> {
    let ip: IpAddr = ip.parse().unwrap();
    let raw = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut f = vec![wire::bytes(2, &raw)];
    f.extend(length.map(|l| wire::uint(3, l)));
    wire::msg(4, &f)
}

#[test]
fn istio_fields_decode_by_number_and_unknown_ones_are_ignored() {
    let bytes = service_wire(
        "web",
        &[
            vip_wire("10.96.0.10", Some(32)),
            vip_wire("fd00::10", None),
            // Port.app_protocol = 3 (GRPC).
            wire::msg(5, &[wire::uint(1, 81), wire::uint(3, 3)]),
            // LoadBalancing.health_policy = 3 (ALLOW_ALL); field 4 was
            // never Istio's: it must be ignored like any unknown field.
            wire::msg(8, &[wire::uint(3, 1), wire::uint(4, 1)]),
            wire::uint(11, 1),
            wire::uint(12, 1),
            // weighted_waypoints: GatewayAddress{address} weight 10.
            wire::msg(
                13,
                &[
                    wire::msg(
                        1,
                        &[
                            wire::msg(2, &[wire::bytes(2, &[10, 0, 0, 9])]),
                            wire::uint(3, 15008),
                        ],
                    ),
                    wire::uint(2, 10),
                ],
            ),
            wire::uint(14, 0),
            // A field from a newer istiod.
            wire::uint(99, 7),
        ],
    );
    let pb::Address {
        r#type: Some(pb::address::Type::Service(raw)),
    } = pb::Address::decode(&bytes[..]).unwrap()
    else {
        panic!("not a service")
    };
    assert_eq!(raw.addresses[0].length, Some(32));
    assert_eq!(raw.addresses[1].length, None);
    assert_eq!(raw.ports[1].app_protocol(), pb::AppProtocol::Grpc);
    assert!(raw.canonical && raw.ingress_use_waypoint);
    assert_eq!(raw.weighted_waypoints[0].weight, 10);
    assert_eq!(
        raw.weighted_waypoints[0]
            .destination
            .as_ref()
            .unwrap()
            .hbone_mtls_port,
        15008
    );
    assert_eq!(raw.visibility(), pb::service::Visibility::Public);

    let Resource::Service(s) = address("default/web", &bytes).unwrap() else {
        panic!()
    };
    assert_eq!(s.load_balancing.health_policy, HealthPolicy::AllowAll);
    let vips: Vec<String> = s.addresses.iter().map(|a| a.address.to_string()).collect();
    assert_eq!(vips, ["10.96.0.10", "fd00::10"]);
    assert_eq!(s.ports.len(), 2);
}

#[test]
fn authorization_fields_decode_by_number() {
    let sa = |ns: &str, name: &str| vec![wire::str(1, ns), wire::str(2, name)];
    let m = [
        wire::msg(11, &sa("default", "client")),
        wire::msg(12, &sa("default", "other")),
        wire::msg(13, &[wire::str(1, "x")]),
        wire::uint(99, 1),
    ];
    let bytes = [
        wire::str(1, "deny-other"),
        wire::str(2, "default"),
        wire::msg(5, &[wire::msg(1, &[wire::msg(2, &m)])]),
        wire::uint(6, 1),
        wire::msg(7, &[wire::str(1, "ext")]),
    ]
    .concat();
    let a = authorization("default/deny-other", &bytes).unwrap();
    // Extensions are decoded and ignored: harmless.
    assert!(a.dry_run);
    let m = &a.rules[0].clauses[0].matches[0];
    assert_eq!(m.service_accounts[0].namespace, "default");
    assert_eq!(m.service_accounts[0].service_account, "client");
    assert_eq!(m.not_service_accounts[0].service_account, "other");
}

#[test]
fn cidr_vip_is_refused_by_name() {
    let refused = |ip: &str, len: u64| {
        let bytes = service_wire("range", &[vip_wire(ip, Some(len))]);
        address("default/range", &bytes)
            .map(|r| format!("accepted as {r:?}"))
            .unwrap_err()
    };
    let e = refused("10.96.1.0", 24);
    assert_eq!(e.name, "default/range");
    assert!(e.reason.contains("10.96.1.0/24 is a CIDR range"), "{e}");
    let e = refused("fd00:1::", 64);
    assert!(e.reason.contains("fd00:1::/64 is a CIDR range"), "{e}");
    // Present but zero is a /0 (everything), not "unset".
    let e = refused("0.0.0.0", 0);
    assert!(e.reason.contains("0.0.0.0/0 is a CIDR range"), "{e}");
    let e = refused("10.96.1.1", 33);
    assert!(e.reason.contains("10.96.1.1/33"), "{e}");
    // A full-length prefix is one address; so is no length at all.
    for (ip, len) in [
        ("10.96.1.1", Some(32)),
        ("fd00::1", Some(128)),
        ("10.96.1.2", None),
    ] {
        let bytes = service_wire("one", &[vip_wire(ip, len)]);
        let Resource::Service(s) = address("default/one", &bytes).unwrap() else {
            panic!()
        };
        assert_eq!(s.addresses[0].address, ip.parse::<IpAddr>().unwrap());
    }
    // A waypoint address is one address too.
    let wp = wire::msg(
        7,
        &[
            wire::msg(2, &[wire::bytes(2, &[10, 0, 0, 0]), wire::uint(3, 8)]),
            wire::uint(3, 15008),
        ],
    );
    let bytes = service_wire("wp", &[vip_wire("10.96.1.3", None), wp]);
    let e = address("default/wp", &bytes).unwrap_err();
    assert!(e.reason.contains("waypoint.address 10.0.0.0/8"), "{e}");
}

#[test]
fn namespace_visibility_is_refused_by_name() {
    let bytes = service_wire("local", &[vip_wire("10.96.1.4", None), wire::uint(14, 1)]);
    let e = address("default/local", &bytes).unwrap_err();
    assert_eq!(e.name, "default/local");
    assert!(e.reason.contains("visibility NAMESPACE"), "{e}");
    let bytes = service_wire("odd", &[wire::uint(14, 9)]);
    let e = address("default/odd", &bytes).unwrap_err();
    assert!(e.reason.contains("visibility 9 is unknown"), "{e}");
}

/// A workload at `ip` backing web and ready; status 1 is UNHEALTHY.
fn workload_wire(name: &str, ip: [u8; 4], status: u64) -> Vec<u8> {
    let member = |svc: &str| {
        wire::msg(
            22,
            &[wire::str(
                1,
                &format!("default/{svc}.default.svc.cluster.local"),
            )],
        )
    };
    wire::msg(
        1,
        &[
            wire::str(20, &format!("Kubernetes//Pod/default/{name}")),
            wire::str(1, name),
            wire::str(2, "default"),
            wire::bytes(3, &ip),
            member("web"),
            member("ready"),
            wire::uint(17, status),
        ],
    )
}

/// From the bytes istiod sends to the endpoint lists in the kernel
/// maps: the ALLOW_ALL service keeps its unhealthy workload, the
/// default one does not. Needs BPF (as the writer's own tests).
#[test]
fn allow_all_keeps_an_unhealthy_endpoint() {
    use crate::{
        bpf::{Datapath, MapSizes},
        model::{Layers, Model},
        writer::MapWriter,
    };
    let mut m = Model::default();
    for (name, bytes) in [
        (
            "default/web",
            service_wire("web", &[vip_wire("10.96.0.10", None)]),
        ),
        (
            "default/ready",
            service_wire(
                "ready",
                &[
                    vip_wire("10.96.0.11", None),
                    wire::msg(8, &[wire::uint(3, 1)]),
                ],
            ),
        ),
        ("w1", workload_wire("w1", [10, 244, 0, 11], 0)),
        ("w2", workload_wire("w2", [10, 244, 0, 12], 1)),
    ] {
        match address(name, &bytes).unwrap() {
            Resource::Service(s) => drop(m.insert_service(s)),
            Resource::Workload(w) => drop(m.insert_workload(w)),
        }
    }
    let mut writer = MapWriter::new(Datapath::load(MapSizes::default()).expect("load BPF"));
    writer.apply(&m).unwrap();
    let dump = writer.dump(Layers(&[&m]));
    let eps = |host: &str| {
        let s = dump
            .services
            .iter()
            .find(|s| s.name == format!("default/{host}.default.svc.cluster.local"))
            .unwrap_or_else(|| panic!("{host} not in {dump:?}"));
        let mut v = s.endpoints.get(&0).cloned().unwrap_or_default();
        v.sort();
        (v, s.health_policy)
    };
    let (uid1, uid2) = ("Kubernetes//Pod/default/w1", "Kubernetes//Pod/default/w2");
    assert_eq!(
        eps("ready"),
        (vec![uid1.into(), uid2.into()], Some(HealthPolicy::AllowAll))
    );
    assert_eq!(
        eps("web"),
        (vec![uid1.to_string()], Some(HealthPolicy::OnlyHealthy))
    );
}
