//! Validating admission for Namespaces (`/validate-namespace`). The label
//! `remora.dev/inject` switches the mesh on for a whole namespace, and the mutating
//! webhook only selects the exact value `enabled`: a typo (`yes`, `true`, `Enabled`) would
//! silently leave every new pod of the namespace without a proxy — no mTLS, no policy —
//! and nothing would say so. So the API server sends CREATE and UPDATE of namespaces
//! carrying the label here (the ValidatingWebhookConfiguration's objectSelector), and a
//! value other than `enabled` or `disabled` is refused with a message naming the label and
//! the accepted values.
//!
//! An UPDATE that keeps a bad value the namespace already had (labelled before Remora was
//! installed) is allowed with a warning, so an unrelated change to such a namespace is
//! never blocked; setting or changing the label to a bad value is not.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace;
use serde::Deserialize;
use serde_json::Value;

use crate::admission::{self, AdmissionReviewResponse, allow, refuse, wrap};
use crate::annotations::NAMESPACE_LABEL;

/// The values the label may take.
pub const VALUES: [&str; 2] = ["enabled", "disabled"];

/// A namespace label value the mesh does not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "namespace label {NAMESPACE_LABEL}={value:?} is not valid: use \"enabled\" (new pods get the Remora proxy) or \"disabled\" (they never do), or remove the label"
)]
pub struct LabelError {
    /// The value found.
    pub value: String,
}

/// Checks the mesh's label among a namespace's labels (absent is fine).
pub fn check_labels(labels: Option<&BTreeMap<String, String>>) -> Result<(), LabelError> {
    match labels.and_then(|l| l.get(NAMESPACE_LABEL)) {
        Some(v) if !VALUES.contains(&v.as_str()) => Err(LabelError { value: v.clone() }),
        _ => Ok(()),
    }
}

/// What happened to one namespace review, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceDecision {
    /// Admitted (maybe with a warning).
    Allowed,
    /// The label's value is refused.
    Denied(String),
    /// The review itself is unusable.
    Error(String),
}

impl NamespaceDecision {
    /// Metric label `decision`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied(_) => "denied",
            Self::Error(_) => "error",
        }
    }

    /// Metric label `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Allowed => "namespace-label",
            Self::Denied(_) => "invalid-namespace-label",
            Self::Error(_) => "bad-review",
        }
    }
}

/// The outcome of [`review`].
#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceReviewed {
    /// The response body.
    pub response: AdmissionReviewResponse,
    /// Whether HTTP 400 is the right status.
    pub bad_request: bool,
    /// The decision.
    pub decision: NamespaceDecision,
    /// The namespace's name (empty when unknown).
    pub name: String,
}

/// The labels of a namespace object (`None` when it has none).
fn labels_of(object: &Value) -> Result<Option<BTreeMap<String, String>>, String> {
    let ns = Namespace::deserialize(object).map_err(|e| format!("not a valid Namespace: {e}"))?;
    Ok(ns.metadata.labels)
}

