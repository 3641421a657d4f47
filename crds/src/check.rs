//! Rules on policy values that serde cannot express, in one place for both ends:
//! - the operator reports them as `Accepted=False, reason=Invalid` (together with its
//!   cross-object checks) and keeps such a policy out of the derived config;
//! - the proxy applies them in [`ProxyConfig::validate`](crate::proxy::ProxyConfig::validate),
//!   since a standalone config file (or a message from a newer operator) never went
//!   through the CRD schema.
//!
//! So besides the rules relating fields to each other, this repeats the schema's ranges:
//! on the operator's path they never fire (the API server refused such objects already).

use std::fmt;

use crate::policy::{
    CircuitBreaker, ConsistentHash, Fault, LbAlgorithm, LoadBalancer, OutlierDetection, RateLimit,
    Retries, TrafficPolicy,
};

/// One broken rule: the field (a dotted path relative to what was checked) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    /// `<path> <reason>`, a sentence for a condition message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.path, self.reason)
    }
}

fn problem(out: &mut Vec<Problem>, path: impl Into<String>, reason: impl Into<String>) {
    out.push(Problem {
        path: path.into(),
        reason: reason.into(),
    });
}

fn at_most(out: &mut Vec<Problem>, path: &str, value: u32, max: u32) {
    if value > max {
        problem(out, path, format!("is {value}, more than {max}"));
    }
}

fn at_least(out: &mut Vec<Problem>, path: &str, value: u32, min: u32) {
    if value < min {
        problem(out, path, format!("is {value}, less than {min}"));
    }
}

/// Is `s` an HTTP token (RFC 9110 `tchar`s): a valid header or cookie name?
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Is `s` usable as a cookie's `Path`: absolute, visible ASCII, no `;`?
pub fn is_cookie_path(s: &str) -> bool {
    s.starts_with('/') && s.bytes().all(|b| b.is_ascii_graphic() && b != b';')
}

/// The problems of the client-side part of a policy (paths as the `MeshPolicy` spec
/// spells them: `loadBalancer.algorithm`, `fault.abort.httpStatus`, ...).
pub fn traffic_policy(policy: &TrafficPolicy) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Some(lb) = &policy.load_balancer {
        load_balancer(&mut out, lb);
    }
    if let Some(r) = &policy.retries {
        retries(&mut out, r);
    }
    if let Some(cb) = &policy.circuit_breaker {
        circuit_breaker(&mut out, cb);
    }
    if let Some(od) = &policy.outlier_detection {
        outlier_detection(&mut out, od);
    }
    if let Some(f) = &policy.fault {
        fault(&mut out, f);
    }
    out
}

fn load_balancer(out: &mut Vec<Problem>, lb: &LoadBalancer) {
    let has_key = lb
        .consistent_hash
        .as_ref()
        .is_some_and(|h| h.header.is_some() || h.cookie.is_some() || h.source_ip);
    match lb.algorithm {
        LbAlgorithm::ConsistentHash if !has_key => problem(
            out,
            "loadBalancer.algorithm",
            "ConsistentHash needs loadBalancer.consistentHash with a header, a cookie or \
             sourceIP",
        ),
        LbAlgorithm::ConsistentHash => {}
        other if lb.consistent_hash.is_some() => problem(
            out,
            "loadBalancer.consistentHash",
            format!("is set but loadBalancer.algorithm is {other:?}, not ConsistentHash"),
        ),
        _ => {}
    }
    if let Some(hash) = &lb.consistent_hash {
        consistent_hash(out, hash);
    }
    if let Some(l) = &lb.locality {
        at_most(
            out,
            "loadBalancer.locality.minHealthyPercent",
            l.min_healthy_percent,
            100,
        );
    }
}

fn consistent_hash(out: &mut Vec<Problem>, hash: &ConsistentHash) {
    if let Some(h) = hash.header.as_deref().filter(|h| !is_token(h)) {
        problem(
            out,
            "loadBalancer.consistentHash.header",
            format!("{h:?} is not a valid header name"),
        );
    }
    let Some(cookie) = &hash.cookie else { return };
    if !is_token(&cookie.name) {
        problem(
            out,
            "loadBalancer.consistentHash.cookie.name",
            format!("{:?} is not a valid cookie name", cookie.name),
        );
    }
    if cookie.ttl.as_ref().is_some_and(|t| t.get().is_zero()) {
        problem(
            out,
            "loadBalancer.consistentHash.cookie.ttl",
            "must be longer than 0 (leave it out for a session cookie)",
        );
    }
    if let Some(p) = cookie.path.as_deref().filter(|p| !is_cookie_path(p)) {
        problem(
            out,
            "loadBalancer.consistentHash.cookie.path",
            format!("{p:?} must start with '/' and hold no spaces or ';'"),
        );
    }
}

