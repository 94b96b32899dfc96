//! The compiled tables decide every connection as the evaluator does:
//! seeded random policy sets (every field, scope, action, dry run) over a
//! small universe of identities, addresses and ports, each connection
//! looked up the way bpf/lib/authz.h does and compared with `decide`.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use super::{
    compile::{compile, Compiled, Destination, PolicyIndex},
    decide, Action, Cidr, Clause, Conn, Identity, Match, Policy, PolicyStore, Rule, Scope,
    ServiceAccountMatch, StringMatch,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Clone>(&mut self, of: &[T]) -> T {
        of[self.below(of.len())].clone()
    }
    fn some<T: Clone>(&mut self, of: &[T]) -> Vec<T> {
        if !self.chance(30) {
            return Vec::new();
        }
        (0..1 + self.below(2)).map(|_| self.pick(of)).collect()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    let (a, l) = s.split_once('/').unwrap();
    Cidr::new(ip(a), l.parse().unwrap()).unwrap()
}

const NAMESPACES: [&str; 3] = ["a", "b", "shop"];

fn random_match(r: &mut Rng) -> Match {
    let cidrs: Vec<Cidr> = [
        "10.0.0.0/8",
        "10.0.0.0/30",
        "10.0.0.4/31",
        "10.0.0.5/32",
        "0.0.0.0/0",
        "fd00::/16",
        "fd00::4/127",
        "10.1.0.0/24",
        "fd01::/64",
        "::/0",
        "::/80",
    ]
    .map(cidr)
    .to_vec();
    let strings = [
        StringMatch::Exact("a".into()),
        StringMatch::Exact("".into()),
        StringMatch::Prefix("s".into()),
        StringMatch::Suffix("b".into()),
        StringMatch::Presence {},
    ];
    let principals = [
        StringMatch::Exact("cluster.local/ns/a/sa/x".into()),
        StringMatch::Prefix("other/".into()),
        StringMatch::Suffix("/sa/y".into()),
        StringMatch::Presence {},
    ];
    let sas = [
        ServiceAccountMatch {
            namespace: "a".into(),
            service_account: "x".into(),
        },
        ServiceAccountMatch {
            namespace: "shop".into(),
            service_account: "y".into(),
        },
    ];
    let ports = [80u16, 8080, 22];
    Match {
        namespaces: r.some(&strings),
        not_namespaces: r.some(&strings),
        service_accounts: r.some(&sas),
        not_service_accounts: r.some(&sas),
        principals: r.some(&principals),
        not_principals: r.some(&principals),
        source_ips: r.some(&cidrs),
        not_source_ips: r.some(&cidrs),
        destination_ips: r.some(&cidrs),
        not_destination_ips: r.some(&cidrs),
        destination_ports: r.some(&ports),
        not_destination_ports: r.some(&ports),
    }
}

fn random_policy(r: &mut Rng, i: usize) -> Policy {
    let rules = (0..r.below(3))
        .map(|_| Rule {
            clauses: (0..r.below(3))
                .map(|_| Clause {
                    matches: (0..r.below(3)).map(|_| random_match(r)).collect(),
                })
                .collect(),
        })
        .collect();
    Policy {
        name: format!("p{i}"),
        namespace: r.pick(&NAMESPACES).into(),
        scope: r.pick(&[Scope::Global, Scope::Namespace, Scope::WorkloadSelector]),
        action: r.pick(&[Action::Allow, Action::Deny]),
        dry_run: r.chance(20),
        rules,
    }
}

struct Keys(HashMap<String, u32>);

impl PolicyIndex for Keys {
    fn index(&self, key: &str) -> u32 {
        self.0.get(key).copied().unwrap_or(0)
    }
}