/// Handles one AdmissionReview body about a Namespace.
pub fn review(body: &[u8]) -> NamespaceReviewed {
    let req = match admission::parse(body) {
        Ok(r) => r,
        Err(message) => {
            return NamespaceReviewed {
                response: wrap(refuse("", 400, message.clone())),
                bad_request: true,
                decision: NamespaceDecision::Error(message),
                name: String::new(),
            };
        }
    };
    let uid = req.uid.as_str();
    let name = req.name.clone().unwrap_or_default();
    let error = |message: String| NamespaceReviewed {
        response: wrap(refuse(uid, 400, message.clone())),
        bad_request: false,
        decision: NamespaceDecision::Error(message),
        name: name.clone(),
    };
    if !req.kind.group.is_empty() || req.kind.kind != "Namespace" {
        return error(format!(
            "/validate-namespace only reviews Namespaces, got {}",
            req.kind.kind
        ));
    }
    let allowed = |warnings: Vec<String>| NamespaceReviewed {
        response: wrap(admission::AdmissionResponse {
            warnings,
            ..allow(uid)
        }),
        bad_request: false,
        decision: NamespaceDecision::Allowed,
        name: name.clone(),
    };
    if req.operation != "CREATE" && req.operation != "UPDATE" {
        return allowed(Vec::new());
    }
    let Some(object) = req.object.as_ref() else {
        return error("AdmissionReview request has no object".to_owned());
    };
    let labels = match labels_of(object) {
        Ok(l) => l,
        Err(e) => return error(e),
    };
    let Err(bad) = check_labels(labels.as_ref()) else {
        return allowed(Vec::new());
    };
    // The same bad value as before the update: this change did not set it.
    let unchanged = req.operation == "UPDATE"
        && req
            .old_object
            .as_ref()
            .and_then(|o| labels_of(o).ok().flatten())
            .and_then(|l| l.get(NAMESPACE_LABEL).cloned())
            .is_some_and(|old| old == bad.value);
    if unchanged {
        return allowed(vec![format!(
            "{bad}; no pod of namespace {name} gets the proxy until it is fixed"
        )]);
    }
    let message = bad.to_string();
    NamespaceReviewed {
        response: wrap(refuse(uid, 400, message.clone())),
        bad_request: false,
        decision: NamespaceDecision::Denied(message),
        name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ns(labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": labels}})
    }

    fn body(operation: &str, object: Value, old: Option<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Namespace"},
                "resource": {"group": "", "version": "v1", "resource": "namespaces"},
                "name": "shop",
                "operation": operation,
                "object": object,
                "oldObject": old,
            }
        }))
        .expect("json")
    }

    #[test]
    fn only_enabled_and_disabled_pass() {
        let labels = |v: &str| BTreeMap::from([(NAMESPACE_LABEL.to_owned(), v.to_owned())]);
        assert_eq!(check_labels(None), Ok(()));
        assert_eq!(check_labels(Some(&BTreeMap::new())), Ok(()));
        for ok in VALUES {
            assert_eq!(check_labels(Some(&labels(ok))), Ok(()), "{ok}");
        }
        for bad in ["yes-please", "true", "Enabled", "", " enabled"] {
            let err = check_labels(Some(&labels(bad))).expect_err(bad);
            assert_eq!(err.value, bad);
        }
        let msg = check_labels(Some(&labels("yes-please")))
            .expect_err("bad")
            .to_string();
        assert_eq!(
            msg,
            "namespace label remora.dev/inject=\"yes-please\" is not valid: use \"enabled\" (new pods get the Remora proxy) or \"disabled\" (they never do), or remove the label"
        );
    }

    #[test]
    fn a_bad_value_is_refused_with_the_message() {
        for op in ["CREATE", "UPDATE"] {
            let r = review(&body(
                op,
                ns(json!({"remora.dev/inject": "yes-please"})),
                Some(ns(json!({}))),
            ));
            assert!(!r.response.response.allowed, "{op}");
            assert!(!r.bad_request);
            let status = r.response.response.status.expect("status");
            assert_eq!(status.code, 400);
            assert!(
                status.message.contains("\"yes-please\" is not valid"),
                "{}",
                status.message
            );
            assert_eq!(r.decision.label(), "denied");
            assert_eq!(r.name, "shop");
            assert_eq!(r.response.response.uid, "u-1");
        }
    }

    #[test]
    fn good_values_and_unlabelled_namespaces_pass() {
        for labels in [
            json!({"remora.dev/inject": "enabled"}),
            json!({"remora.dev/inject": "disabled", "team": "a"}),
            json!({"team": "a"}),
            json!(null),
        ] {
            let r = review(&body("CREATE", ns(labels.clone()), None));
            assert!(r.response.response.allowed, "{labels}");
            assert!(r.response.response.warnings.is_empty());
        }
        // Removing the label, or fixing it, is always possible.
        let r = review(&body(
            "UPDATE",
            ns(json!({})),
            Some(ns(json!({"remora.dev/inject": "yes"}))),
        ));
        assert!(r.response.response.allowed);
    }

    #[test]
    fn an_update_keeping_an_old_bad_value_is_allowed_with_a_warning() {
        let r = review(&body(
            "UPDATE",
            ns(json!({"remora.dev/inject": "yes", "team": "b"})),
            Some(ns(json!({"remora.dev/inject": "yes", "team": "a"}))),
        ));
        assert!(r.response.response.allowed);
        let w = &r.response.response.warnings;
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("no pod of namespace shop gets the proxy"),
            "{w:?}"
        );
        // Changing one bad value into another is refused.
        let r = review(&body(
            "UPDATE",
            ns(json!({"remora.dev/inject": "yes-please"})),
            Some(ns(json!({"remora.dev/inject": "yes"}))),
        ));
        assert!(!r.response.response.allowed);
    }

    #[test]
    fn unusable_reviews_get_errors() {
        let r = review(b"{not json");
        assert!(r.bad_request && !r.response.response.allowed);
        let mut pod_review: Value =
            serde_json::from_slice(&body("CREATE", ns(json!({})), None)).expect("json");
        pod_review["request"]["kind"]["kind"] = json!("Pod");
        let r = review(&serde_json::to_vec(&pod_review).expect("json"));
        assert_eq!(r.decision.label(), "error");
        assert!(!r.response.response.allowed);
        let r = review(&body("CREATE", json!({"metadata": {"labels": "x"}}), None));
        assert_eq!(r.decision.label(), "error");
        let r = review(&body("DELETE", json!(null), None));
        assert!(r.response.response.allowed, "deletes are not ours to judge");
    }

    #[test]
    fn the_response_serialises_warnings_only_when_present() {
        let r = review(&body("CREATE", ns(json!({})), None));
        let json = serde_json::to_value(&r.response).expect("json");
        assert!(json["response"].get("warnings").is_none(), "{json}");
        let r = review(&body(
            "UPDATE",
            ns(json!({"remora.dev/inject": "on"})),
            Some(ns(json!({"remora.dev/inject": "on"}))),
        ));
        let json = serde_json::to_value(&r.response).expect("json");
        assert_eq!(
            json["response"]["warnings"].as_array().map(Vec::len),
            Some(1)
        );
    }
}
