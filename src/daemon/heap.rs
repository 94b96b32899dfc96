//! Giving freed heap back to the system: the daemon's RSS after large
//! xDS responses and under churn (bench/xds_scale.rs).

use std::time::Duration;

/// Makes glibc keep one malloc arena for the whole process (and map large
/// blocks apart); call before any thread starts. By default each thread gets its own, and the xDS task
/// moves between tokio workers: after two full resends of 100k workloads
/// (an istiod reconnect sends everything again) the arenas it had used held
/// 53 MB resident against 29 MB with one arena, because malloc_trim does
/// not give back the free top of a thread's arena. The daemon allocates
/// little in parallel, so one arena costs it nothing measurable.
pub fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        // Blocks of 1 MiB and more (the writer's and store's tables at
        // 100k entries) are mapped on their own, so one freed by a rebuild
        // goes back at once instead of staying resident until the next
        // trim (it showed as a 1 MB spike in the churn's RSS max). Set, it
        // also stops glibc from raising the threshold after such a free.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// How long after an incremental apply the memory it freed is given back:
/// off every update's path (the trim waits for the main loop to be free),
/// and under steady churn once a second, so what is resident between trims
/// stays small.
pub(super) const TRIM_AFTER: Duration = Duration::from_secs(1);

/// How soon after the verdict on a large xDS response the heap is trimmed
/// again: the client frees that response's name set (1.2 MB at 110k
/// resources) only once it has the verdict, after the apply's own trim,
/// and that much stayed resident until the next trim (measured: the
/// resend's growth and part of the loaded daemon's RSS).
pub(super) const TRIM_AFTER_VERDICT: Duration = Duration::from_millis(100);

/// Gives free heap pages back; `log` reports the heap (info; else debug,
/// as the trims during churn would flood the log).
pub(super) fn trim_heap(log: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists;
    // mallinfo2 only reads its counters.
    unsafe {
        libc::malloc_trim(0);
        if !log && !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let mi = libc::mallinfo2();
        let heap = format!(
            "{:.1} MB in use, {:.1} MB free in arenas, {:.1} MB mmapped",
            mi.uordblks as f64 / 1e6,
            mi.fordblks as f64 / 1e6,
            mi.hblkhd as f64 / 1e6
        );
        if log {
            tracing::info!("heap: {heap}");
        } else {
            tracing::debug!("heap: {heap}");
        }
    }
}
