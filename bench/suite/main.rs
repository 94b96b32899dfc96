//! Data-path benchmark suite (root; real kernel, netns and cgroup).
//!
//! In one run, a client pod and a server pod on one node bridge, both in
//! the harness's child cgroup, compare the paths of world::Mode: direct
//! to the pod IP, the mesh VIP redirect, the redirect with `--accelerate`,
//! a user-space proxy hop, and the real peers set up in the client pod
//! (peers.rs): kube-proxy's nftables and IPVS modes and HAProxy. Per message size (1 B, 64 B, 4 KiB, 256 KiB)
//! it measures request/response latency percentiles and rate (kmesh-load),
//! one-way throughput (kmesh-load and iperf3), ping-pong latency (sockperf),
//! HTTP keep-alive load (wrk), and the connect rate; then criterion times a
//! 64 B round trip per mode.
//!
//! Each (mode, size) cell is measured once per run, modes rotating order
//! from cell to cell, and reported as the median over runs; ratios vs
//! direct are medians of per-run ratios.
//!
//! Run: `bash bench/suite/run.sh` (or `cargo bench --bench suite` as root
//! after bench/suite/deps.sh). KMESH_BENCH_QUICK=1 for a short run;
//! KMESH_BENCH_RUNS, KMESH_BENCH_SECS (per measurement) and
//! KMESH_BENCH_CPU (a CPU number, or "none" to leave placement to the
//! scheduler) override the defaults. For a partial run (written as
//! suite-partial-<date>, criterion skipped unless listed):
//! KMESH_BENCH_SIZES=1,64,4096, KMESH_BENCH_MODES=direct,accel,
//! KMESH_BENCH_TOOLS=rr,stream (of rr, stream, iperf3, sockperf, wrk,
//! connect, criterion). KMESH_BENCH_MESH_VARIANT="label:--flag value ..."
//! adds a row `mesh-label`: the mesh with those extra daemon flags.
//! KMESH_BENCH_DAEMON_CPU=other keeps the daemon off the measured CPU.

#[path = "../common.rs"]
mod common;
#[path = "../../tests/harness/mod.rs"]
mod harness;
mod measure;
mod peers;
mod report;
mod rr_criterion;
mod world;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{cpu, sh_out};
use criterion::Criterion;
use measure::{Cell, Group, Samples};
use world::{Mode, World};

const SIZES: [usize; 4] = [1, 64, 4096, 256 * 1024];

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

/// A comma-separated list from the environment, if set.
fn env_list(name: &str) -> Option<Vec<String>> {
    let v = std::env::var(name).ok()?;
    Some(v.split(',').map(|s| s.trim().to_string()).collect())
}

/// The 1-minute load average: other work on the machine during the run.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_default()
}

