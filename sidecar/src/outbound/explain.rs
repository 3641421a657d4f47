//! What the outbound side would do now, in words: for `/endpoints` (every set, every
//! endpoint and its state) and `/explain` (one destination, optionally one request's
//! method, path and headers: the service, the backend and why, each endpoint and why it
//! would or would not be picked), and the state gauges of `/metrics` ([`gauges`]).
//! Read-only: nothing here moves a balancer.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use http::HeaderMap;
use serde_json::{Value, json};

use crate::metrics::{Metrics, Name, ServiceLabels};

use super::{
    RouteTable, Target,
    balance::Candidate,
    breaker::State,
    route::{EndpointSet, ServiceRoute},
};

/// Sets the state gauges (breaker state, endpoints ejected now) of every service in
/// `routes` as of `now`, for a scrape; services gone from the config lose their series.
/// A backend shared by several split services reports its worst breaker.
pub fn gauges(routes: &RouteTable, metrics: &Metrics, now: Instant) {
    let mut by_service: HashMap<&Arc<str>, (i64, i64)> = HashMap::new();
    for set in routes.endpoint_sets() {
        let state = match set.state.breaker.as_ref().map(|b| b.state(now)) {
            None | Some(State::Closed) => 0,
            Some(State::Open { .. }) => 1,
            Some(State::HalfOpen) => 2,
        };
        let ejected = set
            .members
            .iter()
            .filter(|m| m.ep.health.ejected_until(now).is_some())
            .count() as i64;
        let e = by_service.entry(&set.service).or_default();
        // Open (1) is worse than half-open (2): rank them for the maximum.
        let rank = |s: i64| [0, 2, 1][s as usize];
        if rank(state) > rank(e.0) {
            e.0 = state;
        }
        e.1 = e.1.max(ejected);
    }
    metrics.breaker_state.clear();
    metrics.ejected_endpoints.clear();
    for (service, (state, ejected)) in by_service {
        let labels = ServiceLabels {
            service: Name(service.clone()),
        };
        metrics.breaker_state.get_or_create(&labels).set(state);
        metrics
            .ejected_endpoints
            .get_or_create(&labels)
            .set(ejected);
    }
}

/// Every endpoint set of `routes` with its state.
pub fn endpoints(routes: &RouteTable, now: Instant) -> Value {
    let sets: Vec<Value> = routes
        .endpoint_sets()
        .iter()
        .map(|s| set(s, None, now))
        .collect();
    json!({ "services": sets })
}

/// What a request to `dst` (with `headers`, from `client`) would meet.
pub fn explain(
    routes: &RouteTable,
    dst: SocketAddr,
    method: Option<&str>,
    path: Option<&str>,
    headers: &HeaderMap,
    client: Option<IpAddr>,
    now: Instant,
) -> Value {
    let Some(target) = routes.lookup(dst) else {
        return json!({
            "destination": dst.to_string(),
            "decision": "not in the config: unknown-destination rule applies (passthrough or deny)",
        });
    };
    let route = target.service();
    let client = client.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let (backends, why) = backend(route, headers);
    let direct = match target {
        Target::Endpoint { set, index, .. } => set.members.get(*index).map(|m| m.ep.addr),
        Target::Service(_) => None,
    };
    let sets: Vec<Value> = backends
        .iter()
        .map(|(s, share)| {
            let mut v = set(s, Some((headers, client)), now);
            if let Some(share) = share {
                v["share"] = json!(share);
            }
            v
        })
        .collect();
    json!({
        "destination": dst.to_string(),
        "request": {"method": method, "path": path},
        "service": &*route.name,
        "protocol": format!("{:?}", route.protocol).to_lowercase(),
        "addressedDirectly": direct.map(|a| a.to_string()),
        "requestPolicy": {
            "requestTimeout": route.policy.request_timeout.map(|d| format!("{d:?}")),
            "retries": route.policy.retry.as_ref().map(|r| json!({
                "attempts": r.attempts,
                "perTryTimeout": r.per_try_timeout.map(|d| format!("{d:?}")),
                "budgetAvailable": route.state.budget.as_ref().map(|b| b.available(now)),
            })),
            "fault": route.policy.fault.is_some(),
            "mirror": route.mirror.as_ref().map(|m| json!({"service": &*m.set.service, "percent": m.percent})),
        },
        "backendChoice": why,
        "backends": sets,
    })
}

