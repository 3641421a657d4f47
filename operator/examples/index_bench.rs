//! Times the discovery index's full recomputation on a synthetic cluster and prints a
//! table: `cargo run --release -p remora-operator --example index_bench [services]
//! [endpoints-per-service]` (defaults 1000 × 10).

#[path = "common/synthetic.rs"]
mod synthetic;

use std::time::Instant;

use remora_operator::index::{Index, model::ObjKey, version::Versioner};
use synthetic::snapshot;

fn arg(n: usize, default: u32) -> u32 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let (services, per_service) = (arg(1, 1000), arg(2, 10));
    let mut index = Index::new(snapshot(services, per_service), Versioner::default());
    let t = Instant::now();
    let first = index.recompute(1);
    let full = t.elapsed();

    // One endpoint of one service changes: everything is derived again, one piece moves.
    let key = ObjKey::new("bench", "svc-0-abc");
    if let Some(slice) = index.snapshot_mut().slices.get_mut(&key) {
        slice.endpoints[0].ready = false;
    }
    let t = Instant::now();
    let second = index.recompute(2);
    let one_change = t.elapsed();

    println!(
        "| services × endpoints | pieces (out/in) | full recompute | after one change (pieces changed) |"
    );
    println!("|---|---|---|---|");
    println!(
        "| {services} × {per_service} | {}/{} | {full:?} | {one_change:?} ({}) |",
        first.outbound.len(),
        first.inbound.len(),
        second.outbound.len() + second.inbound.len()
    );
}
