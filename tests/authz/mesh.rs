//! The authorization tests' mesh: its pods and namespaces, the policy
//! builders, and `Mesh`, which runs the daemon over them and checks rows of
//! connections ("ui>web ops>db | stranger>web": the left ones connect, the
//! right ones are refused at connect() and by the destination's sk_lookup).

use std::{collections::BTreeSet, fs, path::PathBuf, time::Duration};

use serde_json::{json, Value};

use crate::harness::{
    self,
    xds::{workload_json, Cp},
    Daemon, Env, Held, Pod,
};

/// Name, pod number (10.244.0.<n>, fd00:244::<n>) and namespace ("": the
/// mesh does not know it). Service account: the name (ops: admin).
pub const PODS: [(&str, u8, &str); 8] = [
    ("ui", 2, "front"),
    ("batch", 3, "front"),
    ("stranger", 4, ""),
    ("ops", 5, "ops"),
    ("web", 11, "shop"),
    ("db", 12, "shop"),
    ("blog", 13, "blog"),
    ("legacy", 14, "shop"),
];
pub const WEB: &str = "10.244.0.11:8080";
pub const UI_PRINCIPAL: &str = "cluster.local/ns/front/sa/ui";

/// Whether its netns is enrolled (an enrolled client's denials fail at
/// connect; legacy is never enforced).
/// A refusal comes at once: 100 ms, times the harness's scale for the
/// emulated kernels of the matrix (no KVM there).
pub fn fail_ms() -> f64 {
    100.0 * f64::from(harness::time_scale())
}

pub fn enrolled(name: &str) -> bool {
    name != "ops" && name != "legacy"
}

/// A destination by its short name in the case tables: the server with an
/// optional 6 (its IPv6 address) or m (its IPv4 address v4-mapped, from an
/// IPv6 socket), and :9090 (else :8080). Returns (address, server).
pub fn dest(name: &str) -> (String, &'static str) {
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
pub fn pol(key: &str, scope: &str, action: &str, m: Value) -> Value {
    let (ns, name) = key.split_once('/').unwrap();
    let rules = match m {
        Value::Null => json!([]),
        m => json!([{"clauses": [{"matches": [m]}]}]),
    };
    json!({"name": name, "namespace": ns, "scope": scope, "action": action, "rules": rules})
}

pub fn allow(key: &str, m: Value) -> Value {
    pol(key, "NAMESPACE", "ALLOW", m)
}

pub fn deny(key: &str, m: Value) -> Value {
    pol(key, "NAMESPACE", "DENY", m)
}

pub fn dry(mut p: Value) -> Value {
    p["dry_run"] = json!(true);
    p
}

/// A match of one field: {field: v}.
pub fn one(field: &str, v: Value) -> Value {
    Value::Object([(field.to_string(), v)].into_iter().collect())
}

pub fn front() -> Value {
    one("namespaces", json!([{"exact": "front"}]))
}

pub fn principal_ui() -> Value {
    one("principals", json!([{"exact": UI_PRINCIPAL}]))
}

pub fn sa_batch() -> Value {
    json!([{"namespace": "front", "service_account": "batch"}])
}

/// A match of both addresses of pod `name`.
pub fn src(name: &str) -> Value {
    let n = PODS.iter().find(|p| p.0 == name).expect(name).1;
    let (v4, v6) = (format!("10.244.0.{n}/32"), format!("fd00:244::{n}/128"));
    one("source_ips", json!([v4, v6]))
}

/// Every pod the mesh knows, as config-file workloads; web lists the
/// WORKLOAD_SELECTOR policy shop/pick.
pub fn workloads() -> Vec<Value> {
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

pub struct Mesh {
    pub d: Daemon,
    pub pods: Vec<Pod>,
    /// Each server's file of accepted peers.
    pub accept_logs: Vec<(&'static str, PathBuf)>,
    pub env: Env,
}

/// Every enrolled pod of `pods` (in PODS' order), service web (VIP
/// 10.96.0.10, :80 → 8080, :90 → 9090) backed by web, and `policies`.
pub fn config(pods: &[Pod], policies: &[Value]) -> Value {
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
    pub fn new(cp: Option<&Cp>) -> Mesh {
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

    pub fn pod(&self, name: &str) -> &Pod {
        &self.pods[PODS.iter().position(|p| p.0 == name).expect(name)]
    }

    /// Writes the config with `policies` and waits until the daemon holds
    /// exactly them.
    pub fn apply(&self, policies: &[Value]) -> Value {
        self.d.write_config(&config(&self.pods, policies));
        let keys: Vec<String> = policies.iter().map(key).collect();
        self.wait_policies(&keys)
    }

    /// The dump once `dump.authz.policies` lists exactly `keys`.
    pub fn wait_policies(&self, keys: &[String]) -> Value {
        let want: BTreeSet<String> = keys.iter().map(|k| json!(k).to_string()).collect();
        let now = |v: &Value| -> BTreeSet<String> {
            policies(v).iter().map(|p| p["key"].to_string()).collect()
        };
        self.d
            .wait_dump(Duration::from_secs(10), |v| now(v) == want)
    }

    pub fn stat(&self, name: &str) -> u64 {
        let v = self.d.dump()["stats"][name].as_u64();
        v.unwrap_or_else(|| panic!("no stat {name}"))
    }

    pub fn accepted(&self, server: &str) -> usize {
        let s = self.accept_logs.iter().find(|s| s.0 == server).unwrap();
        fs::read_to_string(&s.1).unwrap().lines().count()
    }

    /// Runs each case of `rows`, "client>dest …" allowed, then "|", then
    /// denied ones (e.g. "ui>web batch>db6 | stranger>web:9090"), from
    /// inside and from outside the cgroup. Checks the server's name, the
    /// errno and time to failure, that the server never accepted a denied
    /// connection, and the destination and connect-time deny counters.
    pub fn check(&self, label: &str, rows: &str) {
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
    pub fn case(&self, policies: &[Value], rows: &str) {
        self.apply(policies);
        let keys: Vec<String> = policies.iter().map(key).collect();
        self.check(&keys.join(" + "), rows);
    }
}

pub fn key(p: &Value) -> String {
    p["namespace"].as_str().unwrap().to_string() + "/" + p["name"].as_str().unwrap()
}

pub fn policies(dump: &Value) -> Vec<Value> {
    serde_json::from_value(dump["authz"]["policies"].clone()).unwrap_or_default()
}

pub fn policy_entry(dump: &Value, key: &str) -> Value {
    let found = policies(dump).into_iter().find(|p| p["key"] == key);
    found.unwrap_or_else(|| panic!("{key}: {dump:#}"))
}

pub fn wait_cut(held: &mut Held, what: &str) {
    let closed = held.wait_closed(Duration::from_secs(1));
    assert!(closed, "{what}: open after 1 s");
}

/// Holds a connection from `c` to `to` and checks that it echoes.
pub fn held(m: &mut Mesh, c: &str, to: &str) -> Held {
    let pod = m.pod(c).clone();
    let mut h = m.env.hold(&pod, &dest(to).0);
    assert!(h.conn.ok, "{c} -> {to}: {:?}", h.conn);
    assert_eq!(h.echo("hello").as_deref(), Ok("hello"), "{c} -> {to}");
    h
}
