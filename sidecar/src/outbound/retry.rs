//! Retries: which failed attempts are tried again, after how long, and how many retries the
//! service can afford.
//!
//! - **Conditions** (`retryOn`, Envoy's names): `connect-failure`, `refused-stream`,
//!   `reset`, `gateway-error` (502, 503, 504 and per-try timeouts), `5xx` (any 5xx, resets,
//!   timeouts, connect failures), `retriable-4xx` (409) and explicit status codes. An
//!   empty list means `connect-failure, refused-stream, 503` (Istio's default, near
//!   enough). A connect failure or a refused stream is retried whatever the list says: the
//!   upstream never saw the request, so a retry cannot repeat its effect (Linkerd does so).
//! - **Safety**: an attempt that may have reached the upstream is retried only for an
//!   idempotent method (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE), and only
//!   when the request body can be sent again (empty, or buffered under the replay limit).
//! - **Backoff**: exponential with full jitter (AWS): retry `n` waits a uniform random time
//!   in `[0, min(max, base × 2ⁿ⁻¹)]`; Envoy's defaults 25 ms and 250 ms.
//! - **Budget** (Finagle's and Linkerd's retry budget): each original request deposits,
//!   each retry withdraws; over a rolling 10 s window the retries may not exceed
//!   `budgetPercent` % of the requests plus a floor of 10 retries per second. During an
//!   outage, retries add at most that share to the load instead of multiplying it.

use std::time::{Duration, Instant};

use http::Method;
use remora_crds::policy::Retries;

use super::{breaker::RollingCounts, outlier::Outcome};

const CONNECT_FAILURE: u8 = 1;
const REFUSED_STREAM: u8 = 2;
const RESET: u8 = 4;
const GATEWAY_ERROR: u8 = 8;
const SERVER_ERROR: u8 = 16;
const RETRIABLE_4XX: u8 = 32;

/// Envoy's default backoff.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// The retry budget's window.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Retries always allowed per second of the window, however few the requests.
pub const BUDGET_MIN_PER_SECOND: u64 = 10;

/// A `retryOn` entry the proxy does not know (the schema should have stopped it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "retryOn: unknown condition {0:?}; expected connect-failure, refused-stream, reset, gateway-error, 5xx, retriable-4xx or a status code 100-599"
)]
pub struct UnknownCondition(pub String);

/// The retry conditions, compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Conditions {
    classes: u8,
    /// Bit `s` set: status `s` is retried.
    codes: [u64; 10],
}

impl Conditions {
    fn parse<'a>(list: impl IntoIterator<Item = &'a str>) -> Result<Self, UnknownCondition> {
        let mut c = Self {
            classes: 0,
            codes: [0; 10],
        };
        for item in list {
            c.classes |= match item {
                "connect-failure" => CONNECT_FAILURE,
                "refused-stream" => REFUSED_STREAM,
                "reset" => RESET,
                "gateway-error" => GATEWAY_ERROR,
                "5xx" => SERVER_ERROR,
                "retriable-4xx" => RETRIABLE_4XX,
                code => match code.parse::<u16>() {
                    Ok(s) if (100..600).contains(&s) && code.len() == 3 => {
                        c.codes[usize::from(s / 64)] |= 1 << (s % 64);
                        0
                    }
                    _ => return Err(UnknownCondition(code.to_owned())),
                },
            };
        }
        Ok(c)
    }

    fn code(&self, s: u16) -> bool {
        self.codes
            .get(usize::from(s / 64))
            .is_some_and(|w| w & (1 << (s % 64)) != 0)
    }

    fn matches(&self, outcome: Outcome) -> bool {
        let has = |bit: u8| self.classes & bit != 0;
        match outcome {
            Outcome::Response(s) => {
                (has(SERVER_ERROR) && s >= 500)
                    || (has(GATEWAY_ERROR) && matches!(s, 502..=504))
                    || (has(RETRIABLE_4XX) && s == 409)
                    || self.code(s)
            }
            Outcome::Connected => false,
            // Never reached the upstream: always safe to retry.
            Outcome::ConnectFailure | Outcome::RefusedStream => true,
            Outcome::Reset => has(RESET) || has(SERVER_ERROR),
            Outcome::Timeout => has(GATEWAY_ERROR) || has(SERVER_ERROR) || self.code(504),
        }
    }
}

/// Is `method` idempotent (RFC 9110 §9.2.2)?
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Exponential backoff with full jitter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: DEFAULT_BACKOFF_BASE,
            max: DEFAULT_BACKOFF_MAX,
        }
    }
}

impl Backoff {
    /// The wait before retry `n` (1 for the first retry).
    pub fn delay(&self, n: u32) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << n.saturating_sub(1).min(31))
            .min(self.max);
        let nanos = cap.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(fastrand::u64(..=nanos))
    }
}

