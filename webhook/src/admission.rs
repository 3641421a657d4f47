//! The admission.k8s.io/v1 wire protocol: parse an `AdmissionReview`, run the builder on
//! the pod, and answer with a JSON patch, an allow, or a denial with a reason. Pure: bytes
//! in, response and [`Decision`] out; malformed input never panics, it gets an error
//! response.

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde::{Deserialize, Serialize};

use crate::patch;
use serde_json::Value;

use crate::inject::{self, InjectConfig, Outcome, SkipReason};

/// The API version of reviews this webhook understands.
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// The `request` of an AdmissionReview (the fields the injector reads).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    /// Echoed back in the response.
    pub uid: String,
    /// Kind of the object.
    pub kind: GroupVersionKind,
    /// Namespace of the object.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Name of the object (empty for generateName pods).
    #[serde(default)]
    pub name: Option<String>,
    /// CREATE, UPDATE, DELETE or CONNECT.
    pub operation: String,
    /// The object as submitted.
    #[serde(default)]
    pub object: Option<Value>,
    /// The object before an UPDATE.
    #[serde(default)]
    pub old_object: Option<Value>,
    /// Dry-run requests must not cause side effects.
    #[serde(default)]
    pub dry_run: Option<bool>,
}

/// Group, version and kind.
#[derive(Debug, Clone, Deserialize)]
pub struct GroupVersionKind {
    /// API group; empty for core.
    #[serde(default)]
    pub group: String,
    /// API version.
    pub version: String,
    /// Kind.
    pub kind: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<AdmissionRequest>,
}

/// A status attached to a denial or error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// HTTP-like code.
    pub code: u16,
    /// Human-readable reason, shown to the user by kubectl.
    pub message: String,
}

/// The `response` of an AdmissionReview.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    /// Echo of the request's uid.
    pub uid: String,
    /// Whether the object is admitted.
    pub allowed: bool,
    /// Why not, when not allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// `JSONPatch` when a patch is present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    /// Base64 of the JSON patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Warnings kubectl prints to the user (admitted or not).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// An AdmissionReview carrying a response.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReviewResponse {
    /// Always `admission.k8s.io/v1`.
    pub api_version: &'static str,
    /// Always `AdmissionReview`.
    pub kind: &'static str,
    /// The answer.
    pub response: AdmissionResponse,
}

/// What happened to one review, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The pod gets the proxy.
    Injected {
        /// Native sidecar or classic.
        native_sidecar: bool,
    },
    /// The pod is admitted unchanged.
    Skipped(SkipReason),
    /// Not a CREATE: admitted unchanged.
    IgnoredOperation(String),
    /// The pod is refused (invalid annotations and the like).
    Denied(String),
    /// The review itself is unusable (malformed, not a pod).
    Error(String),
}

impl Decision {
    /// Metric label `decision`.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Injected { .. } => "injected",
            Decision::Skipped(_) | Decision::IgnoredOperation(_) => "skipped",
            Decision::Denied(_) => "denied",
            Decision::Error(_) => "error",
        }
    }

    /// Metric label `reason` (low cardinality).
    pub fn reason(&self) -> &'static str {
        match self {
            Decision::Injected {
                native_sidecar: true,
            } => "native-sidecar",
            Decision::Injected {
                native_sidecar: false,
            } => "classic-sidecar",
            Decision::Skipped(r) => r.as_str(),
            Decision::IgnoredOperation(_) => "not-create",
            Decision::Denied(_) => "invalid-pod",
            Decision::Error(_) => "bad-review",
        }
    }
}

/// Who the review was about, for logs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Subject {
    /// Namespace.
    pub namespace: String,
    /// Name, or generateName followed by `*`.
    pub name: String,
    /// The pod's controller (ReplicaSet, Job, ...), if any.
    pub owner: Option<OwnerReference>,
    /// Whether the request is a dry run (no side effects such as Events allowed).
    pub dry_run: bool,
}

/// The outcome of [`review`]: the body to send and what was decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Reviewed {
    /// The response body.
    pub response: AdmissionReviewResponse,
    /// Whether the request was so malformed that HTTP 400 is the right status.
    pub bad_request: bool,
    /// The decision.
    pub decision: Decision,
    /// The pod concerned.
    pub subject: Subject,
}

pub(crate) fn wrap(response: AdmissionResponse) -> AdmissionReviewResponse {
    AdmissionReviewResponse {
        api_version: API_VERSION,
        kind: "AdmissionReview",
        response,
    }
}

pub(crate) fn refuse(uid: &str, code: u16, message: String) -> AdmissionResponse {
    AdmissionResponse {
        uid: uid.to_owned(),
        allowed: false,
        status: Some(Status { code, message }),
        patch_type: None,
        patch: None,
        warnings: Vec::new(),
    }
}

pub(crate) fn allow(uid: &str) -> AdmissionResponse {
    AdmissionResponse {
        uid: uid.to_owned(),
        allowed: true,
        status: None,
        patch_type: None,
        patch: None,
        warnings: Vec::new(),
    }
}

