//! The evaluator against ztunnel's behaviour. Cases taken from istio/ztunnel
//! src/rbac.rs tests (rbac_empty_policy, rbac_nesting, rbac_multi_rule, the
//! per-field rbac_test! cases, string_match) and src/state.rs
//! (assert_rbac_logic_deny_allow, assert_rbac_dry_run_with_real_policies),
//! rewritten here; plus scoping, identity-less sources, dry run and the
//! config-file shape.

use super::*;

fn id(td: &str, ns: &str, sa: &str) -> Identity {
    Identity {
        trust_domain: td.into(),
        namespace: ns.into(),
        service_account: sa.into(),
    }
}

/// ztunnel's three connections: plaintext (no identity) 127.0.0.1 ->
/// 127.0.0.2:8080; the same with identity td/namespace/account; and
/// 127.0.0.3 -> 127.0.0.4:9090 as td-alt/ns-alt/sa=alt.
fn conns() -> [(IpAddr, IpAddr, u16, Option<Identity>); 3] {
    let ip = |s: &str| s.parse().unwrap();
    [
        (ip("127.0.0.1"), ip("127.0.0.2"), 8080, None),
        (
            ip("127.0.0.1"),
            ip("127.0.0.2"),
            8080,
            Some(id("td", "namespace", "account")),
        ),
        (
            ip("127.0.0.3"),
            ip("127.0.0.4"),
            9090,
            Some(id("td-alt", "ns-alt", "sa=alt")),
        ),
    ]
}

fn conn(c: &(IpAddr, IpAddr, u16, Option<Identity>)) -> Conn<'_> {
    Conn {
        src: c.0,
        dst: c.1,
        dst_port: c.2,
        src_identity: c.3.as_ref(),
    }
}

fn policy(action: Action, rules: Vec<Rule>) -> Policy {
    Policy {
        name: "p".into(),
        namespace: "namespace".into(),
        scope: Scope::Global,
        action,
        dry_run: false,
        rules,
    }
}

fn rule(clauses: Vec<Vec<Match>>) -> Rule {
    Rule {
        clauses: clauses
            .into_iter()
            .map(|matches| Clause { matches })
            .collect(),
    }
}

fn one(m: Match) -> Policy {
    policy(Action::Allow, vec![rule(vec![vec![m]])])
}

