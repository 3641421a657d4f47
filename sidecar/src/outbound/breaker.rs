//! Circuit breaking for one service (Envoy's circuit breakers plus an error-rate breaker in
//! the manner of Hystrix/resilience4j):
//! - **Concurrency limits**: `maxConnections`, `maxPendingRequests` and `maxRequests` are
//!   RAII permits over atomic counters. A permit over the limit is refused at once with an
//!   [`Overflow`] naming the limit (the proxy answers 503 with `x-remora-proxy-error`).
//! - **Error rate**: failures (see [`Outcome::is_failure`]) as a share of the requests of a
//!   rolling window (10 buckets). With at least `minRequests` in the window and
//!   `errorRatePercent` of them failed, the breaker opens: requests are refused for
//!   `openFor` (503 with `retry-after`). Then it half-opens: one probe request at a time is
//!   let through; [`PROBES_TO_CLOSE`] successful probes close it, a failed one opens it
//!   again. A percent of 0 opens on any failure once `minRequests` is reached.
//!
//! The breaker is long-lived per service (its counters outlive config versions; a changed
//! `circuitBreaker` policy builds a new one). Admitting a request is two atomic
//! increments and a load; recording a result is one compare-and-swap on the current
//! bucket (plus a sum of the 10 buckets after a failure). No lock anywhere.
//!
//! [`RollingCounts`], the lock-free windowed counter, also backs the retry budget.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use remora_crds::policy::CircuitBreaker;

use super::outlier::Outcome;

/// Successful probes that close a half-open breaker.
pub const PROBES_TO_CLOSE: u32 = 5;
/// Probes in flight at once while half-open.
pub const CONCURRENT_PROBES: u32 = 1;
/// What a request refused while a probe is in flight is told to wait.
const PROBE_RETRY_AFTER: Duration = Duration::from_secs(1);
const BUCKETS: usize = 10;

/// A counter pair (`a`, `b`) over a rolling window of 10 buckets, lock-free: each bucket
/// is one `AtomicU64` holding its epoch (22 bits) and both counts (21 bits each,
/// saturating), so moving a bucket to a new epoch and counting in it is one
/// compare-and-swap.
#[derive(Debug)]
pub struct RollingCounts {
    base: Instant,
    width_ms: u64,
    buckets: [AtomicU64; BUCKETS],
}

const EPOCH_BITS: u32 = 22;
const COUNT_BITS: u32 = 21;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;

fn unpack(w: u64) -> (u64, u64, u64) {
    (
        w >> (2 * COUNT_BITS),
        (w >> COUNT_BITS) & COUNT_MAX,
        w & COUNT_MAX,
    )
}

fn pack(epoch: u64, a: u64, b: u64) -> u64 {
    ((epoch & EPOCH_MASK) << (2 * COUNT_BITS)) | (a.min(COUNT_MAX) << COUNT_BITS) | b.min(COUNT_MAX)
}

impl RollingCounts {
    /// A window of `window` (split in 10 buckets), starting at `now`.
    pub fn new(window: Duration, now: Instant) -> Self {
        Self {
            base: now,
            width_ms: (window.as_millis() as u64 / BUCKETS as u64).max(1),
            buckets: Default::default(),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        // Epoch 0 is an empty bucket's: count from 1.
        (now.saturating_duration_since(self.base).as_millis() as u64 / self.width_ms + 1)
            & EPOCH_MASK
    }

    /// Adds `a` and `b` at `now`.
    pub fn add(&self, now: Instant, a: u64, b: u64) {
        let e = self.epoch(now);
        let bucket = &self.buckets[e as usize % BUCKETS];
        let mut cur = bucket.load(Relaxed);
        loop {
            let (be, ba, bb) = unpack(cur);
            let next = if be == e {
                pack(e, ba + a, bb + b)
            } else {
                pack(e, a, b)
            };
            match bucket.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// The sums of `a` and `b` over the window ending at `now`.
    pub fn sum(&self, now: Instant) -> (u64, u64) {
        let e = self.epoch(now);
        let mut sums = (0, 0);
        for j in 0..BUCKETS as u64 {
            let want = e.wrapping_sub(j) & EPOCH_MASK;
            let (be, a, b) = unpack(self.buckets[want as usize % BUCKETS].load(Relaxed));
            if be == want && be != 0 {
                sums.0 += a;
                sums.1 += b;
            }
        }
        sums
    }

    /// Forgets everything.
    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Relaxed);
        }
    }
}