fn retries(out: &mut Vec<Problem>, r: &Retries) {
    at_most(out, "retries.attempts", r.attempts, 10);
    at_most(out, "retries.budgetPercent", r.budget_percent, 100);
    if let Some(backoff) = &r.backoff
        && backoff.base.get() > backoff.max.get()
    {
        problem(
            out,
            "retries.backoff.base",
            format!(
                "({}) is longer than retries.backoff.max ({})",
                backoff.base, backoff.max
            ),
        );
    }
}

fn circuit_breaker(out: &mut Vec<Problem>, cb: &CircuitBreaker) {
    for (path, value) in [
        ("circuitBreaker.maxConnections", cb.max_connections),
        ("circuitBreaker.maxRequests", cb.max_requests),
        ("circuitBreaker.minRequests", cb.min_requests),
    ] {
        if let Some(v) = value {
            at_least(out, path, v, 1);
        }
    }
    if let Some(p) = cb.error_rate_percent {
        at_most(out, "circuitBreaker.errorRatePercent", p, 100);
    }
    for (path, value) in [
        ("circuitBreaker.window", &cb.window),
        ("circuitBreaker.openFor", &cb.open_for),
    ] {
        if value.as_ref().is_some_and(|d| d.get().is_zero()) {
            problem(out, path, "must be longer than 0");
        }
    }
}

fn outlier_detection(out: &mut Vec<Problem>, od: &OutlierDetection) {
    at_least(
        out,
        "outlierDetection.consecutiveErrors",
        od.consecutive_errors,
        1,
    );
    if let Some(p) = od.max_ejection_percent {
        at_most(out, "outlierDetection.maxEjectionPercent", p, 100);
    }
}

fn fault(out: &mut Vec<Problem>, f: &Fault) {
    if f.delay.is_none() && f.abort.is_none() {
        problem(out, "fault", "needs a delay, an abort or both");
    }
    if let Some(d) = &f.delay {
        if d.fixed.get().is_zero() {
            problem(out, "fault.delay.fixed", "must be longer than 0");
        }
        at_most(out, "fault.delay.percent", d.percent, 100);
    }
    if let Some(a) = &f.abort {
        if !(200..=599).contains(&a.http_status) {
            problem(
                out,
                "fault.abort.httpStatus",
                format!("{} is not an HTTP status (200-599)", a.http_status),
            );
        }
        at_most(out, "fault.abort.percent", a.percent, 100);
    }
}

