//! The serving certificate: loaded from PEM files (a mounted Secret's `tls.crt` and
//! `tls.key`), validated (the key must match the certificate), and swapped atomically when
//! the files change, without a restart. A bad or half-written pair is rejected and the
//! last good certificate keeps serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate pair that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate file has no usable certificate.
    #[error("no PEM certificate in {0}")]
    NoCertificate(PathBuf),
    /// The certificate PEM is malformed.
    #[error("bad PEM certificate in {path}: {source}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// The PEM error.
        source: rustls_pki_types::pem::Error,
    },
    /// The key file has no usable key.
    #[error("no usable PEM private key in {path}: {source}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// The PEM error.
        source: rustls_pki_types::pem::Error,
    },
    /// rustls refused the pair (unsupported key, key does not match certificate, ...).
    #[error("unusable certificate/key pair ({cert} / {key}): {source}")]
    Pair {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Parses and validates a PEM certificate chain and private key.
pub fn certified_key(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadCertificate {
            path: cert_path.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_path.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::BadKey {
        path: key_path.to_owned(),
        source,
    })?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider()).map_err(
        |source| TlsError::Pair {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            source,
        },
    )
}

/// The current serving certificate, reloadable from its files.
#[derive(Debug)]
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
    last_files: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl CertStore {
    /// Loads the pair; fails if it is not usable (the webhook must not start without one).
    pub fn open(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
    ) -> Result<Self, TlsError> {
        let cert_path = cert_path.into();
        let key_path = key_path.into();
        let cert = read(&cert_path)?;
        let key = read(&key_path)?;
        let ck = certified_key(&cert_path, &cert, &key_path, &key)?;
        Ok(Self {
            cert_path,
            key_path,
            current: ArcSwap::from_pointee(ck),
            last_files: Mutex::new((cert, key)),
        })
    }

    /// Re-reads the files; if they changed and are valid, swaps the certificate in.
    /// Returns whether a new certificate is now served. On error the old one stays, and the
    /// same bad contents are not reported again until the files change.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let cert = read(&self.cert_path)?;
        let key = read(&self.key_path)?;
        let mut last = self
            .last_files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.0 == cert && last.1 == key {
            return Ok(false);
        }
        let result = certified_key(&self.cert_path, &cert, &self.key_path, &key);
        // Remember bad contents too: they are reported once, not on every poll.
        *last = (cert, key);
        self.current.store(Arc::new(result?));
        Ok(true)
    }

    /// The certificate chain currently served (DER).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A rustls server config (ring, TLS 1.2 and 1.3, HTTP/1.1) serving from `store`.
pub fn server_config(store: Arc<CertStore>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a fresh self-signed pair for `localhost` and returns its PEMs.
    pub(crate) fn self_signed(dir: &Path) -> (PathBuf, PathBuf, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k, cert.pem())
    }

    #[test]
    fn reload_swaps_valid_pairs_and_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k, _) = self_signed(dir.path());
        let store = CertStore::open(&c, &k).expect("valid pair");
        let first = store.chain();
        assert!(!store.reload_if_changed().expect("unchanged"));

        // A certificate whose key does not match: rejected, old one kept.
        let other = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&other)
            .expect("cert");
        std::fs::write(&c, cert.pem()).expect("write");
        let err = store.reload_if_changed().expect_err("mismatch");
        assert!(
            err.to_string().contains("unusable certificate/key pair"),
            "{err}"
        );
        assert_eq!(store.chain(), first);

        // Garbage: rejected once, then not re-reported while the files stay the same.
        std::fs::write(&k, "not a key").expect("write");
        assert!(store.reload_if_changed().is_err());
        assert!(!store.reload_if_changed().expect("same bad files"));
        assert_eq!(store.chain(), first);

        // The matching key arrives: swapped.
        std::fs::write(&k, other.serialize_pem()).expect("write");
        assert!(store.reload_if_changed().expect("valid"));
        assert_ne!(store.chain(), first);
    }

    #[test]
    fn open_refuses_missing_or_bad_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(CertStore::open(dir.path().join("nope.crt"), dir.path().join("nope.key")).is_err());
        let (c, k, _) = self_signed(dir.path());
        std::fs::write(&c, "").expect("write");
        let err = CertStore::open(&c, &k).expect_err("empty cert");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }
}
