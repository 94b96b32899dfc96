//! System tests for the xDS source: the daemon subscribes to the in-repo
//! control plane (delta ADS), and real connections follow what it pushes.

mod harness;

use std::{net::IpAddr, time::Duration};

use harness::{endpoints, tally, xds::*, Env, Pod};
use kmesh::xds::{control_plane::Batch, proto::workload as pb, ADDRESS_TYPE};
use serde_json::{json, Value};

const VIP: &str = "10.96.0.10";

fn enroll_only(client: &Pod) -> Value {
    json!({"enroll": {"netns": [client.path()]}})
}

/// The daemon enrolling `client` and taking everything else from `cp`.
fn xds_daemon(env: &mut Env, client: &Pod, cp: &Cp) -> harness::Daemon {
    env.daemon_args(&enroll_only(client), &["--xds-address", &cp.url()])
        .unwrap()
}

fn ips(pod: &Pod) -> Vec<IpAddr> {
    vec![pod.v4]
}

/// Service web on VIP:80 → 8080, backed by `pods` as web-1..web-n.
fn set_web(b: &mut Batch, pods: &[Pod]) {
    let (n, s) = service("web", &[VIP], &[(80, 8080)]);
    b.set(&n, s);
    for (i, p) in pods.iter().enumerate() {
        let (n, w) = workload(&format!("web-{}", i + 1), &ips(p), &["web"]);
        b.set(&n, w);
    }
}

/// The control plane's NACK messages, once there is one (10 s at most).
fn wait_nacks(cp: &Cp) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cp.cp.nacks().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no NACK");
        std::thread::sleep(Duration::from_millis(20));
    }
    cp.cp.nacks().join("\n")
}

fn wait_endpoints(d: &harness::Daemon, want: &[&str]) -> Value {
    let want: Vec<String> = want
        .iter()
        .map(|n| format!("Kubernetes//Pod/default/{n}"))
        .collect();
    d.wait_dump(Duration::from_secs(10), |v| endpoints(v) == want)
}

#[test]
fn pushed_services_and_workloads_carry_traffic() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let cp = Cp::start(None);
    cp.cp.update(|b| set_web(b, &pods));
    let d = xds_daemon(&mut env, &client, &cp);
    wait_endpoints(&d, &["web-1", "web-2"]);

    let t = tally(&env.connect(&client, "10.96.0.10:80", 40));
    assert_eq!(t.len(), 2, "{t:?}");
    assert!(cp.cp.nacks().is_empty(), "{:?}", cp.cp.nacks());
    assert!(cp.cp.acks() >= 1);
}

#[test]
fn updates_and_removals_converge() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let cp = Cp::start(None);
    cp.cp.update(|b| set_web(b, &pods));
    let d = xds_daemon(&mut env, &client, &cp);
    wait_endpoints(&d, &["web-1", "web-2"]);

    // web-2 turns unhealthy: it leaves the endpoints but stays addressable.
    let (n, mut w2) = workload_pb("web-2", &ips(&pods[1]), &["web"]);
    w2.status = pb::WorkloadStatus::Unhealthy as i32;
    cp.cp.set(&n, address(pb::address::Type::Workload(w2)));
    wait_endpoints(&d, &["web-1"]);
    assert_eq!(
        tally(&env.connect(&client, "10.96.0.10:80", 30)).get("web-1"),
        Some(&30)
    );
    assert_eq!(
        tally(&env.connect(&client, "10.244.0.12:8080", 3)).get("web-2"),
        Some(&3)
    );

    // The service moves to port 81; the old port is no longer redirected.
    let (n, s) = service("web", &[VIP], &[(81, 8080)]);
    cp.cp.set(&n, s);
    d.wait_dump(Duration::from_secs(10), |v| {
        v["services"][0]["ports"][0]["service_port"] == 81
    });
    assert_eq!(
        tally(&env.connect(&client, "10.96.0.10:81", 5)).get("web-1"),
        Some(&5)
    );

    // Removals: workload web-1, then the service.
    cp.cp.remove(ADDRESS_TYPE, "Kubernetes//Pod/default/web-1");
    d.wait_dump(Duration::from_secs(10), |v| {
        v["workloads"].as_array().unwrap().len() == 1
    });
    cp.cp
        .remove(ADDRESS_TYPE, "default/web.default.svc.cluster.local");
    let dump = d.wait_dump(Duration::from_secs(10), |v| {
        v["services"].as_array().unwrap().is_empty()
    });
    assert_eq!(dump["maps"]["km_endpoint"]["entries"], 0);
    assert_eq!(dump["maps"]["km_vip"]["entries"], 0);
}

