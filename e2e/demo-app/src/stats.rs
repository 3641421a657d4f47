//! What the load client measures: answers per backend pod, per status and per error,
//! latency percentiles (nearest rank), and the summary printed as one JSON line.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer: its status and the `pod` field of the JSON body, when there was one.
    Answer { status: u16, pod: Option<String> },
    /// No answer: connect failure, reset, timeout... (a short class name).
    Error(String),
}

/// Counters and latencies over a period.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    latencies_us: Vec<u64>,
    by_pod: BTreeMap<String, u64>,
    by_status: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    /// Requests not sent because `concurrency` were already in flight.
    pub skipped: u64,
}

/// A [`Stats`] period, summarised: what the load client prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub requests: u64,
    /// 2xx answers.
    pub ok: u64,
    pub failed: u64,
    /// `ok / requests` in percent (100 when there were no requests).
    pub success_rate: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Answers per backend pod (the `pod` field of its JSON).
    pub by_pod: BTreeMap<String, u64>,
    pub by_status: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    pub skipped: u64,
}

impl Stats {
    pub fn record(&mut self, outcome: &Outcome, latency: Duration) {
        match outcome {
            Outcome::Answer { status, pod } => {
                *self.by_status.entry(*status).or_default() += 1;
                if let Some(p) = pod {
                    *self.by_pod.entry(p.clone()).or_default() += 1;
                }
                self.latencies_us
                    .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
            }
            Outcome::Error(class) => *self.errors.entry(class.clone()).or_default() += 1,
        }
    }

    pub fn merge(&mut self, other: &Stats) {
        self.latencies_us.extend_from_slice(&other.latencies_us);
        for (k, v) in &other.by_pod {
            *self.by_pod.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.by_status {
            *self.by_status.entry(*k).or_default() += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.skipped += other.skipped;
    }

    pub fn requests(&self) -> u64 {
        self.by_status.values().sum::<u64>() + self.errors.values().sum::<u64>()
    }

    pub fn summary(&self) -> Summary {
        let requests = self.requests();
        let ok: u64 = self
            .by_status
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let ms = |us: Option<u64>| us.map_or(0.0, |u| u as f64 / 1000.0);
        Summary {
            requests,
            ok,
            failed: requests - ok,
            success_rate: if requests == 0 {
                100.0
            } else {
                ok as f64 * 100.0 / requests as f64
            },
            p50_ms: ms(percentile(&sorted, 50.0)),
            p90_ms: ms(percentile(&sorted, 90.0)),
            p99_ms: ms(percentile(&sorted, 99.0)),
            max_ms: ms(sorted.last().copied()),
            by_pod: self.by_pod.clone(),
            by_status: self.by_status.clone(),
            errors: self.errors.clone(),
            skipped: self.skipped,
        }
    }
}

/// Nearest-rank percentile of sorted values: the smallest value such that at least `p` %
/// of the values are ≤ it. `None` for no values.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl Summary {
    /// One human line: `1000 req, 99.90 % ok, p50 1.2 ms, p99 8.0 ms | a=500 b=500`.
    pub fn line(&self) -> String {
        let pods: Vec<String> = self
            .by_pod
            .iter()
            .map(|(p, n)| format!("{p}={n}"))
            .collect();
        let mut s = format!(
            "{} req, {:.2} % ok, p50 {:.1} ms, p99 {:.1} ms | {}",
            self.requests,
            self.success_rate,
            self.p50_ms,
            self.p99_ms,
            pods.join(" ")
        );
        if !self.errors.is_empty() || self.failed > 0 {
            let errs: Vec<String> = self
                .by_status
                .iter()
                .filter(|(s, _)| !(200..300).contains(*s))
                .map(|(s, n)| format!("{s}={n}"))
                .chain(self.errors.iter().map(|(e, n)| format!("{e}={n}")))
                .collect();
            s.push_str(&format!(" | failed: {}", errs.join(" ")));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[1, 2, 3, 4], 50.0), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 51.0), Some(3));
        assert_eq!(percentile(&[], 50.0), None);
    }

    fn answer(status: u16, pod: &str) -> Outcome {
        Outcome::Answer {
            status,
            pod: Some(pod.to_owned()),
        }
    }

    #[test]
    fn counts_per_pod_status_and_error() {
        let mut s = Stats::default();
        for i in 0..90 {
            s.record(
                &answer(200, "reviews-v1-a"),
                Duration::from_millis(i % 10 + 1),
            );
        }
        for _ in 0..8 {
            s.record(&answer(200, "reviews-v2-b"), Duration::from_millis(20));
        }
        s.record(&answer(503, "reviews-v2-b"), Duration::from_millis(1));
        s.record(&Outcome::Error("connect".into()), Duration::from_secs(1));
        let sum = s.summary();
        assert_eq!(sum.requests, 100);
        assert_eq!(sum.ok, 98);
        assert_eq!(sum.failed, 2);
        assert!((sum.success_rate - 98.0).abs() < 1e-9);
        assert_eq!(sum.by_pod["reviews-v1-a"], 90);
        assert_eq!(sum.by_pod["reviews-v2-b"], 9);
        assert_eq!(sum.by_status[&503], 1);
        assert_eq!(sum.errors["connect"], 1);
        // 99 latencies: ten of 1 ms (one is the 503's), nine each of 2..=10 ms, eight of
        // 20 ms. Rank 50 of 99 falls among the 6 ms ones (ranks 47..=55).
        assert_eq!(sum.p50_ms, 6.0);
        assert_eq!(sum.p99_ms, 20.0);
        assert_eq!(sum.max_ms, 20.0);
        assert!(
            sum.line().contains("failed: 503=1 connect=1"),
            "{}",
            sum.line()
        );
    }

    #[test]
    fn merging_periods_adds_up() {
        let mut a = Stats::default();
        a.record(&answer(200, "x"), Duration::from_millis(1));
        let mut b = Stats::default();
        b.record(&answer(200, "x"), Duration::from_millis(3));
        b.record(&answer(200, "y"), Duration::from_millis(2));
        b.skipped = 4;
        a.merge(&b);
        let sum = a.summary();
        assert_eq!(sum.requests, 3);
        assert_eq!(sum.by_pod["x"], 2);
        assert_eq!(sum.skipped, 4);
        assert_eq!(sum.max_ms, 3.0);
    }

    #[test]
    fn no_requests_is_not_a_failure_and_serialises() {
        let sum = Stats::default().summary();
        assert_eq!(sum.success_rate, 100.0);
        let json = serde_json::to_value(&sum).expect("json");
        assert_eq!(json["requests"], 0);
        assert!(json["by_pod"].as_object().is_some_and(|m| m.is_empty()));
    }
}
