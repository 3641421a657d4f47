//! The operations endpoints on `--metrics-listen`: `/metrics` (Prometheus text format),
//! `/healthz` (the process serves) and `/readyz` (see [`Health`]).

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;

/// Readiness, set by the operator as it comes up: the discovery index has its first full
/// view, and leader election has answered (a standby is ready; a leader once its
/// controllers' caches are synced). Once ready it stays ready.
#[derive(Debug, Default)]
pub struct Health {
    controllers: AtomicBool,
    index: AtomicBool,
}

impl Health {
    pub fn set_controllers_ready(&self) {
        self.controllers.store(true, Ordering::Relaxed);
    }

    pub fn set_index_ready(&self) {
        self.index.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.controllers.load(Ordering::Relaxed) && self.index.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct AdminState {
    registry: Registry,
    health: Arc<Health>,
}

/// The router; `registry` is owned by it from now on.
pub fn router(registry: Registry, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(AdminState { registry, health }))
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    if state.health.is_ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
