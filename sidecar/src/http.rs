//! HTTP proxying with hyper: a server per detected connection (HTTP/1.1 with keep-alive,
//! chunked bodies, `100-continue` and upgrades; or HTTP/2 with trailers and streaming, so
//! gRPC works) and pooled upstream clients (one for HTTP/1.1, one for HTTP/2 with prior
//! knowledge). Per request: pick the upstream (outbound: route and balance; inbound: the
//! original destination), drop hop-by-hop headers (RFC 9110 §7.6.1), add `x-request-id`,
//! start a new span in the trace headers, forward, and answer failures with a status and
//! an `x-remora-proxy-error` reason header instead of hanging.

use std::{
    collections::HashMap,
    convert::Infallible,
    error::Error as _,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use arc_swap::ArcSwap;

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
    header::{self, HeaderName},
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body_util::{BodyExt, Either, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use remora_crds::proxy::{Protocol, UnknownDestinations};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    Context,
    addr::{ClientAddr, Direction, OrigDstAddr},
    authz::{self, Access},
    config::ConfigStore,
    metrics::{DirLabels, Metrics, OutcomeLabels, Peer, RequestLabels, Static},
    pool,
    tls::{EndpointConnector, IdentityStore},
    trace,
};

/// The body type of every response the proxy sends.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The header that carries the reason of a response the proxy generated itself.
pub static PROXY_ERROR: HeaderName = HeaderName::from_static("x-remora-proxy-error");

/// Marks an HTTP/1 request carried over HTTP/2 between two proxies; the receiving proxy
/// removes it and talks HTTP/1 to its application.
pub static ORIG_PROTO: HeaderName = HeaderName::from_static("remora-orig-proto");

/// The body of a request sent upstream: streamed, or buffered whole (see [`buffered`]).
type UpstreamBody = Either<Incoming, Full<Bytes>>;

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
type H2Pool = Client<EndpointConnector, UpstreamBody>;

/// HTTP/1 upstreams: the proxy's own pool (see `pool`).
type H1Pool = pool::H1Pool<UpstreamBody>;

/// HTTP/1 bodies of a known length up to this size are read whole before they are sent on
/// (requests) or answered with (responses). A proxied message then crosses from the
/// connection that read it to the one that writes it in one step, instead of a body
/// channel handing over each chunk between two tasks: fewer task wake-ups per request,
/// which is most of what a small request costs the proxy above its syscalls.
pub const BUFFER_LIMIT: u64 = 16 * 1024;

/// How long an idle upstream HTTP/1 connection stays pooled.
pub const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// How long an inbound HTTP/1 connection from an authenticated mesh peer may wait for its
/// next request (hyper's header read timeout also bounds the wait between requests on a
/// kept-alive connection). Longer than the peer's pool keeps an idle connection, so the
/// peer always closes first: no request is ever sent on a connection this side is
/// closing, and the peer's pool stays warm across pauses instead of paying a new mTLS
/// handshake after each one.
pub const MESH_PEER_IDLE_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(POOL_IDLE_TIMEOUT.as_secs() + 30);

/// How long an outbound HTTP/1 connection from the pod's own app may wait for its next
/// request: long (Envoy's default downstream idle timeout), so that the app's client pool,
/// whatever its idle timeout (Go's is 90 s), closes first and never sends a request on a
/// connection the proxy is closing. Slow request heads are not a threat from the pod's
/// own app; `--header-read-timeout` guards the inbound side.
pub const APP_CLIENT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The HTTP/1 and HTTP/2 pools of one upstream endpoint.
#[derive(Debug, Clone)]
struct EndpointPools {
    h1: Arc<H1Pool>,
    h2: Arc<H2Pool>,
    /// The sweep tick ([`Clients::tick`]) at which a request last used them.
    last_used: Arc<AtomicU64>,
}

/// Pooled upstream clients, one pair per endpoint (and plain/mTLS), created on first use
/// and read without locks. Pools outlive config versions, so a reload keeps connections;
/// [`Clients::prune`] forgets the pools of endpoints no request used for a while, so
/// endpoint churn (and passthrough destinations) do not grow the map forever.
#[derive(Debug)]
pub struct Clients {
    connect_timeout: std::time::Duration,
    config: Arc<ConfigStore>,
    identity: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    pools: ArcSwap<HashMap<(SocketAddr, bool), EndpointPools>>,
    epoch: Instant,
    /// Seconds since `epoch` at the last [`Clients::prune`]: what a request stamps on the
    /// pools it uses, so the per-request path reads an atomic instead of the clock.
    tick: AtomicU64,
}

impl Clients {
    pub fn new(
        connect_timeout: std::time::Duration,
        config: Arc<ConfigStore>,
        identity: Arc<IdentityStore>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            connect_timeout,
            config,
            identity,
            metrics,
            pools: ArcSwap::default(),
            epoch: Instant::now(),
            tick: AtomicU64::new(0),
        }
    }

    /// How many endpoints have pools.
    pub fn len(&self) -> usize {
        self.pools.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the pools no request used for `idle` or longer, to within the time between
    /// two calls (requests stamp the previous call's time). Their idle connections close;
    /// requests in flight hold their own handle and finish. Returns how many.
    pub fn prune(&self, idle: std::time::Duration) -> usize {
        let now = self.epoch.elapsed().as_secs();
        self.tick.store(now, Ordering::Relaxed);
        let stale = |p: &EndpointPools| {
            now.saturating_sub(p.last_used.load(Ordering::Relaxed)) >= idle.as_secs()
        };
        let pools = self.pools.load();
        pools.values().for_each(|p| p.h1.evict_idle());
        if !pools.values().any(stale) {
            return 0;
        }
        let mut removed = 0;
        self.pools.rcu(|current| {
            let next: HashMap<_, _> = current
                .iter()
                .filter(|(_, p)| !stale(p))
                .map(|(k, p)| (*k, p.clone()))
                .collect();
            removed = current.len() - next.len();
            next
        });
        removed
    }

    /// The client for `addr` (over mesh mTLS when `mtls`), HTTP/2 or HTTP/1.
    fn get(&self, addr: SocketAddr, mtls: bool, h2: bool) -> Upstream {
        let key = (addr, mtls);
        let now = self.tick.load(Ordering::Relaxed);
        let pick = |p: &EndpointPools| {
            // A plain store: the sweep only needs to see "since the last sweep".
            if p.last_used.load(Ordering::Relaxed) != now {
                p.last_used.store(now, Ordering::Relaxed);
            }
            if h2 {
                Upstream::H2(p.h2.clone())
            } else {
                Upstream::H1(p.h1.clone())
            }
        };
        if let Some(p) = self.pools.load().get(&key) {
            return pick(p);
        }
        let connector = EndpointConnector::new(
            addr,
            mtls,
            self.connect_timeout,
            self.config.clone(),
            self.identity.clone(),
            self.metrics.clone(),
        );
        let pools = EndpointPools {
            h1: Arc::new(H1Pool::new(connector.clone(), POOL_IDLE_TIMEOUT)),
            h2: Arc::new(
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .http2_only(true)
                    .build(connector),
            ),
            last_used: Arc::new(AtomicU64::new(now)),
        };
        let mut chosen = pools.clone();
        self.pools.rcu(|current| {
            let mut next = HashMap::clone(current);
            chosen = next.entry(key).or_insert_with(|| pools.clone()).clone();
            next
        });
        pick(&chosen)
    }
}

/// The pool a request goes to.
enum Upstream {
    H1(Arc<H1Pool>),
    H2(Arc<H2Pool>),
}

/// Why an upstream exchange failed, from either pool.
enum UpstreamError {
    H1(pool::PoolError),
    H2(hyper_util::client::legacy::Error),
}

impl Upstream {
    async fn send(self, req: Request<UpstreamBody>) -> Result<Response<ProxyBody>, UpstreamError> {
        match self {
            Self::H1(pool) => pool
                .send(req)
                .await
                .map(|r| r.map(BodyExt::boxed))
                .map_err(UpstreamError::H1),
            Self::H2(client) => client
                .request(req)
                .await
                .map(|r| r.map(BodyExt::boxed))
                .map_err(UpstreamError::H2),
        }
    }
}

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

/// Serves one HTTP connection until it ends or shutdown drains it.
pub async fn serve<I>(ctx: Arc<Context>, meta: Arc<ConnMeta>, io: I, http2: bool)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let ctx = ctx.clone();
        let meta = meta.clone();
        service_fn(move |req| {
            let ctx = ctx.clone();
            let meta = meta.clone();
            async move { Ok::<_, Infallible>(handle(&ctx, &meta, req).await) }
        })
    };
    // Detection already chose the protocol, so each gets hyper's own server (the `auto`
    // builder would add a version sniffing layer to every read).
    let io = TokioIo::new(io);
    let result = if http2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(ctx.settings.max_header_bytes).unwrap_or(u32::MAX))
            .serve_connection(io, service);
        // HTTP/2: GOAWAY, then the streams in flight finish.
        until_drained(&ctx, conn, |c| c.graceful_shutdown()).await
    } else {
        let head_timeout = match (meta.direction, &meta.peer.0) {
            (Direction::Outbound, _) => APP_CLIENT_IDLE_TIMEOUT,
            (Direction::Inbound, Some(_)) => MESH_PEER_IDLE_TIMEOUT,
            (Direction::Inbound, None) => ctx.settings.header_read_timeout,
        }
        .max(ctx.settings.header_read_timeout);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(head_timeout)
            .max_buf_size(ctx.settings.max_header_bytes.max(8192))
            .keep_alive(true)
            .serve_connection(io, service)
            .with_upgrades();
        // HTTP/1: close once the response in flight is written.
        until_drained(&ctx, conn, |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        tracing::debug!(direction = %meta.direction, client = %meta.client, error = %e, "HTTP connection ended with an error");
    }
}

