//! Times the discovery index's full recomputation on a synthetic cluster and prints a
//! table: `cargo run --release -p remora-operator --example index_bench [services]
//! [endpoints-per-service]` (defaults 1000 × 10).

use std::{collections::BTreeSet, time::Instant};

use remora_operator::index::{
    Index,
    model::{
        ObjKey, PodState, ServiceState, SliceEndpoint, SlicePort, SliceState, Snapshot, SvcPort,
    },
    version::Versioner,
};

fn arg(n: usize, default: u32) -> u32 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn snapshot(services: u32, per_service: u32) -> Snapshot {
    let mut s = Snapshot::new("cluster.local");
    for i in 0..services {
        let name = format!("svc-{i}");
        let vip = std::net::Ipv4Addr::from(0x0a60_0000 + i + 1);
        s.services.insert(
            ObjKey::new("bench", name.clone()),
            ServiceState {
                cluster_ips: vec![vip.into()],
                ports: vec![SvcPort {
                    name: "http".to_owned(),
                    port: 80,
                    protocol: "TCP".to_owned(),
                    app_protocol: None,
                }],
                opaque_ports: BTreeSet::new(),
            },
        );
        let endpoints = (0..per_service)
            .map(|j| {
                let pod = format!("pod-{i}-{j}");
                s.pods.insert(
                    ObjKey::new("bench", pod.clone()),
                    PodState {
                        service_account: format!("sa-{i}"),
                        meshed: true,
                        ..PodState::default()
                    },
                );
                SliceEndpoint {
                    addresses: vec![
                        std::net::Ipv4Addr::from(0x0af4_0000 + i * per_service + j).into(),
                    ],
                    ready: true,
                    serving: true,
                    terminating: false,
                    zone: Some("zone-a".to_owned()),
                    pod: Some(pod),
                }
            })
            .collect();
        s.slices.insert(
            ObjKey::new("bench", format!("{name}-abc")),
            SliceState {
                service: name,
                ports: vec![SlicePort {
                    name: "http".to_owned(),
                    port: 8080,
                    protocol: "TCP".to_owned(),
                }],
                endpoints,
            },
        );
    }
    s
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