#[test]
fn invalid_resources_are_nacked_by_name_and_the_rest_applies() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(1);
    let cp = Cp::start(None);
    cp.cp.update(|b| {
        set_web(b, &pods[..1]);
        // Five address bytes.
        let (n, mut bad) = service_pb("badip", &["10.96.0.20"], &[(80, 80)]);
        bad.addresses[0].address.push(7);
        b.set(&n, address(pb::address::Type::Service(bad)));
        // No uid.
        let (_, mut nouid) = workload_pb("nouid", &["10.244.0.40".parse().unwrap()], &["web"]);
        nouid.uid.clear();
        b.set("nouid", address(pb::address::Type::Workload(nouid)));
        // Eleven ports.
        let many: Vec<(u32, u32)> = (1..=11).map(|p| (p, p)).collect();
        let (n, s) = service("manyports", &["10.96.0.30"], &many);
        b.set(&n, s);
        // A ServiceEntry's CIDR, as istiod sends it (length set only for a
        // range): km_vip matches exact addresses, so it is refused.
        let (n, mut cidr) = service_pb("range", &["10.96.1.0"], &[(80, 8080)]);
        cidr.addresses[0].length = Some(24);
        b.set(&n, address(pb::address::Type::Service(cidr)));
        // Namespace-scoped: the data path cannot tell clients' namespaces.
        let (n, mut local) = service_pb("local", &["10.96.0.50"], &[(80, 8080)]);
        local.visibility = pb::service::Visibility::Namespace as i32;
        b.set(&n, address(pb::address::Type::Service(local)));
    });
    let d = xds_daemon(&mut env, &client, &cp);
    wait_endpoints(&d, &["web-1"]);

    let nack = wait_nacks(&cp);
    for want in [
        "\"default/badip.default.svc.cluster.local\"",
        "addresses[0] has 5 bytes",
        "\"nouid\"",
        "no uid",
        "\"default/manyports.default.svc.cluster.local\"",
        "11 ports",
        "\"default/range.default.svc.cluster.local\"",
        "addresses[0] 10.96.1.0/24 is a CIDR range",
        "\"default/local.default.svc.cluster.local\"",
        "visibility NAMESPACE",
    ] {
        assert!(nack.contains(want), "NACK lacks {want:?}: {nack}");
    }
    // Only the valid service made it in, and it carries traffic; nothing
    // of the range was installed as a single address.
    let dump = d.dump();
    assert_eq!(dump["services"].as_array().unwrap().len(), 1, "{dump:#}");
    assert_eq!(dump["maps"]["km_vip"]["entries"], 1, "{dump:#}");
    assert_eq!(
        tally(&env.connect(&client, "10.96.0.10:80", 10)).get("web-1"),
        Some(&10)
    );
}

#[test]
fn control_plane_restart_keeps_redirects_then_converges() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let mut cp = Cp::start(None);
    cp.cp.update(|b| set_web(b, &pods[..1]));
    let d = xds_daemon(&mut env, &client, &cp);
    wait_endpoints(&d, &["web-1"]);

    cp.kill();
    // Last known state stays in force while the control plane is away.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tally(&env.connect(&client, "10.96.0.10:80", 10)).get("web-1"),
        Some(&10)
    );
    assert!(d.log().contains("keeping last known state"), "{}", d.log());

    // The world changes meanwhile; the client must learn it on reconnect,
    // including the removal (from its initial_resource_versions).
    cp.cp.update(|b| {
        b.remove(ADDRESS_TYPE, "Kubernetes//Pod/default/web-1");
        let (n, w) = workload("web-2", &ips(&pods[1]), &["web"]);
        b.set(&n, w);
    });
    cp.restart();
    wait_endpoints(&d, &["web-2"]);
    assert!(cp.cp.streams() >= 2, "client reconnected");
    assert_eq!(
        tally(&env.connect(&client, "10.96.0.10:80", 20)).get("web-2"),
        Some(&20)
    );
}

