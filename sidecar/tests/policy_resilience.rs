//! Resilience policies through a real proxy on loopback: retries and their budget,
//! timeouts, the circuit breaker and its limits, outlier ejection and return, the inbound
//! rate limit, mirroring, fault injection, and the route explanation.

mod common;

use std::time::{Duration, Instant};

use common::{
    backends::{Backend, CANARY_SPLIT, VIP, backends, only, service_config, split_config, vip},
    full, settings, start,
};
use http::{Request, StatusCode};
use http_body_util::BodyExt;

fn config(policy: &str, eps: &[&Backend]) -> String {
    let eps: Vec<(&Backend, &str)> = eps.iter().map(|b| (*b, "")).collect();
    service_config(policy, &eps, "")
}

/// One request; returns status, the `x-remora-proxy-error` reason and `retry-after`.
async fn one(
    send: &mut hyper::client::conn::http1::SendRequest<common::Body>,
    method: &str,
) -> (StatusCode, String, Option<String>) {
    let req = Request::builder()
        .method(method)
        .uri("/")
        .header("host", "svc.test")
        .body(full(""))
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let reason = header("x-remora-proxy-error").unwrap_or_default();
    let retry_after = header("retry-after");
    let _ = resp.into_body().collect().await;
    (status, reason, retry_after)
}

#[tokio::test]
async fn retries_recover_a_50_percent_flaky_upstream() {
    let b = backends(1).await;
    b[0].how
        .fail_every
        .store(2, std::sync::atomic::Ordering::Relaxed);
    let cfg = config(
        "{retries: {attempts: 2, retryOn: [\"503\"], budgetPercent: 100, backoff: {base: 1ms, max: 5ms}}}",
        &[&b[0]],
    );
    let proxy = start(settings(vip()), &cfg).await;
    let mut send = common::h1(proxy.outbound_addrs[0]).await;
    let mut ok = 0;
    for _ in 0..200 {
        if one(&mut send, "GET").await.0 == StatusCode::OK {
            ok += 1;
        }
    }
    println!(
        "flaky upstream: {ok}/200 succeeded, {} upstream hits",
        b[0].hits()
    );
    assert_eq!(ok, 200);
    assert!(
        b[0].hits() >= 300,
        "half the first tries failed and were retried"
    );
}

