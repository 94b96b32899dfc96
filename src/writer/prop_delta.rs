//! Random sequences of small changes (a few services and workloads each:
//! added, changed, removed, moved to another address, health, locality,
//! memberships, waypoints, conflicts, full maps), each given to the
//! incremental path with the versions it replaced as a source reports them,
//! and applied whole where that path declines. After every step the maps
//! and what is left out must be what a writer with the same history that
//! always applies whole has, and where nothing is left out, what a new
//! writer's full apply of the same model writes.

use super::prop_tests::{
    local_node, random_service, random_workload, read, small_maps, Rng, World, SERVICES, WORKLOADS,
};
use super::tests::writer;
use super::*;
use crate::{
    bpf::MapSizes,
    model::{Addresses, Changes, HealthStatus},
};

/// What a source would report for the step from `prev` to `next`.
fn diff(prev: &Model, next: &Model) -> Changes {
    let mut c = Changes::default();
    let keys: BTreeSet<&Arc<str>> = prev.services.keys().chain(next.services.keys()).collect();
    for k in keys {
        if prev.services.get(k) != next.services.get(k) {
            c.service(k.clone(), prev.services.get(k).cloned());
        }
    }
    let uids: BTreeSet<&str> = prev.workloads.keys().chain(next.workloads.keys()).collect();
    for uid in uids {
        if prev.workloads.get(uid) != next.workloads.get(uid) {
            c.workload(uid, prev.workloads.get(uid).cloned());
        }
    }
    c
}

/// One to three changes of services and workloads, mostly the kinds a
/// busy cluster pushes: a pod's address or health, a pod coming or going.
fn small_step(world: &mut World, r: &mut Rng) {
    for _ in 0..=r.below(3) {
        let uid = format!("w{}", r.below(WORKLOADS));
        match r.below(10) {
            0 => {
                let i = r.below(SERVICES);
                let s = random_service(r, i);
                world.services.insert(s.key(), s);
            }
            1 => {
                // The same service at another VIP.
                let Some(mut s) = world.services.values().nth(r.below(3) as usize).cloned() else {
                    continue;
                };
                let vip = format!("10.96.0.{}", r.below(SERVICES * 3));
                s.addresses[0].address = vip.parse().unwrap();
                world.services.insert(s.key(), s);
            }
            2 if r.chance(30) => {
                let i = r.below(SERVICES);
                world
                    .services
                    .remove(&format!("default/s{i}.default.svc.cluster.local"));
            }
            3 | 4 => {
                let wl = random_workload(r, world, &uid);
                world.workloads.insert(wl);
            }
            5 | 6 => {
                let Some(mut wl) = world.workloads.get(&uid).cloned() else {
                    continue;
                };
                if wl.hostname().is_some() {
                    continue;
                }
                let ip = format!("10.244.0.{}", r.below(WORKLOADS * 8));
                wl.addresses = Addresses::One(ip.parse().unwrap());
                world.workloads.insert(wl);
            }
            7 => {
                let Some(mut wl) = world.workloads.get(&uid).cloned() else {
                    continue;
                };
                wl.status = match wl.status {
                    HealthStatus::Healthy => HealthStatus::Unhealthy,
                    HealthStatus::Unhealthy => HealthStatus::Healthy,
                };
                world.workloads.insert(wl);
            }
            _ => {
                world.workloads.remove(&uid);
            }
        }
    }
}

#[test]
fn incremental_applies_match_a_fresh_full_apply() {
    let mut incremental_steps = 0;
    for seed in 1..=5u64 {
        let mut r = Rng(0x2545_f491_4f6c_dd1d ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // Workload addresses too: some steps do not fit either map.
        let small = MapSizes {
            workload_ips: 12,
            ..small_maps()
        };
        let local = local_node();
        let mut w = writer(small);
        w.set_local_node(local.clone());
        // The same history, applied whole every time: with entries left
        // out, what the maps hold depends on what they held before.
        let mut whole = writer(small);
        whole.set_local_node(local.clone());
        let mut fresh = writer(small);
        let mut world = World::default();
        // A populated start, applied whole.
        for _ in 0..12 {
            small_step(&mut world, &mut r);
        }
        let mut prev = world.model();
        w.apply(&prev).unwrap();
        whole.apply(&prev).unwrap();
        let (mut compared, mut declined) = (0, 0);
        for step in 0..80 {
            small_step(&mut world, &mut r);
            let m = world.model();
            let changes = diff(&prev, &m);
            let report = match w.apply_changes(Layers(&[&m]), &changes) {
                Some(r) => {
                    incremental_steps += 1;
                    r
                }
                None => {
                    declined += 1;
                    w.apply(&m)
                }
            }
            .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            let seen = read(&w, &m).unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            let reference = whole.apply(&m).unwrap();
            let key = |r: &ApplyReport| {
                let mut v: Vec<String> = r
                    .rejected
                    .iter()
                    .map(|x| format!("{}: {}", x.entry, x.reason))
                    .collect();
                v.sort();
                v
            };
            assert_eq!(
                key(&report),
                key(&reference),
                "seed {seed} step {step}: left out"
            );
            assert_eq!(
                seen,
                read(&whole, &m).unwrap(),
                "seed {seed} step {step}: {changes:?}"
            );
            prev = m;
            if !report.rejected.is_empty() || !report.notes.is_empty() {
                continue;
            }
            if compared % 8 == 0 {
                fresh = writer(small);
            } else {
                fresh.apply(&Model::default()).unwrap();
            }
            fresh.set_local_node(local.clone());
            let fr = fresh.apply(&prev).unwrap();
            assert!(fr.rejected.is_empty(), "seed {seed} step {step}: {fr:?}");
            let want = read(&fresh, &prev).unwrap();
            assert_eq!(seen, want, "seed {seed} step {step}: {changes:?}");
            compared += 1;
        }
        assert!(
            compared >= 10,
            "seed {seed}: only {compared} steps compared"
        );
        assert!(
            declined >= 1,
            "seed {seed}: the incremental path never declined"
        );
    }
    assert!(
        incremental_steps >= 200,
        "only {incremental_steps} of 400 steps went the incremental way"
    );
}
