//! The proxy's own certificate in Kubernetes mode: a P-256 key generated in memory (it
//! never touches the disk), a CSR sent to the operator's `POST /v1/certify` with the
//! projected service-account token (re-read from its file on every attempt: the kubelet
//! rotates it), and the answer checked and installed in the [`IdentityStore`]. Renewed at
//! 70 % of the certificate's lifetime; a failure is retried with backoff and jitter while
//! the current certificate keeps serving.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use remora_crds::wire::{CertifyRequest, CertifyResponse, ErrorBody};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime, pem::PemObject,
};

use super::{
    backoff::Backoff,
    transport::{self, OperatorEndpoint, TransportError},
};
use crate::{
    identity::{Identity, IdentityError},
    metrics::{Metrics, ReasonLabels, Static},
    tls::IdentityStore,
};

/// Largest certify answer read.
const MAX_RESPONSE: usize = 256 * 1024;

/// How long one certify exchange may take after the connection is up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A certificate is renewed after this share of its lifetime (70 %), in tenths.
pub const RENEW_AT_TENTHS: u64 = 7;

/// What the proxy needs to certify itself.
#[derive(Debug, Clone)]
pub struct CertifySettings {
    pub endpoint: OperatorEndpoint,
    /// The projected service-account token (audience `remora`).
    pub token_file: PathBuf,
    /// The SPIFFE ID this pod must get (`spiffe://<td>/ns/<ns>/sa/<sa>`), when known.
    pub expected: Option<String>,
}

/// Why a certify attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("generating the key or the CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("reading the service-account token {path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
    #[error("the service-account token file {0} is empty")]
    EmptyToken(String),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("building the certify request: {0}")]
    Request(#[from] http::Error),
    #[error("encoding the certify request: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the operator did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout,
    #[error("the operator refused: {status} {reason}: {message}")]
    Refused {
        status: StatusCode,
        reason: String,
        message: String,
    },
    #[error("the certify answer is unusable: {0}")]
    BadResponse(String),
    #[error("the operator issued {got:?}, but this pod is {expected:?}")]
    UnexpectedIdentity { expected: String, got: String },
    #[error("the issued certificate: {0}")]
    Identity(#[from] IdentityError),
}

impl CertifyError {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Key(_) | Self::Request(_) | Self::Encode(_) => "internal",
            Self::Token { .. } | Self::EmptyToken(_) => "token_file",
            Self::Transport(t) => t.label(),
            Self::Timeout => "timeout",
            Self::Refused { status, .. } if status.is_server_error() => "operator_error",
            Self::Refused { .. } => "refused",
            Self::BadResponse(_) => "bad_response",
            Self::UnexpectedIdentity { .. } => "unexpected_identity",
            Self::Identity(_) => "bad_certificate",
        }
    }
}

/// A fresh in-memory P-256 key and a CSR for it that asks for no names (the operator
/// decides the identity from the token and ignores every requested name anyway).
pub fn key_and_csr() -> Result<(KeyPair, String), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// When a certificate valid `[not_before, not_after]` (unix seconds) is renewed.
pub fn renew_at(not_before: u64, not_after: u64) -> SystemTime {
    let lifetime = not_after.saturating_sub(not_before);
    let offset = lifetime / 10 * RENEW_AT_TENTHS + lifetime % 10 * RENEW_AT_TENTHS / 10;
    UNIX_EPOCH + Duration::from_secs(not_before.saturating_add(offset))
}

/// A certificate ready to install, and when to renew it.
#[derive(Debug)]
pub struct Certified {
    pub identity: Identity,
    pub serial: String,
    pub renew_at: SystemTime,
}

fn pem_certs(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, CertifyError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertifyError::BadResponse(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(CertifyError::BadResponse(format!(
            "{what} holds no certificate"
        )));
    }
    Ok(certs)
}

/// Checks a certify answer against the key and the expected identity (pure).
pub fn accept(
    body: &[u8],
    key: &KeyPair,
    expected: Option<&str>,
    now: UnixTime,
) -> Result<Certified, CertifyError> {
    let r: CertifyResponse = serde_json::from_slice(body)
        .map_err(|e| CertifyError::BadResponse(format!("not the certify JSON: {e}")))?;
    if let Some(expected) = expected
        && expected != r.spiffe_id
    {
        return Err(CertifyError::UnexpectedIdentity {
            expected: expected.to_owned(),
            got: r.spiffe_id,
        });
    }
    let chain = if r.chain.trim().is_empty() {
        pem_certs("certificate", &r.certificate)?
    } else {
        pem_certs("chain", &r.chain)?
    };
    let bundle = pem_certs("trustBundle", &r.trust_bundle)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let identity = Identity::from_parts(&r.spiffe_id, chain, key, bundle, now)?;
    Ok(Certified {
        identity,
        serial: r.serial,
        renew_at: renew_at(r.not_before, r.not_after),
    })
}

async fn read_token(path: &PathBuf) -> Result<String, CertifyError> {
    let token = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| CertifyError::Token {
            path: path.display().to_string(),
            source,
        })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(CertifyError::EmptyToken(path.display().to_string()));
    }
    Ok(token.to_owned())
}

