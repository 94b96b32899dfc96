//! The daemon's HTTP endpoints, on ztunnel's ports so Istio tooling and
//! habits carry over: metrics on :15020, admin on 127.0.0.1:15000 (never
//! on the network: it can change the log level), readiness on :15021.
//!
//! A port that is taken does not stop the daemon: the data path matters
//! more than its telemetry, and on a bare host a restarting daemon can
//! overlap the old one for a moment. The server retries the bind until it
//! gets the port, and says so in the log.

pub mod admin;
pub mod metrics;

use std::{
    fmt,
    net::SocketAddr,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    extract::Request,
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use thiserror::Error;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::xds::client::XdsStatus;
pub use admin::AdminState;
pub use metrics::Metrics;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("{0:?} is not an address: expected IP:PORT (e.g. 127.0.0.1:15000) or \"off\"")]
    BadAddress(String),
}

/// Where one server listens, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl FromStr for Listen {
    type Err = HttpError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" => Ok(Listen(None)),
            a => a
                .parse()
                .map(|a| Listen(Some(a)))
                .map_err(|_| HttpError::BadAddress(s.to_string())),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("off"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpOptions {
    pub metrics: Listen,
    pub admin: Listen,
    pub readiness: Listen,
}

impl HttpOptions {
    /// All off: for embedding the daemon where no ports may be taken.
    pub const OFF: HttpOptions = HttpOptions {
        metrics: Listen(None),
        admin: Listen(None),
        readiness: Listen(None),
    };
}

/// Whether the daemon can do its job: programs attached and the first
/// state applied (with xDS, the control plane's first response handled;
/// until then the maps hold only the config file, if any, and a pod
/// started now would get no mesh).
#[derive(Debug)]
pub struct Readiness {
    applied: AtomicBool,
    xds: Option<watch::Receiver<XdsStatus>>,
}

impl Readiness {
    pub fn new(xds: Option<watch::Receiver<XdsStatus>>) -> Readiness {
        Readiness {
            applied: AtomicBool::new(false),
            xds,
        }
    }

    /// Called once the programs are attached with the first apply done.
    pub fn set_attached(&self) {
        self.applied.store(true, Ordering::Release);
    }

    pub fn check(&self) -> Result<(), &'static str> {
        if !self.applied.load(Ordering::Acquire) {
            return Err("programs not attached yet");
        }
        match &self.xds {
            Some(rx) if rx.borrow().responses == 0 => {
                Err("no xDS response from the control plane applied yet")
            }
            _ => Ok(()),
        }
    }
}

/// The running servers; stopping (or dropping) ends them.
#[derive(Debug, Default)]
pub struct Servers(Vec<JoinHandle<()>>);

impl Servers {
    pub fn stop(self) {}
}

impl Drop for Servers {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Starts the servers `opts` turns on.
pub fn start(opts: &HttpOptions, state: Arc<AdminState>) -> Servers {
    let mut tasks = Vec::new();
    if let Some(a) = opts.metrics.0 {
        let m = state.clone();
        let scrape = move || {
            let m = m.clone();
            async move { admin::metrics_text(&m).await }
        };
        let router = Router::new()
            .route("/metrics", get(scrape.clone()))
            .route("/stats/prometheus", get(scrape));
        tasks.push(spawn("metrics", a, router));
    }
    if let Some(a) = opts.admin.0 {
        tasks.push(spawn("admin", a, admin::router(state.clone())));
    }
    if let Some(a) = opts.readiness.0 {
        let ready = state.ready.clone();
        let router = Router::new().route(
            "/healthz/ready",
            get(move || async move {
                match ready.check() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                    Err(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                }
            }),
        );
        tasks.push(spawn("readiness", a, router));
    }
    Servers(tasks)
}

/// Unknown paths: 404 naming the path and what exists, rather than an
/// empty body a person at a terminal cannot act on.
async fn not_found(known: &'static str, req: Request) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("no such path {:?} (known: {known})\n", req.uri().path()),
    )
        .into_response()
}

/// A request log at debug level: silent by default, there when someone
/// turns debug on to see who is polling.
async fn log_request(req: Request, next: Next) -> Response {
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let resp = next.run(req).await;
    tracing::debug!("http {method} {uri} -> {}", resp.status().as_u16());
    resp
}

fn spawn(name: &'static str, addr: SocketAddr, router: Router) -> JoinHandle<()> {
    let known: &'static str = match name {
        "metrics" => "/metrics, /stats/prometheus",
        "admin" => admin::KNOWN,
        _ => "/healthz/ready",
    };
    let router = router
        .fallback(move |req: Request| not_found(known, req))
        .layer(axum::middleware::from_fn(log_request));
    tokio::spawn(async move {
        let listener = bind_retrying(name, addr).await;
        match listener.local_addr() {
            Ok(a) => tracing::info!("{name}: serving http://{a}"),
            Err(_) => tracing::info!("{name}: serving http://{addr}"),
        }
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("{name} server on {addr} stopped: {e}");
        }
    })
}

async fn bind_retrying(name: &str, addr: SocketAddr) -> TcpListener {
    let mut failures = 0u32;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                if failures > 0 {
                    tracing::info!("{name}: bound {addr} after {failures} failed attempts");
                }
                return l;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::error!(
                        "{name}: cannot listen on {addr}: {e}; retrying every second \
                         (the data path is not affected)"
                    );
                }
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_parses_off_and_addresses() {
        assert_eq!("off".parse::<Listen>(), Ok(Listen(None)));
        assert_eq!(
            "127.0.0.1:15000".parse::<Listen>().unwrap().to_string(),
            "127.0.0.1:15000"
        );
        assert_eq!(
            "[::1]:0".parse::<Listen>().unwrap().0.map(|a| a.port()),
            Some(0)
        );
        let e = "15000".parse::<Listen>().unwrap_err();
        assert!(e.to_string().contains("\"15000\""), "{e}");
    }

    #[test]
    fn ready_waits_for_attach_and_the_first_xds_response() {
        let r = Readiness::new(None);
        assert!(r.check().is_err());
        r.set_attached();
        assert_eq!(r.check(), Ok(()));

        let (tx, rx) = watch::channel(XdsStatus::default());
        let r = Readiness::new(Some(rx));
        r.set_attached();
        tx.send_modify(|s| s.connected = true);
        assert!(r.check().unwrap_err().contains("xDS"));
        tx.send_modify(|s| s.responses = 1);
        assert_eq!(r.check(), Ok(()));
    }
}
