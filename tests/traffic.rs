//! Traffic management end to end (issue 23): weighted endpoints and a
//! canary split, the circuit breaker and the connect rate limit, with
//! real connections from an enrolled pod to server pods.

mod harness;

use std::time::{Duration, Instant};

use harness::{tally, time_scale, xds::*, Env, Pod};
use serde_json::{json, Value};

const WEB: &str = "default/web.default.svc.cluster.local";
const VIP: &str = "10.96.0.10:80";

/// Service web backed by `pods` (name, pod, labels, weight), with
/// `extra` merged into the service entry.
fn config(client: &[&Pod], pods: &[(&str, &Pod, &str, Option<u32>)], extra: Value) -> Value {
    let wls: Vec<Value> = pods
        .iter()
        .map(|(name, p, version, weight)| {
            let mut w = json!({
                "uid": format!("Kubernetes//Pod/default/{name}"), "name": name,
                "addresses": [p.v4.to_string()],
                "services": {WEB: {}},
                "labels": {"app": "web", "version": version},
            });
            if let Some(weight) = weight {
                w["weight"] = json!(weight);
            }
            w
        })
        .collect();
    let mut svc = json!({
        "name": "web", "hostname": "web.default.svc.cluster.local",
        "addresses": ["10.96.0.10"],
        "ports": [{"service_port": 80, "target_port": 8080}],
    });
    for (k, v) in extra.as_object().unwrap() {
        svc[k] = v.clone();
    }
    json!({
        "enroll": {"netns": Env::enroll_list(client)},
        "services": [svc],
        "workloads": wls,
    })
}

fn split(v1: u32, v2: u32) -> Value {
    json!({"split": [
        {"labels": {"version": "v1"}, "weight": v1},
        {"labels": {"version": "v2"}, "weight": v2},
    ]})
}

/// `n` draws at probability `p` landed `got` times: within 5 sigma.
fn binomial_ok(got: u32, n: u32, p: f64) -> bool {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    (got as f64 - mean).abs() <= 5.0 * sigma
}

fn traffic_of(dump: &Value) -> &Value {
    &dump["traffic"][0]
}

#[test]
fn canary_split_follows_weights_and_a_reload_moves_new_connections_only() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let layout = [
        ("web-1", &pods[0], "v1", None),
        ("web-2", &pods[1], "v2", None),
    ];
    let d = env.daemon(&config(&[&client], &layout, split(80, 20)));
    d.wait_dump(Duration::from_secs(10), |v| {
        !traffic_of(v)["weighted"]["0"].is_null()
    });
    let t = tally(&env.connect(&client, VIP, 500));
    let v1 = t.get("web-1").copied().unwrap_or(0);
    assert!(binomial_ok(v1, 500, 0.8), "80/20 split: {t:?}");

    // An open connection stays where it is across a reload that turns
    // the split around; new ones follow the new weights.
    let mut held = env.hold(&client, VIP);
    assert!(held.conn.ok, "{:?}", held.conn);
    let before = held.conn.name.clone();
    d.write_config(&config(&[&client], &layout, split(20, 80)));
    d.wait_dump(Duration::from_secs(10), |v| {
        traffic_of(v)["weighted"]["0"][0][1].as_u64() == Some(205)
    });
    assert_eq!(held.echo("still here").as_deref(), Ok("still here"));
    let t = tally(&env.connect(&client, VIP, 500));
    let v1 = t.get("web-1").copied().unwrap_or(0);
    assert!(binomial_ok(v1, 500, 0.2), "20/80 split: {t:?}");
    assert_eq!(held.echo("and here").as_deref(), Ok("and here"));
    assert!(!before.is_empty());

    // Equal weights: no table, no weighted bit, the plain uniform pick.
    let plain = [
        ("web-1", &pods[0], "v1", Some(2)),
        ("web-2", &pods[1], "v2", Some(2)),
    ];
    d.write_config(&config(&[&client], &plain, json!({})));
    d.wait_dump(Duration::from_secs(10), |v| {
        v["traffic"].as_array().is_some_and(Vec::is_empty)
    });
    assert_eq!(d.dump()["maps"]["km_lb"]["entries"], 0);
    let t = tally(&env.connect(&client, VIP, 500));
    let v1 = t.get("web-1").copied().unwrap_or(0);
    assert!(binomial_ok(v1, 500, 0.5), "equal weights: {t:?}");

    // Workload weights alone: 3 to 1.
    let weighted = [
        ("web-1", &pods[0], "v1", Some(3)),
        ("web-2", &pods[1], "v2", None),
    ];
    d.write_config(&config(&[&client], &weighted, json!({})));
    d.wait_dump(Duration::from_secs(10), |v| {
        traffic_of(v)["weighted"]["0"][0][1].as_u64() == Some(768)
    });
    let t = tally(&env.connect(&client, VIP, 500));
    let v1 = t.get("web-1").copied().unwrap_or(0);
    assert!(binomial_ok(v1, 500, 0.75), "weights 3:1: {t:?}");
}