/// The request of an AdmissionReview body, or why the body is unusable (HTTP 400).
pub fn parse(body: &[u8]) -> Result<AdmissionRequest, String> {
    let parsed: ReviewIn =
        serde_json::from_slice(body).map_err(|e| format!("malformed AdmissionReview: {e}"))?;
    if parsed.kind.as_deref() != Some("AdmissionReview")
        || parsed.api_version.as_deref() != Some(API_VERSION)
    {
        return Err(format!(
            "expected kind AdmissionReview of {API_VERSION}, got kind {:?} of {:?}",
            parsed.kind.unwrap_or_default(),
            parsed.api_version.unwrap_or_default()
        ));
    }
    parsed
        .request
        .ok_or_else(|| "AdmissionReview has no request".to_owned())
}

fn malformed(message: String) -> Reviewed {
    Reviewed {
        response: wrap(refuse("", 400, message.clone())),
        bad_request: true,
        decision: Decision::Error(message),
        subject: Subject::default(),
    }
}

/// Handles one AdmissionReview body.
pub fn review(body: &[u8], cfg: &InjectConfig) -> Reviewed {
    let req = match parse(body) {
        Ok(r) => r,
        Err(message) => return malformed(message),
    };
    let uid = req.uid.as_str();
    let mut subject = Subject {
        namespace: req.namespace.clone().unwrap_or_default(),
        name: req.name.clone().unwrap_or_default(),
        owner: None,
        dry_run: req.dry_run.unwrap_or(false),
    };
    let error = |subject: Subject, message: String| Reviewed {
        response: wrap(refuse(uid, 400, message.clone())),
        bad_request: false,
        decision: Decision::Error(message),
        subject,
    };
    if !req.kind.group.is_empty() || req.kind.kind != "Pod" {
        let gv = if req.kind.group.is_empty() {
            req.kind.version.clone()
        } else {
            format!("{}/{}", req.kind.group, req.kind.version)
        };
        return error(
            subject,
            format!(
                "remora-webhook only mutates Pods, got {} {gv}",
                req.kind.kind
            ),
        );
    }
    if req.operation != "CREATE" {
        return Reviewed {
            response: wrap(allow(uid)),
            bad_request: false,
            decision: Decision::IgnoredOperation(req.operation.clone()),
            subject,
        };
    }
    let Some(object) = req.object else {
        return error(subject, "AdmissionReview request has no object".to_owned());
    };
    let pod: Pod = match Pod::deserialize(&object) {
        Ok(p) => p,
        Err(e) => return error(subject, format!("the object is not a valid Pod: {e}")),
    };
    if subject.name.is_empty() {
        subject.name = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.as_ref().map(|g| format!("{g}*")))
            .unwrap_or_default();
    }
    subject.owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .cloned();
    match inject::inject(&pod, None, cfg) {
        Ok(Outcome::Skipped(reason)) => Reviewed {
            response: wrap(allow(uid)),
            bad_request: false,
            decision: Decision::Skipped(reason),
            subject,
        },
        Ok(Outcome::Injected(inj)) => match patch::verify(&object, &inj.patch)
            .and_then(|()| serde_json::to_vec(&inj.patch).map_err(|e| e.to_string()))
        {
            Ok(bytes) => Reviewed {
                response: wrap(AdmissionResponse {
                    patch_type: Some("JSONPatch"),
                    patch: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                    ..allow(uid)
                }),
                bad_request: false,
                decision: Decision::Injected {
                    native_sidecar: inj.native_sidecar,
                },
                subject,
            },
            Err(e) => error(
                subject,
                format!("remora-webhook cannot patch this pod: {e}"),
            ),
        },
        Err(e) => {
            let message = format!("remora-webhook refused the pod: {e}");
            Reviewed {
                response: wrap(refuse(uid, 400, message.clone())),
                bad_request: false,
                decision: Decision::Denied(message),
                subject,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(object: Value, kind: &str, operation: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": operation,
                "object": object,
            }
        }))
        .expect("json")
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "annotations": annotations},
            "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}]}
        })
    }

    #[test]
    fn injects_with_a_patch_that_applies() {
        let object = pod(json!({}));
        let r = review(
            &body(object.clone(), "Pod", "CREATE"),
            &InjectConfig::default(),
        );
        assert_eq!(
            r.decision,
            Decision::Injected {
                native_sidecar: true
            }
        );
        assert_eq!(r.subject.name, "web-*");
        assert!(r.response.response.allowed);
        assert_eq!(
            r.response.response.uid,
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r.response.response.patch.expect("patch"))
            .expect("base64");
        let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("RFC 6902");
        let mut patched = object;
        json_patch::patch(&mut patched, &patch).expect("applies to the raw object");
        assert_eq!(
            patched["metadata"]["annotations"]["remora.dev/injected"],
            "0.1.0"
        );
        assert_eq!(patched["spec"]["initContainers"][1]["name"], "remora-proxy");
    }

    #[test]
    fn opt_out_is_allowed_unchanged() {
        let r = review(
            &body(
                pod(json!({"remora.dev/inject": "disabled"})),
                "Pod",
                "CREATE",
            ),
            &InjectConfig::default(),
        );
        assert_eq!(r.decision, Decision::Skipped(SkipReason::OptedOut));
        assert!(r.response.response.allowed);
        assert_eq!(r.response.response.patch, None);
    }

    #[test]
    fn invalid_annotation_is_denied_with_its_name() {
        let r = review(
            &body(
                pod(json!({"config.remora.dev/skip-inbound-ports": "80,http"})),
                "Pod",
                "CREATE",
            ),
            &InjectConfig::default(),
        );
        assert!(!r.response.response.allowed);
        let msg = r.response.response.status.expect("status").message;
        assert!(
            msg.contains("config.remora.dev/skip-inbound-ports"),
            "{msg}"
        );
        assert_eq!(r.decision.label(), "denied");
    }

    #[test]
    fn bad_reviews_get_error_responses() {
        let cfg = InjectConfig::default();
        for (input, bad_request) in [
            (b"not json".to_vec(), true),
            (b"{}".to_vec(), true),
            (
                br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#.to_vec(),
                true,
            ),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
                true,
            ),
            (
                body(json!({"kind": "Deployment"}), "Deployment", "CREATE"),
                false,
            ),
            (body(json!({"spec": "nonsense"}), "Pod", "CREATE"), false),
            (body(json!(null), "Pod", "CREATE"), false),
        ] {
            let r = review(&input, &cfg);
            assert!(
                !r.response.response.allowed,
                "{}",
                String::from_utf8_lossy(&input)
            );
            assert_eq!(r.bad_request, bad_request);
            assert_eq!(r.decision.label(), "error");
            assert!(
                !r.response
                    .response
                    .status
                    .expect("status")
                    .message
                    .is_empty()
            );
        }
    }

    #[test]
    fn owner_and_dry_run_are_reported() {
        let mut object = pod(json!({}));
        object["metadata"]["ownerReferences"] = json!([
            {"apiVersion": "v1", "kind": "Node", "name": "n", "uid": "1"},
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "2", "controller": true}
        ]);
        let mut review_json: Value =
            serde_json::from_slice(&body(object, "Pod", "CREATE")).expect("json");
        review_json["request"]["dryRun"] = json!(true);
        let r = review(
            &serde_json::to_vec(&review_json).expect("json"),
            &InjectConfig::default(),
        );
        assert!(r.subject.dry_run);
        assert_eq!(r.subject.owner.map(|o| o.name), Some("web-1".to_owned()));
    }

    /// Every node of a realistic review replaced by values of every JSON type: always a
    /// response, never a panic, and a pod is never admitted with a broken patch.
    #[test]
    fn mutated_reviews_never_panic() {
        fn paths(v: &Value, at: String, out: &mut Vec<String>) {
            out.push(at.clone());
            match v {
                Value::Object(m) => m
                    .iter()
                    .for_each(|(k, v)| paths(v, format!("{at}/{}", patch::escape(k)), out)),
                Value::Array(a) => a
                    .iter()
                    .enumerate()
                    .for_each(|(i, v)| paths(v, format!("{at}/{i}"), out)),
                _ => {}
            }
        }
        let mut object = pod(json!({"config.remora.dev/skip-outbound-cidrs": "10.0.0.0/8"}));
        object["spec"]["containers"][0]["livenessProbe"] =
            json!({"httpGet": {"path": "/h", "port": "http"}});
        object["spec"]["containers"][0]["ports"][0]["name"] = json!("http");
        let base: Value = serde_json::from_slice(&body(object, "Pod", "CREATE")).expect("json");
        let mut all = Vec::new();
        paths(&base, String::new(), &mut all);
        let cfg = InjectConfig::default();
        let replacements = [json!(null), json!(-1), json!("x"), json!([]), json!({})];
        for path in all.iter().skip(1) {
            for r in &replacements {
                let mut mutated = base.clone();
                if let Some(slot) = mutated.pointer_mut(path) {
                    *slot = r.clone();
                }
                let bytes = serde_json::to_vec(&mutated).expect("json");
                let out = review(&bytes, &cfg);
                let resp = &out.response.response;
                if let Some(p) = &resp.patch {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(p)
                        .expect("base64");
                    let patch: json_patch::Patch = serde_json::from_slice(&raw).expect("RFC 6902");
                    let mut object = mutated["request"]["object"].clone();
                    json_patch::patch(&mut object, &patch)
                        .unwrap_or_else(|e| panic!("{path} = {r}: patch does not apply: {e}"));
                }
                assert!(resp.allowed || resp.status.is_some(), "{path} = {r}");
            }
        }
        assert!(all.len() > 30, "walked {} nodes", all.len());
    }

    #[test]
    fn updates_are_allowed_unchanged() {
        let r = review(
            &body(pod(json!({})), "Pod", "UPDATE"),
            &InjectConfig::default(),
        );
        assert!(r.response.response.allowed);
        assert_eq!(r.decision, Decision::IgnoredOperation("UPDATE".into()));
    }
}
