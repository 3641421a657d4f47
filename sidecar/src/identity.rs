//! The proxy's workload identity: certificate chain, private key and trust bundle read
//! from files, checked before use (the leaf carries the configured SPIFFE ID, chains to
//! the bundle, matches the key and has not expired), and turned into rustls configs for
//! mesh mTLS: TLS 1.3 only, ALPN `remora/1`, the ring provider.
//!
//! Peers are checked by SPIFFE ID, not by DNS name: the server requires a client
//! certificate chained to the bundle and reports the client's SPIFFE ID; the client
//! accepts a server only if its chain is trusted *and* its SPIFFE ID is the identity the
//! config lists for the endpoint ([`SpiffeServerVerifier`]).

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

use remora_crds::proxy::IdentityFiles;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
    },
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::{ParsedCertificate, WebPkiClientVerifier},
    sign::CertifiedKey,
};

use crate::detect::MESH_ALPN;

/// Why an identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{what} {path} holds no certificate")]
    Empty { what: &'static str, path: String },
    #[error("certificate chain: {0}")]
    Certificate(String),
    #[error("the leaf certificate's SPIFFE ID is {found:?}, the config says {expected:?}")]
    WrongIdentity {
        expected: String,
        found: Option<String>,
    },
    #[error("the private key does not match the leaf certificate: {0}")]
    KeyMismatch(String),
    #[error("the certificate does not chain to the trust bundle: {0}")]
    Untrusted(String),
    #[error("the certificate expired at {0} (unix time)")]
    Expired(i64),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

impl IdentityError {
    /// The metric label of the failure.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read_error",
            Self::Empty { .. } | Self::Certificate(_) => "bad_certificate",
            Self::WrongIdentity { .. } => "wrong_identity",
            Self::KeyMismatch(_) => "key_mismatch",
            Self::Untrusted(_) => "untrusted",
            Self::Expired(_) => "expired",
            Self::Tls(_) | Self::Verifier(_) => "tls_config",
        }
    }
}

/// The SPIFFE ID (the single `spiffe://` URI SAN) of a DER certificate.
pub fn spiffe_id(cert: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
            Some((*u).to_owned())
        }
        _ => None,
    })
}

/// `notAfter` of a DER certificate, in unix seconds.
pub fn not_after(cert: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// A loaded, checked identity and the TLS configs built from it.
pub struct Identity {
    pub spiffe_id: Arc<str>,
    /// Unix seconds when the leaf certificate expires.
    pub not_after: i64,
    pub server: Arc<ServerConfig>,
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    /// Client configs per expected server identity, built on first use.
    clients: Mutex<HashMap<Arc<str>, Arc<ClientConfig>>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let display = path.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| IdentityError::Read {
            what,
            path: display.clone(),
            reason: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::Read {
            what,
            path: display.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::Empty {
            what,
            path: display,
        });
    }
    Ok(certs)
}

/// The ring provider, TLS 1.3 suites only.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13);
    Arc::new(p)
}

impl Identity {
    /// Reads and checks the files named by the config.
    pub fn load(files: &IdentityFiles) -> Result<Self, IdentityError> {
        let chain = read_certs("certificate chain", &files.cert_chain)?;
        let key =
            PrivateKeyDer::from_pem_file(&files.private_key).map_err(|e| IdentityError::Read {
                what: "private key",
                path: files.private_key.display().to_string(),
                reason: e.to_string(),
            })?;
        let bundle = read_certs("trust bundle", &files.trust_bundle)?;
        Self::from_parts(&files.spiffe_id, chain, key, bundle, UnixTime::now())
    }

    /// Checks and assembles an identity from parsed parts.
    pub fn from_parts(
        expected: &str,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Vec<CertificateDer<'static>>,
        now: UnixTime,
    ) -> Result<Self, IdentityError> {
        let provider = provider();
        let leaf = chain
            .first()
            .ok_or_else(|| IdentityError::Certificate("empty chain".into()))?;
        let found = spiffe_id(leaf);
        if found.as_deref() != Some(expected) {
            return Err(IdentityError::WrongIdentity {
                expected: expected.to_owned(),
                found,
            });
        }
        let not_after = not_after(leaf).ok_or_else(|| {
            IdentityError::Certificate("cannot parse the leaf certificate".into())
        })?;
        let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        if not_after <= now_secs {
            return Err(IdentityError::Expired(not_after));
        }
        let mut roots = RootCertStore::empty();
        for c in bundle {
            roots
                .add(c)
                .map_err(|e| IdentityError::Certificate(format!("trust bundle: {e}")))?;
        }
        let roots = Arc::new(roots);
        let parsed = ParsedCertificate::try_from(leaf)
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            now,
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| IdentityError::Untrusted(e.to_string()))?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| IdentityError::KeyMismatch(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(chain, signing));
        certified
            .keys_match()
            .map_err(|e| IdentityError::KeyMismatch(e.to_string()))?;

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| IdentityError::Verifier(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                certified.clone(),
            )));
        server.alpn_protocols = vec![MESH_ALPN.to_vec()];
        Ok(Self {
            spiffe_id: Arc::from(expected),
            not_after,
            server: Arc::new(server),
            key: certified,
            roots,
            provider,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate chain and signing key, for other TLS clients of this identity
    /// (the operator's watch streams).
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.key.clone()
    }

    /// A client config that accepts only a server presenting `expected`.
    pub fn client_config(&self, expected: &Arc<str>) -> Result<Arc<ClientConfig>, IdentityError> {
        if let Ok(cache) = self.clients.lock()
            && let Some(c) = cache.get(expected)
        {
            return Ok(c.clone());
        }
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: self.roots.clone(),
            algs: self.provider.signature_verification_algorithms,
            expected: expected.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                self.key.clone(),
            )));
        config.alpn_protocols = vec![MESH_ALPN.to_vec()];
        let config = Arc::new(config);
        if let Ok(mut cache) = self.clients.lock() {
            cache.insert(expected.clone(), config.clone());
        }
        Ok(config)
    }
}

/// A peer whose certificate chains to the trust bundle but names another workload.
#[derive(Debug, thiserror::Error)]
#[error("the peer is {}, not the expected {expected}", presented.as_deref().unwrap_or("a certificate without a SPIFFE ID"))]
pub struct IdentityMismatch {
    pub expected: Arc<str>,
    pub presented: Option<String>,
}

/// Verifies a server by trust bundle and SPIFFE ID (mesh certificates carry no DNS names).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    expected: Arc<str>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        match spiffe_id(end_entity) {
            Some(id) if *id == *self.expected => Ok(ServerCertVerified::assertion()),
            presented => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(IdentityMismatch {
                    expected: self.expected.clone(),
                    presented,
                })),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
