//! The suite's output: a Markdown table (medians, ratios vs direct, the
//! issue's targets) and a PNG plot drawn by gnuplot.

use std::{fmt::Write as _, fs, path::Path, process::Command};

use crate::{
    measure::{Group, Samples},
    world::Mode,
};

pub struct Meta {
    pub header: Vec<String>,
    pub modes: Vec<Mode>,
    pub sizes: Vec<usize>,
    pub accel_missing: Option<String>,
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
];

pub fn markdown(s: &Samples, meta: &Meta) -> String {
    let mut o = String::new();
    for h in &meta.header {
        let _ = writeln!(o, "{h}  ");
    }
    let na = |m: Mode| {
        (m == Mode::Accel)
            .then_some(meta.accel_missing.as_ref())
            .flatten()
    };
    for &n in &meta.sizes {
        let g = Group::Size(n);
        let _ = writeln!(o, "\n### {}\n", size_name(n));
        o.push_str(
            "| mode | p50 µs | p90 µs | p99 µs | req/s | stream MB/s | sockperf p50 / p99 µs | \
             wrk p50 / p99 µs | wrk req/s | iperf3 MB/s | qperf MB/s | p50 × | req/s × | MB/s × | \
             qperf × |\n\
             |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for &m in &Mode::ALL {
            if let Some(why) = na(m) {
                let _ = writeln!(o, "| {m} | {why} |||||||||||||| ");
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
            let _ = writeln!(
                o,
                "| {m} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
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
                r("rps"),
                r("mbs"),
                r("qperf_mbs"),
            );
        }
    }
    o.push_str("\n### Connect rate\n\n| mode | connects/s | × | connect + 1 B echo /s | × |\n|---|--:|--:|--:|--:|\n");
    for &m in &Mode::ALL {
        if let Some(why) = na(m) {
            let _ = writeln!(o, "| {m} | {why} |||| ");
            continue;
        }
        let g = Group::Connect;
        let _ = writeln!(
            o,
            "| {m} | {} | {} | {} | {} |",
            fmt(s.median((g, m, "cps"))),
            ratio(s.ratio((g, m, "cps"))),
            fmt(s.median((g, m, "cps_echo"))),
            ratio(s.ratio((g, m, "cps_echo"))),
        );
    }
    o.push_str("\n### Targets (ratio vs direct, same run; reported, not enforced)\n\n| what | ratio | target | |\n|---|--:|--:|---|\n");
    for &(what, g, m, k, higher, goal) in TARGETS {
        let r = s.ratio((g, m, k));
        let verdict = match (r, na(m)) {
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

/// Writes gnuplot's data files into `dir` and draws `png`: latency p50 and
/// p99, stream throughput per size, and connect rates, one bar per mode.
pub fn plot(s: &Samples, meta: &Meta, dir: &Path, png: &Path) -> Result<(), String> {
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| meta.modes.contains(m))
        .collect();
    let table = |metric: &'static str| {
        let mut t = format!(
            "size {}\n",
            modes
                .iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        for &n in &meta.sizes {
            let _ = write!(t, "\"{}\"", size_name(n));
            for &m in &modes {
                let v = s.median((Group::Size(n), m, metric));
                let _ = write!(t, " {}", v.map_or("-".into(), |v| format!("{v:.3}")));
            }
            t.push('\n');
        }
        t
    };
    let mut c = String::from("what ");
    c += &modes
        .iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    c.push('\n');
    for (label, k) in [("connect", "cps"), ("\"connect+echo\"", "cps_echo")] {
        c += label;
        for &m in &modes {
            let v = s.median((Group::Connect, m, k));
            let _ = write!(c, " {}", v.map_or("-".into(), |v| format!("{v:.0}")));
        }
        c.push('\n');
    }
    let files = [
        ("p50.dat", table("p50")),
        ("p99.dat", table("p99")),
        ("mbs.dat", table("mbs")),
        ("cps.dat", c),
    ];
    for (f, t) in &files {
        fs::write(dir.join(f), t).map_err(|e| e.to_string())?;
    }
    // One colour per mode, the same whether or not accel was measured.
    let colour = |m: &Mode| match m {
        Mode::Direct => "#7f7f7f",
        Mode::Mesh => "#1f77b4",
        Mode::Accel => "#2ca02c",
        Mode::Proxy => "#ff7f0e",
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
    let script = format!(
        r#"set terminal pngcairo size 1400,1000 font "sans,11"
set output '{png}'
set datafile missing "-"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set key top left
set grid ytics
set multiplot layout 2,2 title "{title}{missing}"
set title "request/response p50 latency (µs, lower is better)"
set logscale y
plot {p50}
set title "request/response p99 latency (µs)"
plot {p99}
set title "one-way stream throughput (MB/s, higher is better)"
plot {mbs}
unset logscale y
set title "connections per second (higher is better)"
set yrange [0:*]
plot {cps}
unset multiplot
"#,
        png = png.display(),
        title = meta
            .header
            .first()
            .map_or("", |h| h.trim_start_matches("# ")),
        missing = meta
            .accel_missing
            .as_ref()
            .map_or(String::new(), |why| format!(" — accel: {why}")),
        p50 = first("p50.dat"),
        p99 = first("p99.dat"),
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
