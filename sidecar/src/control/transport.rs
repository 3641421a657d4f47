//! The connection to the operator's TLS listener: TLS 1.3 (ring) with the mesh trust
//! bundle as roots (the file is re-read for every connection, so a rotated bundle is
//! picked up), the operator's certificate checked for the Service's DNS name, ALPN `h2`
//! then `http/1.1`. Certify goes without a client certificate; watch streams present the
//! workload certificate in force and share one HTTP/2 connection ([`Channel`]).

use std::{io, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
    sign::CertifiedKey,
};
use tokio::{net::TcpStream, sync::Mutex};
use tokio_rustls::TlsConnector;

use super::target::{OperatorAddr, OperatorName};
use crate::{identity::provider, tls::IdentityStore};

/// How long the TCP connect plus the TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the operator is and how to recognise it.
#[derive(Debug, Clone)]
pub struct OperatorEndpoint {
    pub addr: OperatorAddr,
    pub name: OperatorName,
    /// The mesh trust bundle (PEM), mounted by the injector.
    pub trust_bundle: PathBuf,
}

impl OperatorEndpoint {
    /// The absolute URI of `path_and_query` on the operator.
    pub fn uri(&self, path_and_query: &str) -> Result<http::Uri, http::Error> {
        http::Uri::builder()
            .scheme("https")
            .authority(self.addr.to_string())
            .path_and_query(path_and_query)
            .build()
    }
}

/// Why a request to the operator failed before an HTTP status came back.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("reading the trust bundle {path}: {reason}")]
    Bundle { path: String, reason: String },
    #[error("connecting to the operator at {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connecting to the operator at {addr}: timed out after {CONNECT_TIMEOUT:?}")]
    Timeout { addr: String },
    #[error("TLS with the operator at {addr}: {source}")]
    Tls { addr: String, source: io::Error },
    #[error("HTTP with the operator: {0}")]
    Http(#[from] hyper::Error),
    #[error("no workload certificate yet")]
    NoIdentity,
}

impl TransportError {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Bundle { .. } => "trust_bundle",
            Self::Connect { .. } | Self::Timeout { .. } => "connect",
            Self::Tls { .. } => "tls",
            Self::Http(_) => "http",
            Self::NoIdentity => "no_identity",
        }
    }
}

fn roots(path: &PathBuf) -> Result<RootCertStore, TransportError> {
    let err = |reason: String| TransportError::Bundle {
        path: path.display().to_string(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    let mut store = RootCertStore::empty();
    for c in certs {
        store.add(c).map_err(|e| err(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(err("no certificate in it".into()));
    }
    Ok(store)
}

/// The client TLS config: bundle roots, TLS 1.3, optional client certificate.
pub fn client_config(
    trust_bundle: &PathBuf,
    client: Option<Arc<CertifiedKey>>,
) -> Result<ClientConfig, TransportError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Bundle {
            path: trust_bundle.display().to_string(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots(trust_bundle)?);
    let mut config = match client {
        Some(key) => {
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// One connection to the operator, HTTP/2 or HTTP/1.1 as ALPN decided.
#[derive(Debug)]
pub enum Connection {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Connection {
    /// Sends one request (on HTTP/1.1 the connection serves it alone). `req` has an
    /// absolute URI (HTTP/2 needs `:scheme` and `:authority`); HTTP/1.1 gets the origin
    /// form and a `Host` header.
    pub async fn send(
        &mut self,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        match self {
            Self::H1(s) => {
                if let Some(authority) = req.uri().authority().cloned()
                    && let Ok(host) = http::HeaderValue::from_str(authority.as_str())
                {
                    req.headers_mut().insert(http::header::HOST, host);
                }
                if let Some(pq) = req.uri().path_and_query().cloned() {
                    *req.uri_mut() = http::Uri::from(pq);
                }
                s.ready().await?;
                s.send_request(req).await
            }
            Self::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

/// Opens a connection (TCP, TLS, HTTP handshake); the connection task runs in the
/// background until the peer or the last sender closes it.
pub async fn connect(
    endpoint: &OperatorEndpoint,
    client: Option<Arc<CertifiedKey>>,
) -> Result<Connection, TransportError> {
    let addr = endpoint.addr.dial();
    let config = client_config(&endpoint.trust_bundle, client)?;
    let dial = async {
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|source| TransportError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(Arc::new(config))
            .connect(endpoint.name.server_name(), tcp)
            .await
            .map_err(|source| TransportError::Tls {
                addr: addr.clone(),
                source,
            })
    };
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, dial)
        .await
        .map_err(|_| TransportError::Timeout { addr: addr.clone() })??;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    if h2 {
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "operator connection closed");
            }
        });
        Ok(Connection::H2(send))
    } else {
        let (send, conn) = http1::handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "operator connection closed");
            }
        });
        Ok(Connection::H1(send))
    }
}

/// The watch streams' shared HTTP/2 connection, opened on first use and again after it
/// closed, each time with the workload certificate in force then.
#[derive(Debug)]
pub struct Channel {
    endpoint: OperatorEndpoint,
    identity: Arc<IdentityStore>,
    h2: Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
}

impl Channel {
    pub fn new(endpoint: OperatorEndpoint, identity: Arc<IdentityStore>) -> Self {
        Self {
            endpoint,
            identity,
            h2: Mutex::new(None),
        }
    }

    /// Sends `req` on the shared connection (one HTTP/2 stream), reconnecting if needed.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, TransportError> {
        let mut conn = {
            let mut shared = self.h2.lock().await;
            match shared.as_ref().filter(|s| !s.is_closed()) {
                Some(s) => Connection::H2(s.clone()),
                None => {
                    let key = self
                        .identity
                        .current()
                        .ok_or(TransportError::NoIdentity)?
                        .certified_key();
                    let conn = connect(&self.endpoint, Some(key)).await?;
                    *shared = match &conn {
                        Connection::H2(s) => Some(s.clone()),
                        // An HTTP/1.1-only server: one connection per stream.
                        Connection::H1(_) => None,
                    };
                    conn
                }
            }
        };
        Ok(conn.send(req).await?)
    }

    /// Forgets the shared connection (after a stream on it timed out), so the next
    /// request dials afresh.
    pub async fn reset(&self) {
        *self.h2.lock().await = None;
    }
}
