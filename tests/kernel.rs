//! What the daemon runs on the kernel under test (scripts/kernels.sh runs
//! this file in each guest): the features found at start, where they come
//! short the degraded path, and the kernel memory its maps hold.

mod harness;

use harness::{Env, Pod};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

fn config(client: &Pod, server: &Pod) -> Value {
    json!({
        "accelerate": true,
        "enroll": {"netns": [client.path(), server.path()]},
        "services": [{
            "name": "web", "hostname": "web.default.svc.cluster.local",
            "addresses": ["10.96.0.10"],
            "ports": [{"service_port": 80, "target_port": 8080}]
        }],
        "workloads": [{
            "uid": "Kubernetes//Pod/default/web-1", "name": "web-1",
            "addresses": [server.v4.to_string()],
            "services": {"default/web.default.svc.cluster.local": {}}
        }],
    })
}

fn setup() -> (Env, Pod, Pod) {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let server = env.pod(11, &[]);
    env.serve_in_mesh(&server, &[format!("{}:8080", server.v4)], "web-1", &[]);
    (env, client, server)
}

/// Connect redirect and enrollment work on every kernel; acceleration, asked
/// for, runs where the probes found it possible, and elsewhere the
/// connection stays on plain TCP with one log line saying why; the dump
/// names what the kernel has and what the maps cost.
#[test]
fn acceleration_runs_or_says_why_and_redirect_works_regardless() {
    let (mut env, client, server) = setup();
    let d = env.daemon(&config(&client, &server));
    let (lines, ok) = env.probe(&client, &["transfer", "10.96.0.10:80", "--sizes", "1000"]);
    assert!(ok, "{lines:?}\n{}", d.log());
    let dump = d.dump();
    let k = &dump["kernel"];
    let expected = harness::kernel();
    assert_eq!(k["release"], expected.release.as_str(), "{k:#}");
    assert_eq!(k["acceleration"].is_null(), expected.acceleration.is_none());
    let off_lines = d
        .log()
        .matches("acceleration is off on this kernel")
        .count();
    if expected.acceleration.is_some() {
        assert_eq!(off_lines, 1, "{}", d.log());
        assert_eq!(d.stat("accel_on"), 0, "accelerated on a kernel without it");
        println!("acceleration off here: {}", k["acceleration"]);
    } else {
        assert_eq!(off_lines, 0, "{}", d.log());
        assert!(d.stat("accel_on") > 0, "{dump:#}");
    }
    // The enrolled netns's cookie was read one way or the other.
    let how = if expected.features.netns_cookie_sockopt {
        "getsockopt"
    } else {
        "bpf"
    };
    assert_eq!(k["netns_cookie"], how);
    assert_eq!(d.stat("service_redirect"), 1);
}

/// Each map reports the kernel memory it holds, and the total covers them.
#[test]
fn dump_reports_map_memory() {
    let (mut env, client, server) = setup();
    let d = env.daemon(&config(&client, &server));
    let dump = d.dump();
    let total = dump["map_memory_bytes"].as_u64().unwrap();
    let mut sum = 0;
    for (name, m) in dump["maps"].as_object().unwrap() {
        let bytes = m["memory_bytes"].as_u64().unwrap();
        // An LPM trie allocates per entry only: empty, it holds nothing.
        assert!(bytes > 0 || name == "km_authz_src", "{name}: {m}");
        sum += bytes;
    }
    assert!(total >= sum, "total {total} < sum of the listed maps {sum}");
}

/// A daemon that finds the socket maps of a previous one pinned reuses them
/// with their size; a different --max-sockets is reported, not silently
/// ignored. (Fails before the fix: nothing was logged.)
#[test]
fn a_reused_socket_map_says_it_keeps_its_size() {
    let (mut env, client, server) = setup();
    let cfg = config(&client, &server);
    let mut first = env.daemon_args(&cfg, &["--max-sockets", "64"]).unwrap();
    // Killed: its pins stay for the next daemon.
    first.signal(Signal::SIGKILL);
    first.stop();
    let second = env.daemon_args(&cfg, &["--max-sockets", "128"]).unwrap();
    let log = second.log();
    assert!(
        log.contains("with its 64 entries: --max-sockets 128"),
        "no word on the ignored size:\n{log}"
    );
    assert_eq!(second.dump()["maps"]["km_sock"]["capacity"], 64);
}
