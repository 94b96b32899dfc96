//! Scale benchmark for the xDS path (root; real kernel maps).
//!
//! 10,000 services (one VIP, two ports each) and 100,000 workloads (each
//! backing one service with that service's port list, and its node and
//! cluster, as istiod sends them; 10 endpoints per service), as
//! istio.workload.Address resources, without per-resource versions (istiod
//! sends none for addresses):
//! - criterion: decode + convert + apply into fresh maps, in-process;
//! - end to end: the real daemon subscribed to the in-repo control plane
//!   holding all of them: time from the daemon's start until its maps hold
//!   everything, and the daemon's RSS then, against the same daemon idle
//!   (BPF map memory is kernel memory and not part of RSS);
//! - changes (xds_scale/churn.rs): one pod, 100 and 1,000 pods moved
//!   in-process; one pod moved end to end (control plane send -> map
//!   write, 100 times); churn of 10 pushes/s x 100 pods for 60 s (the
//!   daemon's CPU and RSS; KMESH_BENCH_QUICK=1: 10 s).
//!
//! Run: `cargo bench --bench xds_scale` (as root). Targets: apply <= 1 s,
//! RSS <= 30 MB above idle. KMESH_BENCH_SMAPS=1 also lists the loaded
//! daemon's largest anonymous mappings (where resident memory sits).

#[path = "../tests/harness/mod.rs"]
mod harness;

#[path = "xds_scale/churn.rs"]
mod churn;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use criterion::{BatchSize, Criterion};
use harness::xds::{address, service, workload_pb, Cp};
use kmesh::{
    bpf::{Datapath, MapSizes},
    writer::MapWriter,
    xds::{
        client::XdsStore,
        proto::{
            discovery::{DeltaDiscoveryResponse, DeltaDiscoveryResponseFrame, Resource},
            workload as pb,
        },
        ADDRESS_TYPE,
    },
};
use prost::Message;
use serde_json::json;

const SERVICES: u32 = 10_000;
const WORKLOADS: u32 = 100_000;

/// Maps sized for this mesh (the defaults are a node's: 64k endpoints).
fn sizes() -> MapSizes {
    MapSizes {
        vips: 16_384,
        workload_ips: 131_072,
        endpoints: 131_072,
        ..MapSizes::default()
    }
}

/// The same sizes as daemon flags.
const SIZE_FLAGS: [&str; 6] = [
    "--max-vips",
    "16384",
    "--max-workload-ips",
    "131072",
    "--max-endpoints",
    "131072",
];

fn resources() -> Vec<(String, prost_types::Any)> {
    let mut v = Vec::with_capacity((SERVICES + WORKLOADS) as usize);
    for i in 0..SERVICES {
        let vip = std::net::Ipv4Addr::from(0x0a60_0000 + i).to_string(); // 10.96.x.y
        v.push(service(
            &format!("svc-{i}"),
            &[&vip],
            &[(80, 8080), (443, 8443)],
        ));
    }
    for i in 0..WORKLOADS {
        v.push(pod(i, base_ip(i)));
    }
    v
}

/// Pod i's address as first sent, and the one it moves to and back from.
fn base_ip(i: u32) -> IpAddr {
    IpAddr::from(std::net::Ipv4Addr::from(0x0a80_0000 + i)) // 10.128.x.y
}

fn moved_ip(i: u32) -> IpAddr {
    IpAddr::from(std::net::Ipv4Addr::from(0x0ac8_0000 + i)) // 10.200.x.y
}

/// Pod i at `ip`, backing one service with that service's port list, and
/// with its node and cluster, as istiod fills them (100 pods per node).
fn pod(i: u32, ip: IpAddr) -> (String, prost_types::Any) {
    let (name, mut w) = workload_pb(
        &format!("pod-{i}"),
        &[ip],
        &[&format!("svc-{}", i % SERVICES)],
    );
    w.node = format!("node-{}", i / 100);
    w.cluster_id = "Kubernetes".into();
    for list in w.services.values_mut() {
        list.ports = [(80, 8080), (443, 8443)]
            .map(|(service_port, target_port)| pb::Port {
                service_port,
                target_port,
                ..Default::default()
            })
            .to_vec();
    }
    (name, address(pb::address::Type::Workload(w)))
}