#[test]
fn tls_control_plane() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();

    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(1);
    let cp = Cp::start(Some((
        cert.pem().into_bytes(),
        key.serialize_pem().into_bytes(),
    )));
    cp.cp.update(|b| set_web(b, &pods[..1]));
    let ca = env.dir.join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    let d = env
        .daemon_args(
            &enroll_only(&client),
            &[
                "--xds-address",
                &cp.url(),
                "--xds-ca-file",
                ca.to_str().unwrap(),
            ],
        )
        .unwrap();
    wait_endpoints(&d, &["web-1"]);
    assert_eq!(
        tally(&env.connect(&client, "10.96.0.10:80", 5)).get("web-1"),
        Some(&5)
    );
}

/// istiod's form of a DNS ServiceEntry: a service and a workload carrying
/// a hostname (no addresses) with its own port list. The daemon resolves
/// the name (a dnsmasq the test starts) and the VIP reaches the answer on
/// the workload's port.
#[test]
fn hostname_workload_from_xds_is_resolved() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let ext = env.pod(11, &[]);
    env.serve(&ext, &[format!("{}:9443", ext.v4)], "ext");
    let name = format!("api.{}", harness::dns::DOMAIN);
    let dns = harness::dns::Dnsmasq::start(2, &[(&name, &ext.v4.to_string())]);
    let cp = Cp::start(None);
    cp.cp.update(|b| {
        let (n, mut s) = service_pb("api", &["10.96.0.20"], &[(443, 0)]);
        s.hostname = name.clone();
        let key = format!("default/{name}");
        b.set(&n, address(pb::address::Type::Service(s)));
        let w = pb::Workload {
            uid: format!("Kubernetes/networking.istio.io/ServiceEntry/default/api/{name}"),
            name: "api".into(),
            namespace: "default".into(),
            hostname: name.clone(),
            services: [(
                key,
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: 443,
                        target_port: 9443,
                        ..Default::default()
                    }],
                },
            )]
            .into(),
            ..Default::default()
        };
        b.set(&w.uid.clone(), address(pb::address::Type::Workload(w)));
    });
    let server = dns.addr.to_string();
    let d = env
        .daemon_args(
            &enroll_only(&client),
            &["--xds-address", &cp.url(), "--dns-server", &server],
        )
        .unwrap();
    let dump = d.wait_dump(Duration::from_secs(10), |v| {
        v["dns"][&name] == json!([ext.v4.to_string()]) && !endpoints(v).is_empty()
    });
    assert!(cp.cp.nacks().is_empty(), "{:?}", cp.cp.nacks());
    assert_eq!(
        dump["services"][0]["endpoint_addresses"]["0"],
        json!([[ext.v4.to_string()]])
    );
    assert_eq!(
        tally(&env.connect(&client, "10.96.0.20:443", 10))["ext"],
        10
    );
}

