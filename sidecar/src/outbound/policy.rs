//! A service's traffic policy compiled for the data path: durations resolved, header
//! names parsed, the balancer's settings chosen, the fault odds ready to draw.
//!
//! Every struct of the policy is destructured here (or in [`super::service`], for the
//! long-lived state) without `..`: a field added to the API that the proxy does not read
//! is a compile error in the proxy, so "accepted but ignored" cannot come back.

use std::time::Duration;

use http::{HeaderName, StatusCode};
use remora_crds::policy::{
    ConsistentHash, Fault, FaultAbort, FaultDelay, HashCookie, LoadBalancer, Locality, Timeouts,
    TrafficPolicy,
};

use super::{
    balance::{BalanceConfig, LocalityConfig},
    retry::RetryPolicy,
};

/// Where a request's consistent-hash key comes from (the first that is present wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashKey {
    pub header: Option<HeaderName>,
    pub cookie: Option<CookieKey>,
    pub source_ip: bool,
}

/// The sticky-session cookie: read as a key, set by the proxy when absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CookieKey {
    pub name: String,
    pub ttl: Option<Duration>,
    pub path: String,
}

/// Injected faults, with their odds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Faults {
    delay: Option<(Duration, u32)>,
    abort: Option<(StatusCode, u32)>,
}

impl Faults {
    /// The status to answer with instead of forwarding, drawn per request.
    pub fn abort(&self) -> Option<StatusCode> {
        let (status, percent) = self.abort?;
        (fastrand::u32(0..100) < percent).then_some(status)
    }

    /// The delay to wait before forwarding, drawn per request.
    pub fn delay(&self) -> Option<Duration> {
        let (delay, percent) = self.delay?;
        (fastrand::u32(0..100) < percent).then_some(delay)
    }
}

/// A service's policy, compiled.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServicePolicy {
    pub balance: BalanceConfig,
    pub hash: Option<HashKey>,
    /// The whole exchange, retries included.
    pub request_timeout: Option<Duration>,
    /// TCP and TLS connection establishment (the proxy's `--connect-timeout` otherwise).
    pub connect_timeout: Option<Duration>,
    /// An opaque connection with no traffic either way for this long is closed (the
    /// proxy's `--tcp-idle-timeout` otherwise), and so is a pooled HTTP connection no
    /// request used for this long (`dial::DEFAULT_IDLE_TIMEOUT` otherwise).
    pub idle_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub fault: Option<Faults>,
}

impl ServicePolicy {
    /// Compiles `policy` for a proxy in `own_zone`.
    pub fn compile(policy: Option<&TrafficPolicy>, own_zone: Option<&str>) -> Self {
        let Some(TrafficPolicy {
            load_balancer,
            timeouts,
            retries,
            // Long-lived state: compiled by `service::ServiceState`.
            circuit_breaker: _,
            outlier_detection: _,
            fault,
        }) = policy
        else {
            return Self::default();
        };
        let (balance, hash) = balancing(load_balancer.as_ref(), own_zone);
        let Timeouts {
            request,
            connect,
            idle,
        } = timeouts.clone().unwrap_or_default();
        Self {
            balance,
            hash,
            request_timeout: request.map(|d| d.get()),
            connect_timeout: connect.map(|d| d.get()),
            idle_timeout: idle.map(|d| d.get()),
            retry: retries
                .as_ref()
                .and_then(|r| match RetryPolicy::from_policy(r) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        // Validation refuses unknown conditions before a config is applied.
                        tracing::warn!(error = %e, "retries off for this service");
                        None
                    }
                }),
            fault: fault.as_ref().map(faults),
        }
    }
}

fn balancing(
    lb: Option<&LoadBalancer>,
    own_zone: Option<&str>,
) -> (BalanceConfig, Option<HashKey>) {
    let Some(LoadBalancer {
        algorithm,
        consistent_hash,
        locality,
    }) = lb
    else {
        return (BalanceConfig::default(), None);
    };
    let locality = locality.as_ref().and_then(|l| {
        let Locality {
            prefer_same_zone,
            min_healthy_percent,
        } = l;
        let zone = own_zone.filter(|_| *prefer_same_zone)?;
        Some(LocalityConfig {
            zone: zone.into(),
            min_healthy_percent: *min_healthy_percent,
        })
    });
    let hash = consistent_hash.as_ref().map(|h| {
        let ConsistentHash {
            header,
            cookie,
            source_ip,
        } = h;
        HashKey {
            header: header
                .as_deref()
                .and_then(|n| HeaderName::try_from(n.to_ascii_lowercase()).ok()),
            cookie: cookie.as_ref().map(|c| {
                let HashCookie { name, ttl, path: _ } = c;
                CookieKey {
                    name: name.clone(),
                    ttl: ttl.as_ref().map(|d| d.get()),
                    path: c.path().to_owned(),
                }
            }),
            source_ip: *source_ip,
        }
    });
    (
        BalanceConfig {
            algorithm: *algorithm,
            locality,
        },
        hash,
    )
}

