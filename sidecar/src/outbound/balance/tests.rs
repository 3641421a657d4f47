//! Distribution tests of the balancer, with seeded randomness and simulated time.

use std::collections::{BTreeMap, HashMap};

use super::*;

#[derive(Debug)]
struct Ep {
    load: Load,
    weight: u32,
    id: u64,
    zone: Option<&'static str>,
    ramp: f64,
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
        self.zone
    }
    fn ramp(&self, _: Instant) -> f64 {
        self.ramp
    }
}

fn ep(i: usize, t0: Instant) -> Ep {
    let addr = format!("10.{}.{}.{}:8080", 1 + i / 62_500, i / 250 % 250, i % 250)
        .parse()
        .expect("addr");
    Ep {
        load: Load::new(t0),
        weight: 1,
        id: hash::endpoint_id(addr),
        zone: None,
        ramp: 1.0,
    }
}

fn eps(n: usize, t0: Instant) -> Vec<Ep> {
    (0..n).map(|i| ep(i, t0)).collect()
}

fn cfg(algorithm: LbAlgorithm) -> BalanceConfig {
    BalanceConfig {
        algorithm,
        locality: None,
    }
}

const ALL: [LbAlgorithm; 5] = [
    LbAlgorithm::LeastRequest,
    LbAlgorithm::RoundRobin,
    LbAlgorithm::Random,
    LbAlgorithm::Weighted,
    LbAlgorithm::ConsistentHash,
];

fn counts(
    b: &Balancer,
    set: &[Ep],
    picks: usize,
    key: impl Fn(usize) -> Option<u64>,
    ok: impl Fn(&Ep) -> bool,
) -> Vec<usize> {
    let now = Instant::now();
    let mut c = vec![0; set.len()];
    for k in 0..picks {
        c[b.pick(set, key(k), now, &ok).expect("an eligible endpoint")] += 1;
    }
    c
}

#[test]
fn round_robin_is_even() {
    let t0 = Instant::now();
    let set = eps(3, t0);
    let b = Balancer::new(&cfg(LbAlgorithm::RoundRobin), &set, t0).expect("built");
    let c = counts(&b, &set, 300, |_| None, |_| true);
    assert!(c.iter().all(|&x| (95..=105).contains(&x)), "{c:?}");
}

#[test]
fn random_is_roughly_even() {
    fastrand::seed(11);
    let t0 = Instant::now();
    let set = eps(4, t0);
    let b = Balancer::new(&cfg(LbAlgorithm::Random), &set, t0).expect("built");
    let c = counts(&b, &set, 4000, |_| None, |_| true);
    assert!(c.iter().all(|&x| (900..=1100).contains(&x)), "{c:?}");
}

#[test]
fn weighted_follows_weights() {
    let t0 = Instant::now();
    let mut set = eps(3, t0);
    for (e, w) in set.iter_mut().zip([1, 2, 3]) {
        e.weight = w;
    }
    let b = Balancer::new(&cfg(LbAlgorithm::Weighted), &set, t0).expect("built");
    let c = counts(&b, &set, 600, |_| None, |_| true);
    for (got, want) in c.iter().zip([100.0, 200.0, 300.0]) {
        assert!((*got as f64 - want).abs() <= want * 0.1, "{c:?}");
    }
}

#[test]
fn consistent_hash_is_sticky_and_moves_few_keys() {
    fastrand::seed(12);
    let t0 = Instant::now();
    let set = eps(10, t0);
    let b = Balancer::new(&cfg(LbAlgorithm::ConsistentHash), &set, t0).expect("built");
    let key = hash::hash_bytes(0, b"user-42");
    let first = b.pick(&set, Some(key), t0, |_| true).expect("picked");
    for _ in 0..1000 {
        assert_eq!(b.pick(&set, Some(key), t0, |_| true), Some(first));
    }
    // One of ten endpoints leaves: at most 1/10 + 5 % of 10,000 keys move.
    let fewer: Vec<Ep> = set
        .iter()
        .filter(|e| e.id != set[3].id)
        .map(|e| Ep {
            load: Load::new(t0),
            ..*e
        })
        .collect();
    let b2 = Balancer::new(&cfg(LbAlgorithm::ConsistentHash), &fewer, t0).expect("built");
    let mut moved = 0;
    for k in 0..10_000u64 {
        let key = hash::hash_bytes(1, &k.to_le_bytes());
        let before = set[b.pick(&set, Some(key), t0, |_| true).expect("p")].id;
        let after = fewer[b2.pick(&fewer, Some(key), t0, |_| true).expect("p")].id;
        moved += usize::from(before != after);
    }
    assert!(moved <= 1500, "{moved} of 10000 keys moved");
    // Without a key, consistent hashing balances by least request.
    assert!(b.pick(&set, None, t0, |_| true).is_some());
}

