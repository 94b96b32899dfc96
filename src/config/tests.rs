use std::path::Path;

use super::*;

const GOOD: &str = r#"{
  "services": [{
    "name": "web", "namespace": "shop", "hostname": "web.shop.svc.cluster.local",
    "addresses": ["10.96.0.10", "net1/fd00:96::10"],
    "ports": [{"service_port": 80, "target_port": 8080}, {"service_port": 443}],
    "load_balancing": {"mode": "FAILOVER", "routing_preference": ["REGION", "ZONE"]}
  }],
  "workloads": [{
    "uid": "Kubernetes//Pod/shop/web-1", "name": "web-1", "namespace": "shop",
    "addresses": ["10.244.0.11"],
    "services": {"shop/web.shop.svc.cluster.local": {"ports": [{"service_port": 80, "target_port": 8080}]}},
    "status": "UNHEALTHY"
  }]
}"#;

fn err(text: &str) -> String {
    parse(Path::new("t.json"), text).unwrap_err().to_string()
}

#[test]
fn parses_the_istio_shaped_file() {
    let (m, netns) = parse(Path::new("t.json"), GOOD).unwrap();
    assert!(netns.is_empty());
    let s = &m.services["shop/web.shop.svc.cluster.local"];
    assert_eq!(s.addresses[1].network, "net1");
    assert_eq!(
        s.addresses[1].address,
        "fd00:96::10".parse::<IpAddr>().unwrap()
    );
    assert_eq!(s.ports[1].target_port, 0);
    assert_eq!(s.load_balancing.mode, LbMode::Failover);
    let w = &m.workloads["Kubernetes//Pod/shop/web-1"];
    assert_eq!(w.status, HealthStatus::Unhealthy);
    assert_eq!(w.services.len(), 1);
}

#[test]
fn bad_ip_names_the_field() {
    let e = err(&GOOD.replace("10.96.0.10", "10.96.0.300"));
    assert!(
        e.contains("services[0].addresses[0]") && e.contains("10.96.0.300"),
        "{e}"
    );
}

#[test]
fn unknown_field_names_the_field() {
    let e = err(&GOOD.replace("\"target_port\": 8080}, {", "\"targetport\": 8080}, {"));
    assert!(
        e.contains("services[0].ports[0]") && e.contains("targetport"),
        "{e}"
    );
}

#[test]
fn port_out_of_range_names_the_field() {
    let e = err(&GOOD.replace("\"service_port\": 443", "\"service_port\": 70000"));
    assert!(e.contains("services[0].ports[1].service_port"), "{e}");
}

#[test]
fn undefined_service_reference_is_rejected() {
    let e = err(&GOOD.replace("\"shop/web.shop.svc.cluster.local\": {", "\"shop/nope\": {"));
    assert!(
        e.contains("workloads[0].services") && e.contains("shop/nope"),
        "{e}"
    );
}

#[test]
fn duplicate_vip_is_rejected() {
    let e = err(&GOOD.replace("\"10.244.0.11\"", "\"10.96.0.10\""));
    assert!(
        e.contains("10.96.0.10") && e.contains("claimed by both"),
        "{e}"
    );
}

#[test]
fn syntax_error_names_the_line() {
    let e = err("{\n \"services\": [\n");
    assert!(e.contains("line") || e.contains("EOF"), "{e}");
}

