//! Load balancing: which endpoint of a set gets the next request (HTTP) or connection (TCP).
//!
//! A [`Balancer`] is built once per config version for one endpoint set, from the policy's
//! [`LbAlgorithm`] and the endpoints' weights and zones; the endpoints' [`Load`]s (and their
//! outlier state) live longer, in the endpoint registry. Algorithms:
//! - `LeastRequest` (the default): power of two choices (Mitzenmacher; Linkerd, Envoy) — two
//!   random eligible endpoints, the cheaper [`Load::cost`] wins (peak-EWMA latency ×
//!   (in-flight + 1)).
//! - `RoundRobin`: a shared counter.
//! - `Random`: uniform.
//! - `Weighted`: smooth weighted round robin over the endpoints' weights ([`weighted`]).
//! - `ConsistentHash`: Maglev ([`maglev`]) over a key from [`hash`]; without a key, least
//!   request.
//!
//! Every pick takes an `eligible` predicate: the caller passes only ready, serving,
//! non-terminating endpoints, but ejections change at run time, and no algorithm returns an
//! endpoint the predicate refuses. Random draws that hit an ineligible endpoint are drawn
//! again a few times; only when most of the set is ineligible does a pick scan it. Maglev
//! probes the next table slots, so only an ineligible endpoint's keys move.
//!
//! Slow start: [`Candidate::ramp`] (from outlier detection, 0..=1) scales a returning
//! endpoint's share: least request divides its cost by the ramp, round robin, random and
//! weighted skip it with probability `1 − ramp`. Consistent hashing ignores it (keys return
//! to their endpoint at once), as Envoy's slow start does.
//!
//! Locality: with a zone of its own, the balancer keeps the same-zone subset and picks from it
//! while at least `min_healthy_percent` (default 70 %) of it is eligible, and from the whole
//! set otherwise. The share is recounted at most every 100 ms, so a pick does not scan.
//!
//! A pick allocates nothing and takes no lock; randomness is `fastrand`'s thread-local
//! generator (tests seed it with `fastrand::seed` for reproducible runs).

pub mod hash;
pub mod load;
pub mod maglev;
pub mod weighted;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

/// Share of the same-zone endpoints that must be eligible to keep traffic in the zone.
pub use remora_crds::policy::DEFAULT_MIN_HEALTHY_PERCENT;
use remora_crds::policy::{LbAlgorithm, LoadBalancer};

pub use self::{
    load::{HasLoad, InFlight, Load},
    maglev::{Maglev, TooManyEndpoints},
    weighted::Schedule,
};

/// What a balancer needs to know of an endpoint.
pub trait Candidate: HasLoad {
    /// Relative weight for `Weighted` (0: never picked by it).
    fn weight(&self) -> u32 {
        1
    }
    /// A stable id for consistent hashing, the same in every proxy
    /// ([`hash::endpoint_id`] of the address).
    fn hash_id(&self) -> u64;
    /// The endpoint's zone, for locality.
    fn zone(&self) -> Option<&str> {
        None
    }
    /// Slow-start factor at `now`: 1 for a settled endpoint, less while it ramps up.
    fn ramp(&self, _now: Instant) -> f64 {
        1.0
    }
}

/// How long a locality decision is reused before the zone's health is recounted.
pub const LOCALITY_RECOUNT: Duration = Duration::from_millis(100);
/// Random draws before a pick falls back to scanning the set.
const DRAWS: usize = 8;
/// Maglev slots probed past an ineligible endpoint before the fallback scan.
const MAGLEV_PROBES: usize = 64;

/// Zone preference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalityConfig {
    /// This proxy's zone.
    pub zone: Arc<str>,
    pub min_healthy_percent: u32,
}

/// What a balancer is built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalanceConfig {
    pub algorithm: LbAlgorithm,
    pub locality: Option<LocalityConfig>,
}