fn cidr(s: &str) -> Cidr {
    serde_json::from_value(serde_json::json!(s)).unwrap()
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn sa(ns: &str, sa: &str) -> ServiceAccountMatch {
    ServiceAccountMatch {
        namespace: ns.into(),
        service_account: sa.into(),
    }
}

/// [plaintext, identity, alt] → expected match of a one-match policy.
fn check(m: Match, want: [bool; 3]) {
    let p = one(m.clone());
    let got = conns().map(|c| eval::matches(&p, &conn(&c)));
    assert_eq!(got, want, "{m:?}");
}

#[test]
fn empty_policies_rules_clauses_and_matches() {
    let c = &conns()[0];
    let m = |p: Policy| eval::matches(&p, &conn(c));
    // A match with every field empty is skipped: its clause matches nothing.
    assert!(!m(policy(
        Action::Allow,
        vec![rule(vec![vec![Match::default()]])]
    )));
    // A clause with no matches, and a rule with no clauses, match all.
    assert!(m(policy(Action::Allow, vec![rule(vec![vec![]])])));
    assert!(m(policy(Action::Allow, vec![rule(vec![])])));
    // A policy with no rules matches nothing.
    assert!(!m(policy(Action::Allow, vec![])));
    // An empty match beside a real one: the real one decides.
    let ports = Match {
        destination_ports: vec![8080],
        ..Match::default()
    };
    assert!(m(one_of(vec![Match::default(), ports])));
}

fn one_of(ms: Vec<Match>) -> Policy {
    policy(Action::Allow, vec![rule(vec![ms])])
}

#[test]
fn every_field_and_its_negation() {
    check(
        Match {
            namespaces: vec![exact("namespace")],
            ..Match::default()
        },
        [false, true, false],
    );
    check(
        Match {
            not_namespaces: vec![exact("namespace")],
            ..Match::default()
        },
        [true, false, true],
    );
    check(
        Match {
            service_accounts: vec![sa("namespace", "account")],
            ..Match::default()
        },
        [false, true, false],
    );
    check(
        Match {
            not_service_accounts: vec![sa("namespace", "account")],
            ..Match::default()
        },
        [true, false, true],
    );
    check(
        Match {
            principals: vec![exact("td/ns/namespace/sa/account")],
            ..Match::default()
        },
        [false, true, false],
    );
    check(
        Match {
            not_principals: vec![exact("td/ns/namespace/sa/account")],
            ..Match::default()
        },
        [true, false, true],
    );
    check(
        Match {
            source_ips: vec![cidr("127.0.0.1/32")],
            ..Match::default()
        },
        [true, true, false],
    );
    check(
        Match {
            not_source_ips: vec![cidr("127.0.0.1/32")],
            ..Match::default()
        },
        [false, false, true],
    );
    check(
        Match {
            destination_ips: vec![cidr("127.0.0.2/32")],
            ..Match::default()
        },
        [true, true, false],
    );
    check(
        Match {
            not_destination_ips: vec![cidr("127.0.0.2/32")],
            ..Match::default()
        },
        [false, false, true],
    );
    check(
        Match {
            destination_ips: vec![cidr("127.0.0.1/24")],
            ..Match::default()
        },
        [true, true, true],
    );
    check(
        Match {
            destination_ports: vec![8080],
            ..Match::default()
        },
        [true, true, false],
    );
    check(
        Match {
            not_destination_ports: vec![8080],
            ..Match::default()
        },
        [false, false, true],
    );
    // Presence needs an identity's namespace; a prefix of "" matches even
    // the empty namespace of a source without one (as in ztunnel).
    check(
        Match {
            namespaces: vec![StringMatch::Presence {}],
            ..Match::default()
        },
        [false, true, true],
    );
    check(
        Match {
            namespaces: vec![StringMatch::Prefix(String::new())],
            ..Match::default()
        },
        [true, true, true],
    );
    // Principals never match a source without identity, whatever the
    // pattern.
    check(
        Match {
            principals: vec![StringMatch::Prefix(String::new())],
            ..Match::default()
        },
        [false, true, true],
    );
}

#[test]
fn fields_and_clauses_combine() {
    // (ns a OR ns b) AND port 80: ztunnel's rbac_nesting.
    let p = policy(
        Action::Allow,
        vec![rule(vec![
            vec![
                Match {
                    namespaces: vec![exact("a")],
                    ..Match::default()
                },
                Match {
                    namespaces: vec![exact("b")],
                    ..Match::default()
                },
            ],
            vec![Match {
                destination_ports: vec![80],
                ..Match::default()
            }],
        ])],
    );
    let ip = |s: &str| s.parse().unwrap();
    let at = |ns: &str, port: u16| {
        let i = id("td", ns, "account");
        eval::matches(
            &p,
            &Conn {
                src: ip("127.0.0.1"),
                dst: ip("127.0.0.2"),
                dst_port: port,
                src_identity: Some(&i),
            },
        )
    };
    assert!(at("a", 80) && at("b", 80));
    assert!(!at("bad", 80) && !at("b", 12345));
    // Two rules: either one (rbac_multi_rule).
    let p = policy(
        Action::Allow,
        vec![
            rule(vec![vec![Match {
                namespaces: vec![exact("a")],
                ..Match::default()
            }]]),
            rule(vec![vec![Match {
                namespaces: vec![exact("b")],
                ..Match::default()
            }]]),
        ],
    );
    let c = conns();
    let i = id("td", "b", "x");
    assert!(eval::matches(
        &p,
        &Conn {
            src_identity: Some(&i),
            ..conn(&c[0])
        }
    ));
    // Within one match, every field must hold.
    let both = Match {
        namespaces: vec![exact("namespace")],
        destination_ports: vec![9090],
        ..Match::default()
    };
    check(both, [false, false, false]);
}

#[test]
fn string_matches_as_ztunnel() {
    let cases = [
        (exact("foo"), "foo", true),
        (exact("foo"), "not", false),
        (exact("foo"), "", false),
        (StringMatch::Prefix("foo".into()), "foobar", true),
        (StringMatch::Prefix("foo".into()), "notfoo", false),
        (StringMatch::Prefix("foo".into()), "", false),
        (StringMatch::Suffix("foo".into()), "barfoo", true),
        (StringMatch::Suffix("foo".into()), "foonot", false),
        (StringMatch::Suffix("foo".into()), "", false),
        (StringMatch::Presence {}, "foo", true),
        (StringMatch::Presence {}, "", false),
    ];
    for (m, s, want) in cases {
        assert_eq!(eval::string_matches(&m, s), want, "{m:?} {s:?}");
    }
}

#[test]
fn deny_wins_allow_must_match_and_dry_run_only_reports() {
    let c = conns();
    let plain = conn(&c[0]);
    let all = || vec![rule(vec![])];
    let allow_all = policy(Action::Allow, all());
    let deny_all = Policy {
        name: "deny".into(),
        ..policy(Action::Deny, all())
    };
    let allow_none = Policy {
        name: "none".into(),
        ..policy(Action::Allow, vec![])
    };
    let d = |ps: &[&Policy]| decide(ps.iter().copied(), &plain);
    // No policies: allowed.
    assert_eq!(d(&[]).verdict, Verdict::Allow);
    // DENY beats ALLOW.
    assert_eq!(
        d(&[&allow_all, &deny_all]).verdict,
        Verdict::Denied("namespace/deny".into())
    );
    // An ALLOW policy with no rules denies everything.
    assert_eq!(d(&[&allow_none]).verdict, Verdict::NotAllowed);
    assert_eq!(d(&[&allow_none, &allow_all]).verdict, Verdict::Allow);
    // Dry run: never enforced, reported beside.
    let dry = |p: &Policy| Policy {
        dry_run: true,
        ..p.clone()
    };
    let dr = d(&[&dry(&deny_all)]);
    assert_eq!(dr.verdict, Verdict::Allow);
    assert_eq!(dr.with_dry_run, Verdict::Denied("namespace/deny".into()));
    // A dry-run ALLOW that matches nothing would deny (ztunnel logs
    // "dry-run: no allow policies match").
    let dr = d(&[&dry(&allow_none)]);
    assert_eq!(
        (dr.verdict, dr.with_dry_run),
        (Verdict::Allow, Verdict::NotAllowed)
    );
    // A dry-run ALLOW next to an enforced one: the enforced one decides.
    let dr = d(&[&allow_none, &dry(&allow_all)]);
    assert_eq!(
        (dr.verdict, dr.with_dry_run),
        (Verdict::NotAllowed, Verdict::Allow)
    );
}

#[test]
fn scoping_selects_global_namespace_and_selected_policies() {
    let mut store = PolicyStore::default();
    let mk = |name: &str, ns: &str, scope| Policy {
        name: name.into(),
        namespace: ns.into(),
        scope,
        action: Action::Deny,
        dry_run: false,
        rules: vec![],
    };
    store.insert(mk("g", "istio-system", Scope::Global));
    store.insert(mk("n", "app", Scope::Namespace));
    store.insert(mk("other", "elsewhere", Scope::Namespace));
    store.insert(mk("w", "app", Scope::WorkloadSelector));
    store.insert(mk("w2", "app", Scope::WorkloadSelector));
    let keys = |store: &PolicyStore, ns: &str, sel: &[&str]| {
        let sel: Vec<String> = sel.iter().map(|s| s.to_string()).collect();
        let mut k: Vec<String> = store.applicable(ns, &sel).map(Policy::key).collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&store, "app", &["app/w"]),
        ["app/n", "app/w", "istio-system/g"]
    );
    // Another namespace's NAMESPACE policy does not apply; an unknown
    // selected key is skipped; a key listed twice counts once.
    assert_eq!(
        keys(&store, "x", &["app/nope", "app/w2", "app/w2"]),
        ["app/w2", "istio-system/g"]
    );
    // Replacing a policy with another scope re-indexes it.
    store.insert(mk("n", "app", Scope::WorkloadSelector));
    assert_eq!(keys(&store, "app", &[]), ["istio-system/g"]);
    store.remove("istio-system/g");
    assert!(keys(&store, "app", &[]).is_empty());
    assert_eq!(store.len(), 4);
}

