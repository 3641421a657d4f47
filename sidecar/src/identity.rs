//! The proxy's workload identity: certificate chain, private key and trust bundle read
//! from files, checked before use (the leaf carries the configured SPIFFE ID, chains to
//! the bundle, matches the key and has not expired), and turned into rustls configs for
//! mesh mTLS: TLS 1.3 only, ALPN `remora/1`, the ring provider.
//!
//! Peers are checked by SPIFFE ID, not by DNS name: the server requires a client
//! certificate chained to the bundle and reports the client's SPIFFE ID; the client
//! accepts a server only if its chain is trusted *and* its SPIFFE ID is the identity the
//! config lists for the endpoint ([`SpiffeServerVerifier`]).
//!
//! A client certificate that chains to the bundle must also carry exactly one
//! well-formed SPIFFE ID in the proxy's own trust domain ([`SpiffeClientVerifier`]): a
//! certificate of another trust domain that a shared or federated root happens to sign
//! is refused during the handshake, never handed to authorization.

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
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
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

        let chained = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| IdentityError::Verifier(e.to_string()))?;
        let trust_domain = trust_domain_of(expected).ok_or_else(|| {
            IdentityError::Certificate(format!("{expected:?} is not a SPIFFE ID"))
        })?;
        let verifier = Arc::new(SpiffeClientVerifier {
            chained,
            trust_domain: Arc::from(trust_domain),
        });
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

/// The trust domain of a well-formed SPIFFE ID (`spiffe://<trust-domain>/<path>`).
pub fn trust_domain_of(id: &str) -> Option<&str> {
    let (domain, path) = id.strip_prefix("spiffe://")?.split_once('/')?;
    let domain_ok = !domain.is_empty()
        && domain.len() <= 255
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    // The SPIFFE ID spec: non-empty segments of [A-Za-z0-9-._], neither `.` nor `..`.
    let path_ok = id.len() <= 2048
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        });
    (domain_ok && path_ok).then_some(domain)
}

/// Why a client certificate that chains to the trust bundle is refused all the same.
#[derive(Debug, thiserror::Error)]
pub enum ClientIdRefused {
    #[error("the client certificate carries no SPIFFE ID")]
    Missing,
    #[error("the client certificate's SPIFFE ID is not well formed: {0:?}")]
    Malformed(String),
    #[error("the client certificate carries {0} URI SANs; a SPIFFE certificate has one")]
    Several(usize),
    #[error("the client {id} is from trust domain {found:?}, not {expected:?}")]
    ForeignTrustDomain {
        id: String,
        found: String,
        expected: Arc<str>,
    },
}

impl ClientIdRefused {
    /// The metric label of the refusal.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Missing => "no_spiffe_id",
            Self::Malformed(_) | Self::Several(_) => "bad_spiffe_id",
            Self::ForeignTrustDomain { .. } => "foreign_trust_domain",
        }
    }
}

/// Checks the SPIFFE ID of a client certificate against the proxy's trust domain.
pub fn check_client_id(cert: &[u8], trust_domain: &Arc<str>) -> Result<String, ClientIdRefused> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|_| ClientIdRefused::Malformed("(unparsable certificate)".to_owned()))?;
    let uris: Vec<&str> = match parsed.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(_) => return Err(ClientIdRefused::Malformed("(unparsable SAN)".to_owned())),
    };
    let id = match uris.as_slice() {
        [] => return Err(ClientIdRefused::Missing),
        [one] => (*one).to_owned(),
        more => return Err(ClientIdRefused::Several(more.len())),
    };
    let Some(found) = trust_domain_of(&id) else {
        return Err(ClientIdRefused::Malformed(id));
    };
    if found != &**trust_domain {
        return Err(ClientIdRefused::ForeignTrustDomain {
            found: found.to_owned(),
            id,
            expected: trust_domain.clone(),
        });
    }
    Ok(id)
}

/// Verifies a client by trust bundle, then by its SPIFFE ID: exactly one, well formed,
/// in the proxy's trust domain. Which identities may reach which port is authorization's
/// business, after the handshake.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    chained: Arc<dyn ClientCertVerifier>,
    trust_domain: Arc<str>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.chained.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chained
            .verify_client_cert(end_entity, intermediates, now)?;
        check_client_id(end_entity, &self.trust_domain).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chained.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chained.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chained.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    #[test]
    fn spiffe_ids_are_checked_by_the_spec() {
        for ok in [
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "spiffe://example.org/host/db-1",
        ] {
            assert!(trust_domain_of(ok).is_some(), "{ok}");
        }
        assert_eq!(
            trust_domain_of("spiffe://cluster.local/ns/a/sa/b"),
            Some("cluster.local")
        );
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe:///ns/a",
            "spiffe://Cluster.Local/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a?x=1",
            "spiffe://user@cluster.local/ns/a",
            "spiffe://cluster.local:443/ns/a",
        ] {
            assert_eq!(trust_domain_of(bad), None, "{bad}");
        }
    }

    fn cert(uris: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        for u in uris {
            p.subject_alt_names
                .push(SanType::URI((*u).try_into().expect("ia5")));
        }
        p.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn client_ids_must_be_one_well_formed_id_of_our_trust_domain() {
        let td: Arc<str> = Arc::from("cluster.local");
        let ok = "spiffe://cluster.local/ns/shop/sa/frontend";
        assert_eq!(check_client_id(&cert(&[ok]), &td).expect("ours"), ok);
        let label = |uris: &[&str]| check_client_id(&cert(uris), &td).map_err(|e| e.label());
        assert_eq!(label(&[]), Err("no_spiffe_id"));
        assert_eq!(
            label(&["spiffe://evil.org/ns/shop/sa/frontend"]),
            Err("foreign_trust_domain")
        );
        assert_eq!(
            label(&["spiffe://cluster.local/ns/../sa/x"]),
            Err("bad_spiffe_id")
        );
        assert_eq!(label(&["https://cluster.local/x"]), Err("bad_spiffe_id"));
        assert_eq!(
            label(&[ok, "spiffe://cluster.local/ns/shop/sa/admin"]),
            Err("bad_spiffe_id"),
            "two identities in one certificate"
        );
        assert_eq!(
            check_client_id(b"not a certificate", &td).map_err(|e| e.label()),
            Err("bad_spiffe_id")
        );
    }
}