/// Kubernetes' publishNotReadyAddresses, as istiod sends it: the service
/// "ready" has LoadBalancing.health_policy ALLOW_ALL, "web" the default.
/// Both are backed by web-1 (healthy) and web-2 (unhealthy): connections
/// to ready reach web-2, connections to web never do. A VIP given with a
/// full-length prefix (/32) is one address, as without a length.
#[test]
fn allow_all_service_reaches_an_unhealthy_backend() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let cp = Cp::start(None);
    cp.cp.update(|b| {
        let (n, s) = service("web", &[VIP], &[(80, 8080)]);
        b.set(&n, s);
        let (n, mut ready) = service_pb("ready", &["10.96.0.11"], &[(80, 8080)]);
        ready.addresses[0].length = Some(32);
        ready.load_balancing = Some(pb::LoadBalancing {
            health_policy: pb::load_balancing::HealthPolicy::AllowAll as i32,
            ..Default::default()
        });
        b.set(&n, address(pb::address::Type::Service(ready)));
        for (i, p) in pods.iter().enumerate() {
            let (n, mut w) = workload_pb(&format!("web-{}", i + 1), &ips(p), &["web", "ready"]);
            if i == 1 {
                w.status = pb::WorkloadStatus::Unhealthy as i32;
            }
            b.set(&n, address(pb::address::Type::Workload(w)));
        }
    });
    let d = xds_daemon(&mut env, &client, &cp);
    let service = |v: &Value, host: &str| -> Value {
        let name = format!("default/{host}.default.svc.cluster.local");
        v["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name.as_str()))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let dump = d.wait_dump(Duration::from_secs(10), |v| {
        !service(v, "ready").is_null() && !service(v, "web").is_null()
    });
    assert!(cp.cp.nacks().is_empty(), "{:?}", cp.cp.nacks());
    let (ready, web) = (service(&dump, "ready"), service(&dump, "web"));
    assert_eq!(ready["health_policy"], "ALLOW_ALL", "{dump:#}");
    assert_eq!(web["health_policy"], "ONLY_HEALTHY", "{dump:#}");
    assert_eq!(ready["addresses"], json!(["10.96.0.11"]), "{dump:#}");
    assert_eq!(
        ready["endpoints"]["0"].as_array().map(Vec::len),
        Some(2),
        "{dump:#}"
    );
    assert_eq!(
        web["endpoints"]["0"],
        json!(["Kubernetes//Pod/default/web-1"]),
        "{dump:#}"
    );

    let to_ready = tally(&env.connect(&client, "10.96.0.11:80", 40));
    assert!(
        to_ready.get("web-2").is_some_and(|n| *n > 0),
        "{to_ready:?}"
    );
    assert!(
        to_ready.keys().all(|k| k == "web-1" || k == "web-2"),
        "{to_ready:?}"
    );
    let to_web = tally(&env.connect(&client, "10.96.0.10:80", 40));
    assert_eq!(to_web.get("web-1"), Some(&40), "{to_web:?}");
}

/// Issue 17 item 4: a resource that claims an address another entry holds
/// is NACKed by name and left out; every other resource, and every later
/// push, still reaches the maps. Before, the daemon ACKed the push, refused
/// the whole apply, and froze until the conflict went away. The same pod
/// address on another network is no conflict at all.
#[test]
fn a_conflicting_resource_is_nacked_and_later_pushes_still_apply() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(3);
    let cp = Cp::start(None);
    cp.cp.update(|b| set_web(b, &pods[..1]));
    let d = xds_daemon(&mut env, &client, &cp);
    wait_endpoints(&d, &["web-1"]);
    let acks = cp.cp.acks();

    // The same address on a remote network, and a ServiceEntry whose VIP
    // is web-1's address.
    cp.cp.update(|b| {
        let (_, mut remote) = workload_pb("remote-1", &ips(&pods[0]), &[]);
        remote.uid = "cluster2//Pod/default/remote-1".into();
        remote.network = "network2".into();
        b.set(
            "cluster2//Pod/default/remote-1",
            address(pb::address::Type::Workload(remote)),
        );
        let (n, se) = service("clash", &[&pods[0].v4.to_string()], &[(80, 8080)]);
        b.set(&n, se);
    });
    let nack = wait_nacks(&cp);
    assert!(
        nack.contains("\"default/clash.default.svc.cluster.local\"")
            && nack.contains(&format!("address {} is already held by", pods[0].v4))
            && !nack.contains("remote-1"),
        "{nack}"
    );
    let dump = d.dump();
    let rejected = dump["rejected"].to_string();
    assert!(
        rejected.contains("clash") && !rejected.contains("remote"),
        "{rejected}"
    );

    // A later push (web-2, web-3 join) applies and carries traffic.
    cp.cp.update(|b| set_web(b, &pods));
    wait_endpoints(&d, &["web-1", "web-2", "web-3"]);
    let t = tally(&env.connect(&client, "10.96.0.10:80", 60));
    assert_eq!(t.len(), 3, "{t:?}");
    assert!(cp.cp.acks() > acks, "the later push is ACKed");
    // Direct access to web-1 still reaches web-1, not the ServiceEntry.
    let direct = format!("{}:8080", pods[0].v4);
    assert_eq!(
        tally(&env.connect(&client, &direct, 5)).get("web-1"),
        Some(&5)
    );
    // The conflict goes: the ServiceEntry would now get the address.
    cp.cp
        .remove(ADDRESS_TYPE, "default/clash.default.svc.cluster.local");
    d.wait_dump(Duration::from_secs(10), |v| {
        v["rejected"].as_array().is_some_and(|r| r.is_empty())
    });
}

