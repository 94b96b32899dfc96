//! System tests for L4 authorization (issue 19): Istio AuthorizationPolicy
//! enforced in the kernel at destination pods enrolled on this host. Every
//! case is a real connection from a pod netns, made twice: from inside the
//! daemon's cgroup (an enrolled client must fail at connect() with EPERM,
//! sending nothing) and from outside it (the destination's sk_lookup must
//! refuse it: ECONNREFUSED). Either way in under 100 ms, and the server
//! never accepts it.
//!
//! The mesh: clients ui and batch (namespace front), ops (namespace ops,
//! trust domain example.org, its netns not enrolled) and a stranger the
//! mesh does not know; servers web and db (namespace shop; web lists the
//! WORKLOAD_SELECTOR policy shop/pick), blog (namespace blog, on [::]) and legacy
//! (namespace shop, its netns not enrolled, so never enforced).

mod harness;

use std::{
    collections::BTreeSet,
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use harness::{xds::*, Daemon, Env, Held, Pod};
use kmesh::xds::AUTHORIZATION_TYPE;
use serde_json::{json, Value};

/// Name, pod number (10.244.0.<n>, fd00:244::<n>) and namespace ("": the
/// mesh does not know it). Service account: the name (ops: admin).
const PODS: [(&str, u8, &str); 8] = [
    ("ui", 2, "front"),
    ("batch", 3, "front"),
    ("stranger", 4, ""),
    ("ops", 5, "ops"),
    ("web", 11, "shop"),
    ("db", 12, "shop"),
    ("blog", 13, "blog"),
    ("legacy", 14, "shop"),
];
const WEB: &str = "10.244.0.11:8080";
const UI_PRINCIPAL: &str = "cluster.local/ns/front/sa/ui";

/// Whether its netns is enrolled (an enrolled client's denials fail at
/// connect; legacy is never enforced).
/// A refusal comes at once: 100 ms, times the harness's scale for the
/// emulated kernels of the matrix (no KVM there).
fn fail_ms() -> f64 {
    100.0 * f64::from(harness::time_scale())
}

fn enrolled(name: &str) -> bool {
    name != "ops" && name != "legacy"
}

/// A destination by its short name in the case tables: the server with an
/// optional 6 (its IPv6 address) or m (its IPv4 address v4-mapped, from an
/// IPv6 socket), and :9090 (else :8080). Returns (address, server).
fn dest(name: &str) -> (String, &'static str) {
    let (host, port) = name.split_once(':').unwrap_or((name, "8080"));
    let (server, form) = match host.strip_suffix(['6', 'm']) {
        Some(s) => (s, &host[s.len()..]),
        None => (host, ""),
    };
    let &(server, n, _) = PODS.iter().find(|s| s.0 == server).expect(name);
    let addr = match form {
        "6" => format!("[fd00:244::{n}]:{port}"),
        "m" => format!("[::ffff:10.244.0.{n}]:{port}"),
        _ => format!("10.244.0.{n}:{port}"),
    };
    (addr, server)
}

/// A policy "namespace/name" with one rule of one clause of match `m`;
/// `m` null: no rules at all.
fn pol(key: &str, scope: &str, action: &str, m: Value) -> Value {
    let (ns, name) = key.split_once('/').unwrap();
    let rules = match m {
        Value::Null => json!([]),
        m => json!([{"clauses": [{"matches": [m]}]}]),
    };
    json!({"name": name, "namespace": ns, "scope": scope, "action": action, "rules": rules})
}

fn allow(key: &str, m: Value) -> Value {
    pol(key, "NAMESPACE", "ALLOW", m)
}

fn deny(key: &str, m: Value) -> Value {
    pol(key, "NAMESPACE", "DENY", m)
}

fn dry(mut p: Value) -> Value {
    p["dry_run"] = json!(true);
    p
}

/// A match of one field: {field: v}.
fn one(field: &str, v: Value) -> Value {
    Value::Object([(field.to_string(), v)].into_iter().collect())
}

fn front() -> Value {
    one("namespaces", json!([{"exact": "front"}]))
}

fn principal_ui() -> Value {
    one("principals", json!([{"exact": UI_PRINCIPAL}]))
}

fn sa_batch() -> Value {
    json!([{"namespace": "front", "service_account": "batch"}])
}

/// A match of both addresses of pod `name`.
fn src(name: &str) -> Value {
    let n = PODS.iter().find(|p| p.0 == name).expect(name).1;
    let (v4, v6) = (format!("10.244.0.{n}/32"), format!("fd00:244::{n}/128"));
    one("source_ips", json!([v4, v6]))
}

/// Every pod the mesh knows, as config-file workloads; web lists the
/// WORKLOAD_SELECTOR policy shop/pick.
fn workloads() -> Vec<Value> {
    let known = PODS.iter().filter(|p| !p.2.is_empty());
    known
        .map(|&(name, n, ns)| {
            let sa = if name == "ops" { "admin" } else { name };
            let td = if name == "ops" { "example.org" } else { "" };
            let picked: &[&str] = if name == "web" { &["shop/pick"] } else { &[] };
            json!({"uid": format!("Kubernetes//Pod/{ns}/{name}"), "name": name, "namespace": ns,
                   "addresses": [format!("10.244.0.{n}"), format!("fd00:244::{n}")],
                   "service_account": sa, "trust_domain": td, "authorization_policies": picked})
        })
        .collect()
}

struct Mesh {
    d: Daemon,
    pods: Vec<Pod>,
    /// Each server's file of accepted peers.
    accept_logs: Vec<(&'static str, PathBuf)>,
    env: Env,
}

/// Every enrolled pod of `pods` (in PODS' order), service web (VIP
/// 10.96.0.10, :80 → 8080, :90 → 9090) backed by web, and `policies`.
fn config(pods: &[Pod], policies: &[Value]) -> Value {
    let enroll: Vec<&Pod> = PODS
        .iter()
        .zip(pods)
        .filter(|(p, _)| enrolled(p.0))
        .map(|x| x.1)
        .collect();
    let mut workloads = workloads();
    workloads[3]["services"] = json!({"shop/web.shop.svc.cluster.local": {}});
    json!({
        "enroll": {"netns": Env::enroll_list(&enroll)},
        "services": [{"name": "web", "namespace": "shop", "hostname": "web.shop.svc.cluster.local",
                      "addresses": ["10.96.0.10"],
                      "ports": [{"service_port": 80, "target_port": 8080},
                                {"service_port": 90, "target_port": 9090}]}],
        "workloads": workloads,
        "policies": policies,
    })
}

impl Mesh {
    /// The pods, servers (on :8080 and :9090, v4 and v6) and daemon;
    /// workloads from the config file, or (with `cp`) from the control
    /// plane; no policies.
    fn new(cp: Option<&Cp>) -> Mesh {
        let mut env = Env::new();
        let pods: Vec<Pod> = PODS.iter().map(|p| env.pod(p.1, &[])).collect();
        let mut accept_logs = vec![];
        for (&(name, ..), pod) in PODS.iter().zip(&pods).filter(|(p, _)| p.1 > 10) {
            // blog listens on the dual-stack wildcard: its IPv4 connections
            // are AF_INET6 sockets with v4-mapped addresses.
            let ips = match name {
                "blog" => vec!["[::]".to_string()],
                _ => vec![pod.v4.to_string(), format!("[{}]", pod.v6)],
            };
            let listen = ips
                .iter()
                .flat_map(|a| [8080, 9090].map(|p| format!("{a}:{p}")));
            accept_logs.push((
                name,
                env.serve_logged(pod, &listen.collect::<Vec<_>>(), name),
            ));
        }
        let mut cfg = config(&pods, &[]);
        let mut args = vec![];
        if let Some(cp) = cp {
            cfg.as_object_mut().unwrap().retain(|k, _| k == "enroll");
            let resources: Vec<_> = workloads().iter().map(workload_json).collect();
            cp.cp
                .update(|b| resources.into_iter().for_each(|(n, w)| b.set(&n, w)));
            args = vec!["--xds-address".to_string(), cp.url()];
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let d = env.daemon_args(&cfg, &args).expect("daemon starts");
        let all = |v: &Value| v["workloads"].as_array().map(Vec::len) == Some(7);
        d.wait_dump(Duration::from_secs(10), all);
        Mesh {
            d,
            pods,
            accept_logs,
            env,
        }
    }

    fn pod(&self, name: &str) -> &Pod {
        &self.pods[PODS.iter().position(|p| p.0 == name).expect(name)]
    }

    /// Writes the config with `policies` and waits until the daemon holds
    /// exactly them.
    fn apply(&self, policies: &[Value]) -> Value {
        self.d.write_config(&config(&self.pods, policies));
        let keys: Vec<String> = policies.iter().map(key).collect();
        self.wait_policies(&keys)
    }

    /// The dump once `dump.authz.policies` lists exactly `keys`.
    fn wait_policies(&self, keys: &[String]) -> Value {
        let want: BTreeSet<String> = keys.iter().map(|k| json!(k).to_string()).collect();
        let now = |v: &Value| -> BTreeSet<String> {
            policies(v).iter().map(|p| p["key"].to_string()).collect()
        };
        self.d
            .wait_dump(Duration::from_secs(10), |v| now(v) == want)
    }

    fn stat(&self, name: &str) -> u64 {
        let v = self.d.dump()["stats"][name].as_u64();
        v.unwrap_or_else(|| panic!("no stat {name}"))
    }

    fn accepted(&self, server: &str) -> usize {
        let s = self.accept_logs.iter().find(|s| s.0 == server).unwrap();
        fs::read_to_string(&s.1).unwrap().lines().count()
    }

    /// Runs each case of `rows`, "client>dest …" allowed, then "|", then
    /// denied ones (e.g. "ui>web batch>db6 | stranger>web:9090"), from
    /// inside and from outside the cgroup. Checks the server's name, the
    /// errno and time to failure, that the server never accepted a denied
    /// connection, and the destination and connect-time deny counters.
    fn check(&self, label: &str, rows: &str) {
        let stat = |k: &str| self.stat(k);
        let (deny0, connect0) = (stat("authz_deny"), stat("authz_deny_connect"));
        let (mut deny, mut at_connect) = (0, 0);
        let (allowed, denied) = rows.split_once('|').unwrap_or((rows, ""));
        let cases = allowed
            .split_whitespace()
            .map(|r| (r, true))
            .chain(denied.split_whitespace().map(|r| (r, false)));
        for (row, allow) in cases {
            let (c, to) = row.split_once('>').expect(row);
            let (addr, server) = dest(to);
            for in_cgroup in [true, false] {
                let side = ["outside the cgroup", "in the cgroup"][usize::from(in_cgroup)];
                let case = format!("[{label}] {row} = {c} -> {addr} ({side})");
                let before = self.accepted(server);
                let conn = &self.env.connect_opts(self.pod(c), &addr, 1, in_cgroup)[0];
                let seen = self.accepted(server) - before;
                if allow {
                    let ok = conn.ok && conn.name == server && seen == 1;
                    assert!(ok, "{case}: want {server}, got {conn:?}, accepted {seen}");
                    continue;
                }
                let eperm = in_cgroup && enrolled(c);
                let errno = if eperm { 1 } else { 111 };
                assert_eq!(conn.errno, Some(errno), "{case}: {conn:?}");
                assert!(conn.ms < fail_ms(), "{case}: refused after {} ms", conn.ms);
                assert_eq!(seen, 0, "{case}: the server accepted a denied connection");
                *(if eperm { &mut at_connect } else { &mut deny }) += 1;
            }
        }
        let d = (
            stat("authz_deny") - deny0,
            stat("authz_deny_connect") - connect0,
        );
        assert_eq!(d, (deny, at_connect), "[{label}] authz_deny, _connect");
    }

    /// Applies `policies` from the config file, then checks `rows`; the
    /// policies' keys name the case.
    fn case(&self, policies: &[Value], rows: &str) {
        self.apply(policies);
        let keys: Vec<String> = policies.iter().map(key).collect();
        self.check(&keys.join(" + "), rows);
    }
}

fn key(p: &Value) -> String {
    p["namespace"].as_str().unwrap().to_string() + "/" + p["name"].as_str().unwrap()
}

fn policies(dump: &Value) -> Vec<Value> {
    serde_json::from_value(dump["authz"]["policies"].clone()).unwrap_or_default()
}

fn policy_entry(dump: &Value, key: &str) -> Value {
    let found = policies(dump).into_iter().find(|p| p["key"] == key);
    found.unwrap_or_else(|| panic!("{key}: {dump:#}"))
}

fn wait_cut(held: &mut Held, what: &str) {
    let closed = held.wait_closed(Duration::from_secs(1));
    assert!(closed, "{what}: open after 1 s");
}

#[test]
fn source_cidr_destination_port_ipv6_and_v4_mapped() {
    let m = Mesh::new(None);
    let cidr = one("source_ips", json!(["10.244.0.2/31", "fd00:244::2/127"]));
    m.case(
        &[allow("shop/allow-from-2-and-3", cidr)],
        "ui>web batch>web6 batch>db stranger>blog | stranger>web stranger>web6 ops>db",
    );
    let p = deny("shop/deny-9090", one("destination_ports", json!([9090])));
    let rows = "ui>web stranger>web6 | ui>web:9090 ui>web6:9090 ops>web:9090 ui>dbm:9090";
    m.case(&[p], rows);
    // Through the service the port that counts is the target port.
    let c = &m.env.connect(m.pod("ui"), "10.96.0.10:90", 1)[0];
    assert_eq!(c.errno, Some(1), "VIP :90 -> web:9090: {c:?}");
    assert!(c.ms < fail_ms(), "VIP :90 refused after {} ms", c.ms);
    let c = &m.env.connect(m.pod("ui"), "10.96.0.10:80", 1)[0];
    assert!(c.ok && c.name == "web", "VIP :80 -> web:8080: {c:?}");
    m.case(&[], "ui>web:9090 ops>web:9090 stranger>web");
    // IPv6, dual stack and v4-mapped.
    let v6 = one("source_ips", json!(["fd00:244::2/128"]));
    let p = deny("shop/deny-ui-v6", v6);
    m.case(&[p], "ui>web ui>webm batch>web6 | ui>web6 ui>db6");
    let mapped = one("source_ips", json!(["::ffff:10.244.0.2/128"]));
    let p = deny("shop/deny-ui-v4-mapped", mapped);
    m.case(&[p], "ui>web6 batch>webm | ui>web ui>webm");
    let mut v6 = front();
    v6["destination_ips"] = json!(["fd00:244::/64"]);
    let p = allow("shop/allow-front-to-v6", v6);
    m.case(&[p], "ui>web6 batch>db6 | ui>web ui>webm stranger>web6");
}

#[test]
fn namespace_principal_and_service_account() {
    let m = Mesh::new(None);
    let p = allow("shop/allow-front", front());
    m.case(&[p], "ui>web batch>db | stranger>web ops>web");
    let p = deny("shop/deny-front", front());
    m.case(&[p], "stranger>web ops>web | ui>web batch>web6");
    let p = allow("shop/allow-ui", principal_ui());
    m.case(&[p], "ui>web ui>web6 | batch>web stranger>web ops>web");
    let p = allow("shop/allow-sa-batch", one("service_accounts", sa_batch()));
    m.case(&[p], "batch>web batch>dbm | ui>web stranger>web ops>web");
    let td = one("principals", json!([{"prefix": "example.org/"}]));
    let p = allow("shop/allow-example-org", td);
    m.case(&[p], "ops>web | ui>web stranger>web");
    // Servers are clients too; a pod may connect to itself.
    let p = allow(
        "shop/allow-shop",
        one("namespaces", json!([{"exact": "shop"}])),
    );
    m.case(&[p], "web>db db>web6 web>web | ui>db stranger>web");
    // The unknown source has no principal at all.
    let any = one("principals", json!([{"presence": {}}]));
    let p = allow("shop/allow-any-principal", any);
    m.case(&[p], "ui>web ops>db | stranger>web stranger>db6");
}

#[test]
fn every_not_form() {
    let m = Mesh::new(None);
    let not = |field: &str, v: Value, rows: &str| {
        let name = format!("shop/deny-{}", field.replace('_', "-"));
        m.case(&[deny(&name, one(field, v))], rows);
    };
    let rows = "ui>web batch>web | ops>web stranger>web";
    not("not_namespaces", json!([{"exact": "front"}]), rows);
    let rows = "ui>web | batch>web stranger>web";
    not("not_principals", json!([{"exact": UI_PRINCIPAL}]), rows);
    let rows = "batch>web | ui>web ops>web stranger>web";
    not("not_service_accounts", sa_batch(), rows);
    // batch's IPv6 address is not in the IPv4 range.
    let rows = "batch>web batch>webm | batch>web6 ui>web";
    not("not_source_ips", json!(["10.244.0.3/32"]), rows);
    let rows = "ui>web ui>webm | ui>web6 ui>db";
    not("not_destination_ips", json!(["10.244.0.11/32"]), rows);
    let rows = "ui>web | ui>web:9090 stranger>web6:9090";
    not("not_destination_ports", json!([8080]), rows);
}

#[test]
fn deny_wins_empty_allow_denies_all_and_dry_run_is_only_counted() {
    let m = Mesh::new(None);
    let (a, d) = (front(), principal_ui());
    let both = [allow("shop/allow-front", a), deny("shop/deny-ui", d)];
    m.case(&both, "batch>web | ui>web stranger>web");
    // legacy is in namespace shop, but its netns is not enrolled.
    let nobody = allow("shop/allow-nobody", Value::Null);
    m.case(&[nobody], "ui>blog ui>legacy | ui>web batch>db ops>web6");
    let mut everyone = allow("shop/allow-all", Value::Null);
    everyone["rules"] = json!([{"clauses": []}]);
    m.case(&[everyone], "stranger>web ops>db");

    // Dry run: allowed, and counted once per connection at the
    // destination, whichever side of the cgroup it came from.
    let dry0 = m.stat("authz_dry_run_deny");
    let key = "shop/dry-deny-front";
    m.case(&[dry(deny(key, front()))], "ui>web batch>db stranger>web");
    let dump = m.d.dump();
    let p = policy_entry(&dump, key);
    let counts = [&p["dry_run"], &p["dry_run_deny"], &p["deny"]];
    assert_eq!(counts, [&json!(true), &json!(4), &json!(0)], "{p:#}");
    let dry1 = dump["stats"]["authz_dry_run_deny"].as_u64().unwrap();
    assert_eq!(dry1 - dry0, 4, "{dump:#}");
    let nobody = dry(allow("shop/dry-allow-nobody", Value::Null));
    m.case(&[nobody], "ui>web stranger>web");
    assert_eq!(m.stat("authz_dry_run_deny") - dry1, 4, "dry-run ALLOW");
}

#[test]
fn global_namespace_and_selector_scopes() {
    let m = Mesh::new(None);
    let s = src("stranger");
    let p = pol("istio-system/deny-stranger", "GLOBAL", "DENY", s);
    // legacy's netns is not enrolled: never enforced.
    let rows = "stranger>legacy ui>blog | stranger>web stranger>db6 stranger>blog";
    m.case(&[p], rows);
    let p = deny("blog/deny-ui", src("ui"));
    m.case(
        &[p],
        "ui>web ui>db batch>blog batch>blog6 | ui>blog ui>blog6 ui>blogm",
    );
    let p = pol("shop/pick", "WORKLOAD_SELECTOR", "DENY", src("ui"));
    m.case(&[p], "ui>db batch>web | ui>web ui>web6");
    let p = pol("shop/orphan", "WORKLOAD_SELECTOR", "ALLOW", Value::Null);
    m.case(&[p], "ui>web ui>db stranger>blog");

    // Enrolling legacy's netns by a reload starts enforcing there; leaving
    // it out again stops.
    let p = [pol("istio-system/deny-ui", "GLOBAL", "DENY", src("ui"))];
    for (n, rows) in [
        (7, "batch>legacy | ui>legacy ui>web"),
        (6, "ui>legacy | ui>web"),
    ] {
        let mut cfg = config(&m.pods, &p);
        if n == 7 {
            let legacy = json!(m.pod("legacy").path());
            cfg["enroll"]["netns"].as_array_mut().unwrap().push(legacy);
        }
        m.d.write_config(&cfg);
        let enrolled = |v: &Value| v["enrolled_netns"].as_array().map(Vec::len) == Some(n);
        m.d.wait_dump(Duration::from_secs(10), enrolled);
        m.check(&format!("{n} netns enrolled"), rows);
    }
}

#[test]
fn dump_counters_and_denial_log() {
    let m = Mesh::new(None);
    let audit = one("principals", json!([{"suffix": "/sa/batch"}]));
    let dump = m.apply(&[
        pol("shop/pick", "WORKLOAD_SELECTOR", "ALLOW", front()),
        deny("shop/no-9090", one("destination_ports", json!([9090]))),
        dry(pol("istio-system/audit-batch", "GLOBAL", "DENY", audit)),
    ]);
    // Each applies to the workloads it is enforced on: legacy and ops
    // (netns not enrolled) never.
    let audited: Vec<&str> = "blog/blog front/batch front/ui shop/db shop/web"
        .split(' ')
        .collect();
    let expect = [
        ("shop/pick", "ALLOW WORKLOAD_SELECTOR false", &audited[4..]),
        ("shop/no-9090", "DENY NAMESPACE false", &audited[3..]),
        ("istio-system/audit-batch", "DENY GLOBAL true", &audited[..]),
    ];
    for (k, fields, applies) in expect {
        let p = policy_entry(&dump, k);
        let got =
            [&p["action"], &p["scope"], &p["dry_run"]].map(|v| v.to_string().replace('"', ""));
        assert_eq!(got.join(" "), fields, "{p:#}");
        let want = applies.iter().map(|w| format!("Kubernetes//Pod/{w}"));
        assert_eq!(p["applies_to"], json!(want.collect::<Vec<_>>()), "{p:#}");
    }

    let allow0 = m.stat("authz_allow");
    let run = |c: &str, to: &str, n: u32, in_cgroup: bool, errno: Option<i64>| {
        let conns = m.env.connect_opts(m.pod(c), &dest(to).0, n, in_cgroup);
        assert!(conns.iter().all(|c| c.errno == errno), "{to}: {conns:?}");
    };
    run("ui", "web", 3, true, None);
    run("batch", "web", 2, false, None);
    run("stranger", "web", 1, false, Some(111));
    run("ui", "web:9090", 2, false, Some(111));
    run("ui", "web:9090", 1, true, Some(1));
    let dump = m.d.dump();
    let count = |k: &str, f: &str| policy_entry(&dump, k)[f].as_u64();
    // Each connection counts once, where it was decided: a policy's deny
    // counts its EPERMs at connect (1) and refusals at the destination (2).
    let counts = "shop/pick allow 5, shop/no-9090 deny 3, \
                  istio-system/audit-batch dry_run_deny 2, istio-system/audit-batch deny 0";
    for c in counts.split(", ") {
        let [k, f, want] = c.split(' ').collect::<Vec<_>>()[..] else {
            panic!("{c}")
        };
        assert_eq!(count(k, f), want.parse().ok(), "{k} {f}: {dump:#}");
    }
    let stat = |k: &str| dump["stats"][k].as_u64().unwrap_or(u64::MAX);
    assert!(stat("authz_allow") - allow0 >= 5, "{dump:#}");
    let denials = ["authz_deny", "authz_deny_connect", "authz_dry_run_deny"].map(stat);
    assert_eq!(denials, [3, 1, 2], "deny, at connect, dry-run: {dump:#}");

    // One line per denial names source, destination and policy.
    let log = m.d.log();
    let line = |src: &str, more: &str| {
        let all = [src, "10.244.0.11", more, "denied"];
        log.lines().any(|l| all.iter().all(|w| l.contains(w)))
    };
    assert!(line("10.244.0.2", "shop/no-9090"), "ui -> web:9090:\n{log}");
    assert!(line("10.244.0.4", ""), "stranger -> web:\n{log}");
    // Rate-limited: a burst of denials is not a line each.
    run("ui", "web:9090", 200, false, Some(111));
    let log = m.d.log();
    let ui_lines = |l: &&str| l.contains("denied") && l.contains("10.244.0.2");
    assert!(
        log.lines().filter(ui_lines).count() < 100,
        "a line per denial:\n{log}"
    );
}

/// Holds a connection from `c` to `to` and checks that it echoes.
fn held(m: &mut Mesh, c: &str, to: &str) -> Held {
    let pod = m.pod(c).clone();
    let mut h = m.env.hold(&pod, &dest(to).0);
    assert!(h.conn.ok, "{c} -> {to}: {:?}", h.conn);
    assert_eq!(h.echo("hello").as_deref(), Ok("hello"), "{c} -> {to}");
    h
}

#[test]
fn live_connections_are_cut_when_a_policy_starts_denying_them() {
    let mut m = Mesh::new(None);
    let (mut ui4, mut ui6) = (held(&mut m, "ui", "web"), held(&mut m, "ui", "web6"));
    let (mut batch, mut ops) = (held(&mut m, "batch", "db"), held(&mut m, "ops", "web"));
    let (mut blog, mut legacy) = (held(&mut m, "ui", "blog"), held(&mut m, "ui", "legacy"));
    let still = |h: &mut Held, what: &str| assert_eq!(h.echo("x").as_deref(), Ok("x"), "{what}");
    // A dry-run policy never cuts.
    m.apply(&[dry(pol(
        "istio-system/dry-ui",
        "GLOBAL",
        "DENY",
        principal_ui(),
    ))]);
    std::thread::sleep(Duration::from_millis(1500));
    still(&mut ui4, "ui -> web under a dry-run DENY");
    let cut0 = m.stat("authz_cut");
    m.apply(&[pol("istio-system/cut-ui", "GLOBAL", "DENY", principal_ui())]);
    wait_cut(&mut ui4, "ui -> web (IPv4)");
    wait_cut(&mut ui6, "ui -> web (IPv6)");
    wait_cut(&mut blog, "ui -> blog");
    still(&mut batch, "batch -> db");
    still(&mut ops, "ops -> web");
    // legacy's netns is not enrolled: not enforced, so not cut either.
    still(&mut legacy, "ui -> legacy");
    assert!(m.stat("authz_cut") - cut0 >= 3, "authz_cut");
    m.check("after the cut", "batch>web ui>legacy | ui>web ui>blog");

    // A reload replacing the policy cuts what the new one denies.
    let mut batch_web = held(&mut m, "batch", "web");
    m.apply(&[deny("shop/cut-front", front())]);
    wait_cut(&mut batch_web, "batch -> web");
    wait_cut(&mut batch, "batch -> db");
    still(&mut ops, "ops -> web");
    m.case(&[], "ui>web ui>web6 batch>db");
}

#[test]
fn bad_policies_in_the_config_file_are_refused_by_name_and_the_rest_applies() {
    let m = Mesh::new(None);
    let bad = [
        deny("shop/bad-cidr", one("source_ips", json!(["10.0.0.0/40"]))),
        deny("shop/bad-port", one("destination_ports", json!([0]))),
        pol("shop/bad-action", "NAMESPACE", "AUDIT", src("ui")),
        pol("shop/bad-scope", "CLUSTER", "DENY", src("ui")),
    ];
    let fields = ["source_ips", "destination_ports", "action", "scope"];
    for (i, (field, p)) in fields.into_iter().zip(bad).enumerate() {
        // The good policy changes every time: proof that the reload applied.
        let good = deny(&format!("shop/good-{i}"), src("batch"));
        m.d.write_config(&config(&m.pods, &[good.clone(), p]));
        let dump = m.wait_policies(&[key(&good)]);
        let said = format!("{}\n{}", m.d.log(), dump["rejected"]);
        let named = |l: &str| l.contains("policies[1]") && l.contains(field);
        assert!(said.lines().any(named), "{field} not named:\n{said}");
        let workloads = dump["workloads"].as_array().map(Vec::len);
        assert_eq!(workloads, Some(7), "{field}: {dump:#}");
        m.check(&format!("with a bad {field}"), "ui>web ops>db | batch>web");
    }
    // A good DENY edited into a bad one keeps its last good version (as a
    // NACKed xDS update does) rather than lifting the denial.
    let keep = deny("shop/keep", src("batch"));
    m.d.write_config(&config(&m.pods, std::slice::from_ref(&keep)));
    m.wait_policies(&[key(&keep)]);
    m.check("shop/keep", "ui>web | batch>web");
    let broken = deny("shop/keep", one("source_ips", json!(["10.0.0.0/40"])));
    let marker = deny("shop/marker", src("stranger"));
    m.d.write_config(&config(&m.pods, &[broken, marker.clone()]));
    m.wait_policies(&[key(&keep), key(&marker)]);
    m.check("shop/keep edited into a bad one", "ui>web | batch>web");
}

#[test]
fn policies_pushed_over_xds() {
    let cp = Cp::start(None);
    let mut m = Mesh::new(Some(&cp));
    let push = |ps: &[Value]| {
        cp.cp.update(|b| {
            for p in ps {
                let (n, a) = authorization_json(p);
                b.set(&n, a);
            }
        })
    };
    let front = allow("shop/allow-front", front());
    push(std::slice::from_ref(&front));
    m.wait_policies(&[key(&front)]);
    let rows = "ui>web batch>db6 | stranger>web ops>web";
    m.check("xDS shop/allow-front", rows);

    let mut h = held(&mut m, "batch", "web");
    let no_batch = deny("shop/deny-sa-batch", one("service_accounts", sa_batch()));
    push(std::slice::from_ref(&no_batch));
    m.wait_policies(&[key(&front), key(&no_batch)]);
    wait_cut(&mut h, "batch -> web after the push");
    m.check("xDS shop/deny-sa-batch", "ui>web | batch>web");

    // Invalid policies are NACKed by name; the valid one in the same push
    // applies.
    let bad = [
        deny("shop/bad-cidr", one("source_ips", json!(["10.0.0.0/40"]))),
        deny("shop/bad-port", one("destination_ports", json!([70000]))),
        deny("shop/zero-port", one("not_destination_ports", json!([0]))),
        pol("shop/bad-action", "NAMESPACE", "AUDIT", src("ui")),
        pol("shop/bad-scope", "CLUSTER", "DENY", src("ui")),
    ];
    let good = deny("blog/deny-ui", src("ui"));
    let mut all = bad.to_vec();
    all.push(good.clone());
    push(&all);
    m.wait_policies(&[key(&front), key(&no_batch), key(&good)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let named = |p: &Value| cp.cp.nacks().join("\n").contains(&key(p));
    while !bad.iter().all(named) {
        let nacks = cp.cp.nacks();
        assert!(
            Instant::now() < deadline,
            "not all NACKed by name: {nacks:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!named(&good), "{:?}", cp.cp.nacks());
    m.check("xDS push with bad policies", "ui>web | ui>blog batch>web");

    // The same policy updated in place: it now denies ui instead of batch.
    let sa_ui = json!([{"namespace": "front", "service_account": "ui"}]);
    push(&[deny("shop/deny-sa-batch", one("service_accounts", sa_ui))]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !m.env.connect_opts(m.pod("batch"), WEB, 1, false)[0].ok {
        assert!(Instant::now() < deadline, "the update never applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    m.check("xDS shop/deny-sa-batch updated", "batch>web | ui>web");

    cp.cp.update(|b| {
        for p in all.iter().chain([&front, &no_batch]) {
            b.remove(AUTHORIZATION_TYPE, &key(p));
        }
    });
    m.wait_policies(&[]);
    m.check("xDS removal", "stranger>web batch>web ui>blog");
}
