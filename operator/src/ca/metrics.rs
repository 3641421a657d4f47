//! The CA's Prometheus metrics: certificates issued, requests refused by reason, and the
//! time spent signing and in the TokenReview. Registered in a caller-owned registry.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// Why a certify request was refused.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reason {
    /// The body is not the expected JSON.
    MalformedRequest,
    MissingToken,
    InvalidToken,
    ExpiredToken,
    WrongAudience,
    NotServiceAccount,
    MalformedCsr,
    BadSignature,
    UnsupportedKey,
    /// The TokenReview could not be made (apiserver down, RBAC).
    ReviewFailed,
    /// Signing failed or the issuer has expired.
    Internal,
}

impl Reason {
    /// The snake_case name used as the metric label and the `error` field of a refusal.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedRequest => "malformed_request",
            Self::MissingToken => "missing_token",
            Self::InvalidToken => "invalid_token",
            Self::ExpiredToken => "expired_token",
            Self::WrongAudience => "wrong_audience",
            Self::NotServiceAccount => "not_service_account",
            Self::MalformedCsr => "malformed_csr",
            Self::BadSignature => "bad_signature",
            Self::UnsupportedKey => "unsupported_key",
            Self::ReviewFailed => "review_failed",
            Self::Internal => "internal",
        }
    }
}

impl EncodeLabelValue for Reason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: Reason,
}

/// Certificate-authority metrics (cheap to clone: the counters are shared).
#[derive(Clone, Debug)]
pub struct CaMetrics {
    issued: Counter,
    refused: Family<ReasonLabels, Counter>,
    sign_seconds: Histogram,
    review_seconds: Histogram,
}

impl CaMetrics {
    /// Creates the metrics and registers them under `remora_ca`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            issued: Counter::default(),
            refused: Family::default(),
            sign_seconds: Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1]),
            review_seconds: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
        };
        let r = registry.sub_registry_with_prefix("remora_ca");
        r.register(
            "certificates_issued",
            "Workload certificates issued",
            m.issued.clone(),
        );
        r.register(
            "certificates_refused",
            "Certify requests refused, by reason",
            m.refused.clone(),
        );
        r.register(
            "sign_seconds",
            "Time to check a CSR and sign its certificate",
            m.sign_seconds.clone(),
        );
        r.register(
            "token_review_seconds",
            "Round trip of the TokenReview",
            m.review_seconds.clone(),
        );
        m
    }

    pub fn issued(&self) {
        self.issued.inc();
    }

    pub fn refused(&self, reason: Reason) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn observe_sign(&self, secs: f64) {
        self.sign_seconds.observe(secs);
    }

    pub fn observe_review(&self, secs: f64) {
        self.review_seconds.observe(secs);
    }

    /// Issued so far (for tests and logs).
    pub fn issued_count(&self) -> u64 {
        self.issued.get()
    }

    /// Refused so far for `reason`.
    pub fn refused_count(&self, reason: Reason) -> u64 {
        self.refused.get_or_create(&ReasonLabels { reason }).get()
    }
}
