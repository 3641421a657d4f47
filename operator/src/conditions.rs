//! From a resource and what it relates to (the Services of its namespace, the other
//! resources of its kind) to its status conditions, and the Event that goes with a change.
//!
//! Semantics follow the Gateway API:
//! - `Accepted` says whether the resource is valid and the one in effect for its target:
//!   `False` with reason `Invalid` (a rule the schema cannot express) or `Conflicted` (an
//!   older resource claims the same target).
//! - `ResolvedRefs` says whether every Service it names exists (and, for a split, whether
//!   each backend exposes the root Service's ports): `False` with reason
//!   `ServiceNotFound`, `BackendNotFound` or `BackendPortMismatch`.
//!
//! `lastTransitionTime` moves only when a condition's status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use remora_crds::{
    MeshPolicy, PolicyStatus, TrafficSplit,
    status::{CONDITION_ACCEPTED, CONDITION_RESOLVED_REFS},
};

use crate::{
    conflict,
    validate::{self, RefProblem, Services},
};

/// `Accepted=True`.
pub const REASON_ACCEPTED: &str = "Accepted";
/// `Accepted=False`: a rule beyond the schema is broken.
pub const REASON_INVALID: &str = "Invalid";
/// `Accepted=False`: an older resource claims the same target.
pub const REASON_CONFLICTED: &str = "Conflicted";
/// `ResolvedRefs=True`.
pub const REASON_RESOLVED_REFS: &str = "ResolvedRefs";
/// `ResolvedRefs=False`: the target (or root) Service does not exist.
pub const REASON_SERVICE_NOT_FOUND: &str = "ServiceNotFound";
/// `ResolvedRefs=False`: a backend or mirror Service does not exist.
pub const REASON_BACKEND_NOT_FOUND: &str = "BackendNotFound";
/// `ResolvedRefs=False`: a backend lacks a port of the root Service.
pub const REASON_BACKEND_PORT_MISMATCH: &str = "BackendPortMismatch";

/// One condition before it is stamped with times and generations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Both conditions of a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdicts {
    pub accepted: Verdict,
    pub resolved_refs: Verdict,
}

impl Verdicts {
    /// The Event that announces these verdicts when the status changes: a Warning with
    /// the first failing reason, or Normal `Accepted` when all is well.
    pub fn event(&self) -> EventSpec {
        for v in [&self.accepted, &self.resolved_refs] {
            if !v.ok {
                return EventSpec {
                    warning: true,
                    reason: v.reason,
                    note: v.message.clone(),
                };
            }
        }
        EventSpec {
            warning: false,
            reason: REASON_ACCEPTED,
            note: "valid, in effect, and every referenced Service exists".to_owned(),
        }
    }
}

/// What to publish as an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSpec {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

fn accepted(kind: &str, problems: Vec<String>, winner: Option<String>, target: &str) -> Verdict {
    if !problems.is_empty() {
        return Verdict {
            ok: false,
            reason: REASON_INVALID,
            message: problems.join("; "),
        };
    }
    match winner {
        Some(winner) => Verdict {
            ok: false,
            reason: REASON_CONFLICTED,
            message: format!(
                "{kind} {winner} is older and also targets {target}; only the oldest is in effect"
            ),
        },
        None => Verdict {
            ok: true,
            reason: REASON_ACCEPTED,
            message: format!("in effect for {target}"),
        },
    }
}

fn resolved(problem: Option<RefProblem>) -> Verdict {
    match problem {
        None => Verdict {
            ok: true,
            reason: REASON_RESOLVED_REFS,
            message: "every referenced Service exists".to_owned(),
        },
        Some(RefProblem::ServiceNotFound { message }) => Verdict {
            ok: false,
            reason: REASON_SERVICE_NOT_FOUND,
            message,
        },
        Some(RefProblem::BackendNotFound { message }) => Verdict {
            ok: false,
            reason: REASON_BACKEND_NOT_FOUND,
            message,
        },
        Some(RefProblem::BackendPortMismatch { message }) => Verdict {
            ok: false,
            reason: REASON_BACKEND_PORT_MISMATCH,
            message,
        },
    }
}

/// The Service name a `MeshPolicy` claims; `None` for a namespace-wide policy.
pub fn policy_target(p: &MeshPolicy) -> Option<&str> {
    p.spec.target_ref.as_ref().map(|t| t.name.as_str())
}

/// Every Service name a `TrafficSplit` refers to (root, backends, match backends, mirror).
pub fn split_references(s: &TrafficSplit) -> impl Iterator<Item = &str> {
    std::iter::once(s.spec.service.as_str())
        .chain(s.spec.backends.iter().map(|b| b.service.as_str()))
        .chain(s.spec.matches.iter().map(|m| m.backend.as_str()))
        .chain(s.spec.mirror.iter().map(|m| m.service.as_str()))
}

