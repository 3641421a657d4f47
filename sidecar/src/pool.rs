//! A pool of HTTP/1.1 connections to one upstream endpoint. A request takes an idle
//! connection (last in, first out, so the warmest) or dials a new one; the response body
//! hands its connection back when it ends. A pooled connection found closed when a request
//! tries it is skipped, and a request it could not send goes to another connection.
//!
//! A server may close a kept-alive connection just as a request goes out on it (its idle
//! timeout fires first: Node's is 5 s, gunicorn's 2 s). Such a request was sent but got no
//! answer; when it is idempotent and its body can be sent again, it is, once, on a new
//! connection, as Go's HTTP client does. Only requests on a connection that sat idle for
//! [`REPLAY_AFTER_IDLE`] keep the copy this needs, so a busy pool pays nothing for it.
//!
//! hyper-util's pooled client does the same for any protocol, and per request it also
//! clones and rewrites the URI, hashes a pool key and spawns a task that puts the
//! connection back once the response has been read; on the proxy's hot path (every
//! HTTP/1 request, mesh hops included) those are a measurable share of the proxy's own
//! work. HTTP/2 upstreams share one connection per endpoint ([`H2Pool`]).

use std::{
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use hyper::body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use tower::Service;

use crate::outbound::dial::Connector;

mod h2;
pub use h2::H2Pool;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request on a connection idle at least this long keeps a copy to send again (above).
pub const REPLAY_AFTER_IDLE: Duration = Duration::from_secs(1);

/// A request body that can be sent again, when it is complete in memory.
pub trait Replay: Sized {
    /// The same body again, if it can be had.
    fn replay(&self) -> Option<Self>;
}

/// A copy of an idempotent request whose body can be sent again.
fn copy_of<B: Replay>(req: &Request<B>) -> Option<Request<B>> {
    if !req.method().is_idempotent() {
        return None;
    }
    replay_of(req)
}

/// A copy of any request whose body can be sent again (retries decide on idempotence
/// themselves; mirrors copy every method).
pub fn replay_of<B: Replay>(req: &Request<B>) -> Option<Request<B>> {
    let mut copy = Request::new(req.body().replay()?);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Why a request did not get a response.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection: refused, timed out, or the TLS handshake failed.
    #[error("{0}")]
    Connect(BoxError),
    /// The HTTP handshake on a new connection failed (for HTTP/2, its preface and
    /// SETTINGS).
    #[error("{0}")]
    Handshake(hyper::Error),
    /// The request or its response failed on the connection.
    #[error("{0}")]
    Send(hyper::Error),
}

impl PoolError {
    /// No connection was made (nothing was sent).
    pub fn is_connect(&self) -> bool {
        !matches!(self, Self::Send(_))
    }

    /// The error this one wraps.
    pub fn cause(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Self::Connect(e) => &**e,
            Self::Handshake(e) | Self::Send(e) => e,
        }
    }
}

struct Idle<B> {
    send: SendRequest<B>,
    since: Instant,
}

/// The HTTP/1 connections of one endpoint; `B` is the request body.
pub struct H1Pool<B> {
    /// Also says how long a connection may stay idle (the policy's `timeouts.idle`).
    connector: Connector,
    idle: Mutex<Vec<Idle<B>>>,
}

impl<B> std::fmt::Debug for H1Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("connector", &self.connector)
            .field("idle", &self.lock().len())
            .finish()
    }
}

impl<B> H1Pool<B> {
    fn lock(&self) -> MutexGuard<'_, Vec<Idle<B>>> {
        // The list stays consistent even if a holder panicked: each step is one push/pop.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the idle connections older than the idle timeout or already closed.
    pub fn evict_idle(&self) {
        let timeout = self.connector.idle_timeout();
        self.lock()
            .retain(|i| i.since.elapsed() < timeout && !i.send.is_closed());
    }
}

