//! The HTTP side: `/mutate` (pods) and `/validate-namespace` (the mesh's namespace label)
//! over TLS (axum on a rustls listener whose certificate reloads from disk) and the plain
//! `/metrics`, `/healthz`, `/readyz` endpoints. Every decision is logged and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::admission::{self, Decision};
use crate::events::EventRecorder;
use crate::inject::InjectConfig;
use crate::metrics::Metrics;
use crate::namespace::{self, NamespaceDecision};
use crate::tls::CertStore;

/// Shared state of the webhook, passed as `Arc`.
#[derive(Debug)]
pub struct Context {
    config: ArcSwap<InjectConfig>,
    /// The webhook's metrics.
    pub metrics: Metrics,
    ready: AtomicBool,
    events: Option<EventRecorder>,
}

impl Context {
    /// A context with the given injection settings.
    pub fn new(config: InjectConfig, metrics: Metrics) -> Self {
        metrics.native_sidecar.set(i64::from(config.native_sidecar));
        Self {
            config: ArcSwap::from_pointee(config),
            metrics,
            ready: AtomicBool::new(false),
            events: None,
        }
    }

    /// Records Events on pod owners through `recorder`.
    pub fn with_events(mut self, recorder: EventRecorder) -> Self {
        self.events = Some(recorder);
        self
    }

    /// The injection settings in force.
    pub fn config(&self) -> Arc<InjectConfig> {
        self.config.load_full()
    }

    /// Whether pods get native sidecars by default.
    pub fn native_sidecar(&self) -> bool {
        self.config.load().native_sidecar
    }

    /// Switches the default sidecar mode; returns whether it changed.
    pub fn set_native_sidecar(&self, native: bool) -> bool {
        let current = self.config.load_full();
        if current.native_sidecar == native {
            return false;
        }
        let mut next = (*current).clone();
        next.native_sidecar = native;
        self.config.store(Arc::new(next));
        self.metrics.native_sidecar.set(i64::from(native));
        true
    }

