//! Authorization at run time, beside the map writer: the denial log (from
//! the data path's ring buffer) and closing live connections a policy
//! change now denies.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    authz::{self, Conn, Identity},
    bpf::kmesh_addr,
    model::{canonical, Layers, Workload},
    sockdiag::{self, TcpSock},
    writer::MapWriter,
};

/// Denials logged per second at most; the rest are counted in one line.
const LOG_PER_SECOND: u32 = 20;

/// One denial as the data path reports it (struct authz_event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub policy: u32,
    pub at_connect: bool,
    pub src: IpAddr,
    pub dst: SocketAddr,
}

impl Denial {
    pub fn parse(b: &[u8]) -> Option<Denial> {
        let u32_at = |o: usize| Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?));
        let addr_at = |o: usize| kmesh_addr::ip_at(b, o);
        Some(Denial {
            policy: u32_at(0)?,
            at_connect: u32_at(4)? != 0,
            src: addr_at(8)?,
            dst: SocketAddr::new(addr_at(24)?, u32_at(40)? as u16),
        })
    }
}

/// Logs each denial the data path reports, one line naming the policy,
/// source and destination, at most LOG_PER_SECOND a second.
pub fn spawn_denial_log(writer: Arc<Mutex<MapWriter>>) -> Result<(), String> {
    let map = {
        let w = writer.lock().unwrap_or_else(|e| e.into_inner());
        libbpf_rs::MapHandle::try_from(w.datapath().authz_events()).map_err(|e| e.to_string())?
    };
    std::thread::Builder::new()
        .name("authz-log".into())
        .spawn(move || {
            let (mut window, mut logged, mut dropped) = (Instant::now(), 0u32, 0u64);
            let mut builder = libbpf_rs::RingBufferBuilder::new();
            let cb = |data: &[u8]| -> i32 {
                if window.elapsed() >= Duration::from_secs(1) {
                    if dropped > 0 {
                        tracing::warn!("authz: {dropped} more denials not logged");
                    }
                    (window, logged, dropped) = (Instant::now(), 0, 0);
                }
                let Some(d) = Denial::parse(data) else {
                    return 0;
                };
                if logged >= LOG_PER_SECOND {
                    dropped += 1;
                    return 0;
                }
                logged += 1;
                let w = writer.lock().unwrap_or_else(|e| e.into_inner());
                let by = match w.policy_key(d.policy) {
                    Some(k) => format!("policy {k}"),
                    None => "no ALLOW policy matched".to_string(),
                };
                let at = if d.at_connect {
                    "at connect"
                } else {
                    "at the destination"
                };
                tracing::warn!("authz: denied {} -> {} ({by}, {at})", d.src, d.dst);
                0
            };
            if let Err(e) = builder.add(&map, cb) {
                tracing::error!("authz: denial log unavailable: {e}");
                return;
            }
            let rb = match builder.build() {
                Ok(rb) => rb,
                Err(e) => {
                    tracing::error!("authz: denial log unavailable: {e}");
                    return;
                }
            };
            loop {
                if let Err(e) = rb.poll(Duration::from_millis(500)) {
                    if e.kind() != libbpf_rs::ErrorKind::Interrupted {
                        tracing::error!("authz: denial log stopped: {e}");
                        return;
                    }
                }
            }
        })
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Closes the established connections into this node's destinations that
/// the policies now deny (a policy pushed or reloaded, a source's identity
/// changed), in every enrolled netns; returns how many, and one line per
/// netns that could not be swept.
pub fn cut_denied(model: Layers) -> (usize, Vec<String>) {
    let store = model.policy_store();
    if store.is_empty() {
        return (0, Vec::new());
    }
    // Destination address → the workload; source address → identity.
    let mut dsts: HashMap<IpAddr, &Workload> = HashMap::new();
    let mut ids: HashMap<IpAddr, Identity> = HashMap::new();
    let local = model.enrolled_addresses();
    for w in model.workloads().filter(|w| !w.host_network) {
        for a in w.addresses.iter().map(|a| canonical(*a)) {
            if local.contains(&a) {
                dsts.insert(a, w);
            }
            ids.insert(a, w.identity());
        }
    }
    let denied = |sk: &TcpSock| -> bool {
        if !sk.inbound {
            return false;
        }
        let Some(w) = dsts.get(&sk.local.ip()) else {
            return false;
        };
        let conn = Conn {
            src: sk.remote.ip(),
            dst: sk.local.ip(),
            dst_port: sk.local.port(),
            src_identity: ids.get(&sk.remote.ip()),
        };
        !authz::decide(store.applicable(w.namespace(), w.policies()), &conn)
            .verdict
            .allowed()
    };
    let (mut cut, mut errors) = (0, Vec::new());
    for e in model.enrolled().values() {
        if !e.addrs.iter().any(|a| dsts.contains_key(&canonical(*a))) {
            continue;
        }
        let f = match std::fs::File::open(&e.source) {
            Ok(f) => f,
            Err(err) => {
                errors.push(format!("{}: {err}", e.source));
                continue;
            }
        };
        match sockdiag::destroy_matching(&f, denied) {
            Ok(gone) => {
                for sk in &gone {
                    tracing::warn!(
                        "authz: closed {} -> {}: a policy now denies it",
                        sk.remote,
                        sk.local
                    );
                }
                cut += gone.len();
            }
            Err(err) => errors.push(err.to_string()),
        }
    }
    (cut, errors)
}