/// Why an attempt is not retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The outcome matches no retry condition (a success, or a failure not listed).
    NotRetryable,
    AttemptsExhausted,
    /// The upstream may have acted on a non-idempotent request.
    NotIdempotent,
    /// The body was streamed, or is over the replay limit.
    BodyNotReplayable,
    BudgetExhausted,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Retry { after: Duration },
    Stop(Stop),
}

/// A service's retry policy, compiled from `Retries`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub backoff: Backoff,
    pub budget_percent: u32,
    on: Conditions,
}

impl RetryPolicy {
    pub fn from_policy(r: &Retries) -> Result<Self, UnknownCondition> {
        let on = if r.retry_on.is_empty() {
            Conditions::parse(["connect-failure", "refused-stream", "503"])?
        } else {
            Conditions::parse(r.retry_on.iter().map(String::as_str))?
        };
        Ok(Self {
            attempts: r.attempts,
            per_try_timeout: r.per_try_timeout.as_ref().map(|d| d.get()),
            backoff: r
                .backoff
                .as_ref()
                .map_or_else(Backoff::default, |b| Backoff {
                    base: b.base.get(),
                    max: b.max.get().max(b.base.get()),
                }),
            budget_percent: r.budget_percent.min(100),
            on,
        })
    }

    /// Does `outcome` match a retry condition?
    pub fn classify(&self, outcome: Outcome) -> bool {
        self.on.matches(outcome)
    }

    /// After attempt number `attempt` (1 for the first) ended with `outcome`: retry, or
    /// stop and why. A retry is withdrawn from `budget`.
    pub fn decide(
        &self,
        attempt: u32,
        outcome: Outcome,
        method: &Method,
        replayable: bool,
        budget: &Budget,
        now: Instant,
    ) -> Decision {
        let stop = if !self.classify(outcome) {
            Some(Stop::NotRetryable)
        } else if attempt > self.attempts {
            Some(Stop::AttemptsExhausted)
        } else if outcome.reached_upstream() && !is_idempotent(method) {
            Some(Stop::NotIdempotent)
        } else if !replayable {
            Some(Stop::BodyNotReplayable)
        } else if !budget.withdraw(now) {
            Some(Stop::BudgetExhausted)
        } else {
            None
        };
        match stop {
            Some(s) => Decision::Stop(s),
            None => Decision::Retry {
                after: self.backoff.delay(attempt),
            },
        }
    }
}

/// A service's retry budget (long-lived, shared by its requests).
#[derive(Debug)]
pub struct Budget {
    percent: u64,
    floor: u64,
    /// (original requests, retries).
    counts: RollingCounts,
}

impl Budget {
    /// Retries up to `percent` % of requests, plus the floor.
    pub fn new(percent: u32, now: Instant) -> Self {
        Self {
            percent: u64::from(percent.min(100)),
            floor: BUDGET_MIN_PER_SECOND * BUDGET_WINDOW.as_secs(),
            counts: RollingCounts::new(BUDGET_WINDOW, now),
        }
    }

    /// An original request was sent.
    pub fn deposit(&self, now: Instant) {
        self.counts.add(now, 1, 0);
    }

    /// Retries still allowed in the window ending at `now`.
    pub fn available(&self, now: Instant) -> u64 {
        let (requests, retries) = self.counts.sum(now);
        (self.floor + requests * self.percent / 100).saturating_sub(retries)
    }

    /// Takes one retry from the budget, if it has one.
    pub fn withdraw(&self, now: Instant) -> bool {
        if self.available(now) == 0 {
            return false;
        }
        self.counts.add(now, 0, 1);
        true
    }
}

#[cfg(test)]
mod tests {
    use remora_crds::duration::Duration as Dur;

    use super::*;

    fn policy(attempts: u32, on: &[&str]) -> RetryPolicy {
        RetryPolicy::from_policy(&Retries {
            attempts,
            per_try_timeout: Some(Dur::from_millis(300)),
            retry_on: on.iter().map(|s| s.to_string()).collect(),
            backoff: None,
            budget_percent: 20,
        })
        .expect("valid")
    }

