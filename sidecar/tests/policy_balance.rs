//! Balancing through a real proxy on loopback: every algorithm's spread, weights,
//! consistent hashing and its cookie, endpoints that must never be picked, least request
//! around a slow endpoint, splits, locality, and endpoint state across config versions.
//! Backends are real HTTP servers; the proxy sees every connection as bound for the
//! service's VIP (`OrigDstMode::Fixed`), as iptables would make it.

mod common;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use common::{
    backends::{Backend, CANARY_SPLIT, backends, only, service_config, split_config, vip},
    full, settings, start,
};
use http::{Request, StatusCode};
use http_body_util::BodyExt;

fn config(policy: &str, eps: &[(&Backend, &str)], extra: &str) -> String {
    service_config(policy, eps, extra)
}

/// Sends `n` GETs (with `headers`) on one kept-alive connection; counts answers by
/// backend name (`status <code>` for answers the proxy generated).
async fn spread(proxy: SocketAddr, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let mut send = common::h1(proxy).await;
    let mut counts = HashMap::new();
    for _ in 0..n {
        let mut b = Request::builder().uri("/").header("host", "svc.test");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = send
            .send_request(b.body(full("")).expect("request"))
            .await
            .expect("response");
        let key = match resp.headers().get("x-backend") {
            Some(v) => v.to_str().unwrap_or("?").to_owned(),
            None => format!("status {}", resp.status().as_u16()),
        };
        let _ = resp.into_body().collect().await;
        *counts.entry(key).or_default() += 1;
    }
    counts
}

fn share(counts: &HashMap<String, usize>, name: &str) -> usize {
    counts.get(name).copied().unwrap_or(0)
}

#[tokio::test]
async fn round_robin_spreads_300_requests_evenly_over_3_endpoints() {
    let b = backends(3).await;
    let cfg = config(
        "{loadBalancer: {algorithm: RoundRobin}}",
        &[(&b[0], ""), (&b[1], ""), (&b[2], "")],
        "",
    );
    let proxy = start(settings(vip()), &cfg).await;
    let counts = spread(proxy.outbound_addrs[0], 300, &[]).await;
    println!("round robin over 300 requests: {counts:?}");
    for be in &b {
        let n = share(&counts, be.name);
        assert!((95..=105).contains(&n), "{}: {n} of 300", be.name);
    }
}

#[tokio::test]
async fn weights_1_2_3_hold_within_10_percent_over_600_requests() {
    let b = backends(3).await;
    let cfg = config(
        "{loadBalancer: {algorithm: Weighted}}",
        &[
            (&b[0], ", weight: 1"),
            (&b[1], ", weight: 2"),
            (&b[2], ", weight: 3"),
        ],
        "",
    );
    let proxy = start(settings(vip()), &cfg).await;
    let counts = spread(proxy.outbound_addrs[0], 600, &[]).await;
    println!("weighted 1:2:3 over 600 requests: {counts:?}");
    for (be, expected) in b.iter().zip([100usize, 200, 300]) {
        let n = share(&counts, be.name);
        assert!(
            n.abs_diff(expected) * 10 <= expected,
            "{}: {n}, expected {expected} ± 10 %",
            be.name
        );
    }
}

#[tokio::test]
async fn consistent_hashing_is_sticky_and_sets_its_cookie_when_absent() {
    let b = backends(4).await;
    let cfg = config(
        "{loadBalancer: {algorithm: ConsistentHash, consistentHash: {header: x-user, cookie: {name: sid, ttl: 1h}}}}",
        &[(&b[0], ""), (&b[1], ""), (&b[2], ""), (&b[3], "")],
        "",
    );
    let proxy = start(settings(vip()), &cfg).await;
    let out = proxy.outbound_addrs[0];
    let alice = spread(out, 1000, &[("x-user", "alice")]).await;
    assert_eq!(alice.len(), 1, "one key, one endpoint: {alice:?}");
    let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let mut used = std::collections::HashSet::new();
    for k in &keys {
        let c = spread(out, 1, &[("x-user", k)]).await;
        used.extend(c.into_keys());
    }
    assert!(
        used.len() >= 3,
        "200 keys land on several endpoints: {used:?}"
    );

    // No header and no cookie: the proxy makes one up, hashes on it and hands it out.
    let mut send = common::h1(out).await;
    let resp = send.send_request(common::get("/")).await.expect("response");
    let set_cookie = resp
        .headers()
        .get("set-cookie")
        .expect("cookie set when absent")
        .to_str()
        .expect("ascii")
        .to_owned();
    let first = resp.headers().get("x-backend").cloned();
    let _ = resp.into_body().collect().await;
    assert!(set_cookie.starts_with("sid="), "{set_cookie}");
    assert!(set_cookie.contains("Max-Age=3600"), "{set_cookie}");
    let pair = set_cookie.split(';').next().expect("pair").to_owned();
    let again = spread(out, 50, &[("cookie", &pair)]).await;
    assert_eq!(again.len(), 1, "the cookie is sticky: {again:?}");
    assert_eq!(
        again.keys().next().map(String::as_str),
        first.as_ref().and_then(|v| v.to_str().ok()),
        "the first request was hashed on the cookie it was given"
    );
    let with_cookie = spread(out, 1, &[("cookie", &pair)]).await;
    assert_eq!(with_cookie.values().sum::<usize>(), 1);
}

