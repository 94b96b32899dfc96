//! Admin HTTP (127.0.0.1:15000 by default): the dump, the log level and
//! the metrics text, the same things `kmesh ctl` reaches over the Unix
//! socket, for tools that speak HTTP (and ztunnel users' habits).

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Query, Request},
    http::{header, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, MethodRouter},
    Router,
};

use super::{metrics::CONTENT_TYPE, Metrics, Readiness};
use crate::{admin::DumpFn, logging::LogControl};

pub const KNOWN: &str = "/config_dump, /logging, /stats, /access_log";

/// What the HTTP servers (and the Unix admin socket) serve from.
pub struct AdminState {
    pub dump: DumpFn,
    pub metrics: Arc<Metrics>,
    /// None when the process has no reloadable subscriber (embedded).
    pub log: Option<LogControl>,
    pub ready: Arc<Readiness>,
    /// The access log's format, switched at run time.
    pub access_log: Arc<crate::telemetry::AccessLog>,
    /// Where the admin socket hands CNI requests (None: CNI off).
    pub cni: Option<crate::cni::serve::Calls>,
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Metrics text; the scrape reads the maps, so off the async workers.
pub async fn metrics_text(state: &Arc<AdminState>) -> Response {
    let m = state.metrics.clone();
    match tokio::task::spawn_blocking(move || m.render()).await {
        Ok(Ok(body)) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
        }
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}\n")),
    }
}

async fn config_dump(state: Arc<AdminState>) -> Response {
    let dump = state.dump.clone();
    let json = tokio::task::spawn_blocking(move || serde_json::to_string_pretty(&dump())).await;
    match json {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body + "\n",
        )
            .into_response(),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("dump: {e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("dump: {e}\n")),
    }
}

/// GET shows the filter; POST/PUT `?level=SPEC` replaces it. Anything
/// wrong is a 400 naming it, and the level stays as it was.
type LoggingQuery =
    Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

async fn logging(state: Arc<AdminState>, method: Method, query: LoggingQuery) -> Response {
    let Some(log) = &state.log else {
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "this process's log level cannot be changed\n".into(),
        );
    };
    let params = match query {
        Ok(Query(p)) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad query: {e}\n")),
    };
    if method == Method::GET {
        if !params.is_empty() {
            return text(
                StatusCode::BAD_REQUEST,
                "GET /logging takes no parameters; change the level with POST /logging?level=...\n"
                    .into(),
            );
        }
        return text(StatusCode::OK, format!("{}\n", log.get()));
    }
    if let Some(k) = params.keys().find(|k| *k != "level") {
        return text(
            StatusCode::BAD_REQUEST,
            format!("unknown parameter {k:?} (only \"level\")\n"),
        );
    }
    let Some(spec) = params.get("level") else {
        return text(
            StatusCode::BAD_REQUEST,
            "missing ?level= (e.g. ?level=debug or ?level=kmesh=debug,info)\n".into(),
        );
    };
    match log.set(spec) {
        Ok(now) => text(StatusCode::OK, format!("{now}\n")),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// GET shows the access log's format; POST/PUT `?format=off|text|json`
/// switches it. Anything wrong is a 400 naming it, and nothing changes.
async fn access_log(state: Arc<AdminState>, method: Method, query: LoggingQuery) -> Response {
    let params = match query {
        Ok(Query(p)) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad query: {e}\n")),
    };
    if let Some(k) = params.keys().find(|k| *k != "format") {
        return text(
            StatusCode::BAD_REQUEST,
            format!("unknown parameter {k:?} (only \"format\")\n"),
        );
    }
    match (method == Method::GET, params.get("format")) {
        (true, None) => text(StatusCode::OK, format!("{}\n", state.access_log.get())),
        (true, Some(_)) => text(
            StatusCode::BAD_REQUEST,
            "GET /access_log takes no parameters; switch it with POST /access_log?format=...\n"
                .into(),
        ),
        (false, None) => text(
            StatusCode::BAD_REQUEST,
            "missing ?format= (off, text or json)\n".into(),
        ),
        (false, Some(f)) => match f.parse::<crate::telemetry::Format>() {
            Ok(f) => {
                state.access_log.set(f);
                tracing::info!("access log: {f} (admin)");
                text(StatusCode::OK, format!("{f}\n"))
            }
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
    }
}

/// 405 naming the methods a path takes (axum's own has an empty body).
fn only(methods: &'static str, route: MethodRouter) -> MethodRouter {
    route.fallback(move |req: Request| async move {
        text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} {} is not allowed (allowed: {methods})\n",
                req.method(),
                req.uri().path()
            ),
        )
    })
}

pub fn router(state: Arc<AdminState>) -> Router {
    let (s1, s2, s3, s4) = (state.clone(), state.clone(), state.clone(), state);
    let log = move |method: Method, q: LoggingQuery| logging(s2.clone(), method, q);
    let access = move |method: Method, q: LoggingQuery| access_log(s4.clone(), method, q);
    Router::new()
        .route(
            "/access_log",
            only(
                "GET, POST, PUT",
                get(access.clone()).post(access.clone()).put(access),
            ),
        )
        .route(
            "/config_dump",
            only("GET", get(move || config_dump(s1.clone()))),
        )
        .route(
            "/logging",
            only(
                "GET, POST, PUT",
                get(log.clone()).post(log.clone()).put(log),
            ),
        )
        .route(
            "/stats",
            only(
                "GET",
                get(move || {
                    let s = s3.clone();
                    async move { metrics_text(&s).await }
                }),
            ),
        )
}
