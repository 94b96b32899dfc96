//! System tests: the daemon on a child cgroup, pods in network namespaces,
//! real TCP connections through the connect4/connect6 programs.

mod harness;

use std::time::Duration;

use harness::{endpoints, tally, Env, Pod};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const SVC: &str = "default/web.default.svc.cluster.local";

fn service(addresses: &[&str]) -> Value {
    json!({
        "name": "web", "namespace": "default", "hostname": "web.default.svc.cluster.local",
        "addresses": addresses,
        "ports": [{"service_port": 80, "target_port": 8080}]
    })
}

fn workload(name: &str, pod: &Pod, with_v6: bool) -> Value {
    let mut addrs = vec![pod.v4.to_string()];
    if with_v6 {
        addrs.push(pod.v6.to_string());
    }
    json!({
        "uid": format!("Kubernetes//Pod/default/{name}"), "name": name,
        "addresses": addrs,
        "services": {SVC: {}}
    })
}

fn config(enrolled: &[&Pod], services: Vec<Value>, workloads: Vec<Value>) -> Value {
    json!({
        "enroll": {"netns": Env::enroll_list(enrolled)},
        "services": services,
        "workloads": workloads,
    })
}

/// Service web with `vips`, backed by `pods` as web-1..web-n, with
/// `enrolled` as the only enrolled netns.
fn web(enrolled: &Pod, vips: &[&str], pods: &[Pod], with_v6: bool) -> Value {
    let wls = pods
        .iter()
        .enumerate()
        .map(|(i, p)| workload(&format!("web-{}", i + 1), p, with_v6))
        .collect();
    config(&[enrolled], vec![service(vips)], wls)
}

/// `n` backend pods serving on :8080 (v4 and v6), named web-1..web-n.
fn backends(env: &mut Env, n: u8) -> Vec<Pod> {
    (1..=n)
        .map(|i| {
            let pod = env.pod(10 + i, &[]);
            env.serve(
                &pod,
                &[format!("{}:8080", pod.v4), format!("[{}]:8080", pod.v6)],
                &format!("web-{i}"),
            );
            pod
        })
        .collect()
}

#[test]
fn vip_connect_is_redirected_with_port_rewrite() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = backends(&mut env, 1);
    let d = env.daemon(&web(&client, &["10.96.0.10"], &pods[..1], false));

    let conns = env.connect(&client, "10.96.0.10:80", 5);
    for c in &conns {
        assert!(c.ok, "{c:?}");
        assert_eq!(c.name, "web-1");
        // The socket's peer is the backend and its target port, not the VIP.
        assert_eq!(c.peer, "10.244.0.11:8080");
    }
    assert_eq!(d.stat("service_redirect"), 5);
    assert_eq!(d.stat("enrolled_connect"), 5);
    // The harness asks for the dump in-process; the command prints the same.
    let out = std::process::Command::new(harness::KMESH)
        .args(["ctl", "dump", "--admin-socket", d.sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("ctl dump prints JSON");
    assert_eq!(printed["stats"]["service_redirect"], 5, "{printed:#}");
    assert_eq!(printed["maps"], d.dump()["maps"]);
}

#[test]
fn random_choice_spreads_over_three_endpoints() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = backends(&mut env, 3);
    let _d = env.daemon(&web(&client, &["10.96.0.10"], &pods, false));

    let t = tally(&env.connect(&client, "10.96.0.10:80", 300));
    // Uniform choice: 100 each, sd ≈ 8.2; [60, 140] is about ±5 sd.
    assert_eq!(t.len(), 3, "{t:?}");
    for (name, n) in &t {
        assert!((60..=140).contains(n), "{name}: {n} of 300 ({t:?})");
    }
}

#[test]
fn direct_pod_ip_access_is_not_rebalanced() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = backends(&mut env, 3);
    let d = env.daemon(&web(&client, &["10.96.0.10"], &pods, false));

    let t = tally(&env.connect(&client, "10.244.0.12:8080", 20));
    assert_eq!(t.get("web-2"), Some(&20), "{t:?}");
    assert_eq!(d.stat("workload_direct"), 20);
    assert_eq!(d.stat("service_redirect"), 0);
}

