//! Loading, attaching and pinning the BPF data path, plus typed access to its
//! maps. Only `crate::writer` and `crate::admin` use the map handles.

use std::{
    collections::VecDeque,
    fs,
    mem::MaybeUninit,
    path::{Path, PathBuf},
    sync::Mutex,
};

use libbpf_rs::{
    skel::{OpenSkel, SkelBuilder},
    Link, MapCore, OpenObject, PrintLevel,
};
use thiserror::Error;

#[allow(
    clippy::all,
    clippy::pedantic,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    unused_imports,
    unsafe_op_in_unsafe_fn
)]
pub mod skel {
    include!(concat!(env!("OUT_DIR"), "/kmesh.skel.rs"));
}

mod attach;
mod features;
mod lookup;
mod maps;
pub mod netns;
mod pins;
mod stats;
mod types;
pub use attach::is_bpffs;
pub use features::{kernel_counts_psock_bytes, Features, KernelSupport};
pub use maps::{MapId, MapSizes};
pub use stats::{percpu_sum, ProgRunStats, RunStatsGuard, STAT_AUTHZ_CUT, STAT_NAMES};
pub use types::*;

pub use skel::types::{
    addr_key, authz_class, authz_dst, authz_id_key, authz_port_key, authz_src_key, authz_verdict,
    authz_verdict_key, backend_addr, bucket_key, config_value, conn_note, endpoint_key,
    endpoint_value, kmesh_addr, lb_key, lb_table, limit_id, manage_value, port_key, service_value,
    sock_key, sock_state, svc_conns, waypoint, workload_value,
};

/// Mirrors the enums in bpf/include/kmesh.h (enums carry no BTF type through
/// the skeleton, so their values are restated here and checked by tests that
/// drive the programs).
pub const MAX_PRIO: usize = 7;
pub const MAX_PORTS: usize = 10;
pub const NETNS_WAYPOINT: u32 = 1;
pub const EP_PORTS: u32 = 1;
/// KMESH_LB_SLOTS: entries of a weighted priority's pick table.
pub const LB_SLOTS: usize = 1024;
#[derive(Debug, Error)]
pub enum BpfError {
    #[error("loading BPF object: {source}{}", verifier_tail())]
    Load { source: libbpf_rs::Error },
    #[error("setting max_entries of {map} to {value}: {source}")]
    Size {
        map: &'static str,
        value: u32,
        source: libbpf_rs::Error,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("attaching {prog} to cgroup {path}: {source}")]
    Attach {
        prog: &'static str,
        path: PathBuf,
        source: libbpf_rs::Error,
    },
    #[error("{path} is not on a bpf filesystem (mount one with: mount -t bpf bpf {path})")]
    NotBpffs { path: PathBuf },
    #[error("pinning under {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
}

/// Loaded (not necessarily attached) data path. Dropping it detaches
/// links that are not pinned; pinned ones stay (see `shutdown`).
pub struct Datapath {
    skel: skel::KmeshSkel<'static>,
    links: Vec<(&'static str, Link)>,
    /// Telemetry's tracepoint program, where it runs.
    tele_link: Option<Link>,
    pin_dir: Option<PathBuf>,
    /// Where `attach` put the programs, kept open so sockops can follow.
    cgroup: Option<(PathBuf, fs::File)>,
    sockops_wanted: bool,
    kernel: KernelSupport,
    netns_links: lookup::NetnsLinks,
}

// libbpf logs arrive through a C callback; the tail is kept so a verifier
// rejection (EACCES/EINVAL from load) carries the log in its error message.
static LOG_TAIL: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());
const LOG_TAIL_LINES: usize = 40;

fn libbpf_print(level: PrintLevel, msg: String) {
    let msg = msg.trim_end().to_string();
    match level {
        PrintLevel::Warn => tracing::warn!(target: "libbpf", "{msg}"),
        PrintLevel::Info => tracing::debug!(target: "libbpf", "{msg}"),
        PrintLevel::Debug => tracing::trace!(target: "libbpf", "{msg}"),
    }
    let mut tail = LOG_TAIL.lock().unwrap_or_else(|e| e.into_inner());
    if tail.len() == LOG_TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(msg);
}

fn verifier_tail() -> String {
    let tail = LOG_TAIL.lock().unwrap_or_else(|e| e.into_inner());
    if tail.is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
    format!("\nlibbpf/verifier log (last lines):\n{}", lines.join("\n"))
}