fn main() {
    let sizes_filter: Option<Vec<usize>> = env_list("KMESH_BENCH_SIZES").map(|v| {
        v.iter()
            .map(|s| s.parse().expect("KMESH_BENCH_SIZES: numbers"))
            .collect()
    });
    let modes_filter = env_list("KMESH_BENCH_MODES");
    let tools = env_list("KMESH_BENCH_TOOLS");
    let partial = sizes_filter.is_some() || modes_filter.is_some() || tools.is_some();
    let sizes: Vec<usize> = SIZES
        .into_iter()
        .filter(|n| sizes_filter.as_ref().is_none_or(|f| f.contains(n)))
        .collect();
    let quick = std::env::var_os("KMESH_BENCH_QUICK").is_some();
    let runs: usize = env_num("KMESH_BENCH_RUNS").unwrap_or(if quick { 3 } else { 5 });
    let secs: f64 = env_num("KMESH_BENCH_SECS").unwrap_or(if quick { 0.5 } else { 1.5 });
    // Quick mode runs the own client only (rr, stream, connect), leaving
    // the Debian tools' cross-checks to a full run, to stay under 6 minutes
    // with the peers.
    let run_tools = tools
        .clone()
        .or_else(|| quick.then(|| ["rr", "stream", "connect"].map(String::from).to_vec()));
    match std::env::var("KMESH_BENCH_MESH_VARIANT") {
        Ok(v) => match world::parse_variant(&v) {
            Ok(v) => world::set_variant(Some(v)),
            Err(e) => {
                eprintln!("suite: {e}");
                std::process::exit(2);
            }
        },
        Err(_) => world::set_variant(None),
    }
    assert!(runs >= 1 && secs > 0.0);
    let mut c = Criterion::default()
        .sample_size(if quick { 10 } else { 30 })
        .warm_up_time(Duration::from_millis(if quick { 300 } else { 1000 }))
        .measurement_time(Duration::from_secs(if quick { 1 } else { 3 }))
        .configure_from_args();
    let started = Instant::now();
    let load_before = loadavg();
    let date = sh_out(&["date", "-u", "+%Y-%m-%d-%H%M%S"]);

    let mut w = World::new(cpu());
    let mut missing = std::collections::BTreeMap::new();
    if !w.accel_supported {
        missing.insert(Mode::Accel, "n/a (daemon lacks --accelerate)".to_string());
    }
    if let Some(why) = &w.ipvs_missing {
        missing.insert(Mode::Ipvs, why.clone());
    }
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| !missing.contains_key(m))
        .filter(|m| *m != Mode::MeshVariant || world::variant().is_some())
        .filter(|m| {
            modes_filter
                .as_ref()
                .is_none_or(|f| f.contains(&m.to_string()))
        })
        .collect();
    let wants = |t: &str| tools.as_ref().is_none_or(|f| f.iter().any(|x| x == t));
    let groups: Vec<Group> = sizes
        .iter()
        .map(|n| Group::Size(*n))
        .chain(wants("connect").then_some(Group::Connect))
        .collect();

    let mut s = Samples::default();
    for run in 0..runs {
        for (gi, &group) in groups.iter().enumerate() {
            // Rotate which mode goes first, so no mode always measures
            // right after a daemon start or on a warmer cache.
            let k = (run + gi) % modes.len();
            for &mode in modes[k..].iter().chain(&modes[..k]) {
                if let Err(e) = w.enter(mode) {
                    s.errors.push(format!("run {run} {mode}: set-up: {e}"));
                    continue;
                }
                Cell {
                    w: &w,
                    mode,
                    group,
                    run,
                    secs,
                    tools: run_tools.as_deref(),
                }
                .run(&mut s);
            }
        }
        eprintln!(
            "suite: run {}/{runs} done at {:.0} s",
            run + 1,
            started.elapsed().as_secs_f64()
        );
    }
    if !partial || wants("criterion") {
        rr_criterion::run(&mut c, &mut w, &modes);
    }
    w.leave_daemon();
    let stats = std::mem::take(&mut w.stats);
    let pinned = w.cpu;
    drop(w);
    let elapsed = started.elapsed().as_secs_f64();

    let cpu_note = pinned.map_or("unpinned".into(), |c| {
        format!("client, servers and proxy pinned to CPU {c}")
    });
    let mut header = vec![
        format!("# kmesh-rs data-path suite, {date}"),
        format!(
            "kernel {}, {} CPUs, {cpu_note}; {} mode{}; {runs} runs x {secs} s per measurement; median over runs; × = ratio vs direct (median of per-run ratios); latencies are full round trips; load average before / after {load_before} / {}; suite took {elapsed:.0} s",
            sh_out(&["uname", "-r"]),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            if quick { "quick" } else { "full" },
            if quick && tools.is_none() { " (rr, stream, connect only)" } else { "" },
            loadavg(),
        ),
        format!(
            "peers (set up in the client pod, no daemon): {}; {}; {}",
            sh_out(&["sh", "-c", "nft --version"]),
            sh_out(&["dpkg-query", "-W", "-f", "ipvsadm ${Version}", "ipvsadm"]),
            sh_out(&["sh", "-c", "haproxy -v | head -1 | cut -d' ' -f1-3"]),
        ),
        format!("tools: kmesh-load (rr, stream, connect); {}; {}; {}", sh_out(&["sh", "-c", "sockperf --version 2>&1 | grep -o 'version [0-9.]*' | head -1 | sed 's/^/sockperf /'"]), sh_out(&["sh", "-c", "iperf3 --version | head -1 | cut -d' ' -f1,2"]), sh_out(&["sh", "-c", "wrk -v 2>&1 | head -1 | cut -d' ' -f1,2"])) + &format!("; {}", sh_out(&["sh", "-c", "qperf --version 2>&1 | head -1"])),
    ];
    for (state, m) in &stats {
        let pairs: Vec<String> = m
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        header.push(format!("daemon counters ({state}): {}", pairs.join(", ")));
    }
    let meta = report::Meta {
        header,
        modes,
        sizes,
        missing,
    };
    let md = report::markdown(&s, &meta);
    println!("\n{md}");
    let results = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    std::fs::create_dir_all(&results).expect("bench/results");
    let name = if partial { "suite-partial" } else { "suite" };
    let md_path = results.join(format!("{name}-{date}.md"));
    let png_path = results.join(format!("{name}-{date}.png"));
    let tmp = std::env::temp_dir().join(format!("kmesh-suite-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let plotted = if partial {
        Err("partial run, not plotted".to_string())
    } else {
        report::plot(&s, &meta, &tmp, &png_path)
    };
    let _ = std::fs::remove_dir_all(&tmp);
    let md = match &plotted {
        Ok(()) => format!(
            "{md}\n![plot]({})\n",
            png_path.file_name().unwrap().to_string_lossy()
        ),
        Err(e) => format!("{md}\nplot failed: {e}\n"),
    };
    std::fs::write(&md_path, md).expect("write results");
    println!("wrote {}", md_path.display());
    match plotted {
        Ok(()) => println!("wrote {}", png_path.display()),
        Err(e) => eprintln!("suite: {e}"),
    }
}
