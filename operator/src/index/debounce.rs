//! Debouncing: a burst of changes yields one recomputation. A recomputation is due once
//! no change arrived for `quiet`, or `max_delay` after the first pending change, whichever
//! comes first (so a constant trickle cannot postpone it forever). Pure: the caller passes
//! the time.

use std::time::{Duration, Instant};

/// The debounce state.
#[derive(Clone, Debug)]
pub struct Debouncer {
    quiet: Duration,
    max_delay: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Debouncer {
    pub fn new(quiet: Duration, max_delay: Duration) -> Self {
        Self {
            quiet,
            max_delay,
            first: None,
            last: None,
        }
    }

    /// Records a change at `now`.
    pub fn changed(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the pending recomputation is due; `None` when nothing is pending.
    pub fn due_at(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        Some((last + self.quiet).min(first + self.max_delay))
    }

    /// When the first change of the pending burst arrived.
    pub fn pending_since(&self) -> Option<Instant> {
        self.first
    }

    /// If a recomputation is due at `now`, clears the pending state and returns true.
    pub fn fire(&mut self, now: Instant) -> bool {
        match self.due_at() {
            Some(due) if due <= now => {
                self.first = None;
                self.last = None;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_fires_once_after_it_settles() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut d = Debouncer::new(ms(50), ms(500));
        assert_eq!(d.due_at(), None);
        assert!(!d.fire(t0));
        for i in 0..100 {
            d.changed(t0 + ms(i));
        }
        assert_eq!(d.due_at(), Some(t0 + ms(99) + ms(50)));
        assert!(!d.fire(t0 + ms(120)));
        assert!(d.fire(t0 + ms(149)));
        assert!(!d.fire(t0 + ms(1000)), "fired once");
    }

    #[test]
    fn a_trickle_cannot_postpone_forever() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut d = Debouncer::new(ms(50), ms(200));
        let mut fired = Vec::new();
        for i in 0..40u64 {
            let now = t0 + ms(i * 20);
            d.changed(now);
            if d.fire(now) {
                fired.push(i * 20);
            }
        }
        assert_eq!(fired, vec![200, 420, 640]);
    }
}
