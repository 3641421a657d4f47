//! An endpoint's load, the input of least-request balancing: its in-flight requests and a
//! peak-EWMA estimate of its latency (Finagle's and Linkerd's `PeakEwma`, tower's
//! `load::PeakEwma`).
//!
//! The estimate is peak-sensitive: a latency above it replaces it at once, so an endpoint
//! that slows down is avoided immediately; a latency below it moves it by an exponentially
//! weighted average whose weight is `1 - exp(-Δt/τ)` (Δt since the previous observation,
//! τ = 10 s), so it recovers gradually. When read, the estimate decays towards zero with
//! the same τ since its last observation: an endpoint that was avoided for being slow is
//! probed again after a while instead of starving. An endpoint never measured starts at a
//! prior of 30 ms (Linkerd's default RTT).
//!
//! `cost = estimate × (in_flight + 1)`. The pair (estimate, time of last observation) is one
//! `AtomicU64` (an `f32` of nanoseconds and a `u32` of milliseconds since the `Load` was
//! created), updated with a compare-and-swap: no lock on the data path, and reading a cost
//! is one load and one `exp`.

use std::{
    ops::Deref,
    sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

/// Linkerd's default RTT for an endpoint with no observation yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// The time constant of the moving average and of the decay.
pub const DECAY: Duration = Duration::from_secs(10);

const DECAY_MS: f64 = DECAY.as_millis() as f64;

/// The long-lived load of one endpoint.
#[derive(Debug)]
pub struct Load {
    in_flight: AtomicU32,
    /// High 32 bits: estimate (f32 nanoseconds); low 32 bits: observed at (ms since `base`).
    ewma: AtomicU64,
    base: Instant,
}

fn pack(estimate_ns: f32, at_ms: u32) -> u64 {
    (u64::from(estimate_ns.to_bits()) << 32) | u64::from(at_ms)
}

fn unpack(v: u64) -> (f32, u32) {
    (f32::from_bits((v >> 32) as u32), v as u32)
}

/// `exp(-Δt/τ)` from `then` to `now` (ms). Another thread may have stored an observation
/// stamped a little after this thread's `now`: a negative Δt counts as zero.
fn decay(now: u32, then: u32) -> f64 {
    let elapsed = (now.wrapping_sub(then) as i32).max(0);
    (-f64::from(elapsed) / DECAY_MS).exp()
}

impl Default for Load {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Load {
    /// A load created at `now`, with the default prior.
    pub fn new(now: Instant) -> Self {
        Self::with_prior(now, DEFAULT_RTT)
    }

    /// A load whose estimate starts at `prior`.
    pub fn with_prior(now: Instant, prior: Duration) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            ewma: AtomicU64::new(pack(prior.as_nanos() as f32, 0)),
            base: now,
        }
    }

    fn ms(&self, now: Instant) -> u32 {
        // Wraps after 49 days; only differences (within 24 days) matter.
        now.saturating_duration_since(self.base).as_millis() as u32
    }

    /// Requests (or connections) in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// The latency estimate at `now`, decayed since its last observation.
    pub fn estimate(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.estimate_ns(now) as u64)
    }

    fn estimate_ns(&self, now: Instant) -> f64 {
        let (est, at) = unpack(self.ewma.load(Relaxed));
        f64::from(est) * decay(self.ms(now), at)
    }

    /// What sending one more request here is expected to cost: `estimate × (in_flight + 1)`,
    /// in nanoseconds.
    pub fn cost(&self, now: Instant) -> f64 {
        self.estimate_ns(now) * f64::from(self.in_flight() + 1)
    }

    /// Records one observed latency at `now`.
    pub fn observe(&self, latency: Duration, now: Instant) {
        let rtt = latency.as_nanos() as f64;
        let at_ms = self.ms(now);
        let mut cur = self.ewma.load(Relaxed);
        loop {
            let (est, at) = unpack(cur);
            let est = f64::from(est);
            let next = if rtt > est {
                rtt
            } else {
                let decay = decay(at_ms, at);
                est * decay + rtt * (1.0 - decay)
            };
            match self
                .ewma
                .compare_exchange_weak(cur, pack(next as f32, at_ms), Relaxed, Relaxed)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }
}

/// Something that owns a [`Load`] (an endpoint, or the `Load` itself).
pub trait HasLoad {
    fn load(&self) -> &Load;
}

