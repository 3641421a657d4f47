//! Workload identities: the Kubernetes service account a TokenReview authenticated, and
//! the SPIFFE ID `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` it maps to.

use std::fmt;

/// Why a name is not a usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "user {0:?} is not a service account (expected system:serviceaccount:<namespace>:<name>)"
    )]
    NotServiceAccount(String),
    #[error("namespace {0:?} is not a DNS-1123 label")]
    Namespace(String),
    #[error("service account name {0:?} is not a DNS-1123 subdomain")]
    Name(String),
    #[error("trust domain {0:?} must be 1-255 characters of a-z, 0-9, '.' and '-'")]
    TrustDomain(String),
}

/// A SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Checks the mesh's trust-domain grammar: lower case letters, digits, `.` and `-`.
    /// SPIFFE also allows `_`, but the proxy's config (`is_spiffe_id`) and the CRDs'
    /// identity pattern do not: a domain with `_` would issue identities no proxy accepts.
    pub fn new(s: &str) -> Result<Self, IdentityError> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdentityError::TrustDomain(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for TrustDomain {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A clap value parser that checks the trust-domain grammar and keeps the string.
pub fn parse_trust_domain(s: &str) -> Result<String, IdentityError> {
    TrustDomain::new(s).map(|t| t.0)
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Kubernetes service account, validated so that it can be embedded in a URI as is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccountId {
    namespace: String,
    name: String,
}

const USER_PREFIX: &str = "system:serviceaccount:";

/// A DNS-1123 label: 1-63 of `a-z`, `0-9`, `-`, alphanumeric at both ends (namespaces,
/// Service names).
pub fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters (Pod and
/// service-account names).
pub fn is_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

impl ServiceAccountId {
    pub fn new(namespace: &str, name: &str) -> Result<Self, IdentityError> {
        if !is_label(namespace) {
            return Err(IdentityError::Namespace(namespace.to_owned()));
        }
        if !is_subdomain(name) {
            return Err(IdentityError::Name(name.to_owned()));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Parses the user name the apiserver gives a service-account token:
    /// `system:serviceaccount:<namespace>:<name>`.
    pub fn from_username(user: &str) -> Result<Self, IdentityError> {
        let not_sa = || IdentityError::NotServiceAccount(user.to_owned());
        let rest = user.strip_prefix(USER_PREFIX).ok_or_else(not_sa)?;
        let (ns, name) = rest.split_once(':').ok_or_else(not_sa)?;
        Self::new(ns, name)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<name>`.
    pub fn spiffe_id(&self, td: &TrustDomain) -> String {
        format!("spiffe://{td}/ns/{}/sa/{}", self.namespace, self.name)
    }
}

impl fmt::Display for ServiceAccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_maps_to_spiffe_id() {
        let id = ServiceAccountId::from_username("system:serviceaccount:shop:frontend")
            .expect("a service account");
        let td = TrustDomain::new("cluster.local").expect("td");
        assert_eq!(
            id.spiffe_id(&td),
            "spiffe://cluster.local/ns/shop/sa/frontend"
        );
        assert_eq!(id.to_string(), "shop/frontend");
    }

    #[test]
    fn other_users_and_bad_names_are_refused() {
        for (user, want) in [
            ("admin", IdentityError::NotServiceAccount("admin".into())),
            (
                "system:serviceaccount:shop",
                IdentityError::NotServiceAccount("system:serviceaccount:shop".into()),
            ),
            (
                "system:node:n1",
                IdentityError::NotServiceAccount("system:node:n1".into()),
            ),
            (
                "system:serviceaccount:Shop:a",
                IdentityError::Namespace("Shop".into()),
            ),
            (
                "system:serviceaccount:shop:a/b",
                IdentityError::Name("a/b".into()),
            ),
            (
                "system:serviceaccount:shop:a:b",
                IdentityError::Name("a:b".into()),
            ),
            (
                "system:serviceaccount:shop:",
                IdentityError::Name(String::new()),
            ),
        ] {
            assert_eq!(ServiceAccountId::from_username(user), Err(want), "{user}");
        }
        assert!(ServiceAccountId::new("shop", "sa.with.dots").is_ok());
    }

    #[test]
    fn trust_domain_grammar() {
        assert!(TrustDomain::new("example.org").is_ok());
        for bad in ["", "Example.org", "a/b", "a b", "spiffe://x"] {
            assert!(TrustDomain::new(bad).is_err(), "{bad:?}");
        }
    }
}
