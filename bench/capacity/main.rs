//! Capacity benchmark (root; real kernel, netns and cgroup): N concurrent
//! accelerated connections (KMESH_CAP_CONNS, default 100 000).
//!
//! A client pod and a server pod on one node bridge, both enrolled and in
//! the harness's child cgroup; the daemon runs with --accelerate and a
//! km_sock of 2N plus a margin. `kmesh-load hold` in the client pod opens N
//! connections to the service VIP, spread over several service ports (the
//! ephemeral range holds ~64k connections per destination), each checked
//! with an echo. While all are held: km_sock entries, the daemon's
//! counters and RSS, kernel memory (slab, TCP), an echo over all N again,
//! and round-trip latency, compared with the same measured with only a few
//! connections held. Then everything closes and km_sock must drain. The
//! same is then run with the daemon without --accelerate, so the report
//! shows what acceleration itself costs per connection.
//!
//! Connections are split over several client and server processes when
//! one process may not hold them all: the benchmark raises its own
//! RLIMIT_NOFILE hard limit if it may (CAP_SYS_RESOURCE), which its
//! children inherit, and otherwise works within it.
//!
//! Run: `bash bench/capacity.sh` (or `cargo bench --bench capacity` as
//! root). KMESH_CAP_CONNS changes N; KMESH_BENCH_CPU pins the clients and
//! servers to a CPU (default the last; "none" leaves it to the scheduler).
//! Writes bench/results/capacity-<date>.md.

#[path = "../common.rs"]
mod common;
#[path = "../../tests/harness/mod.rs"]
mod harness;
mod report;
mod sys;
mod world;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{cpu, sh_out};
use report::Run;
use world::{u, World, PARALLEL, SIZE, SVC_PORT, TARGET_PORT, VIP};

/// The most service ports the data path keeps per service.
const MAX_PORTS: usize = 10;
/// Connections per destination to plan for: the pods' port range gives
/// 64k, and the kernel's search for a free port slows as it fills.
const PER_PORT: usize = 25_000;
/// Descriptors a kmesh-load process needs besides its connections.
const FD_SPARE: u64 = 256;
/// Connections held for the baseline measurements.
const FEW: usize = 100;
/// Round-trip sample over held connections: 100 of them, 20 rounds each.
const RR_SAMPLE: &str = "rr 100 20";

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// One daemon mode: a baseline with FEW connections, then N held.
fn run(w: &mut World, n: usize, accelerate: bool) -> Run {
    let mode = if accelerate { "accelerated" } else { "plain" };
    w.start_daemon(accelerate);
    eprintln!("capacity: {mode}: baseline with {FEW} connections");
    let (mut few, _) = w.hold(FEW);
    assert_eq!(
        few.sum(|h| u(&h.open, "opened")),
        FEW as u64,
        "baseline connections failed to open: {:?}",
        few.open_errors()
    );
    let rr_few = few.0[0].command(RR_SAMPLE);
    let fresh_few = w.fresh_rr();
    let rss_few = sys::rss_kb(w.daemon().pid());
    assert!(few.close(), "baseline hold clients failed");
    w.wait_entries(0, Duration::from_secs(30));
    sys::checkpoint();

    eprintln!("capacity: {mode}: opening {n} connections");
    let (mem0, slab0, stats0) = (sys::meminfo(), sys::slabs(), w.stats());
    let (mut h, open_secs) = w.hold(n);
    let opened = h.sum(|h| u(&h.open, "opened"));
    let open_failed = h.sum(|h| u(&h.open, "failed"));
    eprintln!("capacity: {mode}: {opened} open, {open_failed} failed in {open_secs:.2} s");
    sys::checkpoint();
    let t = Instant::now();
    let held_entries = w.entries();
    let dump_secs = t.elapsed().as_secs_f64();
    let (mem1, slab1, stats1) = (sys::meminfo(), sys::slabs(), w.stats());
    let rss_all = sys::rss_kb(w.daemon().pid());
    let hold_rss = h.sum(|h| sys::rss_kb(h.pid()));
    let server_rss = w.server_pids.iter().map(|&p| sys::rss_kb(p)).sum();
    let tcp_client = sys::tcp_sockstat(h.0[0].pid()).0;
    let tcp_server = sys::tcp_sockstat(w.server_pids[0]).0;
    eprintln!("capacity: {mode}: echo over all {n} again");
    let t = Instant::now();
    let checks = h.all("check");
    let check_secs = t.elapsed().as_secs_f64();
    sys::checkpoint();
    let rr_all = h.0[0].command(RR_SAMPLE);
    let fresh_all = w.fresh_rr();
    sys::checkpoint();
    let open_errors = h.open_errors();
    let hold_procs = h.0.len();
    let closed_ok = h.close();
    let drain = w.wait_entries(0, Duration::from_secs(120));

    let delta = |k: &str| stats1.get(k).unwrap_or(&0) - stats0.get(k).unwrap_or(&0);
    let kb = |m: &BTreeMap<String, u64>, k: &str| *m.get(k).unwrap_or(&0) as i64;
    Run {
        mode,
        opened,
        open_failed,
        open_errors,
        open_secs,
        held_entries,
        accel: [
            "accel_added",
            "accel_full",
            "accel_on",
            "accel_off",
            "accel_left",
        ]
        .map(delta),
        check_ok: checks.iter().map(|c| u(c, "ok")).sum(),
        check_failed: checks.iter().map(|c| u(c, "failed")).sum(),
        check_secs,
        daemon_rss_kb: (rss_few, rss_all),
        dump_secs,
        hold_rss_kb: hold_rss,
        server_rss_kb: server_rss,
        hold_procs,
        slab_kb: kb(&mem1, "Slab") - kb(&mem0, "Slab"),
        unreclaimable_kb: kb(&mem1, "SUnreclaim") - kb(&mem0, "SUnreclaim"),
        avail_drop_kb: kb(&mem0, "MemAvailable") - kb(&mem1, "MemAvailable"),
        tcp_inuse: (tcp_client, tcp_server),
        drain_secs: drain.as_secs_f64(),
        closed_ok,
        rr: [rr_few, rr_all, fresh_few, fresh_all],
        slabs: sys::slab_growth(&slab0, &slab1, 8),
    }
}

