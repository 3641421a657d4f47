//! Outlier detection (passive health checking), with Envoy's semantics: an endpoint whose
//! requests fail `consecutiveErrors` times in a row within `interval` is ejected — no
//! balancer picks it — for `baseEjectionTime × k`, where `k` counts its ejections (capped at
//! 10, as Envoy's default `max_ejection_time` is 10 × the base; `k` drops by one for each
//! `interval` the endpoint stays healthy, as Envoy's multiplier does).
//!
//! A failure is a 5xx response or a locally seen failure (connect failure, refused stream,
//! reset, timeout), as in Envoy without `split_external_local_origin_errors`. Failures of
//! requests still in flight when the endpoint was ejected are ignored.
//!
//! Never more than `maxEjectionPercent` of a service's endpoints are ejected at once. The
//! rule: `floor(endpoints × percent / 100)`, but at least one when the percent is above 0
//! and the service has two endpoints or more (Envoy also ejects at least one; a lone
//! endpoint is never ejected here, since that would turn its errors into certain 503s).
//!
//! A returning endpoint ramps up (Envoy's slow start): [`Health::ramp_factor`] grows
//! linearly from 0.1 to 1 over the ramp window after the ejection ends, and the balancer
//! scales the endpoint's share by it.
//!
//! [`Health`] is per endpoint and long-lived (it survives config versions, in the endpoint
//! registry); the success path of [`OutlierDetector::record`] is one atomic load. The
//! detector is per service; it takes a lock only to eject.
//!
//! [`Outcome`] — how one attempt on an endpoint ended — is shared with the circuit breaker
//! and the retry policy.

use std::{
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use remora_crds::policy::OutlierDetection;

/// How one attempt (a request, or a TCP connection) on an endpoint ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP response with this status.
    Response(u16),
    /// A TCP connection (or another non-HTTP exchange) that was established.
    Connected,
    /// The TCP connect or the TLS handshake failed: nothing reached the upstream.
    ConnectFailure,
    /// HTTP/2 `REFUSED_STREAM` (or GOAWAY before the stream): the upstream did not
    /// process the request.
    RefusedStream,
    /// The connection or stream was reset, or closed before a response.
    Reset,
    /// No response within the per-try timeout.
    Timeout,
}

impl Outcome {
    /// Does this count against the endpoint (outlier detection) and the service (error-rate
    /// breaker)?
    pub fn is_failure(self) -> bool {
        match self {
            Self::Response(s) => s >= 500,
            Self::Connected => false,
            Self::ConnectFailure | Self::RefusedStream | Self::Reset | Self::Timeout => true,
        }
    }

    /// Could the upstream have acted on the request? (False only when it certainly did not.)
    pub fn reached_upstream(self) -> bool {
        !matches!(self, Self::ConnectFailure | Self::RefusedStream)
    }
}

/// A process-wide time origin, so `Health` needs none of its own. Times are signed
/// milliseconds from it: callers (tests, above all) may pass instants from before it.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

pub(crate) fn millis(now: Instant) -> i64 {
    let o = origin();
    match now.checked_duration_since(o) {
        Some(d) => d.as_millis() as i64,
        None => -(o.duration_since(now).as_millis() as i64),
    }
}

fn instant(ms: i64) -> Instant {
    let o = origin();
    if ms >= 0 {
        o + Duration::from_millis(ms as u64)
    } else {
        o.checked_sub(Duration::from_millis(ms.unsigned_abs()))
            .unwrap_or(o)
    }
}

const NEVER: i64 = i64::MIN;

/// The long-lived health of one endpoint.
#[derive(Debug)]
pub struct Health {
    /// Failures in a row.
    failures: AtomicU32,
    /// When the current run of failures started (ms).
    streak_start: AtomicI64,
    /// End of the last ejection (ms), `NEVER` if none.
    ejected_until: AtomicI64,
    /// End of the slow start that follows it (ms).
    ramp_until: AtomicI64,
    /// The ejection multiplier `k` of the last ejection.
    ejections: AtomicU32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            failures: AtomicU32::new(0),
            streak_start: AtomicI64::new(NEVER),
            ejected_until: AtomicI64::new(NEVER),
            ramp_until: AtomicI64::new(NEVER),
            ejections: AtomicU32::new(0),
        }
    }
}

/// The slow-start factor a returning endpoint starts at.
pub const RAMP_FLOOR: f64 = 0.1;

