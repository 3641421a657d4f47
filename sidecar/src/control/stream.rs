//! One watch subscription on the operator's stream API (docs/stream.md): `GET` the watch
//! path on the shared HTTP/2 channel, read ndjson lines, hand each message to the caller,
//! and reconnect with backoff and jitter, resuming with `since` = the newest version seen.
//! A stream silent for three heartbeat intervals is treated as dead.

use std::{future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};

use super::{
    backoff::Backoff,
    message::{LineTooLong, Lines, Message},
    target::Version,
    transport::{Channel, OperatorEndpoint, TransportError},
};
use crate::metrics::{Metrics, ReasonLabels, Static};

/// A stream that hears nothing for this many heartbeat intervals is dead.
pub const HEARTBEATS_MISSED: u32 = 3;

/// Why a watch stream ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("building the watch request: {0}")]
    Request(#[from] http::Error),
    #[error("the operator answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("no message for {0:?} (three heartbeat intervals)")]
    HeartbeatTimeout(Duration),
    #[error("the operator ended the stream")]
    Ended,
    #[error("reading the stream: {0}")]
    Read(hyper::Error),
    #[error(transparent)]
    LineTooLong(#[from] LineTooLong),
}

impl WatchError {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Transport(t) => t.label(),
            Self::Request(_) => "internal",
            Self::Status { status, .. } => match *status {
                StatusCode::NOT_FOUND => "not_found",
                StatusCode::SERVICE_UNAVAILABLE => "not_synced",
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "denied",
                _ => "http_status",
            },
            Self::HeartbeatTimeout(_) => "heartbeat_timeout",
            Self::Ended => "ended",
            Self::Read(_) => "read_error",
            Self::LineTooLong(_) => "line_too_long",
        }
    }
}

/// What the caller does with a message: keep its version as the resume point or not.
pub trait Handler: Send {
    /// Handles one data message (inbound or outbound, never a heartbeat).
    fn handle(&mut self, message: Message);
}

impl<F: FnMut(Message) + Send> Handler for F {
    fn handle(&mut self, message: Message) {
        self(message);
    }
}

/// A watch: where it reads from and how long silence may last.
#[derive(Debug, Clone)]
pub struct Watch {
    pub channel: Arc<Channel>,
    pub endpoint: OperatorEndpoint,
    /// The operator's heartbeat interval (`--stream-heartbeat-interval`).
    pub heartbeat: Duration,
    /// For logs: `inbound shop/web-1`, `outbound 10.96.0.12:80`.
    pub what: String,
}

impl Watch {
    fn silence(&self) -> Duration {
        self.heartbeat.saturating_mul(HEARTBEATS_MISSED)
    }

    /// Reads one connection's worth of messages. Returns after the stream ends; `since`
    /// is advanced past every data message handed over.
    async fn once(
        &self,
        path: &str,
        since: &mut Option<Version>,
        backoff: &mut Backoff,
        handler: &mut impl Handler,
    ) -> Result<(), WatchError> {
        let req = Request::get(self.endpoint.uri(path)?)
            .header(http::header::ACCEPT, "application/x-ndjson")
            .body(Full::new(Bytes::new()))?;
        let resp = tokio::time::timeout(self.silence(), self.channel.send(req))
            .await
            .map_err(|_| WatchError::HeartbeatTimeout(self.silence()))??;
        let status = resp.status();
        let mut body = resp.into_body();
        if status != StatusCode::OK {
            let text = tokio::time::timeout(Duration::from_secs(5), body.collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| {
                    String::from_utf8_lossy(&b.to_bytes())
                        .chars()
                        .take(512)
                        .collect()
                })
                .unwrap_or_default();
            return Err(WatchError::Status { status, body: text });
        }
        let mut lines = Lines::default();
        loop {
            let frame = match tokio::time::timeout(self.silence(), body.frame()).await {
                Err(_) => return Err(WatchError::HeartbeatTimeout(self.silence())),
                Ok(None) => return Err(WatchError::Ended),
                Ok(Some(Err(e))) => return Err(WatchError::Read(e)),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for line in lines.push(&data)? {
                let message = match Message::parse(&line) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(what = %self.what, error = %e, "skipping a stream line that is not a known message");
                        continue;
                    }
                };
                backoff.reset();
                if let Message::Heartbeat { .. } = message {
                    continue;
                }
                let version = Version(message.version());
                *since = Some(since.map_or(version, |s| s.max(version)));
                handler.handle(message);
            }
        }
    }

    /// Watches `path(since)` until `stop` resolves, reconnecting with backoff.
    pub async fn run(
        self,
        path: impl Fn(Option<Version>) -> String + Send,
        mut handler: impl Handler,
        metrics: Arc<Metrics>,
        stop: impl Future<Output = ()>,
    ) {
        let mut since = None;
        let mut backoff = Backoff::stream();
        tokio::pin!(stop);
        loop {
            let current = path(since);
            let result = tokio::select! {
                () = &mut stop => return,
                r = self.once(&current, &mut since, &mut backoff, &mut handler) => r,
            };
            let e = match result {
                Ok(()) => WatchError::Ended,
                Err(e) => e,
            };
            if matches!(e, WatchError::HeartbeatTimeout(_)) {
                // The shared connection is probably dead too; dial afresh.
                self.channel.reset().await;
            }
            metrics
                .control_stream_reconnects
                .get_or_create(&ReasonLabels {
                    reason: Static(e.label()),
                })
                .inc();
            let wait = backoff.next_delay();
            tracing::info!(what = %self.what, error = %e, retry_in = ?wait, ?since, "config stream interrupted; the last good config keeps serving");
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