#[test]
fn no_algorithm_picks_an_ineligible_endpoint() {
    fastrand::seed(13);
    let t0 = Instant::now();
    let mut set = eps(50, t0);
    for (i, e) in set.iter_mut().enumerate() {
        e.weight = 1 + (i as u32 % 3);
    }
    let bad = |e: &Ep| e.id % 10 < 3; // ~30 % ineligible
    let only_two = |e: &Ep| e.id == set[7].id || e.id == set[31].id; // 96 % ineligible
    for alg in ALL {
        let b = Balancer::new(&cfg(alg), &set, t0).expect("built");
        for (name, ok) in [
            ("30 % out", &(|e: &Ep| !bad(e)) as &dyn Fn(&Ep) -> bool),
            ("2 left", &only_two),
        ] {
            let c = counts(&b, &set, 3000, |k| Some(k as u64 * 7919), ok);
            for (i, n) in c.iter().enumerate() {
                assert!(
                    *n == 0 || ok(&set[i]),
                    "{alg:?} ({name}) picked endpoint {i}"
                );
            }
            assert!(c.iter().filter(|&&n| n > 0).count() >= 2, "{alg:?} {name}");
        }
        assert_eq!(b.pick(&set, Some(1), t0, |_| false), None, "{alg:?}");
        assert_eq!(
            Balancer::new(&cfg(alg), &eps(0, t0), t0)
                .expect("built")
                .pick(&eps(0, t0), Some(1), t0, |_| true),
            None
        );
    }
}

/// Simulates `seconds` of requests arriving every 2 ms; endpoint `i` answers in
/// `latency(i)`. Returns the picks per endpoint.
fn simulate(
    b: &Balancer,
    set: &[Ep],
    t0: Instant,
    latency: impl Fn(usize) -> Duration,
) -> Vec<usize> {
    let mut c = vec![0; set.len()];
    // Completion time → guards finishing then.
    let mut pending: BTreeMap<Instant, Vec<InFlight<&Ep>>> = BTreeMap::new();
    let mut now = t0;
    for _ in 0..5000 {
        now += Duration::from_millis(2);
        while let Some(entry) = pending.first_entry() {
            if *entry.key() > now {
                break;
            }
            let (at, guards) = entry.remove_entry();
            for g in guards {
                g.finish(at);
            }
        }
        let i = b.pick(set, None, now, |_| true).expect("picked");
        c[i] += 1;
        pending
            .entry(now + latency(i))
            .or_default()
            .push(InFlight::start(&set[i], now));
    }
    c
}

#[test]
fn least_request_avoids_a_slow_endpoint() {
    fastrand::seed(14);
    let t0 = Instant::now();
    let set = eps(3, t0);
    let b = Balancer::new(&cfg(LbAlgorithm::LeastRequest), &set, t0).expect("built");
    let c = simulate(&b, &set, t0, |i| {
        Duration::from_millis(if i == 2 { 100 } else { 10 })
    });
    let share = c[2] as f64 / c.iter().sum::<usize>() as f64;
    assert!(share < 0.2, "slow endpoint got {share:.3} ({c:?})");
    // Round robin, for contrast, gives it a third.
    let rr = Balancer::new(&cfg(LbAlgorithm::RoundRobin), &set, t0).expect("built");
    let c = simulate(&rr, &set, t0, |i| {
        Duration::from_millis(if i == 2 { 100 } else { 10 })
    });
    assert!((1600..=1700).contains(&c[2]), "{c:?}");
}

#[test]
fn ramping_endpoints_get_a_smaller_share() {
    fastrand::seed(15);
    let t0 = Instant::now();
    let mut set = eps(4, t0);
    set[0].ramp = 0.1;
    for alg in [
        LbAlgorithm::LeastRequest,
        LbAlgorithm::RoundRobin,
        LbAlgorithm::Random,
        LbAlgorithm::Weighted,
    ] {
        let b = Balancer::new(&cfg(alg), &set, t0).expect("built");
        let c = counts(&b, &set, 4000, |_| None, |_| true);
        // Settled endpoints get ~1/4 each (1,000); the ramping one far less.
        assert!(c[0] < 400, "{alg:?}: {c:?}");
        assert!(
            c[0] > 0 || alg == LbAlgorithm::LeastRequest,
            "{alg:?}: {c:?}"
        );
    }
}

