//! Upstream HTTP clients of one endpoint: the proxy's own HTTP/1 pool and its shared
//! HTTP/2 connection (see `pool`), both dialing through the one [`Connector`] of the
//! endpoint, and the request body type they send.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;

use super::{ProxyBody, idle::IdleBody};
use crate::{
    outbound::dial::{Connector, DialTarget, Dialer},
    pool,
};

/// The body of a request sent upstream: streamed (under the body idle timeout), or read
/// whole (see [`super::headers::buffered`]).
pub type UpstreamBody = Either<IdleBody<Incoming>, Full<Bytes>>;

impl pool::Replay for UpstreamBody {
    fn replay(&self) -> Option<Self> {
        match self {
            Either::Right(full) => Some(Either::Right(full.clone())),
            Either::Left(streamed) if hyper::body::Body::is_end_stream(streamed) => {
                Some(Either::Right(Full::new(Bytes::new())))
            }
            Either::Left(_) => None,
        }
    }
}

/// HTTP/2 upstreams: one multiplexed connection.
type H2Pool = pool::H2Pool<UpstreamBody>;

/// HTTP/1 upstreams: the proxy's own pool.
type H1Pool = pool::H1Pool<UpstreamBody>;

/// How long an idle upstream connection stays open unless the policy says otherwise.
pub use crate::outbound::dial::DEFAULT_IDLE_TIMEOUT as POOL_IDLE_TIMEOUT;

/// The HTTP/1 and HTTP/2 pools of one endpoint (plain or mTLS).
#[derive(Debug)]
pub struct Pools {
    h1: Arc<H1Pool>,
    h2: H2Pool,
}

impl Pools {
    pub fn new(dialer: Dialer, target: Arc<DialTarget>) -> Self {
        let connector = Connector::new(dialer, target);
        Self {
            h1: Arc::new(H1Pool::new(connector.clone())),
            h2: H2Pool::new(connector.http2()),
        }
    }

    /// Closes connections idle past the idle timeout, or found closed.
    pub fn evict_idle(&self) {
        self.h1.evict_idle();
        self.h2.evict_idle();
    }

    /// Sends `req` over HTTP/2 or HTTP/1.
    pub async fn send(
        &self,
        h2: bool,
        req: Request<UpstreamBody>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        if h2 {
            self.h2.send(req).await.map(|r| r.map(BodyExt::boxed))
        } else {
            self.h1.send(req).await.map(|r| r.map(BodyExt::boxed))
        }
    }
}

/// Why an upstream exchange failed, from either pool.
pub type UpstreamError = pool::PoolError;
