//! System tests for the daemon's observability: metrics (:15020 style),
//! admin HTTP, readiness, `kmesh ctl log-level` / `metrics`, and a real
//! Prometheus server scraping the daemon. Real connections in netns pods
//! give the counters exact expected values. Every server listens on a free
//! 127.0.0.1 port (harness::http::HttpPorts), so tests run in parallel.

mod harness;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use harness::{
    http::{self, get, get_when_up, request, sample, scrape, HttpPorts},
    tally, time_scale, web_config, xds, Daemon, Env, Pod, KMESH,
};
use serde_json::{json, Value};

const VIP: &str = "10.96.0.10:80";

/// A client pod, two backends behind the web VIP, and the daemon with its
/// HTTP servers on.
fn web_world(env: &mut Env) -> (Pod, Daemon, HttpPorts) {
    let client = env.pod(2, &[]);
    let pods = env.backends(2);
    let cfg = web_config(
        Env::enroll_list(&[&client]),
        &[("web-1", &pods[0]), ("web-2", &pods[1])],
    );
    let ports = HttpPorts::new();
    let args = ports.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = env.daemon_args(&cfg, &args).expect("daemon starts");
    (client, d, ports)
}

fn ctl(d: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(KMESH)
        .arg("ctl")
        .args(args)
        .args(["--admin-socket", d.sock.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn metrics_count_real_connections_and_map_entries_exactly() {
    let mut env = Env::new();
    let (client, d, ports) = web_world(&mut env);
    const N: u32 = 12;
    let t = tally(&env.connect(&client, VIP, N));
    assert_eq!(t.values().sum::<u32>(), N, "{t:?}");

    let text = scrape(&ports);
    assert_eq!(
        sample(&text, "kmesh_service_redirect_total"),
        Some(N.into()),
        "{text}"
    );
    // The service: one VIP, two endpoints (the two backends' addresses),
    // one enrolled netns.
    for (map, want) in [
        ("km_vip", 1.0),
        ("km_workload", 2.0),
        ("km_endpoint", 2.0),
        ("km_manage", 1.0),
    ] {
        let series = format!("kmesh_map_entries{{map=\"{map}\"}}");
        assert_eq!(sample(&text, &series), Some(want), "{series}\n{text}");
    }
    // Every km_stats counter and every map's size and capacity are the
    // dump's (no traffic since the scrape).
    let dump = d.dump();
    for (name, v) in dump["stats"].as_object().unwrap() {
        let series = format!("kmesh_{name}_total");
        assert_eq!(
            sample(&text, &series),
            v.as_f64(),
            "{series} differs from the dump"
        );
    }
    for (map, usage) in dump["maps"].as_object().unwrap() {
        for (metric, field) in [("map_entries", "entries"), ("map_capacity", "capacity")] {
            let series = format!("kmesh_{metric}{{map=\"{map}\"}}");
            assert_eq!(sample(&text, &series), usage[field].as_f64(), "{series}");
        }
    }
    // The start-up apply was timed; no other apply happened.
    assert_eq!(
        sample(&text, "kmesh_applies_total{trigger=\"start\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "kmesh_apply_duration_seconds_count"),
        Some(1.0)
    );
    // No xDS source, no xDS series; no per-connection labels.
    assert!(!text.contains("kmesh_xds_"), "{text}");
    assert!(!text.contains(&client.v4.to_string()), "{text}");
    // The other path and the admin's /stats serve the same metrics.
    let alt = get(ports.metrics, "/stats/prometheus");
    assert_eq!(
        sample(&alt.body, "kmesh_service_redirect_total"),
        Some(N.into())
    );
    let stats = get(ports.admin, "/stats");
    assert_eq!(stats.status, 200);
    assert_eq!(
        sample(&stats.body, "kmesh_service_redirect_total"),
        Some(N.into())
    );
    // So does `kmesh ctl metrics`, over the Unix socket.
    let out = ctl(&d, &["metrics"]);
    assert!(out.status.success(), "{out:?}");
    let ctl_text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        sample(&ctl_text, "kmesh_service_redirect_total"),
        Some(N.into()),
        "{ctl_text}"
    );
    assert!(ctl_text.trim_end().ends_with("# EOF"), "{ctl_text}");
    // Unknown metrics paths are a 404 naming the path.
    let r = get(ports.metrics, "/metricz");
    assert_eq!(r.status, 404);
    assert!(r.body.contains("/metricz"), "{}", r.body);
}

#[test]
fn bpf_stats_count_program_runs_only_when_asked() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(1);
    let cfg = web_config(Env::enroll_list(&[&client]), &[("web-1", &pods[0])]);
    let ports = HttpPorts::new();
    let mut args = ports.args();
    args.push("--bpf-stats".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _d = env.daemon_args(&cfg, &args).expect("daemon starts");
    let text = scrape(&ports);
    let runs = |t: &str| sample(t, "kmesh_bpf_program_runs_total{program=\"connect4\"}");
    let before = runs(&text).expect("connect4 runs exported");
    tally(&env.connect(&client, VIP, 5));
    let text = scrape(&ports);
    // Other tests' connects run the programs too (their own copies, but
    // the host's accounting is shared): at least ours were counted.
    assert!(runs(&text).unwrap() >= before + 5.0, "{text}");
    assert!(
        sample(
            &text,
            "kmesh_bpf_program_run_seconds_total{program=\"connect4\"}"
        )
        .unwrap()
            > 0.0
    );

    // Without the flag there are no program series.
    let mut env = Env::new();
    let (_c, _d, ports) = web_world(&mut env);
    assert!(!scrape(&ports).contains("kmesh_bpf_program"));
}

#[test]
fn readiness_waits_for_the_first_xds_response() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let pods = env.backends(1);
    // The control plane is down when the daemon starts.
    let mut cp = xds::Cp::start(None);
    cp.cp.update(|b| {
        let (n, s) = xds::service("web", &["10.96.0.10"], &[(80, 8080)]);
        b.set(&n, s);
        let (n, w) = xds::workload("web-1", &[pods[0].v4], &["web"]);
        b.set(&n, w);
    });
    cp.kill();
    let ports = HttpPorts::new();
    let mut args = ports.args();
    args.extend(["--xds-address".into(), cp.url()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = env
        .daemon_args(&json!({"enroll": {"netns": [client.path()]}}), &args)
        .expect("daemon starts");
    let r = get_when_up(ports.readiness, "/healthz/ready", Duration::from_secs(10));
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("xDS"), "{}", r.body);
    // Still not ready a while later: nothing reachable to apply from.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get(ports.readiness, "/healthz/ready").status, 503);
    let text = scrape(&ports);
    assert_eq!(sample(&text, "kmesh_xds_connected"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "kmesh_xds_responses_total"), Some(0.0));

    cp.restart();
    let deadline = Instant::now() + Duration::from_secs(20) * time_scale();
    while get(ports.readiness, "/healthz/ready").status != 200 {
        assert!(Instant::now() < deadline, "not ready:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Ready means the pushed state is in the maps: connections go through.
    let t = tally(&env.connect(&client, VIP, 3));
    assert_eq!(t.get("web-1"), Some(&3), "{t:?}");
    let text = scrape(&ports);
    assert_eq!(sample(&text, "kmesh_xds_connected"), Some(1.0), "{text}");
    assert!(sample(&text, "kmesh_xds_responses_total").unwrap() >= 1.0);
    assert_eq!(sample(&text, "kmesh_xds_nacks_total"), Some(0.0));
    // Whole or incremental (a small first response after the start's
    // apply goes the incremental way).
    let xds_applies = ["xds", "xds_incremental"]
        .iter()
        .filter_map(|t| sample(&text, &format!("kmesh_applies_total{{trigger=\"{t}\"}}")))
        .sum::<f64>();
    assert!(xds_applies >= 1.0, "{text}");
    // Other paths are 404 on the readiness port.
    assert_eq!(get(ports.readiness, "/healthz/live").status, 404);

    // A refused resource is one NACK, counted as the control plane saw it.
    cp.cp.update(|b| {
        let (n, s) = xds::service("many", &["10.96.0.30"], &[(1, 1); 11]);
        b.set(&n, s);
    });
    let deadline = Instant::now() + Duration::from_secs(10) * time_scale();
    while cp.cp.nacks().is_empty() {
        assert!(Instant::now() < deadline, "no NACK:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The daemon counts it just after sending it: poll briefly.
    let nacks = || sample(&scrape(&ports), "kmesh_xds_nacks_total");
    while nacks() != Some(cp.cp.nacks().len() as f64) {
        assert!(
            Instant::now() < deadline,
            "{:?} {:?}",
            nacks(),
            cp.cp.nacks()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(nacks(), Some(1.0));
    assert_eq!(get(ports.readiness, "/healthz/ready").status, 200);
}

#[test]
fn readiness_without_xds_is_ready_once_attached() {
    let mut env = Env::new();
    let (_client, _d, ports) = web_world(&mut env);
    let r = get_when_up(ports.readiness, "/healthz/ready", Duration::from_secs(10));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn logging_changes_the_level_at_run_time_and_refuses_bad_levels() {
    let mut env = Env::new();
    let (_client, d, ports) = web_world(&mut env);
    let r = get_when_up(ports.admin, "/logging", Duration::from_secs(10));
    assert_eq!((r.status, r.body.trim()), (200, "info"));
    // Request lines are logged at debug: absent at info.
    get(ports.admin, "/config_dump");
    assert!(!d.log().contains("http GET /config_dump"), "{}", d.log());

    let r = request("POST", ports.admin, "/logging?level=debug").unwrap();
    assert_eq!((r.status, r.body.trim()), (200, "debug"), "{}", r.body);
    get(ports.admin, "/config_dump");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.log().contains("http GET /config_dump -> 200") {
        assert!(Instant::now() < deadline, "no debug line:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }

    // A misspelt level is refused by name and changes nothing.
    let r = request("PUT", ports.admin, "/logging?level=kmesh=debgu,info").unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("\"kmesh=debgu\""), "{}", r.body);
    let r = request("POST", ports.admin, "/logging").unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("missing ?level="), "{}", r.body);
    let r = request("POST", ports.admin, "/logging?lvl=debug").unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("\"lvl\""), "{}", r.body);
    let r = request("DELETE", ports.admin, "/logging").unwrap();
    assert_eq!(r.status, 405);
    assert!(r.body.contains("DELETE /logging") && r.body.contains("GET, POST, PUT"));
    let r = request("POST", ports.admin, "/config_dump").unwrap();
    assert_eq!(r.status, 405, "{}", r.body);
    let r = get(ports.admin, "/quitquitquit");
    assert_eq!(r.status, 404);
    assert!(r.body.contains("/quitquitquit") && r.body.contains("/config_dump"));
    assert_eq!(get(ports.admin, "/logging").body.trim(), "debug");

    // The same over the Unix socket, without HTTP.
    let out = ctl(&d, &["log-level"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "debug");
    let out = ctl(&d, &["log-level", "verbose"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"verbose\"") && err.contains("unknown level"),
        "{err}"
    );
    let out = ctl(&d, &["log-level", "kmesh=warn,info"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(get(ports.admin, "/logging").body.trim(), "kmesh=warn,info");
}

/// The dump without what moves on its own (counters).
fn without_counters(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("stats");
    for p in v["authz"]["policies"].as_array_mut().unwrap() {
        for k in ["allow", "deny", "dry_run_deny"] {
            p.as_object_mut().unwrap().remove(k);
        }
    }
    v
}

#[test]
fn config_dump_is_the_ctl_dump() {
    let mut env = Env::new();
    let (client, d, ports) = web_world(&mut env);
    tally(&env.connect(&client, VIP, 2));
    let r = get_when_up(ports.admin, "/config_dump", Duration::from_secs(10));
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "application/json");
    let http: Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(
        http["services"][0]["name"],
        "default/web.default.svc.cluster.local"
    );
    assert_eq!(without_counters(http), without_counters(d.dump()));
}

/// A Prometheus server on 127.0.0.1, stopped (by pid) and its directory
/// removed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Prometheus {
    fn start(tag: &str, target_port: u16) -> Prometheus {
        let bin = "/usr/bin/prometheus";
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} missing: install the Debian package prometheus (scripts/deps.sh)"
        );
        let dir = std::env::temp_dir().join(format!("{tag}prom"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: kmesh\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .unwrap();
        let port = http::free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus");
        Prometheus { child, dir, port }
    }

    /// The single value a PromQL instant query returns, if it returns one.
    fn query(&self, promql: &str) -> Option<f64> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let r = request("GET", self.port, &format!("/api/v1/query?query={q}")).ok()?;
        let v: Value = serde_json::from_str(&r.body).ok()?;
        assert_eq!(v["status"], "success", "{v}");
        let result = v["data"]["result"].as_array()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        harness::wait_or_kill(&mut self.child, Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_scrapes_the_exact_connection_count() {
    let mut env = Env::new();
    let (client, _d, ports) = web_world(&mut env);
    const N: u32 = 7;
    tally(&env.connect(&client, VIP, N));
    let prom = Prometheus::start(&env.tag, ports.metrics);
    let want = [
        ("kmesh_service_redirect_total{job=\"kmesh\"}", f64::from(N)),
        ("up{job=\"kmesh\"}", 1.0),
        ("kmesh_map_entries{job=\"kmesh\",map=\"km_endpoint\"}", 2.0),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    for (q, v) in want {
        loop {
            if prom.query(q) == Some(v) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{q}: got {:?}, want {v}\nprometheus log:\n{}",
                prom.query(q),
                prom.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Later connections show in the next scrapes.
    let more = 3;
    tally(&env.connect(&client, VIP, more));
    let q = "kmesh_service_redirect_total{job=\"kmesh\"}";
    while prom.query(q) != Some(f64::from(N + more)) {
        assert!(Instant::now() < deadline, "{q}: {:?}", prom.query(q));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn authorization_policies_count_per_policy() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let web = env.backends(1).remove(0);
    let policy = |name: &str, action: &str, dry_run: bool| {
        json!({"name": name, "namespace": "shop", "scope": "NAMESPACE", "action": action,
               "dry_run": dry_run,
               "rules": [{"clauses": [{"matches": [{"namespaces": [{"exact": "front"}]}]}]}]})
    };
    let cfg = json!({
        "enroll": {"netns": Env::enroll_list(&[&client, &web])},
        "services": [{"name": "web", "namespace": "shop", "hostname": "web.shop.svc.cluster.local",
                      "addresses": ["10.96.0.10"],
                      "ports": [{"service_port": 80, "target_port": 8080}]}],
        "workloads": [
            {"uid": "Kubernetes//Pod/front/ui", "name": "ui", "namespace": "front",
             "service_account": "ui", "addresses": [client.v4.to_string()]},
            {"uid": "Kubernetes//Pod/shop/web-1", "name": "web-1", "namespace": "shop",
             "service_account": "web", "addresses": [web.v4.to_string()],
             "services": {"shop/web.shop.svc.cluster.local": {}}},
        ],
        "policies": [policy("from-front", "ALLOW", false), policy("audit", "DENY", true)],
    });
    let ports = HttpPorts::new();
    let args = ports.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = env.daemon_args(&cfg, &args).expect("daemon starts");
    const N: u32 = 4;
    let t = tally(&env.connect(&client, VIP, N));
    assert_eq!(t.get("web-1"), Some(&N), "{t:?}");

    let text = scrape(&ports);
    let series = |policy: &str, decision: &str| {
        let s = format!(
            "kmesh_authz_policy_connections_total{{policy=\"shop/{policy}\",decision=\"{decision}\"}}"
        );
        sample(&text, &s).unwrap_or_else(|| panic!("no {s}\n{text}"))
    };
    assert_eq!(series("from-front", "allow"), f64::from(N), "{text}");
    assert_eq!(series("from-front", "deny"), 0.0);
    assert_eq!(series("audit", "dry_run_deny"), f64::from(N), "{text}");
    assert_eq!(series("audit", "deny"), 0.0);
    // The dump's per-policy counters say the same.
    for p in d.dump()["authz"]["policies"].as_array().unwrap() {
        let name = p["key"].as_str().unwrap().trim_start_matches("shop/");
        for k in ["allow", "deny", "dry_run_deny"] {
            assert_eq!(Some(series(name, k)), p[k].as_f64(), "{name} {k}");
        }
    }
}