/// A NACKed update keeps the last good version: web-2 moving onto web-1's
/// address is refused, and web-2 stays where it was, reachable and an
/// endpoint, instead of leaving the maps.
#[test]
fn an_update_left_out_keeps_the_previous_version() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let cp = Cp::start(None);
    cp.cp.update(|b| set_web(b, &pods));
    let d = xds_daemon(&mut env, &client, &cp);
    wait_endpoints(&d, &["web-1", "web-2"]);
    cp.cp.update(|b| {
        let (n, w) = workload("web-2", &ips(&pods[0]), &["web"]);
        b.set(&n, w);
    });
    let nack = wait_nacks(&cp);
    assert!(
        nack.contains("\"Kubernetes//Pod/default/web-2\"")
            && nack.contains("previous version is kept"),
        "{nack}"
    );
    let dump = d.dump();
    let addrs: Vec<String> = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["uid"] == "Kubernetes//Pod/default/web-2")
        .flat_map(|w| w["addresses"].as_array().unwrap().clone())
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(addrs, [pods[1].v4.to_string()], "{dump:#}");
    let t = tally(&env.connect(&client, "10.96.0.10:80", 40));
    assert_eq!(t.len(), 2, "both backends still serve: {t:?}");
}

/// Issue 17 item 1: a FAILOVER service with 7 routing-preference scopes
/// (here REGION repeated) made the daemon index past its 7-level priority
/// table and exit 101, at every start. Now the service is NACKed by name,
/// and the daemon keeps serving everything else.
#[test]
fn seven_routing_scopes_are_nacked_not_a_crash() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(1);
    let cp = Cp::start(None);
    cp.cp.update(|b| {
        set_web(b, &pods);
        let (n, mut s) = service_pb("far", &["10.96.0.40"], &[(80, 8080)]);
        s.load_balancing = Some(pb::LoadBalancing {
            mode: pb::load_balancing::Mode::Failover as i32,
            routing_preference: vec![pb::load_balancing::Scope::Region as i32; 7],
            ..Default::default()
        });
        b.set(&n, address(pb::address::Type::Service(s)));
    });
    let d = xds_daemon(&mut env, &client, &cp);
    let nack = wait_nacks(&cp);
    assert!(
        nack.contains("\"default/far.default.svc.cluster.local\"")
            && nack.contains("\"REGION\" is listed twice"),
        "{nack}"
    );
    assert_eq!(
        tally(&env.connect(&client, "10.96.0.10:80", 10)).get("web-1"),
        Some(&10)
    );
    assert!(d.dump()["rejected"].to_string().contains("far"));
}

/// A push that changes one pod is applied in proportion to it (the
/// writer's incremental path, counted as its own trigger), and traffic
/// follows it: web-2 moves to the third pod's address.
#[test]
fn a_one_pod_push_is_applied_incrementally() {
    use harness::http::{sample, scrape, HttpPorts};
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(3);
    let cp = Cp::start(None);
    cp.cp.update(|b| set_web(b, &pods[..2]));
    let ports = HttpPorts::new();
    let mut args = ports.args();
    args.extend(["--xds-address".into(), cp.url()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = env.daemon_args(&enroll_only(&client), &args).unwrap();
    wait_endpoints(&d, &["web-1", "web-2"]);
    let incremental = || {
        sample(
            &scrape(&ports),
            "kmesh_applies_total{trigger=\"xds_incremental\"}",
        )
    };
    let before = incremental().unwrap_or(0.0);

    cp.cp.update(|b| {
        let (n, w) = workload("web-2", &ips(&pods[2]), &["web"]);
        b.set(&n, w);
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10) * harness::time_scale();
    while incremental().unwrap_or(0.0) <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "no incremental apply:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = tally(&env.connect(&client, "10.96.0.10:80", 40));
    assert_eq!(t.keys().collect::<Vec<_>>(), ["web-1", "web-3"], "{t:?}");
    // Directly, the old address is no workload's any more.
    let dump = d.dump();
    let old = pods[1].v4.to_string();
    assert!(
        !dump["workloads"]
            .to_string()
            .contains(&format!("\"{old}\"")),
        "{dump}"
    );
    assert!(cp.cp.nacks().is_empty(), "{:?}", cp.cp.nacks());
}