/// Tells the programs what this kernel can run (read-only constants the
/// verifier uses to skip what it cannot), and loads sockops/sk_msg only
/// where they can run.
fn set_features(open: &mut skel::OpenKmeshSkel<'static>, kernel: &KernelSupport) {
    let socket = kernel.socket_programs();
    if let Some(ro) = open.maps.rodata_data.as_deref_mut() {
        ro.km_feat_accel = u32::from(socket && kernel.acceleration.is_none());
        ro.km_feat_netns_helper = u32::from(kernel.features.netns_cookie_in_sockops);
        ro.km_feat_probe_read = u32::from(kernel.features.probe_read_in_sockops);
        ro.km_feat_tlv = u32::from(socket);
        ro.km_feat_telemetry = u32::from(kernel.telemetry_on);
    }
    // One of each pair (see bpf/kmesh.bpf.c): the TLV-only variants hold no
    // atomics, which kernels before 5.12 refuse in any program they load.
    let accel = socket && kernel.acceleration.is_none();
    let p = &mut open.progs;
    p.kmesh_sockops.set_autoload(accel);
    p.kmesh_sendmsg.set_autoload(accel);
    p.kmesh_sockops_tlv.set_autoload(socket && !accel);
    p.kmesh_sendmsg_tlv.set_autoload(socket && !accel);
    // Tracing programs may read socket storage (the accelerated bytes)
    // from 5.11; acceleration needs 5.12. (As tele_prog picks.)
    let accel_bytes = kernel.acceleration.is_none();
    p.kmesh_tele_state
        .set_autoload(kernel.telemetry_on && accel_bytes);
    p.kmesh_tele_state_plain
        .set_autoload(kernel.telemetry_on && !accel_bytes);
}

/// Telemetry's tracepoint program: the variant set_features loaded.
fn tele_prog<'a>(
    skel: &'a skel::KmeshSkel<'static>,
    kernel: &KernelSupport,
) -> &'a libbpf_rs::ProgramMut<'static> {
    if kernel.acceleration.is_none() {
        &skel.progs.kmesh_tele_state
    } else {
        &skel.progs.kmesh_tele_state_plain
    }
}

impl Datapath {
    /// Opens and loads the programs with the given map sizes. Nothing is
    /// attached yet.
    pub fn load(sizes: MapSizes) -> Result<Self, BpfError> {
        Self::load_reusing(sizes, None)
    }

    /// Like `load`, but takes over the socket maps a previous daemon left
    /// pinned under `pins`, so its accelerated and waypoint connections keep
    /// their state (a new, empty map would drop them to plain TCP and lose
    /// bytes queued for a reader).
    pub fn load_reusing(sizes: MapSizes, pins: Option<&Path>) -> Result<Self, BpfError> {
        Self::load_with(sizes, pins, None)
    }

    /// Like `load_reusing`, with connection telemetry on where `telemetry`
    /// gives its ring buffer's size in bytes (a power of two, at least a
    /// page) and the kernel can run it.
    pub fn load_with(
        sizes: MapSizes,
        pins: Option<&Path>,
        telemetry: Option<u32>,
    ) -> Result<Self, BpfError> {
        libbpf_rs::set_print(Some((PrintLevel::Debug, libbpf_print)));
        LOG_TAIL.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let features = Features::probe();
        let mut kernel = KernelSupport::new(features);
        kernel.want_telemetry(telemetry.is_some());
        // Each refusal turns off what the kernel may not run and loads
        // again: telemetry first (its tracepoint program), then the
        // sockops/sk_msg programs, which an unknown kernel may refuse for
        // a reason no probe asked about (connect redirect runs without);
        // telemetry gets another try without those. At most four loads.
        let mut tele_refused = false;
        let (skel, tele_link) = loop {
            // The skeleton borrows its OpenObject for its whole life; the
            // daemon holds one data path for the process lifetime, so the
            // few words of storage are leaked rather than tied into a
            // self-referential struct.
            let storage: &'static mut MaybeUninit<OpenObject> =
                Box::leak(Box::new(MaybeUninit::uninit()));
            let mut open = Self::open(storage, sizes, pins, telemetry)?;
            set_features(&mut open, &kernel);
            let skel = match open.load() {
                Ok(skel) => skel,
                Err(source) if kernel.telemetry_on => {
                    let reason = format!("the kernel refused its tracepoint program: {source}");
                    tracing::debug!("{reason}{}", verifier_tail());
                    kernel.without_telemetry(reason);
                    tele_refused = true;
                    continue;
                }
                Err(source) if kernel.waypoints.is_none() => {
                    let reason =
                        format!("the kernel refused the sockops/sk_msg programs: {source}");
                    tracing::debug!("{reason}{}", verifier_tail());
                    kernel.without_socket_programs(reason);
                    if std::mem::take(&mut tele_refused) {
                        kernel.want_telemetry(telemetry.is_some());
                    }
                    continue;
                }
                Err(source) => return Err(BpfError::Load { source }),
            };
            if !kernel.telemetry_on {
                break (skel, None);
            }
            // Global, unlike the cgroup programs: the tracepoint fires for
            // every TCP socket's state changes, and the program reports
            // only those of enrolled netns. Not pinned: without a daemon
            // nothing would read the events.
            match tele_prog(&skel, &kernel).attach() {
                Ok(link) => break (skel, Some(link)),
                Err(e) => kernel.without_telemetry(format!(
                    "attaching its program to the inet_sock_set_state tracepoint: {e}"
                )),
            }
        };
        kernel.log();
        Ok(Datapath {
            skel,
            links: Vec::new(),
            tele_link,
            pin_dir: None,
            cgroup: None,
            sockops_wanted: false,
            kernel,
            netns_links: Default::default(),
        })
    }

