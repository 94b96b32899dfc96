//! Applying the sources to the maps: the layered models, full and
//! incremental applies, and what each tells the xDS client.

use super::*;

/// The models the maps are built from: the config file's, the CNI
/// plugin's enrolled pods, with the xDS store's services and workloads
/// above them (xDS wins where both define a key). All are used in place,
/// under their locks: the process keeps one copy of each. Lock order:
/// file, CNI, xDS store, writer.
pub(super) struct Sources {
    pub(super) file: Mutex<Model>,
    pub(super) cni: Mutex<CniSource>,
    pub(super) xds: Option<SharedStore>,
}

impl Sources {
    pub(super) fn with_layers<R>(&self, f: impl FnOnce(Layers) -> R) -> R {
        self.locked(false, |layers, _| f(layers))
    }

    /// `with_layers`, with what the xDS source changed since the last
    /// call, taken under the same lock: every apply takes it (after a full
    /// one it is already in the maps).
    pub(super) fn with_changes<R>(&self, f: impl FnOnce(Layers, Changes) -> R) -> R {
        self.locked(true, f)
    }

    fn locked<R>(&self, take: bool, f: impl FnOnce(Layers, Changes) -> R) -> R {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let cni = self.cni.lock().unwrap_or_else(|e| e.into_inner());
        let mut guard = self
            .xds
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()));
        let changes = match guard.as_mut() {
            Some(g) if take => g.take_changes(),
            _ => Changes::default(),
        };
        let empty = Model::default();
        let xds_model = guard.as_ref().map_or(&empty, |g| &g.model);
        f(Layers(&[&file, &cni.model, xds_model]), changes)
    }
}

/// An xDS update applied in proportion to what it changed (writer/delta.rs),
/// or None where only a full apply will do.
pub(super) fn apply_changes(
    writer: &Mutex<MapWriter>,
    sources: &Sources,
    telemetry: Option<&Telemetry>,
) -> Option<(Verdict, usize)> {
    let (result, changes) = sources.with_changes(|layers, changes| {
        let result = writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .apply_changes(layers, &changes)?;
        if let (Ok(_), Some(t)) = (&result, telemetry) {
            t.update(layers, &changes);
        }
        Some((result, changes))
    })?;
    if let Ok(r) = &result {
        tracing::info!(
            "xDS update: applied {} services, {} workloads changed, incrementally ({} map updates, {} deletes)",
            changes.services.len(),
            changes.workloads.len(),
            r.stats.updates,
            r.stats.deletes,
        );
    }
    Some((verdict("xDS update", result), changes.resources))
}

/// What an apply tells the xDS client: what was left out, or why nothing
/// was applied (logged here).
fn verdict(why: &str, result: Result<ApplyReport, WriterError>) -> Verdict {
    match result {
        Ok(r) => Verdict {
            rejected: r.rejected,
            failed: None,
        },
        Err(e) => {
            tracing::error!("{why}: apply failed, the maps converge at the next apply: {e}");
            Verdict {
                rejected: Vec::new(),
                failed: Some(e.to_string()),
            }
        }
    }
}

/// Makes the maps hold the sources' models. Returns the hostnames the
/// resolver must watch, and what was left out (for the xDS client's ACK).
pub(super) fn apply(
    writer: &Mutex<MapWriter>,
    sources: &Sources,
    why: &str,
) -> (BTreeSet<String>, Verdict) {
    let out = sources.with_changes(|layers, _| {
        let out = apply_layers(writer, layers, why);
        cut_denied(writer, layers);
        out
    });
    // An apply of 100k workloads frees tens of MB of temporaries; glibc
    // keeps them mapped unless asked.
    trim_heap(true);
    out
}

pub(super) fn apply_layers(
    writer: &Mutex<MapWriter>,
    layers: Layers,
    why: &str,
) -> (BTreeSet<String>, Verdict) {
    for key in layers.shadowed() {
        tracing::warn!("{key} is defined by the config file and by xDS; using xDS");
    }
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    let result = w.apply_layers(layers);
    if let Ok(r) = &result {
        tracing::info!(
            "{why}: applied {} services, {} workloads, {} enrolled netns ({} map updates, {} deletes, {} entries left out)",
            layers.services().count(),
            layers.workloads().count(),
            layers.enrolled().len(),
            r.stats.updates,
            r.stats.deletes,
            r.rejected.len(),
        );
    }
    let verdict = verdict(why, result);
    drop(w);
    (layers.hostnames(), verdict)
}

/// Restores the previous version of each entry the last xDS response
/// replaced that the apply would leave out; returns those refusals (they
/// are NACKed, and the previous version is what the maps keep).
pub(super) fn keep_replaced_versions(
    writer: &Mutex<MapWriter>,
    sources: &Sources,
    store: &SharedStore,
) -> Vec<crate::writer::Rejected> {
    if !store
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replaced_any()
    {
        return Vec::new();
    }
    let refused =
        sources.with_layers(|l| writer.lock().unwrap_or_else(|e| e.into_inner()).preview(l));
    let keys: Vec<_> = refused.iter().map(|r| r.entry.clone()).collect();
    let restored = store
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .restore(&keys);
    refused
        .into_iter()
        .filter(|r| restored.contains(&r.entry))
        .map(|mut r| {
            r.reason.push_str("; the previous version is kept");
            r
        })
        .collect()
}

/// The writer's form of the resolver's answers. A failing host keeps its
/// last good addresses (the resolver publishes them); a name that does not
/// exist has none.
pub(super) fn resolved_hosts(answers: &Answers) -> ResolvedHosts {
    answers
        .iter()
        .map(|(h, a)| {
            let addrs = match a.state {
                HostState::NxDomain => Vec::new(),
                HostState::Resolved | HostState::Failing { .. } => a.addrs.clone(),
            };
            (h.as_str().into(), addrs)
        })
        .collect()
}

/// After an apply that may have changed a decision: live connections a
/// policy now denies are closed (they would otherwise outlive it).
pub(super) fn cut_denied(writer: &Mutex<MapWriter>, layers: Layers) {
    if !writer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take_authz_changed()
    {
        return;
    }
    let (cut, errors) = crate::enforce::cut_denied(layers);
    for e in errors {
        tracing::error!("authz: live connections not checked: {e}");
    }
    if cut > 0 {
        let w = writer.lock().unwrap_or_else(|e| e.into_inner());
        w.datapath()
            .add_daemon_stat(crate::bpf::STAT_AUTHZ_CUT, cut as u64);
    }
}
