//! The daemon: wires the sources (config file, xDS) to the map writer,
//! attaches the data path, and reacts to SIGHUP, file changes, xDS updates
//! and shutdown signals.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

mod apply;
mod heap;

use apply::*;
pub use heap::one_malloc_arena;
use heap::{trim_heap, TRIM_AFTER, TRIM_AFTER_VERDICT};
use thiserror::Error;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot, watch},
};

use crate::{
    admin::{self, AdminError},
    bpf::{BpfError, Datapath, MapSizes},
    cni::{install, serve as cni_serve, source::CniSource},
    config::{self, ConfigError},
    dns::{Answers, DnsConfig, DnsError, HostState, Resolver},
    http::{self, AdminState, HttpOptions, Metrics, Readiness},
    logging::LogControl,
    model::{Changes, Layers, LocalNode, Model, ResolvedHosts, MAX_TRACKED_CHANGES},
    telemetry::{AccessLog, Telemetry},
    writer::{ApplyReport, MapWriter, WriterError},
    xds::client::{self as xds, SharedStore, Verdict, XdsOptions, XdsStatus},
};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("applying {config}: {source}")]
    Apply { config: String, source: WriterError },
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("installing signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error(transparent)]
    CniInstall(#[from] crate::cni::install::InstallError),
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Standalone config file (services, workloads, enrolled netns).
    pub config: Option<PathBuf>,
    /// Istio control plane to take services and workloads from.
    pub xds: Option<XdsOptions>,
    /// cgroup2 directory whose sockets are subject to redirect.
    pub cgroup: PathBuf,
    /// Directory on a bpf filesystem for pinned maps and links.
    pub bpffs: PathBuf,
    pub admin_socket: PathBuf,
    /// Leave the programs attached (pinned links) on exit.
    pub keep_attached: bool,
    pub sizes: MapSizes,
    /// Same-host acceleration, whatever the config file says.
    pub accelerate: bool,
    /// Overrides the config file's accel_queue_limit.
    pub accel_queue_limit: Option<u32>,
    /// This node's placement, for locality-aware load balancing.
    pub local: LocalNode,
    /// How often the config file is checked for changes.
    pub watch_interval: Duration,
    /// Resolver settings for hostname workloads.
    pub dns: DnsConfig,
    /// Metrics, admin HTTP and readiness listeners (src/http).
    pub http: HttpOptions,
    /// Keep the kernel's BPF run-time statistics on while the daemon runs
    /// (two clock reads per program run, on every CPU's connects).
    pub bpf_stats: bool,
    /// Connection telemetry (istio_tcp_* metrics, access log): the ring
    /// buffer's size in bytes, None for off.
    pub telemetry: Option<u32>,
    /// The access log's format at start (the config file's access_log
    /// key, when set, overrides it).
    pub access_log: crate::telemetry::Format,
    /// The process's log filter, for the admin endpoints to change.
    pub log: Option<LogControl>,
    /// Pod enrollment by the CNI plugin (src/cni); None: off.
    pub cni: Option<crate::cni::CniOptions>,
}

/// Identity of the config file's current content, to notice edits.
fn file_stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The resolver's next publication; pending forever without a resolver.
async fn next_answers(rx: Option<&mut watch::Receiver<Arc<Answers>>>) -> Option<Arc<Answers>> {
    let rx = rx?;
    match rx.changed().await {
        Ok(()) => Some(rx.borrow_and_update().clone()),
        // The resolver task ended (it only does when dropped).
        Err(_) => std::future::pending().await,
    }
}

/// The next CNI request; pending forever when CNI enrollment is off.
async fn next_call(rx: Option<&mut mpsc::Receiver<cni_serve::Call>>) -> Option<cni_serve::Call> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Turns on the kernel's per-program run counters (--bpf-stats); a
/// failure costs only those metrics.
fn enable_run_stats() -> Option<crate::bpf::RunStatsGuard> {
    match crate::bpf::RunStatsGuard::enable() {
        Ok(g) => {
            tracing::info!("BPF run-time statistics on (two clock reads per program run)");
            Some(g)
        }
        Err(e) => {
            tracing::error!("--bpf-stats: the kernel refused BPF_ENABLE_STATS: {e}");
            None
        }
    }
}

pub async fn run(opts: Options) -> Result<(), DaemonError> {
    // Handlers first: a SIGTERM that arrives while starting up must still
    // go through the orderly shutdown below, not the default kill.
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    // Validate the config before touching the kernel: a bad file at start
    // is an error with nothing attached.
    let load_file = |p: Option<&Path>| -> Result<Model, ConfigError> {
        let mut m = match p {
            Some(p) => config::load(p)?,
            None => Model::default(),
        };
        m.accelerate |= opts.accelerate;
        if opts.accel_queue_limit.is_some() {
            m.accel_queue_limit = opts.accel_queue_limit;
        }
        Ok(m)
    };
    let file_model = load_file(opts.config.as_deref())?;
    // Pods the CNI plugin enrolled before this start that are still there.
    let cni_source = match &opts.cni {
        Some(c) => CniSource::reconcile(c.state_file.clone()),
        None => CniSource::default(),
    };
    // Hostnames are looked up in the background and never hold up an
    // apply. Bad resolver settings are an error at start; a host without
    // a usable /etc/resolv.conf still runs, its hostname workloads empty.
    let resolver = match Resolver::new(opts.dns.clone()) {
        Ok(r) => Some(r),
        Err(e @ (DnsError::SystemConfig(_) | DnsError::NoServers)) => {
            tracing::error!("{e}: hostname workloads get no endpoints (set --dns-server)");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let mut dns_rx = resolver.as_ref().map(Resolver::subscribe);
    let watch_hosts = |hosts: BTreeSet<String>| match &resolver {
        Some(r) => r.set_hosts(hosts),
        None if !hosts.is_empty() => {
            tracing::warn!(
                "no DNS resolver: {} hostname(s) stay unresolved",
                hosts.len()
            )
        }
        None => {}
    };
    // Fill the maps before attaching: the programs go live complete, and
    // pinning then replaces (and so detaches) a previous daemon's kept
    // links, so a restart never leaves a window without redirects.
    let mut w = MapWriter::new(Datapath::load_with(
        opts.sizes,
        Some(&opts.bpffs),
        opts.telemetry,
    )?);
    let telemetry_on = w.datapath().kernel().telemetry_on;
    let swept = w.datapath().sweep_conns();
    if swept > 0 {
        tracing::info!("km_conn: removed {swept} entries of connections gone or back on TCP");
    }
    w.set_local_node(opts.local.clone());
    let started = Instant::now();
    let st = w
        .apply_layers(Layers(&[&file_model, &cni_source.model]))
        .map_err(|source| DaemonError::Apply {
            config: opts
                .config
                .as_ref()
                .map_or("(no config)".into(), |p| p.display().to_string()),
            source,
        })?;
    let first_apply = started.elapsed();
    tracing::info!(
        "applied {file_model}, {} CNI pods ({} map updates)",
        cni_source.model.enrolled.len(),
        st.stats.updates
    );
    watch_hosts(Layers(&[&file_model]).hostnames());
    w.datapath_mut().attach(&opts.cgroup)?;
    w.datapath_mut().pin(&opts.bpffs)?;
    tracing::info!(
        "attached to cgroup {}, maps pinned under {}",
        opts.cgroup.display(),
        opts.bpffs.display()
    );
    // Logs the netns it cannot go on; the next apply reports them too.
    w.sync_netns();
    let writer = Arc::new(Mutex::new(w));
    cut_denied(&writer, Layers(&[&file_model, &cni_source.model]));
    if let Err(e) = crate::enforce::spawn_denial_log(writer.clone()) {
        tracing::error!("authz: denial log unavailable: {e}");
    }
    let xds_store = opts.xds.as_ref().map(|_| SharedStore::default());
    let sources = Arc::new(Sources {
        file: Mutex::new(file_model),
        cni: Mutex::new(cni_source),
        xds: xds_store.clone(),
    });
    // Probed once: closing live connections a policy now denies needs
    // SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY).
    let cut_unavailable = crate::sockdiag::probe_destroy().err();
    if let Some(why) = &cut_unavailable {
        tracing::warn!(
            "authz: live connections a policy change denies stay open until they close \
             (the kernel cannot destroy sockets: {why}); new ones are refused"
        );
    }
    let dump: admin::DumpFn = {
        let (sources, writer) = (sources.clone(), writer.clone());
        Arc::new(move || {
            let mut d =
                sources.with_layers(|l| writer.lock().unwrap_or_else(|e| e.into_inner()).dump(l));
            d.authz.cut_unavailable = cut_unavailable.clone();
            if let Some(store) = &sources.xds {
                let refused = store.lock().unwrap_or_else(|e| e.into_inner()).refused();
                d.rejected.extend(refused);
            }
            d
        })
    };
    let (xds_tx, xds_rx) = watch::channel(XdsStatus::default());

    // Observability (src/http): metrics read the kernel at scrape time;
    // readiness waits for the first xDS response when there is a source.
    let run_stats = opts.bpf_stats.then(enable_run_stats).flatten();
    let xds_status = opts.xds.as_ref().map(|_| xds_rx.clone());
    let metrics = Arc::new(Metrics::new(http::metrics::Sources {
        writer: writer.clone(),
        xds: xds_status.clone(),
        dns: resolver.as_ref().map(Resolver::counters),
        run_stats: run_stats.is_some(),
    }));
    metrics.applied("start", first_apply, false);
    let access_log = Arc::new(AccessLog::new(
        sources
            .file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .access_log
            .unwrap_or(opts.access_log),
    ));
    let telemetry = Arc::new(Telemetry::new(metrics.tcp(), access_log.clone()));
    // The names by address are for the telemetry reader only (at 100k
    // workloads they take tens of MB).
    let telemetry_names = telemetry_on.then_some(&*telemetry);
    if let Some(t) = telemetry_names {
        sources.with_layers(|l| t.refresh(l));
    }
    if telemetry_on {
        let ring = {
            let w = writer.lock().unwrap_or_else(|e| e.into_inner());
            libbpf_rs::MapHandle::try_from(w.datapath().telemetry_events())
        };
        match ring {
            Ok(ring) => {
                if let Err(e) = telemetry.clone().spawn_reader(ring) {
                    tracing::error!("{e}; connection telemetry is off");
                }
            }
            Err(e) => tracing::error!("telemetry ring buffer: {e}; connection telemetry is off"),
        }
    }
    let ready = Arc::new(Readiness::new(xds_status));
    ready.set_attached();
    let (cni_tx, mut cni_rx) = match &opts.cni {
        Some(_) => {
            let (tx, rx) = mpsc::channel::<cni_serve::Call>(16);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let state = Arc::new(AdminState {
        dump,
        metrics: metrics.clone(),
        log: opts.log.clone(),
        ready,
        access_log: access_log.clone(),
        cni: cni_tx,
    });
    let http_servers = http::start(&opts.http, state.clone());
    let admin = admin::serve(&opts.admin_socket, state)?;
    // The plugin goes in once the socket it talks to is served.
    let cni_install = opts.cni.as_ref().and_then(|c| c.install.clone());
    let mut cni_failing = None;
    if let Some(o) = &cni_install {
        let bin = install::install_binary(o)?;
        tracing::info!("CNI plugin installed as {}", bin.display());
        install::keep_installed(o, &mut cni_failing);
    }

    // The xDS client waits for each apply's verdict before it ACKs.
    let (apply_tx, mut apply_rx) = mpsc::channel::<oneshot::Sender<Verdict>>(1);
    let xds_task = opts.xds.clone().zip(xds_store.clone()).map(|(o, store)| {
        tracing::info!("xDS: subscribing to {} as {}", o.address, o.node_id);
        tokio::spawn(xds::run(o, store, xds_tx, apply_tx))
    });

    let mut tick = tokio::time::interval(opts.watch_interval);
    let mut last_note_sweep = Instant::now();
    // When the memory freed by incremental applies is given back.
    // (when, whether to log the heap at info: after a large response)
    let mut trim_at: Option<(tokio::time::Instant, bool)> = None;
    let mut stamp = opts.config.as_deref().and_then(file_stamp);
    loop {
        let mut cni_pending = None;
        // (why, whether the config file must be re-read, who waits for
        // the verdict)
        let (why, reread_file, reply) = tokio::select! {
            _ = hup.recv() => ("SIGHUP", true, None),
            Some(call) = next_call(cni_rx.as_mut()) => {
                let why = call.op.why();
                match cni_serve::begin(&sources.cni, &writer, call) {
                    Some(p) => {
                        cni_pending = Some(p);
                        (why, false, None)
                    }
                    None => continue,
                }
            }
            _ = tick.tick() => {
                if let Some(o) = &cni_install {
                    install::keep_installed(o, &mut cni_failing);
                }
                // Notes of connects that never sent a SYN (writer/limits.rs).
                if last_note_sweep.elapsed() > Duration::from_secs(60) {
                    last_note_sweep = Instant::now();
                    writer.lock().unwrap_or_else(|e| e.into_inner()).sweep_notes();
                }
                let now = opts.config.as_deref().and_then(file_stamp);
                if now.is_none() || now == stamp {
                    continue;
                }
                ("config file changed", true, None)
            }
            Some(reply) = apply_rx.recv() => ("xDS update", false, Some(reply)),
            Some(answers) = next_answers(dns_rx.as_mut()) => {
                writer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set_resolved(resolved_hosts(&answers));
                ("DNS answers changed", false, None)
            }
            _ = tokio::time::sleep_until(trim_at.map_or_else(tokio::time::Instant::now, |t| t.0)), if trim_at.is_some() => {
                let log = trim_at.take().is_some_and(|t| t.1);
                trim_heap(log);
                continue;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        if reread_file {
            let Some(p) = &opts.config else { continue };
            stamp = file_stamp(p);
            match load_file(Some(p)) {
                Ok(mut m) => {
                    // The file's access_log key, when it changes, wins over
                    // a switch made at run time.
                    let was = sources
                        .file
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .access_log;
                    if let Some(f) = m.access_log.filter(|f| Some(*f) != was) {
                        access_log.set(f);
                        tracing::info!("access log: {f} (config file)");
                    }
                    let mut file = sources.file.lock().unwrap_or_else(|e| e.into_inner());
                    // A policy edited into an invalid one keeps its last
                    // good version, as a NACKed xDS update does: dropping
                    // it would silently lift a DENY.
                    for key in std::mem::take(&mut m.refused_policies) {
                        if let Some(p) = file.policies.get(&key) {
                            tracing::warn!("config: keeping the previous version of policy {key}");
                            m.policies.insert_shared(p.clone());
                        }
                    }
                    // Unchanged workloads keep their ids: nothing to rewrite.
                    m.workloads.inherit_ids(&file.workloads);
                    *file = m;
                }
                Err(e) => {
                    tracing::error!("{why}: config rejected, previous state kept: {e}");
                    continue;
                }
            }
        }
        if reply.is_some() && !reread_file && cni_pending.is_none() {
            let started = Instant::now();
            if let Some((verdict, resources)) = apply_changes(&writer, &sources, telemetry_names) {
                let took = started.elapsed();
                metrics.applied("xDS update (incremental)", took, verdict.failed.is_some());
                if let Some(reply) = reply {
                    // The client may have gone with its stream.
                    let _ = reply.send(verdict);
                }
                // After the reply: off the update's latency. A large
                // response (a resend after a reconnect) leaves its buffers
                // free but resident until trimmed, now; small ones add up
                // too, and are given back when the loop is next free.
                if resources > MAX_TRACKED_CHANGES {
                    trim_heap(false);
                    trim_at = Some((tokio::time::Instant::now() + TRIM_AFTER_VERDICT, true));
                } else if trim_at.is_none() {
                    trim_at = Some((tokio::time::Instant::now() + TRIM_AFTER, false));
                }
                continue;
            }
        }
        // An xDS update that would be left out goes back to the version it
        // replaced before anything is written, as a NACKed update should.
        let kept = match (&reply, &sources.xds) {
            (Some(_), Some(store)) => keep_replaced_versions(&writer, &sources, store),
            _ => Vec::new(),
        };
        let started = Instant::now();
        let (hosts, mut verdict) = apply(&writer, &sources, why);
        if let Some(t) = telemetry_names {
            sources.with_layers(|l| t.refresh(l));
        }
        metrics.applied(why, started.elapsed(), verdict.failed.is_some());
        verdict.rejected.extend(kept);
        watch_hosts(hosts);
        if let Some(p) = cni_pending {
            if let Some(undo) = p.finish(&sources.cni, &writer, &verdict) {
                let (hosts, _) = apply(&writer, &sources, "CNI ADD undone");
                watch_hosts(hosts);
                undo.send();
            }
        }
        if let Some(reply) = reply {
            // The client may have gone with its stream: nothing to tell.
            let _ = reply.send(verdict);
            trim_at = Some((tokio::time::Instant::now() + TRIM_AFTER_VERDICT, true));
        }
    }
    if let Some(t) = xds_task {
        t.abort();
    }
    // Only if still ours: a newer daemon may have taken the path over.
    admin.stop();
    if let Some(o) = cni_install.as_ref().filter(|o| !o.keep_config) {
        match install::remove(o) {
            Ok(()) => tracing::info!("CNI plugin entry removed from {}", o.conf_dir.display()),
            Err(e) => tracing::error!("removing the CNI plugin entry: {e}"),
        }
    }
    http_servers.stop();
    drop(run_stats);
    writer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .shutdown(opts.keep_attached);
    tracing::info!(
        "stopped ({})",
        if opts.keep_attached {
            "programs left attached"
        } else {
            "programs detached"
        }
    );
    Ok(())
}