#[tokio::test]
async fn under_total_failure_the_budget_caps_retries_at_its_share() {
    let b = backends(1).await;
    b[0].set_status(503);
    let cfg = config(
        "{retries: {attempts: 3, retryOn: [\"503\"], budgetPercent: 20, backoff: {base: 1ms, max: 1ms}}}",
        &[&b[0]],
    );
    let proxy = start(settings(vip()), &cfg).await;
    let mut send = common::h1(proxy.outbound_addrs[0]).await;
    let n = 2000u64;
    for _ in 0..n {
        assert_eq!(
            one(&mut send, "GET").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    let extra = b[0].hits() - n;
    // 20 % of the requests, plus the floor of 10 retries a second over the 10 s window.
    let cap = n / 5 + 100;
    println!(
        "total failure: {n} requests, {extra} retries (cap {cap}; without a budget: {})",
        3 * n
    );
    assert!(extra <= cap, "{extra} retries > {cap}");
    assert!(extra >= n / 5, "the budget allows its share: {extra}");
}

#[tokio::test]
async fn a_non_idempotent_request_that_reached_the_upstream_is_never_retried() {
    let b = backends(1).await;
    b[0].set_status(503);
    let cfg = config(
        "{retries: {attempts: 3, retryOn: [\"503\", 5xx]}}",
        &[&b[0]],
    );
    let proxy = start(settings(vip()), &cfg).await;
    let mut send = common::h1(proxy.outbound_addrs[0]).await;
    for _ in 0..10 {
        assert_eq!(
            one(&mut send, "POST").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(b[0].hits(), 10, "one attempt per POST");
    for _ in 0..10 {
        one(&mut send, "PUT").await;
    }
    assert_eq!(
        b[0].hits(),
        10 + 40,
        "PUT is idempotent: 1 + 3 attempts each"
    );
}

#[tokio::test]
async fn a_connect_failure_is_retried_on_another_endpoint_even_for_post() {
    let b = backends(1).await;
    // An endpoint nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    let cfg = format!(
        "outbound:\n  services:\n  - name: svc.test\n    addresses: [\"{VIP}\"]\n    protocol: http\n    policy: {{loadBalancer: {{algorithm: RoundRobin}}, retries: {{attempts: 1}}}}\n    endpoints:\n    - {{address: \"{dead_addr}\"}}\n    - {{address: \"{}\"}}\n",
        b[0].addr
    );
    let proxy = start(settings(vip()), &cfg).await;
    let mut send = common::h1(proxy.outbound_addrs[0]).await;
    for _ in 0..20 {
        assert_eq!(one(&mut send, "POST").await.0, StatusCode::OK);
    }
}

#[tokio::test]
async fn a_hung_upstream_gets_a_504_at_the_request_deadline() {
    let b = backends(1).await;
    b[0].how
        .hang
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let cfg = config("{timeouts: {request: 500ms}}", &[&b[0]]);
    let proxy = start(settings(vip()), &cfg).await;
    let mut send = common::h1(proxy.outbound_addrs[0]).await;
    for _ in 0..3 {
        let t = Instant::now();
        let (status, reason, _) = one(&mut send, "GET").await;
        let took = t.elapsed();
        println!("hung upstream: {status} after {took:?} ({reason})");
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert!(
            took >= Duration::from_millis(450) && took <= Duration::from_millis(550),
            "{took:?}"
        );
    }
}

#[tokio::test]
async fn the_per_try_timeout_moves_a_slow_attempt_to_another_try() {
    let b = backends(2).await;
    b[0].set_delay(2000);
    let cfg = format!(
        "outbound:\n  services:\n  - name: svc.test\n    addresses: [\"{VIP}\"]\n    protocol: http\n    policy: {{loadBalancer: {{algorithm: RoundRobin}}, timeouts: {{request: 3s}}, retries: {{attempts: 1, perTryTimeout: 200ms, retryOn: [5xx]}}}}\n    endpoints:\n    - {{address: \"{}\"}}\n    - {{address: \"{}\"}}\n",
        b[0].addr, b[1].addr
    );
    let proxy = start(settings(vip()), &cfg).await;
    let mut send = common::h1(proxy.outbound_addrs[0]).await;
    for _ in 0..4 {
        let t = Instant::now();
        assert_eq!(one(&mut send, "GET").await.0, StatusCode::OK);
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
    }
}

#[tokio::test]
async fn the_breaker_opens_fast_fails_half_opens_and_closes() {
    let b = backends(1).await;
    b[0].set_status(503);
    let cfg = config(
        "{circuitBreaker: {errorRatePercent: 50, window: 10s, minRequests: 10, openFor: 1s}}",
        &[&b[0]],
    );
    let proxy = start(settings(vip()), &cfg).await;
    let mut send = common::h1(proxy.outbound_addrs[0]).await;
    for _ in 0..10 {
        assert_eq!(
            one(&mut send, "GET").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    let hits = b[0].hits();
    let t = Instant::now();
    let (status, reason, retry_after) = one(&mut send, "GET").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reason.contains("circuit breaker"), "{reason}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(t.elapsed() < Duration::from_millis(50), "fast fail");
    for _ in 0..20 {
        one(&mut send, "GET").await;
    }
    assert_eq!(b[0].hits(), hits, "nothing reaches the upstream while open");
    let admin = proxy.admin_addr.expect("admin");
    let (_, metrics) = common::admin_get(admin, "/metrics").await;
    assert!(
        metrics.contains("remora_proxy_breaker_state{service=\"svc.test\"} 1"),
        "open at scrape time: {metrics}"
    );

    // Half-open after openFor: probes go through; the upstream has recovered.
    b[0].set_status(200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut ok = 0;
    for _ in 0..20 {
        if one(&mut send, "GET").await.0 == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 20, "probes succeed and close the breaker");
    let (_, body) = common::admin_get(admin, "/endpoints").await;
    assert!(body.contains("\"state\": \"closed\""), "{body}");
    let (_, metrics) = common::admin_get(admin, "/metrics").await;
    assert!(
        metrics.contains("remora_proxy_breaker_state{service=\"svc.test\"} 0"),
        "closed at scrape time: {metrics}"
    );
}

#[tokio::test]
async fn concurrency_limits_overflow_with_an_immediate_503_naming_the_limit() {
    let b = backends(1).await;
    b[0].set_delay(300);
    let cfg = config("{circuitBreaker: {maxRequests: 2}}", &[&b[0]]);
    let proxy = start(settings(vip()), &cfg).await;
    let out = proxy.outbound_addrs[0];
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                let mut send = common::h1(out).await;
                let t = Instant::now();
                let r = one(&mut send, "GET").await;
                (r, t.elapsed())
            })
        })
        .collect();
    let mut ok = 0;
    let mut overflowed = 0;
    for t in tasks {
        let ((status, reason, _), took) = t.await.expect("task");
        if status == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert!(reason.contains("maxRequests"), "{reason}");
            assert!(took < Duration::from_millis(200), "immediate: {took:?}");
            overflowed += 1;
        }
    }
    println!("maxRequests 2, 6 concurrent: {ok} ok, {overflowed} overflowed");
    assert_eq!((ok, overflowed), (2, 4));
    let (_, metrics) = common::admin_get(proxy.admin_addr.expect("admin"), "/metrics").await;
    assert!(
        metrics.contains(
            "remora_proxy_breaker_refusals_total{service=\"svc.test\",outcome=\"max-requests\"} 4"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_ejected_endpoint_returns_after_its_time_with_ramped_traffic() {
    let b = backends(2).await;
    let cfg = format!(
        "outbound:\n  services:\n  - name: svc.test\n    addresses: [\"{VIP}\"]\n    protocol: http\n    policy: {{loadBalancer: {{algorithm: RoundRobin}}, outlierDetection: {{consecutiveErrors: 3, interval: 10s, baseEjectionTime: 1s, maxEjectionPercent: 50}}}}\n    endpoints:\n    - {{address: \"{}\"}}\n    - {{address: \"{}\"}}\n",
        b[0].addr, b[1].addr
    );
    let proxy = start(settings(vip()), &cfg).await;
    let mut send = common::h1(proxy.outbound_addrs[0]).await;
    b[0].set_status(500);
    for _ in 0..6 {
        one(&mut send, "GET").await;
    }
    let before = b[0].hits();
    for _ in 0..100 {
        assert_eq!(one(&mut send, "GET").await.0, StatusCode::OK);
    }
    assert_eq!(b[0].hits(), before, "ejected: no traffic");
    let (_, metrics) = common::admin_get(proxy.admin_addr.expect("admin"), "/metrics").await;
    assert!(
        metrics.contains("remora_proxy_ejected_endpoints{service=\"svc.test\"} 1"),
        "one endpoint ejected at scrape time: {metrics}"
    );
    b[0].set_status(200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let back_before = b[0].hits();
    for _ in 0..100 {
        one(&mut send, "GET").await;
    }
    let first = b[0].hits() - back_before;
    println!("returning endpoint got {first} of the first 100 requests after its ejection");
    assert!(first > 0, "it returns");
    assert!(first < 45, "ramped, not a flood of its 50 % share: {first}");
}

#[tokio::test]
async fn the_inbound_rate_limit_answers_429_at_the_configured_rate() {
    let app = Backend::start("app").await;
    let cfg = format!(
        "inbound:\n  ports:\n    \"{}\": {{rateLimit: {{requestsPerSecond: 100, burst: 10}}}}\n",
        app.addr.port()
    );
    let proxy = start(settings(app.addr), &cfg).await;
    let mut send = common::h1(proxy.inbound_addrs[0]).await;
    let t = Instant::now();
    let (mut ok, mut limited) = (0u64, 0u64);
    let mut retry_after_seen = false;
    while t.elapsed() < Duration::from_secs(2) {
        let (status, _, retry_after) = one(&mut send, "GET").await;
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                retry_after_seen |= retry_after.is_some();
            }
            s => panic!("unexpected {s}"),
        }
    }
    let expected = 10.0 + 100.0 * t.elapsed().as_secs_f64();
    println!(
        "rate limit 100/s burst 10 over {:?}: {ok} admitted (expected {expected:.0}), {limited} limited",
        t.elapsed()
    );
    assert!(
        (ok as f64 - expected).abs() <= expected * 0.1,
        "{ok} vs {expected}"
    );
    assert!(limited > 0 && retry_after_seen);
}

#[tokio::test]
async fn mirroring_adds_no_latency_when_the_shadow_takes_a_second() {
    let b = backends(2).await;
    b[1].set_delay(1000);
    let cfg = split_config(
        "{backends: [{service: primary.test, weight: 1}], mirror: {service: shadow.test, percent: 100}}",
        &[
            ("primary.test", "", only(&b[0])),
            ("shadow.test", "", only(&b[1])),
        ],
    );
    let proxy = start(settings(vip()), &cfg).await;
    let mut send = common::h1(proxy.outbound_addrs[0]).await;
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(one(&mut send, "GET").await.0, StatusCode::OK);
        worst = worst.max(t.elapsed());
    }
    println!("mirror to a 1 s shadow: slowest primary {worst:?}");
    assert!(worst < Duration::from_millis(200), "{worst:?}");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(b[0].hits(), 20);
    assert_eq!(b[1].hits(), 20, "every request was mirrored");
}

#[tokio::test]
async fn faults_abort_and_delay_the_configured_share() {
    let b = backends(1).await;
    let cfg = config(
        "{fault: {abort: {httpStatus: 418, percent: 100}}}",
        &[&b[0]],
    );
    let proxy = start(settings(vip()), &cfg).await;
    let mut send = common::h1(proxy.outbound_addrs[0]).await;
    for _ in 0..5 {
        assert_eq!(one(&mut send, "GET").await.0, StatusCode::IM_A_TEAPOT);
    }
    assert_eq!(b[0].hits(), 0, "aborted before the upstream");
    proxy.shutdown();

    let cfg = config("{fault: {delay: {fixed: 200ms, percent: 100}}}", &[&b[0]]);
    let proxy = start(settings(vip()), &cfg).await;
    let mut send = common::h1(proxy.outbound_addrs[0]).await;
    let t = Instant::now();
    assert_eq!(one(&mut send, "GET").await.0, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn explain_shows_the_decision_for_a_destination_and_headers() {
    let b = backends(2).await;
    let v1 = format!(
        "[{{address: \"{}\"}}, {{address: \"10.244.0.9:80\", ready: false}}]",
        b[0].addr
    );
    let cfg = split_config(
        CANARY_SPLIT,
        &[("v1.test", "", v1), ("v2.test", "", only(&b[1]))],
    );
    let proxy = start(settings(vip()), &cfg).await;
    let admin = proxy.admin_addr.expect("admin");
    let (status, body) = common::admin_get(admin, &format!("/explain?dst={VIP}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["service"], "svc.test");
    assert_eq!(v["backends"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["backends"][0]["share"], "90 of 100");
    let unready = &v["backends"][0]["endpoints"][1];
    assert_eq!(unready["pickable"], false);
    assert_eq!(unready["why"], "not ready");
    let (_, body) =
        common::admin_get(admin, &format!("/explain?dst={VIP}&header=x-canary:true")).await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["backends"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["backends"][0]["service"], "v2.test");
    let (status, _) = common::admin_get(admin, "/explain").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = common::admin_get(admin, "/explain?dst=nonsense").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
