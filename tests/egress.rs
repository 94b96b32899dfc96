//! ServiceEntry-style egress end to end: the daemon resolves hostname
//! workloads through a real dnsmasq (127.77.x.y:53) and the VIP reaches
//! whatever the name currently resolves to; resolution NONE leaves
//! connections alone. The "external" servers are test pods.

mod harness;

use std::time::{Duration, Instant};

use harness::{dns::Dnsmasq, dns::DOMAIN, tally, Daemon, Env, Pod};
use serde_json::{json, Value};

const TTL: u32 = 2;

fn host(name: &str) -> String {
    format!("{name}.{DOMAIN}")
}

/// The service named `key` in a dump.
fn service<'a>(d: &'a Value, key: &str) -> Option<&'a Value> {
    d["services"].as_array()?.iter().find(|s| s["name"] == key)
}

/// Backend IPv4 addresses of `key`'s endpoints, sorted.
fn endpoint_ips(d: &Value, key: &str) -> Vec<String> {
    let mut v: Vec<String> = service(d, key)
        .and_then(|s| s["endpoint_addresses"]["0"].as_array())
        .map(|l| {
            l.iter()
                .flat_map(|a| a.as_array().unwrap())
                .map(|ip| ip.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn start(env: &mut Env, dns: &Dnsmasq, config: &Value) -> Daemon {
    let server = dns.addr.to_string();
    env.daemon_args(config, &["--dns-server", &server, "--dns-timeout", "0.5"])
        .expect("daemon starts")
}

/// Polls connections until all `n` land on `name`; returns how long it took.
fn wait_for_backend(env: &Env, d: &Daemon, client: &Pod, vip: &str, name: &str) -> Duration {
    let start = Instant::now();
    loop {
        let conns = env.connect(client, vip, 4);
        if conns.iter().all(|c| c.ok && c.name == name) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never reached {name}: {conns:?}\ndump: {:#}\nlog:\n{}",
            d.dump(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hostname_workload_follows_dns_and_survives_its_outage() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let (a, b, local) = (env.pod(11, &[]), env.pod(12, &[]), env.pod(13, &[]));
    for (p, name) in [(&a, "ext-a"), (&b, "ext-b"), (&local, "local")] {
        env.serve(p, &[format!("{}:8443", p.v4)], name);
    }
    let api = host("api");
    let mut dns = Dnsmasq::start(TTL, &[(&api, &a.v4.to_string())]);
    let cfg = json!({
        "enroll": {"netns": [client.path()]},
        "services": [
            {"name": "api", "hostname": api, "addresses": ["10.96.1.1"],
             "ports": [{"service_port": 443, "target_port": 8443}], "resolution": "DNS"},
            {"name": "gone", "hostname": host("gone"), "addresses": ["10.96.1.2"],
             "ports": [{"service_port": 443, "target_port": 8443}], "resolution": "DNS"},
            {"name": "local", "hostname": "local.default.svc", "addresses": ["10.96.1.3"],
             "ports": [{"service_port": 443, "target_port": 8443}]}
        ],
        "workloads": [{"uid": "local-1", "name": "local-1", "addresses": [local.v4.to_string()],
                       "services": {"default/local.default.svc": {}}}]
    });
    let d = start(&mut env, &dns, &cfg);
    let api_key = format!("default/{api}");
    let gone_key = format!("default/{}", host("gone"));

    // The name resolves; the VIP reaches its address with the port mapped.
    let dump = d.wait_dump(Duration::from_secs(5), |d| {
        endpoint_ips(d, &api_key) == [a.v4.to_string()]
    });
    assert_eq!(dump["dns"][&api], json!([a.v4.to_string()]));
    assert_eq!(
        tally(&env.connect(&client, "10.96.1.1:443", 10))["ext-a"],
        10
    );

    // NXDOMAIN: a clear log line, no endpoints, everything else served.
    let log = d.log();
    assert!(
        log.contains(&format!("DNS {} does not exist (NXDOMAIN)", host("gone"))),
        "{log}"
    );
    assert!(endpoint_ips(&dump, &gone_key).is_empty(), "{dump:#}");
    assert_eq!(dump["dns"][host("gone")], json!([]));
    let refused = env.connect(&client, "10.96.1.2:443", 1);
    assert!(!refused[0].ok, "{refused:?}");
    assert_eq!(tally(&env.connect(&client, "10.96.1.3:443", 5))["local"], 5);

    // The record changes: new connections follow within TTL + 1 s.
    dns.set_records(&[(&api, &b.v4.to_string())]);
    let took = wait_for_backend(&env, &d, &client, "10.96.1.1:443", "ext-b");
    assert!(
        took <= Duration::from_secs(TTL as u64 + 1),
        "took {took:?} for a TTL of {TTL} s"
    );
    assert_eq!(endpoint_ips(&d.dump(), &api_key), [b.v4.to_string()]);

    // The server goes away: the last good answer stays, through several
    // failed refreshes.
    dns.stop();
    let failed = format!("DNS lookup of {api} via {} failed", dns.addr);
    let start = Instant::now();
    while d.log().matches(&failed).count() < 2 {
        assert!(start.elapsed() < Duration::from_secs(15), "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d.log().contains("keeping 1 last known"), "{}", d.log());
    let dump = d.dump();
    assert_eq!(endpoint_ips(&dump, &api_key), [b.v4.to_string()]);
    let t = tally(&env.connect(&client, "10.96.1.1:443", 10));
    assert_eq!(t["ext-b"], 10);

    // It comes back with two addresses: both serve.
    dns.set_records(&[(&api, &a.v4.to_string()), (&api, &b.v4.to_string())]);
    dns.restart();
    let mut both = vec![a.v4.to_string(), b.v4.to_string()];
    both.sort();
    d.wait_dump(Duration::from_secs(20), |d| {
        endpoint_ips(d, &api_key) == both
    });
    let t = tally(&env.connect(&client, "10.96.1.1:443", 40));
    assert!(t["ext-a"] >= 5 && t["ext-b"] >= 5, "{t:?}");
}

/// WorkloadEntry-style workloads with their own port lists: a static one
/// on the service's target port, a hostname one on its own; dropping the
/// latter from the config removes its endpoint and port entries at once.
#[test]
fn workloads_own_ports_static_and_by_hostname() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let (a, s) = (env.pod(11, &[]), env.pod(12, &[]));
    env.serve(&a, &[format!("{}:9000", a.v4)], "by-name");
    env.serve(&s, &[format!("{}:7000", s.v4)], "static");
    let db = host("db");
    let dns = Dnsmasq::start(TTL, &[(&db, &a.v4.to_string())]);
    let svc = "default/db.svc";
    let cfg = |with_dns: bool| {
        let mut w = vec![json!({"uid": "static-1", "name": "static-1",
            "addresses": [s.v4.to_string()],
            "services": {svc: {"ports": [{"service_port": 80, "target_port": 7000}]}}})];
        if with_dns {
            w.push(
                json!({"uid": "db-by-name", "name": "db-by-name", "hostname": db,
                "services": {svc: {"ports": [{"service_port": 80, "target_port": 9000}]}}}),
            );
        }
        json!({
            "enroll": {"netns": [client.path()]},
            "services": [{"name": "db", "hostname": "db.svc", "addresses": ["10.96.2.1"],
                          "ports": [{"service_port": 80, "target_port": 8080}]}],
            "workloads": w,
        })
    };
    let d = start(&mut env, &dns, &cfg(true));
    let dump = d.wait_dump(Duration::from_secs(5), |d| endpoint_ips(d, svc).len() == 2);
    let own = &service(&dump, svc).unwrap()["own_ports"];
    assert_eq!(
        *own,
        json!(["db-by-name: 80 -> 9000", "static-1: 80 -> 7000"]),
        "{dump:#}"
    );
    let t = tally(&env.connect(&client, "10.96.2.1:80", 40));
    assert!(t["by-name"] >= 5 && t["static"] >= 5, "{t:?}");

    d.write_config(&cfg(false));
    let dump = d.wait_dump(Duration::from_secs(5), |d| endpoint_ips(d, svc).len() == 1);
    assert_eq!(dump["maps"]["km_port"]["entries"], 1, "{dump:#}");
    assert_eq!(dump["dns"], json!({}));
    assert_eq!(
        tally(&env.connect(&client, "10.96.2.1:80", 10))["static"],
        10
    );
}

/// Resolution NONE: the service is listed as passthrough, has no VIP
/// entry, and connections to its address reach that address untouched.
#[test]
fn resolution_none_passes_through() {
    let mut env = Env::new();
    let client = env.pod(2, &[]);
    let (ext, other) = (env.pod(11, &[]), env.pod(12, &[]));
    env.serve(&ext, &[format!("{}:443", ext.v4)], "ext");
    env.serve(&other, &[format!("{}:443", other.v4)], "other");
    let cfg = json!({
        "enroll": {"netns": [client.path()]},
        "services": [{"name": "ext", "hostname": "ext.example.com",
                      "addresses": [ext.v4.to_string()],
                      "ports": [{"service_port": 443, "target_port": 8443}],
                      "resolution": "NONE"}],
        "workloads": [{"uid": "other", "name": "other", "addresses": [other.v4.to_string()],
                       "services": {"default/ext.example.com": {}}}]
    });
    let d = env.daemon(&cfg);
    let dump = d.dump();
    assert_eq!(
        dump["passthrough"],
        json!([{"name": "default/ext.example.com", "addresses": [ext.v4.to_string()]}])
    );
    assert_eq!(dump["services"], json!([]));
    assert_eq!(dump["maps"]["km_vip"]["entries"], 0);
    let before = d.stat("service_redirect");
    let addr = format!("{}:443", ext.v4);
    assert_eq!(tally(&env.connect(&client, &addr, 10))["ext"], 10);
    assert_eq!(d.stat("service_redirect"), before);
}
