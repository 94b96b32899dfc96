//! Changes on a loaded mesh: what one pod changing, or a push of many,
//! costs in-process (stage by stage), end to end through the daemon (the
//! control plane's send to the map write), and under steady churn (the
//! daemon's CPU and RSS).

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use kmesh::{
    bpf::{addr_key, Datapath, Pod},
    model::Layers,
    writer::MapWriter,
    xds::proto::discovery::DeltaDiscoveryResponseFrame,
};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use prost::Message;

use super::{base_ip, harness::xds::Cp, moved_ip, pod, response, rss_kib, sizes, to_store};
use super::{SERVICES, WORKLOADS};

/// Which address each pod has now: pods move between base_ip and
/// moved_ip, so the maps keep their size.
pub struct Where(Vec<bool>);

impl Where {
    pub fn new() -> Self {
        Where(vec![false; WORKLOADS as usize])
    }

    /// Moves pod i; returns its new resource and address.
    fn flip(&mut self, i: u32) -> ((String, prost_types::Any), IpAddr) {
        let moved = &mut self.0[i as usize];
        *moved = !*moved;
        let ip = if *moved { moved_ip(i) } else { base_ip(i) };
        (pod(i, ip), ip)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median and p99 of `v` (sorted in place), in ms.
fn median_p99(v: &mut [Duration]) -> (f64, f64) {
    v.sort();
    let at = |q: f64| ms(v[((v.len() - 1) as f64 * q).round() as usize]);
    (at(0.5), at(0.99))
}

/// In this process, on the real maps: a response of `n` changed pods,
/// decoded and stored, then applied; the writer's debug log shows the
/// stages (admit, desired, fit, authz, write, ...).
pub fn in_process(raw: &[u8]) {
    let mut store = to_store(raw);
    let mut w = MapWriter::new(Datapath::load(sizes()).unwrap());
    w.apply(&store.model).unwrap();
    store.take_changes();
    let mut at = Where::new();
    let sub = tracing_subscriber::fmt()
        .with_env_filter("kmesh::writer=debug")
        .with_writer(std::io::stdout)
        .without_time()
        .with_target(false)
        .finish();
    println!("\nin-process, {SERVICES} services + {WORKLOADS} workloads loaded:");
    tracing::subscriber::with_default(sub, || {
        for n in [1u32, 100, 1000] {
            let (mut stored, mut applied, mut whole) = (vec![], vec![], 0);
            for round in 0..6u32 {
                let res: Vec<_> = (0..n)
                    .map(|k| at.flip((round * 7919 + k * 97) % WORKLOADS).0)
                    .collect();
                let raw = response(&res);
                let t0 = Instant::now();
                let frame = DeltaDiscoveryResponseFrame::decode(&raw[..]).unwrap();
                let (changed, errors) = store.apply_response(&frame);
                assert!(changed && errors.is_empty(), "{errors:?}");
                let changes = store.take_changes();
                let t1 = Instant::now();
                // As the daemon does: incrementally, else whole.
                let layers = Layers(&[&store.model]);
                let r = match w.apply_changes(layers, &changes) {
                    Some(r) => r,
                    None => {
                        whole += 1;
                        w.apply(&store.model)
                    }
                }
                .unwrap();
                let t2 = Instant::now();
                assert!(r.rejected.is_empty());
                stored.push(t1 - t0);
                applied.push(t2 - t1);
            }
            let (s, _) = median_p99(&mut stored);
            let (a, _) = median_p99(&mut applied);
            println!(
                "  {n:>5} pods moved: decode+store {s:.3} ms, apply {a:.3} ms (medians of 6; {whole} of 6 applied whole)"
            );
        }
    });
}

/// Polls the pinned km_workload until `ip` is in it; when it appeared.
fn seen(map: &MapHandle, ip: IpAddr, deadline: Instant) -> Instant {
    let key = addr_key::from_ip(ip);
    loop {
        if map.lookup(key.as_bytes(), MapFlags::ANY).unwrap().is_some() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{ip} never reached the maps");
        // Coarse enough to leave the daemon the CPU, fine enough for a
        // 5 ms target.
        std::thread::sleep(Duration::from_micros(50));
    }
}

pub fn workload_map(bpffs: &Path) -> MapHandle {
    MapHandle::from_pinned_path(bpffs.join("kmesh").join("km_workload")).unwrap()
}

/// (a) One pod moves, 100 times: the control plane's send (and its
/// update call) to the new address in the maps (the apply's last write).
pub fn one_pod_latency(cp: &Cp, map: &MapHandle, at: &mut Where) {
    let (mut from_send, mut from_update) = (vec![], vec![]);
    for k in 0..100u32 {
        let i = (k * 1009 + 17) % WORKLOADS;
        let ((name, any), ip) = at.flip(i);
        let t0 = Instant::now();
        cp.cp.set(&name, any);
        let t = seen(map, ip, t0 + Duration::from_secs(30));
        let sent = cp.cp.last_send().expect("the control plane sent it");
        from_send.push(t.saturating_duration_since(sent));
        from_update.push(t - t0);
        // The daemon ACKs, then idles, as between real pushes.
        std::thread::sleep(Duration::from_millis(30));
    }
    let (m, p) = median_p99(&mut from_send);
    let (mu, pu) = median_p99(&mut from_update);
    println!("\none pod moved, 100 times, control plane -> daemon -> map write:");
    println!("  from the control plane's send : median {m:>7.2} ms, p99 {p:>7.2} ms (target p99 <= 5 ms)");
    println!("  from its update call          : median {mu:>7.2} ms, p99 {pu:>7.2} ms (+ the control plane's own work)");
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a constant.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// (b) `rate` pushes a second, each moving `per_push` pods, for `secs`:
/// the daemon's CPU (share of one core) and RSS.
pub fn churn(cp: &Cp, map: &MapHandle, at: &mut Where, pid: u32, secs: u32, idle_rss: u64) {
    let (rate, per_push) = (10u32, 100u32);
    // The daemon's own CPU at rest, to tell apart from the churn's.
    let (c0, t0) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let idle = (cpu_ticks(pid) - c0) as f64 / ticks_per_sec() / t0.elapsed().as_secs_f64();
    let acks = cp.cp.acks();
    let (c0, t0) = (cpu_ticks(pid), Instant::now());
    let mut max_rss = 0;
    // Every 10 s: whether RSS settles or creeps.
    let mut trace = Vec::new();
    let mut last = base_ip(0);
    let mut next = 0u32;
    for push in 0..secs * rate {
        let due = t0 + Duration::from_secs(1) * push / rate;
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        cp.cp.update(|b| {
            for _ in 0..per_push {
                let ((name, any), ip) = at.flip(next);
                b.set(&name, any);
                last = ip;
                next = (next + 7919) % WORKLOADS;
            }
        });
        if push % rate == 0 {
            let now = rss_kib(pid);
            max_rss = max_rss.max(now);
            if push % (10 * rate) == 0 {
                trace.push(format!("{:.1}", (now as f64 - idle_rss as f64) / 1024.0));
            }
        }
    }
    let pushed = t0.elapsed();
    // Until the last push is in the maps.
    let done = seen(map, last, Instant::now() + Duration::from_secs(120));
    let wall = done - t0;
    let cpu = (cpu_ticks(pid) - c0) as f64 / ticks_per_sec();
    let end_rss = rss_kib(pid);
    trace.push(format!(
        "end {:.1}",
        (end_rss as f64 - idle_rss as f64) / 1024.0
    ));
    max_rss = max_rss.max(end_rss);
    println!(
        "\nchurn: {rate} pushes/s x {per_push} pods moved, {secs} s ({} pushes sent in {:.1} s):",
        secs * rate,
        pushed.as_secs_f64()
    );
    println!(
        "  daemon CPU                     : {:>6.1} % of one core (target <= 5 %; {:.1} % at rest)",
        100.0 * cpu / wall.as_secs_f64(),
        100.0 * idle
    );
    println!(
        "  responses ACKed/NACKed         : {} (the control plane coalesces pushes a busy stream has not taken yet)",
        cp.cp.acks() - acks
    );
    println!(
        "  last push in the maps after    : {:>6.0} ms past the last send",
        ms(done - (t0 + pushed))
    );
    println!(
        "  daemon RSS above idle, max     : {:>6.1} MB (every 10 s: {} MB)",
        (max_rss as f64 - idle_rss as f64) / 1024.0,
        trace.join(", ")
    );
}