impl BalanceConfig {
    /// From a service's policy and this proxy's zone (locality needs both).
    pub fn from_policy(lb: Option<&LoadBalancer>, own_zone: Option<&str>) -> Self {
        let locality = lb
            .and_then(|lb| lb.locality.as_ref())
            .filter(|l| l.prefer_same_zone);
        Self {
            algorithm: lb.map(|lb| lb.algorithm).unwrap_or_default(),
            locality: locality.zip(own_zone).map(|(l, z)| LocalityConfig {
                zone: Arc::from(z),
                min_healthy_percent: l.min_healthy_percent.min(100),
            }),
        }
    }
}

/// A view of the endpoints an algorithm picks from: the whole set or the same-zone subset.
/// `get` takes an index of the view; the pick returns an index of the whole set.
trait View<E> {
    fn len(&self) -> usize;
    fn get(&self, i: usize) -> Option<&E>;
    fn index(&self, i: usize) -> usize;
}

struct All<'a, E>(&'a [E]);

impl<E> View<E> for All<'_, E> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, i: usize) -> Option<&E> {
        self.0.get(i)
    }
    fn index(&self, i: usize) -> usize {
        i
    }
}

struct Sub<'a, E> {
    eps: &'a [E],
    idx: &'a [u32],
}

impl<E> View<E> for Sub<'_, E> {
    fn len(&self) -> usize {
        self.idx.len()
    }
    fn get(&self, i: usize) -> Option<&E> {
        self.eps.get(*self.idx.get(i)? as usize)
    }
    fn index(&self, i: usize) -> usize {
        self.idx.get(i).map_or(usize::MAX, |&x| x as usize)
    }
}

#[derive(Debug)]
enum Kind {
    LeastRequest,
    RoundRobin,
    Random,
    Weighted(Schedule),
    ConsistentHash(Maglev),
}

/// One algorithm's state over one view.
#[derive(Debug)]
struct Picker {
    kind: Kind,
    counter: AtomicUsize,
}

#[derive(Debug)]
struct Local {
    idx: Box<[u32]>,
    picker: Picker,
    min_healthy_percent: u32,
    /// `(ms since base + 1) << 1 | prefer local`; 0 before the first count.
    decision: AtomicU64,
    base: Instant,
}

/// Chooses endpoints of one set, per the service's policy.
#[derive(Debug)]
pub struct Balancer {
    algorithm: LbAlgorithm,
    len: usize,
    all: Picker,
    local: Option<Local>,
}

impl Picker {
    /// The picker of `algorithm` over `eps`; a consistent hash over more endpoints than a
    /// Maglev table holds falls back to least request, and says why.
    fn new<E: Candidate>(
        algorithm: LbAlgorithm,
        eps: &impl View<E>,
    ) -> (Self, Option<TooManyEndpoints>) {
        let endpoints = || (0..eps.len()).filter_map(|i| eps.get(i));
        let mut fell_back = None;
        let kind = match algorithm {
            LbAlgorithm::LeastRequest => Kind::LeastRequest,
            LbAlgorithm::RoundRobin => Kind::RoundRobin,
            LbAlgorithm::Random => Kind::Random,
            LbAlgorithm::Weighted => {
                let weights: Vec<u32> = endpoints().map(|e| e.weight()).collect();
                Kind::Weighted(Schedule::new(&weights))
            }
            LbAlgorithm::ConsistentHash => {
                let ids: Vec<u64> = endpoints().map(|e| e.hash_id()).collect();
                match Maglev::new(&ids) {
                    Ok(table) => Kind::ConsistentHash(table),
                    Err(e) => {
                        fell_back = Some(e);
                        Kind::LeastRequest
                    }
                }
            }
        };
        let picker = Self {
            kind,
            counter: AtomicUsize::new(0),
        };
        (picker, fell_back)
    }

