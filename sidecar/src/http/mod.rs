//! HTTP proxying with hyper, one concern per module:
//! - [`server`]: a hyper server per detected connection (HTTP/1.1 with keep-alive,
//!   chunked bodies, `100-continue` and upgrades; or HTTP/2 with trailers and streaming,
//!   so gRPC works), drained on shutdown;
//! - [`forward`]: the per-request pipeline: inbound admission, the request rewritten for
//!   its upstream (hop-by-hop headers dropped, `x-request-id` added, a new trace span),
//!   the exchange (inbound: the local app; outbound: [`crate::outbound::exchange`], where
//!   the traffic policy lives), the response written back, metrics and the access log;
//! - [`upstream`]: the pooled clients of one endpoint;
//! - [`error`]: why the proxy answered itself, as a status and an
//!   `x-remora-proxy-error` reason instead of a hang;
//! - [`coalesce`]: the writes of an HTTP/2 connection's turn, sent as one;
//! - [`exec`]: the executor hyper spawns HTTP/2 tasks on (large futures boxed);
//! - [`headers`]: hop-by-hop rules and which bodies are read whole;
//! - [`limits`], [`idle`], [`stall`]: what one client can hold (a body that stops, a
//!   response nobody reads, HTTP/2 streams), and the guards that enforce it.

pub mod coalesce;
pub mod error;
pub(crate) mod exec;
mod forward;
pub mod headers;
pub mod idle;
pub mod limits;
mod server;
pub mod stall;
pub mod upstream;
mod watchdog;

use bytes::Bytes;
use http::{header::HeaderName, uri::Authority};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

pub use self::{
    error::ProxyError,
    forward::{Exchange, Shape, prepare, read_small_body},
    headers::{BUFFER_LIMIT, strip_hop_by_hop},
    limits::HttpLimits,
    server::{APP_CLIENT_IDLE_TIMEOUT, MESH_PEER_IDLE_TIMEOUT, serve},
};
use crate::{
    addr::{ClientAddr, Direction, OrigDstAddr},
    metrics::Peer,
};

/// The body type of every response the proxy sends.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The header that carries the reason of a response the proxy generated itself.
pub static PROXY_ERROR: HeaderName = HeaderName::from_static("x-remora-proxy-error");

/// Marks an HTTP/1 request carried over HTTP/2 between two proxies; the receiving proxy
/// removes it and talks HTTP/1 to its application.
pub static ORIG_PROTO: HeaderName = HeaderName::from_static("remora-orig-proto");

/// What the HTTP layer knows about the connection it serves.
#[derive(Debug)]
pub struct ConnMeta {
    pub direction: Direction,
    pub client: ClientAddr,
    pub orig_dst: OrigDstAddr,
    /// `orig_dst` as an authority, built once per connection.
    pub orig_authority: Authority,
    /// The authenticated identity of the client (inbound mTLS), if any.
    pub peer: Peer,
}

/// A complete body.
pub fn full(text: impl Into<Bytes>) -> ProxyBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}