/// Backend sets a request could land on, with their share of a weighted split.
type Backends<'r> = Vec<(&'r Arc<EndpointSet>, Option<String>)>;

/// The backends a request could land on and why.
fn backend<'r>(route: &'r ServiceRoute, headers: &HeaderMap) -> (Backends<'r>, String) {
    let all = route.backend_sets();
    if all.len() == 1 && all[0].1.is_none() {
        return (vec![(all[0].0, None)], "the service's own endpoints".into());
    }
    if let Some(m) = route.header_match(headers) {
        return (
            vec![(m, None)],
            format!("a header route of the split sends it to {}", m.service),
        );
    }
    let total: u64 = all.iter().filter_map(|(_, w)| *w).sum();
    let sets = all
        .into_iter()
        .map(|(s, w)| (s, w.map(|w| format!("{w} of {total}"))))
        .collect();
    (
        sets,
        "weighted split: each backend gets its share of requests".into(),
    )
}

fn breaker(set: &EndpointSet, now: Instant) -> Value {
    let Some(b) = &set.state.breaker else {
        return Value::Null;
    };
    let state = b.state(now);
    let stats = b.stats();
    json!({
        "state": state.name(),
        "openForMs": match state {
            State::Open { until } => Some(until.saturating_duration_since(now).as_millis() as u64),
            _ => None,
        },
        "activeRequests": stats.requests,
        "connections": stats.connections,
        "pendingRequests": stats.pending_requests,
        "overflows": {
            "maxConnections": stats.connection_overflows,
            "maxPendingRequests": stats.pending_overflows,
            "maxRequests": stats.request_overflows,
        },
        "timesOpened": stats.opened,
        "rejectedWhileOpen": stats.rejected_open,
    })
}

/// One set; with a request, also whether each endpoint could take it.
fn set(s: &EndpointSet, request: Option<(&HeaderMap, IpAddr)>, now: Instant) -> Value {
    let available = |m: &super::route::Member| m.ep.health.is_available(now);
    let in_zone = s.balancer().stays_in_zone(&s.members, now, available);
    let zone = s.policy.balance.locality.as_ref().map(|l| &*l.zone);
    let mut eps: Vec<Value> = s
        .members
        .iter()
        .map(|m| {
            let ejected_for =
                m.ep.health
                    .ejected_until(now)
                    .map(|u| u.saturating_duration_since(now).as_millis() as u64);
            let why = if let Some(ms) = ejected_for {
                format!("ejected by outlier detection for {ms} ms more")
            } else if in_zone && m.zone() != zone {
                "another zone, while this proxy's zone is healthy".into()
            } else if m.weight == 0
                && s.balancer().algorithm() == remora_crds::policy::LbAlgorithm::Weighted
            {
                "weight 0".into()
            } else {
                "eligible".into()
            };
            json!({
                "address": m.ep.addr.to_string(),
                "identity": m.ep.identity.as_deref(),
                "zone": m.zone.as_deref(),
                "weight": m.weight,
                "ready": true,
                "ejectedForMs": ejected_for,
                "ejections": m.ep.health.ejections(),
                "consecutiveFailures": m.ep.health.consecutive_failures(),
                "ramp": m.ramp(now),
                "inFlight": m.ep.load.in_flight(),
                "latencyEstimateMs": m.ep.load.estimate(now).as_secs_f64() * 1e3,
                "pickable": why == "eligible",
                "why": why,
            })
        })
        .collect();
    eps.extend(s.unroutable.iter().map(|(ep, zone, why)| {
        json!({
            "address": ep.addr.to_string(),
            "identity": ep.identity.as_deref(),
            "zone": zone.as_deref(),
            "ready": false,
            "pickable": false,
            "why": why.as_str(),
        })
    }));
    let hash_key = request.and_then(|(h, client)| s.hash_key(Some(h), client));
    json!({
        "service": &*s.service,
        "algorithm": format!("{:?}", s.balancer().algorithm()),
        "locality": zone.map(|z| json!({"zone": z, "staysInZone": in_zone})),
        "hashKey": hash_key.map(|k| format!("{k:016x}")),
        "breaker": breaker(s, now),
        "ejected": s.state.outlier.as_ref().map(|o| o.ejected(now)),
        "endpoints": eps,
    })
}
