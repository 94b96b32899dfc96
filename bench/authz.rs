//! Authorization benchmark (root; real kernel, netns and cgroup).
//!
//! One enrolled pod netns in a child cgroup, connecting to a listener on
//! its own pod address, so every connect runs connect4 (the client-side
//! check) and the netns's sk_lookup program (the destination's check).
//! In one run, alternating rounds:
//! - the workload with no policy: connect rate;
//! - the same workload with 1,000 policies loaded, 1,000 of them applying
//!   to it (100 GLOBAL DENYs of other namespaces, 899 NAMESPACE ALLOWs
//!   from other namespaces, and the ALLOW that lets it in): connect rate;
//!   the ratio (target >= 0.97);
//! - the sk_lookup program's run time per call from the kernel's BPF
//!   run-time statistics, with and without the policies (target <= 300 ns).
//!
//! Run: `cargo bench --bench authz` (as root). KMESH_BENCH_QUICK=1 for a
//! short smoke run.

#[path = "../tests/harness/mod.rs"]
mod harness;
#[path = "inproc.rs"]
mod inproc;

use std::net::SocketAddr;

use inproc::{connect_once, listen, median, ns_per_run, paired_rounds, rate, InCgroup};
use kmesh::{
    authz::{Action, Clause, Match, Policy, Rule, Scope, StringMatch},
    bpf::{Datapath, MapSizes},
    model::{Addresses, Enrollment, Model, Workload},
    writer::MapWriter,
};

const POLICIES: usize = 1000;

fn model(pod: std::net::IpAddr, cookie: u64, netns: &str, policies: bool) -> Model {
    let mut m = Model::default();
    let mut w = Workload::new("bench/server", "server", "bench");
    w.addresses = Addresses::One(pod);
    m.insert_workload(w);
    // Other workloads of the mesh, so identities have classes to tell apart.
    for i in 0..100u32 {
        let ns = format!("ns-{i}");
        let mut w = Workload::new(&format!("{ns}/pod"), "pod", &ns);
        w.addresses = Addresses::One(std::net::Ipv4Addr::from(0x0a80_0000 + i).into());
        m.insert_workload(w);
    }
    m.enrolled.insert(
        cookie,
        Enrollment {
            source: netns.into(),
            waypoint: false,
            addrs: vec![pod],
        },
    );
    if !policies {
        return m;
    }
    let policy = |name: String, scope, action, m: Match| Policy {
        name,
        namespace: "bench".into(),
        scope,
        action,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause { matches: vec![m] }],
        }],
    };
    for i in 0..100u32 {
        m.policies.insert(policy(
            format!("deny-{i}"),
            Scope::Global,
            Action::Deny,
            Match {
                namespaces: vec![StringMatch::Exact(format!("blocked-{i}"))],
                ..Match::default()
            },
        ));
    }
    for i in 0..(POLICIES - 101) {
        m.policies.insert(policy(
            format!("allow-{i}"),
            Scope::Namespace,
            Action::Allow,
            Match {
                namespaces: vec![StringMatch::Exact(format!("ns-{}", i % 100))],
                destination_ports: vec![8080],
                ..Match::default()
            },
        ));
    }
    m.policies.insert(policy(
        "allow-self".into(),
        Scope::Namespace,
        Action::Allow,
        Match {
            principals: vec![StringMatch::Exact(
                "cluster.local/ns/bench/sa/default".into(),
            )],
            ..Match::default()
        },
    ));
    assert_eq!(m.policies.len(), POLICIES);
    m
}

fn main() {
    let quick = std::env::var_os("KMESH_BENCH_QUICK").is_some();
    let mut env = harness::Env::new();
    let pod = env.pod(2, &[]);
    kmesh::sys::enter_netns(std::path::Path::new(&pod.path())).unwrap();
    let cookie = kmesh::sys::current_netns_cookie().unwrap();
    let server = SocketAddr::new(pod.v4, 8080);
    let listener = listen(server);
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    let mut dp = Datapath::load(MapSizes::default()).expect("load BPF");
    dp.attach(&env.cgroup).expect("attach to the bench cgroup");
    let mut w = MapWriter::new(dp);
    let path = pod.path();
    let enrolled = model(pod.v4, cookie, &path, true);
    let bare_enrolled = model(pod.v4, cookie, &path, false);
    let t = std::time::Instant::now();
    let r = w.apply(&enrolled).expect("apply the policies");
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    println!(
        "compiled and wrote {POLICIES} policies in {:.1} ms ({} map updates)",
        t.elapsed().as_secs_f64() * 1e3,
        r.stats.updates
    );
    assert_eq!(w.datapath().netns_attached(), 1, "sk_lookup attached");
    let cg = InCgroup::join(&env.cgroup);
    connect_once(&server); // allowed, or this panics

    let (rounds, batch) = if quick { (3, 500) } else { (15, 3000) };
    let (none, with, ratios) = paired_rounds(rounds, |policies| {
        w.apply(if policies { &enrolled } else { &bare_enrolled })
            .unwrap();
        rate(&server, batch)
    });
    println!("\nconnect rate to the pod, median of {rounds} rounds x {batch} connects each:");
    println!("  no policy          : {:>9.0} /s", median(none));
    println!("  {POLICIES} policies     : {:>9.0} /s", median(with));
    println!(
        "  ratio              : {:>9.3}   (median of per-round ratios; target >= 0.97)",
        median(ratios)
    );

    let n = if quick { 2000 } else { 20000 };
    let mut cost = |model: &Model, prog: &str| {
        w.apply(model).unwrap();
        median(
            (0..7)
                .map(|_| ns_per_run(w.datapath(), prog, n, &server))
                .collect(),
        )
    };
    let lookup_with = cost(&enrolled, "authz_lookup");
    let connect_with = cost(&enrolled, "connect4");
    let lookup_none = cost(&bare_enrolled, "authz_lookup");
    let connect_none = cost(&bare_enrolled, "connect4");
    println!("\nrun time per call (median of 7 x {n}):");
    println!("  sk_lookup, {POLICIES} policies : {lookup_with:>7.1} ns   (target <= 300 ns)");
    println!("  sk_lookup, no policy    : {lookup_none:>7.1} ns");
    println!("  connect4, {POLICIES} policies  : {connect_with:>7.1} ns");
    println!("  connect4, no policy     : {connect_none:>7.1} ns");
    drop(cg);
    drop(w);
}
