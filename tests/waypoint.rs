//! System tests for waypoint redirect: the connect programs send traffic
//! for a service (or a workload) with a waypoint to the waypoint instead,
//! and sk_msg prepends one TLV with the original destination to the first
//! send. The test waypoint parses the TLV, records it, and forwards to the
//! original destination, whose echo proves the bytes after it unchanged.

mod harness;

use std::path::Path;

use harness::{Env, Pod};
use serde_json::{json, Value};

const WEB: &str = "default/web.default.svc.cluster.local";
const WAYPOINT_SVC: &str = "default/waypoint.default.svc.cluster.local";

fn web_service(vips: &[&str], waypoint: Option<Value>) -> Value {
    let mut s = json!({
        "name": "web", "hostname": "web.default.svc.cluster.local",
        "addresses": vips,
        "ports": [{"service_port": 80, "target_port": 8080}]
    });
    if let Some(w) = waypoint {
        s["waypoint"] = w;
    }
    s
}

fn backend(pod: &Pod, waypoint: Option<Value>) -> Value {
    let mut w = json!({
        "uid": "Kubernetes//Pod/default/web-1", "name": "web-1",
        "addresses": [pod.v4.to_string(), pod.v6.to_string()],
        "services": {WEB: {}}
    });
    if let Some(wp) = waypoint {
        w["waypoint"] = wp;
    }
    w
}

struct World {
    env: Env,
    client: Pod,
    waypoint: Pod,
    web: Pod,
    log: std::path::PathBuf,
}

/// Client pod 2, waypoint pod 3 (listening on [::]:15008, dual-stack),
/// backend web-1 in pod 11 on :8080.
fn world() -> World {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let waypoint = env.pod(3, &[]);
    let web = env.pod(11, &[]);
    env.serve(
        &web,
        &[format!("{}:8080", web.v4), format!("[{}]:8080", web.v6)],
        "web-1",
    );
    let log = env.waypoint(&waypoint, "[::]:15008");
    World {
        env,
        client,
        waypoint,
        web,
        log,
    }
}

fn config(w: &World, services: Vec<Value>, workloads: Vec<Value>) -> Value {
    json!({
        "enroll": {"netns": [w.client.path(), Env::enroll_waypoint(&w.waypoint)]},
        "services": services,
        "workloads": workloads,
    })
}

fn log_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs a byte-exact transfer from the client; asserts every connection
/// reached web-1 with all bytes intact.
fn transfer(w: &World, addr: &str, args: &[&str], conns: usize) {
    let mut a = vec!["transfer", addr];
    a.extend_from_slice(args);
    let (lines, ok) = w.env.probe(&w.client, &a);
    assert!(ok, "{lines:?}");
    assert_eq!(lines.len(), conns, "{lines:?}");
    for l in &lines {
        assert_eq!(l["name"], "web-1", "{l}");
    }
}

#[test]
fn service_waypoint_gets_one_tlv_per_connection_v4() {
    if harness::skip_unless_waypoints("service_waypoint_gets_one_tlv_per_connection_v4") {
        return;
    }
    let mut w = world();
    let wp = json!({"address": w.waypoint.v4.to_string(), "port": 15008});
    let cfg = config(
        &w,
        vec![web_service(&["10.96.0.10"], Some(wp))],
        vec![backend(&w.web, None)],
    );
    let d = w.env.daemon(&cfg);

    // A large first write (64 KiB: see the limit in README, larger single
    // writes can hit EAGAIN on the sockhash socket's concurrent read),
    // then 1 MiB in many small writes, then several sizes.
    transfer(&w, "10.96.0.10:80", &["--sizes", "65536,1"], 1);
    transfer(
        &w,
        "10.96.0.10:80",
        &["--sizes", "1048576", "--chunk", "4096"],
        1,
    );
    transfer(&w, "10.96.0.10:80", &["--sizes", "4096", "--chunk", "7"], 1);
    transfer(
        &w,
        "10.96.0.10:80",
        &["--sizes", "1,64,65536", "--conns", "4"],
        4,
    );

    let lines = log_lines(&w.log);
    assert_eq!(lines.len(), 7, "one record per connection: {lines:?}");
    for l in &lines {
        assert_eq!(l["tlv"], true, "{l}");
        assert_eq!(l["orig"], "10.96.0.10:80", "{l}");
    }
    assert!(d.stat("tlv_sent") >= 7);
    assert_eq!(d.stat("tlv_failed"), 0);

    // Once the waypoint had acknowledged the TLV, the map had nothing left
    // to do for a client socket: each left km_sock before it closed (a
    // closed socket is out of the map already, so no delete would count).
    assert_eq!(d.stat("accel_left"), 7);
}

