//! The store's answer to a full resend (a reconnect sends every resource
//! again): unchanged resources leave the stored copies alone.

use super::{
    proto::workload as pb,
    store::{tests::apply, XdsStore},
    ADDRESS_TYPE,
};

/// A full resend (a reconnect) of unchanged resources keeps the stored
/// copies (same allocations) and records no change; a changed one is
/// replaced and recorded.
#[test]
fn an_unchanged_resend_keeps_the_stored_copies() {
    let svc = pb::Service {
        name: "web".into(),
        namespace: "default".into(),
        hostname: "web.default.svc.cluster.local".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 1],
            ..Default::default()
        }],
        ..Default::default()
    };
    let wl = |ip: u8| pb::Workload {
        uid: "c//Pod/default/web-1".into(),
        name: "web-1".into(),
        namespace: "default".into(),
        addresses: vec![vec![10, 244, 0, ip]],
        node: "n1".into(),
        ..Default::default()
    };
    let any = |t| crate::xds::to_any(ADDRESS_TYPE, &pb::Address { r#type: Some(t) });
    let res = |ip| {
        [
            (
                "default/web.default.svc.cluster.local",
                "",
                any(pb::address::Type::Service(svc.clone())),
            ),
            (
                "c//Pod/default/web-1",
                "",
                any(pb::address::Type::Workload(wl(ip))),
            ),
        ]
    };
    let mut s = XdsStore::default();
    assert!(apply(&mut s, &res(1), &[]).1.is_empty());
    s.take_changes();
    let svc_at =
        |s: &XdsStore| &*s.model.services["default/web.default.svc.cluster.local"] as *const _;
    let uid_at = |s: &XdsStore| s.model.workloads["c//Pod/default/web-1"].uid().as_ptr();
    let (svc_before, uid_before) = (svc_at(&s), uid_at(&s));
    assert!(apply(&mut s, &res(1), &[]).1.is_empty());
    assert_eq!((svc_at(&s), uid_at(&s)), (svc_before, uid_before));
    let c = s.take_changes();
    assert!(c.services.is_empty() && c.workloads.is_empty() && !c.whole);
    assert!(!s.replaced_any());

    assert!(apply(&mut s, &res(2), &[]).1.is_empty());
    assert_eq!(svc_at(&s), svc_before);
    let c = s.take_changes();
    assert_eq!(c.workloads.len(), 1);
    assert!(s.replaced_any());
    assert_eq!(
        *s.model.workloads["c//Pod/default/web-1"].addresses,
        ["10.244.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
}
