//! Local inbound rate limiting: a token bucket per pod port (`rateLimit`), or one per caller
//! identity (`perIdentity`), refilled continuously.
//!
//! The bucket is GCRA (the generic cell rate algorithm, ATM's and `governor`'s): instead of
//! a token count and a refill timer it keeps one number, the theoretical arrival time
//! (TAT) of the next request at the configured rate. A request at `t` is allowed when
//! `max(TAT, t) + 1/rate − t ≤ burst/rate`, and then pushes the TAT on by `1/rate`. This is
//! exactly a bucket of `burst` tokens refilled at `rate` per second, in one `AtomicU64`
//! updated by compare-and-swap; a refusal says how long until the next token
//! (`retry-after`).
//!
//! Per identity, buckets live in a bounded map (10,000 callers). A full map first drops
//! the buckets of idle callers — a bucket that has refilled completely is the same as a
//! new one, so dropping it forgets nothing — and callers beyond the bound share one
//! overflow bucket, as callers without an identity do.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use remora_crds::policy::RateLimit;

/// A refusal: the next token arrives after this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rate limited; retry after {}s", self.secs())]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds for the `retry-after` header, rounded up (at least 1).
    pub fn secs(&self) -> u64 {
        self.0.as_millis().div_ceil(1000).max(1) as u64
    }
}

/// One token bucket (GCRA).
#[derive(Debug)]
pub struct TokenBucket {
    /// Nanoseconds per token.
    interval: u64,
    /// `burst × interval`: how far the TAT may run ahead of now.
    tolerance: u64,
    /// Theoretical arrival time, ns since `base`.
    tat: AtomicU64,
    base: Instant,
}