#[test]
fn cidrs_are_canonical_and_checked() {
    let c = cidr("10.1.2.3/8");
    assert_eq!(c.to_string(), "10.0.0.0/8");
    assert!(c.contains("10.200.0.1".parse().unwrap()));
    assert!(c.contains("::ffff:10.200.0.1".parse().unwrap()));
    assert!(!c.contains("11.0.0.1".parse().unwrap()));
    assert_eq!(cidr("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
    assert_eq!(cidr("fd00::1").to_string(), "fd00::1/128");
    assert!(cidr("0.0.0.0/0").contains("1.2.3.4".parse().unwrap()));
    assert!(!cidr("0.0.0.0/0").contains("::1".parse().unwrap()));
    for bad in ["10.0.0.0/33", "fd00::/129", "10.0.0.0/x", "nope"] {
        let e = serde_json::from_value::<Cidr>(serde_json::json!(bad));
        assert!(e.is_err(), "{bad} accepted");
    }
}

#[test]
fn config_shape_follows_the_proto_and_is_validated() {
    let p: Policy = serde_json::from_value(serde_json::json!({
        "name": "allow-frontend", "namespace": "app", "scope": "NAMESPACE", "action": "ALLOW",
        "rules": [{"clauses": [{"matches": [{
            "namespaces": [{"exact": "frontend"}, {"presence": {}}],
            "source_ips": ["10.0.0.0/8"],
            "not_destination_ports": [22],
            "service_accounts": [{"namespace": "frontend", "service_account": "web"}]
        }]}]}]
    }))
    .unwrap();
    assert_eq!(p.key(), "app/allow-frontend");
    assert!(p.validate().is_ok());
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(m.namespaces[1], StringMatch::Presence {});
    let bad = |v: serde_json::Value| serde_json::from_value::<Policy>(v).is_err();
    assert!(bad(
        serde_json::json!({"name": "x", "namespace": "a", "scope": "CLUSTER", "action": "ALLOW"})
    ));
    assert!(bad(
        serde_json::json!({"name": "x", "namespace": "a", "scope": "GLOBAL", "action": "AUDIT"})
    ));
    assert!(bad(
        serde_json::json!({"name": "x", "namespace": "a", "scope": "GLOBAL", "action": "DENY",
        "rules": [{"clauses": [{"matches": [{"destination_ports": [70000]}]}]}]})
    ));
    assert!(bad(
        serde_json::json!({"name": "x", "namespace": "a", "scope": "GLOBAL", "action": "DENY",
        "rules": [{"clauses": [{"matches": [{"when": []}]}]}]})
    ));
    let zero = Policy {
        rules: vec![rule(vec![vec![Match {
            destination_ports: vec![0],
            ..Match::default()
        }]])],
        ..p.clone()
    };
    let e = zero.validate().unwrap_err().to_string();
    assert!(
        e.contains("app/allow-frontend") && e.contains("destination_ports"),
        "{e}"
    );
    let nameless = Policy {
        name: String::new(),
        ..p
    };
    assert!(nameless.validate().is_err());
}
