//! Checks the CRD schema cannot express (Kubernetes 1.20 has no CEL): rules that relate
//! fields of one spec to each other, and the references a spec makes to Services.
//!
//! Pure functions: a spec (and the Services of its namespace) in, problems out.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use remora_crds::{MeshPolicySpec, TrafficSplitSpec, check, policy::MtlsMode};

/// A Service port as clients see it: number and protocol (`TCP` when unset).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePort {
    pub port: i32,
    pub protocol: String,
}

impl std::fmt::Display for ServicePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// What the checks need to know about a Service that exists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    pub ports: BTreeSet<ServicePort>,
}

impl ServiceInfo {
    /// The ports of a core/v1 Service.
    pub fn from_service(svc: &Service) -> Self {
        let ports = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .map(|ports| {
                ports
                    .iter()
                    .map(|p| ServicePort {
                        port: p.port,
                        protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self { ports }
    }
}

/// The Services of one namespace that exist, by name.
pub type Services = BTreeMap<String, ServiceInfo>;

/// Problems of a `MeshPolicySpec` the schema cannot catch, each a sentence for a
/// condition message: the policy rules shared with the proxy ([`remora_crds::check`]) and
/// those relating the inbound fields to each other.
pub fn mesh_policy_spec(spec: &MeshPolicySpec) -> Vec<String> {
    let mut found = check::traffic_policy(&spec.traffic_policy());
    if let Some(r) = &spec.rate_limit {
        found.extend(check::rate_limit(r));
    }
    let mut problems: Vec<String> = found.iter().map(ToString::to_string).collect();
    let mtls_disabled = spec
        .mtls
        .as_ref()
        .is_some_and(|m| m.mode == MtlsMode::Disabled);
    if mtls_disabled && spec.rate_limit.as_ref().is_some_and(|r| r.per_identity) {
        problems.push(
            "rateLimit.perIdentity needs mTLS: with mtls.mode Disabled no caller has an \
             identity"
                .to_owned(),
        );
    }
    problems
}

/// Cross-field problems of a `TrafficSplitSpec`, each a sentence for a condition message.
pub fn traffic_split_spec(spec: &TrafficSplitSpec) -> Vec<String> {
    let mut problems = Vec::new();
    if spec.backends.iter().all(|b| b.weight == 0) {
        problems.push("every backend has weight 0: no traffic could be routed".to_owned());
    }
    let mut seen = BTreeSet::new();
    for b in &spec.backends {
        if !seen.insert(b.service.as_str()) {
            problems.push(format!("backend {} is listed more than once", b.service));
        }
    }
    for (i, m) in spec.matches.iter().enumerate() {
        if !seen.contains(m.backend.as_str()) {
            problems.push(format!(
                "matches[{i}].backend {} is not one of the backends",
                m.backend
            ));
        }
    }
    if let Some(mirror) = &spec.mirror
        && mirror.service == spec.service
    {
        problems.push(format!(
            "mirror.service {} is the root service: mirrored requests would loop",
            mirror.service
        ));
    }
    problems
}

/// Why references do not resolve; `None` from the `*_refs` functions means they all do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefProblem {
    /// The policy's target or the split's root Service does not exist.
    ServiceNotFound { message: String },
    /// A backend (or the mirror) Service does not exist.
    BackendNotFound { message: String },
    /// A backend lacks a port of the root Service.
    BackendPortMismatch { message: String },
}

/// Does the policy's target Service exist? A namespace-wide policy has no references.
pub fn mesh_policy_refs(
    spec: &MeshPolicySpec,
    namespace: &str,
    services: &Services,
) -> Option<RefProblem> {
    let target = spec.target_ref.as_ref()?;
    if services.contains_key(&target.name) {
        None
    } else {
        Some(RefProblem::ServiceNotFound {
            message: format!("Service {} not found in namespace {namespace}", target.name),
        })
    }
}

/// Do the root, backend and mirror Services exist, and does every backend expose every
/// port of the root Service?
pub fn traffic_split_refs(
    spec: &TrafficSplitSpec,
    namespace: &str,
    services: &Services,
) -> Option<RefProblem> {
    let mut missing_backends: Vec<&str> = Vec::new();
    for name in spec
        .backends
        .iter()
        .map(|b| b.service.as_str())
        .chain(spec.mirror.as_ref().map(|m| m.service.as_str()))
    {
        if !services.contains_key(name) && !missing_backends.contains(&name) {
            missing_backends.push(name);
        }
    }
    let Some(root) = services.get(&spec.service) else {
        let mut message = format!(
            "root Service {} not found in namespace {namespace}",
            spec.service
        );
        if !missing_backends.is_empty() {
            message.push_str(&format!(
                "; backend Services not found: {}",
                missing_backends.join(", ")
            ));
        }
        return Some(RefProblem::ServiceNotFound { message });
    };
    if !missing_backends.is_empty() {
        return Some(RefProblem::BackendNotFound {
            message: format!(
                "backend Services not found in namespace {namespace}: {}",
                missing_backends.join(", ")
            ),
        });
    }
    let mut lacking = Vec::new();
    for b in &spec.backends {
        let Some(backend) = services.get(&b.service) else {
            continue;
        };
        let absent: Vec<String> = root
            .ports
            .difference(&backend.ports)
            .map(ToString::to_string)
            .collect();
        if !absent.is_empty() {
            lacking.push(format!("{} lacks {}", b.service, absent.join(", ")));
        }
    }
    if lacking.is_empty() {
        None
    } else {
        Some(RefProblem::BackendPortMismatch {
            message: format!(
                "backends must expose every port of root Service {}: {}",
                spec.service,
                lacking.join("; ")
            ),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pretty_assertions::assert_eq;
    use remora_crds::{
        duration::Duration,
        mesh_policy::TargetRef,
        policy::{Backoff, ConsistentHash, LbAlgorithm, LoadBalancer, MtlsPolicy, Retries},
        traffic_split::{SplitBackend, SplitMatch, SplitMirror},
    };

    pub(crate) fn svc(ports: &[i32]) -> ServiceInfo {
        ServiceInfo {
            ports: ports
                .iter()
                .map(|&port| ServicePort {
                    port,
                    protocol: "TCP".to_owned(),
                })
                .collect(),
        }
    }

    pub(crate) fn split(service: &str, backends: &[(&str, u32)]) -> TrafficSplitSpec {
        TrafficSplitSpec {
            service: service.to_owned(),
            backends: backends
                .iter()
                .map(|(s, w)| SplitBackend {
                    service: (*s).to_owned(),
                    weight: *w,
                })
                .collect(),
            matches: Vec::new(),
            mirror: None,
        }
    }

    #[test]
    fn service_info_defaults_protocol_to_tcp() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "spec": {"ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}
        }))
        .expect("service");
        let info = ServiceInfo::from_service(&svc);
        let ports: Vec<String> = info.ports.iter().map(ToString::to_string).collect();
        assert_eq!(ports, vec!["53/UDP", "80/TCP"]);
        assert_eq!(
            ServiceInfo::from_service(&Service::default()),
            ServiceInfo::default()
        );
    }

    #[test]
    fn consistent_hash_needs_a_key_and_the_matching_algorithm() {
        let mut spec = MeshPolicySpec {
            load_balancer: Some(LoadBalancer {
                algorithm: LbAlgorithm::ConsistentHash,
                consistent_hash: None,
                locality: None,
            }),
            ..MeshPolicySpec::default()
        };
        assert_eq!(mesh_policy_spec(&spec).len(), 1);
        spec.load_balancer.as_mut().expect("lb").consistent_hash = Some(ConsistentHash {
            header: Some("x-user".to_owned()),
            ..ConsistentHash::default()
        });
        assert_eq!(mesh_policy_spec(&spec), Vec::<String>::new());
        spec.load_balancer.as_mut().expect("lb").algorithm = LbAlgorithm::RoundRobin;
        assert_eq!(
            mesh_policy_spec(&spec),
            vec![
                "loadBalancer.consistentHash is set but loadBalancer.algorithm is RoundRobin, not \
                 ConsistentHash"
                    .to_owned()
            ]
        );
    }

    #[test]
    fn backoff_base_must_not_exceed_max() {
        let spec = MeshPolicySpec {
            retries: Some(Retries {
                attempts: 2,
                per_try_timeout: None,
                retry_on: Vec::new(),
                backoff: Some(Backoff {
                    base: Duration::from_secs(2),
                    max: Duration::from_millis(250),
                }),
                budget_percent: 20,
            }),
            ..MeshPolicySpec::default()
        };
        assert_eq!(
            mesh_policy_spec(&spec),
            vec!["retries.backoff.base (2s) is longer than retries.backoff.max (250ms)".to_owned()]
        );
    }

    #[test]
    fn new_policy_fields_are_checked() {
        let spec: MeshPolicySpec = serde_json::from_value(serde_json::json!({
            "fault": {},
            "loadBalancer": {"algorithm": "ConsistentHash",
                             "consistentHash": {"cookie": {"name": "sid", "ttl": "0s"}}},
            "rateLimit": {"requestsPerSecond": 5, "perIdentity": true},
            "mtls": {"mode": "Disabled"},
        }))
        .expect("schema-valid");
        assert_eq!(
            mesh_policy_spec(&spec),
            vec![
                "loadBalancer.consistentHash.cookie.ttl must be longer than 0 (leave it out for \
                 a session cookie)"
                    .to_owned(),
                "fault needs a delay, an abort or both".to_owned(),
                "rateLimit.perIdentity needs mTLS: with mtls.mode Disabled no caller has an \
                 identity"
                    .to_owned(),
            ]
        );
        let ok: MeshPolicySpec = serde_json::from_value(serde_json::json!({
            "fault": {"delay": {"fixed": "100ms", "percent": 10}, "abort": {"httpStatus": 503, "percent": 5}},
            "loadBalancer": {"locality": {"preferSameZone": true}},
            "rateLimit": {"requestsPerSecond": 5, "perIdentity": true},
            "mtls": {"mode": "Permissive"},
        }))
        .expect("schema-valid");
        assert_eq!(mesh_policy_spec(&ok), Vec::<String>::new());
        let mut strict = ok;
        strict.mtls = Some(MtlsPolicy {
            mode: MtlsMode::Strict,
        });
        assert_eq!(mesh_policy_spec(&strict), Vec::<String>::new());
    }

    #[test]
    fn split_spec_problems() {
        assert_eq!(
            traffic_split_spec(&split("r", &[("a", 1), ("b", 0)])),
            Vec::<String>::new()
        );
        assert_eq!(
            traffic_split_spec(&split("r", &[("a", 0), ("b", 0)])),
            vec!["every backend has weight 0: no traffic could be routed".to_owned()]
        );
        let mut spec = split("r", &[("a", 1), ("a", 2)]);
        spec.matches.push(SplitMatch {
            headers: [("x".to_owned(), "y".to_owned())].into(),
            backend: "c".to_owned(),
        });
        spec.mirror = Some(SplitMirror {
            service: "r".to_owned(),
            percent: 5,
        });
        assert_eq!(
            traffic_split_spec(&spec),
            vec![
                "backend a is listed more than once".to_owned(),
                "matches[0].backend c is not one of the backends".to_owned(),
                "mirror.service r is the root service: mirrored requests would loop".to_owned(),
            ]
        );
    }

    #[test]
    fn policy_refs() {
        let services: Services = [("reviews".to_owned(), svc(&[9080]))].into();
        let mut spec = MeshPolicySpec::default();
        assert_eq!(mesh_policy_refs(&spec, "shop", &services), None);
        spec.target_ref = Some(TargetRef {
            kind: Default::default(),
            name: "reviews".to_owned(),
        });
        assert_eq!(mesh_policy_refs(&spec, "shop", &services), None);
        spec.target_ref = Some(TargetRef {
            kind: Default::default(),
            name: "ratings".to_owned(),
        });
        assert_eq!(
            mesh_policy_refs(&spec, "shop", &services),
            Some(RefProblem::ServiceNotFound {
                message: "Service ratings not found in namespace shop".to_owned()
            })
        );
    }

    #[test]
    fn split_refs() {
        let mut services: Services = [
            ("reviews".to_owned(), svc(&[9080, 9090])),
            ("v1".to_owned(), svc(&[9080, 9090, 1])),
            ("v2".to_owned(), svc(&[9080])),
        ]
        .into();
        let spec = split("reviews", &[("v1", 1), ("v2", 1), ("v3", 1)]);
        assert_eq!(
            traffic_split_refs(&spec, "shop", &services),
            Some(RefProblem::BackendNotFound {
                message: "backend Services not found in namespace shop: v3".to_owned()
            })
        );
        services.insert("v3".to_owned(), svc(&[9090, 9080]));
        assert_eq!(
            traffic_split_refs(&spec, "shop", &services),
            Some(RefProblem::BackendPortMismatch {
                message: "backends must expose every port of root Service reviews: v2 lacks \
                          9090/TCP"
                    .to_owned()
            })
        );
        services.insert("v2".to_owned(), svc(&[9080, 9090]));
        assert_eq!(traffic_split_refs(&spec, "shop", &services), None);
        services.remove("reviews");
        services.remove("v1");
        assert_eq!(
            traffic_split_refs(&spec, "shop", &services),
            Some(RefProblem::ServiceNotFound {
                message: "root Service reviews not found in namespace shop; backend Services \
                          not found: v1"
                    .to_owned()
            })
        );
    }

    #[test]
    fn missing_mirror_is_a_missing_backend() {
        let services: Services =
            [("r".to_owned(), svc(&[80])), ("a".to_owned(), svc(&[80]))].into();
        let mut spec = split("r", &[("a", 1)]);
        spec.mirror = Some(SplitMirror {
            service: "shadow".to_owned(),
            percent: 10,
        });
        assert_eq!(
            traffic_split_refs(&spec, "ns", &services),
            Some(RefProblem::BackendNotFound {
                message: "backend Services not found in namespace ns: shadow".to_owned()
            })
        );
    }
}