#[test]
fn capacity_from_xds_is_honoured() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let cp = Cp::start(None);
    cp.cp.update(|b| {
        let (n, s) = service("web", &["10.96.0.10"], &[(80, 8080)]);
        b.set(&n, s);
        for (i, (p, cap)) in pods.iter().zip([Some(9), None]).enumerate() {
            let (n, mut w) = workload_pb(&format!("web-{}", i + 1), &[p.v4], &["web"]);
            w.capacity = cap;
            b.set(
                &n,
                address(kmesh::xds::proto::workload::address::Type::Workload(w)),
            );
        }
    });
    let d = env
        .daemon_args(
            &json!({"enroll": {"netns": [client.path()]}}),
            &["--xds-address", &cp.url()],
        )
        .unwrap();
    d.wait_dump(Duration::from_secs(10), |v| {
        !traffic_of(v)["weighted"]["0"].is_null()
    });
    let t = tally(&env.connect(&client, VIP, 500));
    let heavy = t.get("web-1").copied().unwrap_or(0);
    assert!(binomial_ok(heavy, 500, 0.9), "capacity 9 vs 1: {t:?}");
}

/// Polls the dump until the service's kernel-counted active connections
/// are `n`.
fn wait_active(d: &harness::Daemon, n: i64) -> Value {
    d.wait_dump(Duration::from_secs(10), |v| {
        traffic_of(v)["active_connections"].as_i64() == Some(n)
    })
}

fn refused_fast(c: &harness::Conn) {
    assert!(!c.ok && c.errno == Some(1), "want EPERM: {c:?}");
    assert!(c.ms < 100.0 * time_scale() as f64, "not at once: {c:?}");
}

#[test]
fn breaker_caps_concurrent_connections_and_counts_survive_a_crash() {
    if harness::skip_unless_waypoints("breaker_caps_concurrent_connections") {
        return;
    }
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(1);
    let cfg = config(
        &[&client],
        &[("web-1", &pods[0], "v1", None)],
        json!({"max_connections": 5}),
    );
    let mut d = env.daemon(&cfg);
    d.wait_dump(Duration::from_secs(10), |v| {
        traffic_of(v)["max_connections"] == 5
    });
    let mut held: Vec<_> = (0..5).map(|_| env.hold(&client, VIP)).collect();
    for h in &held {
        assert!(h.conn.ok, "{:?}", h.conn);
    }
    wait_active(&d, 5);
    // The 6th fails at once with EPERM, and is counted.
    let c = env.connect(&client, VIP, 1);
    refused_fast(&c[0]);
    let dump = d.dump();
    assert_eq!(traffic_of(&dump)["breaker_rejected"], 1);
    assert_eq!(dump["stats"]["breaker_reject"], 1);
    // One closes: room for one again.
    held.pop();
    wait_active(&d, 4);
    assert!(env.connect(&client, VIP, 1)[0].ok);
    wait_active(&d, 4);

    // A crash with 4 open; 2 close while no daemon runs; the next daemon
    // finds 2 (the programs stayed attached and kept counting).
    assert!(!d.kill().success());
    held.truncate(2);
    std::thread::sleep(Duration::from_millis(300));
    let d = env.daemon(&cfg);
    wait_active(&d, 2);
    held.extend((0..3).map(|_| env.hold(&client, VIP)));
    for h in &held {
        assert!(h.conn.ok, "{:?}", h.conn);
    }
    wait_active(&d, 5);
    refused_fast(&env.connect(&client, VIP, 1)[0]);
    held.clear();
    let dump = wait_active(&d, 0);
    // Each socket's note (its service, for sockops) went with its close.
    assert_eq!(
        dump["maps"]["km_conn_note"]["entries"], 0,
        "{}",
        dump["maps"]
    );
}

