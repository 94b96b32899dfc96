//! The daemon: wires a source (the config file) to the map writer, attaches
//! the data path, and reacts to SIGHUP, file changes and shutdown signals.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use thiserror::Error;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    admin::{self, AdminError},
    bpf::{BpfError, Datapath, MapSizes},
    config::{self, ConfigError},
    writer::{MapWriter, WriterError},
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
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Standalone config file; without it the maps start empty.
    pub config: Option<PathBuf>,
    /// cgroup2 directory whose sockets are subject to redirect.
    pub cgroup: PathBuf,
    /// Directory on a bpf filesystem for pinned maps and links.
    pub bpffs: PathBuf,
    pub admin_socket: PathBuf,
    /// Leave the programs attached (pinned links) on exit.
    pub keep_attached: bool,
    pub sizes: MapSizes,
    /// How often the config file is checked for changes.
    pub watch_interval: Duration,
}

/// Identity of the config file's current content, to notice edits.
fn file_stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

fn reload(path: &Path, writer: &Mutex<MapWriter>, why: &str) {
    let model = match config::load(path) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("{why}: config rejected, previous state kept: {e}");
            return;
        }
    };
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    match w.apply(&model) {
        Ok(st) => tracing::info!(
            "{why}: applied {model} ({} map updates, {} deletes)",
            st.updates,
            st.deletes
        ),
        Err(e) => tracing::error!("{why}: apply failed: {e}"),
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
    let model = match &opts.config {
        Some(p) => Some(config::load(p)?),
        None => None,
    };
    // Fill the maps before attaching: the programs go live complete, and
    // pinning then replaces (and so detaches) a previous daemon's kept
    // links, so a restart never leaves a window without redirects.
    let mut w = MapWriter::new(Datapath::load(opts.sizes)?);
    if let (Some(model), Some(path)) = (&model, &opts.config) {
        let st = w.apply(model).map_err(|source| DaemonError::Apply {
            config: path.display().to_string(),
            source,
        })?;
        tracing::info!("applied {model} ({} map updates)", st.updates);
    }
    w.datapath_mut().attach(&opts.cgroup)?;
    w.datapath_mut().pin(&opts.bpffs)?;
    tracing::info!(
        "attached to cgroup {}, maps pinned under {}",
        opts.cgroup.display(),
        opts.bpffs.display()
    );
    let writer = Arc::new(Mutex::new(w));
    let admin = admin::serve(&opts.admin_socket, writer.clone())?;

    let mut tick = tokio::time::interval(opts.watch_interval);
    let mut stamp = opts.config.as_deref().and_then(file_stamp);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Some(p) = &opts.config {
                    stamp = file_stamp(p);
                    reload(p, &writer, "SIGHUP");
                }
            }
            _ = tick.tick() => {
                if let Some(p) = &opts.config {
                    let now = file_stamp(p);
                    if now.is_some() && now != stamp {
                        stamp = now;
                        reload(p, &writer, "config file changed");
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    admin.abort();
    let _ = std::fs::remove_file(&opts.admin_socket);
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