impl<B> H1Pool<B>
where
    B: Body<Data = Bytes> + Replay + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// Idle connections older than the connector's idle timeout are closed, not used.
    pub fn new(connector: Connector) -> Self {
        Self {
            connector,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends `req` (its URI in origin form, with a `Host` header) on a pooled or new
    /// connection.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<B>,
    ) -> Result<Response<PooledBody<B>>, PoolError> {
        let mut replayed = false;
        loop {
            let (mut send, idle_for) = match self.checkout().await {
                Some((send, idle_for)) => (send, Some(idle_for)),
                None => (self.connect().await?, None),
            };
            let reused = idle_for.is_some();
            let copy = match idle_for {
                Some(idle) if idle >= REPLAY_AFTER_IDLE && !replayed => copy_of(&req),
                _ => None,
            };
            match send.try_send_request(req).await {
                Ok(resp) => {
                    // After `101 Switching Protocols` the connection belongs to the upgrade.
                    let slot = (resp.status() != StatusCode::SWITCHING_PROTOCOLS)
                        .then(|| (send, self.clone()));
                    return Ok(resp.map(|inner| PooledBody { inner, slot }));
                }
                Err(mut e) => match (e.take_message(), copy) {
                    // A pooled connection closed before the request went out: another.
                    (Some(unsent), _) if reused => req = unsent,
                    // Closed by the server as the request went out: send the copy.
                    (None, Some(copy)) if e.error().is_incomplete_message() => {
                        tracing::debug!(
                            "a kept-alive upstream connection closed under a request; sending it again"
                        );
                        req = copy;
                        replayed = true;
                    }
                    _ => return Err(PoolError::Send(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open and ready, and how long
    /// it sat idle.
    async fn checkout(&self) -> Option<(SendRequest<B>, Duration)> {
        loop {
            let Idle { mut send, since } = self.lock().pop()?;
            let idle_for = since.elapsed();
            if idle_for >= self.connector.idle_timeout() || send.is_closed() {
                continue;
            }
            if send.ready().await.is_ok() {
                return Some((send, idle_for));
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<B>, PoolError> {
        let io = self
            .connector
            .clone()
            .call(Uri::default())
            .await
            .map_err(PoolError::Connect)?;
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1 connection ended with an error");
            }
        });
        Ok(send)
    }
}

/// Puts a connection whose exchange is over back into its pool: at once when it is ready
/// for the next request, else once it is (a request body still being sent).
fn put<B: Send + 'static>(pool: Arc<H1Pool<B>>, mut send: SendRequest<B>) {
    if send.is_ready() {
        pool.lock().push(Idle {
            send,
            since: Instant::now(),
        });
    } else if !send.is_closed()
        && let Ok(rt) = tokio::runtime::Handle::try_current()
    {
        rt.spawn(async move {
            if send.ready().await.is_ok() {
                put(pool, send);
            }
        });
    }
}

/// A response body that gives its connection back to the pool when it ends.
pub struct PooledBody<B: Send + 'static> {
    inner: Incoming,
    slot: Option<(SendRequest<B>, Arc<H1Pool<B>>)>,
}

impl<B: Send + 'static> std::fmt::Debug for PooledBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("inner", &self.inner)
            .field("pooled", &self.slot.is_some())
            .finish()
    }
}

impl<B> Body for PooledBody<B>
where
    B: Body<Data = Bytes> + Replay + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled
            && let Some((send, pool)) = self.slot.take()
        {
            put(pool, send);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Send + 'static> Drop for PooledBody<B> {
    fn drop(&mut self) {
        // A body nobody read to its end: only an empty one (HEAD, 204, 304, length 0, which
        // a server may never poll) leaves its connection reusable; otherwise the unread
        // rest would be the next response's start, so the connection closes with `send`.
        if let Some((send, pool)) = self.slot.take()
            && self.inner.is_end_stream()
        {
            put(pool, send);
        }
    }
}