#[test]
fn sockets_of_non_enrolled_netns_are_untouched() {
    let mut env = Env::new();
    let enrolled = env.pod(2, &[]);
    let other = env.pod(3, &[]);
    // A decoy owns the VIP, so an unredirected connection has somewhere to go.
    let decoy = env.pod(9, &["10.96.0.10"]);
    env.serve(&decoy, &["10.96.0.10:80".to_string()], "decoy");
    let pods = backends(&mut env, 1);
    let d = env.daemon(&web(&enrolled, &["10.96.0.10"], &pods[..1], false));

    assert_eq!(
        tally(&env.connect(&enrolled, "10.96.0.10:80", 10)).get("web-1"),
        Some(&10)
    );
    // Same cgroup, netns not enrolled: the VIP is reached as is.
    let t = tally(&env.connect(&other, "10.96.0.10:80", 10));
    assert_eq!(t.get("decoy"), Some(&10), "{t:?}");
    assert_eq!(d.stat("enrolled_connect"), 10);
}

#[test]
fn removed_endpoint_gets_no_new_connections_and_existing_ones_survive() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = backends(&mut env, 2);
    let both = web(&client, &["10.96.0.10"], &pods, false);
    let d = env.daemon(&both);

    // Hold a connection that landed on web-2.
    let mut held = None;
    for _ in 0..50 {
        let h = env.hold(&client, "10.96.0.10:80");
        assert!(h.conn.ok, "{:?}", h.conn);
        if h.conn.name == "web-2" {
            held = Some(h);
            break;
        }
    }
    let mut held = held.expect("a connection landed on web-2 in 50 tries");
    assert_eq!(held.echo("before").unwrap(), "before");

    let only_one = web(&client, &["10.96.0.10"], &pods[..1], false);
    d.write_config(&only_one);
    d.signal(Signal::SIGHUP);
    d.wait_dump(Duration::from_secs(5), |v| {
        endpoints(v) == ["Kubernetes//Pod/default/web-1"]
    });

    let t = tally(&env.connect(&client, "10.96.0.10:80", 50));
    assert_eq!(t.get("web-1"), Some(&50), "{t:?}");
    assert_eq!(held.echo("after").unwrap(), "after");

    // A plain file change (no signal) is picked up too.
    d.write_config(&both);
    d.wait_dump(Duration::from_secs(5), |v| endpoints(v).len() == 2);
    let t = tally(&env.connect(&client, "10.96.0.10:80", 60));
    assert_eq!(t.len(), 2, "{t:?}");

    // Re-reading an unchanged file rewrites nothing: its workloads keep
    // their ids.
    d.signal(Signal::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let applies = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("SIGHUP: applied"))
            .map(str::to_string)
            .collect()
    };
    while applies(&d.log()).len() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = applies(&d.log()).pop().unwrap();
    assert!(last.contains("(0 map updates, 0 deletes,"), "{last}");
}

#[test]
fn ipv6_vip_and_v4_mapped_vip_are_redirected() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = backends(&mut env, 1);
    let d = env.daemon(&web(
        &client,
        &["10.96.0.10", "fd00:96::10"],
        &pods[..1],
        true,
    ));

    for c in env.connect(&client, "[fd00:96::10]:80", 5) {
        assert!(c.ok, "{c:?}");
        assert_eq!(
            (c.name.as_str(), c.peer.as_str()),
            ("web-1", "[fd00:244::11]:8080")
        );
    }
    // A dual-stack (AF_INET6) socket connecting to ::ffff:VIP goes through
    // connect6 with a v4-mapped address and must land on the IPv4 backend.
    for c in env.connect(&client, "[::ffff:10.96.0.10]:80", 5) {
        assert!(c.ok, "{c:?}");
        assert_eq!(
            (c.name.as_str(), c.peer.as_str()),
            ("web-1", "[::ffff:10.244.0.11]:8080")
        );
    }
    assert_eq!(d.stat("service_redirect"), 10);
}

