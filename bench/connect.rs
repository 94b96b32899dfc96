//! Connect-path benchmark (root; real kernel, netns and cgroup).
//!
//! In one run, from one enrolled network namespace and a child cgroup with
//! the data path attached and 10k services loaded:
//! - criterion: one connect+close to a backend directly, and to a service
//!   VIP that connect4 rewrites to that backend;
//! - rate rounds: alternating batches of each, median connects/s, and the
//!   ratio VIP / direct (target >= 0.97);
//! - the connect4 program's own run time per call from the kernel's BPF
//!   run-time statistics, for the redirect and for the miss path (target
//!   <= 300 ns).
//!
//! Run: `cargo bench --bench connect` (as root). Set KMESH_BENCH_QUICK=1
//! for a short smoke run.

#[path = "../tests/harness/mod.rs"]
mod harness;
#[path = "inproc.rs"]
mod inproc;

use std::{
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::Criterion;
use inproc::{connect_once, listen, median, ns_per_run, paired_rounds, rate, InCgroup};
use kmesh::{
    bpf::{Datapath, MapSizes},
    model::{
        Addresses, Enrollment, LoadBalancing, Model, NetworkAddress, PortMapping, RateLimit,
        Service, ServiceRef, TrafficPolicy, Workload, WorkloadExtra,
    },
    writer::MapWriter,
};

const SERVICES: u32 = 10_000;
const ENDPOINTS_PER_SERVICE: u32 = 3;

fn synthetic_service(i: u32) -> Service {
    Service {
        name: format!("svc-{i}"),
        namespace: "bench".into(),
        hostname: format!("svc-{i}.bench.svc.cluster.local"),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: std::net::Ipv4Addr::from(0x0a60_0000 + 0x100 + i).into(), // 10.96.1.0 + i
        }],
        ports: vec![PortMapping {
            service_port: 80,
            target_port: 8080,
        }],
        load_balancing: LoadBalancing::default(),
        waypoint: None,
    }
}

/// 10k services with 3 endpoints each (addresses in 10.128.0.0/10, never
/// connected to), plus the one service the bench connects through.
fn model(backend: std::net::IpAddr, cookie: u64) -> Model {
    let mut m = Model::default();
    for i in 0..SERVICES {
        let s = synthetic_service(i);
        for e in 0..ENDPOINTS_PER_SERVICE {
            let n = i * ENDPOINTS_PER_SERVICE + e;
            let mut w = Workload::new(&format!("bench/pod-{n}"), &format!("pod-{n}"), "bench");
            w.addresses = Addresses::One(std::net::Ipv4Addr::from(0x0a80_0000 + n).into());
            w.services = Arc::new([ServiceRef {
                key: s.key().into(),
                ports: vec![],
            }]);
            m.insert_workload(w);
        }
        m.insert_service(s);
    }
    let mut web = synthetic_service(SERVICES);
    web.name = "web".into();
    web.hostname = "web.bench.svc.cluster.local".into();
    web.addresses[0].address = "10.96.0.10".parse().unwrap();
    let mut w = Workload::new("bench/web-0", "web-0", "bench");
    w.addresses = Addresses::One(backend);
    w.services = Arc::new([ServiceRef {
        key: web.key().into(),
        ports: vec![],
    }]);
    m.insert_workload(w);
    m.insert_service(web);
    m.enrolled.insert(
        cookie,
        Enrollment {
            source: "bench netns".into(),
            waypoint: false,
            addrs: Vec::new(),
        },
    );
    m
}

fn main() {
    let quick = std::env::var_os("KMESH_BENCH_QUICK").is_some();
    // Before entering the test netns: under cargo, Criterion runs
    // `cargo metadata`, which must not run in a namespace without network.
    let mut c = Criterion::default()
        .sample_size(if quick { 10 } else { 50 })
        .warm_up_time(Duration::from_millis(if quick { 200 } else { 1000 }))
        .measurement_time(Duration::from_secs(if quick { 1 } else { 4 }))
        .configure_from_args();
    let mut env = harness::Env::new();
    let pod = env.pod(2, &[]);

    // Everything below runs inside the pod's netns; threads spawned from
    // here on (the server) inherit it.
    kmesh::sys::enter_netns(std::path::Path::new(&pod.path())).unwrap();
    let cookie = kmesh::sys::current_netns_cookie().unwrap();
    let backend: SocketAddr = SocketAddr::new(pod.v4, 8080);
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let listener = listen(backend);
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });

    let mut dp = Datapath::load(MapSizes::default()).expect("load BPF");
    dp.attach(&env.cgroup).expect("attach to the bench cgroup");
    let mut w = MapWriter::new(dp);
    let m = model(pod.v4, cookie);
    let t = Instant::now();
    w.apply(&m).expect("apply synthetic model");
    println!(
        "loaded {} services, {} workloads into the maps in {:.0} ms",
        m.services.len(),
        m.workloads.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let cg = InCgroup::join(&env.cgroup);

    // Both paths must work before anything is timed.
    for a in [&backend, &vip] {
        let s = TcpStream::connect(a).unwrap();
        assert_eq!(
            s.peer_addr().unwrap(),
            backend,
            "{a} must reach the backend"
        );
    }

    let mut g = c.benchmark_group("connect");
    g.bench_function("direct", |b| b.iter(|| connect_once(&backend)));
    g.bench_function("vip_redirect", |b| b.iter(|| connect_once(&vip)));
    g.finish();

    // Rate rounds: each round measures both paths back to back (order
    // alternating), and the ratio is taken within the round, so drift of
    // the machine between rounds cancels out.
    let (rounds, batch) = if quick { (3, 500) } else { (15, 3000) };
    let (direct, via, ratios) = paired_rounds(rounds, |to_vip| {
        rate(if to_vip { &vip } else { &backend }, batch)
    });
    println!("\nconnect rate, median of {rounds} rounds x {batch} connects each way:");
    println!("  direct to backend : {:>9.0} /s", median(direct));
    println!("  VIP via redirect  : {:>9.0} /s", median(via));
    println!(
        "  ratio VIP/direct  : {:>9.3}   (median of per-round ratios; target >= 0.97)",
        median(ratios)
    );

    // Program run time, from the kernel's own accounting.
    let n = if quick { 2000 } else { 20000 };
    let per_call = |w: &MapWriter, addr: &SocketAddr| ns_per_run(w.datapath(), "connect4", n, addr);
    let mut hit = Vec::new();
    let mut miss = Vec::new();
    for _ in 0..7 {
        hit.push(per_call(&w, &vip));
        miss.push(per_call(&w, &backend));
    }
    // The same connects with this netns no longer enrolled: what every other
    // socket in the cgroup pays for kmesh being attached.
    let mut unenrolled = m.clone();
    unenrolled.enrolled.clear();
    w.apply(&unenrolled).unwrap();
    let idle: Vec<f64> = (0..7).map(|_| per_call(&w, &backend)).collect();
    println!(
        "\nconnect4 run time per call ({} services loaded, median of 7 x {n}):",
        m.services.len()
    );
    println!(
        "  VIP redirect      : {:>7.1} ns   (target <= 300 ns)",
        median(hit)
    );
    println!("  pod IP (direct)   : {:>7.1} ns", median(miss));
    println!("  netns not enrolled: {:>7.1} ns", median(idle));

    traffic_rows(&mut w, &m, &backend, quick);

    drop(cg);
    drop(w);
}