    /// Opens the object with map sizes set and the pinned socket maps of a
    /// previous daemon reused.
    fn open(
        storage: &'static mut MaybeUninit<OpenObject>,
        sizes: MapSizes,
        pins: Option<&Path>,
        telemetry: Option<u32>,
    ) -> Result<skel::OpenKmeshSkel<'static>, BpfError> {
        let mut open = skel::KmeshSkelBuilder::default()
            .open(storage)
            .map_err(|source| BpfError::Load { source })?;
        let m = &mut open.maps;

        for (map, name, value) in [
            (&mut m.km_vip, "km_vip", sizes.vips),
            (&mut m.km_workload, "km_workload", sizes.workload_ips),
            (&mut m.km_endpoint, "km_endpoint", sizes.endpoints),
            (&mut m.km_port, "km_port", sizes.port_overrides),
            (&mut m.km_manage, "km_manage", sizes.enrolled_netns),
            (&mut m.km_sock, "km_sock", sizes.sockets),
            (&mut m.km_conn, "km_conn", sizes.sockets),
            (
                &mut m.km_authz_dst,
                "km_authz_dst",
                sizes.enrolled_netns.saturating_mul(4),
            ),
            (&mut m.km_authz_port, "km_authz_port", sizes.authz_entries),
            (&mut m.km_authz_id, "km_authz_id", sizes.authz_entries),
            (&mut m.km_authz_src, "km_authz_src", sizes.authz_entries),
            (
                &mut m.km_authz_verdict,
                "km_authz_verdict",
                sizes.authz_entries,
            ),
            // Off: the smallest ring (one page), never written.
            (
                &mut m.km_tele_events,
                "km_tele_events",
                telemetry.unwrap_or(4096),
            ),
        ] {
            map.set_max_entries(value)
                .map_err(|source| BpfError::Size {
                    map: name,
                    value,
                    source,
                })?;
        }
        if let Some(dir) = pins {
            for (map, name) in [
                (&mut m.km_sock, "km_sock"),
                (&mut m.km_sock_state, "km_sock_state"),
                (&mut m.km_conn, "km_conn"),
                (&mut m.km_svc_conns, "km_svc_conns"),
                (&mut m.km_conn_note, "km_conn_note"),
            ] {
                let path = dir.join(name);
                if !path.exists() {
                    continue;
                }
                match map.reuse_pinned_map(&path) {
                    // A reused map keeps the size it was made with: say so
                    // when --max-sockets asked for another (resizing would
                    // drop the live sockets it holds).
                    Ok(())
                        if matches!(name, "km_sock" | "km_conn")
                            && map.max_entries() != sizes.sockets =>
                    {
                        tracing::warn!(
                            "reusing {} (live sockets kept) with its {} entries: --max-sockets {} \
                             takes effect at a start that finds no socket map pinned",
                            path.display(),
                            map.max_entries(),
                            sizes.sockets
                        )
                    }
                    Ok(()) => tracing::info!("reusing {} (live sockets kept)", path.display()),
                    Err(e) => tracing::warn!(
                        "{} cannot be reused ({e}); its sockets fall back to plain TCP",
                        path.display()
                    ),
                }
            }
        }
        Ok(open)
    }

    /// The loaded sockops program: with acceleration where the kernel can
    /// run it, else the TLV-only variant.
    fn sockops_prog(&self) -> &libbpf_rs::ProgramMut<'static> {
        let p = &self.skel.progs;
        if self.kernel.acceleration.is_none() {
            &p.kmesh_sockops
        } else {
            &p.kmesh_sockops_tlv
        }
    }

    fn sendmsg_prog(&self) -> &libbpf_rs::ProgramMut<'static> {
        let p = &self.skel.progs;
        if self.kernel.acceleration.is_none() {
            &p.kmesh_sendmsg
        } else {
            &p.kmesh_sendmsg_tlv
        }
    }

    fn tele_prog(&self) -> &libbpf_rs::ProgramMut<'static> {
        tele_prog(&self.skel, &self.kernel)
    }

    /// The ring buffer of connection events (struct tele_event).
    pub fn telemetry_events(&self) -> &libbpf_rs::MapMut<'static> {
        &self.skel.maps.km_tele_events
    }

    /// What this kernel runs of the data path (for the dump).
    pub fn kernel(&self) -> &KernelSupport {
        &self.kernel
    }

    /// Removes km_conn entries whose connection has neither end in km_sock:
    /// no program reads them again, and those of connections that closed
    /// while no sockops was attached (between daemons) would otherwise stay
    /// for good. A connecting end enters km_sock before its entry is made,
    /// so a connection being set up is never swept. Returns how many went.
    pub fn sweep_conns(&self) -> usize {
        let m = &self.skel.maps;
        let in_map = |k: &sock_key| {
            m.km_sock
                .lookup(k.as_bytes(), libbpf_rs::MapFlags::ANY)
                .ok()
                .flatten()
                .is_some()
        };
        let stale: Vec<Vec<u8>> = m
            .km_conn
            .keys()
            .filter(|raw| {
                sock_key::from_bytes(raw).is_some_and(|k| !in_map(&k) && !in_map(&k.mirror()))
            })
            .collect();
        stale
            .iter()
            .filter(|raw| m.km_conn.delete(raw).is_ok())
            .count()
    }

    /// Entries in km_sock (each end of an accelerated connection counts).
    pub fn socket_count(&self) -> usize {
        self.skel.maps.km_sock.keys().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psock_byte_count_matches_the_probe() {
        // 6.18 has the field (6.1 does not); acceleration depends on it.
        let has = kernel_counts_psock_bytes();
        assert_eq!(has, Features::probe().psock_queue_length);
        if !has {
            println!("SKIP: no sk_psock.msg_tot_len on this kernel");
        }
    }

    /// The default sizes' kernel memory, idle: the bucket arrays, and
    /// km_conn_note's preallocated 0.9 MB. (18.6 MB before the defaults
    /// were sized for a node.)
    #[test]
    fn default_sizes_hold_under_seven_megabytes_idle() {
        let dp = Datapath::load(MapSizes::default()).unwrap_or_else(|e| panic!("{e}"));
        for id in MapId::WRITTEN.into_iter().chain(MapId::SOCKETS) {
            println!("{}: {} bytes", id.name(), dp.memlock(id));
        }
        let total = dp.memlock_total();
        println!("total: {total} bytes");
        assert!(total > 1_000_000, "memlock not read: {total}");
        assert!(total < 7_000_000, "{total} bytes at default sizes");
    }

    #[test]
    fn loads_and_sizes_maps() {
        let sizes = MapSizes {
            vips: 100,
            workload_ips: 20,
            endpoints: 50,
            enrolled_netns: 5,
            port_overrides: 7,
            sockets: 64,
            authz_entries: 32,
        };
        let dp = Datapath::load(sizes).unwrap_or_else(|e| panic!("{e}"));
        // What the probes promise, the load delivers (kernels.sh runs this
        // in every guest): no program refused for a reason none foresaw.
        let k = dp.kernel();
        println!("{k:?}");
        assert_eq!(
            k.waypoints.as_deref(),
            k.features.waypoints_unavailable(),
            "{}",
            verifier_tail()
        );
        assert_eq!(dp.capacity(MapId::Vip), 100);
        assert_eq!(dp.capacity(MapId::Manage), 5);
        assert!(dp.stats().iter().all(|(_, v)| *v == 0));
    }
}
