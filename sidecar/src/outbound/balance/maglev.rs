//! Maglev consistent hashing (Eisenbud et al., NSDI 2016; Envoy's `MAGLEV` load balancer).
//!
//! Each endpoint has a permutation of the table's slots, derived from two hashes of its
//! stable id (`offset`, `skip`); endpoints take turns claiming their next preferred free
//! slot until the table is full. Every endpoint ends up with `M/N` slots (±1), and
//! removing one of N endpoints moves only about `1/N` of the slots, because the others'
//! preferences are unchanged. A key's endpoint is `table[key mod M]`.
//!
//! The table size `M` is a prime at least 100 × the endpoints (Maglev's bound for a
//! disruption near 1/N), taken from a fixed list (65,537 up to 655 endpoints, then about
//! doubling) so that it changes rarely: a change of `M` remaps every key. Slots are `u16`
//! (128 KiB for the first size), so a set holds at most 65,535 endpoints.

use super::hash::mix64;

/// Table sizes: primes just above successive powers of two, from 2^16.
const SIZES: [usize; 7] = [
    65_537, 131_101, 262_147, 524_309, 1_048_583, 2_097_169, 4_194_319,
];

/// The most endpoints one table can hold.
pub const MAX_ENDPOINTS: usize = u16::MAX as usize;

/// Why a table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("consistent hashing over {0} endpoints: at most {MAX_ENDPOINTS} are supported")]
pub struct TooManyEndpoints(pub usize);

/// A built Maglev lookup table.
#[derive(Clone)]
pub struct Maglev {
    table: Box<[u16]>,
}

impl std::fmt::Debug for Maglev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maglev")
            .field("size", &self.table.len())
            .finish()
    }
}

/// The table size for `n` endpoints.
pub fn table_size(n: usize) -> usize {
    SIZES
        .iter()
        .copied()
        .find(|&m| m >= n.saturating_mul(100))
        .unwrap_or(SIZES[SIZES.len() - 1])
}

impl Maglev {
    /// Builds the table for endpoints with these stable ids (in endpoint order). An empty
    /// set gives an empty table, whose lookups find nothing.
    pub fn new(ids: &[u64]) -> Result<Self, TooManyEndpoints> {
        let n = ids.len();
        if n > MAX_ENDPOINTS {
            return Err(TooManyEndpoints(n));
        }
        if n == 0 {
            return Ok(Self {
                table: Box::new([]),
            });
        }
        let m = table_size(n);
        let mut table = vec![0u16; m];
        // Which slots are taken: a bitset small enough for L1 (16 KiB for 131,101 slots),
        // so the ~M·ln M probes of the build rarely touch the table itself.
        let mut taken = vec![0u64; m.div_ceil(64)];
        // Each endpoint's next preferred slot, advanced by its skip.
        let mut next: Vec<(u32, u32)> = ids
            .iter()
            .map(|&id| {
                let offset = (id % m as u64) as u32;
                let skip = (mix64(id ^ 0x5bd1_e995) % (m as u64 - 1) + 1) as u32;
                (offset, skip)
            })
            .collect();
        let m32 = m as u32;
        let mut filled = 0;
        'fill: loop {
            for (i, (slot, skip)) in next.iter_mut().enumerate() {
                loop {
                    let s = *slot as usize;
                    *slot += *skip;
                    if *slot >= m32 {
                        *slot -= m32;
                    }
                    let (word, bit) = (s / 64, 1u64 << (s % 64));
                    if taken[word] & bit == 0 {
                        taken[word] |= bit;
                        table[s] = i as u16;
                        break;
                    }
                }
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Ok(Self {
            table: table.into_boxed_slice(),
        })
    }

    /// The table size (0 for an empty set).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The endpoint index for `key`, or the first eligible one found probing the next
    /// slots: an ineligible endpoint's keys spread over the others, and every other key
    /// stays where it was. After `max_probes` slots, `None` (the caller falls back).
    #[inline]
    pub fn lookup(
        &self,
        key: u64,
        max_probes: usize,
        mut eligible: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        let m = self.table.len();
        if m == 0 {
            return None;
        }
        let mut s = (key % m as u64) as usize;
        for _ in 0..max_probes.min(m) {
            let i = usize::from(self.table[s]);
            if eligible(i) {
                return Some(i);
            }
            s += 1;
            if s == m {
                s = 0;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::balance::hash::hash_bytes;

    fn ids(n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| hash_bytes(0, format!("10.0.{}.{}:80", i / 250, i % 250).as_bytes()))
            .collect()
    }

    #[test]
    fn slots_are_shared_evenly() {
        for n in [1, 3, 10, 100, 1000] {
            let t = Maglev::new(&ids(n)).expect("fits");
            assert_eq!(t.len(), table_size(n));
            assert!(t.len() >= 100 * n);
            let mut counts = vec![0usize; n];
            for &e in t.table.iter() {
                counts[usize::from(e)] += 1;
            }
            let (lo, hi) = (t.len() / n, t.len().div_ceil(n));
            assert!(
                counts.iter().all(|&c| c >= lo - 1 && c <= hi + 1),
                "n={n}: {:?}",
                (counts.iter().min(), counts.iter().max())
            );
        }
    }

    #[test]
    fn removing_one_of_ten_moves_about_a_tenth() {
        let all = ids(10);
        let before = Maglev::new(&all).expect("fits");
        let after = Maglev::new(&all[1..]).expect("fits");
        assert_eq!(before.len(), after.len());
        let mut moved = 0;
        for s in 0..before.len() {
            let b = all[usize::from(before.table[s])];
            let a = all[1 + usize::from(after.table[s])];
            if a != b {
                moved += 1;
            }
        }
        let share = moved as f64 / before.len() as f64;
        assert!(share <= 0.1 + 0.05, "moved {share}");
    }

    #[test]
    fn probing_skips_ineligible_endpoints_only() {
        let t = Maglev::new(&ids(5)).expect("fits");
        let mut moved = 0;
        for key in 0..10_000u64 {
            let k = mix64(key);
            let home = t.lookup(k, 1, |_| true).expect("a slot");
            let got = t.lookup(k, 64, |i| i != 2).expect("eligible");
            assert_ne!(got, 2);
            if home != 2 {
                assert_eq!(got, home, "a key of an eligible endpoint stays");
            } else {
                moved += 1;
            }
        }
        assert!((1500..2500).contains(&moved), "{moved}");
        assert_eq!(t.lookup(1, 64, |_| false), None);
    }

    #[test]
    fn limits() {
        assert!(Maglev::new(&[]).expect("empty").is_empty());
        assert_eq!(
            Maglev::new(&[]).expect("empty").lookup(1, 8, |_| true),
            None
        );
        assert_eq!(
            Maglev::new(&vec![0; MAX_ENDPOINTS + 1]).map(|_| ()),
            Err(TooManyEndpoints(MAX_ENDPOINTS + 1))
        );
        assert_eq!(table_size(655), 65_537);
        assert_eq!(table_size(656), 131_101);
        assert_eq!(table_size(1000), 131_101);
    }
}
