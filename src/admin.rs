//! Local admin endpoint: a Unix socket taking one-line commands, answered
//! with JSON. `kmesh ctl` is its client. A Unix socket (mode 0600, root)
//! rather than a TCP port, so nothing is exposed on the network.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::writer::Dump;

/// Produces a dump of the live maps (see MapWriter::dump).
pub type DumpFn = Arc<dyn Fn() -> Dump + Send + Sync>;

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("admin socket {path}: daemon answered: {message}")]
    Remote { path: PathBuf, message: String },
}

pub const DEFAULT_SOCKET: &str = "/run/kmesh/admin.sock";

/// Binds the admin socket (replacing a stale one) and serves it until the
/// task is dropped.
pub fn serve(path: &Path, dump: DumpFn) -> Result<tokio::task::JoinHandle<()>, AdminError> {
    let err = |source| AdminError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let dump = dump.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, dump).await {
                    tracing::debug!("admin client: {e}");
                }
            });
        }
    }))
}

async fn handle(stream: UnixStream, dump: DumpFn) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r).take(4096).read_line(&mut line).await?;
    let reply = match line.trim() {
        "dump" => {
            // Reads 100k-entry maps: off the async workers.
            let dump = tokio::task::spawn_blocking(move || dump())
                .await
                .map_err(io::Error::other)?;
            serde_json::to_string_pretty(&dump).map_err(io::Error::other)?
        }
        other => format!("error: unknown command {other:?} (known: dump)"),
    };
    w.write_all(reply.as_bytes()).await?;
    w.write_all(b"\n").await?;
    w.shutdown().await
}

/// Client side: sends `cmd`, returns the daemon's reply.
pub async fn request(path: &Path, cmd: &str) -> Result<String, AdminError> {
    let err = |source| AdminError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).await.map_err(err)?;
    s.write_all(format!("{cmd}\n").as_bytes())
        .await
        .map_err(err)?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.map_err(err)?;
    if let Some(message) = out.strip_prefix("error: ") {
        return Err(AdminError::Remote {
            path: path.to_path_buf(),
            message: message.trim().to_string(),
        });
    }
    Ok(out)
}
