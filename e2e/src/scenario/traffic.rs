//! Traffic through the mesh: the frontend's app calls the reviews Service's ClusterIP,
//! its sidecar balances and splits the requests and carries them over mTLS to the reviews
//! sidecars, which authorize the caller by its SPIFFE identity.

use std::time::{Duration, Instant};

use super::load::LoadSpec;
use super::{SHOP, ScenarioError, Shop, capture, ensure, identity, name, pod_ip};

const REQUESTS: &str = "remora_proxy_requests_total";

fn reviews_url(shop: &Shop<'_>) -> Result<String, ScenarioError> {
    Ok(format!(
        "http://{}:9080/api/reviews",
        shop.cluster_ip("reviews")?
    ))
}

/// App → Service ClusterIP → both sidecars over mTLS, the SPIFFE identities in both
/// proxies' metrics, and (node tier) the bytes on the pod bridge are TLS.
pub async fn mtls(shop: &Shop<'_>) -> Result<(), ScenarioError> {
    let t = Instant::now();
    let frontend = shop.ready_pod("app=frontend").await?;
    let reviews = shop.ready_pods("app=reviews").await?;
    let client_ip = pod_ip(&frontend)?;
    let server_ips = reviews.iter().map(pod_ip).collect::<Result<Vec<_>, _>>()?;
    // Started before the frontend's first request to reviews, so the handshakes are in it.
    let sniffer = match shop.node_netns() {
        Some(ns) => Some(capture::start(&ns, client_ip, &server_ips)?),
        None => None,
    };
    let report = shop.load(
        name(&frontend),
        "frontend",
        &LoadSpec::new(reviews_url(shop)?, 50, Duration::from_secs(3)),
    )?;
    let segments = sniffer.map(capture::Capture::stop);
    let s = &report.summary;
    ensure(s.failed == 0 && s.ok >= 100, || {
        format!("frontend -> reviews: {}", s.line())
    })?;

    let fe = shop.metrics(name(&frontend))?;
    let reviews_id = identity("reviews");
    let out = fe.sum(
        REQUESTS,
        &[("direction", "outbound"), ("peer_identity", &reviews_id)],
    );
    ensure(out >= s.ok as f64, || {
        format!(
            "the frontend's proxy counted {out} outbound requests to {reviews_id}, the client {} answers:\n{}",
            s.ok,
            fe.text()
        )
    })?;
    let frontend_id = identity("frontend");
    let mut inbound = Vec::new();
    for p in &reviews {
        let answered = s.by_pod.get(name(p)).copied().unwrap_or(0);
        let m = shop.metrics(name(p))?;
        let seen = m.sum(
            REQUESTS,
            &[("direction", "inbound"), ("peer_identity", &frontend_id)],
        );
        ensure(answered == 0 || seen >= answered as f64, || {
            format!(
                "{} answered {answered} requests but its proxy counted {seen} inbound from {frontend_id}:\n{}",
                name(p),
                m.text()
            )
        })?;
        inbound.push(format!("{} {seen}", name(p)));
    }
    let wire = match segments {
        Some(segments) => {
            let v = capture::analyse(
                &segments,
                client_ip,
                &["GET /api/reviews", "HTTP/1.1", "PRI * HTTP/2.0", "\"pod\":"],
            );
            ensure(v.segments > 0, || {
                format!(
                    "the capture on the pod bridge saw no TCP payload between {client_ip} and {server_ips:?}"
                )
            })?;
            ensure(v.is_tls_only(), || {
                format!(
                    "the pod bridge carried more than TLS between {client_ip} and {server_ips:?}: {v:?}"
                )
            })?;
            format!(
                "bridge capture (node tier): {} segments, {} payload bytes between the pods, {} ClientHellos, {} TLS records, to ports {:?}, no plaintext HTTP",
                v.segments, v.payload_bytes, v.client_hellos, v.tls_records, v.server_ports
            )
        }
        None => "bridge capture: node tier only, not run on this external cluster".to_owned(),
    };
    println!(
        "scenario mtls: {}; frontend proxy: {out} outbound to {reviews_id}; reviews proxies inbound from {frontend_id}: {}; {wire} ({:.1} s)",
        s.line(),
        inbound.join(", "),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The sample TrafficSplit (90 % reviews-v1, 10 % v2, `x-canary: true` to v2) over
/// 1,000 requests, and the spread over the ready endpoints the reviews MeshPolicy's
/// balancer gives.
pub async fn split_and_spread(shop: &Shop<'_>) -> Result<(), ScenarioError> {
    let t = Instant::now();
    let frontend = shop.ready_pod("app=frontend").await?;
    let v1 = shop.ready_pods("app=reviews,version=v1").await?;
    let v2 = shop.ready_pods("app=reviews,version=v2").await?;
    let algorithm = shop.kubectl(&[
        "-n",
        SHOP,
        "get",
        "meshpolicy",
        "reviews",
        "-o",
        "jsonpath={.spec.loadBalancer.algorithm}",
    ])?;
    let url = reviews_url(shop)?;
    // 125/s keeps each reviews pod well under the policy's 100/s per-identity limit.
    let r = shop.load(
        name(&frontend),
        "frontend",
        &LoadSpec::new(url.clone(), 125, Duration::from_secs(8)),
    )?;
    let s = &r.summary;
    ensure(s.failed == 0 && s.ok >= 1000, || {
        format!("split load: {}", s.line())
    })?;
    let to_v1 = s.answers_from("reviews-v1-");
    let to_v2 = s.answers_from("reviews-v2-");
    let share = to_v1 as f64 * 100.0 / (to_v1 + to_v2).max(1) as f64;
    ensure(
        (85.0..=95.0).contains(&share) && to_v1 + to_v2 == s.ok,
        || {
            format!(
                "reviews-v1 got {share:.1} % ({to_v1} v1, {to_v2} v2 of {} answers), want 90 ± 5 %",
                s.ok
            )
        },
    )?;

    // Within each version the endpoints that should serve do: with preferSameZone, those
    // in the caller's zone when there are any (all healthy here, above any spill-over
    // threshold), else all; every one a real share, evenly for round robin.
    let prefer_zone = shop.kubectl(&[
        "-n",
        SHOP,
        "get",
        "meshpolicy",
        "reviews",
        "-o",
        "jsonpath={.spec.loadBalancer.locality.preferSameZone}",
    ])? == "true";
    let caller_zone = shop.zone_of(&frontend).await?;
    let mut spread = Vec::new();
    for (version, pods, total) in [("v1", &v1, to_v1), ("v2", &v2, to_v2)] {
        let mut zones = Vec::new();
        for p in pods.iter() {
            zones.push(shop.zone_of(p).await?);
        }
        let local = zones.iter().filter(|z| **z == caller_zone).count();
        let serving = if prefer_zone && local > 0 {
            local
        } else {
            pods.len()
        };
        for (p, zone) in pods.iter().zip(&zones) {
            let n = s.by_pod.get(name(p)).copied().unwrap_or(0);
            let fair = total as f64 / serving as f64;
            let expected = !prefer_zone || local == 0 || *zone == caller_zone;
            let ok = match (expected, algorithm.as_str()) {
                (false, _) => n == 0,
                (true, "RoundRobin") => (n as f64 - fair).abs() <= fair * 0.1 + 1.0,
                // Least request (P2C) and the rest: every endpoint gets a real share.
                (true, _) => n as f64 >= fair * 0.4,
            };
            ensure(ok, || {
                format!(
                    "{algorithm} (preferSameZone {prefer_zone}, caller zone {caller_zone:?}): {} ({version}, zone {zone:?}, {}) answered {n} of {total}: {:?}",
                    name(p),
                    if expected {
                        "should serve"
                    } else {
                        "should not serve"
                    },
                    s.by_pod
                )
            })?;
            spread.push(format!("{} {n}", name(p)));
        }
    }

    let h = shop.load(
        name(&frontend),
        "frontend",
        &LoadSpec::new(url, 50, Duration::from_secs(2)).header("x-canary: true"),
    )?;
    let hs = &h.summary;
    let canary = hs.answers_from("reviews-v2-");
    ensure(hs.failed == 0 && hs.ok >= 90 && canary == hs.ok, || {
        format!(
            "x-canary: true: {canary} of {} answers from v2: {}",
            hs.ok,
            hs.line()
        )
    })?;
    println!(
        "scenario split: {} answers, reviews-v1 {share:.1} % ({to_v1}) / v2 {:.1} % ({to_v2}) for 90/10; x-canary: true -> v2 {canary}/{} (100 %); {} ({:.1} s)",
        s.ok,
        100.0 - share,
        hs.ok,
        s.line(),
        t.elapsed().as_secs_f64()
    );
    println!(
        "scenario spread: reviews MeshPolicy {algorithm} (preferSameZone {prefer_zone}, caller zone {}); answers per ready endpoint: {}",
        caller_zone.as_deref().unwrap_or("none"),
        spread.join(", ")
    );
    Ok(())
}

/// reviews' MeshPolicy allows only the frontend identity: the outsider (the `default`
/// service account) gets 403 from the reviews sidecars, the frontend 200.
pub async fn authz(shop: &Shop<'_>) -> Result<(), ScenarioError> {
    let t = Instant::now();
    let frontend = shop.ready_pod("app=frontend").await?;
    let outsider = shop.ready_pod("app=outsider").await?;
    let reviews = shop.ready_pods("app=reviews").await?;
    let denied_before = deny_count(shop, &reviews)?;
    let url = reviews_url(shop)?;
    let spec = LoadSpec::new(url, 20, Duration::from_secs(1));
    let denied = shop.load(name(&outsider), "outsider", &spec)?.summary;
    let allowed = shop.load(name(&frontend), "frontend", &spec)?.summary;
    let forbidden = denied.by_status.get("403").copied().unwrap_or(0);
    ensure(
        denied.requests >= 15 && forbidden == denied.requests,
        || {
            format!(
                "sa/default -> reviews: want every request 403: {}",
                denied.line()
            )
        },
    )?;
    ensure(allowed.failed == 0 && allowed.ok >= 15, || {
        format!(
            "sa/frontend -> reviews: want every request 200: {}",
            allowed.line()
        )
    })?;
    let denied_after = deny_count(shop, &reviews)?;
    let by_proxies = denied_after - denied_before;
    ensure(by_proxies >= forbidden as f64, || {
        format!(
            "the reviews proxies counted {by_proxies} denials, the outsider saw {forbidden} 403s"
        )
    })?;
    println!(
        "scenario authz: sa/default -> reviews {forbidden}/{} 403 (reviews proxies counted {by_proxies} denials), sa/frontend -> reviews {}/{} 200 ({:.1} s)",
        denied.requests,
        allowed.ok,
        allowed.requests,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn deny_count(
    shop: &Shop<'_>,
    pods: &[k8s_openapi::api::core::v1::Pod],
) -> Result<f64, ScenarioError> {
    let mut n = 0.0;
    for p in pods {
        let m = shop.metrics(name(p))?;
        n += m.sum("remora_proxy_authz_total", &[("outcome", "deny")]);
    }
    Ok(n)
}