/// What bpf/lib/authz.h decides for src -> dst:port: (deny, dry-run
/// deny, deciding policy, dry-run policy).
fn lookup(
    c: &Compiled,
    idents: &HashMap<IpAddr, u32>,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
) -> Option<(bool, bool, u32, u32)> {
    let &(si, (dd, da)) = c.dsts.get(&dst)?;
    let set = &c.sets[si];
    let (pd, pa) = set.core.ports().get(&port).copied().unwrap_or((0, 0));
    let (id, ia) = idents
        .get(&src)
        .and_then(|n| set.identities.get(n))
        .copied()
        .unwrap_or((0, 0));
    // One trie over both parts, IPv4 as ::ffff:a.b.c.d/96+len, as the
    // kernel's LPM trie holds them (an IPv6 prefix can hold IPv4 there).
    let mapped = |ip: IpAddr, len: u8| match ip {
        IpAddr::V4(v4) => (u128::from(v4.to_ipv6_mapped()), 96 + u32::from(len)),
        IpAddr::V6(v6) => (u128::from(v6), u32::from(len)),
    };
    let (s, _) = mapped(src, 0);
    let (sd, sa) = set
        .core
        .sources()
        .into_iter()
        .map(|((a, l), c)| (mapped(a, l), c))
        .filter(|((p, l), _)| *l == 0 || (s ^ p) >> (128 - l) == 0)
        .max_by_key(|((_, l), _)| *l)
        .map_or((0, 0), |(_, c)| c);
    let d = set.core.deny.table[&(id, sd, dd, pd)];
    let a = set.core.allow.table[&(ia, sa, da, pa)];
    Some(if d.denied {
        (true, false, d.policy, 0)
    } else if a.not_allowed {
        (true, false, 0, 0)
    } else if d.dry_denied {
        (false, true, a.policy, d.dry_policy)
    } else if a.dry_not_allowed {
        (false, true, a.policy, a.dry_policy)
    } else {
        (false, false, a.policy, 0)
    })
}

