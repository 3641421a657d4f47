//! The pure core of the CA: a CSR and an authenticated service account in, a certificate
//! carrying exactly that account's SPIFFE ID out. Only the CSR's public key is used (it
//! must be ECDSA P-256 and the CSR's signature must verify); every name the CSR asks for
//! is ignored.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::{
    certificate::X509Certificate,
    certification_request::X509CertificationRequest,
    oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
    },
    prelude::FromDer,
};

use super::{
    identity::{ServiceAccountId, TrustDomain},
    root::CaMaterial,
};

/// Certificates are backdated by this much so a peer whose clock is slightly behind
/// accepts them at once.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why the Secret's material cannot issue.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("{what}: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("{0} holds no certificate")]
    Empty(&'static str),
    #[error("{what}: certificate {subject:?} is not a CA (basicConstraints CA:TRUE missing)")]
    NotCa { what: &'static str, subject: String },
    #[error("tls.key: {0}")]
    Key(#[source] rcgen::Error),
    #[error("tls.key does not match the public key of the issuer certificate in tls.crt")]
    KeyMismatch,
    #[error(
        "the issuer certificate {subject:?} is not valid now (valid {not_before} to {not_after}, Unix seconds)"
    )]
    NotValidNow {
        subject: String,
        not_before: i64,
        not_after: i64,
    },
    #[error("the issuer certificate {0:?} does not chain to any root in ca.crt")]
    Untrusted(String),
    #[error("reading the issuer certificate: {0}")]
    Issuer(#[source] rcgen::Error),
}

/// Why a CSR was refused (nothing is issued).
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    #[error("the CSR's signature does not verify: {0}")]
    BadSignature(String),
    #[error("unsupported key: {0}; only ECDSA P-256 keys are accepted")]
    UnsupportedKey(String),
    #[error("the issuer certificate has expired")]
    IssuerExpired,
    #[error("signing the certificate: {0}")]
    Sign(#[source] rcgen::Error),
    #[error("the system random number generator failed")]
    Random,
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<name>`, the certificate's only name.
    pub spiffe_id: String,
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The leaf followed by any intermediates up to (not including) a root, PEM.
    pub chain_pem: String,
    /// Every root the mesh trusts, PEM (several during a root rotation).
    pub trust_bundle_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The serial number, lower-case hex.
    pub serial: String,
}

/// A public key taken from a CSR whose signature verified.
#[derive(Debug, Clone)]
struct CsrKey(Vec<u8>);

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// The issuing half of the CA: the issuer key and certificate, the intermediates between
/// it and the roots, and the trust bundle.
pub struct Issuer {
    signer: rcgen::Issuer<'static, KeyPair>,
    subject: String,
    not_after: i64,
    intermediates_pem: String,
    intermediates: Vec<CertificateDer<'static>>,
    bundle_pem: String,
    bundle: Vec<CertificateDer<'static>>,
    trust_domain: TrustDomain,
    ttl: Duration,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .field("roots", &self.bundle.len())
            .field("intermediates", &self.intermediates.len())
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Every `CERTIFICATE` block of a PEM text, DER.
pub(crate) fn pem_certs(
    text: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, IssuerError> {
    let mut out = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(text.as_bytes()) {
        let pem = pem.map_err(|e| IssuerError::Pem {
            what,
            reason: e.to_string(),
        })?;
        if pem.label == "CERTIFICATE" {
            out.push(CertificateDer::from(pem.contents));
        }
    }
    if out.is_empty() {
        return Err(IssuerError::Empty(what));
    }
    Ok(out)
}

fn parse<'a>(
    der: &'a CertificateDer<'_>,
    what: &'static str,
) -> Result<X509Certificate<'a>, IssuerError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| IssuerError::Pem {
            what,
            reason: format!("not an X.509 certificate: {e}"),
        })
}

fn require_ca(c: &X509Certificate<'_>, what: &'static str) -> Result<(), IssuerError> {
    if c.is_ca() {
        Ok(())
    } else {
        Err(IssuerError::NotCa {
            what,
            subject: c.subject().to_string(),
        })
    }
}

fn pem_of(ders: &[CertificateDer<'_>]) -> String {
    ders.iter()
        .map(|d| {
            let p = x509_parser::pem::Pem {
                label: "CERTIFICATE".to_owned(),
                contents: d.to_vec(),
            };
            pem_encode(&p)
        })
        .collect()
}

fn pem_encode(p: &x509_parser::pem::Pem) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&p.contents);
    let mut s = format!("-----BEGIN {}-----\n", p.label);
    for line in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(line));
        s.push('\n');
    }
    s.push_str(&format!("-----END {}-----\n", p.label));
    s
}

/// A random positive 128-bit serial number (RFC 5280 §4.1.2.2 allows up to 20 octets).
pub(crate) fn random_serial() -> Result<SerialNumber, CertifyError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertifyError::Random)?;
    // Positive, and with no leading zero octet.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Parses a PEM CSR, checks that its key is ECDSA P-256 and that its signature verifies,
/// and returns the key. Nothing else of the CSR is used.
fn csr_key(csr_pem: &str) -> Result<CsrKey, CertifyError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| CertifyError::MalformedCsr(format!("not PEM: {e}")))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(CertifyError::MalformedCsr(format!(
            "PEM block is {:?}, not \"CERTIFICATE REQUEST\"",
            pem.label
        )));
    }
    let (rest, csr) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| CertifyError::MalformedCsr(format!("not a PKCS #10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(CertifyError::MalformedCsr(
            "trailing bytes after the request".to_owned(),
        ));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let alg = &spki.algorithm.algorithm;
    if *alg != OID_KEY_TYPE_EC_PUBLIC_KEY {
        let kind = if *alg == OID_PKCS1_RSAENCRYPTION {
            "RSA".to_owned()
        } else if *alg == OID_SIG_ED25519 {
            "Ed25519".to_owned()
        } else {
            format!("key algorithm {alg}")
        };
        return Err(CertifyError::UnsupportedKey(kind));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    match curve {
        Some(c) if c == OID_EC_P256 => {}
        Some(c) => return Err(CertifyError::UnsupportedKey(format!("EC curve {c}"))),
        None => {
            return Err(CertifyError::UnsupportedKey(
                "EC key without a named curve".to_owned(),
            ));
        }
    }
    let raw = spki.subject_public_key.data.to_vec();
    if raw.len() != 65 || raw[0] != 4 {
        return Err(CertifyError::UnsupportedKey(
            "EC point not in uncompressed form".to_owned(),
        ));
    }
    csr.verify_signature()
        .map_err(|e| CertifyError::BadSignature(e.to_string()))?;
    Ok(CsrKey(raw))
}

impl Issuer {
    /// Checks the material (every certificate parses, the issuer is a CA valid at `now`
    /// whose key is `tls.key` and which chains to a root of `ca.crt`) and prepares to issue
    /// `ttl`-long certificates in `trust_domain`.
    pub fn new(
        material: &CaMaterial,
        trust_domain: TrustDomain,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, IssuerError> {
        let bundle = pem_certs(&material.bundle_pem, "ca.crt")?;
        let parsed_bundle = bundle
            .iter()
            .map(|d| parse(d, "ca.crt"))
            .collect::<Result<Vec<_>, _>>()?;
        for c in &parsed_bundle {
            require_ca(c, "ca.crt")?;
        }
        let chain = pem_certs(&material.cert_pem, "tls.crt")?;
        let parsed_chain = chain
            .iter()
            .map(|d| parse(d, "tls.crt"))
            .collect::<Result<Vec<_>, _>>()?;
        let (first, top) = match (parsed_chain.first(), parsed_chain.last()) {
            (Some(f), Some(t)) => (f, t),
            _ => return Err(IssuerError::Empty("tls.crt")),
        };
        require_ca(first, "tls.crt")?;
        let subject = first.subject().to_string();

        let key = KeyPair::from_pem(&material.key_pem).map_err(IssuerError::Key)?;
        if key.der_bytes() != &*first.public_key().subject_public_key.data {
            return Err(IssuerError::KeyMismatch);
        }

        let validity = first.validity();
        let (not_before, not_after) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        let t = unix(now);
        if t < not_before || t >= not_after {
            return Err(IssuerError::NotValidNow {
                subject,
                not_before,
                not_after,
            });
        }

        let top_der = chain.last().map(|d| d.as_ref());
        let trusted = bundle.iter().any(|b| Some(b.as_ref()) == top_der)
            || parsed_bundle.iter().any(|root| {
                root.subject() == top.issuer()
                    && top.verify_signature(Some(root.public_key())).is_ok()
            });
        if !trusted {
            return Err(IssuerError::Untrusted(subject));
        }

        let intermediates: Vec<CertificateDer<'static>> = chain
            .iter()
            .filter(|c| !bundle.contains(c))
            .cloned()
            .collect();
        let signer =
            rcgen::Issuer::from_ca_cert_der(&chain[0], key).map_err(IssuerError::Issuer)?;
        Ok(Self {
            signer,
            subject,
            not_after,
            intermediates_pem: pem_of(&intermediates),
            intermediates,
            bundle_pem: pem_of(&bundle),
            bundle,
            trust_domain,
            ttl,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The roots the mesh trusts, PEM.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The roots the mesh trusts, DER.
    pub fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// Lifetime of issued certificates.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Parameters shared by every leaf: validity `[now - BACKDATE, now + ttl]` capped at
    /// the issuer's own expiry, a random serial, no CA, digital signature only.
    fn leaf(
        &self,
        now: SystemTime,
    ) -> Result<(CertificateParams, SystemTime, SystemTime), CertifyError> {
        let issuer_end = from_unix(self.not_after);
        if now >= issuer_end {
            return Err(CertifyError::IssuerExpired);
        }
        let not_before = now - BACKDATE;
        let not_after = (now + self.ttl).min(issuer_end);
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        p.serial_number = Some(random_serial()?);
        Ok((p, not_before, not_after))
    }

    /// Issues a certificate for `id` on the public key of `csr_pem`. Its only name is the
    /// URI SAN `spiffe://<trust-domain>/ns/<namespace>/sa/<name>` (critical, subject empty),
    /// whatever the CSR requests.
    pub fn certify(
        &self,
        csr_pem: &str,
        id: &ServiceAccountId,
        now: SystemTime,
    ) -> Result<Issued, CertifyError> {
        let key = csr_key(csr_pem)?;
        let spiffe_id = id.spiffe_id(&self.trust_domain);
        let (mut params, not_before, not_after) = self.leaf(now)?;
        let uri = spiffe_id.as_str().try_into().map_err(CertifyError::Sign)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| s.to_string().replace(':', ""))
            .unwrap_or_default();
        let cert = params
            .signed_by(&key, &self.signer)
            .map_err(CertifyError::Sign)?;
        let cert_pem = cert.pem();
        Ok(Issued {
            spiffe_id,
            chain_pem: format!("{cert_pem}{}", self.intermediates_pem),
            cert_pem,
            trust_bundle_pem: self.bundle_pem.clone(),
            not_before,
            not_after,
            serial,
        })
    }

    /// A serving certificate for `dns_names` on a fresh in-memory P-256 key: the chain
    /// (leaf first), the key, and when it expires.
    pub fn serving(
        &self,
        dns_names: &[String],
        now: SystemTime,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            PrivatePkcs8KeyDer<'static>,
            SystemTime,
        ),
        CertifyError,
    > {
        let key = KeyPair::generate().map_err(CertifyError::Sign)?;
        let (mut params, _, not_after) = self.leaf(now)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.subject_alt_names = dns_names
            .iter()
            .map(|n| n.as_str().try_into().map(SanType::DnsName))
            .collect::<Result<_, _>>()
            .map_err(CertifyError::Sign)?;
        let cert = params
            .signed_by(&key, &self.signer)
            .map_err(CertifyError::Sign)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok((
            chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_after,
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use rustls::{RootCertStore, pki_types::UnixTime, server::WebPkiClientVerifier};
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    use super::*;
    use crate::ca::root::ROOT_VALIDITY;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    pub(crate) fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").expect("trust domain")
    }

    fn sa(ns: &str, name: &str) -> ServiceAccountId {
        ServiceAccountId::new(ns, name).expect("service account")
    }

    /// A CSR for `key` asking for names the CA must ignore.
    pub(crate) fn csr_asking_for_more(key: &KeyPair) -> String {
        let mut p = CertificateParams::new(vec!["evil.example".to_owned()]).expect("params");
        p.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/kube-system/sa/admin"
                .try_into()
                .expect("uri"),
        ));
        p.distinguished_name.push(DnType::CommonName, "admin");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.serialize_request(key).expect("csr").pem().expect("pem")
    }

    fn issuer(material: &CaMaterial) -> Issuer {
        Issuer::new(material, td(), DAY, SystemTime::now()).expect("issuer")
    }

    fn chain(issued: &Issued) -> Vec<CertificateDer<'static>> {
        pem_certs(&issued.chain_pem, "chain").expect("chain PEM")
    }

    /// Whether a proxy trusting `bundle` accepts `chain` as a peer (the same webpki check
    /// the handshake does, without a name check: SPIFFE peers are matched by URI later).
    pub(crate) fn accepts(
        bundle: &[CertificateDer<'static>],
        chain: &[CertificateDer<'static>],
    ) -> bool {
        let mut roots = RootCertStore::empty();
        for r in bundle {
            roots.add(r.clone()).expect("root");
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        let now = UnixTime::since_unix_epoch(
            SystemTime::now().duration_since(UNIX_EPOCH).expect("clock"),
        );
        verifier
            .verify_client_cert(&chain[0], &chain[1..], now)
            .is_ok()
    }

    #[test]
    fn the_certificate_names_exactly_the_service_account() {
        let root = CaMaterial::generate(SystemTime::now(), ROOT_VALIDITY).expect("root");
        let issuer = issuer(&root);
        let key = KeyPair::generate().expect("key");
        let now = SystemTime::now();
        let issued = issuer
            .certify(&csr_asking_for_more(&key), &sa("shop", "a"), now)
            .expect("issued");
        assert_eq!(issued.spiffe_id, "spiffe://cluster.local/ns/shop/sa/a");
        assert_eq!(issued.trust_bundle_pem, root.bundle_pem);
        assert_eq!(
            issued.chain_pem, issued.cert_pem,
            "a root issuer adds no intermediates"
        );
        assert_eq!(issued.not_after.duration_since(now).expect("after"), DAY);
        assert_eq!(
            now.duration_since(issued.not_before).expect("before"),
            BACKDATE
        );

        let ders = chain(&issued);
        let (_, cert) = x509_parser::parse_x509_certificate(&ders[0]).expect("x509");
        assert!(cert.subject().iter().next().is_none(), "empty subject");
        assert!(!cert.is_ca());
        assert_eq!(
            &*cert.public_key().subject_public_key.data,
            key.der_bytes(),
            "the CSR's key"
        );
        let san = cert
            .extensions()
            .iter()
            .find(|e| {
                matches!(
                    e.parsed_extension(),
                    ParsedExtension::SubjectAlternativeName(_)
                )
            })
            .expect("a SAN extension");
        assert!(san.critical, "SAN is critical when the subject is empty");
        let ParsedExtension::SubjectAlternativeName(names) = san.parsed_extension() else {
            panic!("not a SAN");
        };
        assert_eq!(
            names.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/a")]
        );
        assert!(accepts(issuer.trust_bundle(), &ders));
    }

    #[test]
    fn serials_differ_and_lifetime_stops_at_the_issuer_expiry() {
        let now = SystemTime::now();
        let root = CaMaterial::generate(now, Duration::from_secs(3600)).expect("root");
        let issuer = Issuer::new(&root, td(), DAY, now).expect("issuer");
        let key = KeyPair::generate().expect("key");
        let csr = csr_asking_for_more(&key);
        let a = issuer.certify(&csr, &sa("shop", "a"), now).expect("a");
        let b = issuer.certify(&csr, &sa("shop", "a"), now).expect("b");
        assert_ne!(a.serial, b.serial);
        assert_eq!(
            unix(a.not_after),
            issuer.not_after,
            "capped at the root's expiry"
        );
        assert!(a.not_after < now + DAY);
        let later = now + Duration::from_secs(7200);
        assert!(matches!(
            issuer.certify(&csr, &sa("shop", "a"), later),
            Err(CertifyError::IssuerExpired)
        ));
    }

    #[test]
    fn bad_csrs_are_refused() {
        let root = CaMaterial::generate(SystemTime::now(), ROOT_VALIDITY).expect("root");
        let issuer = issuer(&root);
        let id = sa("shop", "a");
        let now = SystemTime::now();
        let refuse = |csr: &str| issuer.certify(csr, &id, now).expect_err("refused");

        assert!(matches!(refuse("garbage"), CertifyError::MalformedCsr(_)));
        assert!(matches!(refuse(""), CertifyError::MalformedCsr(_)));
        assert!(
            matches!(refuse(&root.cert_pem), CertifyError::MalformedCsr(m) if m.contains("CERTIFICATE"))
        );
        let junk = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(refuse(junk), CertifyError::MalformedCsr(_)));

        // A valid CSR whose signature no longer matches: flip the last signature byte.
        let key = KeyPair::generate().expect("key");
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(csr_asking_for_more(&key).as_bytes()).expect("pem");
        let mut der = pem.contents.clone();
        if let Some(last) = der.last_mut() {
            *last ^= 0x01;
        }
        let tampered = pem_encode(&x509_parser::pem::Pem {
            label: "CERTIFICATE REQUEST".to_owned(),
            contents: der,
        });
        assert!(matches!(refuse(&tampered), CertifyError::BadSignature(_)));

        for (alg, want) in [
            (&rcgen::PKCS_ECDSA_P384_SHA384, "EC curve"),
            (&rcgen::PKCS_ED25519, "Ed25519"),
        ] {
            let key = KeyPair::generate_for(alg).expect("key");
            let err = refuse(&csr_asking_for_more(&key));
            assert!(
                matches!(&err, CertifyError::UnsupportedKey(m) if m.contains(want)),
                "{err}"
            );
        }
    }

    fn material(bundle: &[&CaMaterial], issuer: &CaMaterial) -> CaMaterial {
        CaMaterial {
            bundle_pem: bundle.iter().map(|m| m.bundle_pem.as_str()).collect(),
            cert_pem: issuer.cert_pem.clone(),
            key_pem: issuer.key_pem.clone(),
        }
    }

    #[test]
    fn unusable_material_is_refused() {
        let now = SystemTime::now();
        let a = CaMaterial::generate(now, ROOT_VALIDITY).expect("a");
        let b = CaMaterial::generate(now, ROOT_VALIDITY).expect("b");
        let new = |m: &CaMaterial| Issuer::new(m, td(), DAY, now);

        let mismatched = CaMaterial {
            key_pem: b.key_pem.clone(),
            ..a.clone()
        };
        assert!(matches!(new(&mismatched), Err(IssuerError::KeyMismatch)));
        assert!(matches!(
            new(&material(&[&b], &a)),
            Err(IssuerError::Untrusted(_))
        ));
        let empty = CaMaterial {
            bundle_pem: String::new(),
            ..a.clone()
        };
        assert!(matches!(new(&empty), Err(IssuerError::Empty("ca.crt"))));
        let bad_key = CaMaterial {
            key_pem: "nope".to_owned(),
            ..a.clone()
        };
        assert!(matches!(new(&bad_key), Err(IssuerError::Key(_))));
        assert!(matches!(
            Issuer::new(&a, td(), DAY, now + ROOT_VALIDITY + DAY),
            Err(IssuerError::NotValidNow { .. })
        ));

        // A workload certificate cannot be an issuer.
        let leaf_key = KeyPair::generate().expect("key");
        let leaf = issuer(&a)
            .certify(&csr_asking_for_more(&leaf_key), &sa("shop", "a"), now)
            .expect("leaf");
        let not_ca = CaMaterial {
            bundle_pem: a.bundle_pem.clone(),
            cert_pem: leaf.cert_pem,
            key_pem: leaf_key.serialize_pem(),
        };
        assert!(matches!(new(&not_ca), Err(IssuerError::NotCa { .. })));
    }

    /// Root rotation, the trust-bundle half: while `ca.crt` holds both roots, certificates
    /// from either issuer are accepted by a proxy holding the old+new bundle, and a proxy
    /// still holding only one root rejects the other's — which is why the bundle is
    /// distributed before the issuer switches, and the old root stays until its
    /// certificates have expired.
    #[test]
    fn during_a_rotation_the_bundle_accepts_both_roots() {
        let now = SystemTime::now();
        let old = CaMaterial::generate(now, ROOT_VALIDITY).expect("old");
        let new = CaMaterial::generate(now, ROOT_VALIDITY).expect("new");
        let key = KeyPair::generate().expect("key");
        let csr = csr_asking_for_more(&key);
        let id = sa("shop", "a");

        // Step 1: the bundle grows, the old root still issues.
        let step1 = issuer(&material(&[&old, &new], &old));
        // Step 3: the new root issues.
        let step3 = issuer(&material(&[&old, &new], &new));
        assert_eq!(step1.trust_bundle().len(), 2);
        assert_eq!(step1.trust_bundle_pem(), step3.trust_bundle_pem());

        let from_old = chain(&step1.certify(&csr, &id, now).expect("old-issued"));
        let from_new_issued = step3.certify(&csr, &id, now).expect("new-issued");
        assert_eq!(
            from_new_issued.trust_bundle_pem,
            format!("{}{}", old.bundle_pem, new.bundle_pem)
        );
        let from_new = chain(&from_new_issued);

        let both = step3.trust_bundle();
        assert!(
            accepts(both, &from_old),
            "old+new bundle accepts the old issuer"
        );
        assert!(
            accepts(both, &from_new),
            "old+new bundle accepts the new issuer"
        );

        let only_old = pem_certs(&old.bundle_pem, "old").expect("old");
        let only_new = pem_certs(&new.bundle_pem, "new").expect("new");
        assert!(accepts(&only_old, &from_old));
        assert!(
            !accepts(&only_old, &from_new),
            "old-only proxies reject the new issuer"
        );
        assert!(accepts(&only_new, &from_new));
        assert!(
            !accepts(&only_new, &from_old),
            "new-only proxies reject the old issuer"
        );
    }

    /// A user-supplied intermediate (e.g. from cert-manager): the chain carries it.
    #[test]
    fn an_intermediate_issuer_is_sent_in_the_chain() {
        let now = SystemTime::now();
        let root = CaMaterial::generate(now, ROOT_VALIDITY).expect("root");
        let root_key = KeyPair::from_pem(&root.key_pem).expect("root key");
        let root_issuer =
            rcgen::Issuer::from_ca_cert_pem(&root.cert_pem, root_key).expect("root issuer");
        let int_key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, "remora intermediate");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.use_authority_key_identifier_extension = true;
        let int = p.signed_by(&int_key, &root_issuer).expect("intermediate");
        let material = CaMaterial {
            bundle_pem: root.bundle_pem.clone(),
            cert_pem: format!("{}{}", int.pem(), root.cert_pem),
            key_pem: int_key.serialize_pem(),
        };
        let issuer = issuer(&material);
        let key = KeyPair::generate().expect("key");
        let issued = issuer
            .certify(&csr_asking_for_more(&key), &sa("shop", "a"), now)
            .expect("issued");
        let ders = chain(&issued);
        assert_eq!(ders.len(), 2, "leaf + intermediate, not the root");
        assert_eq!(ders[1], *int.der());
        assert!(accepts(issuer.trust_bundle(), &ders));
        assert!(
            !accepts(issuer.trust_bundle(), &ders[..1]),
            "needs the intermediate"
        );
    }
}
