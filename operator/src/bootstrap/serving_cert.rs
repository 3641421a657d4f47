//! The webhook's serving certificate (Secret `remora-webhook-tls`, `kubernetes.io/tls`:
//! `tls.crt` = leaf then intermediates, `tls.key`), decided purely: whether the Secret at hand must
//! be (re)issued at a given time, and the Secret for a freshly issued certificate.
//!
//! Lifetime [`LIFETIME`] = 30 days, renewed at 70 % (day 21). Unlike a proxy's key, this
//! one is stored in a Secret, so the lifetime bounds how long a leaked key stays useful;
//! but the webhook fails closed (`failurePolicy: Fail`) and only the operator renews it, so
//! the 9 days between renewal and expiry are how long the operator may be down before pods
//! can no longer be created in meshed namespaces. A month balances the two (cert-manager's
//! default is 90 days; 24 h like the workloads would leave a 7 h margin).

use std::{collections::BTreeMap, time::Duration, time::SystemTime};

use k8s_openapi::ByteString;
use rcgen::{KeyPair, PublicKeyData};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::{
    extensions::{GeneralName, ParsedExtension},
    prelude::{FromDer, X509Certificate},
};

/// Lifetime of the webhook's serving certificate.
pub const LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// The fraction of the lifetime after which it is renewed.
pub const RENEW_AT: f64 = 0.7;

pub const CERT_KEY: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";

/// Why a new certificate is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Missing,
    Unreadable(String),
    /// The DNS names differ from the Service's.
    Names,
    /// Not signed by the current issuer (a root rotation switched it).
    OtherIssuer,
    /// `tls.key` is not the certificate's key.
    KeyMismatch,
    /// 70 % of the lifetime has passed (or it expired).
    Due,
}

/// What to do with the Secret now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It is good; look again at `renew_at` at the latest.
    Keep {
        renew_at: SystemTime,
    },
    Issue(Reason),
}

fn unix(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or_default())
}

