//! SPIFFE IDs: their parsing (the config's [`is_spiffe_id`], authorization's
//! [`namespace_of`], the CA's service accounts) and their extraction from the URI SAN of
//! a peer certificate, by the proxy ([`remora_proxy::identity::spiffe_id`]) and by the
//! operator's stream ([`remora_operator::stream::auth::spiffe_id`]).
//!
//! Asserted: on any DER the proxy and the operator read the same identity from a
//! certificate webpki accepts, and an identity comes only from a parsable certificate;
//! a mesh ID built from a service account is well formed, names its namespace, and maps
//! back; any ID put in a certificate's URI SAN is read back exactly by both; an ID the
//! config accepts has a namespace only where it has a `ns` segment.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, KeyPair, SanType};
use remora_crds::proxy::is_spiffe_id;
use remora_operator::ca::{ServiceAccountId, TrustDomain};
use remora_proxy::{control::ControlSettings, inbound::authz::namespace_of};

fn key() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| KeyPair::generate().expect("a P-256 key"))
}

fn proxy(der: &[u8]) -> Option<String> {
    remora_proxy::identity::spiffe_id(der)
}

fn operator(der: &[u8]) -> Option<String> {
    remora_operator::stream::auth::spiffe_id(der)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        certificate(rest);
    } else if let Ok(s) = std::str::from_utf8(rest) {
        id(s);
    }
});

fn certificate(der: &[u8]) {
    let (p, o) = (proxy(der), operator(der));
    for got in [&p, &o].into_iter().flatten() {
        assert!(got.starts_with("spiffe://"));
        assert!(x509_parser::parse_x509_certificate(der).is_ok());
    }
    if p.is_some() {
        assert!(remora_proxy::identity::not_after(der).is_some());
    }
    let der = rustls::pki_types::CertificateDer::from(der);
    if rustls::server::ParsedCertificate::try_from(&der).is_ok() {
        assert_eq!(p, o, "the proxy and the operator read different identities");
    }
}

fn id(s: &str) {
    let valid = is_spiffe_id(s);
    if valid {
        assert!(s.starts_with("spiffe://") && !s.ends_with('/'));
    }
    let ns = namespace_of(s);
    if let Some(ns) = ns {
        assert!(s.contains(&format!("/ns/{ns}")));
    }

    // spiffe://<td>/ns/<ns>/sa/<sa> from a service account.
    if let Some(rest) = s.strip_prefix("spiffe://")
        && let Some((td, path)) = rest.split_once('/')
        && let Some(path) = path.strip_prefix("ns/")
        && let Some((namespace, sa)) = path.split_once("/sa/")
        && let (Ok(td), Ok(account)) = (TrustDomain::new(td), ServiceAccountId::new(namespace, sa))
    {
        assert_eq!(account.spiffe_id(&td), s);
        assert_eq!(ControlSettings::spiffe_id_of(td.as_str(), namespace, sa), s);
        assert_eq!(ns, Some(namespace));
        let user = format!("system:serviceaccount:{namespace}:{sa}");
        assert_eq!(ServiceAccountId::from_username(&user), Ok(account));
        assert!(
            valid,
            "a mesh identity {s:?} is not a SPIFFE ID to the config"
        );
    }

    // The ID in a certificate's URI SAN reads back exactly.
    let Ok(uri) = s.try_into() else {
        return;
    };
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri)];
    let Ok(cert) = params.self_signed(key()) else {
        return;
    };
    let want = s.starts_with("spiffe://").then(|| s.to_owned());
    assert_eq!(proxy(cert.der()), want, "the proxy misreads the URI SAN");
    assert_eq!(
        operator(cert.der()),
        want,
        "the operator misreads the URI SAN"
    );
}