/// Runs `conn` to its end; once the proxy shuts down, `graceful` asks it to finish what
/// is in flight and stop.
async fn until_drained<C>(
    ctx: &Context,
    conn: C,
    graceful: fn(Pin<&mut C>),
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = ctx.shutdown.signaled() => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}

async fn handle(ctx: &Context, meta: &ConnMeta, req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    let downstream_version = req.version();
    let (mut resp, peer) = match forward(ctx, meta, req).await {
        Ok(ok) => ok,
        Err(e) => {
            ctx.metrics
                .proxy_errors
                .get_or_create(&OutcomeLabels {
                    direction: meta.direction,
                    outcome: Static(e.label()),
                })
                .inc();
            tracing::debug!(direction = %meta.direction, client = %meta.client, orig_dst = %meta.orig_dst, error = %e, "request failed");
            (e.into_response(), Peer::default())
        }
    };
    *resp.version_mut() = downstream_version;
    ctx.metrics
        .requests
        .get_or_create(&RequestLabels {
            direction: meta.direction,
            status: resp.status().as_u16(),
            peer_identity: peer,
        })
        .inc();
    ctx.metrics
        .request_duration
        .get_or_create(&DirLabels {
            direction: meta.direction,
        })
        .observe(start.elapsed().as_secs_f64());
    resp
}

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("service {0} has no ready endpoints")]
    NoEndpoints(Arc<str>),
    #[error("destination {0} is not in the config and unknown destinations are denied")]
    UnknownDenied(OrigDstAddr),
    #[error("upstream {0} refused the connection")]
    ConnectRefused(Authority),
    #[error("timed out connecting to upstream {0}")]
    ConnectTimeout(Authority),
    #[error("cannot connect to upstream {0}: {1}")]
    Connect(Authority, String),
    #[error("upstream {0} did not answer within {1:?}")]
    RequestTimeout(Authority, std::time::Duration),
    #[error("upstream {0} failed: {1}")]
    Upstream(Authority, String),
    #[error("cannot read the request body: {0}")]
    ClientBody(String),
    #[error("unauthorized: {peer} may not {method} {path} on port {port}")]
    Unauthorized {
        peer: String,
        method: String,
        path: String,
        port: u16,
    },
}