#[test]
fn invalid_config_is_rejected_and_nothing_changes() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = backends(&mut env, 2);
    let good = web(&client, &["10.96.0.10"], &pods, false);
    let d = env.daemon(&good);
    let before = d.dump();

    // A bad address in an otherwise plausible edit: the whole file is refused.
    let mut bad = web(&client, &["10.96.0.300"], &pods[..1], false);
    d.write_config(&bad);
    d.signal(Signal::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !d.log().contains("services[0].addresses[0]") {
        assert!(
            std::time::Instant::now() < deadline,
            "no error naming the field; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = d.dump();
    assert_eq!(before["services"], after["services"]);
    assert_eq!(before["workloads"], after["workloads"]);
    assert_eq!(tally(&env.connect(&client, "10.96.0.10:80", 40)).len(), 2);

    // An unparsable file too.
    d.write_raw_config("{\"services\": [");
    d.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.dump()["services"], before["services"]);

    // At start, a bad file is an error naming the field, with nothing attached.
    drop(d);
    bad["workloads"][0]["addresses"] = json!(["not-an-ip"]);
    bad["services"][0]["addresses"] = json!(["10.96.0.10"]);
    let err = env
        .daemon_args(&bad, &[])
        .err()
        .expect("daemon must refuse the file");
    assert!(
        err.contains("workloads[0].addresses[0]") && err.contains("not-an-ip"),
        "{err}"
    );
    assert!(!env.bpffs.join("kmesh").join("km_frontend").exists());
    let c = &env.connect(&client, "10.96.0.10:80", 1)[0];
    assert!(!c.ok, "VIP must not be redirected with no daemon: {c:?}");
}

#[test]
fn shutdown_detaches_unless_asked_to_keep_attached() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let decoy = env.pod(9, &["10.96.0.10"]);
    env.serve(&decoy, &["10.96.0.10:80".to_string()], "decoy");
    let pods = backends(&mut env, 1);
    let cfg = web(&client, &["10.96.0.10"], &pods[..1], false);

    let mut d = env.daemon(&cfg);
    assert_eq!(
        tally(&env.connect(&client, "10.96.0.10:80", 3)).get("web-1"),
        Some(&3)
    );
    assert!(d.stop().success());
    assert_eq!(
        tally(&env.connect(&client, "10.96.0.10:80", 3)).get("decoy"),
        Some(&3)
    );
    assert!(
        !env.bpffs.join("kmesh").exists(),
        "pins removed on clean shutdown"
    );

    let mut d = env.daemon_args(&cfg, &["--keep-attached"]).unwrap();
    assert!(d.stop().success());
    // The pinned links keep the programs (and their maps) in place.
    assert_eq!(
        tally(&env.connect(&client, "10.96.0.10:80", 3)).get("web-1"),
        Some(&3)
    );
    assert!(env.bpffs.join("kmesh").join("link_connect4").exists());
}

#[test]
fn strict_service_without_local_endpoints_fails_fast() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let mut svc = service(&["10.96.0.10"]);
    svc["load_balancing"] = json!({"mode": "STRICT", "routing_preference": ["NODE"]});
    let d = env.daemon(&config(&[&client], vec![svc], vec![]));

    let started = std::time::Instant::now();
    let c = &env.connect(&client, "10.96.0.10:80", 1)[0];
    assert!(!c.ok);
    assert_eq!(c.errno, Some(nix::libc::EPERM as i64), "{c:?}");
    assert!(
        started.elapsed() < Duration::from_millis(900) * harness::time_scale(),
        "must not wait for a timeout"
    );
    assert_eq!(d.stat("strict_reject"), 1);
}

#[test]
fn restart_with_kept_links_hands_over_without_a_gap() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = backends(&mut env, 2);
    let vip = &["10.96.0.10"];
    // The old daemon accelerates, so it has sockops on the cgroup too.
    let mut old = env
        .daemon_args(
            &web(&client, vip, &pods[..1], false),
            &["--keep-attached", "--accelerate"],
        )
        .unwrap();
    assert!(old.stop().success());
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_SOCK_OPS), 1);
    // The old programs still redirect with nobody running.
    assert_eq!(
        tally(&env.connect(&client, "10.96.0.10:80", 5)).get("web-1"),
        Some(&5)
    );

    // The new daemon only knows web-2. Multi-attached cgroup programs run in
    // attach order, so had the old link survived, it would win every time.
    let to_web2 = config(
        &[&client],
        vec![service(vip)],
        vec![workload("web-2", &pods[1], false)],
    );
    let new = env.daemon(&to_web2);
    let t = tally(&env.connect(&client, "10.96.0.10:80", 30));
    assert_eq!(t.get("web-2"), Some(&30), "{t:?}");
    // The old sockops hands over to the new daemon's own (a connection
    // the old connect4 sent to a waypoint may still be handshaking), which
    // stays though this config needs none: one of each, no leftovers.
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_SOCK_OPS), 1);
    assert_eq!(env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT), 1);
    assert_eq!(
        new.dump()["attached"],
        json!(["connect4", "connect6", "sockops"])
    );
}
