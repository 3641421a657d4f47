//! The CA's `POST /v1/certify`, up to and around the TokenReview call: the request body
//! and `Authorization` header ([`parse_request`]), the token's checks before it is sent
//! ([`token::precheck`]), the apiserver's TokenReview answer ([`token::interpret`]), and
//! the CSR (PEM, or DER wrapped in PEM so that the fuzzer works on the DER itself)
//! through [`Issuer::certify`].
//!
//! Asserted: refusals are typed with a 4xx status; the token comes from exactly one
//! place; an authenticated answer names a service account whose SPIFFE ID is well formed
//! and maps back to it; an issued certificate chains to the trust bundle, certifies the
//! CSR's own key, and carries exactly the SPIFFE ID of the service account, read the
//! same by the proxy and by the operator's stream.

#![no_main]

use std::{
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use http::HeaderValue;
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use libfuzzer_sys::fuzz_target;
use remora_fuzz::split_once;
use remora_operator::ca::{
    CaMaterial, Issuer, ServiceAccountId, TrustDomain, server::parse_request, token,
};
use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
use x509_parser::prelude::{FromDer, X509CertificationRequest};

fn issuer() -> &'static Issuer {
    static ISSUER: OnceLock<Issuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let now = SystemTime::now();
        let material =
            CaMaterial::generate(now, Duration::from_secs(365 * 24 * 3600)).expect("a root");
        Issuer::new(
            &material,
            TrustDomain::new("cluster.local").expect("trust domain"),
            Duration::from_secs(24 * 3600),
            now,
        )
        .expect("an issuer")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => request(rest),
        1 => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(rest);
            let pem = format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n"
            );
            csr(&pem);
        }
        2 => {
            if let Ok(pem) = std::str::from_utf8(rest) {
                csr(pem);
            }
        }
        _ => review_answer(rest),
    }
});

/// The body and the `Authorization` header (after the first NUL), as the server gets them.
fn request(data: &[u8]) {
    let (body, auth) = split_once(data, b"\0");
    let header = (!auth.is_empty())
        .then(|| HeaderValue::from_bytes(auth).ok())
        .flatten();
    match parse_request(header.as_ref(), body) {
        Ok((csr_pem, tok)) => {
            assert!(!tok.is_empty());
            // Only the token field, read by serde as the server reads its request: unknown
            // fields are skipped unread (a `Value` would refuse invalid UTF-8 inside them).
            #[derive(serde::Deserialize)]
            struct TokenOnly {
                token: Option<String>,
            }
            let from_body = serde_json::from_slice::<TokenOnly>(body)
                .ok()
                .and_then(|v| v.token)
                .filter(|t| !t.is_empty());
            match (from_body, &header) {
                (Some(t), None) => assert_eq!(t, tok),
                (None, Some(h)) => {
                    let h = h.to_str().expect("a usable header is text");
                    assert!(h.contains(tok.as_str()));
                }
                other => panic!("token taken from {other:?}"),
            }
            if token::precheck(&tok).is_ok() {
                assert!(tok.len() <= token::MAX_TOKEN_LEN);
            }
            csr(&csr_pem);
        }
        Err(r) => {
            assert!(r.status.is_client_error(), "{:?}: {}", r.status, r.message);
            assert!(!r.message.is_empty());
        }
    }
}

fn csr(pem: &str) {
    let id = ServiceAccountId::new("shop", "frontend").expect("service account");
    let issuer = issuer();
    let issued = match issuer.certify(pem, &id, SystemTime::now()) {
        Ok(i) => i,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let spiffe = "spiffe://cluster.local/ns/shop/sa/frontend";
    assert_eq!(issued.spiffe_id, spiffe);
    assert!(issued.chain_pem.starts_with(&issued.cert_pem));
    let leaf = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("leaf PEM");
    assert_eq!(
        remora_proxy::identity::spiffe_id(&leaf).as_deref(),
        Some(spiffe)
    );
    assert_eq!(
        remora_operator::stream::auth::spiffe_id(&leaf).as_deref(),
        Some(spiffe)
    );

    // The certificate is for the CSR's key.
    let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .expect("a certified CSR is PEM")
        .1
        .contents;
    let (_, req) = X509CertificationRequest::from_der(&der).expect("a certified CSR parses");
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("the leaf parses");
    assert_eq!(
        cert.public_key().subject_public_key.data,
        req.certification_request_info
            .subject_pki
            .subject_public_key
            .data
    );

    // It chains to the trust bundle.
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(issuer.trust_bundle_pem().as_bytes()) {
        roots.add(c.expect("bundle PEM")).expect("a bundle root");
    }
    let parsed = rustls::server::ParsedCertificate::try_from(&leaf).expect("webpki parses");
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &[],
        UnixTime::now(),
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
    )
    .expect("the issued certificate chains to the bundle");
}

/// The apiserver's TokenReview status, as JSON.
fn review_answer(data: &[u8]) {
    let Ok(status) = serde_json::from_slice::<TokenReviewStatus>(data) else {
        return;
    };
    match token::interpret(Some(&status)) {
        Ok(id) => {
            assert_eq!(status.authenticated, Some(true));
            assert!(
                status
                    .audiences
                    .iter()
                    .flatten()
                    .any(|a| a == token::AUDIENCE)
            );
            let td = TrustDomain::new("cluster.local").expect("trust domain");
            let spiffe = id.spiffe_id(&td);
            assert!(remora_crds::proxy::is_spiffe_id(&spiffe), "{spiffe:?}");
            assert_eq!(
                remora_proxy::inbound::authz::namespace_of(&spiffe),
                Some(id.namespace())
            );
            let user = format!("system:serviceaccount:{}:{}", id.namespace(), id.name());
            assert_eq!(ServiceAccountId::from_username(&user), Ok(id));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
