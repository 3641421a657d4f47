//! Mesh mTLS on the wire: the identity in force (swapped atomically when its files
//! change, after the new files pass every check), handshakes on both sides with failures
//! counted by reason, and the hyper connector that dials meshed endpoints over mTLS.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use http::{Uri, uri::Scheme};
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use remora_crds::proxy::IdentityFiles;
use rustls::{CertificateError, pki_types::ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::{
    addr::Direction,
    config::ConfigStore,
    identity::{Identity, IdentityError, spiffe_id},
    metrics::{Metrics, OutcomeLabels, ReasonLabels, Static},
};

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The identity in force, if any.
#[derive(Debug, Default)]
pub struct IdentityStore {
    current: ArcSwapOption<Identity>,
}

impl IdentityStore {
    pub fn current(&self) -> Option<Arc<Identity>> {
        self.current.load_full()
    }

    /// Loads `files`; on success the new identity replaces the old one (connections
    /// established with the old one keep it), on failure the old one stays.
    pub fn reload(&self, files: &IdentityFiles, metrics: &Metrics) -> Result<(), IdentityError> {
        match Identity::load(files) {
            Ok(id) => {
                self.install(id, metrics);
                Ok(())
            }
            Err(e) => {
                metrics
                    .identity_reloads
                    .get_or_create(&ReasonLabels {
                        reason: Static(e.label()),
                    })
                    .inc();
                tracing::warn!(error = %e, "identity files rejected; keeping the current identity");
                Err(e)
            }
        }
    }
}

impl IdentityStore {
    /// Installs an identity made elsewhere (Kubernetes mode: issued by the operator, the
    /// key only in memory). Connections established with the previous one keep it; new
    /// handshakes use this one.
    pub fn install(&self, id: Identity, metrics: &Metrics) {
        metrics.cert_expiry.set(id.not_after);
        metrics
            .identity_reloads
            .get_or_create(&ReasonLabels {
                reason: Static("applied"),
            })
            .inc();
        tracing::info!(spiffe_id = %id.spiffe_id, not_after = id.not_after, "identity loaded");
        self.current.store(Some(Arc::new(id)));
    }
}

type FileStamp = Option<(Option<SystemTime>, u64, u64)>;

/// The identity files and their on-disk stamps, as last loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySeen(IdentityFiles, [FileStamp; 3]);

impl IdentitySeen {
    /// Stamps `files` now; take it *before* loading them so that a change racing the
    /// load is seen by the watcher.
    pub fn of(files: &IdentityFiles) -> Self {
        Self(
            files.clone(),
            [
                stamp(&files.cert_chain),
                stamp(&files.private_key),
                stamp(&files.trust_bundle),
            ],
        )
    }
}

fn stamp(path: &Path) -> FileStamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((
        meta.modified().ok(),
        meta.len(),
        std::os::unix::fs::MetadataExt::ino(&meta),
    ))
}

/// Polls the identity files named by the current config and reloads on any change
/// (including a config that names other files), until `stop` resolves.
pub async fn watch_identity(
    config: &ConfigStore,
    store: &IdentityStore,
    metrics: &Metrics,
    interval: Duration,
    mut last: Option<IdentitySeen>,
    stop: impl Future<Output = ()>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticker.tick() => {}
        }
        let Some(files) = config.load().config.identity.clone() else {
            continue;
        };
        let seen = IdentitySeen::of(&files);
        if last.as_ref() == Some(&seen) {
            continue;
        }
        // Retried on the next change only; a half-written rotation settles with a later stamp.
        let _ = store.reload(&seen.0, metrics);
        last = Some(seen);
    }
}

/// The metric label of a failed handshake.
pub fn failure_reason(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "untrusted",
            CertificateError::Other(_) if identity_mismatch(e).is_some() => "identity_mismatch",
            CertificateError::ApplicationVerificationFailure
            | CertificateError::NotValidForName
            | CertificateError::NotValidForNameContext { .. } => "identity_mismatch",
            _ => "bad_certificate",
        },
        Some(rustls::Error::NoCertificatesPresented) => "no_client_certificate",
        Some(rustls::Error::AlertReceived(_)) => "rejected_by_peer",
        Some(rustls::Error::NoApplicationProtocol) => "alpn_mismatch",
        Some(rustls::Error::PeerIncompatible(_)) => "incompatible_peer",
        Some(_) => "protocol_error",
        None => "io_error",
    }
}