#[tokio::test]
async fn no_algorithm_ever_picks_an_unready_or_terminating_endpoint() {
    let b = backends(4).await;
    for algorithm in [
        "LeastRequest",
        "RoundRobin",
        "Random",
        "Weighted",
        "ConsistentHash",
    ] {
        let cfg = config(
            &if algorithm == "ConsistentHash" {
                "{loadBalancer: {algorithm: ConsistentHash, consistentHash: {header: x-k}}}"
                    .to_owned()
            } else {
                format!("{{loadBalancer: {{algorithm: {algorithm}}}}}")
            },
            &[
                (&b[0], ""),
                (&b[1], ", ready: false"),
                (&b[2], ", terminating: true"),
                (&b[3], ", serving: false"),
            ],
            "",
        );
        let proxy = start(settings(vip()), &cfg).await;
        let mut counts = spread(proxy.outbound_addrs[0], 100, &[]).await;
        for i in 0..50 {
            let k = format!("k{i}");
            for (name, n) in spread(proxy.outbound_addrs[0], 1, &[("x-k", &k)]).await {
                *counts.entry(name).or_default() += n;
            }
        }
        assert_eq!(counts.len(), 1, "{algorithm}: {counts:?}");
        assert_eq!(share(&counts, "b0"), 150, "{algorithm}: {counts:?}");
        proxy.shutdown();
    }
}

#[tokio::test]
async fn least_request_sends_under_20_percent_to_a_10x_slower_endpoint() {
    let b = backends(3).await;
    b[0].set_delay(50);
    b[1].set_delay(5);
    b[2].set_delay(5);
    let cfg = config(
        "{loadBalancer: {algorithm: LeastRequest}}",
        &[(&b[0], ""), (&b[1], ""), (&b[2], "")],
        "",
    );
    let proxy = start(settings(vip()), &cfg).await;
    let out = proxy.outbound_addrs[0];
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(async move { spread(out, 60, &[]).await }))
        .collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for c in clients {
        for (k, v) in c.await.expect("client") {
            *counts.entry(k).or_default() += v;
        }
    }
    let total: usize = counts.values().sum();
    let slow = share(&counts, "b0");
    println!("least request, b0 10x slower: {counts:?} ({slow} of {total})");
    assert_eq!(total, 480);
    assert!(slow * 5 < total, "slow endpoint got {slow} of {total}");
}

#[tokio::test]
async fn a_90_10_split_holds_within_3_percent_over_10000_requests_and_a_header_route_wins() {
    let b = backends(2).await;
    let cfg = split_config(
        CANARY_SPLIT,
        &[("v1.test", "", only(&b[0])), ("v2.test", "", only(&b[1]))],
    );
    let proxy = start(settings(vip()), &cfg).await;
    let out = proxy.outbound_addrs[0];
    let counts = spread(out, 10_000, &[]).await;
    let v2 = share(&counts, "b1");
    println!("split 90/10 over 10000 requests: {counts:?}");
    assert!((700..=1300).contains(&v2), "v2 got {v2} of 10000");
    let canary = spread(out, 100, &[("x-canary", "true")]).await;
    assert_eq!(share(&canary, "b1"), 100, "{canary:?}");
}

/// Sticky sessions behind a split: the split is decided once per request, so reading the
/// backend's cookie policy does not turn the weighted rotation (a 1:1 split stays 1:1).
#[tokio::test]
async fn a_split_over_cookie_hashed_backends_keeps_its_weights_and_sets_the_cookie() {
    let b = backends(2).await;
    let hashed =
        "{loadBalancer: {algorithm: ConsistentHash, consistentHash: {cookie: {name: sid}}}}";
    let cfg = split_config(
        "{backends: [{service: v1.test, weight: 1}, {service: v2.test, weight: 1}]}",
        &[
            ("v1.test", hashed, only(&b[0])),
            ("v2.test", hashed, only(&b[1])),
        ],
    );
    let proxy = start(settings(vip()), &cfg).await;
    let out = proxy.outbound_addrs[0];
    let counts = spread(out, 100, &[]).await;
    println!("split 1:1 over cookie-hashed backends, 100 requests: {counts:?}");
    assert_eq!(share(&counts, "b0"), 50, "{counts:?}");
    assert_eq!(share(&counts, "b1"), 50, "{counts:?}");
    let mut send = common::h1(out).await;
    let resp = send
        .send_request(
            Request::builder()
                .uri("/")
                .header("host", "svc.test")
                .body(full(""))
                .expect("request"),
        )
        .await
        .expect("response");
    let cookie = resp
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    assert!(
        cookie.as_deref().is_some_and(|c| c.starts_with("sid=")),
        "no sticky cookie from the split's backend: {cookie:?}"
    );
}

