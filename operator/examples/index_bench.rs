//! Times the discovery index's recomputation on a synthetic cluster and prints a table:
//! `cargo run --release -p remora-operator --example index_bench [services]
//! [endpoints-per-service]` (defaults 1000 × 10): the first (full) computation, then after
//! one EndpointSlice event and after one event for every Service, each both incrementally
//! (what the index does) and deriving everything (what it did before).

#[path = "common/synthetic.rs"]
mod synthetic;

use std::time::{Duration, Instant};

use remora_operator::index::{
    Index,
    dirty::Relations,
    feed::{Feed, Obj, Update},
    model::ObjKey,
    version::Versioner,
};
use synthetic::snapshot;

fn arg(n: usize, default: u32) -> u32 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// Flips the readiness of one endpoint of `svc-0` … `svc-<n-1>` through watch events, then
/// times the recomputation: (time, pieces changed).
fn round(index: &mut Index, feed: &mut Feed, n: u32, now: u64) -> (Duration, usize) {
    for i in 0..n {
        let key = ObjKey::new("bench", format!("svc-{i}-abc"));
        let Some(mut slice) = index.snapshot().slices.get(&key).cloned() else {
            continue;
        };
        if let Some(e) = slice.endpoints.first_mut() {
            e.ready = !e.ready;
        }
        index.apply(feed, Update::Upsert(Obj::EndpointSlice(key, Some(slice))));
    }
    let t = Instant::now();
    let changes = index.recompute(now);
    (t.elapsed(), changes.outbound.len() + changes.inbound.len())
}

/// The median of `runs` rounds.
fn median(index: &mut Index, feed: &mut Feed, n: u32, now: &mut u64) -> (Duration, usize) {
    let mut times: Vec<(Duration, usize)> = (0..9)
        .map(|_| {
            *now += 1;
            round(index, feed, n, *now)
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Resident memory of this process, from /proc/self/status (MiB).
fn rss() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let (services, per_service) = (arg(1, 1000), arg(2, 10));
    let rss_start = rss();
    let mut index = Index::new(snapshot(services, per_service), Versioner::default());
    let rss_snapshot = rss();
    let mut feed = Feed::default();
    let t = Instant::now();
    let first = index.recompute(1);
    let full = t.elapsed();
    let rss_index = rss();
    // The relations incremental recomputation keeps, built once more on their own.
    let relations = Relations::of(index.snapshot());
    let rss_relations = rss() - rss_index;
    drop(relations);
    let mut now = 1;

    println!(
        "| services × endpoints | pieces (out/in) | first computation | recompute | one Service's slice changes (pieces changed) | every Service's slice changes |"
    );
    println!("|---|---|---|---|---|---|");
    for incremental in [true, false] {
        index.set_incremental(incremental);
        let (one, one_changed) = median(&mut index, &mut feed, 1, &mut now);
        let (all, all_changed) = median(&mut index, &mut feed, services, &mut now);
        println!(
            "| {services} × {per_service} | {}/{} | {full:?} | {} | {one:?} ({one_changed}) | {all:?} ({all_changed}) |",
            first.outbound.len(),
            first.inbound.len(),
            if incremental {
                "incremental"
            } else {
                "everything (before)"
            },
        );
    }
    println!(
        "(median of 9 recomputations each; RSS: {rss_start:.1} MiB at start, {rss_snapshot:.1} MiB with the snapshot, {rss_index:.1} MiB with the derived pieces, of which the slice relations for incremental recomputation ≈ {rss_relations:.1} MiB)"
    );
}
