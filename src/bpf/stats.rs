//! The data path's counters (km_stats) and the kernel's run-time
//! accounting of its programs.

use std::os::fd::AsRawFd;

use libbpf_rs::MapCore;

use super::Datapath;

/// Names of km_stats' counters, in the order of enum kmesh_stat
/// (bpf/include/kmesh.h).
pub const STAT_NAMES: [&str; 27] = [
    "enrolled_connect",
    "service_redirect",
    "workload_direct",
    "no_endpoint",
    "strict_reject",
    "family_mismatch",
    "port_miss",
    "waypoint_redirect",
    "tlv_sent",
    "tlv_failed",
    "accel_added",
    "accel_full",
    "accel_on",
    "accel_off",
    "accel_pushback",
    "accel_left",
    "accel_skipped",
    "authz_allow",
    "authz_deny",
    "authz_deny_connect",
    "authz_dry_run_deny",
    "authz_event_lost",
    "authz_cut",
    "telemetry_events_lost",
    "breaker_reject",
    "rate_limited",
    "conn_note_full",
];

/// km_stats counters the daemon keeps (the programs never write them).
pub const STAT_AUTHZ_CUT: u32 = 22;

/// Element `idx` of a per-CPU array of u64, summed over CPUs (0 if it
/// cannot be read).
pub fn percpu_sum(map: &impl MapCore, idx: u32) -> u64 {
    map.lookup_percpu(&idx.to_ne_bytes(), libbpf_rs::MapFlags::ANY)
        .ok()
        .flatten()
        .map_or(0, |cpus| {
            cpus.iter()
                .filter_map(|v| {
                    v.get(..8)
                        .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
                })
                .sum()
        })
}

impl Datapath {
    /// Adds `n` to a counter only the daemon writes (on CPU 0's slot).
    pub fn add_daemon_stat(&self, idx: u32, n: u64) {
        let map = &self.skel.maps.km_stats;
        let key = idx.to_ne_bytes();
        let Ok(Some(mut cpus)) = map.lookup_percpu(&key, libbpf_rs::MapFlags::ANY) else {
            return;
        };
        if let Some(first) = cpus.first_mut().filter(|v| v.len() >= 8) {
            let now = u64::from_ne_bytes(first[..8].try_into().unwrap()) + n;
            first[..8].copy_from_slice(&now.to_ne_bytes());
            let _ = map.update_percpu(&key, &cpus, libbpf_rs::MapFlags::ANY);
        }
    }

    /// Per-counter sums over CPUs of the data path's stats array.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let map = &self.skel.maps.km_stats;
        STAT_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, percpu_sum(map, i as u32)))
            .collect()
    }

    /// Kernel-side run statistics of each program: (name, runs, total ns).
    /// Counted only while a `RunStatsGuard` is alive somewhere on the host.
    pub fn run_stats(&self) -> Vec<ProgRunStats> {
        use std::os::fd::AsFd;
        let p = &self.skel.progs;
        [
            ("connect4", p.kmesh_connect4.as_fd().as_raw_fd()),
            ("connect6", p.kmesh_connect6.as_fd().as_raw_fd()),
            ("authz_lookup", p.kmesh_authz_lookup.as_fd().as_raw_fd()),
        ]
        .into_iter()
        .chain(
            self.kernel
                .socket_programs()
                .then(|| {
                    [
                        ("sockops", self.sockops_prog().as_fd().as_raw_fd()),
                        ("sendmsg", self.sendmsg_prog().as_fd().as_raw_fd()),
                    ]
                })
                .into_iter()
                .flatten(),
        )
        .chain(
            self.tele_link
                .is_some()
                .then(|| ("tele_state", self.tele_prog().as_fd().as_raw_fd())),
        )
        .filter_map(|(name, fd)| {
            let mut info = libbpf_sys::bpf_prog_info::default();
            let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
            // SAFETY: fd is a live program fd; info/len describe a valid buffer.
            let rc = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd, &mut info, &mut len) };
            (rc == 0).then_some(ProgRunStats {
                prog: name,
                runs: info.run_cnt,
                run_time_ns: info.run_time_ns,
            })
        })
        .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgRunStats {
    pub prog: &'static str,
    pub runs: u64,
    pub run_time_ns: u64,
}

/// Keeps the kernel's BPF run-time accounting (BPF_STATS_RUN_TIME) on while
/// alive. It costs two clock reads per program run, so it is off by default.
pub struct RunStatsGuard {
    _fd: std::os::fd::OwnedFd,
}

impl RunStatsGuard {
    pub fn enable() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall wrapper; a non-negative result is a new fd we own.
        let fd = unsafe { libbpf_sys::bpf_enable_stats(libbpf_sys::BPF_STATS_RUN_TIME) };
        if fd < 0 {
            return Err(std::io::Error::from_raw_os_error(-fd));
        }
        // SAFETY: fd was just returned to us and is owned by nobody else.
        Ok(RunStatsGuard {
            _fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }
}