#[tokio::test]
async fn locality_keeps_traffic_in_zone_while_healthy_and_spills_over_when_not() {
    let b = backends(3).await;
    let cfg = config(
        "{loadBalancer: {algorithm: RoundRobin, locality: {preferSameZone: true, minHealthyPercent: 60}}, outlierDetection: {consecutiveErrors: 1, baseEjectionTime: 30s, maxEjectionPercent: 100}}",
        &[
            (&b[0], ", zone: zone-a"),
            (&b[1], ", zone: zone-a"),
            (&b[2], ", zone: zone-b"),
        ],
        "locality: {zone: zone-a}\n",
    );
    let proxy = start(settings(vip()), &cfg).await;
    let out = proxy.outbound_addrs[0];
    let healthy = spread(out, 100, &[]).await;
    assert_eq!(
        share(&healthy, "b2"),
        0,
        "in zone while healthy: {healthy:?}"
    );
    assert_eq!(share(&healthy, "b0") + share(&healthy, "b1"), 100);

    // One of the two zone-a endpoints fails and is ejected: 50 % healthy < 60 %.
    b[0].set_status(503);
    let _ = spread(out, 10, &[]).await;
    tokio::time::sleep(Duration::from_millis(150)).await; // the locality recount
    let spilled = spread(out, 100, &[]).await;
    println!("zone-a half ejected: {spilled:?}");
    assert_eq!(share(&spilled, "b0"), 0, "ejected: {spilled:?}");
    assert!(
        share(&spilled, "b2") >= 30,
        "spills over to zone-b: {spilled:?}"
    );
}

#[tokio::test]
async fn an_unrelated_config_version_leaves_endpoint_state_alone() {
    let b = backends(2).await;
    let policy = "{loadBalancer: {algorithm: RoundRobin}, outlierDetection: {consecutiveErrors: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}}";
    let cfg = config(policy, &[(&b[0], ""), (&b[1], "")], "version: 1\n");
    let proxy = start(settings(vip()), &cfg).await;
    let out = proxy.outbound_addrs[0];
    b[0].set_status(503);
    b[1].set_delay(20);
    let _ = spread(out, 20, &[]).await;
    let admin = proxy.admin_addr.expect("admin");
    let before = endpoint_state(admin).await;
    assert!(before["b0"].0.is_some(), "b0 is ejected: {before:?}");
    assert!(
        before["b1"].1 > 10.0,
        "b1's latency estimate grew: {before:?}"
    );

    // A new version that only adds another service.
    let next = config(policy, &[(&b[0], ""), (&b[1], "")], "version: 2\n").replace(
        "outbound:\n  services:\n",
        "outbound:\n  services:\n  - name: other.test\n    addresses: [\"10.96.0.9:80\"]\n    endpoints: [{address: \"127.0.0.1:9\"}]\n",
    );
    let next = remora_crds::proxy::ProxyConfig::from_yaml(&next).expect("valid");
    let ctx = proxy.context();
    ctx.config
        .apply(next, &ctx.metrics)
        .expect("newer version applies");
    let after = endpoint_state(admin).await;
    assert!(after["b0"].0.is_some(), "still ejected: {after:?}");
    let (b1_before, b1_after) = (before["b1"].1, after["b1"].1);
    assert!(
        (b1_after - b1_before).abs() < b1_before * 0.5,
        "latency estimate kept ({b1_before} → {b1_after})"
    );
    let counts = spread(out, 20, &[]).await;
    assert_eq!(share(&counts, "b0"), 0, "{counts:?}");
}

/// `(ejected for ms, latency estimate ms)` of each backend of svc.test, by backend name.
async fn endpoint_state(admin: SocketAddr) -> HashMap<String, (Option<u64>, f64)> {
    let (status, body) = common::admin_get(admin, "/endpoints").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let mut out = HashMap::new();
    for svc in v["services"].as_array().expect("services") {
        if svc["service"] != "svc.test" {
            continue;
        }
        for (i, ep) in svc["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .enumerate()
        {
            out.insert(
                format!("b{i}"),
                (
                    ep["ejectedForMs"].as_u64(),
                    ep["latencyEstimateMs"].as_f64().unwrap_or(0.0),
                ),
            );
        }
    }
    out
}
