//! The data path's maps: their sizes, their names, typed handles, and the
//! kernel memory each holds.

use std::os::fd::{AsFd, AsRawFd};

use libbpf_rs::{MapCore, MapMut};

use super::Datapath;

/// Sizes of the data-path maps (max_entries). Entries are allocated as they
/// are added (BPF_F_NO_PREALLOC), but each hash map's bucket array (16 bytes
/// per slot, rounded up to a power of two) is allocated at creation: an
/// idle daemon holds about 16 bytes per unit of every size below, 4.6 MB at
/// the defaults, plus the fixed maps (authorization, limits, km_conn_note's
/// preallocated 0.9 MB): 6.9 MB in all (`kmesh ctl dump` shows each map's
/// `memory_bytes`).
///
/// The defaults fit a node of a cluster of up to ~5,000 services and
/// ~30,000 dual-stack pods (every node holds every VIP and pod address),
/// with up to 1,024 pods per node and 32,768 concurrent accelerated
/// connections; larger clusters raise the flags.
#[derive(Debug, Clone, Copy)]
pub struct MapSizes {
    /// Service VIPs (km_vip): services x addresses, ServiceEntry VIPs too.
    pub vips: u32,
    /// Workload addresses (km_workload): every pod address in the cluster.
    pub workload_ips: u32,
    /// Service endpoints, summed over services and priorities (km_endpoint).
    pub endpoints: u32,
    /// Pods enrolled on this node (km_manage); kubelet's default max-pods
    /// is 110.
    pub enrolled_netns: u32,
    /// Workloads' own target ports where they differ from the service's
    /// (km_port).
    pub port_overrides: u32,
    /// Sockets in km_sock (both ends of each accelerated connection, and
    /// waypoint connections until their TLV is sent), and connections in
    /// km_conn.
    pub sockets: u32,
    /// Authorization tables (km_authz_verdict, km_authz_id, km_authz_port,
    /// km_authz_src each): what the policies of this node's destinations
    /// compile to (src/authz/compile.rs).
    pub authz_entries: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            vips: 16_384,
            workload_ips: 65_536,
            endpoints: 65_536,
            enrolled_netns: 1_024,
            port_overrides: 16_384,
            sockets: 65_536,
            authz_entries: 16_384,
        }
    }
}

/// Which data-path map a handle refers to; used in errors and dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapId {
    Vip,
    Workload,
    Endpoint,
    Port,
    Manage,
    Config,
    /// Sockhash of sockets the sk_msg program handles (written by sockops).
    Sock,
    /// Per-socket storage (written by the programs).
    SockState,
    /// Per-connection handshake between the two ends in km_sock (written
    /// by the programs).
    Conn,
    /// Policied destination address → its policy set and class.
    AuthzDst,
    AuthzPort,
    AuthzId,
    /// LPM trie: (set, source prefix) → source address class.
    AuthzSrc,
    AuthzVerdict,
    /// Per-CPU counters per policy index.
    AuthzCount,
    /// (service, priority) → weighted pick table (bpf/lib/lb.h).
    Lb,
    /// (service, client netns) → token bucket (made by the programs, swept
    /// by the writer).
    Bucket,
    /// Service limit id → live connection count (counted by the programs).
    SvcConns,
    /// Socket cookie → what connect4/6 noted for sockops (original
    /// destination, the service a socket counts against; bpf/lib/sock.h).
    ConnNote,
}

impl MapId {
    /// Maps the writer fills.
    pub const WRITTEN: [MapId; 14] = [
        MapId::Vip,
        MapId::Workload,
        MapId::Endpoint,
        MapId::Port,
        MapId::Manage,
        MapId::Config,
        MapId::AuthzDst,
        MapId::AuthzPort,
        MapId::AuthzId,
        MapId::AuthzSrc,
        MapId::AuthzVerdict,
        MapId::AuthzCount,
        MapId::Lb,
        MapId::Bucket,
    ];
    /// Maps that hold live sockets: they outlive the daemon (see
    /// `Datapath::shutdown`) and are reused by the next one.
    /// (The connection counts and what each socket counts against are
    /// among them: they must agree with the sockets still open.)
    pub const SOCKETS: [MapId; 5] = [
        MapId::Sock,
        MapId::SockState,
        MapId::Conn,
        MapId::SvcConns,
        MapId::ConnNote,
    ];

