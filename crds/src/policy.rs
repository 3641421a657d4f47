//! Policy building blocks shared by the `MeshPolicy` CRD and the derived proxy config.
//!
//! These are plain serde types with schemars schemas: the CRD embeds them (so the API
//! server validates them), and the operator copies them, resolved, into each proxy's
//! config (so the proxy reads the very same shape). Nothing here depends on kube.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// Pattern of a cookie path: absolute, no whitespace, no `;` (it would start an attribute).
pub const COOKIE_PATH_PATTERN: &str = r"^/[^\s;]*$";
/// Pattern of a SPIFFE ID as used by the mesh, or `*` for any authenticated identity.
pub const IDENTITY_PATTERN: &str = r"^(\*|spiffe://[a-z0-9.-]+(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+)$";
/// An HTTP method token (RFC 9110), upper case as the mesh compares methods exactly.
pub const METHOD_PATTERN: &str = r"^[A-Z]{1,20}$";
/// A path match: an exact path, or a prefix ending in `*` (`/api/*`).
pub const PATH_PATTERN: &str = r"^/[^\s]*$";
/// A Kubernetes namespace or service name (DNS-1123 label).
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";
/// What a retry may be triggered by: a failure class or an HTTP status code.
pub const RETRY_ON_PATTERN: &str =
    r"^(connect-failure|refused-stream|reset|gateway-error|5xx|retriable-4xx|[1-5][0-9][0-9])$";

/// How mutual TLS is enforced on a workload's inbound side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum MtlsMode {
    /// Only mesh mTLS connections are accepted.
    Strict,
    /// mTLS from meshed peers and plaintext from anything else.
    #[default]
    Permissive,
    /// The proxy neither terminates nor originates mTLS for this target.
    Disabled,
}

/// mTLS settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MtlsPolicy {
    /// Strict, Permissive (default) or Disabled.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// Load-balancing algorithm across a service's endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum LbAlgorithm {
    /// Power of two choices over outstanding requests (the default, as in Linkerd).
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    /// Weighted by the endpoints' weights.
    Weighted,
    /// Sticky: hash of a header, cookie or the source IP (see `consistentHash`).
    ConsistentHash,
}

/// A cookie used as a consistent-hash key; created by the proxy when absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HashCookie {
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Lifetime of a cookie the proxy sets; absent means a session cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// `Path` of a cookie the proxy sets; `/` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), pattern(r"^/[^\s;]*$"))]
    pub path: Option<String>,
}

impl HashCookie {
    /// The path a cookie the proxy sets carries (`/` by default).
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }
}

/// Key for `ConsistentHash`; the first of header, cookie and source IP that is set wins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<HashCookie>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub source_ip: bool,
}

/// Zone-aware routing: a client proxy sends to endpoints of its own zone while at least
/// `minHealthyPercent` of them are healthy (ready and not ejected), and spills over to
/// every zone below that.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Locality {
    /// Prefer endpoints in the client's zone while they are healthy.
    #[serde(default)]
    pub prefer_same_zone: bool,
    /// The share of the client zone's endpoints that must be healthy for traffic to stay
    /// in the zone (default 70).
    #[serde(default = "default_min_healthy_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub min_healthy_percent: u32,
}

/// The spill-over threshold of [`Locality`] when unset.
pub const DEFAULT_MIN_HEALTHY_PERCENT: u32 = 70;

fn default_min_healthy_percent() -> u32 {
    DEFAULT_MIN_HEALTHY_PERCENT
}

impl Default for Locality {
    fn default() -> Self {
        Self {
            prefer_same_zone: false,
            min_healthy_percent: DEFAULT_MIN_HEALTHY_PERCENT,
        }
    }
}

/// Load balancing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
}

/// Timeouts applied by the client-side proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Whole request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// TCP (and TLS) connection establishment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<Duration>,
    /// A connection or stream with no traffic for this long is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Duration>,
}

/// Exponential backoff between retries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

/// Retries with a budget, as in Linkerd: retries may add at most `budgetPercent` to the
/// request load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Attempts after the first one.
    #[schemars(range(min = 0, max = 10))]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Failure classes (`connect-failure`, `refused-stream`, `reset`, `gateway-error`,
    /// `5xx`, `retriable-4xx`) or status codes (`503`) that trigger a retry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(
        r"^(connect-failure|refused-stream|reset|gateway-error|5xx|retriable-4xx|[1-5][0-9][0-9])$"
    )))]
    pub retry_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Retries allowed as a percentage of original requests (default 20).
    #[serde(default = "default_budget_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub budget_percent: u32,
}

fn default_budget_percent() -> u32 {
    20
}

/// Circuit breaking: limits on concurrency and an error-rate breaker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_requests: Option<u32>,
    /// Open the breaker when this percentage of requests in `window` failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub error_rate_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
    /// Requests needed in `window` before the error rate is considered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub min_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<Duration>,
}

/// Passive health checking: endpoints that keep failing are ejected for a while.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_errors: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<u32>,
}