fn main() {
    sys::catch_signals();
    let n: usize = env_num("KMESH_CAP_CONNS").unwrap_or(100_000);
    assert!(n >= 1, "KMESH_CAP_CONNS must be at least 1");
    let budget = world::fd_budget(n as u64 + FD_SPARE);
    assert!(
        budget > 2 * FD_SPARE,
        "the open-file hard limit ({budget}) leaves no room for connections"
    );
    let per_proc = (budget - FD_SPARE) as usize;
    // One server process per target port: a port takes no more
    // connections than one process may hold.
    let per_port = PER_PORT.min(per_proc);
    let ports = n.div_ceil(per_port).max(4);
    assert!(
        ports <= MAX_PORTS,
        "KMESH_CAP_CONNS={n} needs {ports} service ports of at most {per_port} connections; a service has at most {MAX_PORTS}"
    );
    let max_sockets = 2 * n + 2 * FEW + 4096;
    let cpu = cpu();
    let started = Instant::now();
    let date = sh_out(&["date", "-u", "+%Y-%m-%d-%H%M%S"]);

    let mut w = World::new(ports, per_proc, max_sockets, cpu);
    let runs = [run(&mut w, n, true), run(&mut w, n, false)];
    drop(w);

    let header = format!(
        "# kmesh-rs capacity, {date}\n\n{n} connections held at once from a client pod to the VIP {VIP}, service ports {SVC_PORT}..{} → target ports {TARGET_PORT}..{} (one kmesh-load echo server each), both pods enrolled and in the child cgroup; daemon `--max-sockets {max_sockets}`, with and without `--accelerate`. Kernel {}, {} CPUs, {}; open-file hard limit {budget} per process. Benchmark took {:.0} s.",
        SVC_PORT as usize + ports - 1,
        TARGET_PORT as usize + ports - 1,
        sh_out(&["uname", "-r"]),
        std::thread::available_parallelism().map_or(0, |c| c.get()),
        cpu.map_or("clients and servers unpinned".into(), |c| format!(
            "clients and servers pinned to CPU {c}"
        )),
        started.elapsed().as_secs_f64(),
    );
    let notes = [
        format!("Opening: {PARALLEL} connects + {SIZE} B echoes in flight per client process. Few held = {FEW}."),
        format!("RR: {SIZE} B round trips. Held connections: `{RR_SAMPLE}` in the first `kmesh-load hold` process (100 of its connections spread over all it holds, 20 requests each, one at a time; tokio client), so 2000 requests. Fresh connection: `kmesh-load rr` for 3 s on a new connection (blocking client) while the others are held."),
        "Memory readings are host-wide (/proc/meminfo, /proc/slabinfo) taken before opening and with all held, so other activity on the host shows up too; slab includes reclaimable dentry and inode caches, the unreclaimable part is closer to the sockets' own cost. One connection = two sockets (both ends on this host).".to_string(),
    ];
    let md = report::markdown(&header, &notes, n, &runs);
    println!("\n{md}");
    let results = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    std::fs::create_dir_all(&results).expect("create bench/results");
    let path = results.join(format!("capacity-{date}.md"));
    std::fs::write(&path, &md).expect("write the results file");
    println!("wrote {}", path.display());
    assert!(
        runs.iter().all(|r| r.ok(n)),
        "capacity not reached; see {}",
        path.display()
    );
}
