//! A synthetic cluster for the operator's benchmarks: `services` Services in namespace
//! `bench` (`svc-<i>`, VIP `10.96.x.y`, port 80 → 8080), each with one EndpointSlice of
//! `per_service` ready, meshed pods (service account `sa-<i>`).

#![allow(dead_code)]

use std::collections::BTreeSet;

use remora_operator::index::model::{
    ObjKey, PodState, ServiceState, SliceEndpoint, SlicePort, SliceState, Snapshot, SvcPort,
};

/// The VIP of `svc-<i>`.
pub fn vip(i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0x0a60_0000 + i + 1)
}

pub fn snapshot(services: u32, per_service: u32) -> Snapshot {
    let mut s = Snapshot::new("cluster.local");
    for i in 0..services {
        let name = format!("svc-{i}");
        let vip = vip(i);
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