/// The problems of an inbound rate limit (paths under `rateLimit`).
pub fn rate_limit(r: &RateLimit) -> Vec<Problem> {
    let mut out = Vec::new();
    at_least(
        &mut out,
        "rateLimit.requestsPerSecond",
        r.requests_per_second,
        1,
    );
    if let Some(b) = r.burst {
        at_least(&mut out, "rateLimit.burst", b, 1);
    }
    out
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    fn policy(json: serde_json::Value) -> TrafficPolicy {
        serde_json::from_value(json).expect("the shape is valid")
    }

    fn problems(json: serde_json::Value) -> Vec<String> {
        traffic_policy(&policy(json))
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_full_valid_policy_has_no_problems() {
        let p = serde_json::json!({
            "loadBalancer": {"algorithm": "ConsistentHash",
                             "consistentHash": {"cookie": {"name": "sid", "ttl": "1h", "path": "/shop"}},
                             "locality": {"preferSameZone": true, "minHealthyPercent": 50}},
            "retries": {"attempts": 3, "backoff": {"base": "25ms", "max": "250ms"}},
            "circuitBreaker": {"maxConnections": 10, "errorRatePercent": 50, "window": "30s"},
            "outlierDetection": {"consecutiveErrors": 5, "maxEjectionPercent": 50},
            "fault": {"delay": {"fixed": "100ms", "percent": 10}, "abort": {"httpStatus": 503, "percent": 5}},
        });
        assert_eq!(problems(p), Vec::<String>::new());
    }

    #[test]
    fn fault_rules() {
        assert_eq!(
            problems(serde_json::json!({"fault": {}})),
            ["fault needs a delay, an abort or both"]
        );
        assert_eq!(
            problems(serde_json::json!({"fault": {
                "delay": {"fixed": "0s", "percent": 101},
                "abort": {"httpStatus": 99, "percent": 200}}})),
            [
                "fault.delay.fixed must be longer than 0",
                "fault.delay.percent is 101, more than 100",
                "fault.abort.httpStatus 99 is not an HTTP status (200-599)",
                "fault.abort.percent is 200, more than 100",
            ]
        );
        assert_eq!(
            problems(serde_json::json!({"fault": {"abort": {"httpStatus": 600, "percent": 1}}})),
            ["fault.abort.httpStatus 600 is not an HTTP status (200-599)"]
        );
    }

    #[test]
    fn load_balancer_rules() {
        assert_eq!(
            problems(serde_json::json!({"loadBalancer": {"algorithm": "ConsistentHash"}})),
            [
                "loadBalancer.algorithm ConsistentHash needs loadBalancer.consistentHash with a \
                 header, a cookie or sourceIP"
            ]
        );
        assert_eq!(
            problems(serde_json::json!({"loadBalancer": {
                "algorithm": "ConsistentHash",
                "consistentHash": {"header": "x user", "cookie": {"name": "a=b", "ttl": "0s", "path": "shop"}},
                "locality": {"minHealthyPercent": 101}}})),
            [
                "loadBalancer.consistentHash.header \"x user\" is not a valid header name",
                "loadBalancer.consistentHash.cookie.name \"a=b\" is not a valid cookie name",
                "loadBalancer.consistentHash.cookie.ttl must be longer than 0 (leave it out for a \
                 session cookie)",
                "loadBalancer.consistentHash.cookie.path \"shop\" must start with '/' and hold no \
                 spaces or ';'",
                "loadBalancer.locality.minHealthyPercent is 101, more than 100",
            ]
        );
        assert_eq!(
            problems(serde_json::json!({"loadBalancer": {"consistentHash": {"sourceIp": true}}})),
            [
                "loadBalancer.consistentHash is set but loadBalancer.algorithm is LeastRequest, \
                 not ConsistentHash"
            ]
        );
    }

    #[test]
    fn ranges_the_schema_also_holds() {
        assert_eq!(
            problems(serde_json::json!({
                "retries": {"attempts": 11, "budgetPercent": 101,
                            "backoff": {"base": "1s", "max": "10ms"}},
                "circuitBreaker": {"maxConnections": 0, "errorRatePercent": 101, "openFor": "0s"},
                "outlierDetection": {"consecutiveErrors": 0, "maxEjectionPercent": 101},
            })),
            [
                "retries.attempts is 11, more than 10",
                "retries.budgetPercent is 101, more than 100",
                "retries.backoff.base (1s) is longer than retries.backoff.max (10ms)",
                "circuitBreaker.maxConnections is 0, less than 1",
                "circuitBreaker.errorRatePercent is 101, more than 100",
                "circuitBreaker.openFor must be longer than 0",
                "outlierDetection.consecutiveErrors is 0, less than 1",
                "outlierDetection.maxEjectionPercent is 101, more than 100",
            ]
        );
        let rl: RateLimit =
            serde_json::from_value(serde_json::json!({"requestsPerSecond": 0, "burst": 0}))
                .expect("shape");
        let got: Vec<String> = rate_limit(&rl).iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "rateLimit.requestsPerSecond is 0, less than 1",
                "rateLimit.burst is 0, less than 1"
            ]
        );
    }

    #[test]
    fn tokens_and_cookie_paths() {
        assert!(is_token("x-user") && is_token("sid") && is_token("__Host-a"));
        assert!(!is_token("") && !is_token("a b") && !is_token("a=b") && !is_token("é"));
        assert!(is_cookie_path("/") && is_cookie_path("/a/b"));
        assert!(!is_cookie_path("") && !is_cookie_path("a") && !is_cookie_path("/a;b"));
        assert!(!is_cookie_path("/a b"));
    }
}
