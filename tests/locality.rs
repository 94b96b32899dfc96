//! Locality-aware load balancing end to end: the daemon runs as node n1 in
//! r1/z1; web has endpoints on n1 (local), in r1/z2, and in r2/z9. Which
//! backend answered is asserted per connection.

mod harness;

use std::time::Duration;

use harness::{tally, Env, Pod};
use serde_json::{json, Value};

const WEB: &str = "default/web.default.svc.cluster.local";

fn config(client: &Pod, mode: &str, pods: &[(&Pod, &str, &str, &str, bool)]) -> Value {
    let wls: Vec<Value> = pods
        .iter()
        .map(|(p, name, region, zone, healthy)| {
            json!({
                "uid": format!("Kubernetes//Pod/default/{name}"), "name": name,
                "addresses": [p.v4.to_string()],
                "services": {WEB: {}},
                "status": if *healthy { "HEALTHY" } else { "UNHEALTHY" },
                "locality": {"region": region, "zone": zone},
                "node": if *name == "local" { "n1" } else { "other" },
            })
        })
        .collect();
    json!({
        "enroll": {"netns": [client.path()]},
        "services": [{
            "name": "web", "hostname": "web.default.svc.cluster.local",
            "addresses": ["10.96.0.10"],
            "ports": [{"service_port": 80, "target_port": 8080}],
            "load_balancing": {"mode": mode, "routing_preference": ["REGION", "ZONE", "NODE"]}
        }],
        "workloads": wls,
    })
}

#[test]
fn strict_failover_and_random_pick_by_locality() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let names = ["local", "zone2", "far"];
    let pods: Vec<Pod> = (0..3)
        .map(|i| {
            let p = env.pod(11 + i, &[]);
            env.serve(&p, &[format!("{}:8080", p.v4)], names[i as usize]);
            p
        })
        .collect();
    let layout = |healthy_local: bool| {
        vec![
            (&pods[0], "local", "r1", "z1", healthy_local),
            (&pods[1], "zone2", "r1", "z2", true),
            (&pods[2], "far", "r2", "z9", true),
        ]
    };
    let d = env
        .daemon_args(
            &config(&client, "FAILOVER", &layout(true)),
            &["--locality", "r1/z1/s1", "--node-name", "n1"],
        )
        .unwrap();

    // FAILOVER: all to the local pod while it is healthy...
    let t = tally(&env.connect(&client, "10.96.0.10:80", 30));
    assert_eq!(t.get("local"), Some(&30), "{t:?}");
    // ...priority levels as the dump shows them: 0 local, 2 zone2, 3 far.
    let dump = d.dump();
    let eps = &dump["services"][0]["endpoints"];
    assert_eq!(eps["0"].as_array().unwrap().len(), 1, "{eps}");
    assert_eq!(eps["2"].as_array().unwrap().len(), 1, "{eps}");
    assert_eq!(eps["3"].as_array().unwrap().len(), 1, "{eps}");
    // ...to the next zone when it goes unhealthy...
    d.write_config(&config(&client, "FAILOVER", &layout(false)));
    d.wait_dump(Duration::from_secs(5), |v| {
        v["services"][0]["endpoints"]["0"].is_null()
    });
    let t = tally(&env.connect(&client, "10.96.0.10:80", 30));
    assert_eq!(t.get("zone2"), Some(&30), "{t:?}");
    // ...and back when it recovers.
    d.write_config(&config(&client, "FAILOVER", &layout(true)));
    d.wait_dump(Duration::from_secs(5), |v| {
        !v["services"][0]["endpoints"]["0"].is_null()
    });
    let t = tally(&env.connect(&client, "10.96.0.10:80", 30));
    assert_eq!(t.get("local"), Some(&30), "{t:?}");

    // STRICT: only the full match; none left → fails fast with EPERM.
    d.write_config(&config(&client, "STRICT", &layout(true)));
    d.wait_dump(Duration::from_secs(5), |v| {
        v["services"][0]["lb_policy"] == "STRICT"
    });
    let t = tally(&env.connect(&client, "10.96.0.10:80", 20));
    assert_eq!(t.get("local"), Some(&20), "{t:?}");
    d.write_config(&config(&client, "STRICT", &layout(false)));
    d.wait_dump(Duration::from_secs(5), |v| {
        v["services"][0]["endpoints"]["0"].is_null()
    });
    let started = std::time::Instant::now();
    let conns = env.connect(&client, "10.96.0.10:80", 3);
    assert!(started.elapsed() < Duration::from_millis(900));
    for c in &conns {
        assert!(!c.ok && c.errno == Some(1), "{c:?}");
    }

    // RANDOM (Istio's UNSPECIFIED_MODE): every endpoint, one level.
    d.write_config(&config(&client, "UNSPECIFIED_MODE", &layout(true)));
    d.wait_dump(Duration::from_secs(5), |v| {
        v["services"][0]["endpoints"]["0"].as_array().map(Vec::len) == Some(3)
    });
    let t = tally(&env.connect(&client, "10.96.0.10:80", 90));
    for n in names {
        assert!(t.get(n).copied().unwrap_or(0) >= 10, "{t:?}");
    }
}
