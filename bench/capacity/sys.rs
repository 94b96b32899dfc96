//! Readings from /proc: memory, slab caches, a process's RSS, a netns's
//! TCP sockets. A reading that cannot be taken is reported as 0 rather
//! than ending the benchmark (and its clean-up) halfway.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
};

/// /proc/meminfo, in kB.
pub fn meminfo() -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.to_string(), v.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// Slab cache → (objects, bytes) from /proc/slabinfo.
pub fn slabs() -> BTreeMap<String, (u64, u64)> {
    let text = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let objs: u64 = f.get(2)?.parse().ok()?;
            let size: u64 = f.get(3)?.parse().ok()?;
            Some((f[0].to_string(), (objs, objs * size)))
        })
        .collect()
}

/// The caches that grew most between two `slabs()` readings:
/// (name, objects added, bytes added), largest first.
pub fn slab_growth(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    top: usize,
) -> Vec<(String, i64, i64)> {
    let mut v: Vec<(String, i64, i64)> = after
        .iter()
        .map(|(k, &(o, b))| {
            let (o0, b0) = before.get(k).copied().unwrap_or_default();
            (k.clone(), o as i64 - o0 as i64, b as i64 - b0 as i64)
        })
        .filter(|x| x.2 > 0)
        .collect();
    v.sort_by_key(|x| -x.2);
    v.truncate(top);
    v
}

/// VmRSS of `pid` in kB.
pub fn rss_kb(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// TCP sockets in use in `pid`'s netns, and the kernel's TCP buffer memory
/// in pages (global: the `mem` field is not per namespace).
pub fn tcp_sockstat(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/sockstat")).unwrap_or_default();
    let line = text.lines().find(|l| l.starts_with("TCP:")).unwrap_or("");
    let f: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| -> u64 {
        f.iter()
            .position(|x| *x == name)
            .and_then(|i| f.get(i + 1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("inuse"), field("mem"))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM only set a flag; `checkpoint` then panics between steps
/// so that unwinding runs the Drop guards (daemon, namespaces, cgroups),
/// which the default action (exit at once) would skip.
pub fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe);
        // exec resets it to the default in children.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn checkpoint() {
    assert!(
        !STOP.load(Ordering::SeqCst),
        "interrupted by a signal: cleaning up"
    );
}