fn faults(f: &Fault) -> Faults {
    let Fault { delay, abort } = f;
    Faults {
        delay: delay.as_ref().map(|d| {
            let FaultDelay { fixed, percent } = d;
            (fixed.get(), (*percent).min(100))
        }),
        abort: abort.as_ref().and_then(|a| {
            let FaultAbort {
                http_status,
                percent,
            } = a;
            Some((
                StatusCode::from_u16(*http_status).ok()?,
                (*percent).min(100),
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use remora_crds::policy::LbAlgorithm;

    use super::*;

    fn compile(yaml: &str) -> ServicePolicy {
        let p: TrafficPolicy = serde_yaml::from_str(yaml).expect("valid policy");
        ServicePolicy::compile(Some(&p), Some("zone-a"))
    }

    /// Every leaf of the policy, set alone to a non-default value, changes what the proxy
    /// compiles (here or in the service state): a field the proxy ignores fails this.
    #[test]
    fn every_policy_field_changes_the_compiled_policy() {
        let base = ServicePolicy::compile(Some(&TrafficPolicy::default()), Some("zone-a"));
        for yaml in [
            "loadBalancer: {algorithm: RoundRobin}",
            "loadBalancer: {consistentHash: {header: x-user}}",
            "loadBalancer: {consistentHash: {cookie: {name: sid}}}",
            "loadBalancer: {consistentHash: {cookie: {name: sid, ttl: 1h}}}",
            "loadBalancer: {consistentHash: {cookie: {name: sid, path: /app}}}",
            "loadBalancer: {consistentHash: {sourceIp: true}}",
            "loadBalancer: {locality: {preferSameZone: true}}",
            "loadBalancer: {locality: {preferSameZone: true, minHealthyPercent: 50}}",
            "timeouts: {request: 5s}",
            "timeouts: {connect: 1s}",
            "timeouts: {idle: 60s}",
            "retries: {attempts: 2}",
            "retries: {attempts: 2, perTryTimeout: 1s}",
            "retries: {attempts: 2, retryOn: [5xx]}",
            "retries: {attempts: 2, backoff: {base: 10ms, max: 1s}}",
            "fault: {delay: {fixed: 1s, percent: 10}}",
            "fault: {abort: {httpStatus: 503, percent: 10}}",
        ] {
            assert_ne!(compile(yaml), base, "{yaml} is ignored by the proxy");
        }
        // `retries.budgetPercent`, `circuitBreaker.*` and `outlierDetection.*` become
        // long-lived state; `service` tests that they take effect.
        let with_cookie =
            compile("loadBalancer: {consistentHash: {cookie: {name: sid, path: /app, ttl: 1h}}}");
        let cookie = with_cookie.hash.and_then(|h| h.cookie).expect("cookie key");
        assert_eq!(cookie.path, "/app");
        assert_eq!(cookie.ttl, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn locality_needs_a_zone_of_its_own() {
        let p: TrafficPolicy = serde_yaml::from_str(
            "loadBalancer: {algorithm: Random, locality: {preferSameZone: true}}",
        )
        .expect("valid");
        let with_zone = ServicePolicy::compile(Some(&p), Some("zone-a"));
        assert_eq!(with_zone.balance.algorithm, LbAlgorithm::Random);
        assert_eq!(
            with_zone.balance.locality.map(|l| l.min_healthy_percent),
            Some(70)
        );
        let without = ServicePolicy::compile(Some(&p), None);
        assert!(without.balance.locality.is_none());
    }

    #[test]
    fn faults_fire_at_their_odds() {
        fastrand::seed(7);
        let f = compile(
            "fault: {abort: {httpStatus: 418, percent: 25}, delay: {fixed: 10ms, percent: 0}}",
        )
        .fault
        .expect("faults");
        let aborted = (0..10_000).filter(|_| f.abort().is_some()).count();
        assert!((2_250..=2_750).contains(&aborted), "{aborted} of 10000");
        assert!((0..1000).all(|_| f.delay().is_none()));
        assert_eq!(
            compile("fault: {abort: {httpStatus: 418, percent: 100}}")
                .fault
                .and_then(|f| f.abort()),
            Some(StatusCode::IM_A_TEAPOT)
        );
    }
}