#[test]
fn service_waypoint_gets_one_tlv_per_connection_v6() {
    if harness::skip_unless_waypoints("service_waypoint_gets_one_tlv_per_connection_v6") {
        return;
    }
    let mut w = world();
    let wp = json!({"address": w.waypoint.v6.to_string(), "port": 15008});
    let cfg = config(
        &w,
        vec![web_service(&["fd00:96::10"], Some(wp))],
        vec![backend(&w.web, None)],
    );
    let _d = w.env.daemon(&cfg);

    transfer(
        &w,
        "[fd00:96::10]:80",
        &["--sizes", "1048576,3", "--chunk", "1000"],
        1,
    );
    transfer(&w, "[fd00:96::10]:80", &["--sizes", "1048576,3"], 1);
    transfer(
        &w,
        "[fd00:96::10]:80",
        &["--sizes", "4096", "--chunk", "1"],
        1,
    );
    transfer(&w, "[fd00:96::10]:80", &["--sizes", "1", "--conns", "3"], 3);
    let lines = log_lines(&w.log);
    assert_eq!(lines.len(), 6, "{lines:?}");
    for l in &lines {
        assert_eq!(l["tlv"], true, "{l}");
        assert_eq!(l["orig"], "[fd00:96::10]:80", "{l}");
    }
}

#[test]
fn connections_not_via_a_waypoint_carry_no_tlv() {
    if harness::skip_unless_waypoints("connections_not_via_a_waypoint_carry_no_tlv") {
        return;
    }
    let mut w = world();
    let cfg = config(
        &w,
        vec![web_service(&["10.96.0.10"], None)],
        vec![backend(&w.web, None)],
    );
    let _d = w.env.daemon(&cfg);
    // Service without waypoint: exact echo means nothing was prepended.
    transfer(&w, "10.96.0.10:80", &["--sizes", "1,4096"], 1);
    // The waypoint pod addressed directly sees plain bytes (and echoes).
    let (lines, ok) = w.env.probe(
        &w.client,
        &[
            "transfer",
            "10.244.0.3:15008",
            "--sizes",
            "5,300",
            "--conns",
            "2",
        ],
    );
    assert!(ok, "{lines:?}");
    assert!(
        lines.iter().all(|l| l["name"] == "waypoint-no-tlv"),
        "{lines:?}"
    );
    let lines = log_lines(&w.log);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|l| l["tlv"] == false), "{lines:?}");
}

#[test]
fn workload_waypoint_takes_direct_pod_traffic() {
    if harness::skip_unless_waypoints("workload_waypoint_takes_direct_pod_traffic") {
        return;
    }
    let mut w = world();
    let wp = json!({"address": w.waypoint.v4.to_string(), "port": 15008});
    let cfg = config(
        &w,
        vec![web_service(&["10.96.0.10"], None)],
        vec![backend(&w.web, Some(wp))],
    );
    let _d = w.env.daemon(&cfg);
    transfer(&w, "10.244.0.11:8080", &["--sizes", "100"], 1);
    // Through the service, the picked backend's waypoint applies too, with
    // the backend (and its target port) as the original destination.
    transfer(&w, "10.96.0.10:80", &["--sizes", "100"], 1);
    let lines = log_lines(&w.log);
    let origs: Vec<&str> = lines.iter().map(|l| l["orig"].as_str().unwrap()).collect();
    assert_eq!(origs, ["10.244.0.11:8080", "10.244.0.11:8080"], "{lines:?}");
}

