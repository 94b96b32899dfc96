//! System tests for connection telemetry: real connections between netns
//! pods through a service VIP give exact istio_tcp_* counts and bytes for
//! both reporters, resets and refusals are labelled, a full ring buffer
//! counts lost events without holding up a connection, and the access log
//! switches format at run time. The daemon's metrics are scraped over HTTP
//! on free loopback ports.

mod harness;

use std::{process::Command, time::Duration};

use harness::{
    http::{request, scrape, HttpPorts},
    poll_until, web_config, Daemon, Env, Pod, KMESH,
};
use serde_json::{json, Value};

const VIP: &str = "10.96.0.10:80";
const CLOSED_VIP: &str = "10.96.0.11:80";
const HOST: &str = "web.default.svc.cluster.local";

/// A client pod and two backends (web-1, web-2, in the attached cgroup so
/// their accepted sockets report too), all enrolled and all workloads of
/// the model; a second service whose backend port has no listener.
fn world(env: &mut Env, extra: &[&str]) -> (Pod, Daemon, HttpPorts) {
    world_with(env, extra, Variant::default())
}

/// How `world_with` and `counted_exactly` differ from the plain case.
#[derive(Clone, Copy, Default)]
struct Variant {
    /// Same-host acceleration on.
    accelerate: bool,
    /// The web service's circuit breaker (sockops keeps a note on each
    /// client socket).
    breaker: bool,
    /// Workloads with their IPv6 addresses too, servers on both, and the
    /// web service's IPv6 VIP, which the client connects to.
    v6: bool,
}

const VIP6: &str = "[fd00:96::10]:80";

