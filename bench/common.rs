//! Helpers both benchmark programs (suite, capacity) use.

use std::process::Command;

/// A command's trimmed stdout, empty if it cannot run (for report headers).
pub fn sh_out(argv: &[&str]) -> String {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The last CPU, unless told otherwise: everything measured shares it, so
/// a round trip never depends on where the scheduler put client and server.
pub fn cpu() -> Option<usize> {
    match std::env::var("KMESH_BENCH_CPU").as_deref() {
        Ok("none") => None,
        Ok(n) => Some(n.parse().expect("KMESH_BENCH_CPU: a CPU number or none")),
        Err(_) => std::thread::available_parallelism()
            .ok()
            .map(|n| n.get() - 1),
    }
}
