//! The derived-config stream (`docs/stream.md`): proxies watch their Pod's inbound config
//! (`GET /v1/watch/inbound?pod=<ns>/<name>`) and the outbound config of each destination
//! they use (`GET /v1/watch/outbound?target=<target>`), as ndjson lines over HTTP/2, on the
//! CA's TLS listener, authenticated by their mesh client certificate.
//!
//! - [`request`]: query parsing (pure); [`auth`]: who may watch what (pure);
//! - [`piece`]: what a subscription carries, read from the index (pure);
//! - [`metrics`]: subscribers, messages, refusals (the lines themselves are
//!   [`remora_crds::wire::Message`], the type the proxy reads too);
//! - [`subscriber`]: one subscription's loop (latest version only, heartbeats);
//! - [`peer`]: the caller's SPIFFE ID from the TLS connection;
//! - this module: the routes.

pub mod auth;
pub mod metrics;
pub mod peer;
pub mod piece;
pub mod request;
pub mod subscriber;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, State},
    http::{HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use remora_crds::wire::ErrorBody;
use tokio::sync::watch;

use self::{
    auth::Refusal,
    metrics::StreamMetrics,
    peer::Peer,
    request::{InboundRequest, OutboundRequest},
    subscriber::{Subscriber, Watched},
};
use crate::index::watch::IndexHandle;

/// What the stream routes need.
#[derive(Debug, Clone)]
pub struct StreamState {
    pub index: IndexHandle,
    /// `--stream-heartbeat`.
    pub heartbeat: Duration,
    /// Turns true at shutdown: every stream ends, so the server can drain.
    pub stop: watch::Receiver<bool>,
    pub metrics: StreamMetrics,
}

impl StreamState {
    fn refuse(&self, peer: &Peer, r: &Refusal) -> Response {
        self.metrics.refused(r.reason());
        tracing::info!(peer = %peer.addr, caller = ?peer.spiffe_id, reason = r.reason(), "watch refused: {r}");
        let body = ErrorBody {
            error: r.reason().to_owned(),
            message: r.to_string(),
        };
        (
            r.status(),
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            serde_json::to_string(&body).unwrap_or_default(),
        )
            .into_response()
    }

    fn stream(&self, watched: Watched, since: Option<u64>) -> Response {
        let sub = Subscriber::new(
            self.index.clone(),
            watched,
            since,
            self.heartbeat,
            self.stop.clone(),
            self.metrics.clone(),
        );
        (
            StatusCode::OK,
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            Body::from_stream(sub.into_stream()),
        )
            .into_response()
    }

    fn synced(&self) -> Result<(), Refusal> {
        if self.index.is_synced() {
            Ok(())
        } else {
            Err(Refusal::NotSynced)
        }
    }

    fn outbound(&self, peer: &Peer, uri: &Uri) -> Result<Response, Refusal> {
        auth::authenticated(peer.spiffe_id.as_deref())?;
        let req = OutboundRequest::parse(uri.query())?;
        self.synced()?;
        let text = req.target.to_string();
        Ok(self.stream(
            Watched::Outbound {
                target: req.target,
                text,
            },
            req.since,
        ))
    }

    fn inbound(&self, peer: &Peer, uri: &Uri) -> Result<Response, Refusal> {
        let caller = peer.spiffe_id.as_deref();
        auth::authenticated(caller)?;
        let req = InboundRequest::parse(uri.query())?;
        // The pod counts as held once its derived piece exists (the snapshot may be ahead
        // of the last recomputation); its identity is the pod's current one.
        let owner = {
            let index = self.index.read();
            let snap = index.snapshot();
            index
                .inbound(&req.pod)
                .and_then(|_| snap.pods.get(&req.pod))
                .map(|p| snap.spiffe_id(&req.pod.namespace, &p.service_account))
        };
        auth::inbound(caller, &req.pod, owner.as_deref(), self.index.is_synced())?;
        Ok(self.stream(Watched::Inbound(req.pod), req.since))
    }
}

async fn watch_outbound(
    State(s): State<Arc<StreamState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    uri: Uri,
) -> Response {
    s.outbound(&peer, &uri)
        .unwrap_or_else(|r| s.refuse(&peer, &r))
}

async fn watch_inbound(
    State(s): State<Arc<StreamState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    uri: Uri,
) -> Response {
    s.inbound(&peer, &uri)
        .unwrap_or_else(|r| s.refuse(&peer, &r))
}

/// `GET /v1/watch/inbound` and `GET /v1/watch/outbound`; to be merged into the CA's
/// router and served with [`Peer`] as connect info.
pub fn router(state: StreamState) -> Router {
    Router::new()
        .route("/v1/watch/inbound", get(watch_inbound))
        .route("/v1/watch/outbound", get(watch_outbound))
        .with_state(Arc::new(state))
}
