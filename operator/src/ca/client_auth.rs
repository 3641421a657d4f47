//! Optional client certificates on the CA's listener, verified against the *current*
//! trust bundle: certify needs none (its service-account token authenticates), the
//! config stream requires one (see `crate::stream`). The webpki verifier is rebuilt when
//! [`CurrentIssuer`] switches issuer (a root rotation step), so no restart is needed.

use std::sync::{Arc, Mutex, PoisonError};

use rustls::{
    DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::{current::CurrentIssuer, issuer::Issuer};

struct Built {
    from: Arc<Issuer>,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// Verifies client certificates, when presented, against the current trust bundle.
pub struct MeshClientVerifier {
    issuer: Arc<CurrentIssuer>,
    built: Mutex<Built>,
}

impl std::fmt::Debug for MeshClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClientVerifier").finish_non_exhaustive()
    }
}

fn build(issuer: &Arc<Issuer>) -> Result<Built, Error> {
    let mut roots = RootCertStore::empty();
    for root in issuer.trust_bundle() {
        roots.add(root.clone())?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| Error::General(format!("building the client verifier: {e}")))?;
    Ok(Built {
        from: issuer.clone(),
        verifier,
    })
}

impl MeshClientVerifier {
    pub fn new(issuer: Arc<CurrentIssuer>) -> Result<Self, Error> {
        let built = build(&issuer.get())?;
        Ok(Self {
            issuer,
            built: Mutex::new(built),
        })
    }

    /// The verifier for the current bundle, rebuilt first if the issuer changed (on
    /// failure the previous one is kept and the next handshake retries).
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        let issuer = self.issuer.get();
        let mut built = self.built.lock().unwrap_or_else(PoisonError::into_inner);
        if !Arc::ptr_eq(&issuer, &built.from) {
            match build(&issuer) {
                Ok(b) => *built = b,
                Err(e) => tracing::warn!("keeping the previous client verifier: {e}"),
            }
        }
        built.verifier.clone()
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; clients have exactly one mesh certificate.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use rcgen::KeyPair;

    use super::*;
    use crate::ca::{
        ServiceAccountId,
        issuer::tests::td,
        root::{CaMaterial, ROOT_VALIDITY},
    };

    fn leaf(issuer: &Issuer) -> CertificateDer<'static> {
        let key = KeyPair::generate().expect("key");
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let id = ServiceAccountId::new("shop", "a").expect("id");
        let issued = issuer
            .certify(&csr, &id, SystemTime::now())
            .expect("issued");
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).expect("pem");
        CertificateDer::from(pem.contents)
    }

    #[test]
    fn optional_client_certificates_follow_the_current_bundle() {
        let now = SystemTime::now();
        let build = |m: &CaMaterial| Issuer::new(m, td(), Duration::from_secs(3600), now);
        let a = CaMaterial::generate(now, ROOT_VALIDITY).expect("a");
        let b = CaMaterial::generate(now, ROOT_VALIDITY).expect("b");
        let current = Arc::new(CurrentIssuer::new(a.clone(), build(&a).expect("issuer")));
        let verifier = MeshClientVerifier::new(current.clone()).expect("verifier");
        assert!(verifier.offer_client_auth() && !verifier.client_auth_mandatory());
        let t = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).expect("clock"));

        let from_a = leaf(&current.get());
        assert!(verifier.verify_client_cert(&from_a, &[], t).is_ok());
        let stranger = Issuer::new(&b, td(), Duration::from_secs(3600), now).expect("b");
        assert!(
            verifier
                .verify_client_cert(&leaf(&stranger), &[], t)
                .is_err()
        );

        // Rotation to b: b's certificates pass, a's no longer (b's bundle lacks a).
        assert!(current.update(b, build).expect("switched"));
        assert!(
            verifier
                .verify_client_cert(&leaf(&current.get()), &[], t)
                .is_ok()
        );
        assert!(verifier.verify_client_cert(&from_a, &[], t).is_err());
        assert!(!verifier.supported_verify_schemes().is_empty());
    }
}