    /// The maps `kmesh ctl dump` and the metrics show with their entries:
    /// all but socket storage (km_sock_state has no keys to count) and the
    /// breaker's counts (the dump's traffic section shows them by service).
    pub fn shown() -> impl Iterator<Item = MapId> {
        MapId::WRITTEN
            .into_iter()
            .chain([MapId::Sock, MapId::Conn, MapId::ConnNote])
    }

    pub fn name(self) -> &'static str {
        match self {
            MapId::Vip => "km_vip",
            MapId::Workload => "km_workload",
            MapId::Endpoint => "km_endpoint",
            MapId::Port => "km_port",
            MapId::Manage => "km_manage",
            MapId::Config => "km_config",
            MapId::Sock => "km_sock",
            MapId::SockState => "km_sock_state",
            MapId::Conn => "km_conn",
            MapId::AuthzDst => "km_authz_dst",
            MapId::AuthzPort => "km_authz_port",
            MapId::AuthzId => "km_authz_id",
            MapId::AuthzSrc => "km_authz_src",
            MapId::AuthzVerdict => "km_authz_verdict",
            MapId::AuthzCount => "km_authz_count",
            MapId::Lb => "km_lb",
            MapId::Bucket => "km_bucket",
            MapId::SvcConns => "km_svc_conns",
            MapId::ConnNote => "km_conn_note",
        }
    }
}

impl Datapath {
    pub fn map(&self, id: MapId) -> &MapMut<'static> {
        let m = &self.skel.maps;
        match id {
            MapId::Vip => &m.km_vip,
            MapId::Workload => &m.km_workload,
            MapId::Endpoint => &m.km_endpoint,
            MapId::Port => &m.km_port,
            MapId::Manage => &m.km_manage,
            MapId::Config => &m.km_config,
            MapId::Sock => &m.km_sock,
            MapId::SockState => &m.km_sock_state,
            MapId::Conn => &m.km_conn,
            MapId::AuthzDst => &m.km_authz_dst,
            MapId::AuthzPort => &m.km_authz_port,
            MapId::AuthzId => &m.km_authz_id,
            MapId::AuthzSrc => &m.km_authz_src,
            MapId::AuthzVerdict => &m.km_authz_verdict,
            MapId::AuthzCount => &m.km_authz_count,
            MapId::Lb => &m.km_lb,
            MapId::Bucket => &m.km_bucket,
            MapId::SvcConns => &m.km_svc_conns,
            MapId::ConnNote => &m.km_conn_note,
        }
    }

    pub(super) fn map_mut(&mut self, id: MapId) -> &mut MapMut<'static> {
        let m = &mut self.skel.maps;
        match id {
            MapId::Vip => &mut m.km_vip,
            MapId::Workload => &mut m.km_workload,
            MapId::Endpoint => &mut m.km_endpoint,
            MapId::Port => &mut m.km_port,
            MapId::Manage => &mut m.km_manage,
            MapId::Config => &mut m.km_config,
            MapId::Sock => &mut m.km_sock,
            MapId::SockState => &mut m.km_sock_state,
            MapId::Conn => &mut m.km_conn,
            MapId::AuthzDst => &mut m.km_authz_dst,
            MapId::AuthzPort => &mut m.km_authz_port,
            MapId::AuthzId => &mut m.km_authz_id,
            MapId::AuthzSrc => &mut m.km_authz_src,
            MapId::AuthzVerdict => &mut m.km_authz_verdict,
            MapId::AuthzCount => &mut m.km_authz_count,
            MapId::Lb => &mut m.km_lb,
            MapId::Bucket => &mut m.km_bucket,
            MapId::SvcConns => &mut m.km_svc_conns,
            MapId::ConnNote => &mut m.km_conn_note,
        }
    }

    /// Kernel memory the map holds, as the kernel charges it (fdinfo
    /// `memlock`): for hash maps mostly the bucket array, allocated at
    /// creation from max_entries even when empty.
    pub fn memlock(&self, id: MapId) -> u64 {
        fd_memlock(self.map(id).as_fd().as_raw_fd())
    }

    /// `memlock` summed over every map of the data path, the stats and
    /// settings arrays included.
    pub fn memlock_total(&self) -> u64 {
        let m = &self.skel.maps;
        MapId::WRITTEN
            .into_iter()
            .chain(MapId::SOCKETS)
            .map(|id| self.memlock(id))
            .chain([fd_memlock(m.km_stats.as_fd().as_raw_fd())])
            .sum()
    }

    pub fn capacity(&self, id: MapId) -> u32 {
        self.map(id).max_entries()
    }
}

/// The `memlock:` line of /proc/self/fdinfo/FD (0 if missing).
fn fd_memlock(fd: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
