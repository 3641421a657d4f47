//! The cost of the policy algorithms on the data path (criterion): one pick among 1,000
//! endpoints for every algorithm — all eligible, with 10 % ejected, and with locality —
//! the Maglev table build for 1,000 endpoints, and the per-request bookkeeping (load,
//! outlier, breaker, retry budget, rate limit).
//!
//! Targets (issue 11): a pick ≤ 1 µs, a Maglev build ≤ 5 ms. After criterion's report a
//! compact table repeats each figure (a plain timed loop, median of 5 runs) next to its
//! target.
//!
//! `cargo bench -p remora-proxy --bench pick` (part of `make bench`).

use std::{
    hint::black_box,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::Criterion;
use remora_crds::policy::LbAlgorithm;
use remora_proxy::{
    inbound::rate_limit::RateLimiter,
    outbound::{
        balance::{
            BalanceConfig, Balancer, Candidate, HasLoad, InFlight, Load, LocalityConfig, Maglev,
            hash::endpoint_id,
        },
        breaker::{Breaker, BreakerConfig, ErrorRate},
        outlier::{Health, Outcome, OutlierConfig, OutlierDetector},
        retry::Budget,
    },
};

const N: usize = 1000;
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

struct Ep {
    load: Load,
    health: Health,
    id: u64,
    weight: u32,
    zone: &'static str,
}

impl HasLoad for Ep {
    fn load(&self) -> &Load {
        &self.load
    }
}

impl Candidate for Ep {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn hash_id(&self) -> u64 {
        self.id
    }
    fn zone(&self) -> Option<&str> {
        Some(self.zone)
    }
    fn ramp(&self, now: Instant) -> f64 {
        self.health.ramp_factor(now)
    }
}

fn endpoints(now: Instant) -> Vec<Ep> {
    (0..N)
        .map(|i| {
            let addr = SocketAddr::from(([10, 2, (i / 250) as u8, (i % 250) as u8], 8080));
            let ep = Ep {
                load: Load::new(now),
                health: Health::default(),
                id: endpoint_id(addr),
                weight: 1 + (i % 4) as u32,
                zone: ZONES[i % 3],
            };
            // Some history, so costs differ.
            ep.load
                .observe(Duration::from_micros(500 + (i as u64 * 37) % 2000), now);
            ep
        })
        .collect()
}

/// Ejects every 10th endpoint through the detector, as failures would.
fn eject_tenth(set: &[Ep], now: Instant) {
    let d = OutlierDetector::new(
        OutlierConfig {
            consecutive_errors: 1,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(3600),
            max_ejection_percent: 100,
            ramp: Duration::from_secs(10),
        },
        set.len(),
    );
    for ep in set.iter().step_by(10) {
        d.record(&ep.health, Outcome::Response(503), now);
    }
}

const ALGORITHMS: [LbAlgorithm; 5] = [
    LbAlgorithm::LeastRequest,
    LbAlgorithm::RoundRobin,
    LbAlgorithm::Random,
    LbAlgorithm::Weighted,
    LbAlgorithm::ConsistentHash,
];

/// One benchmark case: a name and a closure doing one operation.
type Case = (String, Box<dyn FnMut()>);

fn cases() -> Vec<Case> {
    let now = Instant::now();
    let mut out: Vec<Case> = Vec::new();
    for (variant, ejected, locality) in [
        ("all eligible", false, false),
        ("10% ejected", true, false),
        ("locality", false, true),
    ] {
        let set = Arc::new(endpoints(now));
        if ejected {
            eject_tenth(&set, now);
        }
        for alg in ALGORITHMS {
            let cfg = BalanceConfig {
                algorithm: alg,
                locality: locality.then(|| LocalityConfig {
                    zone: Arc::from(ZONES[0]),
                    min_healthy_percent: 70,
                }),
            };
            let b = Balancer::new(&cfg, &set, now).expect("balancer");
            let set = set.clone();
            let mut key = 0u64;
            out.push((
                format!("pick {alg:?} ({variant})"),
                Box::new(move || {
                    key = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    black_box(b.pick(&set, Some(key), now, |e| e.health.is_available(now)));
                }),
            ));
        }
    }
    let ids: Vec<u64> = endpoints(now).iter().map(|e| e.id).collect();
    out.push((
        "maglev build (1,000 endpoints)".into(),
        Box::new(move || {
            black_box(Maglev::new(black_box(&ids)).expect("table"));
        }),
    ));
    let ep = Arc::new(endpoints(now).swap_remove(0));
    let detector = OutlierDetector::new(
        OutlierConfig {
            consecutive_errors: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            ramp: Duration::from_secs(10),
        },
        N,
    );
    let breaker = Arc::new(Breaker::new(
        BreakerConfig {
            max_requests: 1024,
            error_rate: Some(ErrorRate {
                percent: 50,
                window: Duration::from_secs(30),
                min_requests: 20,
                open_for: Duration::from_secs(30),
            }),
            ..BreakerConfig::default()
        },
        now,
    ));
    let budget = Budget::new(20, now);
    out.push((
        "request bookkeeping (load, outlier, breaker, budget)".into(),
        Box::new(move || {
            let t = Instant::now();
            let admission = breaker.admit(t).expect("closed");
            budget.deposit(t);
            let flight = InFlight::start(ep.clone(), t);
            flight.finish(t);
            detector.record(&ep.health, Outcome::Response(200), t);
            admission.finish(Outcome::Response(200), t);
        }),
    ));
    let limiter = RateLimiter::new(u32::MAX / 2, u32::MAX / 2, false, now);
    out.push((
        "rate limit try_acquire".into(),
        Box::new(move || {
            black_box(limiter.try_acquire(None, Instant::now()).is_ok());
        }),
    ));
    out
}

/// Nanoseconds per call of `f`: the median of 5 timed runs of about 50 ms each.
fn per_call(f: &mut dyn FnMut()) -> f64 {
    let mut n = 1u64;
    loop {
        let t = Instant::now();
        (0..n).for_each(|_| f());
        if t.elapsed() > Duration::from_millis(10) {
            break;
        }
        n *= 2;
    }
    let n = n * 5;
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            (0..n).for_each(|_| f());
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    for (name, mut f) in cases() {
        c.bench_function(&name, |b| b.iter(&mut f));
    }
    c.final_summary();

    println!(
        "\n{:<56} {:>12} {:>10}  ",
        "operation", "per call", "target"
    );
    for (name, mut f) in cases() {
        let ns = per_call(&mut f);
        let (target, unit) = if name.starts_with("maglev") {
            (5_000_000.0, "5 ms")
        } else if name.starts_with("pick") {
            (1_000.0, "1 µs")
        } else {
            (f64::INFINITY, "-")
        };
        let shown = if ns >= 100_000.0 {
            format!("{:.2} ms", ns / 1e6)
        } else {
            format!("{ns:.0} ns")
        };
        let verdict = if ns <= target { "ok" } else { "OVER" };
        let verdict = if target.is_finite() { verdict } else { "" };
        println!("{name:<56} {shown:>12} {unit:>10}  {verdict}");
    }
}
