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
#[path = "authz/mesh.rs"]
mod mesh;

use std::time::{Duration, Instant};

use harness::{xds::*, Held};
use kmesh::xds::AUTHORIZATION_TYPE;
use mesh::*;
use serde_json::{json, Value};

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