/// A limit that was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    #[error("circuit breaker: maxConnections ({0}) reached")]
    Connections(u32),
    #[error("circuit breaker: maxPendingRequests ({0}) reached")]
    PendingRequests(u32),
    #[error("circuit breaker: maxRequests ({0}) reached")]
    Requests(u32),
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error(transparent)]
    Overflow(#[from] Overflow),
    #[error("circuit breaker open: too many failures; retry after {}s", retry_after_secs(*.retry_after))]
    Open { retry_after: Duration },
}

/// Whole seconds for a `retry-after` header, rounded up (at least 1).
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

impl Rejected {
    /// The `x-remora-proxy-error` value naming the cause.
    pub fn header_value(&self) -> &'static str {
        match self {
            Self::Overflow(Overflow::Connections(_)) => "max-connections",
            Self::Overflow(Overflow::PendingRequests(_)) => "max-pending-requests",
            Self::Overflow(Overflow::Requests(_)) => "max-requests",
            Self::Open { .. } => "circuit-open",
        }
    }

    /// The `retry-after` to send, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Open { retry_after } => Some(*retry_after),
            Self::Overflow(_) => None,
        }
    }
}

/// The error-rate breaker's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorRate {
    pub percent: u32,
    pub window: Duration,
    pub min_requests: u32,
    pub open_for: Duration,
}

/// A service's breaker settings; `u32::MAX` means no limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub error_rate: Option<ErrorRate>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            max_connections: u32::MAX,
            max_pending_requests: u32::MAX,
            max_requests: u32::MAX,
            error_rate: None,
        }
    }
}

impl BreakerConfig {
    /// From the policy, with the defaults of docs/DESIGN.md's example (window 30 s,
    /// 20 requests, open for 30 s) for the error-rate fields left out.
    pub fn from_policy(p: &CircuitBreaker) -> Self {
        let d = |v: &Option<remora_crds::duration::Duration>, default: u64| {
            v.as_ref().map_or(Duration::from_secs(default), |d| d.get())
        };
        Self {
            max_connections: p.max_connections.unwrap_or(u32::MAX),
            max_pending_requests: p.max_pending_requests.unwrap_or(u32::MAX),
            max_requests: p.max_requests.unwrap_or(u32::MAX),
            error_rate: p.error_rate_percent.map(|percent| ErrorRate {
                percent: percent.min(100),
                window: d(&p.window, 30),
                min_requests: p.min_requests.unwrap_or(20).max(1),
                open_for: d(&p.open_for, 30),
            }),
        }
    }
}

/// The error-rate breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;

/// Counters for metrics and `/endpoints`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerStats {
    pub connections: u32,
    pub pending_requests: u32,
    pub requests: u32,
    pub connection_overflows: u64,
    pub pending_overflows: u64,
    pub request_overflows: u64,
    /// Times the error-rate breaker opened.
    pub opened: u64,
    /// Requests refused while open or half-open.
    pub rejected_open: u64,
}

/// One service's breaker.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    base: Instant,
    connections: AtomicU32,
    pending: AtomicU32,
    requests: AtomicU32,
    /// `(ms since base) << 2 | CLOSED/OPEN/HALF_OPEN`.
    state: AtomicU64,
    /// (requests, failures) while closed.
    window: RollingCounts,
    probes_in_flight: AtomicU32,
    probe_successes: AtomicU32,
    overflows: [AtomicU64; 3],
    opened: AtomicU64,
    rejected_open: AtomicU64,
}

