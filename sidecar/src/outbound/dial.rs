//! One dialer for every upstream connection, TCP and HTTP alike: a TCP connect bounded by
//! the policy's connect timeout, then, for a meshed endpoint, mesh mTLS to the identity
//! that endpoint must present. The decision and the identity come with the
//! [`DialTarget`]: nothing is looked up again at connect time. HTTP dials count against
//! the calling service's connection limits ([`with_limits`]).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client;

use super::breaker::{Breaker, Permit};
use crate::{
    http::coalesce::Coalesce,
    metrics::Metrics,
    tls::{self, IdentityStore},
};

/// Why no upstream connection was made. Nothing was sent upstream in any of these cases,
/// so a retry is always safe.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connection refused")]
    Refused,
    #[error("timed out connecting after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(io::Error),
    #[error("no workload identity loaded for mesh mTLS")]
    NoIdentity,
    #[error("mTLS handshake failed: {0}")]
    Tls(io::Error),
}

impl DialError {
    /// A short label for metrics and access logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Refused => "connect_refused",
            Self::Timeout(_) => "connect_timeout",
            Self::Io(_) => "connect_error",
            Self::NoIdentity => "no_identity",
            Self::Tls(_) => "tls_handshake_failed",
        }
    }
}

/// How long a pooled HTTP connection may sit unused unless the policy's `timeouts.idle`
/// says otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// What a connection is dialed to: an address, the connect and idle timeouts in force,
/// and, for mesh mTLS, the SPIFFE ID the peer must present. Shared by an endpoint and its
/// pools; a new config version updates the timeouts in place.
#[derive(Debug)]
pub struct DialTarget {
    pub addr: SocketAddr,
    /// `Some` dials mesh mTLS and checks the peer presents exactly this identity.
    pub mtls: Option<Arc<str>>,
    connect_timeout_us: AtomicU64,
    idle_timeout_us: AtomicU64,
}

impl DialTarget {
    pub fn new(addr: SocketAddr, mtls: Option<Arc<str>>, connect_timeout: Duration) -> Self {
        Self {
            addr,
            mtls,
            connect_timeout_us: AtomicU64::new(duration_us(connect_timeout)),
            idle_timeout_us: AtomicU64::new(duration_us(DEFAULT_IDLE_TIMEOUT)),
        }
    }

    /// How long the pools keep a connection to it that no request uses.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_micros(self.idle_timeout_us.load(Ordering::Relaxed))
    }

    pub fn set_idle_timeout(&self, t: Duration) {
        self.idle_timeout_us
            .store(duration_us(t), Ordering::Relaxed);
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_micros(self.connect_timeout_us.load(Ordering::Relaxed))
    }

    pub fn set_connect_timeout(&self, t: Duration) {
        self.connect_timeout_us
            .store(duration_us(t), Ordering::Relaxed);
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Dials upstream connections with the workload identity in force.
#[derive(Debug, Clone)]
pub struct Dialer {
    identity: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
}

impl Dialer {
    pub fn new(identity: Arc<IdentityStore>, metrics: Arc<Metrics>) -> Self {
        Self { identity, metrics }
    }

    /// Connects to `target`: plain TCP, or mesh mTLS when it names an identity.
    pub async fn dial(&self, target: &DialTarget) -> Result<UpstreamIo, DialError> {
        let timeout = target.connect_timeout();
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(target.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(DialError::Refused);
            }
            Ok(Err(e)) => return Err(DialError::Io(e)),
            Err(_) => return Err(DialError::Timeout(timeout)),
        };
        let _ = tcp.set_nodelay(true);
        let Some(expected) = &target.mtls else {
            return Ok(UpstreamIo {
                io: Io::Plain(TokioIo::new(tcp)),
                _slot: None,
            });
        };
        let identity = self.identity.current().ok_or(DialError::NoIdentity)?;
        let tls = tls::connect(&identity, expected, target.addr, tcp, &self.metrics)
            .await
            .map_err(DialError::Tls)?;
        Ok(UpstreamIo {
            io: Io::Tls(Box::new(TokioIo::new(tls))),
            _slot: None,
        })
    }

    /// Whether mesh mTLS can be originated now (a workload identity is loaded).
    pub fn has_identity(&self) -> bool {
        self.identity.current().is_some()
    }
}

/// An upstream connection: plain TCP or mesh mTLS, holding its service's connection
/// slot (`maxConnections`) for as long as it lives.
#[derive(Debug)]
pub struct UpstreamIo {
    io: Io,
    _slot: Option<Permit>,
}

#[derive(Debug)]
enum Io {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<client::TlsStream<TcpStream>>>),
    /// HTTP/2 connections, their writes coalesced (see [`crate::http::coalesce`]).
    PlainH2(TokioIo<Coalesce<TcpStream>>),
    TlsH2(Box<TokioIo<Coalesce<client::TlsStream<TcpStream>>>>),
}

