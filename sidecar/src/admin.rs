//! The admin server (port 15020): `/live`, `/ready`, `/metrics`, `/config_dump`,
//! `/endpoints`, `/app-health/<container>/<probe>` (rewritten kubelet probes), and, from
//! localhost only, `/shutdown` (alias `/quitquitquit`, Istio's name, so scripts written
//! for Istio work unchanged) and `/log-level`.
//!
//! `POST /shutdown` is how a Job's app stops a classic sidecar when it is done: the proxy
//! drains like on SIGTERM and exits 0, so the pod can reach `Succeeded`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::{ConnectInfo, Query, State},
    http::{HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::net::TcpListener;

use crate::Context;

/// Changes the log filter at run time (`/log-level`).
pub struct LogLevel {
    current: Mutex<String>,
    apply: Box<ApplyFilter>,
}

type ApplyFilter = dyn Fn(&str) -> Result<(), String> + Send + Sync;

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLevel")
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl LogLevel {
    /// `initial` is the filter in force; `apply` installs a new one or explains why not.
    pub fn new(
        initial: &str,
        apply: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            current: Mutex::new(initial.to_owned()),
            apply: Box::new(apply),
        }
    }

    pub fn current(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn set(&self, filter: &str) -> Result<(), String> {
        (self.apply)(filter)?;
        if let Ok(mut c) = self.current.lock() {
            filter.clone_into(&mut c);
        }
        Ok(())
    }
}

/// The admin routes.
pub fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/config_dump", get(config_dump))
        .route("/endpoints", get(endpoints))
        .route("/explain", get(explain))
        .route("/app-health/{container}/{probe}", get(app_health))
        .route("/shutdown", post(shutdown))
        .route("/quitquitquit", post(shutdown))
        .route(
            "/log-level",
            get(get_log_level).post(set_log_level).put(set_log_level),
        )
        .with_state(ctx)
}

/// Serves the admin routes on `listener` for the life of the process.
pub async fn serve(ctx: Arc<Context>, listener: TcpListener) {
    let app = router(ctx).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin server failed");
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, body.into()).into_response()
}

fn json(body: &serde_json::Value) -> Response {
    let text =
        serde_json::to_string_pretty(body).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        text,
    )
        .into_response()
}

fn local_only(peer: SocketAddr) -> Result<(), Box<Response>> {
    if peer.ip().to_canonical().is_loopback() {
        Ok(())
    } else {
        Err(Box::new(text(
            StatusCode::FORBIDDEN,
            "this endpoint is only served to localhost\n",
        )))
    }
}

async fn ready(State(ctx): State<Arc<Context>>) -> Response {
    match ctx.not_ready_reason() {
        None => text(StatusCode::OK, "ready\n"),
        Some(reason) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn metrics(State(ctx): State<Arc<Context>>) -> Response {
    let snap = ctx.config.load();
    crate::outbound::explain::gauges(&snap.routes, &ctx.metrics, std::time::Instant::now());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        ctx.metrics.encode(),
    )
        .into_response()
}

async fn config_dump(State(ctx): State<Arc<Context>>) -> Response {
    let snap = ctx.config.load();
    // The config holds certificate *paths* only, never key material.
    let config = serde_json::to_value(&snap.config).unwrap_or(serde_json::Value::Null);
    json(&serde_json::json!({ "version": snap.version(), "config": config }))
}

async fn endpoints(State(ctx): State<Arc<Context>>) -> Response {
    let snap = ctx.config.load();
    let mut body = crate::outbound::explain::endpoints(&snap.routes, std::time::Instant::now());
    body["version"] = serde_json::json!(snap.version());
    json(&body)
}

/// `/explain?dst=10.96.0.12:9080[&method=GET][&path=/x][&header=name:value]...[&client=ip]`:
/// the decision the proxy would make now for such a request.
async fn explain(
    State(ctx): State<Arc<Context>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let mut dst = None;
    let mut method = None;
    let mut path = None;
    let mut client = None;
    let mut headers = http::HeaderMap::new();
    for (k, v) in params {
        match k.as_str() {
            "dst" => dst = Some(v),
            "method" => method = Some(v),
            "path" => path = Some(v),
            "client" => client = Some(v),
            "header" => {
                let Some((name, value)) = v.split_once(':') else {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("header {v:?} is not name:value\n"),
                    );
                };
                match (
                    http::HeaderName::try_from(name.trim()),
                    HeaderValue::try_from(value.trim()),
                ) {
                    (Ok(n), Ok(v)) => {
                        headers.append(n, v);
                    }
                    _ => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            format!("header {v:?} is not valid\n"),
                        );
                    }
                }
            }
            other => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {other:?}\n"),
                );
            }
        }
    }
    let Some(dst) = dst else {
        return text(StatusCode::BAD_REQUEST, "dst=<ip:port> is required\n");
    };
    let Ok(dst) = dst.parse::<SocketAddr>() else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("dst {dst:?} is not ip:port\n"),
        );
    };
    let client = match client.map(|c| c.parse::<IpAddr>()) {
        None => None,
        Some(Ok(ip)) => Some(ip),
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "client is not an IP address\n"),
    };
    let snap = ctx.config.load();
    let mut body = crate::outbound::explain::explain(
        &snap.routes,
        dst,
        method.as_deref(),
        path.as_deref(),
        &headers,
        client,
        std::time::Instant::now(),
    );
    body["version"] = serde_json::json!(snap.version());
    json(&body)
}

async fn app_health(State(ctx): State<Arc<Context>>, uri: Uri) -> Response {
    let Some(probe) = ctx.settings.app_probes.get(uri.path()) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no app probe is registered for {}\n", uri.path()),
        );
    };
    let host = ctx
        .settings
        .pod_ip
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let outcome = crate::app_health::check(probe, host).await;
    if outcome.status != StatusCode::OK {
        tracing::debug!(probe = uri.path(), detail = %outcome.detail, "app probe failed");
    }
    text(outcome.status, format!("{}\n", outcome.detail))
}

async fn shutdown(
    State(ctx): State<Arc<Context>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
) -> Response {
    if let Err(r) = local_only(peer) {
        return *r;
    }
    tracing::info!(%peer, path = %uri.path(), "shutdown requested on the admin port");
    ctx.shutdown.trigger();
    text(StatusCode::OK, "shutting down\n")
}

async fn get_log_level(
    State(ctx): State<Arc<Context>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if let Err(r) = local_only(peer) {
        return *r;
    }
    match &ctx.log {
        Some(l) => text(StatusCode::OK, format!("{}\n", l.current())),
        None => text(StatusCode::NOT_FOUND, "log level control is not enabled\n"),
    }
}

async fn set_log_level(
    State(ctx): State<Arc<Context>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: String,
) -> Response {
    if let Err(r) = local_only(peer) {
        return *r;
    }
    let Some(l) = &ctx.log else {
        return text(StatusCode::NOT_FOUND, "log level control is not enabled\n");
    };
    let filter = body.trim();
    match l.set(filter) {
        Ok(()) => {
            tracing::info!(filter, "log level changed");
            text(StatusCode::OK, format!("{filter}\n"))
        }
        Err(e) => text(
            StatusCode::BAD_REQUEST,
            format!("invalid log filter {filter:?}: {e}\n"),
        ),
    }
}