    #[test]
    fn conditions() {
        use Outcome::*;
        let p = policy(2, &["gateway-error"]);
        assert!(p.classify(Response(502)) && p.classify(Response(504)) && p.classify(Timeout));
        assert!(!p.classify(Response(500)) && !p.classify(Reset) && !p.classify(Response(200)));
        assert!(
            p.classify(ConnectFailure) && p.classify(RefusedStream),
            "always"
        );
        let p = policy(2, &["5xx"]);
        assert!(p.classify(Response(500)) && p.classify(Reset) && p.classify(Timeout));
        assert!(!p.classify(Response(409)) && !p.classify(Connected));
        let p = policy(2, &["retriable-4xx", "429", "reset"]);
        assert!(p.classify(Response(409)) && p.classify(Response(429)) && p.classify(Reset));
        assert!(!p.classify(Response(503)) && !p.classify(Response(428)));
        let p = policy(2, &[]);
        assert!(p.classify(Response(503)) && !p.classify(Response(502)) && !p.classify(Reset));
        for bad in ["5XX", "600", "99", "0503", "sometimes"] {
            let err = RetryPolicy::from_policy(&Retries {
                attempts: 1,
                per_try_timeout: None,
                retry_on: vec![bad.into()],
                backoff: None,
                budget_percent: 20,
            })
            .expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert_eq!(
            policy(1, &[]).per_try_timeout,
            Some(Duration::from_millis(300))
        );
    }

    #[test]
    fn only_safe_requests_are_retried() {
        let t0 = Instant::now();
        let budget = Budget::new(20, t0);
        let p = policy(2, &["5xx"]);
        let retry = |attempt, outcome, method: &Method, replayable| {
            matches!(
                p.decide(attempt, outcome, method, replayable, &budget, t0),
                Decision::Retry { .. }
            )
        };
        assert!(retry(1, Outcome::Response(503), &Method::GET, true));
        assert!(retry(2, Outcome::Reset, &Method::PUT, true));
        assert_eq!(
            p.decide(3, Outcome::Response(503), &Method::GET, true, &budget, t0),
            Decision::Stop(Stop::AttemptsExhausted)
        );
        assert_eq!(
            p.decide(1, Outcome::Response(503), &Method::POST, true, &budget, t0),
            Decision::Stop(Stop::NotIdempotent),
            "a POST that reached the upstream is never retried"
        );
        assert!(retry(1, Outcome::ConnectFailure, &Method::POST, true));
        assert!(retry(1, Outcome::RefusedStream, &Method::PATCH, true));
        assert_eq!(
            p.decide(1, Outcome::ConnectFailure, &Method::GET, false, &budget, t0),
            Decision::Stop(Stop::BodyNotReplayable)
        );
        assert_eq!(
            p.decide(1, Outcome::Response(404), &Method::GET, true, &budget, t0),
            Decision::Stop(Stop::NotRetryable)
        );
        assert!(is_idempotent(&Method::DELETE) && !is_idempotent(&Method::PATCH));
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        fastrand::seed(31);
        let b = Backoff::default();
        for n in 1..=8u32 {
            let cap = (DEFAULT_BACKOFF_BASE * (1 << (n - 1))).min(DEFAULT_BACKOFF_MAX);
            let ds: Vec<Duration> = (0..2000).map(|_| b.delay(n)).collect();
            assert!(ds.iter().all(|&d| d <= cap), "retry {n}");
            let mean = ds.iter().sum::<Duration>() / 2000;
            // Full jitter: uniform over [0, cap], mean cap / 2.
            assert!(
                mean.abs_diff(cap / 2) < cap / 20,
                "retry {n}: mean {mean:?}, cap {cap:?}"
            );
        }
        assert!(b.delay(1000) <= DEFAULT_BACKOFF_MAX);
        let zero = Backoff {
            base: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(zero.delay(3), Duration::ZERO);
    }

    #[test]
    fn under_total_failure_the_budget_caps_extra_load() {
        fastrand::seed(32);
        let t0 = Instant::now();
        let p = policy(3, &["5xx"]);
        let budget = Budget::new(20, t0);
        let (mut requests, mut retries) = (0u64, 0u64);
        // 10,000 requests over 10 s, every attempt failing.
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i);
            budget.deposit(now);
            requests += 1;
            let mut attempt = 1;
            while let Decision::Retry { .. } = p.decide(
                attempt,
                Outcome::Response(503),
                &Method::GET,
                true,
                &budget,
                now,
            ) {
                retries += 1;
                attempt += 1;
            }
        }
        // 20 % of the requests, plus the floor of 10/s over the window (100).
        let cap = requests / 5 + 100;
        assert!(retries <= cap, "{retries} retries for {requests} requests");
        assert!(retries >= cap * 95 / 100, "the budget is used: {retries}");
        // Without the budget, 3 retries each would have quadrupled the load.
        assert!(retries < requests * 3 / 10);
    }

    #[test]
    fn budget_floor_and_window() {
        let t0 = Instant::now();
        let b = Budget::new(0, t0);
        let allowed = (0..500).filter(|_| b.withdraw(t0)).count();
        assert_eq!(allowed, 100, "10/s over 10 s, with no requests at all");
        assert_eq!(b.available(t0 + Duration::from_secs(5)), 0);
        assert_eq!(
            b.available(t0 + Duration::from_secs(11)),
            100,
            "the window moved on"
        );
    }
}
