//! Versions that only grow, also across operator restarts and without storage.
//!
//! A version is `max(previous + 1, wall clock in microseconds)`: within one process it
//! grows strictly; after a restart the clock has moved past every version issued before
//! (issuing more than one version per microsecond is impossible with debouncing, so the
//! counter never runs ahead of the clock for long), so new versions exceed old ones
//! unless the node's clock stepped back by more than the restart took. This avoids a
//! write to the apiserver per change (a persisted counter) and needs no coordination.
//! Replicas' clocks are not comparable to the microsecond, so a proxy that switches
//! replicas must take the new replica's first message as a fresh snapshot; within one
//! stream versions strictly grow.

/// Issues versions.
#[derive(Clone, Debug, Default)]
pub struct Versioner {
    last: u64,
}

impl Versioner {
    /// Starts after `floor` (e.g. the highest version a previous run is known to have used).
    pub fn starting_after(floor: u64) -> Self {
        Self { last: floor }
    }

    /// The next version at wall-clock time `now_micros` (microseconds since the epoch).
    pub fn next(&mut self, now_micros: u64) -> u64 {
        self.last = now_micros.max(self.last.saturating_add(1));
        self.last
    }

    /// The last version issued (0 before the first).
    pub fn last(&self) -> u64 {
        self.last
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_strictly_even_when_the_clock_stalls_or_steps_back() {
        let mut v = Versioner::default();
        assert_eq!(v.next(1_000), 1_000);
        assert_eq!(v.next(1_000), 1_001);
        assert_eq!(v.next(500), 1_002);
        assert_eq!(v.next(5_000), 5_000);
        assert_eq!(v.last(), 5_000);
    }

    #[test]
    fn a_restart_continues_above_the_previous_run() {
        let mut before = Versioner::default();
        let mut last = 0;
        for t in 0..1000 {
            last = before.next(1_000_000 + t);
        }
        // A new process a little later, with no memory of the old one.
        let mut after = Versioner::default();
        assert!(after.next(1_000_000 + 2_000) > last);
        // And with a known floor, even a clock behind it is safe.
        let mut floored = Versioner::starting_after(last);
        assert!(floored.next(0) > last);
        assert!(now_micros() > 1_700_000_000_000_000);
    }
}