impl TokenBucket {
    /// `rate` tokens per second (at least 1), `burst` at most (at least 1), full at `now`.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let interval = 1_000_000_000 / u64::from(rate.max(1));
        Self {
            interval,
            tolerance: interval * u64::from(burst.max(1)),
            tat: AtomicU64::new(0),
            base: now,
        }
    }

    fn ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Takes a token at `now`, or says when the next one comes.
    #[inline]
    pub fn try_acquire(&self, now: Instant) -> Result<(), RetryAfter> {
        let t = self.ns(now);
        let mut tat = self.tat.load(Relaxed);
        loop {
            let next = tat.max(t) + self.interval;
            let ahead = next - t;
            if ahead > self.tolerance {
                return Err(RetryAfter(Duration::from_nanos(ahead - self.tolerance)));
            }
            match self.tat.compare_exchange_weak(tat, next, Relaxed, Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Is the bucket full at `now` (no trace of past requests)?
    pub fn is_idle(&self, now: Instant) -> bool {
        self.tat.load(Relaxed) <= self.ns(now)
    }
}

/// Callers with a bucket of their own, at most.
pub const MAX_CALLERS: usize = 10_000;

/// The rate limit of one port.
#[derive(Debug)]
pub struct RateLimiter {
    rate: u32,
    burst: u32,
    /// The port's bucket, or (per identity) the one of callers without an identity and of
    /// callers beyond [`MAX_CALLERS`].
    shared: TokenBucket,
    per_caller: Option<RwLock<HashMap<Arc<str>, TokenBucket>>>,
}

impl RateLimiter {
    pub fn new(rate: u32, burst: u32, per_identity: bool, now: Instant) -> Self {
        Self {
            rate,
            burst,
            shared: TokenBucket::new(rate, burst, now),
            per_caller: per_identity.then(|| RwLock::new(HashMap::new())),
        }
    }

    /// From the port's policy (`burst` defaults to `requestsPerSecond`).
    pub fn from_policy(rl: &RateLimit, now: Instant) -> Self {
        let rate = rl.requests_per_second;
        Self::new(rate, rl.burst.unwrap_or(rate), rl.per_identity, now)
    }

    /// Admits one request (or connection) from `caller` (its SPIFFE ID, if any) at `now`.
    pub fn try_acquire(&self, caller: Option<&str>, now: Instant) -> Result<(), RetryAfter> {
        let (Some(map), Some(id)) = (&self.per_caller, caller) else {
            return self.shared.try_acquire(now);
        };
        if let Ok(m) = map.read()
            && let Some(b) = m.get(id)
        {
            return b.try_acquire(now);
        }
        let Ok(mut m) = map.write() else {
            return self.shared.try_acquire(now);
        };
        if !m.contains_key(id) && m.len() >= MAX_CALLERS {
            m.retain(|_, b| !b.is_idle(now));
            if m.len() >= MAX_CALLERS {
                drop(m);
                return self.shared.try_acquire(now);
            }
        }
        m.entry(Arc::from(id))
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst, now))
            .try_acquire(now)
    }

    /// Callers with a bucket of their own now.
    pub fn callers(&self) -> usize {
        self.per_caller
            .as_ref()
            .and_then(|m| m.read().ok().map(|m| m.len()))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offers `offered` requests per second for `seconds`, evenly; returns those admitted.
    fn offer(
        l: &RateLimiter,
        caller: Option<&str>,
        offered: u64,
        seconds: u64,
        t0: Instant,
    ) -> u64 {
        let step = Duration::from_nanos(1_000_000_000 / offered);
        (0..offered * seconds)
            .filter(|&i| l.try_acquire(caller, t0 + step * i as u32).is_ok())
            .count() as u64
    }

    #[test]
    fn admits_the_configured_rate() {
        let t0 = Instant::now();
        for (rate, burst, offered) in [(100, 50, 1000), (1000, 1000, 5000), (7, 1, 100)] {
            let l = RateLimiter::new(rate, burst, false, t0);
            let admitted = offer(&l, None, offered, 20, t0);
            let expect = u64::from(burst) + u64::from(rate) * 20;
            let got_rate = (admitted - u64::from(burst)) as f64 / 20.0;
            assert!(
                (got_rate - f64::from(rate)).abs() <= f64::from(rate) * 0.1,
                "rate {rate}: admitted {admitted}, expected about {expect}"
            );
            let refused = offered * 20 - admitted;
            assert!(refused > 0);
        }
    }

    #[test]
    fn burst_then_retry_after() {
        let t0 = Instant::now();
        let b = TokenBucket::new(10, 3, t0);
        for _ in 0..3 {
            b.try_acquire(t0).expect("burst");
        }
        let err = b.try_acquire(t0).expect_err("empty");
        assert_eq!(err.0, Duration::from_millis(100));
        assert_eq!(err.secs(), 1);
        assert!(b.try_acquire(t0 + Duration::from_millis(99)).is_err());
        b.try_acquire(t0 + Duration::from_millis(100))
            .expect("refilled one");
        assert!(!b.is_idle(t0 + Duration::from_millis(100)));
        assert!(b.is_idle(t0 + Duration::from_secs(1)));
        let slow = TokenBucket::new(1, 1, t0);
        slow.try_acquire(t0).expect("one");
        assert_eq!(slow.try_acquire(t0).map_err(|e| e.secs()), Err(1));
    }

    #[test]
    fn per_identity_buckets_are_separate_and_bounded() {
        let t0 = Instant::now();
        let l = RateLimiter::from_policy(
            &RateLimit {
                requests_per_second: 10,
                burst: Some(5),
                per_identity: true,
            },
            t0,
        );
        let alice = Some("spiffe://cluster.local/ns/a/sa/alice");
        let bob = Some("spiffe://cluster.local/ns/a/sa/bob");
        assert_eq!(
            (0..10).filter(|_| l.try_acquire(alice, t0).is_ok()).count(),
            5
        );
        assert_eq!(
            (0..10).filter(|_| l.try_acquire(bob, t0).is_ok()).count(),
            5
        );
        assert_eq!(
            (0..10).filter(|_| l.try_acquire(None, t0).is_ok()).count(),
            5
        );
        assert_eq!(l.callers(), 2);
        // Fill the map with busy callers: newcomers share the overflow bucket, which the
        // anonymous callers above emptied.
        let t1 = t0 + Duration::from_secs(10);
        for i in 0..MAX_CALLERS {
            l.try_acquire(Some(&format!("spiffe://c/ns/n/sa/{i}")), t1)
                .expect("fresh bucket");
        }
        assert_eq!(l.callers(), MAX_CALLERS);
        assert!(
            l.try_acquire(Some("spiffe://c/ns/n/sa/late"), t1).is_ok(),
            "shared bucket refilled"
        );
        // Later, idle buckets are dropped to make room.
        let t2 = t1 + Duration::from_secs(10);
        l.try_acquire(Some("spiffe://c/ns/n/sa/later"), t2)
            .expect("room made");
        assert_eq!(l.callers(), 1);
    }
}