impl ProxyError {
    fn label(&self) -> &'static str {
        match self {
            Self::NoEndpoints(_) => "no_endpoints",
            Self::UnknownDenied(_) => "unknown_denied",
            Self::ConnectRefused(_) => "connect_refused",
            Self::ConnectTimeout(_) => "connect_timeout",
            Self::Connect(..) => "connect_error",
            Self::RequestTimeout(..) => "request_timeout",
            Self::Upstream(..) => "upstream_error",
            Self::ClientBody(_) => "client_body_error",
            Self::Unauthorized { .. } => "unauthorized",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::NoEndpoints(_) | Self::ConnectTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UnknownDenied(_) | Self::Unauthorized { .. } => StatusCode::FORBIDDEN,
            Self::ClientBody(_) => StatusCode::BAD_REQUEST,
            Self::RequestTimeout(..) => StatusCode::GATEWAY_TIMEOUT,
            Self::ConnectRefused(_) | Self::Connect(..) | Self::Upstream(..) => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    fn from_upstream(authority: Authority, e: &UpstreamError) -> Self {
        // The chain below the pool's own wrapper: what failed, down to the I/O error.
        let (is_connect, top, mut source): (bool, &(dyn std::error::Error + 'static), _) = match e {
            UpstreamError::H1(e) => (e.is_connect(), e, Some(e.cause())),
            UpstreamError::H2(e) => (e.is_connect(), e, e.source()),
        };
        let mut detail = String::new();
        let mut io_kind = None;
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                io_kind.get_or_insert(io.kind());
            }
            if !detail.is_empty() {
                detail.push_str(": ");
            }
            detail.push_str(&s.to_string());
            source = s.source();
        }
        if is_connect {
            match io_kind {
                Some(std::io::ErrorKind::ConnectionRefused) => Self::ConnectRefused(authority),
                Some(std::io::ErrorKind::TimedOut) => Self::ConnectTimeout(authority),
                _ => Self::Connect(authority, detail),
            }
        } else {
            Self::Upstream(
                authority,
                if detail.is_empty() {
                    top.to_string()
                } else {
                    detail
                },
            )
        }
    }

