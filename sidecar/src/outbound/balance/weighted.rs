//! Smooth weighted round robin: over one cycle of `W = Σ weights` picks each endpoint gets
//! exactly its weight, spread evenly through the cycle (nginx's property: at every point of
//! the cycle each endpoint is within about one pick of its share; weights 5:1:1 give
//! `a a a b c a a`, never `a a a a a b c`).
//!
//! The cycle is computed once per endpoint set, and a pick is an atomic increment and an
//! array read. It is built as an earliest-deadline-first schedule (Envoy's weighted round
//! robin is one too): endpoint `i`'s `k`-th turn is due at `(k + ½) / wᵢ`, and the cycle lists
//! turns by due time (ties: heavier first). That spreads turns as evenly as nginx's loop
//! (the sequences differ in ties) and costs `O(W log N)` instead of its `O(W · N)`.
//!
//! Weights are divided by their greatest common divisor. When the cycle would still be
//! longer than `max(1024, 16 × N)` slots, the weights are scaled down to fit (rounded, at
//! least 1): the shares then match the weights within about `N / (2 × cycle)`.

use std::{cmp::Reverse, collections::BinaryHeap};

/// The cycle of one endpoint set.
#[derive(Clone)]
pub struct Schedule {
    slots: Box<[u32]>,
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("len", &self.slots.len())
            .finish()
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The longest cycle for `n` endpoints.
pub fn max_cycle(n: usize) -> u64 {
    (16 * n as u64).max(1024)
}

/// Due time of turn `k` of an endpoint of weight `w`, as a fraction compared exactly:
/// `(2k + 1) / 2w`. Kept as (numerator, denominator).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Due {
    num: u64,
    den: u64,
    idx: u32,
}

impl Ord for Due {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // a/b < c/d ⇔ a·d < c·b (values fit in u128). Ties go to the heavier endpoint
        // (it falls behind its share fastest), then to the lower index.
        (u128::from(self.num) * u128::from(o.den))
            .cmp(&(u128::from(o.num) * u128::from(self.den)))
            .then(o.den.cmp(&self.den))
            .then(self.idx.cmp(&o.idx))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Schedule {
    /// The cycle for these weights (endpoint order). Endpoints of weight 0 never appear;
    /// all zero (or none) gives an empty cycle.
    pub fn new(weights: &[u32]) -> Self {
        let g = weights
            .iter()
            .fold(0u64, |g, &w| gcd(g, u64::from(w)))
            .max(1);
        let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x) / g).collect();
        let total: u64 = w.iter().sum();
        let cap = max_cycle(weights.len());
        if total > cap {
            let scale = cap as f64 / total as f64;
            for x in w.iter_mut().filter(|x| **x > 0) {
                *x = ((*x as f64 * scale).round() as u64).max(1);
            }
        }
        let total: u64 = w.iter().sum();
        let mut heap: BinaryHeap<Reverse<Due>> = w
            .iter()
            .enumerate()
            .filter(|(_, x)| **x > 0)
            .map(|(i, &x)| {
                Reverse(Due {
                    num: 1,
                    den: 2 * x,
                    idx: i as u32,
                })
            })
            .collect();
        let mut slots = Vec::with_capacity(total as usize);
        while let Some(Reverse(d)) = heap.pop() {
            slots.push(d.idx);
            if d.num.div_ceil(2) < w[d.idx as usize] {
                heap.push(Reverse(Due {
                    num: d.num + 2,
                    ..d
                }));
            }
        }
        Self {
            slots: slots.into_boxed_slice(),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The endpoint of turn `n` (taken modulo the cycle).
    #[inline]
    pub fn at(&self, n: usize) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        self.slots.get(n % self.slots.len()).map(|&i| i as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(s: &Schedule, n: usize, picks: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for k in 0..picks {
            c[s.at(k).expect("non-empty")] += 1;
        }
        c
    }

    #[test]
    fn one_cycle_gives_each_exactly_its_weight() {
        let s = Schedule::new(&[1, 2, 3]);
        assert_eq!(s.len(), 6);
        assert_eq!(counts(&s, 3, 600), vec![100, 200, 300]);
        let s = Schedule::new(&[100, 200, 300]);
        assert_eq!(s.len(), 6, "divided by the gcd");
    }

    #[test]
    fn turns_are_spread_like_nginx() {
        let s = Schedule::new(&[5, 1, 1]);
        let seq: Vec<usize> = (0..7).map(|k| s.at(k).expect("slot")).collect();
        // Due times 1/10 3/10 5/10 7/10 9/10 for a, 1/2 for b and c (ties: heavier first).
        assert_eq!(seq, vec![0, 0, 0, 1, 2, 0, 0]);
        // Every prefix of the cycle is within about one turn of each endpoint's share.
        let w = [5u32, 1, 1, 3, 7];
        let s = Schedule::new(&w);
        let total: u32 = w.iter().sum();
        let mut c = [0f64; 5];
        for k in 0..s.len() {
            c[s.at(k).expect("slot")] += 1.0;
            for (i, &wi) in w.iter().enumerate() {
                let share = (k + 1) as f64 * f64::from(wi) / f64::from(total);
                assert!((c[i] - share).abs() < 1.5, "prefix {k}, endpoint {i}");
            }
        }
    }

    #[test]
    fn zero_weights_and_huge_weights() {
        assert!(Schedule::new(&[]).is_empty());
        assert!(Schedule::new(&[0, 0]).is_empty());
        assert_eq!(Schedule::new(&[]).at(3), None);
        let s = Schedule::new(&[0, 1]);
        assert!((0..10).all(|k| s.at(k) == Some(1)));
        // 1,000 endpoints of weights 1..=1000 (W = 500,500) fit in 16,000 slots, and keep
        // their proportions.
        let w: Vec<u32> = (1..=1000).collect();
        let s = Schedule::new(&w);
        assert!(s.len() as u64 <= max_cycle(1000) + 1000);
        let c = counts(&s, 1000, s.len());
        assert!(c[999] > 25 * c[39], "{} vs {}", c[999], c[39]);
        assert!(c.iter().all(|&x| x >= 1));
    }
}