    /// Marks the webhook ready (its TLS listener is up).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// Handles one review: decide, log, count, answer.
pub fn handle_review(ctx: &Context, body: &[u8]) -> (StatusCode, Vec<u8>) {
    let start = Instant::now();
    let config = ctx.config();
    let r = admission::review(body, &config);
    let (ns, name) = (r.subject.namespace.as_str(), r.subject.name.as_str());
    match &r.decision {
        Decision::Injected { native_sidecar } => {
            tracing::info!(namespace = ns, pod = name, native_sidecar, "injected");
        }
        Decision::Skipped(reason) => tracing::info!(namespace = ns, pod = name, %reason, "skipped"),
        Decision::IgnoredOperation(op) => {
            tracing::debug!(namespace = ns, pod = name, operation = %op, "ignored")
        }
        Decision::Denied(msg) => {
            tracing::warn!(namespace = ns, pod = name, reason = %msg, "denied")
        }
        Decision::Error(msg) => {
            tracing::warn!(namespace = ns, pod = name, reason = %msg, "bad admission review")
        }
    }
    ctx.metrics
        .count_decision(r.decision.label(), r.decision.reason());
    if let Some(events) = &ctx.events {
        events.record(&r.decision, &r.subject);
    }
    let status = if r.bad_request {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let body = serde_json::to_vec(&r.response).unwrap_or_else(|e| {
        tracing::error!(error = %e, "encoding the admission response failed");
        Vec::new()
    });
    ctx.metrics
        .admission_duration
        .observe(start.elapsed().as_secs_f64());
    (status, body)
}

/// Handles one namespace review: decide, log, count, answer.
pub fn handle_namespace_review(ctx: &Context, body: &[u8]) -> (StatusCode, Vec<u8>) {
    let start = Instant::now();
    let r = namespace::review(body);
    match &r.decision {
        NamespaceDecision::Allowed => {
            tracing::debug!(namespace = %r.name, warnings = ?r.response.response.warnings, "namespace allowed");
        }
        NamespaceDecision::Denied(msg) => {
            tracing::info!(namespace = %r.name, reason = %msg, "namespace label refused");
        }
        NamespaceDecision::Error(msg) => {
            tracing::warn!(namespace = %r.name, reason = %msg, "bad admission review");
        }
    }
    ctx.metrics
        .count_decision(r.decision.label(), r.decision.reason());
    let status = if r.bad_request {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let body = serde_json::to_vec(&r.response).unwrap_or_else(|e| {
        tracing::error!(error = %e, "encoding the admission response failed");
        Vec::new()
    });
    ctx.metrics
        .admission_duration
        .observe(start.elapsed().as_secs_f64());
    (status, body)
}

async fn validate_namespace(State(ctx): State<Arc<Context>>, body: Bytes) -> Response {
    let (status, body) = handle_namespace_review(&ctx, &body);
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn mutate(State(ctx): State<Arc<Context>>, body: Bytes) -> Response {
    let (status, body) = handle_review(&ctx, &body);
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Largest AdmissionReview accepted.
pub const MAX_REVIEW_BYTES: usize = 8 * 1024 * 1024;

/// How long one request may take, its body included: the API server gives up on a
/// webhook after the configuration's `timeoutSeconds` (at most 30 s), so a request still
/// arriving later is a client holding a connection for nothing.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Refuses a body declared over [`MAX_REVIEW_BYTES`] from the head alone (413, without
/// waiting for bytes that would be thrown away), and cuts a request that takes longer
/// than [`REQUEST_TIMEOUT`] (408).
async fn bounded(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_REVIEW_BYTES as u64) {
        let why = format!("the review is over {MAX_REVIEW_BYTES} bytes");
        return (StatusCode::PAYLOAD_TOO_LARGE, why).into_response();
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            format!("the request took over {REQUEST_TIMEOUT:?}"),
        )
            .into_response(),
    }
}

/// The `/mutate` and `/validate-namespace` router.
pub fn mutate_router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate-namespace", post(validate_namespace))
        // Reviews carry the whole pod; the API server itself accepts bodies up to 3 MiB.
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .layer(axum::middleware::from_fn(bounded))
        .with_state(ctx)
}

/// The `/metrics`, `/healthz` and `/readyz` router.
pub fn health_router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(ctx): State<Arc<Context>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    ctx.metrics.render(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(ctx): State<Arc<Context>>| async move {
                if ctx.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .with_state(ctx)
}

/// A TLS listener for `axum::serve`: TCP accepts happen in a background task and each
/// handshake in its own task (with a timeout), so a slow client cannot stall others.
#[derive(Debug)]
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsListener {
    /// Wraps a bound TCP listener.
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                // Responses are small and latency-bound: no Nagle delay.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                }
                let acceptor = acceptor.clone();
                let conn_tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _closed = conn_tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Polls the certificate files every `interval` and swaps in valid changes.
pub async fn watch_certs(store: Arc<CertStore>, ctx: Arc<Context>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let s = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || s.reload_if_changed()).await {
            Ok(Ok(true)) => {
                tracing::info!("serving certificate reloaded");
                ctx.metrics.count_reload(true);
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "serving certificate not reloaded; the previous one stays");
                ctx.metrics.count_reload(false);
            }
            Err(e) => tracing::error!(error = %e, "certificate reload task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    async fn body_of(
        router: Router,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (StatusCode, String) {
        use tower_like::call;
        call(router, method, path, body).await
    }

    /// Minimal request helper: serve the router on loopback and speak HTTP/1.1 to it.
    mod tower_like {
        use super::*;
        pub async fn call(
            router: Router,
            method: &str,
            path: &str,
            body: &[u8],
        ) -> (StatusCode, String) {
            let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = tcp.local_addr().expect("addr");
            let server = tokio::spawn(async move { axum::serve(tcp, router).await });
            let req = format!(
                "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let mut payload = req.into_bytes();
            payload.extend_from_slice(body);
            let resp = tokio::task::spawn_blocking(move || {
                let mut s = std::net::TcpStream::connect(addr).expect("connect");
                s.write_all(&payload).expect("write");
                let mut out = String::new();
                s.read_to_string(&mut out).expect("read");
                out
            })
            .await
            .expect("join");
            server.abort();
            let code: u16 = resp
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .expect("status line");
            let body = resp
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default();
            (StatusCode::from_u16(code).expect("code"), body)
        }
    }

    #[tokio::test]
    async fn health_and_metrics_endpoints() {
        let ctx = Arc::new(Context::new(InjectConfig::default(), Metrics::new()));
        let (code, _) = body_of(health_router(ctx.clone()), "GET", "/readyz", b"").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        ctx.set_ready(true);
        let (code, _) = body_of(health_router(ctx.clone()), "GET", "/readyz", b"").await;
        assert_eq!(code, StatusCode::OK);
        let (code, body) = body_of(health_router(ctx.clone()), "GET", "/healthz", b"").await;
        assert_eq!((code, body.as_str()), (StatusCode::OK, "ok"));
        let (code, body) = body_of(mutate_router(ctx.clone()), "POST", "/mutate", b"{oops").await;
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(body.contains("malformed AdmissionReview"), "{body}");
        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Namespace"},
                        "name": "x", "operation": "CREATE",
                        "object": {"metadata": {"name": "x", "labels": {"remora.dev/inject": "yes-please"}}}}
        });
        let (code, body) = body_of(
            mutate_router(ctx.clone()),
            "POST",
            "/validate-namespace",
            review.to_string().as_bytes(),
        )
        .await;
        assert_eq!(code, StatusCode::OK);
        assert!(
            body.contains(r#""allowed":false"#) && body.contains("yes-please"),
            "{body}"
        );
        let (_, metrics) = body_of(health_router(ctx.clone()), "GET", "/metrics", b"").await;
        assert!(
            metrics.contains(
                r#"remora_webhook_admissions_total{decision="denied",reason="invalid-namespace-label"} 1"#
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains(
                r#"remora_webhook_admissions_total{decision="error",reason="bad-review"} 1"#
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains("remora_webhook_native_sidecar 1"),
            "{metrics}"
        );
    }

    #[test]
    fn native_mode_switch_updates_config_and_gauge() {
        let ctx = Context::new(InjectConfig::default(), Metrics::new());
        assert!(ctx.native_sidecar());
        assert!(ctx.set_native_sidecar(false));
        assert!(!ctx.set_native_sidecar(false));
        assert!(!ctx.config().native_sidecar);
        assert!(
            ctx.metrics
                .render()
                .contains("remora_webhook_native_sidecar 0")
        );
    }
}
