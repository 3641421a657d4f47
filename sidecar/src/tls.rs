//! Mesh mTLS on the wire: the identity in force (swapped atomically when its files
//! change, after the new files pass every check), handshakes on both sides with failures
//! counted by reason. Dialing lives in `outbound::dial`.
//!
//! Inbound handshakes are bounded ([`HandshakeLimits`]): each must finish within a
//! timeout, and only so many may be in progress at once, in all and per client IP; a
//! connection over a cap is closed before the proxy does any TLS work for it. So a flood
//! of connections that send a ClientHello and stall costs at most the caps' worth of
//! handshake state for one timeout, and a flood from one address leaves room for others.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
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
    identity::{ClientIdRefused, Identity, IdentityError, spiffe_id},
    metrics::{Metrics, OutcomeLabels, ReasonLabels, Static},
};

/// How long a TLS handshake may take (outbound always; inbound by default).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on inbound mesh TLS handshakes (`--tls-handshake-timeout`,
/// `--max-tls-handshakes`, `--max-tls-handshakes-per-client`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// How long a client may take to complete its handshake.
    pub timeout: Duration,
    /// Handshakes in progress at once, from all clients ...
    pub max_concurrent: usize,
    /// ... and from one client IP (a peer proxy opening its pool in a burst stays well
    /// below it: one handshake takes about a millisecond).
    pub max_per_client: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            timeout: HANDSHAKE_TIMEOUT,
            max_concurrent: 1024,
            max_per_client: 256,
        }
    }
}

/// Counts the inbound handshakes in progress and refuses one over a cap.
#[derive(Debug)]
pub struct HandshakeGate {
    limits: HandshakeLimits,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// A handshake's place under the caps, given back on drop.
#[derive(Debug)]
pub struct HandshakeSlot<'a> {
    gate: &'a HandshakeGate,
    client: IpAddr,
}

/// A handshake refused because a cap was reached (its [`failure_reason`] says which).
#[derive(Debug, thiserror::Error)]
#[error("too many TLS handshakes in progress ({0})")]
struct OverCap(&'static str);

impl HandshakeGate {
    pub fn new(limits: HandshakeLimits) -> Self {
        Self {
            limits,
            state: Mutex::default(),
        }
    }

    pub fn limits(&self) -> HandshakeLimits {
        self.limits
    }

    /// A slot for one more handshake from `client`, unless a cap is reached.
    fn enter(&self, client: IpAddr) -> Result<HandshakeSlot<'_>, OverCap> {
        let client = client.to_canonical();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.total >= self.limits.max_concurrent {
            return Err(OverCap("handshake_limit"));
        }
        let mine = state.per_client.entry(client).or_default();
        if *mine >= self.limits.max_per_client {
            return Err(OverCap("handshake_limit_per_client"));
        }
        *mine += 1;
        state.total += 1;
        Ok(HandshakeSlot { gate: self, client })
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        let mut state = self
            .gate
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.total = state.total.saturating_sub(1);
        if let Some(n) = state.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                state.per_client.remove(&self.client);
            }
        }
    }
}

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
    if let Some(OverCap(reason)) = e.get_ref().and_then(|i| i.downcast_ref::<OverCap>()) {
        return reason;
    }
    if let Some(refused) = client_id_refused(e) {
        return refused.label();
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

/// Server side: terminates mesh mTLS from `client` within the gate's limits and returns
/// the stream and the client's SPIFFE ID. A failure is counted by reason, also in
/// `inbound_refused`.
pub async fn accept<I>(
    gate: &HandshakeGate,
    client: IpAddr,
    identity: &Identity,
    io: I,
    metrics: &Metrics,
) -> io::Result<(server::TlsStream<I>, Option<Arc<str>>)>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let result = match gate.enter(client) {
        Ok(_slot) => {
            let acceptor = TlsAcceptor::from(identity.server.clone());
            match tokio::time::timeout(gate.limits.timeout, acceptor.accept(io)).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                )),
            }
        }
        Err(over) => Err(io::Error::other(over)),
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
            let reason = failure_reason(&e);
            count(metrics, Direction::Inbound, reason);
            metrics.inbound_refused(reason);
            Err(readable(e))
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

/// rustls prints a custom certificate error with `Debug`; an identity mismatch (it ends
/// up in `x-remora-proxy-error`) or a refused client identity is worth its own sentence.
fn readable(e: io::Error) -> io::Error {
    let text = identity_mismatch(&e)
        .map(|m| format!("invalid peer certificate: {m}"))
        .or_else(|| client_id_refused(&e).map(|r| format!("invalid client certificate: {r}")));
    match text {
        Some(text) => io::Error::new(e.kind(), text),
        None => e,
    }
}

/// The refused client identity inside a handshake error, if that is what it is.
fn client_id_refused(e: &io::Error) -> Option<&ClientIdRefused> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => {
            (&*o.0 as &(dyn std::error::Error + 'static)).downcast_ref()
        }
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_caps_handshakes_in_all_and_per_client() {
        let gate = HandshakeGate::new(HandshakeLimits {
            timeout: Duration::from_secs(1),
            max_concurrent: 3,
            max_per_client: 2,
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let a6: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let s1 = gate.enter(a).expect("first");
        let s2 = gate.enter(a6).expect("second, same client");
        let over = gate.enter(a).expect_err("per client");
        assert_eq!(over.0, "handshake_limit_per_client");
        let s3 = gate.enter(b).expect("another client");
        assert_eq!(gate.enter(b).expect_err("in all").0, "handshake_limit");
        assert_eq!(gate.in_progress(), 3);
        drop((s1, s3));
        assert_eq!(gate.in_progress(), 1);
        let _again = gate.enter(a).expect("a slot came back");
        drop(s2);
        assert_eq!(gate.in_progress(), 1);
        let e = io::Error::other(OverCap("handshake_limit"));
        assert_eq!(failure_reason(&e), "handshake_limit");
    }
}