/// Whether the Secret `data` holds a certificate for exactly `names`, signed by
/// `issuer_der`, with its key, and not yet at 70 % of its lifetime at `now`.
pub fn decide(
    data: Option<&BTreeMap<String, ByteString>>,
    names: &[String],
    issuer_der: &[u8],
    now: SystemTime,
) -> Decision {
    let Some(data) = data else {
        return Decision::Issue(Reason::Missing);
    };
    let (Some(cert), Some(key)) = (data.get(CERT_KEY), data.get(KEY_KEY)) else {
        return Decision::Issue(Reason::Missing);
    };
    let unreadable = |e: String| Decision::Issue(Reason::Unreadable(e));
    let leaf = match x509_parser::pem::Pem::iter_from_buffer(&cert.0).next() {
        Some(Ok(p)) => p.contents,
        Some(Err(e)) => return unreadable(format!("tls.crt: {e}")),
        None => return unreadable("tls.crt holds no certificate".to_owned()),
    };
    let leaf = match X509Certificate::from_der(&leaf) {
        Ok((_, c)) => c,
        Err(e) => return unreadable(format!("tls.crt: {e}")),
    };
    let mut have: Vec<String> = leaf
        .extensions()
        .iter()
        .filter_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.clone()),
            _ => None,
        })
        .flatten()
        .map(|n| match n {
            GeneralName::DNSName(d) => d.to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    let mut want = names.to_vec();
    have.sort();
    want.sort();
    if have != want {
        return Decision::Issue(Reason::Names);
    }
    let signed_by_issuer = X509Certificate::from_der(issuer_der).is_ok_and(|(_, issuer)| {
        leaf.issuer() == issuer.subject()
            && leaf.verify_signature(Some(issuer.public_key())).is_ok()
    });
    if !signed_by_issuer {
        return Decision::Issue(Reason::OtherIssuer);
    }
    let key_matches = std::str::from_utf8(&key.0)
        .ok()
        .and_then(|k| KeyPair::from_pem(k).ok())
        .is_some_and(|k| k.der_bytes() == &*leaf.public_key().subject_public_key.data);
    if !key_matches {
        return Decision::Issue(Reason::KeyMismatch);
    }
    let validity = leaf.validity();
    let (start, end) = (
        unix(validity.not_before.timestamp()),
        unix(validity.not_after.timestamp()),
    );
    let renew_at = start
        + end
            .duration_since(start)
            .unwrap_or_default()
            .mul_f64(RENEW_AT);
    if now >= renew_at {
        return Decision::Issue(Reason::Due);
    }
    Decision::Keep { renew_at }
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(line));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// The server-side apply body of the `kubernetes.io/tls` Secret for a chain (leaf first)
/// and its key.
pub fn secret(
    namespace: &str,
    name: &str,
    chain: &[CertificateDer<'_>],
    key: &PrivatePkcs8KeyDer<'_>,
) -> serde_json::Value {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let chain_pem: String = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    let key_pem = pem("PRIVATE KEY", key.secret_pkcs8_der());
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "remora-operator",
                "app.kubernetes.io/part-of": "remora",
            },
        },
        "type": "kubernetes.io/tls",
        "data": {
            CERT_KEY: b64(&chain_pem),
            KEY_KEY: b64(&key_pem),
        },
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Secret;

    use super::*;
    use crate::ca::{CaMaterial, Issuer, TrustDomain, root::ROOT_VALIDITY};

    fn names() -> Vec<String> {
        crate::ca::tls::serving_names("remora-webhook", "remora-system")
    }

    fn issuer(m: &CaMaterial, now: SystemTime) -> Issuer {
        Issuer::new(
            m,
            TrustDomain::new("cluster.local").expect("td"),
            LIFETIME,
            now,
        )
        .expect("issuer")
    }

    fn issuer_der(m: &CaMaterial) -> Vec<u8> {
        x509_parser::pem::Pem::iter_from_buffer(m.cert_pem.as_bytes())
            .next()
            .expect("a certificate")
            .expect("PEM")
            .contents
    }

    /// The Secret data as the apiserver would store it.
    fn issued(m: &CaMaterial, names: &[String], now: SystemTime) -> BTreeMap<String, ByteString> {
        let (chain, key, _) = issuer(m, now).serving(names, now).expect("issued");
        let s: Secret =
            serde_json::from_value(secret("ns", "n", &chain, &key)).expect("a valid Secret");
        s.data.expect("data")
    }

    #[test]
    fn a_fresh_certificate_is_kept_until_70_percent_of_its_lifetime() {
        let now = SystemTime::now();
        let m = CaMaterial::generate(now, ROOT_VALIDITY).expect("root");
        let data = issued(&m, &names(), now);
        let Decision::Keep { renew_at } = decide(Some(&data), &names(), &issuer_der(&m), now)
        else {
            panic!("a fresh certificate is kept");
        };
        // Issued a minute backdated, for 30 days (+ the minute).
        let expected =
            now - Duration::from_secs(60) + (LIFETIME + Duration::from_secs(60)).mul_f64(0.7);
        let diff = renew_at
            .duration_since(expected)
            .or_else(|e| Ok::<_, ()>(e.duration()))
            .expect("diff");
        assert!(diff <= Duration::from_secs(1), "renew at 70 %: {diff:?}");
        assert_eq!(
            decide(
                Some(&data),
                &names(),
                &issuer_der(&m),
                renew_at - Duration::from_secs(2)
            ),
            Decision::Keep { renew_at }
        );
        assert_eq!(
            decide(Some(&data), &names(), &issuer_der(&m), renew_at),
            Decision::Issue(Reason::Due)
        );
        assert_eq!(
            decide(Some(&data), &names(), &issuer_der(&m), now + LIFETIME * 2),
            Decision::Issue(Reason::Due)
        );
    }

    #[test]
    fn missing_broken_misnamed_foreign_or_mismatched_secrets_are_reissued() {
        let now = SystemTime::now();
        let m = CaMaterial::generate(now, ROOT_VALIDITY).expect("root");
        let other = CaMaterial::generate(now, ROOT_VALIDITY).expect("other root");
        let der = issuer_der(&m);
        assert_eq!(
            decide(None, &names(), &der, now),
            Decision::Issue(Reason::Missing)
        );
        let good = issued(&m, &names(), now);

        let mut no_key = good.clone();
        no_key.remove(KEY_KEY);
        assert_eq!(
            decide(Some(&no_key), &names(), &der, now),
            Decision::Issue(Reason::Missing)
        );

        let mut garbage = good.clone();
        garbage.insert(CERT_KEY.to_owned(), ByteString(b"not PEM".to_vec()));
        assert!(matches!(
            decide(Some(&garbage), &names(), &der, now),
            Decision::Issue(Reason::Unreadable(_))
        ));

        let misnamed = issued(&m, &["other.remora-system.svc".to_owned()], now);
        assert_eq!(
            decide(Some(&misnamed), &names(), &der, now),
            Decision::Issue(Reason::Names)
        );

        // After the issuer switched (rotation step 3), the old certificate is replaced
        // while its root is still trusted.
        let foreign = issued(&other, &names(), now);
        assert_eq!(
            decide(Some(&foreign), &names(), &der, now),
            Decision::Issue(Reason::OtherIssuer)
        );

        let mut swapped = good.clone();
        swapped.insert(KEY_KEY.to_owned(), foreign[KEY_KEY].clone());
        assert_eq!(
            decide(Some(&swapped), &names(), &der, now),
            Decision::Issue(Reason::KeyMismatch)
        );
    }

    #[test]
    fn the_secret_is_a_tls_secret_with_chain_and_key() {
        let now = SystemTime::now();
        let m = CaMaterial::generate(now, ROOT_VALIDITY).expect("root");
        let data = issued(&m, &names(), now);
        let text = |k: &str| String::from_utf8(data[k].0.clone()).expect("UTF-8");
        assert!(text(CERT_KEY).starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(text(KEY_KEY).starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert_eq!(data.len(), 2, "tls.crt and tls.key only");
        KeyPair::from_pem(&text(KEY_KEY)).expect("the key parses back");
    }
}
