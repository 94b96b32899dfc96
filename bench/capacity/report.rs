//! The capacity benchmark's Markdown report: one column per daemon mode.

use std::fmt::Write as _;

use serde_json::Value;

/// One mode's measurements (main.rs `run`).
pub struct Run {
    pub mode: &'static str,
    pub opened: u64,
    pub open_failed: u64,
    pub open_errors: Vec<String>,
    pub open_secs: f64,
    pub held_entries: u64,
    /// accel_added, accel_full, accel_on, accel_off, accel_left during the
    /// big hold (as it is taken, before the echo over all).
    pub accel: [u64; 5],
    pub check_ok: u64,
    pub check_failed: u64,
    pub check_secs: f64,
    /// Daemon RSS in kB with a few, then all, connections held.
    pub daemon_rss_kb: (u64, u64),
    pub dump_secs: f64,
    pub hold_rss_kb: u64,
    pub server_rss_kb: u64,
    pub hold_procs: usize,
    pub slab_kb: i64,
    pub unreclaimable_kb: i64,
    pub avail_drop_kb: i64,
    pub tcp_inuse: (u64, u64),
    pub drain_secs: f64,
    pub closed_ok: bool,
    /// Round trips: over held connections with few / all held, then on a
    /// fresh connection with few / all held.
    pub rr: [Value; 4],
    /// (cache, objects allocated, bytes), largest growth first.
    pub slabs: Vec<(String, i64, i64)>,
}

impl Run {
    pub fn ok(&self, n: usize) -> bool {
        let n = n as u64;
        let accel = self.mode == "accelerated";
        self.opened == n
            && self.check_failed == 0
            && self.closed_ok
            // A client that sent before its server's end entered stays on
            // TCP and leaves the map; every other end must be in it.
            && (!accel || self.held_entries + self.accel[4] == 2 * n)
    }
}

fn mib(kb: i64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

pub fn markdown(header: &str, notes: &[String], n: usize, runs: &[Run]) -> String {
    let per_conn = |kb: i64| format!("{:.0} B", kb as f64 * 1024.0 / n as f64);
    let mut md = String::new();
    let _ = writeln!(md, "{header}\n");
    let _ = write!(md, "| measurement |");
    for r in runs {
        let _ = write!(md, " {} |", r.mode);
    }
    let _ = writeln!(md, "\n|---|{}", "---|".repeat(runs.len()));
    let mut row = |k: &str, f: &dyn Fn(&Run) -> String| {
        let _ = write!(md, "| {k} |");
        for r in runs {
            let _ = write!(md, " {} |", f(r));
        }
        let _ = writeln!(md);
    };
    row("connections opened / failed", &|r| {
        format!("{} / {}", r.opened, r.open_failed)
    });
    row("time to open all, each checked with an echo", &|r| {
        format!(
            "{:.2} s ({:.0}/s)",
            r.open_secs,
            r.opened as f64 / r.open_secs
        )
    });
    row("km_sock entries while held", &|r| {
        r.held_entries.to_string()
    });
    row(
        "accel_added / accel_full / accel_on / accel_off / accel_left",
        &|r| {
            let [a, f, on, off, left] = r.accel;
            format!("{a} / {f} / {on} / {off} / {left}")
        },
    );
    row(&format!("echo over all {n} again while held"), &|r| {
        format!(
            "{} ok, {} failed, {:.2} s",
            r.check_ok, r.check_failed, r.check_secs
        )
    });
    row("daemon RSS, few / all held", &|r| {
        format!(
            "{} / {}",
            mib(r.daemon_rss_kb.0 as i64),
            mib(r.daemon_rss_kb.1 as i64)
        )
    });
    row("`kmesh ctl dump` with all held", &|r| {
        format!("{:.2} s", r.dump_secs)
    });
    row("RSS of the hold clients / echo servers", &|r| {
        format!(
            "{} / {} ({} clients)",
            mib(r.hold_rss_kb as i64),
            mib(r.server_rss_kb as i64),
            r.hold_procs
        )
    });
    row("kernel slab growth", &|r| {
        format!("{}, {} per connection", mib(r.slab_kb), per_conn(r.slab_kb))
    });
    row("of which unreclaimable", &|r| {
        format!(
            "{}, {} per connection",
            mib(r.unreclaimable_kb),
            per_conn(r.unreclaimable_kb)
        )
    });
    row("MemAvailable drop (kernel + all processes)", &|r| {
        format!(
            "{}, {} per connection",
            mib(r.avail_drop_kb),
            per_conn(r.avail_drop_kb)
        )
    });
    row("TCP sockets in use, client / server netns", &|r| {
        format!("{} / {}", r.tcp_inuse.0, r.tcp_inuse.1)
    });
    row("km_sock empty again after closing all", &|r| {
        format!(
            "{:.2} s{}",
            r.drain_secs,
            if r.closed_ok { "" } else { " (clients failed)" }
        )
    });
    let f = |v: &Value, k: &str| format!("{:.1}", v[k].as_f64().unwrap_or(f64::NAN));
    let samples = [
        "held connections, few held",
        "held connections, all held",
        "fresh connection, few held",
        "fresh connection, all held",
    ];
    for (i, name) in samples.iter().enumerate() {
        row(&format!("RR p50 / p99 µs: {name}"), &|r| {
            format!("{} / {}", f(&r.rr[i], "p50_us"), f(&r.rr[i], "p99_us"))
        });
    }
    for note in notes {
        let _ = writeln!(md, "\n{note}");
    }
    for r in runs {
        let _ = writeln!(
            md,
            "\nSlab caches that grew most with all held, {} (objects allocated, including free slots in their slabs):\n\n| cache | objects | MiB |\n|---|---|---|",
            r.mode
        );
        for (name, objs, bytes) in &r.slabs {
            let _ = writeln!(md, "| {name} | {objs} | {:.1} |", *bytes as f64 / 1048576.0);
        }
        if !r.open_errors.is_empty() {
            let _ = writeln!(
                md,
                "\nopen errors (first of each kind): {:?}",
                r.open_errors
            );
        }
    }
    md
}