impl Health {
    /// When the current ejection ends, if the endpoint is ejected at `now`.
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        let until = self.ejected_until.load(Relaxed);
        (until > millis(now)).then(|| instant(until))
    }

    /// May a balancer pick this endpoint at `now`?
    #[inline]
    pub fn is_available(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Relaxed);
        until == NEVER || until <= millis(now)
    }

    /// Slow start: 0 while ejected, then from [`RAMP_FLOOR`] up to 1 linearly over the ramp
    /// window, 1 afterwards (and for an endpoint never ejected).
    #[inline]
    pub fn ramp_factor(&self, now: Instant) -> f64 {
        let until = self.ejected_until.load(Relaxed);
        if until == NEVER {
            return 1.0;
        }
        let t = millis(now);
        if t < until {
            return 0.0;
        }
        let end = self.ramp_until.load(Relaxed);
        if t >= end || end <= until {
            return 1.0;
        }
        let progress = (t - until) as f64 / (end - until) as f64;
        RAMP_FLOOR + (1.0 - RAMP_FLOOR) * progress
    }

    /// Failures in a row so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Relaxed)
    }

    /// The multiplier of the last ejection (0 if never ejected).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Relaxed)
    }
}

/// An ejection that [`OutlierDetector::record`] just made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    pub until: Instant,
    pub duration: Duration,
    /// The multiplier: this endpoint's ejection count, decayed while healthy.
    pub multiplier: u32,
}

/// The cap on the ejection multiplier.
pub const MAX_MULTIPLIER: u32 = 10;
/// Slow-start window after an ejection, unless configured.
pub const DEFAULT_RAMP: Duration = Duration::from_secs(10);

/// A service's outlier detection settings, with Envoy's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierConfig {
    pub consecutive_errors: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub ramp: Duration,
}

impl OutlierConfig {
    pub fn from_policy(p: &OutlierDetection) -> Self {
        Self {
            consecutive_errors: p.consecutive_errors.max(1),
            interval: p
                .interval
                .as_ref()
                .map_or(Duration::from_secs(10), |d| d.get()),
            base_ejection_time: p
                .base_ejection_time
                .as_ref()
                .map_or(Duration::from_secs(30), |d| d.get()),
            max_ejection_percent: p.max_ejection_percent.unwrap_or(10).min(100),
            ramp: DEFAULT_RAMP,
        }
    }

    /// How many of `endpoints` may be ejected at once (see the module docs).
    pub fn max_ejected(&self, endpoints: usize) -> usize {
        let pct = self.max_ejection_percent as usize;
        let n = endpoints * pct / 100;
        if n == 0 && pct > 0 && endpoints >= 2 {
            1
        } else {
            n
        }
    }
}

/// Outlier detection for one service.
#[derive(Debug)]
pub struct OutlierDetector {
    config: OutlierConfig,
    endpoints: AtomicU64,
    /// End times (ms) of the ejections in force or recently ended.
    active: Mutex<Vec<i64>>,
}