/// `world`, as `v` says.
fn world_with(env: &mut Env, extra: &[&str], v: Variant) -> (Pod, Daemon, HttpPorts) {
    let client = env.pod(2, &[]);
    let pods: Vec<Pod> = (1..=2u8).map(|i| env.pod(10 + i, &[])).collect();
    for (i, p) in pods.iter().enumerate() {
        let mut listen = vec![format!("{}:8080", p.v4)];
        if v.v6 {
            listen.push(format!("[{}]:8080", p.v6));
        }
        env.serve_in_mesh(p, &listen, &format!("web-{}", i + 1), &[]);
    }
    let mut cfg = web_config(
        Env::enroll_list(&[&client, &pods[0], &pods[1]]),
        &[("web-1", &pods[0]), ("web-2", &pods[1])],
    );
    cfg["services"].as_array_mut().unwrap().push(json!({
        "name": "closed", "namespace": "default", "hostname": "closed.default.svc.cluster.local",
        "addresses": ["10.96.0.11"],
        "ports": [{"service_port": 80, "target_port": 9999}]
    }));
    if v.v6 {
        for (w, p) in cfg["workloads"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .zip(&pods)
        {
            w["addresses"].as_array_mut().unwrap().push(json!(p.v6));
        }
        cfg["services"][0]["addresses"]
            .as_array_mut()
            .unwrap()
            .push(json!("fd00:96::10"));
    }
    cfg["workloads"].as_array_mut().unwrap().push(json!({
        "uid": "Kubernetes//Pod/default/client", "name": "client", "namespace": "default",
        "addresses": if v.v6 { json!([client.v4, client.v6]) } else { json!([client.v4]) },
        "services": {"default/closed.default.svc.cluster.local": {}}
    }));
    cfg["accelerate"] = json!(v.accelerate);
    if v.breaker {
        let web = &mut cfg["services"][0];
        assert_eq!(web["hostname"], HOST);
        web["max_connections"] = json!(64);
    }
    let ports = HttpPorts::new();
    let mut args = ports.args();
    args.extend(["--telemetry".to_string(), "on".to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = env.daemon_args(&cfg, &args).expect("daemon starts");
    (client, d, ports)
}

/// The sum of `metric`'s samples whose labels include every `want` pair.
fn sum(text: &str, metric: &str, want: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(metric)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            want.iter()
                .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Scrapes until `cond` holds (events reach the reader asynchronously).
fn scrape_until(ports: &HttpPorts, d: &Daemon, what: &str, cond: impl Fn(&str) -> bool) -> String {
    poll_until(
        Duration::from_secs(10),
        || scrape(ports),
        |text| cond(text),
        |text| format!("{what} not reached:\n{text}\nlog:\n{}", d.log()),
    )
}

fn transfer(env: &Env, client: &Pod, addr: &str, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["transfer", addr];
    a.extend_from_slice(args);
    let (lines, _) = env.probe(client, &a);
    lines
}

const SRC: (&str, &str) = ("reporter", "source");
const DST: (&str, &str) = ("reporter", "destination");

#[test]
fn connections_and_bytes_are_counted_exactly_on_both_reporters() {
    counted_exactly(Variant::default());
}

/// IPv6 sockets: their addresses come from other fields of the socket.
#[test]
fn ipv6_connections_and_bytes_are_counted_exactly_on_both_reporters() {
    counted_exactly(Variant {
        v6: true,
        ..Variant::default()
    });
}

/// A client socket the circuit breaker counts (sockops keeps a note on
/// it) is reported all the same, and its note goes at its close.
#[test]
fn connections_a_circuit_breaker_counts_are_counted_exactly_too() {
    counted_exactly(Variant {
        breaker: true,
        ..Variant::default()
    });
}

/// With acceleration the bytes go from socket to socket, past TCP's
/// counters: they are counted all the same, exactly, on both reporters.
#[test]
fn accelerated_connections_and_bytes_are_counted_exactly_on_both_reporters() {
    if harness::skip_unless_acceleration(
        "accelerated_connections_and_bytes_are_counted_exactly_on_both_reporters",
    ) {
        return;
    }
    counted_exactly(Variant {
        accelerate: true,
        ..Variant::default()
    });
}

fn counted_exactly(v: Variant) {
    let mut env = Env::new();
    let (client, d, ports) = world_with(&mut env, &[], v);
    // The tracepoint sees every TCP socket on the host: connections
    // between pods that are not enrolled go unreported (checked below:
    // nothing under other labels, and their events would come first).
    let (outside, outside_server) = (env.pod(30, &[]), env.pod(31, &[]));
    let outside_addr = format!("{}:8080", outside_server.v4);
    env.serve(
        &outside_server,
        std::slice::from_ref(&outside_addr),
        "outside",
    );
    let conns = env.connect_opts(&outside, &outside_addr, 3, false);
    assert!(conns.iter().all(|c| c.ok), "{conns:?}");
    const N: usize = 6;
    let vip = if v.v6 { VIP6 } else { VIP };
    let lines = transfer(&env, &client, vip, &["--sizes", "100,1000", "--conns", "6"]);
    assert_eq!(lines.len(), N, "{lines:?}");
    assert!(lines.iter().all(|l| l["ok"] == true), "{lines:?}");

    let closed = "istio_tcp_connections_closed_total";
    let text = scrape_until(&ports, &d, "N closed on both reporters", |t| {
        sum(t, closed, &[SRC]) >= N as f64 && sum(t, closed, &[DST]) >= N as f64
    });
    let n = N as f64;
    // Client to server: the messages; back: the greeting ("web-k\n") and
    // their echo. Counted from the sockets' own counters: exact.
    let request = n * 1100.0;
    let response = n * (1100.0 + 6.0);
    let svc = [
        ("destination_service", HOST),
        ("destination_service_name", "web"),
        ("destination_service_namespace", "default"),
    ];
    for rep in [SRC, DST] {
        let mut want = vec![
            rep,
            ("source_workload", "client"),
            ("source_workload_namespace", "default"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/default",
            ),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "unknown"),
        ];
        want.extend_from_slice(&svc);
        for (metric, v) in [
            ("istio_tcp_connections_opened_total", n),
            ("istio_tcp_connections_closed_total", n),
            ("istio_tcp_received_bytes_total", request),
            ("istio_tcp_sent_bytes_total", response),
        ] {
            assert_eq!(sum(&text, metric, &want), v, "{metric} {want:?}\n{text}");
            // Nothing was counted under other labels.
            assert_eq!(sum(&text, metric, &[rep]), v, "{metric} {rep:?}\n{text}");
        }
        // Each backend served some; together all.
        let by_backend: f64 = ["web-1", "web-2"]
            .iter()
            .map(|w| sum(&text, closed, &[rep, ("destination_workload", w)]))
            .sum();
        assert_eq!(by_backend, n, "{text}");
    }
    assert_eq!(sum(&text, "istio_tcp_connections_failed_total", &[]), 0.0);
    // No per-connection labels: no pod address or port in any series.
    assert!(!text.contains(&client.v4.to_string()), "{text}");
    assert!(!text.contains(&client.v6.to_string()), "{text}");
    assert_eq!(d.stat("telemetry_events_lost"), 0);
    // Bytes went the accelerated way (so past TCP's counters), or none.
    assert_eq!(
        d.stat("accel_on") > 0,
        v.accelerate,
        "{}",
        d.dump()["stats"]
    );
    dashboard_queries_only_exported_metrics(&text);
    // Every note went with its socket (only the breaker leaves them).
    assert_eq!(d.dump()["maps"]["km_conn_note"]["entries"], 0);
    assert_eq!(
        d.dump()["kernel"]["telemetry_on"],
        true,
        "{}",
        d.dump()["kernel"]
    );
}

/// Every metric deploy/grafana/kmesh.json queries is one the daemon
/// exports (xDS, DNS and BPF run-time ones only with an xDS source, a
/// resolver or --bpf-stats, which this daemon has not; apply failures only
/// once one happened;
/// an istio_tcp_* family without series yet, e.g. no failed connect, is
/// left out of the text, so those are checked by name).
fn dashboard_queries_only_exported_metrics(text: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/kmesh.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices(['i', 'k']) {
                let word: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let boundary = i == 0 || !expr.as_bytes()[i - 1].is_ascii_alphanumeric();
                if boundary && (word.starts_with("istio_tcp_") || word.starts_with("kmesh_")) {
                    names.push(word);
                }
            }
        }
    }
    assert!(names.len() > 10, "{names:?}");
    const OPTIONAL: [&str; 4] = ["_xds_", "_dns_", "_bpf_program_", "_apply_failures_"];
    for name in names
        .iter()
        .filter(|n| !OPTIONAL.iter().any(|o| n.contains(o)))
    {
        let base = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        const ISTIO: [&str; 5] = [
            "istio_tcp_connections_opened",
            "istio_tcp_connections_closed",
            "istio_tcp_connections_failed",
            "istio_tcp_sent_bytes",
            "istio_tcp_received_bytes",
        ];
        assert!(
            text.contains(&format!("# TYPE {base} ")) || ISTIO.contains(&base),
            "the dashboard queries {name}, which is not exported"
        );
    }
}

#[test]
fn a_reset_and_a_refused_connection_are_labelled_as_such() {
    let mut env = Env::new();
    let (client, d, ports) = world(&mut env, &[]);
    // Sends 10 bytes, then closes with SO_LINGER 0: a reset.
    let lines = transfer(&env, &client, VIP, &["--abort-after", "10"]);
    assert!(lines.iter().all(|l| l["ok"] == true), "{lines:?}");
    let text = scrape_until(&ports, &d, "the reset on both ends", |t| {
        sum(t, "istio_tcp_connections_closed_total", &[]) >= 2.0
    });
    let closed = "istio_tcp_connections_closed_total";
    assert_eq!(
        sum(
            &text,
            closed,
            &[SRC, ("response_flags", "UC"), ("destination_service", HOST)]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sum(
            &text,
            closed,
            &[DST, ("response_flags", "DC"), ("source_workload", "client")]
        ),
        1.0,
        "{text}"
    );
    // The server read the 10 bytes before the reset reached it.
    assert_eq!(
        sum(&text, "istio_tcp_received_bytes_total", &[DST]),
        10.0,
        "{text}"
    );

    // Nothing listens on the closed service's port: refused.
    let conns = env.connect(&client, CLOSED_VIP, 1);
    assert!(!conns[0].ok, "{conns:?}");
    let text = scrape_until(&ports, &d, "the refused connection", |t| {
        sum(t, "istio_tcp_connections_failed_total", &[]) >= 1.0
    });
    let refused = [
        SRC,
        ("response_flags", "CONNECT"),
        ("destination_service", "closed.default.svc.cluster.local"),
        ("source_workload", "client"),
    ];
    assert_eq!(
        sum(&text, "istio_tcp_connections_failed_total", &refused),
        1.0,
        "{text}"
    );
    // It never opened, so it is neither opened nor closed.
    let closed_svc = [("destination_service", "closed.default.svc.cluster.local")];
    assert_eq!(
        sum(&text, "istio_tcp_connections_opened_total", &closed_svc),
        0.0
    );
    assert_eq!(sum(&text, closed, &closed_svc), 0.0);
}

#[test]
fn a_full_ring_buffer_counts_lost_events_and_every_connection_succeeds() {
    let mut env = Env::new();
    // One page: 46 opens or closes of 80 bytes (88 with each one's header).
    let (client, d, ports) = world(&mut env, &["--telemetry-ring-bytes", "4096"]);
    scrape(&ports);
    // The reader stopped (the daemon is): the data path must not wait.
    d.signal(nix::sys::signal::Signal::SIGSTOP);
    const N: usize = 60;
    let lines = transfer(&env, &client, VIP, &["--sizes", "10", "--conns", "60"]);
    d.signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!(lines.len(), N, "{lines:?}");
    assert!(lines.iter().all(|l| l["ok"] == true), "{lines:?}");
    // Five events per connection (the client's connect, open and close at
    // each end): each is either read or lost, never both, never neither.
    let sample = |t: &str, m: &str| harness::http::sample(t, m).unwrap_or(0.0);
    let text = scrape_until(&ports, &d, "every event read or lost", |t| {
        sample(t, "kmesh_telemetry_events_read_total")
            + sample(t, "kmesh_telemetry_events_lost_total")
            == (5 * N) as f64
    });
    let lost_n = sample(&text, "kmesh_telemetry_events_lost_total");
    assert!(lost_n > 0.0, "{text}");
    assert_eq!(d.stat("telemetry_events_lost") as f64, lost_n);
    // What was read was counted: opens and closes, at most four a
    // connection.
    let seen = sum(&text, "istio_tcp_connections_opened_total", &[])
        + sum(&text, "istio_tcp_connections_closed_total", &[]);
    assert!(seen > 0.0 && seen <= (4 * N) as f64, "{text}");
}

fn wait_log(d: &Daemon, what: &str, cond: impl Fn(&str) -> bool) -> String {
    poll_until(
        Duration::from_secs(10),
        || d.log(),
        |log| cond(log),
        |log| format!("{what} not logged:\n{log}"),
    )
}

fn ctl(d: &Daemon, args: &[&str]) -> String {
    let out = Command::new(KMESH)
        .arg("ctl")
        .args(args)
        .args(["--admin-socket", d.sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_access_log_switches_between_off_text_and_json_at_run_time() {
    let mut env = Env::new();
    let (client, d, ports) = world(&mut env, &[]);
    let closed = |t: &str| sum(t, "istio_tcp_connections_closed_total", &[]);
    // Off by default: the connection is counted, not logged.
    assert_eq!(ctl(&d, &["access-log"]).trim(), "off");
    transfer(&env, &client, VIP, &["--sizes", "100"]);
    scrape_until(&ports, &d, "the first connection", |t| closed(t) >= 2.0);
    assert!(!d.log().contains("access: "), "{}", d.log());

    // Text, through the admin HTTP.
    let r = request("POST", ports.admin, "/access_log?format=text").unwrap();
    assert_eq!((r.status, r.body.trim()), (200, "text"));
    transfer(&env, &client, VIP, &["--sizes", "100"]);
    let log = wait_log(&d, "text lines", |l| l.matches("access: ").count() >= 2);
    let line = log
        .lines()
        .find(|l| l.contains("access: reporter=source"))
        .unwrap_or_else(|| panic!("{log}"));
    for part in [
        &format!("src={}:", client.v4),
        "src_workload=client.default",
        "dst_workload=web-",
        &format!("dst_service={HOST}"),
        "to_server=100",
        "to_client=106",
        "reason=normal",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }

    // JSON, through kmesh ctl; a bad format changes nothing.
    let r = request("POST", ports.admin, "/access_log?format=yaml").unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("\"yaml\""), "{}", r.body);
    assert_eq!(ctl(&d, &["access-log", "json"]).trim(), "json");
    transfer(&env, &client, VIP, &["--sizes", "100"]);
    let log = wait_log(&d, "json lines", |l| l.lines().any(|l| l.starts_with('{')));
    let objs: Vec<Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let src = objs
        .iter()
        .find(|o| o["reporter"] == "source")
        .unwrap_or_else(|| panic!("{objs:?}"));
    assert_eq!(src["src_workload"], "client");
    assert_eq!(src["dst_service"], HOST);
    assert_eq!(src["bytes_to_server"], 100);
    assert_eq!(src["bytes_to_client"], 106);
    assert_eq!(src["reason"], "normal");
    assert!(src["duration_ms"].as_f64().unwrap() > 0.0);
    let r = request("GET", ports.admin, "/access_log").unwrap();
    assert_eq!(r.body.trim(), "json");
    // Off again: no more lines.
    assert_eq!(ctl(&d, &["access-log", "off"]).trim(), "off");
    let before = d.log().lines().filter(|l| l.starts_with('{')).count();
    transfer(&env, &client, VIP, &["--sizes", "100"]);
    scrape_until(&ports, &d, "the last connection", |t| closed(t) >= 8.0);
    let after = d.log().lines().filter(|l| l.starts_with('{')).count();
    assert_eq!(before, after);

    // The config file's key: a bad value is refused naming it (the daemon
    // keeps its state), a good one switches the log at the reload.
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&d.config).unwrap()).unwrap();
    cfg["access_log"] = json!("yaml");
    d.write_config(&cfg);
    wait_log(&d, "the refused key", |l| {
        l.contains("config rejected") && l.contains("access_log")
    });
    assert_eq!(ctl(&d, &["access-log"]).trim(), "off");
    cfg["access_log"] = json!("text");
    d.write_config(&cfg);
    wait_log(&d, "the switch by the file", |l| {
        l.contains("access log: text (config file)")
    });
    assert_eq!(ctl(&d, &["access-log"]).trim(), "text");
    let lines = |l: &str| l.matches("access: ").count();
    let before = lines(&d.log());
    transfer(&env, &client, VIP, &["--sizes", "100"]);
    wait_log(&d, "text lines again", |l| lines(l) >= before + 2);
}

/// Bad telemetry flags stop the daemon before it touches the kernel, with
/// an error naming the flag and the value.
#[test]
fn bad_telemetry_flags_are_refused_naming_them() {
    for (flag, value) in [
        ("--telemetry", "maybe"),
        ("--telemetry-ring-bytes", "5000"),
        ("--telemetry-ring-bytes", "2048"),
        ("--access-log", "yaml"),
    ] {
        let out = Command::new(KMESH)
            .args(["daemon", flag, value])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag) && err.contains(value), "{err}");
    }
}
