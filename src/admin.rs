//! Local admin endpoint: a Unix socket taking one-line commands, answered
//! with JSON. `kmesh ctl` is its client. A Unix socket (mode 0600, root)
//! rather than a TCP port, so nothing is exposed on the network.
//!
//! A client can only cost the daemon a bounded amount: at most
//! `MAX_CLIENTS` are served at once (the rest wait in the kernel's listen
//! backlog, holding no descriptor of ours), each has `REQUEST_TIMEOUT` to
//! send its command and `REPLY_TIMEOUT` to take the answer, and a failing
//! accept (EMFILE: descriptors exhausted) backs off instead of spinning.

use std::{
    io,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
    time::timeout,
};

use crate::{http::AdminState, writer::Dump};

/// Produces a dump of the live maps (see MapWriter::dump).
pub type DumpFn = Arc<dyn Fn() -> Dump + Send + Sync>;

/// The commands, for the error on an unknown one.
const COMMANDS: &str =
    "dump, metrics, log-level [LEVEL], access-log [off|text|json], cni-add|cni-del|cni-check JSON";

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("admin socket {path}: daemon answered: {message}")]
    Remote { path: PathBuf, message: String },
    #[error(
        "admin socket {path}: no answer for {}s; the daemon is stuck or busy \
         (a larger --timeout waits longer)", .after.as_secs_f64()
    )]
    Timeout { path: PathBuf, after: Duration },
}

pub const DEFAULT_SOCKET: &str = "/run/kmesh/admin.sock";

/// Clients served at once; `kmesh ctl` uses one connection per command.
pub const MAX_CLIENTS: usize = 16;
/// Time a client has to send its command line after connecting.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to read the whole answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time `request` waits for each part of the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry delays after a failed accept, doubling from the first to the
/// second.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// The served socket. `stop` ends serving and removes the socket file only
/// if it is still the one bound here: a newer daemon started on the same
/// path (a rolling update overlaps the two) has replaced it with its own.
pub struct Server {
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
    /// (st_dev, st_ino) of the socket file this server bound.
    bound: (u64, u64),
}

impl Server {
    pub fn stop(self) {
        drop(self)
    }
}

/// Also on an early return with an error: no socket file is left behind
/// that clients would get "connection refused" from.
impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.bound => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => tracing::info!(
                "admin socket {} belongs to another daemon now; left in place",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

/// Binds the admin socket (replacing a stale one, or the one of a daemon
/// this one takes over from) and serves it until `Server::stop`.
pub fn serve(path: &Path, state: Arc<AdminState>) -> Result<Server, AdminError> {
    let err = |source| AdminError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // Bound and listening under a private name first, then renamed over
    // the path: a client never finds a socket file nobody listens on yet
    // (bind creates the file before listen), and a daemon taking over
    // from another replaces its socket in one step.
    let mut fresh = path.as_os_str().to_owned();
    fresh.push(format!(".{}", std::process::id()));
    let fresh = PathBuf::from(fresh);
    let _ = std::fs::remove_file(&fresh);
    let listener = UnixListener::bind(&fresh).map_err(err)?;
    let placed = std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&fresh, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&fresh);
        return Err(err(e));
    }
    let m = std::fs::symlink_metadata(path).map_err(err)?;
    Ok(Server {
        task: tokio::spawn(accept_loop(listener, state)),
        path: path.to_path_buf(),
        bound: (m.dev(), m.ino()),
    })
}

async fn accept_loop(listener: UnixListener, state: Arc<AdminState>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut delay = ACCEPT_BACKOFF.0;
    let mut failures = 0u64;
    loop {
        // Waiting for a slot before accepting leaves extra clients in the
        // backlog rather than holding their descriptors here.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE/ENFILE/ENOMEM leave the connection queued, so an
                // immediate retry fails again at once: wait, longer each time.
                if failures == 0 {
                    tracing::warn!("admin socket: accept failed: {e}; retrying with back-off");
                }
                failures += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        if failures > 0 {
            tracing::info!("admin socket: accepting again after {failures} failed accepts");
            failures = 0;
            delay = ACCEPT_BACKOFF.0;
        }
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, state).await {
                tracing::debug!("admin client: {e}");
            }
            drop(slot);
        });
    }
}