/// One certify exchange: new key, CSR, POST, checks.
pub async fn certify_once(settings: &CertifySettings) -> Result<Certified, CertifyError> {
    let token = read_token(&settings.token_file).await?;
    let (key, csr) = key_and_csr()?;
    let body = serde_json::to_vec(&CertifyRequest {
        csr,
        token: Some(token),
    })?;
    let req = Request::post(settings.endpoint.uri("/v1/certify")?)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let mut conn = transport::connect(&settings.endpoint, None).await?;
    let exchange = async {
        let resp = conn.send(req).await.map_err(TransportError::from)?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| CertifyError::BadResponse(format!("reading the body: {e}")))?
            .to_bytes();
        Ok::<_, CertifyError>((status, body))
    };
    let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| CertifyError::Timeout)??;
    if status != StatusCode::OK {
        let refusal: ErrorBody = serde_json::from_slice(&body).unwrap_or_else(|_| ErrorBody {
            error: String::new(),
            message: String::from_utf8_lossy(&body).chars().take(512).collect(),
        });
        return Err(CertifyError::Refused {
            status,
            reason: refusal.error,
            message: refusal.message,
        });
    }
    accept(&body, &key, settings.expected.as_deref(), UnixTime::now())
}

fn count(metrics: &Metrics, reason: &'static str) {
    metrics
        .certificate_renewals
        .get_or_create(&ReasonLabels {
            reason: Static(reason),
        })
        .inc();
}

/// Certifies, installs, renews at 70 % of the lifetime, and retries failures with
/// backoff, until `stop` resolves.
pub async fn run(
    settings: CertifySettings,
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
) {
    let mut backoff = Backoff::standard();
    tokio::pin!(stop);
    loop {
        let wait = match certify_once(&settings).await {
            Ok(certified) => {
                count(&metrics, "issued");
                backoff.reset();
                tracing::info!(
                    serial = %certified.serial,
                    renew_in = ?certified.renew_at.duration_since(SystemTime::now()).unwrap_or_default(),
                    "certificate issued by the operator"
                );
                let renew_at = certified.renew_at;
                store.install(certified.identity, &metrics);
                renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(Duration::from_secs(1))
            }
            Err(e) => {
                count(&metrics, e.label());
                let wait = backoff.next_delay();
                let current = store.current().map(|i| i.not_after);
                tracing::warn!(error = %e, retry_in = ?wait, current_not_after = ?current, "certify failed; keeping the current certificate");
                store.record_failure(format!("cannot certify with the operator: {e}"));
                wait
            }
        };
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, IsCa, Issuer, SanType};
    use x509_parser::prelude::FromDer as _;

    use super::*;

    #[test]
    fn the_csr_is_p256_and_asks_for_no_names() {
        let (key, pem) = key_and_csr().expect("csr");
        assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .expect("PEM CSR");
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
                .expect("parses");
        csr.verify_signature().expect("self-signed correctly");
        let info = &csr.certification_request_info;
        assert_eq!(info.subject.iter().count(), 0, "empty subject");
        assert!(
            csr.requested_extensions()
                .is_none_or(|mut e| e.next().is_none()),
            "no extensions (no SANs)"
        );
        let (_, other) = key_and_csr().expect("csr");
        assert_ne!(pem, other, "a new key every time");
    }

    #[test]
    fn renews_at_seventy_percent() {
        let at = renew_at(1_000, 1_000 + 86_400);
        assert_eq!(at, UNIX_EPOCH + Duration::from_secs(1_000 + 60_480));
        assert_eq!(renew_at(10, 5), UNIX_EPOCH + Duration::from_secs(10));
    }

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn new_ca() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("root");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(ca: &Ca, key: &KeyPair, id: &str) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
        params.signed_by(key, &ca.issuer).expect("leaf").pem()
    }

    fn answer(id: &str, leaf: &str, bundle: &str) -> Vec<u8> {
        serde_json::json!({
            "spiffeId": id, "certificate": leaf, "chain": leaf, "trustBundle": bundle,
            "notBefore": 1_000, "notAfter": 11_000, "serial": "ab"
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn accepts_a_good_answer_and_rejects_bad_ones() {
        let ca = new_ca();
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let (key, _) = key_and_csr().expect("key");
        let leaf = issue(&ca, &key, id);
        let certified =
            accept(&answer(id, &leaf, &ca.pem), &key, Some(id), UnixTime::now()).expect("good");
        assert_eq!(&*certified.identity.spiffe_id, id);
        assert_eq!(certified.renew_at, UNIX_EPOCH + Duration::from_secs(8_000));

        let err = accept(
            &answer(id, &leaf, &ca.pem),
            &key,
            Some("spiffe://cluster.local/ns/shop/sa/other"),
            UnixTime::now(),
        )
        .expect_err("another identity");
        assert_eq!(err.label(), "unexpected_identity");

        let (other_key, _) = key_and_csr().expect("key");
        let err = accept(
            &answer(id, &leaf, &ca.pem),
            &other_key,
            None,
            UnixTime::now(),
        )
        .expect_err("not our key");
        assert_eq!(err.label(), "bad_certificate", "{err}");

        let err = accept(
            &answer(id, &leaf, &new_ca().pem),
            &key,
            None,
            UnixTime::now(),
        )
        .expect_err("another root");
        assert_eq!(err.label(), "bad_certificate", "{err}");

        let err = accept(b"{\"spiffeId\":1}", &key, None, UnixTime::now()).expect_err("junk");
        assert_eq!(err.label(), "bad_response");
        let err = accept(&answer(id, "", ""), &key, None, UnixTime::now()).expect_err("empty");
        assert_eq!(err.label(), "bad_response");
    }
}
