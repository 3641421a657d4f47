//! Upstream HTTP clients of one endpoint: the proxy's own HTTP/1 pool (see `pool`) and
//! hyper-util's pooled HTTP/2 client, both dialing through the one [`Connector`] of the
//! endpoint, and the request body type they send.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::{client::legacy::Client, rt::TokioTimer};

use super::{ProxyBody, exec::Exec, idle::IdleBody};
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

/// HTTP/2 upstreams: hyper-util's pooled client (one multiplexed connection).
type H2Pool = Client<Connector, UpstreamBody>;

/// HTTP/1 upstreams: the proxy's own pool.
type H1Pool = pool::H1Pool<UpstreamBody>;

/// How long an idle upstream HTTP/1 connection stays pooled.
pub const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

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
            h1: Arc::new(H1Pool::new(connector.clone(), POOL_IDLE_TIMEOUT)),
            h2: Client::builder(Exec)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(true)
                .build(connector.http2()),
        }
    }

    /// Closes idle HTTP/1 connections past the idle timeout (hyper-util sweeps its own).
    pub fn evict_idle(&self) {
        self.h1.evict_idle();
    }

    /// Sends `req` over HTTP/2 or HTTP/1.
    pub async fn send(
        &self,
        h2: bool,
        req: Request<UpstreamBody>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        if h2 {
            self.h2
                .request(req)
                .await
                .map(|r| r.map(BodyExt::boxed))
                .map_err(UpstreamError::H2)
        } else {
            self.h1
                .send(req)
                .await
                .map(|r| r.map(BodyExt::boxed))
                .map_err(UpstreamError::H1)
        }
    }
}

/// Why an upstream exchange failed, from either pool.
#[derive(Debug)]
pub enum UpstreamError {
    H1(pool::PoolError),
    H2(hyper_util::client::legacy::Error),
}

impl UpstreamError {
    /// No connection was made: nothing reached the upstream.
    pub fn is_connect(&self) -> bool {
        match self {
            Self::H1(e) => e.is_connect(),
            Self::H2(e) => e.is_connect(),
        }
    }
}