async fn handle(stream: UnixStream, state: Arc<AdminState>) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(r).take(4096);
    timeout(REQUEST_TIMEOUT, r.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no command within 5 s"))??;
    let (cmd, arg) = match line.trim().split_once(' ') {
        Some((c, a)) => (c, a.trim()),
        None => (line.trim(), ""),
    };
    let reply = if let Some(op) = crate::cni::serve::Op::parse(cmd) {
        cni_reply(&state, op, arg).await
    } else {
        match (cmd, arg) {
            ("dump", "") => {
                // Reads 100k-entry maps: off the async workers.
                let dump = state.dump.clone();
                let dump = tokio::task::spawn_blocking(move || dump())
                    .await
                    .map_err(io::Error::other)?;
                serde_json::to_string_pretty(&dump).map_err(io::Error::other)?
            }
            ("metrics", "") => {
                let m = state.metrics.clone();
                match tokio::task::spawn_blocking(move || m.render())
                    .await
                    .map_err(io::Error::other)?
                {
                    // Without the trailing newline the client adds.
                    Ok(text) => text.trim_end().to_string(),
                    Err(e) => format!("error: {e}"),
                }
            }
            ("access-log", "") => state.access_log.get().to_string(),
            ("access-log", f) => match f.parse::<crate::telemetry::Format>() {
                Ok(f) => {
                    state.access_log.set(f);
                    tracing::info!("access log: {f} (kmesh ctl)");
                    f.to_string()
                }
                Err(e) => format!("error: {e}"),
            },
            ("log-level", spec) => match (&state.log, spec) {
                (None, _) => "error: this daemon's log level cannot be changed".to_string(),
                (Some(log), "") => log.get(),
                (Some(log), spec) => log.set(spec).unwrap_or_else(|e| format!("error: {e}")),
            },
            _ => format!(
                "error: unknown command {:?} (known: {COMMANDS})",
                line.trim()
            ),
        }
    };
    let write = async {
        w.write_all(reply.as_bytes()).await?;
        w.write_all(b"\n").await?;
        w.shutdown().await
    };
    timeout(REPLY_TIMEOUT, write)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "answer not taken within 30 s"))?
}

/// A CNI plugin's request, handed to the daemon's loop and answered with
/// its outcome.
async fn cni_reply(state: &AdminState, op: crate::cni::serve::Op, arg: &str) -> String {
    let Some(calls) = &state.cni else {
        return "error: CNI enrollment is off in this daemon (start it with --cni or --cni-conf-dir)"
            .to_string();
    };
    let req = match serde_json::from_str(arg) {
        Ok(r) => r,
        Err(e) => return format!("error: {}: bad request {arg:?}: {e}", op.why()),
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let call = crate::cni::serve::Call { op, req, reply };
    if calls.send(call).await.is_err() {
        return "error: the daemon is stopping".to_string();
    }
    match answer.await {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "error: the daemon is stopping".to_string(),
    }
}

/// Client side: sends `cmd`, returns the daemon's reply. Fails if the
/// daemon takes longer than `wait` to accept, to start answering, or
/// between two parts of the answer.
pub async fn request(path: &Path, cmd: &str, wait: Duration) -> Result<String, AdminError> {
    let err = |source| AdminError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let stalled = || AdminError::Timeout {
        path: path.to_path_buf(),
        after: wait,
    };
    let mut s = timeout(wait, UnixStream::connect(path))
        .await
        .map_err(|_| stalled())?
        .map_err(err)?;
    timeout(wait, s.write_all(format!("{cmd}\n").as_bytes()))
        .await
        .map_err(|_| stalled())?
        .map_err(err)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = timeout(wait, s.read(&mut buf))
            .await
            .map_err(|_| stalled())?
            .map_err(err)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let out =
        String::from_utf8(out).map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    if let Some(message) = out.strip_prefix("error: ") {
        return Err(AdminError::Remote {
            path: path.to_path_buf(),
            message: message.trim().to_string(),
        });
    }
    Ok(out)
}