/// Verdicts for `policy`, given every `MeshPolicy` of its namespace and its Services.
pub fn mesh_policy(policy: &MeshPolicy, policies: &[MeshPolicy], services: &Services) -> Verdicts {
    let ns = policy.namespace().unwrap_or_default();
    let target = policy_target(policy);
    let winner = conflict::winner_over(policy, policies, |p| policy_target(p) == target);
    let target_text = match target {
        Some(name) => format!("Service {name}"),
        None => format!("every Service of namespace {ns}"),
    };
    Verdicts {
        accepted: accepted(
            "MeshPolicy",
            validate::mesh_policy_spec(&policy.spec),
            winner,
            &target_text,
        ),
        resolved_refs: resolved(validate::mesh_policy_refs(&policy.spec, &ns, services)),
    }
}

/// Verdicts for `split`, given every `TrafficSplit` of its namespace and its Services.
pub fn traffic_split(
    split: &TrafficSplit,
    splits: &[TrafficSplit],
    services: &Services,
) -> Verdicts {
    let ns = split.namespace().unwrap_or_default();
    let winner = conflict::winner_over(split, splits, |s| s.spec.service == split.spec.service);
    Verdicts {
        accepted: accepted(
            "TrafficSplit",
            validate::traffic_split_spec(&split.spec),
            winner,
            &format!("Service {}", split.spec.service),
        ),
        resolved_refs: resolved(validate::traffic_split_refs(&split.spec, &ns, services)),
    }
}