#[test]
fn compiled_tables_decide_as_the_evaluator() {
    let identities: Vec<Identity> = [
        ("cluster.local", "a", "x"),
        ("cluster.local", "b", "y"),
        ("other", "shop", "y"),
        ("cluster.local", "shop", "x"),
    ]
    .iter()
    .map(|(td, ns, sa)| Identity {
        trust_domain: td.to_string(),
        namespace: ns.to_string(),
        service_account: sa.to_string(),
    })
    .collect();
    // Known sources (address → identity number) and unknown ones.
    let known: Vec<(IpAddr, u32)> = (1..=6)
        .flat_map(|i| {
            [
                (ip(&format!("10.0.0.{i}")), (i % 4) as u32 + 1),
                (ip(&format!("fd00::{i}")), (i % 4) as u32 + 1),
            ]
        })
        .collect();
    let unknown = ["10.9.9.9", "192.168.1.1", "fd00:1::1", "2001:db8::1"].map(ip);
    let idents: HashMap<IpAddr, u32> = known.iter().copied().collect();
    let numbered: Vec<(u32, &Identity)> = identities
        .iter()
        .enumerate()
        .map(|(i, id)| (i as u32 + 1, id))
        .collect();
    let mut checked = 0;
    for seed in 0..300 {
        let mut r = Rng(seed);
        let mut store = PolicyStore::default();
        let n = 1 + r.below(5);
        for i in 0..n {
            store.insert(random_policy(&mut r, i));
        }
        let keys: Vec<String> = store.iter().map(|p| p.key()).collect();
        let index = Keys(
            keys.iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), i as u32 + 1))
                .collect(),
        );
        // Three destinations: namespace, selected policies, addresses.
        let dst_defs: Vec<(&str, Vec<String>, Vec<IpAddr>)> = (0..3)
            .map(|d| {
                let selected = keys.iter().filter(|_| r.chance(50)).cloned().collect();
                let addrs = vec![
                    ip(&format!("10.1.0.{}", d + 1)),
                    ip(&format!("fd01::{}", d + 1)),
                ];
                (NAMESPACES[d], selected, addrs)
            })
            .collect();
        let dsts: Vec<Destination> = dst_defs
            .iter()
            .enumerate()
            .map(|(i, (ns, sel, addrs))| Destination {
                uid: ["d0", "d1", "d2"][i],
                addrs: addrs.clone(),
                policies: store
                    .applicable_shared(ns, sel)
                    .cloned()
                    .collect::<Vec<Arc<Policy>>>(),
            })
            .collect();
        let compiled = compile(&dsts, &numbered, &index, 1 << 20);
        assert!(compiled.notes.is_empty(), "{:?}", compiled.notes);
        for (ns, sel, addrs) in &dst_defs {
            let policies: Vec<&Policy> = store.applicable(ns, sel).collect();
            for &dst in addrs {
                for src in known.iter().map(|k| k.0).chain(unknown) {
                    for port in [80, 8080, 22, 9999] {
                        let id = idents.get(&src).map(|n| &identities[*n as usize - 1]);
                        let conn = Conn {
                            src,
                            dst,
                            dst_port: port,
                            src_identity: id,
                        };
                        let want = decide(policies.iter().copied(), &conn);
                        let got = lookup(&compiled, &idents, src, dst, port);
                        let case = format!("seed {seed}: {src} -> {dst}:{port} ({id:?})");
                        match got {
                            None => assert!(policies.is_empty(), "{case}: no entry"),
                            Some((deny, dry_deny, policy, dry_policy)) => {
                                assert_eq!(!deny, want.verdict.allowed(), "{case}: {want:?}");
                                assert_eq!(dry_deny, want.dry_run_by.is_some(), "{case}");
                                let idx = |k: Option<&str>| k.map_or(0, |k| index.index(k));
                                let by = match &want.verdict {
                                    super::Verdict::Denied(k) => index.index(k),
                                    _ => idx(want.allowed_by.as_deref()),
                                };
                                assert_eq!(policy, by, "{case}");
                                assert_eq!(dry_policy, idx(want.dry_run_by.as_deref()), "{case}");
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 10_000, "{checked} decisions compared");
}

#[test]
fn a_set_past_the_budget_denies_everything() {
    let mut store = PolicyStore::default();
    store.insert(Policy {
        name: "ports".into(),
        namespace: "shop".into(),
        scope: Scope::Namespace,
        action: Action::Allow,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    destination_ports: (1..=50).collect(),
                    ..Match::default()
                }],
            }],
        }],
    });
    let dst = Destination {
        uid: "d",
        addrs: vec![ip("10.1.0.1")],
        policies: store.applicable_shared("shop", &[]).cloned().collect(),
    };
    let c = compile(std::slice::from_ref(&dst), &[], &Keys(HashMap::new()), 10);
    assert_eq!(c.notes.len(), 1, "{:?}", c.notes);
    assert!(c.notes[0].contains("--max-authz-entries"), "{}", c.notes[0]);
    let v = lookup(&c, &HashMap::new(), ip("10.0.0.1"), ip("10.1.0.1"), 1).unwrap();
    assert!(v.0, "fails closed");
    let roomy = compile(&[dst], &[], &Keys(HashMap::new()), 1000);
    assert!(roomy.notes.is_empty());
    let v = lookup(&roomy, &HashMap::new(), ip("10.0.0.1"), ip("10.1.0.1"), 1).unwrap();
    assert!(!v.0);
}