    fn into_response(self) -> Response<ProxyBody> {
        let msg = self.to_string();
        let reason =
            HeaderValue::from_str(&msg).unwrap_or_else(|_| HeaderValue::from_static(self.label()));
        let mut resp = Response::new(full(format!("{msg}\n")));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(&PROXY_ERROR, reason);
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

/// A complete body.
pub fn full(text: impl Into<Bytes>) -> ProxyBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn forward(
    ctx: &Context,
    meta: &ConnMeta,
    mut req: Request<Incoming>,
) -> Result<(Response<ProxyBody>, Peer), ProxyError> {
    let downstream_h2 = req.version() == Version::HTTP_2;
    let upgrade = !downstream_h2 && is_upgrade(req.headers());
    let mut mtls = false;
    // An HTTP/1 request that rode HTTP/2 between two proxies goes on as HTTP/1.
    let mut orig_h1 = false;
    // `authority` names the endpoint (in errors); `addr` is where the connection goes.
    let (authority, addr, upstream_h2, timeout, peer) = match meta.direction {
        Direction::Inbound => {
            authorize(ctx, meta, &req)?;
            // Only a mesh peer may ask for the downgrade; strip the header from anyone.
            let marked = req
                .headers_mut()
                .remove(&ORIG_PROTO)
                .is_some_and(|v| v == "HTTP/1.1");
            let h1 = marked && meta.peer.0.is_some();
            (
                meta.orig_authority.clone(),
                meta.orig_dst.0,
                downstream_h2 && !h1,
                None,
                meta.peer.clone(),
            )
        }
        Direction::Outbound => {
            let snap = ctx.config.load();
            match snap.routes.lookup(meta.orig_dst.0) {
                Some(target) => {
                    let svc = target.service();
                    let ep = target
                        .pick(Some(req.headers()))
                        .map_err(|e| ProxyError::NoEndpoints(e.service))?;
                    let mut h2 =
                        downstream_h2 || matches!(svc.protocol, Protocol::Http2 | Protocol::Grpc);
                    if ep.meshed && ep.identity.is_some() && ctx.identity.current().is_some() {
                        mtls = true;
                        // Between proxies, HTTP/1 requests share one multiplexed HTTP/2
                        // mTLS connection (upgrades keep their own HTTP/1 connection),
                        // unless `--mesh-protocol http1` keeps them on HTTP/1.
                        if !h2 && !upgrade && ctx.settings.mesh_http2 {
                            h2 = true;
                            orig_h1 = true;
                        }
                    }
                    (
                        ep.authority.clone(),
                        ep.addr,
                        h2,
                        svc.request_timeout,
                        Peer(ep.identity.clone()),
                    )
                }
                None => match snap.config.outbound.unknown_destinations {
                    UnknownDestinations::Deny => {
                        return Err(ProxyError::UnknownDenied(meta.orig_dst));
                    }
                    UnknownDestinations::Passthrough => (
                        meta.orig_authority.clone(),
                        meta.orig_dst.0,
                        downstream_h2,
                        None,
                        Peer::default(),
                    ),
                },
            }
        }
    };

    strip_hop_by_hop(req.headers_mut(), upgrade);
    if orig_h1 {
        req.headers_mut()
            .insert(&ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    }
    trace::ensure_request_id(req.headers_mut());
    trace::new_span(req.headers_mut());
    // HTTP/1 names the authority in `Host`: the request's own, else the endpoint's.
    if !upstream_h2
        && !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(req.uri().authority().unwrap_or(&authority).as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    // HTTP/2 keeps the request's own authority as `:authority` (the pool of `addr` decides
    // where the connection goes); HTTP/1 sends the origin form, `Host` naming the authority.
    let mut parts = http::uri::Parts::default();
    if upstream_h2 {
        let request_authority = req.uri().authority().cloned().or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        });
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(request_authority.unwrap_or_else(|| authority.clone()));
    }
    parts.path_and_query = Some(path);
    *req.uri_mut() = Uri::from_parts(parts)
        .map_err(|e| ProxyError::Upstream(authority.clone(), e.to_string()))?;
    *req.version_mut() = if upstream_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };

    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let head = req.method() == Method::HEAD;
    let req = if !downstream_h2 && !upgrade && buffered(req.headers()) {
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| ProxyError::ClientBody(e.to_string()))?
            .to_bytes();
        Request::from_parts(parts, Either::Right(Full::new(bytes)))
    } else {
        req.map(Either::Left)
    };
    let fut = ctx.clients.get(addr, mtls, upstream_h2).send(req);
    let result = match timeout {
        Some(t) => tokio::time::timeout(t, fut)
            .await
            .map_err(|_| ProxyError::RequestTimeout(authority.clone(), t))?,
        None => fut.await,
    };
    let mut resp = result.map_err(|e| ProxyError::from_upstream(authority.clone(), &e))?;

    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    // A HEAD, 204 or 304 answer has a length but no body to read.
    let bodiless =
        head || matches!(
            resp.status(),
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        ) || resp.status().is_informational();
    if resp.version() == Version::HTTP_11 && !bodiless && buffered(resp.headers()) {
        let (parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| ProxyError::Upstream(authority.clone(), e.to_string()))?
            .to_bytes();
        resp = Response::from_parts(parts, full(bytes));
    }
    if let (Some(downstream), true) = (downstream_upgrade, switching) {
        let upstream = hyper::upgrade::on(&mut resp);
        let metrics_direction = meta.direction;
        tokio::spawn(async move {
            match tokio::try_join!(downstream, upstream) {
                Ok((down, up)) => {
                    let mut down = TokioIo::new(down);
                    let mut up = TokioIo::new(up);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                        tracing::debug!(direction = %metrics_direction, error = %e, "upgraded connection ended with an error");
                    }
                }
                Err(e) => {
                    tracing::debug!(direction = %metrics_direction, error = %e, "upgrade failed")
                }
            }
        });
        strip_hop_by_hop(resp.headers_mut(), true);
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    Ok((resp, peer))
}

