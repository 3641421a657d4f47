//! Outbound routing as the proxy compiles it: original destination → service (a VIP, or
//! an endpoint addressed directly), then the split's header routes and weights. The
//! config is built from structured input (services, endpoints, splits with header
//! matches and weights, a mirror) so that most inputs are configs the proxy accepts.
//!
//! Asserted for every config that validates: it compiles; every service address leads
//! to its service and every other endpoint address to that endpoint; a request takes
//! the backend of the first header route all of whose headers it carries (compared as
//! strings, independently of the compiled matcher), and otherwise the weighted rotation
//! gives each backend exactly its weight over one round.

#![no_main]

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use remora_crds::proxy::{
    Endpoint, HeaderRoute, Mirror, OutboundConfig, OutboundService, ProxyConfig, Split,
    WeightedBackend,
};
use remora_proxy::{
    config::ConfigStore,
    metrics::Metrics,
    outbound::{Target, endpoint::Registry},
};

const NAMES: [&str; 6] = [
    "x-canary",
    "X-Canary",
    "x-user",
    "cookie",
    "host",
    "x-b3-sampled",
];
const VALUES: [&str; 5] = ["true", "false", "alice", "", "true "];

#[derive(Arbitrary, Debug)]
enum Text {
    Known(u8),
    Raw(String),
}

impl Text {
    fn get<'a>(&'a self, known: &[&'static str]) -> &'a str {
        match self {
            Self::Known(i) => known[usize::from(*i) % known.len()],
            Self::Raw(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct MatchIn {
    headers: Vec<(Text, Text)>,
    backend: u8,
}

#[derive(Arbitrary, Debug)]
struct SplitIn {
    backends: Vec<(u8, u8)>,
    matches: Vec<MatchIn>,
    mirror: Option<(u8, u8)>,
}

#[derive(Arbitrary, Debug)]
struct ServiceIn {
    vip: Option<u8>,
    endpoints: Vec<(u8, bool)>,
    split: Option<SplitIn>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    services: Vec<ServiceIn>,
    request: Vec<(Text, Text)>,
    dst: u8,
}

fn name(i: u8, n: usize) -> String {
    format!("svc{}", usize::from(i) % n.max(1))
}

fn config(input: &Input) -> OutboundConfig {
    let n = input.services.len().min(8);
    let services = input.services[..n]
        .iter()
        .enumerate()
        .map(|(i, s)| OutboundService {
            name: format!("svc{i}"),
            addresses: s
                .vip
                .map(|v| SocketAddr::from(([10, 96, 0, v], 80)))
                .into_iter()
                .collect(),
            endpoints: s
                .endpoints
                .iter()
                .take(8)
                .map(|&(last, ready)| {
                    serde_json::from_value::<Endpoint>(serde_json::json!({
                        "address": format!("10.244.0.{last}:8080"),
                        "ready": ready,
                    }))
                    .expect("endpoint")
                })
                .collect(),
            split: s.split.as_ref().map(|sp| Split {
                backends: sp
                    .backends
                    .iter()
                    .take(6)
                    .map(|&(b, w)| WeightedBackend {
                        service: name(b, n),
                        weight: u32::from(w),
                    })
                    .collect(),
                matches: sp
                    .matches
                    .iter()
                    .take(4)
                    .map(|m| HeaderRoute {
                        headers: m
                            .headers
                            .iter()
                            .take(3)
                            .map(|(k, v)| (k.get(&NAMES).to_owned(), v.get(&VALUES).to_owned()))
                            .collect::<BTreeMap<_, _>>(),
                        backend: name(m.backend, n),
                    })
                    .collect(),
                mirror: sp.mirror.map(|(s, p)| Mirror {
                    service: name(s, n),
                    percent: u32::from(p),
                }),
            }),
            ..Default::default()
        })
        .collect();
    OutboundConfig {
        services,
        ..Default::default()
    }
}

/// The first value of `name` in the request as the client wrote it, by string.
fn first_value<'a>(request: &'a [(String, String)], name: &str) -> Option<&'a str> {
    request
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fuzz_target!(|input: Input| {
    let outbound = config(&input);
    let cfg = ProxyConfig {
        outbound,
        ..Default::default()
    };
    if cfg.validate().is_err() {
        return;
    }
    let metrics = Arc::new(Metrics::new());
    let store = ConfigStore::new(
        cfg.clone(),
        &metrics,
        Registry::without_identity(metrics.clone()),
    );
    let snap = store.load();
    let services = &cfg.outbound.services;

    let vips: HashMap<SocketAddr, &str> = services
        .iter()
        .flat_map(|s| s.addresses.iter().map(move |a| (*a, s.name.as_str())))
        .collect();
    for (addr, svc) in &vips {
        match snap.routes.lookup(*addr) {
            Some(Target::Service(route)) => assert_eq!(&*route.name, *svc),
            other => panic!("{addr} should lead to service {svc}, got {other:?}"),
        }
    }
    for s in services {
        for e in &s.endpoints {
            if vips.contains_key(&e.address) {
                continue;
            }
            if let Some(Target::Endpoint { set, index, .. }) = snap.routes.lookup(e.address) {
                assert_eq!(set.members[*index].ep.addr, e.address);
            } else if e.ready {
                panic!("ready endpoint {} is not routable by address", e.address);
            }
        }
    }

    // The request's headers as a client would send them (invalid ones cannot be sent).
    let request: Vec<(String, String)> = input
        .request
        .iter()
        .take(6)
        .map(|(k, v)| (k.get(&NAMES).to_owned(), v.get(&VALUES).to_owned()))
        .filter(|(k, v)| {
            HeaderName::try_from(k.as_str()).is_ok() && HeaderValue::try_from(v.as_str()).is_ok()
        })
        .collect();
    let mut headers = HeaderMap::new();
    for (k, v) in &request {
        headers.append(
            HeaderName::try_from(k.as_str()).expect("filtered"),
            HeaderValue::try_from(v.as_str()).expect("filtered"),
        );
    }

    let Some(svc) = services.get(usize::from(input.dst) % services.len().max(1)) else {
        return;
    };
    let Some(Target::Service(route)) = svc.addresses.first().and_then(|a| snap.routes.lookup(*a))
    else {
        return;
    };
    let Some(split) = &svc.split else {
        assert!(route.header_match(&headers).is_none());
        return;
    };
    let expected = split
        .matches
        .iter()
        .find(|m| {
            m.headers
                .iter()
                .all(|(k, v)| first_value(&request, k) == Some(v.as_str()))
        })
        .map(|m| m.backend.as_str());
    let matched = route.header_match(&headers).map(|s| s.service.to_string());
    assert_eq!(matched.as_deref(), expected, "header routes of {svc:?}");
    if let Some(m) = route.header_match(&headers) {
        let picked = route.backend(Some(&headers)).expect("a matched backend");
        assert!(Arc::ptr_eq(m, picked));
    }

    // One round of the weighted rotation gives each backend exactly its weight.
    let total: u64 = split.backends.iter().map(|b| u64::from(b.weight)).sum();
    let mut want: HashMap<&str, u64> = HashMap::new();
    for b in &split.backends {
        *want.entry(b.service.as_str()).or_default() += u64::from(b.weight);
    }
    want.retain(|_, w| *w > 0);
    let mut got: HashMap<String, u64> = HashMap::new();
    for _ in 0..total {
        let set = route
            .backend(None)
            .expect("a split with weight picks a backend");
        *got.entry(set.service.to_string()).or_default() += 1;
    }
    let got: HashMap<&str, u64> = got.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(got, want, "one round of the split's rotation");
});
