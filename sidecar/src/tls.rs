//! Mesh mTLS on the wire: the identity in force (swapped atomically when its files
//! change, after the new files pass every check), handshakes on both sides with failures
//! counted by reason. Dialing lives in `outbound::dial`.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use remora_crds::proxy::IdentityFiles;
use rustls::{CertificateError, pki_types::ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
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
    /// Why the last attempt to get an identity from the operator failed, until one works.
    failure: ArcSwapOption<String>,
}

impl IdentityStore {
    pub fn current(&self) -> Option<Arc<Identity>> {
        self.current.load_full()
    }

    /// Remembers why getting an identity failed (Kubernetes mode: the certify error), so
    /// `/ready` can say it — and with it the postStart hook's message in the pod's events.
    pub fn record_failure(&self, why: String) {
        self.failure.store(Some(Arc::new(why)));
    }

    /// The last failure since an identity was last installed.
    pub fn last_failure(&self) -> Option<Arc<String>> {
        self.failure.load_full()
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
        self.failure.store(None);
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