#[test]
fn missing_netns_names_the_enroll_entry() {
    let dir = std::env::temp_dir().join(format!("kmesh-cfg-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let f = dir.join("c.json");
    fs::write(
        &f,
        r#"{"enroll": {"netns": ["/run/netns/kmesh-definitely-missing"]}}"#,
    )
    .unwrap();
    let e = load(&f).unwrap_err().to_string();
    fs::remove_dir_all(&dir).unwrap();
    assert!(
        e.contains("enroll.netns[0]") && e.contains("kmesh-definitely-missing"),
        "{e}"
    );
}

const EGRESS: &str = r#"{
  "services": [
    {"name": "api", "hostname": "api.example.com", "addresses": ["240.0.0.1"],
     "ports": [{"service_port": 443}], "resolution": "DNS"},
    {"name": "db", "hostname": "db.example.com", "addresses": ["240.0.0.2"],
     "ports": [{"service_port": 5432}], "resolution": "DNS"},
    {"name": "any", "hostname": "any.example.com", "addresses": ["198.51.100.9"],
     "resolution": "NONE"}
  ],
  "workloads": [{
    "uid": "db-primary", "name": "db-primary", "hostname": "primary.db.example.com",
    "services": {"default/db.example.com": {}}
  }]
}"#;

#[test]
fn dns_services_and_hostname_workloads() {
    let (m, _) = parse(Path::new("t.json"), EGRESS).unwrap();
    // A DNS service nothing backs resolves its own hostname.
    let implicit = &m.workloads["ServiceEntry/default/api.example.com"];
    assert_eq!(implicit.hostname(), Some("api.example.com"));
    assert_eq!(&*implicit.services[0].key, "default/api.example.com");
    // One backed by a hostname workload gets no implicit one.
    assert!(!m
        .workloads
        .contains_key("ServiceEntry/default/db.example.com"));
    assert_eq!(
        m.workloads["db-primary"].hostname(),
        Some("primary.db.example.com")
    );
    assert_eq!(
        m.services["default/any.example.com"].load_balancing.mode,
        LbMode::Passthrough
    );
    let hosts = crate::model::Layers(&[&m]).hostnames();
    assert_eq!(
        hosts.into_iter().collect::<Vec<_>>(),
        ["api.example.com", "primary.db.example.com"]
    );
}

#[test]
fn bad_hostname_workloads_are_named() {
    let e = err(&EGRESS.replace("primary.db.example.com", "primary..db"));
    assert!(
        e.contains("workloads[0]") && e.contains("primary..db"),
        "{e}"
    );
    let both = EGRESS.replace(
        r#""hostname": "primary.db.example.com""#,
        r#""hostname": "primary.db.example.com", "addresses": ["10.0.0.1"]"#,
    );
    let e = err(&both);
    assert!(e.contains("exclusive"), "{e}");
    let e = err(&EGRESS.replace(
        r#""resolution": "NONE""#,
        r#""resolution": "NONE", "load_balancing": {"mode": "STRICT"}"#,
    ));
    assert!(e.contains("services[2].load_balancing.mode"), "{e}");
    let e = err(&EGRESS.replace(r#""resolution": "NONE""#, r#""resolution": "none""#));
    assert!(e.contains("services[2].resolution"), "{e}");
}

#[test]
fn accel_queue_limit_is_read_and_layered() {
    let (m, _) = parse(Path::new("t.json"), r#"{"accel_queue_limit": 1048576}"#).unwrap();
    assert_eq!(m.accel_queue_limit, Some(1 << 20));
    let xds = Model::default();
    // The file's setting wins over the default whatever layer is on top.
    use crate::model::Layers;
    assert_eq!(Layers(&[&m, &xds]).accel_queue_limit(), 1 << 20);
    assert_eq!(
        Layers(&[&xds]).accel_queue_limit(),
        crate::model::DEFAULT_ACCEL_QUEUE_LIMIT
    );
    assert!(err(r#"{"accel_queue_limit": -1}"#).contains("accel_queue_limit"));
}

#[test]
fn health_policy_takes_istio_names() {
    let with = |p: &str| {
        GOOD.replace(
            r#""routing_preference": ["REGION", "ZONE"]"#,
            &format!(r#""routing_preference": ["REGION", "ZONE"], "health_policy": "{p}""#),
        )
    };
    let (m, _) = parse(Path::new("t.json"), &with("ALLOW_ALL")).unwrap();
    let lb = &m.services["shop/web.shop.svc.cluster.local"].load_balancing;
    assert_eq!(lb.health_policy, HealthPolicy::AllowAll);
    let (m, _) = parse(Path::new("t.json"), GOOD).unwrap();
    let lb = &m.services["shop/web.shop.svc.cluster.local"].load_balancing;
    assert_eq!(lb.health_policy, HealthPolicy::OnlyHealthy);
    let e = err(&with("SOME"));
    assert!(
        e.contains("services[0].load_balancing.health_policy") && e.contains("SOME"),
        "{e}"
    );
}