/// `$body` with `$io` bound to the connection of whichever kind it is.
macro_rules! with_io {
    ($this:expr, $io:ident => $body:expr) => {
        match $this {
            Io::Plain($io) => $body,
            Io::Tls($io) => $body,
            Io::PlainH2($io) => $body,
            Io::TlsH2($io) => $body,
        }
    };
}

impl UpstreamIo {
    /// Whether the connection is mesh mTLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.io, Io::Tls(_) | Io::TlsH2(_))
    }

    /// The connection with its writes coalesced: it will carry HTTP/2.
    fn coalesce_writes(self) -> Self {
        let io = match self.io {
            Io::Plain(io) => Io::PlainH2(TokioIo::new(Coalesce::new(io.into_inner()))),
            Io::Tls(io) => Io::TlsH2(Box::new(TokioIo::new(Coalesce::new(io.into_inner())))),
            h2 => h2,
        };
        Self { io, ..self }
    }
}

tokio::task_local! {
    /// The breaker whose connection limits the HTTP pools' dials count against: set
    /// around a request's send, read when the pool must dial for it.
    static LIMITS: Arc<Breaker>;
}

/// Runs `f` (an HTTP send) with `breaker`'s connection limits applying to any connection
/// it dials: a dial beyond `maxConnections`, or while `maxPendingRequests` requests
/// already wait for theirs, fails at once with the
/// [`Overflow`](super::breaker::Overflow).
pub async fn with_limits<F: Future>(breaker: Option<&Arc<Breaker>>, f: F) -> F::Output {
    let limits = |b: &&Arc<Breaker>| {
        b.config().max_connections != u32::MAX || b.config().max_pending_requests != u32::MAX
    };
    match breaker.filter(limits) {
        Some(b) => LIMITS.scope(b.clone(), f).await,
        None => f.await,
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        with_io!(&mut self.get_mut().io, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        with_io!(&mut self.get_mut().io, io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        with_io!(&mut self.get_mut().io, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        with_io!(&mut self.get_mut().io, io => Pin::new(io).poll_shutdown(cx))
    }

    fn is_write_vectored(&self) -> bool {
        with_io!(&self.io, io => io.is_write_vectored())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        with_io!(&mut self.get_mut().io, io => Pin::new(io).poll_write_vectored(cx, bufs))
    }
}

/// The dialer bound to one target, as the `tower::Service<Uri>` the endpoint's pools
/// call. The URI is ignored: requests keep their own authority (so HTTP/2 `:authority`
/// follows the application) while the connection goes to the balanced endpoint.
#[derive(Clone, Debug)]
pub struct Connector {
    dialer: Dialer,
    target: Arc<DialTarget>,
    /// The connections carry HTTP/2: their writes are coalesced.
    http2: bool,
}

impl Connector {
    pub fn new(dialer: Dialer, target: Arc<DialTarget>) -> Self {
        Self {
            dialer,
            target,
            http2: false,
        }
    }

    /// How long a connection it dialed may sit unused (the policy's `timeouts.idle`).
    pub fn idle_timeout(&self) -> Duration {
        self.target.idle_timeout()
    }

    /// The same dialer for connections that carry HTTP/2.
    pub fn http2(self) -> Self {
        Self {
            http2: true,
            ..self
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        let limits = LIMITS.try_with(Arc::clone).ok();
        Box::pin(async move {
            let io = match limits {
                None => this.dialer.dial(&this.target).await?,
                Some(breaker) => {
                    let slot = breaker.connection()?;
                    let waiting = breaker.pending_request()?;
                    let mut io = this.dialer.dial(&this.target).await?;
                    drop(waiting);
                    io._slot = Some(slot);
                    io
                }
            };
            Ok(if this.http2 { io.coalesce_writes() } else { io })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialer() -> Dialer {
        Dialer::new(Arc::default(), Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn refused_and_plain_connects_are_told_apart() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = l.local_addr().expect("addr");
        let target = DialTarget::new(open, None, Duration::from_secs(1));
        assert!(!dialer().dial(&target).await.expect("connects").is_tls());
        drop(l);
        let closed = DialTarget::new(open, None, Duration::from_secs(1));
        let err = dialer().dial(&closed).await.expect_err("nothing listens");
        assert!(matches!(err, DialError::Refused), "{err:?}");
        assert_eq!(err.label(), "connect_refused");
    }

    #[tokio::test]
    async fn mtls_without_an_identity_is_refused_before_any_handshake() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let target = DialTarget::new(
            l.local_addr().expect("addr"),
            Some(Arc::from("spiffe://cluster.local/ns/a/sa/b")),
            Duration::from_secs(1),
        );
        let err = dialer().dial(&target).await.expect_err("no identity");
        assert!(matches!(err, DialError::NoIdentity), "{err:?}");
    }

    #[test]
    fn the_connect_timeout_follows_the_policy_in_place() {
        let t = DialTarget::new(
            "10.0.0.1:80".parse().expect("addr"),
            None,
            Duration::from_secs(1),
        );
        t.set_connect_timeout(Duration::from_millis(250));
        assert_eq!(t.connect_timeout(), Duration::from_millis(250));
    }
}
