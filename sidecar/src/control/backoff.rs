//! Exponential backoff with jitter for everything that talks to the operator (certify,
//! config streams): the ceiling doubles from `base` to `max` with each failure, and each
//! wait is drawn uniformly from the upper half of the ceiling, so proxies restarted
//! together (a rollout, an operator restart) do not retry in lockstep.

use std::{
    hash::{BuildHasher as _, Hasher as _},
    time::Duration,
};

/// The retry schedule of one task.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// 1 s doubling up to 60 s.
    pub fn standard() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// 100 ms doubling up to 10 s: config streams, so a proxy catches up within seconds
    /// of the operator's return (a stream costs the operator nothing until it connects).
    pub fn stream() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }

    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            failures: 0,
        }
    }

    /// The ceiling of the next wait: `base · 2^failures`, at most `max`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The wait after one more failure, with `random` as the jitter source: uniform in
    /// `[ceiling / 2, ceiling]`.
    pub fn next_with(&mut self, random: u64) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        let span = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if span == 0 { 0 } else { random % (span + 1) };
        half + Duration::from_nanos(jitter)
    }

    /// The wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(random_u64())
    }

    /// Back to `base` after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A random number from the standard library's per-instance hash keys (good enough to
/// spread retries; not for cryptography).
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5245_4d4f_5241);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_maximum() {
        let mut b = Backoff::standard();
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_secs());
            b.next_with(0);
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        for _ in 0..100 {
            b.next_with(u64::MAX);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(60), "no overflow");
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn every_wait_is_within_the_upper_half_of_its_ceiling() {
        let mut b = Backoff::standard();
        for i in 0..50u64 {
            let ceiling = b.ceiling();
            for random in [0, 1, u64::MAX, random_u64(), i * 7_919_000_003] {
                let mut probe = b.clone();
                let d = probe.next_with(random);
                assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
            }
            b.next_delay();
        }
        let mut b = Backoff::standard();
        assert_eq!(b.next_with(0), Duration::from_millis(500));
    }

    #[test]
    fn jitter_spreads() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            seen.insert(Backoff::new(Duration::from_secs(8), Duration::from_secs(8)).next_delay());
        }
        assert!(seen.len() > 10, "jitter draws differ: {seen:?}");
    }
}