/// Which counter a [`Permit`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Connections,
    PendingRequests,
}

/// A connection or pending-request slot, released on drop.
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<Breaker>,
    limit: Limit,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.breaker.counter(self.limit).fetch_sub(1, Relaxed);
    }
}

/// An admitted request: holds its `maxRequests` slot (and its probe slot while half-open)
/// until [`Admission::finish`] records the outcome or it is dropped (a cancelled request,
/// recorded as nothing).
#[derive(Debug)]
pub struct Admission {
    breaker: Arc<Breaker>,
    probe: bool,
}

fn take(counter: &AtomicU32, limit: u32) -> bool {
    if counter.fetch_add(1, Relaxed) >= limit {
        counter.fetch_sub(1, Relaxed);
        false
    } else {
        true
    }
}

impl Breaker {
    pub fn new(config: BreakerConfig, now: Instant) -> Self {
        let window = config
            .error_rate
            .as_ref()
            .map_or(Duration::from_secs(10), |e| e.window);
        Self {
            config,
            base: now,
            connections: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            requests: AtomicU32::new(0),
            state: AtomicU64::new(CLOSED),
            window: RollingCounts::new(window, now),
            probes_in_flight: AtomicU32::new(0),
            probe_successes: AtomicU32::new(0),
            overflows: Default::default(),
            opened: AtomicU64::new(0),
            rejected_open: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn counter(&self, limit: Limit) -> &AtomicU32 {
        match limit {
            Limit::Connections => &self.connections,
            Limit::PendingRequests => &self.pending,
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_millis() as u64
    }

    /// A slot for one more upstream connection.
    pub fn connection(self: &Arc<Self>) -> Result<Permit, Overflow> {
        self.permit(Limit::Connections)
    }

    /// A slot for one more request waiting for a connection.
    pub fn pending_request(self: &Arc<Self>) -> Result<Permit, Overflow> {
        self.permit(Limit::PendingRequests)
    }

    fn permit(self: &Arc<Self>, limit: Limit) -> Result<Permit, Overflow> {
        let (max, overflow, i) = match limit {
            Limit::Connections => (
                self.config.max_connections,
                Overflow::Connections as fn(u32) -> Overflow,
                0,
            ),
            Limit::PendingRequests => (
                self.config.max_pending_requests,
                Overflow::PendingRequests as fn(u32) -> Overflow,
                1,
            ),
        };
        if take(self.counter(limit), max) {
            Ok(Permit {
                breaker: self.clone(),
                limit,
            })
        } else {
            self.overflows[i].fetch_add(1, Relaxed);
            Err(overflow(max))
        }
    }

    /// Admits one request at `now`, or refuses it (breaker open, or `maxRequests` reached).
    pub fn admit(self: &Arc<Self>, now: Instant) -> Result<Admission, Rejected> {
        let probe = match &self.config.error_rate {
            None => false,
            Some(er) => match self.try_pass(er, now) {
                Ok(probe) => probe,
                Err(retry_after) => {
                    self.rejected_open.fetch_add(1, Relaxed);
                    return Err(Rejected::Open { retry_after });
                }
            },
        };
        if !take(&self.requests, self.config.max_requests) {
            if probe {
                self.probes_in_flight.fetch_sub(1, Relaxed);
            }
            self.overflows[2].fetch_add(1, Relaxed);
            return Err(Overflow::Requests(self.config.max_requests).into());
        }
        Ok(Admission {
            breaker: self.clone(),
            probe,
        })
    }

    /// `Ok(is_probe)` or `Err(retry_after)`.
    fn try_pass(&self, er: &ErrorRate, now: Instant) -> Result<bool, Duration> {
        let t = self.ms(now);
        let open_for = er.open_for.as_millis() as u64;
        let mut s = self.state.load(Relaxed);
        loop {
            match s & 3 {
                CLOSED => return Ok(false),
                OPEN => {
                    let reopen = (s >> 2).saturating_add(open_for);
                    if t < reopen {
                        return Err(Duration::from_millis(reopen - t));
                    }
                    let half = (t << 2) | HALF_OPEN;
                    match self.state.compare_exchange(s, half, Relaxed, Relaxed) {
                        Ok(_) => {
                            self.probes_in_flight.store(0, Relaxed);
                            self.probe_successes.store(0, Relaxed);
                            s = half;
                        }
                        Err(actual) => s = actual,
                    }
                }
                _ => {
                    return if take(&self.probes_in_flight, CONCURRENT_PROBES) {
                        Ok(true)
                    } else {
                        Err(PROBE_RETRY_AFTER)
                    };
                }
            }
        }
    }

    fn record(&self, probe: bool, outcome: Outcome, now: Instant) {
        let Some(er) = &self.config.error_rate else {
            return;
        };
        let failed = outcome.is_failure();
        let t = self.ms(now);
        let s = self.state.load(Relaxed);
        if probe {
            self.probes_in_flight.fetch_sub(1, Relaxed);
            if s & 3 != HALF_OPEN {
                return;
            }
            if failed {
                if self
                    .state
                    .compare_exchange(s, (t << 2) | OPEN, Relaxed, Relaxed)
                    .is_ok()
                {
                    self.opened.fetch_add(1, Relaxed);
                }
            } else if self.probe_successes.fetch_add(1, Relaxed) + 1 >= PROBES_TO_CLOSE
                && self
                    .state
                    .compare_exchange(s, (t << 2) | CLOSED, Relaxed, Relaxed)
                    .is_ok()
            {
                self.window.reset();
            }
            return;
        }
        // Results of requests admitted before the breaker opened are not counted.
        if s & 3 != CLOSED {
            return;
        }
        self.window.add(now, 1, u64::from(failed));
        if !failed {
            return;
        }
        let (total, failures) = self.window.sum(now);
        if total >= u64::from(er.min_requests)
            && failures * 100 >= u64::from(er.percent) * total
            && self
                .state
                .compare_exchange(s, (t << 2) | OPEN, Relaxed, Relaxed)
                .is_ok()
        {
            self.opened.fetch_add(1, Relaxed);
        }
    }

    /// The error-rate breaker's state at `now` (an open breaker whose time is up reports
    /// half-open: the next request probes).
    pub fn state(&self, now: Instant) -> State {
        let s = self.state.load(Relaxed);
        match (s & 3, &self.config.error_rate) {
            (OPEN, Some(er)) => {
                let until = self.base + Duration::from_millis(s >> 2) + er.open_for;
                if now >= until {
                    State::HalfOpen
                } else {
                    State::Open { until }
                }
            }
            (HALF_OPEN, _) => State::HalfOpen,
            _ => State::Closed,
        }
    }

    pub fn stats(&self) -> BreakerStats {
        BreakerStats {
            connections: self.connections.load(Relaxed),
            pending_requests: self.pending.load(Relaxed),
            requests: self.requests.load(Relaxed),
            connection_overflows: self.overflows[0].load(Relaxed),
            pending_overflows: self.overflows[1].load(Relaxed),
            request_overflows: self.overflows[2].load(Relaxed),
            opened: self.opened.load(Relaxed),
            rejected_open: self.rejected_open.load(Relaxed),
        }
    }
}

impl Admission {
    /// Records how the request ended.
    pub fn finish(mut self, outcome: Outcome, now: Instant) {
        let probe = std::mem::take(&mut self.probe);
        self.breaker.record(probe, outcome, now);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.breaker.requests.fetch_sub(1, Relaxed);
        if self.probe {
            // Cancelled probe: free its slot so another request can probe.
            self.breaker.probes_in_flight.fetch_sub(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
