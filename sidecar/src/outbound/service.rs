//! Long-lived state of a service, kept across config versions while its policy stays
//! the same: the circuit breaker (limits and error rate), the outlier detector, and the
//! retry budget. A config version that changes a service's policy gives it fresh state;
//! one that changes anything else leaves it as it was.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Instant,
};

use remora_crds::policy::TrafficPolicy;

use super::{
    breaker::{Admission, Breaker, BreakerConfig, Overflow, Permit, Rejected},
    endpoint::Endpoint,
    outlier::{Outcome, OutlierConfig, OutlierDetector},
    retry::Budget,
};
use crate::http::ProxyError;

/// The state of one service (or of one backend under the policy it borrows).
#[derive(Debug)]
pub struct ServiceState {
    policy: Option<TrafficPolicy>,
    pub breaker: Option<Arc<Breaker>>,
    pub outlier: Option<OutlierDetector>,
    pub budget: Option<Budget>,
}

/// A request admitted by the breaker (or no breaker): its outcome goes back to it.
#[derive(Debug)]
pub struct RequestPermit(Option<Admission>);

impl RequestPermit {
    /// Records the outcome with the breaker and frees the request's slot.
    pub fn finish(self, outcome: Outcome, now: Instant) {
        if let Some(a) = self.0 {
            a.finish(outcome, now);
        }
    }
}

/// Why the breaker refused a request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub Rejected);

impl Refused {
    /// The metric and access-log label.
    pub fn label(&self) -> &'static str {
        self.0.header_value()
    }

    pub fn into_error(self, service: &Arc<str>) -> ProxyError {
        match self.0 {
            Rejected::Open { retry_after } => ProxyError::CircuitOpen {
                service: service.clone(),
                retry_after,
            },
            Rejected::Overflow(o) => ProxyError::Overflow {
                service: service.clone(),
                limit: limit_name(o),
            },
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

fn limit_name(o: Overflow) -> &'static str {
    match o {
        Overflow::Connections(_) => "maxConnections",
        Overflow::PendingRequests(_) => "maxPendingRequests",
        Overflow::Requests(_) => "maxRequests",
    }
}

impl ServiceState {
    fn new(policy: Option<&TrafficPolicy>, now: Instant) -> Self {
        // Each field of the policy that concerns long-lived state is read here; the rest
        // is compiled in `policy`.
        let (breaker, outlier, retries) = match policy {
            Some(p) => (
                p.circuit_breaker.as_ref(),
                p.outlier_detection.as_ref(),
                p.retries.as_ref(),
            ),
            None => (None, None, None),
        };
        Self {
            policy: policy.cloned(),
            breaker: breaker.map(|b| Arc::new(Breaker::new(BreakerConfig::from_policy(b), now))),
            outlier: outlier.map(|o| OutlierDetector::new(OutlierConfig::from_policy(o), 0)),
            budget: retries.map(|r| Budget::new(r.budget_percent, now)),
        }
    }

    /// Admits one request, or refuses it (breaker open, `maxRequests` reached).
    pub fn admit_request(&self, now: Instant) -> Result<RequestPermit, Refused> {
        match &self.breaker {
            None => Ok(RequestPermit(None)),
            Some(b) => b
                .admit(now)
                .map(|a| RequestPermit(Some(a)))
                .map_err(Refused),
        }
    }

    /// Admits one opaque TCP connection: the breaker must be closed and
    /// `maxConnections` not reached. The permit lives as long as the connection.
    pub fn admit_connection(&self, now: Instant) -> Result<Option<Permit>, Refused> {
        let Some(b) = &self.breaker else {
            return Ok(None);
        };
        if let super::breaker::State::Open { until } = b.state(now) {
            return Err(Refused(Rejected::Open {
                retry_after: until.saturating_duration_since(now),
            }));
        }
        b.connection()
            .map(Some)
            .map_err(|o| Refused(Rejected::Overflow(o)))
    }

    /// Records how an attempt on `ep` ended with the outlier detector; true when it
    /// ejected the endpoint.
    pub fn report(&self, ep: &Endpoint, outcome: Outcome, now: Instant) -> bool {
        self.outlier
            .as_ref()
            .and_then(|d| d.record(&ep.health, outcome, now))
            .is_some()
    }
}

/// Every service's state, by key (a service name, or `backend|policy owner`).
#[derive(Debug, Default)]
pub struct ServiceRegistry {
    inner: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    states: HashMap<String, Arc<ServiceState>>,
    used: HashSet<String>,
}

impl ServiceRegistry {
    /// The state for `key` under `policy`: the live one when the policy is unchanged.
    /// `endpoints` sizes the outlier detector's ejection cap.
    pub fn state(
        &self,
        key: &str,
        policy: Option<&TrafficPolicy>,
        endpoints: usize,
    ) -> Arc<ServiceState> {
        let mut r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        r.used.insert(key.to_owned());
        let state = match r.states.get(key) {
            Some(s) if s.policy.as_ref() == policy => s.clone(),
            _ => {
                let s = Arc::new(ServiceState::new(policy, Instant::now()));
                r.states.insert(key.to_owned(), s.clone());
                s
            }
        };
        if let Some(d) = &state.outlier {
            d.set_endpoints(endpoints);
        }
        state
    }

    /// Forgets the states no compile since the last call asked for.
    pub fn retain_used(&self) {
        let mut r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let used = std::mem::take(&mut r.used);
        r.states.retain(|k, _| used.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use remora_crds::policy::{CircuitBreaker, OutlierDetection};

    use super::*;

    fn policy(max_requests: u32) -> TrafficPolicy {
        TrafficPolicy {
            circuit_breaker: Some(CircuitBreaker {
                max_connections: None,
                max_pending_requests: None,
                max_requests: Some(max_requests),
                error_rate_percent: None,
                window: None,
                min_requests: None,
                open_for: None,
            }),
            outlier_detection: Some(OutlierDetection {
                consecutive_errors: 1,
                interval: None,
                base_ejection_time: None,
                max_ejection_percent: Some(50),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn state_survives_while_the_policy_stays_and_resets_when_it_changes() {
        let r = ServiceRegistry::default();
        let a = r.state("reviews.shop", Some(&policy(1)), 2);
        let held = a
            .admit_request(Instant::now())
            .expect("first request admitted");
        r.retain_used();
        let b = r.state("reviews.shop", Some(&policy(1)), 2);
        assert!(Arc::ptr_eq(&a, &b), "same policy: same state");
        let refused = b
            .admit_request(Instant::now())
            .expect_err("limit of 1 reached");
        assert_eq!(refused.label(), "max-requests");
        drop(held);
        let c = r.state("reviews.shop", Some(&policy(5)), 2);
        assert!(!Arc::ptr_eq(&a, &c), "changed policy: fresh state");
        r.retain_used();
        r.retain_used();
        let d = r.state("reviews.shop", Some(&policy(5)), 2);
        assert!(
            !Arc::ptr_eq(&c, &d),
            "a service no version used is forgotten"
        );
    }

    #[test]
    fn no_policy_admits_everything() {
        let r = ServiceRegistry::default();
        let s = r.state("a", None, 1);
        let permits: Vec<_> = (0..100)
            .map(|_| s.admit_request(Instant::now()).expect("admitted"))
            .collect();
        assert_eq!(permits.len(), 100);
        assert!(
            s.admit_connection(Instant::now())
                .expect("admitted")
                .is_none()
        );
    }
}