#[test]
fn hostname_waypoint_is_resolved_through_its_service() {
    if harness::skip_unless_waypoints("hostname_waypoint_is_resolved_through_its_service") {
        return;
    }
    let mut w = world();
    // The waypoint as a service (VIP 10.96.0.100:15008) backed by pod 3.
    let wp_svc = json!({
        "name": "waypoint", "hostname": "waypoint.default.svc.cluster.local",
        "addresses": ["10.96.0.100"], "ports": [{"service_port": 15008}]
    });
    let wp_pod = json!({
        "uid": "Kubernetes//Pod/default/waypoint-0", "name": "waypoint-0",
        "addresses": [w.waypoint.v4.to_string()], "services": {WAYPOINT_SVC: {}}
    });
    let wp = json!({"service": WAYPOINT_SVC, "port": 15008});
    let cfg = config(
        &w,
        vec![web_service(&["10.96.0.10"], Some(wp)), wp_svc],
        vec![backend(&w.web, None), wp_pod],
    );
    let _d = w.env.daemon(&cfg);
    transfer(&w, "10.96.0.10:80", &["--sizes", "10,20"], 1);
    let lines = log_lines(&w.log);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["orig"], "10.96.0.10:80");
    // The waypoint pod itself is never sent to a waypoint: its onward
    // connection to the VIP went straight to web-1 (else it would loop).
}

/// Waits until the daemon has applied `n` config file changes.
fn wait_reloads(d: &harness::Daemon, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while d.log().matches("config file changed: applied").count() < n {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// sockops costs every connection in the cgroup, so it goes on only when
/// something needs it: here a waypoint arriving by reload. The kernel's
/// own list of programs on the cgroup is checked, not just the dump.
#[test]
fn sockops_is_attached_once_a_waypoint_is_configured() {
    if harness::skip_unless_waypoints("sockops_is_attached_once_a_waypoint_is_configured") {
        return;
    }
    let mut w = world();
    let plain = config(
        &w,
        vec![web_service(&["10.96.0.10"], None)],
        vec![backend(&w.web, None)],
    );
    let mut d = w.env.daemon(&plain);
    let sockops = || w.env.cgroup_progs(libbpf_sys::BPF_CGROUP_SOCK_OPS);
    assert_eq!(d.dump()["attached"], json!(["connect4", "connect6"]));
    assert_eq!(sockops(), 0);
    assert_eq!(w.env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT), 1);
    transfer(&w, "10.96.0.10:80", &["--sizes", "1,4096"], 1);

    let wp = json!({"address": w.waypoint.v4.to_string(), "port": 15008});
    d.write_config(&config(
        &w,
        vec![web_service(&["10.96.0.10"], Some(wp))],
        vec![backend(&w.web, None)],
    ));
    wait_reloads(&d, 1);
    assert_eq!(
        d.dump()["attached"],
        json!(["connect4", "connect6", "sockops"])
    );
    assert_eq!(sockops(), 1);
    transfer(&w, "10.96.0.10:80", &["--sizes", "1,4096"], 1);
    let lines = log_lines(&w.log);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["tlv"], true, "{lines:?}");
    assert_eq!(lines[0]["orig"], "10.96.0.10:80", "{lines:?}");

    // The waypoint going away leaves sockops on: a connect that picked it
    // just before must still get its TLV.
    d.write_config(&plain);
    wait_reloads(&d, 2);
    assert_eq!(sockops(), 1);
    transfer(&w, "10.96.0.10:80", &["--sizes", "100"], 1);
    assert_eq!(log_lines(&w.log).len(), 1);

    assert!(d.stop().success());
    assert_eq!(sockops(), 0);
    assert_eq!(w.env.cgroup_progs(libbpf_sys::BPF_CGROUP_INET4_CONNECT), 0);
}
