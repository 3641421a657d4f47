//! Who may watch what (pure). The caller is the SPIFFE ID (URI SAN) of its client
//! certificate, which the TLS layer has already verified against the mesh trust bundle.
//! Any mesh identity may watch any outbound destination; a Pod's inbound config only
//! the Pod itself (its `spiffe://<td>/ns/<namespace>/sa/<serviceAccount>`).

use axum::http::StatusCode;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::request::RequestError;
use crate::index::model::ObjKey;

/// Why a watch is refused; each maps to a status and an `error` reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    BadRequest(#[from] RequestError),
    #[error(
        "a client certificate with a mesh SPIFFE ID (chaining to the trust bundle) is required"
    )]
    Unauthenticated,
    #[error("{caller} may not read the inbound config of pod {pod} (identity {owner})")]
    Forbidden {
        caller: String,
        pod: String,
        owner: String,
    },
    #[error("pod {0} is not in the index (yet)")]
    NotFound(String),
    #[error("the index has not listed the cluster yet; retry")]
    NotSynced,
}

impl Refusal {
    /// The short reason: the `error` field of the answer and the metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden { .. } => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::NotSynced => "not_synced",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::NotSynced => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The SPIFFE ID of a DER certificate: its first `spiffe://` URI SAN.
pub fn spiffe_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.extensions()
        .iter()
        .filter_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(&san.general_names),
            _ => None,
        })
        .flatten()
        .find_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some((*u).to_owned()),
            _ => None,
        })
}

/// Any verified mesh identity may watch outbound destinations; every watch needs one.
pub fn authenticated(caller: Option<&str>) -> Result<&str, Refusal> {
    caller.ok_or(Refusal::Unauthenticated)
}

/// A caller may watch the inbound config of `pod` only when `pod` (whose identity is
/// `owner`, `None` when the index does not hold it) is its own. `synced`: whether the
/// index has listed everything (an unknown pod is then a 404, else a 503).
pub fn inbound(
    caller: Option<&str>,
    pod: &ObjKey,
    owner: Option<&str>,
    synced: bool,
) -> Result<(), Refusal> {
    let caller = caller.ok_or(Refusal::Unauthenticated)?;
    match owner {
        None if !synced => Err(Refusal::NotSynced),
        None => Err(Refusal::NotFound(pod.to_string())),
        Some(owner) if owner == caller => Ok(()),
        Some(owner) => Err(Refusal::Forbidden {
            caller: caller.to_owned(),
            pod: pod.to_string(),
            owner: owner.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    const A: &str = "spiffe://cluster.local/ns/shop/sa/a";

    #[test]
    fn only_the_pods_own_identity_reads_its_inbound_config() {
        let pod = ObjKey::new("shop", "reviews-1");
        assert_eq!(inbound(Some(A), &pod, Some(A), true), Ok(()));
        let other = "spiffe://cluster.local/ns/shop/sa/b";
        let r = inbound(Some(other), &pod, Some(A), true).expect_err("forbidden");
        assert_eq!(
            (r.status(), r.reason()),
            (StatusCode::FORBIDDEN, "forbidden")
        );
        assert!(r.to_string().contains(other) && r.to_string().contains("shop/reviews-1"));
        // Same name in another trust domain is another identity.
        assert!(inbound(Some("spiffe://evil.org/ns/shop/sa/a"), &pod, Some(A), true).is_err());
        let r = inbound(None, &pod, Some(A), true).expect_err("no cert");
        assert_eq!(
            (r.status(), r.reason()),
            (StatusCode::UNAUTHORIZED, "unauthenticated")
        );
        let r = inbound(Some(A), &pod, None, true).expect_err("unknown");
        assert_eq!(
            (r.status(), r.reason()),
            (StatusCode::NOT_FOUND, "not_found")
        );
        let r = inbound(Some(A), &pod, None, false).expect_err("not synced");
        assert_eq!(
            (r.status(), r.reason()),
            (StatusCode::SERVICE_UNAVAILABLE, "not_synced")
        );
        assert_eq!(authenticated(Some(A)), Ok(A));
        assert_eq!(authenticated(None), Err(Refusal::Unauthenticated));
        let r = Refusal::from(RequestError::Missing("pod"));
        assert_eq!(
            (r.status(), r.reason()),
            (StatusCode::BAD_REQUEST, "bad_request")
        );
    }

    #[test]
    fn the_spiffe_id_is_the_uri_san() {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(vec!["example.org".to_owned()]).expect("params");
        p.subject_alt_names.push(SanType::URI(
            "https://example.org/x".try_into().expect("uri"),
        ));
        p.subject_alt_names
            .push(SanType::URI(A.try_into().expect("uri")));
        let cert = p.self_signed(&key).expect("cert");
        assert_eq!(spiffe_id(cert.der()).as_deref(), Some(A));

        let p = CertificateParams::new(vec!["example.org".to_owned()]).expect("params");
        let cert = p.self_signed(&key).expect("cert");
        assert_eq!(spiffe_id(cert.der()), None);
        assert_eq!(spiffe_id(b"not a certificate"), None);
    }
}
