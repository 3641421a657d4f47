//! TLS 1.3 (rustls, ring) for the CA's listener: a serving certificate for the operator's
//! Service names issued by the mesh issuer itself (key in memory, renewed on demand at 70 %
//! of its lifetime), and an axum [`Listener`] that completes handshakes off the accept loop
//! so a slow client cannot stall others.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use axum::serve::Listener;
use rustls::{
    ServerConfig,
    pki_types::PrivateKeyDer,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::{
    client_auth::MeshClientVerifier,
    current::CurrentIssuer,
    issuer::{CertifyError, Issuer},
};

/// A client that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("issuing the serving certificate: {0}")]
    Issue(#[from] CertifyError),
    #[error("loading the serving key: {0}")]
    Key(#[source] rustls::Error),
    #[error("building the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// The DNS names of the operator's Service: `<service>.<namespace>.svc` and its
/// `cluster.local` form.
pub fn serving_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

struct Current {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
    /// The issuer that signed it: a new issuer (root rotation) means a new certificate.
    from: Arc<Issuer>,
}

/// Resolves to a certificate for `names` from the mesh issuer, reissued when 70 % of its
/// lifetime has passed or the issuer changed.
pub struct ServingCert {
    issuer: Arc<CurrentIssuer>,
    names: Vec<String>,
    current: Mutex<Current>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

fn issue(issuer: Arc<Issuer>, names: &[String], now: SystemTime) -> Result<Current, TlsError> {
    let (chain, key, not_after) = issuer.serving(names, now)?;
    let signer = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(key))
        .map_err(TlsError::Key)?;
    let life = not_after.duration_since(now).unwrap_or_default();
    Ok(Current {
        key: Arc::new(CertifiedKey::new(chain, signer)),
        renew_at: now + life.mul_f64(0.7),
        from: issuer,
    })
}

impl ServingCert {
    pub fn new(
        issuer: Arc<CurrentIssuer>,
        names: Vec<String>,
        now: SystemTime,
    ) -> Result<Self, TlsError> {
        let current = issue(issuer.get(), &names, now)?;
        Ok(Self {
            issuer,
            names,
            current: Mutex::new(current),
        })
    }

    /// The certificate to serve at `now`, reissued first once 70 % of the current one's
    /// lifetime has passed or the issuer changed (on failure the current one is served and
    /// the next call retries).
    pub fn current_at(&self, now: SystemTime) -> Arc<CertifiedKey> {
        let issuer = self.issuer.get();
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if now >= cur.renew_at || !Arc::ptr_eq(&issuer, &cur.from) {
            match issue(issuer, &self.names, now) {
                Ok(c) => *cur = c,
                Err(e) => tracing::warn!("renewing the CA's serving certificate: {e}"),
            }
        }
        cur.key.clone()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current_at(SystemTime::now()))
    }
}

/// TLS 1.3 only, ring, optional client certificates verified against the current trust
/// bundle (certify's token authenticates; the config stream needs a certificate), ALPN
/// `h2` then `http/1.1`.
pub fn server_config(cert: ServingCert) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let clients = MeshClientVerifier::new(cert.issuer.clone()).map_err(TlsError::Config)?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(clients))
        .with_cert_resolver(Arc::new(cert));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts TCP connections and hands out those that completed a TLS handshake.
#[derive(Debug)]
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp`; the accept task ends when this listener is dropped.
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    r = tcp.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!("accepting a CA connection: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => break,
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "CA TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "CA TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { rx, local })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task only ends once this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    use super::*;
    use crate::ca::{
        issuer::tests::td,
        root::{CaMaterial, ROOT_VALIDITY},
    };

    #[test]
    fn the_serving_certificate_names_the_service_and_renews_at_70_percent() {
        let t0 = SystemTime::now();
        let root = CaMaterial::generate(t0, ROOT_VALIDITY).expect("root");
        let build = |m: &CaMaterial| Issuer::new(m, td(), Duration::from_secs(100), t0);
        let issuer = Arc::new(CurrentIssuer::new(
            root.clone(),
            build(&root).expect("issuer"),
        ));
        let cert = ServingCert::new(
            issuer.clone(),
            serving_names("remora-operator", "remora-system"),
            t0,
        )
        .expect("serving certificate");
        let first = cert.current_at(t0);
        assert!(Arc::ptr_eq(
            &first,
            &cert.current_at(t0 + Duration::from_secs(69))
        ));
        let renewed = cert.current_at(t0 + Duration::from_secs(71));
        assert!(
            !Arc::ptr_eq(&first, &renewed),
            "reissued after 70 s of 100 s"
        );
        assert!(Arc::ptr_eq(
            &renewed,
            &cert.current_at(t0 + Duration::from_secs(72))
        ));

        let (_, x509) = x509_parser::parse_x509_certificate(&first.cert[0]).expect("x509");
        let names: Vec<_> = x509
            .extensions()
            .iter()
            .filter_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(
            names,
            vec![
                GeneralName::DNSName("remora-operator.remora-system.svc"),
                GeneralName::DNSName("remora-operator.remora-system.svc.cluster.local"),
            ]
        );

        // A new issuer (rotation): the next handshake gets a certificate from it.
        let next = CaMaterial::generate(t0, ROOT_VALIDITY).expect("next root");
        assert!(issuer.update(next, build).expect("switched"));
        let rotated = cert.current_at(t0 + Duration::from_secs(73));
        assert!(!Arc::ptr_eq(&renewed, &rotated));
        let (_, leaf) = x509_parser::parse_x509_certificate(&rotated.cert[0]).expect("x509");
        let now_issuing = issuer.get();
        let (_, new_root) =
            x509_parser::parse_x509_certificate(&now_issuing.trust_bundle()[0]).expect("x509");
        assert_eq!(leaf.issuer(), new_root.subject());

        assert!(server_config(cert).is_ok());
    }
}