/// `base` plus service web-t (VIP 10.96.0.11) on web-0 with traffic
/// settings `tp`; `weighted`: web-0 weighs 3 and a second pod on
/// 127.0.0.2 weighs 1 (both serve :8080 in the bench netns).
fn traffic_model(base: &Model, tp: TrafficPolicy, weighted: bool) -> Model {
    let mut m = base.clone();
    let web_key: Arc<str> = "bench/web.bench.svc.cluster.local".into();
    let mut t = m.services[&web_key].as_ref().clone();
    t.name = "web-t".into();
    t.hostname = "web-t.bench.svc.cluster.local".into();
    t.addresses[0].address = "10.96.0.11".parse().unwrap();
    let t_key: Arc<str> = t.key().into();
    let refs = |keys: &[&Arc<str>]| -> Arc<[ServiceRef]> {
        keys.iter()
            .map(|k| ServiceRef {
                key: (*k).clone(),
                ports: vec![],
            })
            .collect()
    };
    let mut w0 = m.workloads["bench/web-0"].clone();
    w0.services = refs(&[&web_key, &t_key]);
    if weighted {
        w0.set_extra(WorkloadExtra {
            weight: 3,
            ..Default::default()
        });
        let mut w1 = Workload::new("bench/web-1", "web-1", "bench");
        w1.addresses = Addresses::One("127.0.0.2".parse().unwrap());
        w1.services = refs(&[&t_key]);
        m.insert_workload(w1);
    }
    m.insert_workload(w0);
    m.insert_service(t);
    m.traffic.insert(t_key, tp);
    m
}

/// Connect cost with weights, a breaker and a rate limit configured (none
/// ever refusing) against the plain VIP: the per-call run time of connect4
/// and the connect rate relative to direct connects, as above.
fn traffic_rows(w: &mut MapWriter, base: &Model, backend: &SocketAddr, quick: bool) {
    let second: SocketAddr = "127.0.0.2:8080".parse().unwrap();
    let l = listen(second);
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    let vip_t: SocketAddr = "10.96.0.11:80".parse().unwrap();
    let breaker = TrafficPolicy {
        max_connections: Some(1 << 30),
        ..Default::default()
    };
    let limit = TrafficPolicy {
        rate_limit: Some(RateLimit {
            max_tokens: u32::MAX,
            tokens_per_fill: 1,
            fill_interval_ms: 1000,
        }),
        ..Default::default()
    };
    let all = TrafficPolicy {
        max_connections: breaker.max_connections,
        rate_limit: limit.rate_limit,
        ..Default::default()
    };
    let rows = [
        ("plain", TrafficPolicy::default(), false),
        ("weights 3:1", TrafficPolicy::default(), true),
        ("breaker", breaker, false),
        ("rate limit", limit, false),
        ("all three", all, true),
    ];
    let (rounds, batch) = if quick { (3, 500) } else { (11, 3000) };
    let n = if quick { 2000 } else { 20000 };
    println!("\ntraffic settings on the VIP (none refusing; median of {rounds} rounds x {batch}):");
    for (label, tp, weighted) in rows {
        w.apply(&traffic_model(base, tp, weighted))
            .expect("apply traffic variant");
        connect_once(&vip_t);
        let (_, _, ratios) = paired_rounds(rounds, |to_vip| {
            rate(if to_vip { &vip_t } else { backend }, batch)
        });
        let ns: Vec<f64> = (0..5)
            .map(|_| ns_per_run(w.datapath(), "connect4", n, &vip_t))
            .collect();
        println!(
            "  {label:<12}: connect4 {:>6.1} ns/call, rate VIP/direct {:.3}",
            median(ns),
            median(ratios)
        );
    }
}