    fn pick<E: Candidate>(
        &self,
        v: &impl View<E>,
        key: Option<u64>,
        now: Instant,
        ok: &impl Fn(&E) -> bool,
    ) -> Option<usize> {
        let n = v.len();
        if n == 0 {
            return None;
        }
        // Eligible, and past the slow-start coin.
        let take = |i: usize| {
            v.get(i).is_some_and(|e| {
                ok(e) && {
                    let r = e.ramp(now);
                    r >= 1.0 || fastrand::f64() < r
                }
            })
        };
        let i = match &self.kind {
            Kind::LeastRequest => p2c(v, now, ok),
            Kind::RoundRobin => {
                let start = self.counter.fetch_add(1, Relaxed) % n;
                if take(start) {
                    Some(start)
                } else {
                    draw(n, &take).or_else(|| scan(n, |i| v.get(i).is_some_and(ok)))
                }
            }
            Kind::Random => draw(n, &take).or_else(|| scan(n, |i| v.get(i).is_some_and(ok))),
            Kind::Weighted(s) => {
                let turn = self.counter.fetch_add(1, Relaxed);
                let slot_ok = |t: usize| s.at(t).filter(|&i| take(i));
                // A random slot of the cycle is a weighted random endpoint.
                slot_ok(turn)
                    .or_else(|| (0..DRAWS).find_map(|_| slot_ok(fastrand::usize(..s.len().max(1)))))
                    .or_else(|| scan_weighted(v, ok))
            }
            Kind::ConsistentHash(m) => match key {
                None => p2c(v, now, ok),
                Some(k) => {
                    let eligible = |i: usize| v.get(i).is_some_and(ok);
                    m.lookup(k, MAGLEV_PROBES, eligible).or_else(|| {
                        // Deterministic for the key: the next eligible endpoint in order.
                        let start = (k % n as u64) as usize;
                        (0..n).map(|j| (start + j) % n).find(|&i| eligible(i))
                    })
                }
            },
        }?;
        Some(v.index(i))
    }
}

/// Up to [`DRAWS`] uniform draws, the first that `take` accepts.
#[inline]
fn draw(n: usize, take: &impl Fn(usize) -> bool) -> Option<usize> {
    (0..DRAWS).map(|_| fastrand::usize(..n)).find(|&i| take(i))
}

/// A uniformly random eligible endpoint, in one pass (reservoir sampling).
fn scan(n: usize, eligible: impl Fn(usize) -> bool) -> Option<usize> {
    let mut chosen = None;
    for (seen, i) in (0..n).filter(|&i| eligible(i)).enumerate() {
        if fastrand::usize(..=seen) == 0 {
            chosen = Some(i);
        }
    }
    chosen
}

/// A weighted random eligible endpoint, in two passes.
fn scan_weighted<E: Candidate>(v: &impl View<E>, ok: &impl Fn(&E) -> bool) -> Option<usize> {
    let weight = |i: usize| {
        v.get(i)
            .filter(|e| ok(e))
            .map_or(0, |e| u64::from(e.weight()))
    };
    let total: u64 = (0..v.len()).map(weight).sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(..total);
    (0..v.len()).find(|&i| {
        let w = weight(i);
        if r < w {
            true
        } else {
            r -= w;
            false
        }
    })
}

/// Power of two choices over cost ÷ ramp.
fn p2c<E: Candidate>(v: &impl View<E>, now: Instant, ok: &impl Fn(&E) -> bool) -> Option<usize> {
    let n = v.len();
    let eligible = |i: usize| v.get(i).is_some_and(ok);
    let (a, b) = if n == 1 {
        (eligible(0).then_some(0)?, None)
    } else {
        let a = draw(n, &eligible);
        let b = a.and_then(|a| draw(n, &|i| i != a && eligible(i)));
        match (a, b) {
            (Some(a), Some(b)) => (a, Some(b)),
            // Most of the set is ineligible: two random eligible ones, from scans.
            _ => {
                let a = scan(n, eligible)?;
                (a, scan(n, |i| i != a && eligible(i)))
            }
        }
    };
    let Some(b) = b else { return Some(a) };
    let cost = |i: usize| {
        v.get(i).map_or(f64::INFINITY, |e| {
            e.load().cost(now) / e.ramp(now).clamp(0.01, 1.0)
        })
    };
    Some(if cost(b) < cost(a) { b } else { a })
}

impl Balancer {
    /// Builds the balancer of `eps` (the ready endpoints, in the order picks will index) at
    /// `now`.
    pub fn new<E: Candidate>(
        cfg: &BalanceConfig,
        eps: &[E],
        now: Instant,
    ) -> Result<Self, TooManyEndpoints> {
        match Self::new_or_fallback(cfg, eps, now) {
            (b, None) => Ok(b),
            (_, Some(e)) => Err(e),
        }
    }

