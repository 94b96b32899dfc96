//! The suite's output: a Markdown table (medians, ratios vs direct, the
//! issue's targets, where a peer is ahead of ours) and a PNG plot of the
//! ratios vs direct drawn by gnuplot.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path, process::Command};

use crate::{
    measure::{Group, Samples},
    world::Mode,
};

pub struct Meta {
    pub header: Vec<String>,
    pub modes: Vec<Mode>,
    pub sizes: Vec<usize>,
    /// Modes that cannot run here, and why.
    pub missing: BTreeMap<Mode, String>,
}

pub fn size_name(n: usize) -> String {
    match n {
        n if n >= 1024 && n % 1024 == 0 => format!("{} KiB", n / 1024),
        n => format!("{n} B"),
    }
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn ratio(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

const TARGETS: &[(&str, Group, Mode, &str, bool, f64)] = &[
    (
        "accel RR p50 latency, 1 B",
        Group::Size(1),
        Mode::Accel,
        "p50",
        false,
        0.60,
    ),
    (
        "accel RR p50 latency, 64 B",
        Group::Size(64),
        Mode::Accel,
        "p50",
        false,
        0.60,
    ),
    (
        "accel RR req/s, 1 B",
        Group::Size(1),
        Mode::Accel,
        "rps",
        true,
        1.5,
    ),
    (
        "accel RR req/s, 64 B",
        Group::Size(64),
        Mode::Accel,
        "rps",
        true,
        1.5,
    ),
    (
        "accel stream MB/s, 1 B",
        Group::Size(1),
        Mode::Accel,
        "mbs",
        true,
        1.5,
    ),
    (
        "accel stream MB/s, 64 B",
        Group::Size(64),
        Mode::Accel,
        "mbs",
        true,
        1.5,
    ),
    (
        "accel qperf tcp_bw, 1 B",
        Group::Size(1),
        Mode::Accel,
        "qperf_mbs",
        true,
        1.5,
    ),
    (
        "accel qperf tcp_bw, 64 B",
        Group::Size(64),
        Mode::Accel,
        "qperf_mbs",
        true,
        1.5,
    ),
    (
        "mesh connect rate",
        Group::Connect,
        Mode::Mesh,
        "cps",
        true,
        0.97,
    ),
    (
        "mesh connect rate (issue 22)",
        Group::Connect,
        Mode::Mesh,
        "cps",
        true,
        0.99,
    ),
];

/// A peer counts as ahead of one of ours on a metric only beyond this
/// margin (run-to-run noise on this machine is about this size).
const AHEAD_MARGIN: f64 = 0.02;

/// (metric, column name, higher is better) compared between a peer and ours.
const SIZE_METRICS: &[(&str, &str, bool)] = &[
    ("p50", "p50", false),
    ("p90", "p90", false),
    ("p99", "p99", false),
    ("rps", "req/s", true),
    ("mbs", "MB/s", true),
];
const CONNECT_METRICS: &[(&str, &str, bool)] = &[
    ("cps", "connects/s", true),
    ("cps_echo", "connect+echo/s", true),
];

/// Where peer `m` is ahead of each of our measured modes in group `g`:
/// "mesh: p99, MB/s; accel: MB/s", empty if nowhere.
fn ahead(
    s: &Samples,
    meta: &Meta,
    g: Group,
    m: Mode,
    metrics: &[(&'static str, &str, bool)],
) -> String {
    if !m.is_peer() {
        return String::new();
    }
    let mut parts = Vec::new();
    for &ours in meta.modes.iter().filter(|o| o.is_ours()) {
        let names: Vec<&str> = metrics
            .iter()
            .filter(|(k, _, higher)| {
                let (Some(p), Some(o)) = (s.median((g, m, k)), s.median((g, ours, k))) else {
                    return false;
                };
                if *higher {
                    p > o * (1.0 + AHEAD_MARGIN)
                } else {
                    p < o * (1.0 - AHEAD_MARGIN)
                }
            })
            .map(|(_, name, _)| *name)
            .collect();
        if !names.is_empty() {
            parts.push(format!("{ours}: {}", names.join(", ")));
        }
    }
    parts.join("; ")
}

/// The rows to show: measured modes and those that could not run.
fn rows(meta: &Meta) -> Vec<Mode> {
    Mode::ALL
        .into_iter()
        .filter(|m| meta.modes.contains(m) || meta.missing.contains_key(m))
        .collect()
}

pub fn markdown(s: &Samples, meta: &Meta) -> String {
    let mut o = String::new();
    for h in &meta.header {
        let _ = writeln!(o, "{h}  ");
    }
    let _ = writeln!(
        o,
        "◆ = a peer ahead of one of ours (mesh, accel) by more than {:.0} % on that row; the last column says where.  ",
        AHEAD_MARGIN * 100.0
    );
    let mut wins = Vec::new();
    let name = |m: Mode, a: &str| {
        if a.is_empty() {
            m.to_string()
        } else {
            format!("{m} ◆")
        }
    };
    for &n in &meta.sizes {
        let g = Group::Size(n);
        let _ = writeln!(o, "\n### {}\n", size_name(n));
        o.push_str(
            "| mode | p50 µs | p90 µs | p99 µs | req/s | stream MB/s | sockperf p50 / p99 µs | \
             wrk p50 / p99 µs | wrk req/s | iperf3 MB/s | qperf MB/s | p50 × | p90 × | p99 × | req/s × | MB/s × | \
             qperf × | peer ahead of |\n\
             |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n",
        );
        for m in rows(meta) {
            if let Some(why) = meta.missing.get(&m) {
                let _ = writeln!(o, "| {m} | {why} |||||||||||||||| ");
                continue;
            }
            let v = |k| fmt(s.median((g, m, k)));
            let r = |k| ratio(s.ratio((g, m, k)));
            let pair = |a, b| {
                if s.median((g, m, a)).is_some() {
                    format!("{} / {}", v(a), v(b))
                } else {
                    "–".into()
                }
            };
            let a = ahead(s, meta, g, m, SIZE_METRICS);
            if !a.is_empty() {
                wins.push(format!("{m}, {}: {a}", size_name(n)));
            }
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {a} |",
                name(m, &a),
                v("p50"),
                v("p90"),
                v("p99"),
                v("rps"),
                v("mbs"),
                pair("sp_p50", "sp_p99"),
                pair("wrk_p50", "wrk_p99"),
                v("wrk_rps"),
                v("iperf_mbs"),
                v("qperf_mbs"),
                r("p50"),
                r("p90"),
                r("p99"),
                r("rps"),
                r("mbs"),
                r("qperf_mbs"),
            );
        }
    }
    o.push_str("\n### Connect rate\n\n| mode | connects/s | × | connect + 1 B echo /s | × | daemon CPU, % of a core per 10k connects/s | peer ahead of |\n|---|--:|--:|--:|--:|--:|---|\n");
    for m in rows(meta) {
        if let Some(why) = meta.missing.get(&m) {
            let _ = writeln!(o, "| {m} | {why} |||||| ");
            continue;
        }
        let g = Group::Connect;
        let a = ahead(s, meta, g, m, CONNECT_METRICS);
        if !a.is_empty() {
            wins.push(format!("{m}, connect: {a}"));
        }
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {a} |",
            name(m, &a),
            fmt(s.median((g, m, "cps"))),
            ratio(s.ratio((g, m, "cps"))),
            fmt(s.median((g, m, "cps_echo"))),
            ratio(s.ratio((g, m, "cps_echo"))),
            s.median((g, m, "cpu10k"))
                .map_or("–".into(), |v| format!("{v:.2}")),
        );
    }
    if let Some((label, flags)) = crate::world::variant().map(|v| (&v.0, &v.1)) {
        let _ = writeln!(
            o,
            "\n### mesh-{label} vs mesh (daemon flags `{}`), same run\n\n| what | mesh | mesh-{label} | mesh-{label} / mesh |\n|---|--:|--:|--:|",
            flags.join(" ")
        );
        for (what, g, k) in [
            ("connects/s", Group::Connect, "cps"),
            ("connect + 1 B echo /s", Group::Connect, "cps_echo"),
            ("RR 64 B req/s", Group::Size(64), "rps"),
            ("RR 64 B p50 µs", Group::Size(64), "p50"),
            (
                "daemon CPU, % of a core per 10k connects/s",
                Group::Connect,
                "cpu10k",
            ),
        ] {
            let _ = writeln!(
                o,
                "| {what} | {} | {} | {} |",
                fmt(s.median((g, Mode::Mesh, k))),
                fmt(s.median((g, Mode::MeshVariant, k))),
                // No ratio against the mesh row's idle daemon.
                if k == "cpu10k" {
                    "–".into()
                } else {
                    ratio(s.ratio_to((g, Mode::MeshVariant, k), Mode::Mesh))
                },
            );
        }
    }
    o.push_str("\n### Where a peer is ahead\n\n");
    if wins.is_empty() {
        o.push_str("Nowhere: every measured peer is behind or within the margin of mesh and accel on every row.\n");
    }
    for w in &wins {
        let _ = writeln!(o, "- {w}");
    }
    o.push_str("\n### Targets (ratio vs direct, same run; reported, not enforced)\n\n| what | ratio | target | |\n|---|--:|--:|---|\n");
    for &(what, g, m, k, higher, goal) in TARGETS {
        let r = s.ratio((g, m, k));
        let verdict = match (r, meta.missing.get(&m)) {
            (_, Some(why)) => why.clone(),
            (None, _) => "not measured".into(),
            (Some(r), _) if (higher && r >= goal) || (!higher && r <= goal) => "met".into(),
            _ => "not met".into(),
        };
        let op = if higher { "≥" } else { "≤" };
        let _ = writeln!(o, "| {what} | {} | {op} {goal} | {verdict} |", ratio(r));
    }
    if !s.errors.is_empty() {
        o.push_str("\n### Errors\n\n");
        for e in &s.errors {
            let _ = writeln!(o, "- {}", e.replace('\n', " "));
        }
    }
    o
}

/// Writes gnuplot's data files into `dir` and draws `png`: each mode's
/// ratio to direct in the same run (RR p50, p90, p99, req/s, stream MB/s
/// per size, and the connect rates), one bar per mode, a line at 1.
pub fn plot(s: &Samples, meta: &Meta, dir: &Path, png: &Path) -> Result<(), String> {
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| meta.modes.contains(m) && *m != Mode::Direct)
        .collect();
    let head = |first: &str| {
        format!(
            "{first} {}\n",
            modes
                .iter()
                .map(|m| format!("\"{m}\""))
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    let cell = |g: Group, m: Mode, k: &'static str| {
        s.ratio((g, m, k))
            .map_or(" -".into(), |v| format!(" {v:.3}"))
    };
    let table = |metric: &'static str| {
        let mut t = head("size");
        for &n in &meta.sizes {
            let _ = write!(t, "\"{}\"", size_name(n));
            for &m in &modes {
                t += &cell(Group::Size(n), m, metric);
            }
            t.push('\n');
        }
        t
    };
    let mut c = head("what");
    for (label, k) in [("connect", "cps"), ("\"connect+echo\"", "cps_echo")] {
        c += label;
        for &m in &modes {
            c += &cell(Group::Connect, m, k);
        }
        c.push('\n');
    }
    let files = [
        ("p50.dat", table("p50")),
        ("p90.dat", table("p90")),
        ("p99.dat", table("p99")),
        ("rps.dat", table("rps")),
        ("mbs.dat", table("mbs")),
        ("cps.dat", c),
    ];
    for (f, t) in &files {
        fs::write(dir.join(f), t).map_err(|e| e.to_string())?;
    }
    // One colour per mode, the same whichever modes were measured.
    let colour = |m: &Mode| match m {
        Mode::Direct => "#7f7f7f",
        Mode::Mesh => "#1f77b4",
        Mode::MeshVariant => "#17becf",
        Mode::Accel => "#2ca02c",
        Mode::Proxy => "#ff7f0e",
        Mode::Nftables => "#d62728",
        Mode::Ipvs => "#9467bd",
        Mode::Haproxy => "#8c564b",
    };
    let first = |f: &str| {
        let cols: Vec<String> = modes
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let using = if i == 0 {
                    "2:xtic(1)".to_string()
                } else {
                    (i + 2).to_string()
                };
                let file = if i == 0 {
                    format!("'{}'", dir.join(f).display())
                } else {
                    "''".into()
                };
                format!("{file} u {using} ti col lc rgb '{}'", colour(m))
            })
            .collect();
        cols.join(", ")
    };
    let missing: Vec<String> = meta
        .missing
        .iter()
        .map(|(m, why)| format!("{m}: {why}"))
        .collect();
    let script = format!(
        r#"set terminal pngcairo noenhanced size 1600,1300 font "sans,11"
set output '{png}'
set datafile missing "-"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set key top left font ",9"
set grid ytics
set yrange [0:*]
set arrow 1 from graph 0, first 1 to graph 1, first 1 nohead lc rgb "black" dt 2
set multiplot layout 3,2 title "{title} — ratio vs direct, same run{missing}"
set title "request/response p50 latency × direct (lower is better)"
plot {p50}
set title "request/response p90 latency × direct (lower is better)"
plot {p90}
set title "request/response p99 latency × direct (lower is better)"
plot {p99}
set title "request/response req/s × direct (higher is better)"
plot {rps}
set title "one-way stream MB/s × direct (higher is better)"
plot {mbs}
set title "connections per second × direct (higher is better)"
plot {cps}
unset multiplot
"#,
        png = png.display(),
        title = meta
            .header
            .first()
            .map_or("", |h| h.trim_start_matches("# ")),
        missing = if missing.is_empty() {
            String::new()
        } else {
            format!("\\n{}", missing.join("; "))
        },
        p50 = first("p50.dat"),
        p90 = first("p90.dat"),
        p99 = first("p99.dat"),
        rps = first("rps.dat"),
        mbs = first("mbs.dat"),
        cps = first("cps.dat"),
    );
    let gp = dir.join("plot.gp");
    fs::write(&gp, script).map_err(|e| e.to_string())?;
    let out = Command::new("gnuplot")
        .arg(&gp)
        .output()
        .map_err(|e| format!("gnuplot: {e} (run bench/suite/deps.sh)"))?;
    if !out.status.success() {
        return Err(format!("gnuplot: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}