fn condition(
    type_: &str,
    v: &Verdict,
    generation: Option<i64>,
    previous: Option<&PolicyStatus>,
    now: &Time,
) -> Condition {
    let status = if v.ok { "True" } else { "False" };
    let last_transition_time = previous
        .and_then(|p| p.condition(type_))
        .filter(|c| c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: v.reason.to_owned(),
        message: v.message.clone(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The status to write: both conditions and `observedGeneration`, keeping each
/// condition's `lastTransitionTime` from `previous` when its status is unchanged.
pub fn status(
    verdicts: &Verdicts,
    generation: Option<i64>,
    previous: Option<&PolicyStatus>,
    now: &Time,
) -> PolicyStatus {
    PolicyStatus {
        conditions: vec![
            condition(
                CONDITION_ACCEPTED,
                &verdicts.accepted,
                generation,
                previous,
                now,
            ),
            condition(
                CONDITION_RESOLVED_REFS,
                &verdicts.resolved_refs,
                generation,
                previous,
                now,
            ),
        ],
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        conflict::tests::at,
        validate::tests::{split, svc},
    };
    use pretty_assertions::assert_eq;
    use remora_crds::{MeshPolicySpec, mesh_policy::TargetRef};

    fn policy(name: &str, created: i64, target: Option<&str>) -> MeshPolicy {
        let mut p = MeshPolicy::new(
            name,
            MeshPolicySpec {
                target_ref: target.map(|t| TargetRef {
                    kind: Default::default(),
                    name: t.to_owned(),
                }),
                ..MeshPolicySpec::default()
            },
        );
        p.metadata.namespace = Some("shop".to_owned());
        p.metadata.creation_timestamp = Some(at(created));
        p
    }

    fn ts(name: &str, created: i64, root: &str, backends: &[(&str, u32)]) -> TrafficSplit {
        let mut s = TrafficSplit::new(name, split(root, backends));
        s.metadata.namespace = Some("shop".to_owned());
        s.metadata.creation_timestamp = Some(at(created));
        s
    }

    fn reasons(v: &Verdicts) -> (&str, &str) {
        (v.accepted.reason, v.resolved_refs.reason)
    }

    #[test]
    fn valid_policy() {
        let services: Services = [("reviews".to_owned(), svc(&[80]))].into();
        let p = policy("p", 0, Some("reviews"));
        let v = mesh_policy(&p, std::slice::from_ref(&p), &services);
        assert_eq!(reasons(&v), (REASON_ACCEPTED, REASON_RESOLVED_REFS));
        assert!(v.accepted.ok && v.resolved_refs.ok);
        assert_eq!(v.event().reason, REASON_ACCEPTED);
        assert!(!v.event().warning);
    }

    #[test]
    fn conflicting_policies_oldest_wins_also_namespace_wide() {
        let services: Services = [("reviews".to_owned(), svc(&[80]))].into();
        let all = vec![
            policy("new", 10, Some("reviews")),
            policy("old", 5, Some("reviews")),
            policy("ns-a", 7, None),
            policy("ns-b", 3, None),
            policy("other", 1, Some("ratings")),
        ];
        let v = mesh_policy(&all[0], &all, &services);
        assert_eq!(reasons(&v), (REASON_CONFLICTED, REASON_RESOLVED_REFS));
        assert_eq!(
            v.accepted.message,
            "MeshPolicy old is older and also targets Service reviews; only the oldest is in effect"
        );
        assert_eq!(
            mesh_policy(&all[1], &all, &services).accepted.reason,
            REASON_ACCEPTED
        );
        let v = mesh_policy(&all[2], &all, &services);
        assert_eq!(reasons(&v), (REASON_CONFLICTED, REASON_RESOLVED_REFS));
        assert!(
            v.accepted
                .message
                .contains("every Service of namespace shop")
        );
        assert_eq!(
            mesh_policy(&all[3], &all, &services).accepted.reason,
            REASON_ACCEPTED
        );
        let v = mesh_policy(&all[4], &all, &services);
        assert_eq!(reasons(&v), (REASON_ACCEPTED, REASON_SERVICE_NOT_FOUND));
        let ev = v.event();
        assert!(ev.warning);
        assert_eq!(ev.reason, REASON_SERVICE_NOT_FOUND);
        assert_eq!(ev.note, "Service ratings not found in namespace shop");
    }

    #[test]
    fn split_verdicts() {
        let services: Services = [
            ("reviews".to_owned(), svc(&[9080])),
            ("v1".to_owned(), svc(&[9080])),
            ("v2".to_owned(), svc(&[8080])),
        ]
        .into();
        let ok = ts("a", 0, "reviews", &[("v1", 90)]);
        assert_eq!(
            reasons(&traffic_split(&ok, &[], &services)),
            (REASON_ACCEPTED, REASON_RESOLVED_REFS)
        );
        let missing = ts("b", 0, "reviews", &[("v1", 90), ("v9", 10)]);
        assert_eq!(
            reasons(&traffic_split(&missing, &[], &services)),
            (REASON_ACCEPTED, REASON_BACKEND_NOT_FOUND)
        );
        let ports = ts("c", 0, "reviews", &[("v2", 1)]);
        assert_eq!(
            reasons(&traffic_split(&ports, &[], &services)),
            (REASON_ACCEPTED, REASON_BACKEND_PORT_MISMATCH)
        );
        let zero = ts("d", 0, "reviews", &[("v1", 0)]);
        let v = traffic_split(&zero, &[], &services);
        assert_eq!(reasons(&v), (REASON_INVALID, REASON_RESOLVED_REFS));
        assert_eq!(
            v.event().reason,
            REASON_INVALID,
            "Accepted problems come first"
        );
        let younger = ts("e", 9, "reviews", &[("v1", 1)]);
        assert_eq!(
            traffic_split(&younger, &[ok.clone(), younger.clone()], &services)
                .accepted
                .reason,
            REASON_CONFLICTED
        );
        let refs: Vec<&str> = split_references(&missing).collect();
        assert_eq!(refs, vec!["reviews", "v1", "v9"]);
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let services: Services = [("reviews".to_owned(), svc(&[80]))].into();
        let p = policy("p", 0, Some("reviews"));
        let first = status(&mesh_policy(&p, &[], &services), Some(1), None, &at(100));
        assert_eq!(first.observed_generation, Some(1));
        assert!(
            first
                .conditions
                .iter()
                .all(|c| c.last_transition_time == at(100))
        );
        assert!(
            first
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(1))
        );

        // same verdicts later, new generation: times kept, generation moves
        let again = status(
            &mesh_policy(&p, &[], &services),
            Some(2),
            Some(&first),
            &at(200),
        );
        assert!(
            again
                .conditions
                .iter()
                .all(|c| c.last_transition_time == at(100))
        );
        assert_eq!(again.observed_generation, Some(2));

        // the Service disappears: ResolvedRefs flips, Accepted keeps its time
        let gone = status(
            &mesh_policy(&p, &[], &Services::new()),
            Some(2),
            Some(&again),
            &at(300),
        );
        let accepted = gone.condition(CONDITION_ACCEPTED).expect("accepted");
        let refs = gone.condition(CONDITION_RESOLVED_REFS).expect("refs");
        assert_eq!(accepted.last_transition_time, at(100));
        assert_eq!(
            (refs.status.as_str(), refs.last_transition_time.clone()),
            ("False", at(300))
        );
        // and recomputing it changes nothing, so the operator writes nothing
        let same = status(
            &mesh_policy(&p, &[], &Services::new()),
            Some(2),
            Some(&gone),
            &at(400),
        );
        assert_eq!(same, gone);
    }
}