fn count(metrics: &Metrics, direction: Direction, outcome: &'static str) {
    metrics
        .tls_handshakes
        .get_or_create(&OutcomeLabels {
            direction,
            outcome: Static(outcome),
        })
        .inc();
}

/// Server side: terminates mesh mTLS and returns the stream and the client's SPIFFE ID.
pub async fn accept<I>(
    identity: &Identity,
    io: I,
    metrics: &Metrics,
) -> io::Result<(server::TlsStream<I>, Option<Arc<str>>)>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = TlsAcceptor::from(identity.server.clone());
    let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    };
    match result {
        Ok(tls) => {
            count(metrics, Direction::Inbound, "ok");
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| spiffe_id(c))
                .map(Arc::from);
            Ok((tls, peer))
        }
        Err(e) => {
            count(metrics, Direction::Inbound, failure_reason(&e));
            Err(e)
        }
    }
}

/// Client side: mesh mTLS to a server that must present `expected`.
pub async fn connect<I>(
    identity: &Identity,
    expected: &Arc<str>,
    addr: SocketAddr,
    io: I,
    metrics: &Metrics,
) -> io::Result<client::TlsStream<I>>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let config = identity.client_config(expected).map_err(io::Error::other)?;
    let connector = TlsConnector::from(config);
    let name = ServerName::IpAddress(addr.ip().into());
    let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, io)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    };
    match result {
        Ok(tls) => {
            count(metrics, Direction::Outbound, "ok");
            Ok(tls)
        }
        Err(e) => {
            let reason = failure_reason(&e);
            count(metrics, Direction::Outbound, reason);
            let e = readable(e);
            tracing::warn!(upstream = %addr, expected = %expected, reason, error = %e, "mTLS handshake failed");
            Err(e)
        }
    }
}

/// rustls prints a custom certificate error with `Debug`; an identity mismatch is worth
/// its own sentence (it ends up in `x-remora-proxy-error`).
fn readable(e: io::Error) -> io::Error {
    match identity_mismatch(&e).map(|m| format!("invalid peer certificate: {m}")) {
        Some(text) => io::Error::new(e.kind(), text),
        None => e,
    }
}

/// The identity mismatch inside a handshake error, if that is what it is.
fn identity_mismatch(e: &io::Error) -> Option<&crate::identity::IdentityMismatch> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => {
            (&*o.0 as &(dyn std::error::Error + 'static)).downcast_ref()
        }
        _ => None,
    }
}

/// An upstream connection: plain TCP or mesh mTLS.
#[derive(Debug)]
pub enum UpstreamIo {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<client::TlsStream<TcpStream>>>),
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Self::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Self::Tls(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_flush(cx),
            Self::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Self::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(io) => io.is_write_vectored(),
            Self::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Self::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            Self::Plain(io) => io.connected(),
            Self::Tls(_) => Connected::new(),
        }
    }
}

/// Dials one upstream endpoint for a pooled HTTP client, whatever the request URI says
/// (the URI keeps the request's own authority, so HTTP/2 `:authority` and pool keys follow
/// the application, while the connection goes to the balanced endpoint). With `mtls`, the
/// connection is mesh mTLS to the identity the config lists for that endpoint.
#[derive(Clone, Debug)]
pub struct EndpointConnector {
    http: HttpConnector,
    dial: Uri,
    addr: SocketAddr,
    mtls: bool,
    config: Arc<ConfigStore>,
    identity: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
}

impl EndpointConnector {
    pub fn new(
        addr: SocketAddr,
        mtls: bool,
        connect_timeout: Duration,
        config: Arc<ConfigStore>,
        identity: Arc<IdentityStore>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(crate::route::authority_of(addr));
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        let dial = Uri::from_parts(parts).unwrap_or_default();
        Self {
            http,
            dial,
            addr,
            mtls,
            config,
            identity,
            metrics,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for EndpointConnector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        let mut http = self.http.clone();
        Box::pin(async move {
            let tcp = http.call(this.dial.clone()).await?;
            if !this.mtls {
                return Ok(UpstreamIo::Plain(tcp));
            }
            let addr = this.addr;
            let expected = this
                .config
                .load()
                .routes
                .meshed_identity(addr)
                .ok_or_else(|| format!("no identity is configured for meshed endpoint {addr}"))?;
            let identity = this
                .identity
                .current()
                .ok_or("no workload identity loaded")?;
            let tls = connect(&identity, &expected, addr, tcp.into_inner(), &this.metrics).await?;
            Ok(UpstreamIo::Tls(Box::new(TokioIo::new(tls))))
        })
    }
}