impl HasLoad for Load {
    fn load(&self) -> &Load {
        self
    }
}

/// One request (or connection) in flight on an endpoint: counted from [`InFlight::start`]
/// until it is dropped. [`InFlight::finish`] also records its latency.
///
/// `P` is any pointer to the load's owner (`Arc<Endpoint>`, `&Endpoint`, `&Load`), so the
/// guard can live in a future that owns the endpoint.
#[derive(Debug)]
pub struct InFlight<P>
where
    P: Deref,
    P::Target: HasLoad,
{
    owner: P,
    started: Instant,
}

impl<P> InFlight<P>
where
    P: Deref,
    P::Target: HasLoad,
{
    /// Counts one more request in flight on `owner`'s load.
    pub fn start(owner: P, now: Instant) -> Self {
        owner.load().in_flight.fetch_add(1, Relaxed);
        Self {
            owner,
            started: now,
        }
    }

    /// The endpoint this request went to.
    pub fn owner(&self) -> &P {
        &self.owner
    }

    /// When the request started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The request completed at `now` (with any response): record its latency. Dropping the
    /// guard instead (a cancelled request, a connect failure) records nothing.
    pub fn finish(self, now: Instant) {
        self.owner
            .load()
            .observe(now.saturating_duration_since(self.started), now);
    }
}

impl<P> Drop for InFlight<P>
where
    P: Deref,
    P::Target: HasLoad,
{
    fn drop(&mut self) {
        self.owner.load().in_flight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) <= Duration::from_micros(50)
    }

    #[test]
    fn starts_at_the_prior_and_counts_in_flight() {
        let t0 = Instant::now();
        let l = Load::new(t0);
        assert!(close(l.estimate(t0), DEFAULT_RTT));
        assert!((l.cost(t0) - 30e6).abs() < 1e3);
        let a = InFlight::start(&l, t0);
        let b = InFlight::start(&l, t0);
        assert_eq!(l.in_flight(), 2);
        assert!((l.cost(t0) - 90e6).abs() < 1e3, "30 ms × (2 + 1)");
        drop(a);
        b.finish(t0 + ms(40));
        assert_eq!(l.in_flight(), 0);
        assert!(close(l.estimate(t0 + ms(40)), ms(40)), "a peak replaces");
    }

    #[test]
    fn peaks_replace_and_lower_values_average_in() {
        let t0 = Instant::now();
        let l = Load::with_prior(t0, ms(10));
        l.observe(ms(100), t0);
        assert!(close(l.estimate(t0), ms(100)));
        // One 10 ms observation a time constant later weighs 1 - 1/e.
        let t1 = t0 + DECAY;
        l.observe(ms(10), t1);
        let expect = 100.0 / std::f64::consts::E + 10.0 * (1.0 - 1.0 / std::f64::consts::E);
        let got = l.estimate(t1).as_secs_f64() * 1e3;
        assert!((got - expect).abs() < 0.01, "{got} vs {expect}");
        // Many fast observations converge on the fast latency.
        let mut t = t1;
        for _ in 0..2000 {
            t += ms(100);
            l.observe(ms(10), t);
        }
        assert!(close(l.estimate(t), ms(10)), "{:?}", l.estimate(t));
    }

    #[test]
    fn an_idle_estimate_decays_so_the_endpoint_is_probed_again() {
        let t0 = Instant::now();
        let l = Load::new(t0);
        l.observe(Duration::from_secs(1), t0);
        let later = l.estimate(t0 + DECAY * 3);
        let expect = Duration::from_secs(1).mul_f64((-3f64).exp());
        assert!(close(later, expect), "{later:?}");
        assert!(l.estimate(t0 + DECAY * 20) < ms(1));
    }

    #[test]
    fn concurrent_observers_lose_nothing_structural() {
        let t0 = Instant::now();
        let l = std::sync::Arc::new(Load::with_prior(t0, Duration::ZERO));
        std::thread::scope(|s| {
            for k in 0..4u64 {
                let l = l.clone();
                s.spawn(move || {
                    for i in 0..10_000u64 {
                        let g = InFlight::start(l.clone(), t0);
                        g.finish(t0 + ms(1 + (i + k) % 5));
                    }
                });
            }
        });
        assert_eq!(l.in_flight(), 0);
        let e = l.estimate(t0 + ms(5));
        assert!(e > ms(1) && e <= ms(5), "{e:?}");
    }
}
