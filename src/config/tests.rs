use std::{fs, net::IpAddr, path::Path};

use super::*;
use crate::model::HealthPolicy;

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

/// A file in a fresh directory, removed on drop.
struct TempConfig(std::path::PathBuf);

impl TempConfig {
    fn new(name: &str, text: &str) -> TempConfig {
        let dir = std::env::temp_dir().join(format!("kmesh-cfg-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("c.json"), text).unwrap();
        TempConfig(dir)
    }

    fn file(&self) -> std::path::PathBuf {
        self.0.join("c.json")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn missing_netns_is_refused_by_check_and_contained_by_load() {
    let t = TempConfig::new(
        "missing",
        r#"{"enroll": {"netns": ["/run/netns/kmesh-definitely-missing", "/proc/self/ns/net"]}}"#,
    );
    let e = check(&t.file()).unwrap_err().to_string();
    assert!(
        e.contains("enroll.netns[0]") && e.contains("kmesh-definitely-missing"),
        "{e}"
    );
    // At run time the entry is left out and reported; the rest applies.
    let m = load(&t.file()).unwrap();
    assert_eq!(m.enrolled.len(), 1);
    assert_eq!(m.enroll_errors.len(), 1);
    assert!(
        m.enroll_errors[0].contains("enroll.netns[0]")
            && m.enroll_errors[0].contains("kmesh-definitely-missing"),
        "{:?}",
        m.enroll_errors
    );
}

#[test]
fn enroll_paths_that_are_no_netns_are_refused() {
    for (bad, want) in [
        (r#""""#, "empty path"),
        (r#""run/netns/x""#, "relative path"),
        (r#"{"path": "ns", "waypoint": true}"#, "relative path"),
    ] {
        let e = err(&format!(r#"{{"enroll": {{"netns": [{bad}]}}}}"#));
        assert!(
            e.contains("enroll.netns[0]") && e.contains(want),
            "{bad}: {e}"
        );
    }
    let t = TempConfig::new("kinds", "{}");
    let fifo = t.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (path, want) in [
        (t.file(), "not a network namespace"),
        (fifo, "a FIFO"),
        (t.0.clone(), "a directory"),
    ] {
        let text = format!(
            r#"{{"enroll": {{"netns": [{:?}]}}}}"#,
            path.display().to_string()
        );
        fs::write(t.0.join("e.json"), &text).unwrap();
        let e = check(&t.0.join("e.json")).unwrap_err().to_string();
        assert!(
            e.contains("enroll.netns[0]") && e.contains(want),
            "{text}: {e}"
        );
        // load() opens none of them in a blocking way: it returns.
        let m = load(&t.0.join("e.json")).unwrap();
        assert!(m.enrolled.is_empty() && m.enroll_errors[0].contains(want));
    }
}

#[test]
fn a_config_that_is_not_one_object_is_refused() {
    for (text, want) in [
        ("[]", "top level: must be a JSON object"),
        (r#"{"enroll": []}"#, "enroll"),
        (
            r#"{"services": [["web", "default", "web.default"]]}"#,
            "services[0]",
        ),
        ("{}\n{}", "exactly one JSON object"),
        (r#"{"services": []} x"#, "trailing characters"),
        (
            r#"{"services": []}{"services": []}"#,
            "exactly one JSON object",
        ),
    ] {
        let e = err(text);
        assert!(e.contains(want), "{text}: {e}");
    }
    // Whitespace after the object is fine.
    assert!(parse(Path::new("t.json"), "{}\n\n").is_ok());
}

#[test]
fn a_config_file_that_is_a_fifo_is_refused_without_blocking() {
    let t = TempConfig::new("fifo", "{}");
    fs::remove_file(t.file()).unwrap();
    nix::unistd::mkfifo(&t.file(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let e = load(&t.file()).unwrap_err().to_string();
    assert!(
        e.contains("a FIFO") && e.contains("not a regular file"),
        "{e}"
    );
    assert!(check(&t.file()).is_err());
}

#[test]
fn a_workload_port_zero_is_refused() {
    for ports in [
        r#"{"service_port": 0, "target_port": 0}"#,
        r#"{"service_port": 0, "target_port": 8080}"#,
    ] {
        let e = err(&GOOD.replace(
            r#"{"service_port": 80, "target_port": 8080}]}}"#,
            &format!("{ports}]}}}}"),
        ));
        assert!(
            e.contains("workloads[0].services.shop/web.shop.svc.cluster.local")
                && e.contains("service_port 0"),
            "{e}"
        );
    }
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

#[test]
fn policies_and_identities_come_from_the_file() {
    let text = r#"{
      "workloads": [{
        "uid": "vm-1", "name": "vm-1", "namespace": "shop", "addresses": ["10.244.0.11"],
        "service_account": "web", "authorization_policies": ["shop/only-frontend"]
      }],
      "policies": [{
        "name": "only-frontend", "namespace": "shop", "scope": "WORKLOAD_SELECTOR",
        "action": "ALLOW",
        "rules": [{"clauses": [{"matches": [{"namespaces": [{"exact": "frontend"}]}]}]}]
      }]
    }"#;
    let (m, _) = parse(Path::new("t.json"), text).unwrap();
    let w = &m.workloads["vm-1"];
    assert_eq!(w.identity().principal(), "cluster.local/ns/shop/sa/web");
    assert_eq!(w.policies(), ["shop/only-frontend"]);
    let applied: Vec<String> = m
        .policies
        .applicable("shop", w.policies())
        .map(crate::authz::Policy::key)
        .collect();
    assert_eq!(applied, ["shop/only-frontend"]);
    // Left out naming the field: a bad CIDR, an unknown action, a port 0,
    // the same policy twice; a good policy beside a bad one still applies.
    let refused = |text: &str| {
        let (m, _) = parse(Path::new("t.json"), text).unwrap();
        let keys: Vec<String> = m.policies.iter().map(|p| p.key()).collect();
        let errors: Vec<String> = m
            .policy_errors
            .iter()
            .map(|(f, e)| format!("{f}: {e}"))
            .collect();
        (keys, errors.join("\n"))
    };
    let policy = |extra: &str| {
        format!(
            r#"{{"policies": [{{"name": "good", "namespace": "shop", "scope": "GLOBAL", "action": "DENY"}},
                {{"name": "p", "namespace": "shop", "scope": "GLOBAL", {extra}}}]}}"#
        )
    };
    let (keys, e) = refused(&policy(
        r#""action": "DENY", "rules": [{"clauses": [{"matches": [{"source_ips": ["10.0.0.0/40"]}]}]}]"#,
    ));
    assert_eq!(keys, ["shop/good"]);
    assert!(
        e.contains("policies[1].rules[0].clauses[0].matches[0].source_ips[0]")
            && e.contains("32 bits"),
        "{e}"
    );
    let (keys, e) = refused(&policy(r#""action": "AUDIT""#));
    assert_eq!(keys, ["shop/good"]);
    assert!(e.contains("policies[1].action"), "{e}");
    let (_, e) = refused(&policy(
        r#""action": "DENY", "rules": [{"clauses": [{"matches": [{"destination_ports": [0]}]}]}]"#,
    ));
    assert!(
        e.contains("policies[1]") && e.contains("0 is not a port"),
        "{e}"
    );
    let twice = r#"{"policies": [
        {"name": "p", "namespace": "a", "scope": "GLOBAL", "action": "DENY"},
        {"name": "p", "namespace": "a", "scope": "GLOBAL", "action": "ALLOW"}]}"#;
    let (keys, e) = refused(twice);
    assert_eq!(keys, ["a/p"], "the first one stays");
    assert!(
        e.contains("policies[1]") && e.contains("defined twice"),
        "{e}"
    );
}

/// A file with service web (two workloads, v1 and v2) and `svc` / `wl`
/// spliced into the service and the first workload.
fn traffic(svc: &str, wl: &str) -> String {
    format!(
        r#"{{
  "services": [{{
    "name": "web", "hostname": "web", "addresses": ["10.96.0.10"],
    "ports": [{{"service_port": 80}}] {svc}
  }}],
  "workloads": [
    {{"uid": "a", "name": "a", "addresses": ["10.244.0.11"], "services": {{"default/web": {{}}}},
      "labels": {{"version": "v1"}} {wl}}},
    {{"uid": "b", "name": "b", "addresses": ["10.244.0.12"], "services": {{"default/web": {{}}}},
      "labels": {{"version": "v2"}}}}
  ]
}}"#
    )
}

#[test]
fn traffic_keys_parse() {
    let text = traffic(
        r#", "split": [{"labels": {"version": "v1"}, "weight": 80}, {"labels": {"version": "v2"}, "weight": 20}],
           "max_connections": 5,
           "rate_limit": {"max_tokens": 10, "tokens_per_fill": 5, "fill_interval_ms": 100}"#,
        r#", "weight": 3"#,
    );
    let (m, _) = parse(Path::new("t.json"), &text).unwrap();
    let tp = &m.traffic["default/web"];
    assert_eq!(tp.split.len(), 2);
    assert_eq!(tp.max_connections, Some(5));
    assert_eq!(tp.rate_limit.unwrap().fill_interval_ms, 100);
    assert_eq!(m.workloads["a"].weight(), 3);
    assert_eq!(m.workloads["b"].weight(), 1);
}

#[test]
fn bad_traffic_values_are_refused_by_field() {
    let cases = [
        (
            r#", "max_connections": -1"#,
            "",
            "services[0].max_connections",
        ),
        (
            r#", "max_connections": 0"#,
            "",
            "services[0].max_connections",
        ),
        (
            r#", "rate_limit": {"max_tokens": 10, "tokens_per_fill": 5, "fill_interval_ms": 0}"#,
            "",
            "services[0].rate_limit.fill_interval_ms",
        ),
        (
            r#", "rate_limit": {"max_tokens": 10, "tokens_per_fill": 5, "fill_interval_ms": -100}"#,
            "",
            "services[0].rate_limit.fill_interval_ms",
        ),
        (
            r#", "split": [{"labels": {"version": "v1"}, "weight": 80}, {"labels": {"version": "v2"}, "weight": 30}]"#,
            "",
            "services[0].split:",
        ),
        (
            r#", "split": [{"labels": {"version": "v1"}, "weight": 80}, {"labels": {"version": "v3"}, "weight": 20}]"#,
            "",
            "services[0].split[1].labels",
        ),
        ("", r#", "weight": 0"#, "workloads[0].weight"),
        ("", r#", "weight": 1001"#, "workloads[0].weight"),
    ];
    for (svc, wl, field) in cases {
        let e = err(&traffic(svc, wl));
        assert!(e.contains(field), "{svc} {wl}: {e}");
    }
}
