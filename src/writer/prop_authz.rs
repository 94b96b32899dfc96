//! For the property test: the authorization decision the data path makes
//! (bpf/lib/authz.h authz_decide), read from a writer's kernel maps, with
//! set ids, classes, identity numbers and policy indices (which depend on
//! a writer's history) turned back into what they stand for.

use std::{collections::BTreeMap, net::IpAddr};

use libbpf_rs::{MapCore, MapFlags};

use super::MapWriter;
use crate::bpf::{
    addr_key, authz_class, authz_dst, authz_id_key, authz_port_key, authz_src_key, authz_verdict,
    authz_verdict_key, kmesh_addr, workload_value, MapId, Pod,
};

/// enum kmesh_authz_dst_flag and kmesh_authz_flag (bpf/include/kmesh.h).
const PORTS: u32 = 1;
const IDENTITIES: u32 = 2;
const SOURCES: u32 = 4;
const HAS_DENY: u32 = 8;
const HAS_ALLOW: u32 = 16;
const DENY: u32 = 1;
const DRY_DENY: u32 = 2;

fn get<V: Pod>(w: &MapWriter, map: MapId, key: &[u8]) -> Option<V> {
    let raw = w.datapath().map(map).lookup(key, MapFlags::ANY).unwrap()?;
    Some(V::from_bytes(&raw).expect("a value of the map's size"))
}

/// authz_decide for src -> dst:port: None without policies at dst, else
/// (flags, deciding policy key, dry-run policy key).
fn decide(w: &MapWriter, src: IpAddr, dst: IpAddr, port: u16) -> Option<(u32, String, String)> {
    let d: authz_dst = get(w, MapId::AuthzDst, addr_key::from_ip(dst).as_bytes())?;
    let (set, need) = (d.set, d.flags);
    let mut dk = authz_verdict_key {
        set,
        part: 0,
        dst_class: d.deny_class,
        ..Default::default()
    };
    let mut ak = authz_verdict_key {
        set,
        part: 1,
        dst_class: d.allow_class,
        ..Default::default()
    };
    let mut take = |c: Option<authz_class>, f: fn(&mut authz_verdict_key, u32)| {
        if let Some(c) = c {
            f(&mut dk, c.deny);
            f(&mut ak, c.allow);
        }
    };
    if need & PORTS != 0 {
        let k = authz_port_key {
            set,
            port: u32::from(port),
        };
        take(get(w, MapId::AuthzPort, k.as_bytes()), |k, c| {
            k.port_class = c
        });
    }
    if need & IDENTITIES != 0 {
        let wl: Option<workload_value> = get(w, MapId::Workload, addr_key::from_ip(src).as_bytes());
        if let Some(wl) = wl.filter(|wl| wl.identity != 0) {
            let k = authz_id_key {
                set,
                identity: wl.identity,
            };
            take(get(w, MapId::AuthzId, k.as_bytes()), |k, c| k.id_class = c);
        }
    }
    if need & SOURCES != 0 {
        let k = authz_src_key {
            prefixlen: 32 + 128,
            set: set.to_be(),
            addr: kmesh_addr::from_ip(src),
        };
        take(get(w, MapId::AuthzSrc, k.as_bytes()), |k, c| {
            k.src_class = c
        });
    }
    let name = |i: u32| w.policy_key(i).unwrap_or_default().to_string();
    let deny = |p: u32| Some((DENY, name(p), String::new()));
    let none = authz_verdict::default();
    let dv = match need & HAS_DENY {
        0 => none,
        _ => match get::<authz_verdict>(w, MapId::AuthzVerdict, dk.as_bytes()) {
            Some(v) => v,
            None => return Some((DENY, "missing deny outcome".into(), String::new())),
        },
    };
    if dv.flags & DENY != 0 {
        return deny(dv.policy);
    }
    let av = match need & HAS_ALLOW {
        0 => none,
        _ => match get::<authz_verdict>(w, MapId::AuthzVerdict, ak.as_bytes()) {
            Some(v) => v,
            None => return Some((DENY, "missing allow outcome".into(), String::new())),
        },
    };
    if av.flags & DENY != 0 {
        return deny(0);
    }
    let dry = if dv.flags & DRY_DENY != 0 {
        Some(dv.dry_policy)
    } else if av.flags & DRY_DENY != 0 {
        Some(av.dry_policy)
    } else {
        None
    };
    Some(match dry {
        Some(p) => (DRY_DENY, name(av.policy), name(p)),
        None => (0, name(av.policy), String::new()),
    })
}

/// Every decision for `srcs` × `dsts` × `ports`, by name.
pub(super) fn decisions(
    w: &MapWriter,
    srcs: &[IpAddr],
    dsts: &[IpAddr],
    ports: &[u16],
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for dst in dsts {
        for src in srcs {
            for port in ports {
                if let Some(v) = decide(w, *src, *dst, *port) {
                    out.insert(format!("{src} -> {dst}:{port}"), format!("{v:?}"));
                }
            }
        }
    }
    out
}