fn zoned(t0: Instant) -> Vec<Ep> {
    let mut set = eps(10, t0);
    for (i, e) in set.iter_mut().enumerate() {
        e.zone = Some(if i % 2 == 0 { "zone-a" } else { "zone-b" });
    }
    set
}

#[test]
fn locality_stays_in_zone_while_healthy_and_spills_otherwise() {
    fastrand::seed(16);
    let t0 = Instant::now();
    let set = zoned(t0);
    let mut config = BalanceConfig::from_policy(
        Some(&LoadBalancer {
            algorithm: LbAlgorithm::RoundRobin,
            consistent_hash: None,
            locality: Some(remora_crds::policy::Locality {
                prefer_same_zone: true,
                ..Default::default()
            }),
        }),
        Some("zone-a"),
    );
    assert_eq!(
        config.locality.as_ref().map(|l| l.min_healthy_percent),
        Some(70)
    );
    for alg in ALL {
        config.algorithm = alg;
        let b = Balancer::new(&config, &set, t0).expect("built");
        assert_eq!(b.same_zone(), Some(&[0u32, 2, 4, 6, 8][..]));
        let mut now = t0;
        let zone_picks = |now: Instant, ok: &dyn Fn(&Ep) -> bool| {
            let mut by_zone: HashMap<&str, usize> = HashMap::new();
            for k in 0..1000u64 {
                let i = b.pick(&set, Some(k * 31), now, ok).expect("picked");
                assert!(ok(&set[i]));
                *by_zone.entry(set[i].zone.unwrap_or("")).or_default() += 1;
            }
            by_zone
        };
        let healthy = zone_picks(now, &|_| true);
        assert_eq!(healthy.get("zone-a"), Some(&1000), "{alg:?}: {healthy:?}");
        // 4 of 5 same-zone endpoints eligible (80 % ≥ 70 %): still in zone.
        now += LOCALITY_RECOUNT;
        let one_out = |e: &Ep| e.id != set[0].id;
        assert_eq!(
            zone_picks(now, &one_out).get("zone-a"),
            Some(&1000),
            "{alg:?}"
        );
        // 3 of 5 (60 %): spill over to every eligible endpoint.
        now += LOCALITY_RECOUNT;
        let two_out = |e: &Ep| e.id != set[0].id && e.id != set[2].id;
        assert!(!b.stays_in_zone(&set, now, two_out));
        let spilled = zone_picks(now, &two_out);
        assert!(
            spilled.get("zone-b").copied().unwrap_or(0) > 300,
            "{alg:?}: {spilled:?}"
        );
        // Healthy again: back in zone.
        now += LOCALITY_RECOUNT;
        assert_eq!(zone_picks(now, &|_| true).get("zone-a"), Some(&1000));
    }
    // No zone of our own, or nobody in it: no preference.
    let none = BalanceConfig::from_policy(None, Some("zone-a"));
    assert_eq!(none.locality, None);
    config.locality = Some(LocalityConfig {
        zone: Arc::from("zone-z"),
        min_healthy_percent: 70,
    });
    assert_eq!(
        Balancer::new(&config, &set, t0).expect("built").same_zone(),
        None
    );
}

#[test]
fn too_many_endpoints_for_maglev_is_an_error() {
    let t0 = Instant::now();
    let set: Vec<Ep> = (0..maglev::MAX_ENDPOINTS + 1)
        .map(|i| Ep {
            load: Load::new(t0),
            weight: 1,
            id: i as u64,
            zone: None,
            ramp: 1.0,
        })
        .collect();
    let err = Balancer::new(&cfg(LbAlgorithm::ConsistentHash), &set, t0).expect_err("too many");
    assert!(err.to_string().contains("at most 65535"), "{err}");
    assert!(Balancer::new(&cfg(LbAlgorithm::LeastRequest), &set, t0).is_ok());
}

#[test]
fn a_consistent_hash_too_large_for_maglev_falls_back_to_least_request_and_says_why() {
    let t0 = Instant::now();
    let set = eps(maglev::MAX_ENDPOINTS + 1, t0);
    let err = Balancer::new(&cfg(LbAlgorithm::ConsistentHash), &set, t0).expect_err("too many");
    assert_eq!(err.0, maglev::MAX_ENDPOINTS + 1);
    let (b, why) = Balancer::new_or_fallback(&cfg(LbAlgorithm::ConsistentHash), &set, t0);
    assert_eq!(why.map(|e| e.0), Some(maglev::MAX_ENDPOINTS + 1));
    assert_eq!(b.algorithm(), LbAlgorithm::LeastRequest);
    assert!(b.pick(&set, Some(42), t0, |_| true).is_some());
}