/// DENYs on address ranges next to ALLOWs on identities: the two parts'
/// tables add up rather than multiply (100 CIDRs and 100 namespaces in one
/// table would be over 10,000 entries).
#[test]
fn deny_ranges_and_allow_identities_add_up() {
    let mut store = PolicyStore::default();
    let one = |name: String, action, m: Match| Policy {
        name,
        namespace: "shop".into(),
        scope: Scope::Namespace,
        action,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause { matches: vec![m] }],
        }],
    };
    for i in 0..100u32 {
        let range = Cidr::new(std::net::Ipv4Addr::from(0x0ac8_0000 + (i << 8)).into(), 24).unwrap();
        store.insert(one(
            format!("deny-{i}"),
            Action::Deny,
            Match {
                source_ips: vec![range],
                ..Match::default()
            },
        ));
        store.insert(one(
            format!("allow-{i}"),
            Action::Allow,
            Match {
                namespaces: vec![StringMatch::Exact(format!("ns-{i}"))],
                ..Match::default()
            },
        ));
    }
    let identities: Vec<Identity> = (0..100)
        .map(|i| Identity {
            trust_domain: "cluster.local".into(),
            namespace: format!("ns-{i}"),
            service_account: "default".into(),
        })
        .collect();
    let numbered: Vec<(u32, &Identity)> = identities
        .iter()
        .enumerate()
        .map(|(i, id)| (i as u32 + 1, id))
        .collect();
    let dst = Destination {
        uid: "d",
        addrs: vec![ip("10.1.0.1")],
        policies: store.applicable_shared("shop", &[]).cloned().collect(),
    };
    let c = compile(&[dst], &numbered, &Keys(HashMap::new()), 8192);
    assert!(c.notes.is_empty(), "{:?}", c.notes);
    let entries = c.sets[0].core.entries() + c.sets[0].identities.len();
    assert!(entries < 600, "{entries} entries");
    // ns-7 from inside a denied range is denied; from outside, allowed.
    let idents = HashMap::from([(ip("10.200.3.9"), 8), (ip("10.0.0.9"), 8)]);
    assert!(
        lookup(&c, &idents, ip("10.200.3.9"), ip("10.1.0.1"), 80)
            .unwrap()
            .0
    );
    assert!(
        !lookup(&c, &idents, ip("10.0.0.9"), ip("10.1.0.1"), 80)
            .unwrap()
            .0
    );
    assert!(
        lookup(&c, &HashMap::new(), ip("10.0.0.9"), ip("10.1.0.1"), 80)
            .unwrap()
            .0
    );
}

/// Found by review: a prefix only one part names must not hide the other
/// part's shorter prefix (the trie finds the longest of both), and an IPv6
/// prefix holding ::ffff:0:0/96 must not catch IPv4 sources.
#[test]
fn one_trie_for_both_parts_and_no_ipv4_in_ipv6_prefixes() {
    let with = |policies: Vec<Policy>| {
        let mut store = PolicyStore::default();
        policies.into_iter().for_each(|p| store.insert(p));
        let dst = Destination {
            uid: "d",
            addrs: vec![ip("10.1.0.1")],
            policies: store.applicable_shared("shop", &[]).cloned().collect(),
        };
        compile(&[dst], &[], &Keys(HashMap::new()), 8192)
    };
    let policy = |name: &str, action, range: &str| Policy {
        name: name.into(),
        namespace: "shop".into(),
        scope: Scope::Namespace,
        action,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    source_ips: vec![cidr(range)],
                    ..Match::default()
                }],
            }],
        }],
    };
    let none = HashMap::new();
    let c = with(vec![
        policy("deny-10", Action::Deny, "10.0.0.0/8"),
        policy("allow-10-2", Action::Allow, "10.2.0.0/16"),
    ]);
    assert!(
        lookup(&c, &none, ip("10.2.3.4"), ip("10.1.0.1"), 80)
            .unwrap()
            .0,
        "the DENY of 10/8 holds inside 10.2/16"
    );
    let c = with(vec![policy("allow-v6", Action::Allow, "::/0")]);
    assert!(
        lookup(&c, &none, ip("192.168.1.1"), ip("10.1.0.1"), 80)
            .unwrap()
            .0,
        "::/0 allows no IPv4 source"
    );
    assert!(
        !lookup(&c, &none, ip("fd00::1"), ip("10.1.0.1"), 80)
            .unwrap()
            .0
    );
    let c = with(vec![policy("deny-v6", Action::Deny, "::/0")]);
    assert!(
        !lookup(&c, &none, ip("192.168.1.1"), ip("10.1.0.1"), 80)
            .unwrap()
            .0,
        "::/0 denies no IPv4 source"
    );
}