    /// Like [`Balancer::new`], but never fails: a consistent hash that cannot be built
    /// (more endpoints than a Maglev table holds) balances by least request instead, and
    /// the reason comes back for the caller to report.
    pub fn new_or_fallback<E: Candidate>(
        cfg: &BalanceConfig,
        eps: &[E],
        now: Instant,
    ) -> (Self, Option<TooManyEndpoints>) {
        // The same-zone subset is never larger than the set: if its table cannot be
        // built, neither can the whole set's, and the whole set's reason is reported.
        let (all, fell_back) = Picker::new(cfg.algorithm, &All(eps));
        let local = match &cfg.locality {
            Some(loc) => {
                let idx: Box<[u32]> = (0..eps.len() as u32)
                    .filter(|&i| eps[i as usize].zone() == Some(&*loc.zone))
                    .collect();
                if idx.is_empty() {
                    None
                } else {
                    let (picker, _) = Picker::new(cfg.algorithm, &Sub { eps, idx: &idx });
                    Some(Local {
                        idx,
                        picker,
                        min_healthy_percent: loc.min_healthy_percent,
                        decision: AtomicU64::new(0),
                        base: now,
                    })
                }
            }
            None => None,
        };
        let algorithm = match fell_back {
            Some(_) => LbAlgorithm::LeastRequest,
            None => cfg.algorithm,
        };
        let balancer = Self {
            algorithm,
            len: eps.len(),
            all,
            local,
        };
        (balancer, fell_back)
    }

    pub fn algorithm(&self) -> LbAlgorithm {
        self.algorithm
    }

    /// The same-zone endpoints (indices of the set), when locality is on.
    pub fn same_zone(&self) -> Option<&[u32]> {
        self.local.as_ref().map(|l| &*l.idx)
    }

    /// The index in `eps` of the endpoint for the next request, or `None` when no endpoint
    /// is `eligible`. `eps` must be the set the balancer was built for; `key` is the
    /// consistent-hash key (ignored by the other algorithms).
    pub fn pick<E: Candidate>(
        &self,
        eps: &[E],
        key: Option<u64>,
        now: Instant,
        eligible: impl Fn(&E) -> bool,
    ) -> Option<usize> {
        if eps.len() != self.len {
            debug_assert!(false, "picked from a set of another size");
            return None;
        }
        if let Some(local) = &self.local
            && self.prefers_local(local, eps, now, &eligible)
        {
            let sub = Sub {
                eps,
                idx: &local.idx,
            };
            if let Some(i) = local.picker.pick(&sub, key, now, &eligible) {
                return Some(i);
            }
        }
        self.all.pick(&All(eps), key, now, &eligible)
    }

    /// Would a pick at `now` stay in this proxy's zone? (For `/endpoints` and route
    /// explanations as much as for picks.)
    pub fn stays_in_zone<E: Candidate>(
        &self,
        eps: &[E],
        now: Instant,
        eligible: impl Fn(&E) -> bool,
    ) -> bool {
        self.local
            .as_ref()
            .is_some_and(|l| self.prefers_local(l, eps, now, &eligible))
    }

    fn prefers_local<E: Candidate>(
        &self,
        local: &Local,
        eps: &[E],
        now: Instant,
        eligible: &impl Fn(&E) -> bool,
    ) -> bool {
        let now_ms = now.saturating_duration_since(local.base).as_millis() as u64 + 1;
        let d = local.decision.load(Relaxed);
        if d != 0 && now_ms.saturating_sub(d >> 1) < LOCALITY_RECOUNT.as_millis() as u64 {
            return d & 1 == 1;
        }
        let healthy = local
            .idx
            .iter()
            .filter(|&&i| eps.get(i as usize).is_some_and(eligible))
            .count();
        let prefer = healthy > 0
            && healthy as u64 * 100
                >= u64::from(local.min_healthy_percent) * local.idx.len() as u64;
        local
            .decision
            .store((now_ms << 1) | u64::from(prefer), Relaxed);
        prefer
    }
}

#[cfg(test)]
mod tests;