#[test]
fn rate_limit_is_a_token_bucket_per_client_pod() {
    let mut env = Env::new();
    let a = env.pod(2, &[]);
    let b = env.pod(3, &[]);
    let pods = env.backends(1);
    // 10 tokens, 5 more every interval (scaled for slow guests: a burst
    // must fit well inside one interval).
    let interval = 1000 * time_scale();
    let d = env.daemon(&config(
        &[&a, &b],
        &[("web-1", &pods[0], "v1", None)],
        json!({"rate_limit": {"max_tokens": 10, "tokens_per_fill": 5, "fill_interval_ms": interval}}),
    ));
    d.wait_dump(Duration::from_secs(10), |v| {
        traffic_of(v)["rate_limit"]["max_tokens"] == 10
    });
    let burst = |p: &Pod| {
        let conns = env.connect(p, VIP, 30);
        for c in conns.iter().filter(|c| !c.ok) {
            refused_fast(c);
        }
        conns.iter().filter(|c| c.ok).count()
    };
    assert_eq!(burst(&a), 10, "a burst of 30 gets the 10 tokens");
    // The other pod has its own bucket.
    assert_eq!(burst(&b), 10);
    let dump = d.dump();
    let pods_dump = traffic_of(&dump)["pods"].as_array().unwrap().clone();
    assert_eq!(pods_dump.len(), 2, "{dump:#}");
    assert!(
        pods_dump.iter().all(|p| p["rejected"] == 20),
        "{pods_dump:?}"
    );
    assert_eq!(dump["stats"]["rate_limited"], 40);
    // One fill (the dump shows the tokens a connect would find; waiting
    // on it rather than on a clock keeps a slow machine's delays out).
    let a_src = a.path();
    d.wait_dump(Duration::from_secs(5), |v| {
        traffic_of(v)["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["source"] == a_src.as_str() && p["tokens"] == 5)
    });
    assert_eq!(burst(&a), 5, "one fill");
    // Long idle: back to the bucket's size, not beyond. Four and a half
    // intervals would give 5 + 4 x 5 = 25 tokens without the cap; with it,
    // 10, or 15 where a slow machine's burst spans the next fill.
    std::thread::sleep(Duration::from_millis(interval as u64 * 9 / 2));
    let got = burst(&a);
    assert!(got == 10 || got == 15, "refilled to max_tokens: {got}");
}

#[test]
fn bad_traffic_values_are_refused_by_field_and_nothing_changes() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(1);
    let layout = [("web-1", &pods[0], "v1", None)];
    let d = env.daemon(&config(&[&client], &layout, json!({"max_connections": 5})));
    d.wait_dump(Duration::from_secs(10), |v| {
        traffic_of(v)["max_connections"] == 5
    });
    for (extra, field) in [
        (
            json!({"max_connections": 7, "rate_limit": {"max_tokens": 10, "tokens_per_fill": 5, "fill_interval_ms": 0}}),
            "services[0].rate_limit.fill_interval_ms",
        ),
        (
            json!({"max_connections": -1}),
            "services[0].max_connections",
        ),
        (split(90, 20), "services[0].split"),
    ] {
        d.write_config(&config(&[&client], &layout, extra));
        let deadline = Instant::now() + Duration::from_secs(10) * time_scale();
        while !d.log().contains(field) {
            assert!(Instant::now() < deadline, "{field} not named:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(traffic_of(&d.dump())["max_connections"], 5);
    }
}