/// Inbound authorization of one request; a denial is counted and logged with the peer.
fn authorize(ctx: &Context, meta: &ConnMeta, req: &Request<Incoming>) -> Result<(), ProxyError> {
    let snap = ctx.config.load();
    let port = meta.orig_dst.0.port();
    let policy = snap.config.inbound.for_port(port);
    let access = Access {
        port,
        http: Some((req.method().as_str(), req.uri().path())),
    };
    let peer = meta.peer.0.as_deref();
    let allowed = authz::allowed(policy.authorization, peer, access);
    let outcome = if allowed { "allow" } else { "deny" };
    ctx.metrics
        .authz
        .get_or_create(&OutcomeLabels {
            direction: meta.direction,
            outcome: Static(outcome),
        })
        .inc();
    if allowed {
        return Ok(());
    }
    let peer = peer.unwrap_or("an unauthenticated client").to_owned();
    tracing::info!(client = %meta.client, %peer, method = %req.method(), path = req.uri().path(), port, "request denied by authorization policy");
    Err(ProxyError::Unauthorized {
        peer,
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        port,
    })
}

/// An HTTP/1.1 request asking to switch protocols (`Connection: upgrade` + `Upgrade`).
fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// An HTTP/1 message whose body is read whole: one `Content-Length` of at most
/// [`BUFFER_LIMIT`] and no `Transfer-Encoding` (so no chunked framing, no trailers, nothing
/// streamed, and the read is bounded), and no `Expect: 100-continue` (that client waits
/// for the upstream's word before it sends).
fn buffered(h: &HeaderMap) -> bool {
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    let small = match (lengths.next(), lengths.next()) {
        (Some(v), None) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n <= BUFFER_LIMIT),
        _ => false,
    };
    small && !h.contains_key(header::EXPECT) && !h.contains_key(header::TRANSFER_ENCODING)
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1: `Connection` and the fields it
/// names, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade` (kept, with
/// `Connection: upgrade`, when `upgrade`), and `TE` except `trailers` (which gRPC needs).
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(upgrade && n == header::UPGRADE))
            .collect();
        for n in named {
            if n != header::TE {
                h.remove(n);
            }
        }
        h.remove(header::CONNECTION);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    if let Some(te) = h.get(header::TE) {
        let trailers = te
            .to_str()
            .map(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
            .unwrap_or(false);
        if trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            h.remove(header::TE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_endpoint_pools_are_pruned() {
        let metrics = Arc::new(Metrics::new());
        let config = Arc::new(ConfigStore::new(Default::default(), &metrics));
        let clients = Clients::new(
            std::time::Duration::from_secs(1),
            config,
            Arc::default(),
            metrics,
        );
        let a: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:80".parse().expect("addr");
        let _ = clients.get(a, false, false);
        let _ = clients.get(a, false, true);
        let _ = clients.get(b, true, true);
        assert_eq!(clients.len(), 2, "one entry per endpoint and TLS mode");
        assert_eq!(clients.prune(std::time::Duration::from_secs(3600)), 0);
        assert_eq!(clients.len(), 2);
        assert_eq!(clients.prune(std::time::Duration::ZERO), 2);
        assert!(clients.is_empty());
        // A pruned endpoint gets a fresh pool on its next request.
        let _ = clients.get(a, false, false);
        assert_eq!(clients.len(), 1);
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["te", "x-end-to-end"]);
        assert_eq!(h.get(header::TE).expect("te"), "trailers");
    }

    #[test]
    fn only_small_known_length_bodies_are_read_whole() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert!(buffered(&h(&[("content-length", "1024")])));
        assert!(buffered(&h(&[("content-length", "16384")])));
        assert!(!buffered(&h(&[("content-length", "16385")])), "too big");
        assert!(!buffered(&h(&[])), "no length: streamed");
        assert!(!buffered(&h(&[("transfer-encoding", "chunked")])));
        assert!(
            !buffered(&h(&[
                ("content-length", "5"),
                ("transfer-encoding", "chunked")
            ])),
            "chunked wins over a length"
        );
        assert!(!buffered(&h(&[
            ("content-length", "5"),
            ("content-length", "5")
        ])));
        assert!(!buffered(&h(&[("content-length", "five")])));
        assert!(
            !buffered(&h(&[("content-length", "5"), ("expect", "100-continue")])),
            "the client waits for the upstream's 100 before it sends"
        );
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::CONNECTION).expect("connection"), "upgrade");
        assert_eq!(h.get(header::UPGRADE).expect("upgrade"), "websocket");
    }

    #[test]
    fn proxy_errors_map_to_statuses_with_a_reason() {
        let a = Authority::from_static("10.0.0.1:80");
        let resp = ProxyError::ConnectRefused(a.clone()).into_response();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            resp.headers().get(&PROXY_ERROR).expect("reason"),
            "upstream 10.0.0.1:80 refused the connection"
        );
        assert_eq!(
            ProxyError::NoEndpoints("a.b".into())
                .into_response()
                .status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ProxyError::ConnectTimeout(a.clone())
                .into_response()
                .status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ProxyError::RequestTimeout(a, std::time::Duration::from_secs(1))
                .into_response()
                .status(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }
}