fn ms_of(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl OutlierDetector {
    /// A detector for a service of `endpoints` endpoints.
    pub fn new(config: OutlierConfig, endpoints: usize) -> Self {
        Self {
            config,
            endpoints: AtomicU64::new(endpoints as u64),
            active: Mutex::new(Vec::new()),
        }
    }

    pub fn config(&self) -> &OutlierConfig {
        &self.config
    }

    /// The service's endpoint count changed (a new config version).
    pub fn set_endpoints(&self, endpoints: usize) {
        self.endpoints.store(endpoints as u64, Relaxed);
    }

    /// Endpoints ejected at `now`.
    pub fn ejected(&self, now: Instant) -> usize {
        let t = millis(now);
        self.active
            .lock()
            .map_or(0, |a| a.iter().filter(|&&u| u > t).count())
    }

    /// Records how an attempt on the endpoint of `health` ended; returns the ejection it
    /// caused, if any.
    pub fn record(&self, health: &Health, outcome: Outcome, now: Instant) -> Option<Ejection> {
        if !outcome.is_failure() {
            if health.failures.load(Relaxed) != 0 {
                health.failures.store(0, Relaxed);
            }
            return None;
        }
        let t = millis(now);
        if health.ejected_until.load(Relaxed) > t {
            return None;
        }
        let mut n = health.failures.fetch_add(1, Relaxed) + 1;
        let interval = ms_of(self.config.interval);
        let start = health.streak_start.load(Relaxed);
        if n == 1 || start == NEVER || t.saturating_sub(start) > interval {
            // The run starts (again) with this failure.
            health.streak_start.store(t, Relaxed);
            health.failures.store(1, Relaxed);
            n = 1;
        }
        if n < self.config.consecutive_errors {
            return None;
        }
        self.eject(health, t)
    }

    fn eject(&self, health: &Health, t: i64) -> Option<Ejection> {
        let mut active = self.active.lock().ok()?;
        if health.ejected_until.load(Relaxed) > t {
            return None; // another thread ejected it meanwhile
        }
        active.retain(|&until| until > t);
        let endpoints = self.endpoints.load(Relaxed) as usize;
        if active.len() >= self.config.max_ejected(endpoints) {
            // No room: the run goes on, and the next failure tries again.
            return None;
        }
        let last_end = health.ejected_until.load(Relaxed);
        let mut k = health.ejections.load(Relaxed);
        if last_end != NEVER {
            let healthy_for = t.saturating_sub(last_end).max(0);
            let steps = healthy_for / ms_of(self.config.interval).max(1);
            k = k.saturating_sub(steps.min(i64::from(u32::MAX)) as u32);
        }
        let k = (k + 1).min(MAX_MULTIPLIER);
        let duration = self.config.base_ejection_time * k;
        let until = t.saturating_add(ms_of(duration));
        health.ejections.store(k, Relaxed);
        health
            .ramp_until
            .store(until.saturating_add(ms_of(self.config.ramp)), Relaxed);
        health.ejected_until.store(until, Relaxed);
        health.failures.store(0, Relaxed);
        active.push(until);
        Some(Ejection {
            until: instant(until),
            duration,
            multiplier: k,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::balance::{
        BalanceConfig, Balancer, Candidate, HasLoad, Load, hash::endpoint_id,
    };
    use remora_crds::{duration::Duration as Dur, policy::LbAlgorithm};

    fn config(consecutive: u32, max_percent: u32) -> OutlierConfig {
        OutlierConfig::from_policy(&OutlierDetection {
            consecutive_errors: consecutive,
            interval: Some(Dur::from_secs(10)),
            base_ejection_time: Some(Dur::from_secs(30)),
            max_ejection_percent: Some(max_percent),
        })
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn fail(d: &OutlierDetector, h: &Health, times: u32, now: Instant) -> Option<Ejection> {
        (0..times)
            .map(|_| d.record(h, Outcome::Response(503), now))
            .last()
            .flatten()
    }

    #[test]
    fn outcomes() {
        assert!(Outcome::Response(500).is_failure() && Outcome::Reset.is_failure());
        assert!(!Outcome::Response(404).is_failure() && !Outcome::Connected.is_failure());
        assert!(!Outcome::ConnectFailure.reached_upstream());
        assert!(!Outcome::RefusedStream.reached_upstream());
        assert!(Outcome::Timeout.reached_upstream());
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_run() {
        let t0 = Instant::now();
        let d = OutlierDetector::new(config(5, 50), 4);
        let h = Health::default();
        assert_eq!(fail(&d, &h, 4, t0), None);
        d.record(&h, Outcome::Response(200), t0);
        assert_eq!(h.consecutive_failures(), 0);
        assert_eq!(fail(&d, &h, 4, t0), None);
        let e = d.record(&h, Outcome::ConnectFailure, t0).expect("ejected");
        assert_eq!((e.duration, e.multiplier), (secs(30), 1));
        assert!(!h.is_available(t0 + secs(29)));
        assert_eq!(h.ejected_until(t0 + secs(1)), Some(e.until));
        // Health keeps milliseconds: the ejection ends within one of `until`.
        let after = t0 + secs(30) + Duration::from_millis(1);
        assert!(h.is_available(after));
        assert_eq!(h.ejected_until(after), None);
        assert_eq!(d.ejected(t0 + secs(1)), 1);
        // Failures of requests that were in flight during the ejection do not count.
        assert_eq!(fail(&d, &h, 10, t0 + secs(1)), None);
        assert_eq!(h.consecutive_failures(), 0);
        // 4xx are not failures.
        for _ in 0..10 {
            assert_eq!(d.record(&h, Outcome::Response(404), t0 + secs(31)), None);
        }
    }

    #[test]
    fn failures_spread_wider_than_the_interval_do_not_eject() {
        let t0 = Instant::now();
        let d = OutlierDetector::new(config(3, 100), 2);
        let h = Health::default();
        let mut now = t0;
        for _ in 0..20 {
            assert_eq!(d.record(&h, Outcome::Timeout, now), None);
            now += secs(6); // 3 failures take 12 s > 10 s
        }
        now += secs(20);
        // Three within 10 s do.
        assert!(d.record(&h, Outcome::Timeout, now).is_none());
        assert!(d.record(&h, Outcome::Timeout, now + secs(1)).is_none());
        assert!(d.record(&h, Outcome::Timeout, now + secs(9)).is_some());
    }

    #[test]
    fn repeated_ejections_grow_up_to_the_cap_and_decay_while_healthy() {
        let t0 = Instant::now();
        let d = OutlierDetector::new(config(1, 100), 2);
        let h = Health::default();
        let mut now = t0;
        let mut got = Vec::new();
        for _ in 0..12 {
            let e = d.record(&h, Outcome::Reset, now).expect("ejected");
            got.push(e.multiplier);
            now = e.until; // fails again the moment it returns
        }
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10]);
        // 35 s healthy after the last ejection (3 intervals): the multiplier drops by 3.
        let e = d
            .record(&h, Outcome::Reset, now + secs(35))
            .expect("ejected");
        assert_eq!(e.multiplier, 8);
        assert_eq!(e.duration, secs(240));
    }

    #[test]
    fn never_more_than_the_max_ejection_percent() {
        let t0 = Instant::now();
        for (endpoints, pct, max) in [
            (10, 50, 5),
            (10, 10, 1),
            (3, 10, 1),
            (1, 50, 0),
            (4, 0, 0),
            (4, 100, 4),
        ] {
            let cfg = config(1, pct);
            assert_eq!(cfg.max_ejected(endpoints), max, "{endpoints} at {pct} %");
            let d = OutlierDetector::new(cfg, endpoints);
            let hs: Vec<Health> = (0..endpoints).map(|_| Health::default()).collect();
            let ejected = hs.iter().filter(|h| fail(&d, h, 1, t0).is_some()).count();
            assert_eq!(ejected, max, "{endpoints} at {pct} %");
            assert_eq!(d.ejected(t0), max);
            // Once the ejections end there is room again.
            if max > 0 {
                assert!(
                    d.record(&hs[endpoints - 1], Outcome::Reset, t0 + secs(31))
                        .is_some()
                );
            }
        }
    }

    #[derive(Debug)]
    struct Ep {
        load: Load,
        health: Health,
        id: u64,
    }

    impl HasLoad for Ep {
        fn load(&self) -> &Load {
            &self.load
        }
    }

    impl Candidate for Ep {
        fn hash_id(&self) -> u64 {
            self.id
        }
        fn ramp(&self, now: Instant) -> f64 {
            self.health.ramp_factor(now)
        }
    }

    #[test]
    fn an_ejected_endpoint_returns_after_its_time_with_ramped_traffic() {
        fastrand::seed(21);
        let t0 = Instant::now();
        let set: Vec<Ep> = (0..4)
            .map(|i| Ep {
                load: Load::new(t0),
                health: Health::default(),
                id: endpoint_id(std::net::SocketAddr::from(([10, 0, 0, i], 80))),
            })
            .collect();
        let d = OutlierDetector::new(config(5, 50), set.len());
        let e = fail(&d, &set[0].health, 5, t0).expect("ejected");
        let b = Balancer::new(
            &BalanceConfig {
                algorithm: LbAlgorithm::RoundRobin,
                locality: None,
            },
            &set,
            t0,
        )
        .expect("built");
        let share = |now: Instant| {
            let picks = (0..4000)
                .filter(|_| b.pick(&set, None, now, |ep| ep.health.is_available(now)) == Some(0))
                .count();
            picks as f64 / 4000.0
        };
        assert_eq!(share(t0 + secs(29)), 0.0, "ejected: no traffic");
        let mut last = 0.0;
        for s in [0, 3, 6, 9] {
            let now = e.until + secs(s);
            let expect = 0.25 * set[0].health.ramp_factor(now);
            let got = share(now);
            assert!(
                (got - expect).abs() < 0.03,
                "{s} s after: {got} vs {expect}"
            );
            assert!(got > last, "the share grows");
            last = got;
        }
        assert!(
            (share(e.until + secs(10)) - 0.25).abs() < 0.02,
            "fully back"
        );
        assert!((set[0].health.ramp_factor(e.until) - RAMP_FLOOR).abs() < 1e-9);
    }
}