/// The resources as one delta ADS response, encoded as it arrives.
fn response(res: &[(String, prost_types::Any)]) -> Vec<u8> {
    DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE.into(),
        nonce: "1".into(),
        resources: res
            .iter()
            .map(|(name, any)| Resource {
                name: name.clone(),
                resource: Some(any.clone()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// What the daemon's xDS client does with a response: decode, convert,
/// store.
fn to_store(raw: &[u8]) -> XdsStore {
    let frame = DeltaDiscoveryResponseFrame::decode(raw).unwrap();
    let mut store = XdsStore::default();
    let (changed, errors) = store.apply_response(&frame);
    assert!(changed && errors.is_empty(), "{errors:?}");
    store
}

/// Bytes the allocator has handed out and not had back (glibc).
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let mi = unsafe { libc::mallinfo2() };
    // Large blocks (a 100k-entry hash table) are mmapped and counted apart.
    mi.uordblks + mi.hblkhd
}

/// Kernel memory of the BPF maps a process holds (fdinfo's memlock).
fn bpf_map_kib(pid: u32) -> u64 {
    let mut total = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        if !info.contains("map_type:") {
            continue;
        }
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total / 1024
}

/// A /proc/PID/status field in KiB (VmRSS, RssAnon, RssFile, ...).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The daemon's last report of its heap (after its last trim).
fn last_heap(log: &str) -> String {
    let line = log.lines().rev().find(|l| l.contains("heap:"));
    line.and_then(|l| l.split("heap:").nth(1))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// The process's largest anonymous mappings (KMESH_BENCH_SMAPS=1).
fn print_smaps(pid: u32) {
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", pid)).unwrap();
    let mut cur = String::new();
    let mut rows = Vec::new();
    for l in smaps.lines() {
        if l.split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            cur = l.to_string();
        } else if let Some(v) = l.strip_prefix("Anonymous:") {
            let kb: u64 = v.split_whitespace().next().unwrap().parse().unwrap();
            if kb > 512 {
                rows.push((kb, cur.clone()));
            }
        }
    }
    rows.sort();
    for (kb, m) in rows.iter().rev() {
        println!("  smaps {kb:>8} kB anon  {m}");
    }
}

fn main() {
    let quick = std::env::var_os("KMESH_BENCH_QUICK").is_some();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(if quick { 5 } else { 20 }))
        .configure_from_args();
    let res = resources();
    let raw = response(&res);

    // Where the memory goes, in this process: the model as the daemon
    // holds it, and the writer's own index of what it wrote.
    {
        let before = heap_in_use();
        let store = to_store(&raw);
        let model = heap_in_use() - before;
        let mut w = MapWriter::new(Datapath::load(sizes()).unwrap());
        let before = heap_in_use();
        w.apply(&store.model).unwrap();
        let writer = heap_in_use() - before;
        println!(
            "sizes: Workload {} B, Service {} B, endpoint_value {} B",
            std::mem::size_of::<kmesh::model::Workload>(),
            std::mem::size_of::<kmesh::model::Service>(),
            std::mem::size_of::<kmesh::bpf::endpoint_value>()
        );
        println!(
            "in-process heap: xDS store {:.1} MB ({} B per resource), writer state {:.1} MB",
            model as f64 / 1e6,
            model / res.len(),
            writer as f64 / 1e6
        );
    }

    churn::in_process(&raw);

    c.bench_function("xds/convert_and_apply_10k_services_100k_workloads", |b| {
        b.iter_batched(
            || MapWriter::new(Datapath::load(sizes()).unwrap()),
            |mut w| {
                let store = to_store(&raw);
                w.apply(&store.model).unwrap();
                w
            },
            BatchSize::PerIteration,
        )
    });

    // End to end through the daemon.
    let mut env = harness::Env::new();
    let idle = env.daemon_args(&json!({}), &SIZE_FLAGS).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss = rss_kib(idle.pid());
    let idle_parts = (
        status_kib(idle.pid(), "RssAnon"),
        status_kib(idle.pid(), "RssFile"),
    );
    drop(idle);

    let cp = Cp::start(None);
    cp.cp.set_unversioned(true);
    cp.cp.update(|b| {
        for (n, a) in &res {
            b.set(n, a.clone());
        }
    });
    let started = Instant::now();
    let d = env
        .daemon_args(
            &json!({}),
            &[&["--xds-address", &cp.url()][..], &SIZE_FLAGS].concat(),
        )
        .unwrap();
    let deadline = started + Duration::from_secs(60);
    loop {
        let log = d.log();
        if log.contains(&format!(
            "xDS update: applied {SERVICES} services, {WORKLOADS} workloads"
        )) {
            break;
        }
        assert!(Instant::now() < deadline, "daemon did not converge:\n{log}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let converged = started.elapsed();
    // Steady state: the apply's temporaries are freed and trimmed.
    std::thread::sleep(Duration::from_secs(1));
    let loaded_rss = rss_kib(d.pid());
    let loaded_parts = (
        status_kib(d.pid(), "RssAnon"),
        status_kib(d.pid(), "RssFile"),
    );
    let maps_kib = bpf_map_kib(d.pid());
    let loaded_heap = last_heap(&d.log());
    // The control plane drops the stream: the daemon reconnects and gets
    // every resource again (istiod keeps no versions for addresses), as
    // after an istiod restart. Memory must not grow with each round.
    let applied = |log: &str| log.matches("xDS update: applied").count();
    let mut after_resend = Vec::new();
    for _ in 0..3 {
        let before = applied(&d.log());
        cp.cp.kill_streams();
        let deadline = Instant::now() + Duration::from_secs(60);
        while applied(&d.log()) == before {
            assert!(Instant::now() < deadline, "no re-apply:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_secs(1));
        after_resend.push((rss_kib(d.pid()), last_heap(&d.log())));
    }
    if std::env::var_os("KMESH_BENCH_SMAPS").is_some() {
        print_smaps(d.pid());
    }
    let dump = d.dump();
    assert_eq!(dump["maps"]["km_vip"]["entries"], SERVICES);
    assert_eq!(dump["maps"]["km_workload"]["entries"], WORKLOADS);
    assert_eq!(dump["maps"]["km_endpoint"]["entries"], WORKLOADS);
    println!("\nend to end, {SERVICES} services + {WORKLOADS} workloads over delta ADS:");
    println!(
        "  daemon start -> maps converged : {:>7.0} ms (includes process start and BPF load)",
        converged.as_secs_f64() * 1e3
    );
    println!(
        "  daemon RSS idle                : {:>7.1} MB",
        idle_rss as f64 / 1024.0
    );
    println!(
        "  daemon RSS loaded              : {:>7.1} MB",
        loaded_rss as f64 / 1024.0
    );
    println!(
        "  RSS above idle                 : {:>7.1} MB   (target <= 30 MB)",
        (loaded_rss - idle_rss) as f64 / 1024.0
    );
    println!(
        "    of which anonymous / file    : {:>7.1} / {:.1} MB",
        (loaded_parts.0 as f64 - idle_parts.0 as f64) / 1024.0,
        (loaded_parts.1 as f64 - idle_parts.1 as f64) / 1024.0
    );
    for (i, (kib, heap)) in after_resend.iter().enumerate() {
        println!(
            "  RSS above idle, resend {}       : {:>7.1} MB   (reconnect, everything sent again; heap: {heap})",
            i + 1,
            (*kib as f64 - idle_rss as f64) / 1024.0
        );
    }
    println!(
        "  BPF maps (kernel, not in RSS)  : {:>7.1} MB",
        maps_kib as f64 / 1024.0
    );
    println!("  daemon's allocator, loaded    : {loaded_heap}");

    // Changes on the loaded daemon.
    let map = churn::workload_map(&env.bpffs);
    let mut at = churn::Where::new();
    churn::one_pod_latency(&cp, &map, &mut at);
    let secs = if quick { 10 } else { 60 };
    churn::churn(&cp, &map, &mut at, d.pid(), secs, idle_rss);
    let dump = d.dump();
    assert_eq!(dump["maps"]["km_workload"]["entries"], WORKLOADS);
    assert_eq!(dump["maps"]["km_endpoint"]["entries"], WORKLOADS);
    assert!(cp.cp.nacks().is_empty(), "{:?}", cp.cp.nacks());
}