/// Local (per-proxy) inbound rate limit, a token bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_second: u32,
    /// Bucket size; defaults to `requestsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub burst: Option<u32>,
    /// One bucket per caller SPIFFE identity (callers without one share a bucket) instead
    /// of one for the port.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_identity: bool,
}

/// A fixed delay added before a share of the requests is forwarded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// How long the request waits (counts against the request timeout).
    pub fixed: Duration,
    /// Share of requests delayed, 0–100.
    #[schemars(range(min = 0, max = 100))]
    pub percent: u32,
}

/// An immediate response, without calling the upstream, for a share of the requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// The status of the response, 200–599.
    #[schemars(range(min = 200, max = 599))]
    pub http_status: u16,
    /// Share of requests aborted, 0–100.
    #[schemars(range(min = 0, max = 100))]
    pub percent: u32,
}

/// Fault injection for resilience testing (Istio's `HTTPFaultInjection`, simplified),
/// applied by the calling proxy to HTTP requests to the target. Off unless set; a request
/// may be both delayed and then aborted (each drawn independently).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// What happens to a request that no rule matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AuthorizationDefault {
    #[default]
    Allow,
    Deny,
}

/// Who a rule matches. Empty lists match anyone; identities and namespaces are ORed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationFrom {
    /// SPIFFE IDs (`spiffe://cluster.local/ns/shop/sa/frontend`) or `*` for any mesh identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^(\*|spiffe://[a-z0-9.-]+(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+)$")))]
    pub identities: Vec<String>,
    /// Namespaces of the peers' identities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")))]
    pub namespaces: Vec<String>,
}

/// What a rule matches. Empty lists match anything; each list is ORed, lists are ANDed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationTo {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 1, max = 65535)))]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^[A-Z]{1,20}$")))]
    pub methods: Vec<String>,
    /// Exact paths or prefixes ending in `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^/[^\s]*$")))]
    pub paths: Vec<String>,
}

/// One allow rule: a request matching `from` and `to` is allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AuthorizationFrom>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<AuthorizationTo>,
}

/// Inbound authorization: allow rules and a default for everything else.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    #[serde(default)]
    pub default: AuthorizationDefault,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthorizationRule>,
}

/// The client-side part of a policy, resolved per destination service in the proxy config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Off unless set: injected delays and aborts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_in_attributes_match_the_published_constants() {
        // schemars attributes need literals; keep them in step with the constants that
        // the rest of the code (and the docs) refer to.
        let src = include_str!("policy.rs");
        for p in [
            IDENTITY_PATTERN,
            METHOD_PATTERN,
            PATH_PATTERN,
            DNS_LABEL_PATTERN,
            RETRY_ON_PATTERN,
            COOKIE_PATH_PATTERN,
        ] {
            let literal = format!("r\"{p}\"");
            assert!(src.matches(&literal).count() >= 2, "no attribute uses {p}");
        }
    }

    #[test]
    fn retries_default_budget() {
        let r: Retries = serde_json::from_str(r#"{"attempts": 2}"#).expect("valid");
        assert_eq!(r.budget_percent, 20);
        assert!(r.retry_on.is_empty());
    }

    #[test]
    fn authorization_defaults_to_allow() {
        let a: Authorization = serde_json::from_str("{}").expect("valid");
        assert_eq!(a.default, AuthorizationDefault::Allow);
        assert!(a.rules.is_empty());
    }

    #[test]
    fn new_fields_default_and_stay_off_the_wire_when_unset() {
        let l: Locality = serde_json::from_str(r#"{"preferSameZone": true}"#).expect("valid");
        assert_eq!(l.min_healthy_percent, 70);
        assert_eq!(Locality::default().min_healthy_percent, 70);
        let r: RateLimit = serde_json::from_str(r#"{"requestsPerSecond": 5}"#).expect("valid");
        assert!(!r.per_identity);
        assert_eq!(
            serde_json::to_value(&r).expect("json"),
            serde_json::json!({"requestsPerSecond": 5})
        );
        let c: HashCookie = serde_json::from_str(r#"{"name": "sid"}"#).expect("valid");
        assert_eq!(c.path(), "/");
        assert_eq!(
            serde_json::to_value(&c).expect("json"),
            serde_json::json!({"name": "sid"})
        );
        let p: TrafficPolicy = serde_json::from_str("{}").expect("valid");
        assert_eq!(p.fault, None);
        let f: Fault = serde_json::from_str(
            r#"{"delay": {"fixed": "100ms", "percent": 10}, "abort": {"httpStatus": 503, "percent": 5}}"#,
        )
        .expect("valid");
        assert_eq!(
            f.delay.map(|d| (d.fixed.get().as_millis(), d.percent)),
            Some((100, 10))
        );
        assert_eq!(f.abort.map(|a| (a.http_status, a.percent)), Some((503, 5)));
    }

    #[test]
    fn unknown_enum_values_are_rejected() {
        let err =
            serde_json::from_str::<MtlsPolicy>(r#"{"mode": "Sometimes"}"#).expect_err("invalid");
        assert!(err.to_string().contains("unknown variant"), "{err}");
    }
}
