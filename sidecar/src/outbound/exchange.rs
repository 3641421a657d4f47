//! One outbound HTTP request under its service's traffic policy, as a pipeline of small
//! steps: fault injection, the request timeout around everything, the consistent-hash
//! cookie, mirroring, then attempts — each picking a backend and an endpoint, passing
//! the backend's breaker and limits, and reporting its outcome to the endpoint's load
//! and health — and retries with backoff, within the retry budget, only when the policy's
//! conditions hold and the request may be sent again (idempotent, or never reached the
//! upstream; its body read whole).

use std::{
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::{
    Target,
    balance::{self, InFlight},
    breaker::{Breaker, Overflow, Rejected},
    dial,
    endpoint::Endpoint,
    outlier::Outcome,
    retry::{Decision, Stop},
    route::{EndpointSet, Member, MirrorRoute},
    service::{Refused, RequestPermit},
};
use crate::{
    Context,
    access_log::Flags,
    addr::ClientAddr,
    http::{
        Exchange, ProxyBody, ProxyError, Shape, read_small_body,
        upstream::{UpstreamBody, UpstreamError},
    },
    metrics::{Peer, ReasonLabels, Static},
    pool,
};

/// An outbound request, prepared by the HTTP pipeline.
#[derive(Debug)]
pub struct Request {
    pub req: http::Request<UpstreamBody>,
    /// Sent upstream over HTTP/2 (the client spoke it, or the service is HTTP/2 or gRPC).
    pub h2: bool,
    pub upgrade: bool,
    pub head: bool,
    pub client: ClientAddr,
}

/// Sends `r` to `target` under the target service's policy.
pub async fn send(
    ctx: &Context,
    target: &Target,
    r: Request,
    x: &mut Exchange,
) -> Result<Response<ProxyBody>, ProxyError> {
    let route = target.service();
    if let Some(fault) = &route.policy.fault {
        if let Some(status) = fault.abort() {
            ctx.metrics.count_fault("abort");
            return Err(ProxyError::FaultAbort(status));
        }
        if let Some(delay) = fault.delay() {
            ctx.metrics.count_fault("delay");
            x.flags |= Flags::FAULT;
            tokio::time::sleep(delay).await;
        }
    }
    match route.policy.request_timeout {
        Some(t) => match tokio::time::timeout(t, attempts(ctx, target, r, x)).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::RequestTimeout(route.name.clone(), t)),
        },
        None => attempts(ctx, target, r, x).await,
    }
}

async fn attempts(
    ctx: &Context,
    target: &Target,
    r: Request,
    x: &mut Exchange,
) -> Result<Response<ProxyBody>, ProxyError> {
    let route = target.service();
    let Request {
        mut req,
        h2,
        upgrade,
        head,
        client,
    } = r;
    let retry = route.policy.retry.as_ref().filter(|_| !upgrade);
    if let Some(budget) = &route.state.budget {
        budget.deposit(Instant::now());
    }
    // The split is decided once per request: every attempt, and the sticky cookie, stay
    // with the backend the request was split to.
    let set = backend(target, req.headers())?;
    // A sticky session's first request gets its cookie here, so that it is hashed (and
    // answered) with the key the client will send from now on.
    let set_cookie = sticky_cookie(target, set, &mut req);
    if let Some(mirror) = &route.mirror {
        self::mirror(ctx, mirror, &req, h2, x);
    }
    let max = 1 + retry.map_or(0, |p| p.attempts);
    let mut next = Some(req);
    let mut n = 0;
    loop {
        n += 1;
        let Some(mut req) = next.take() else {
            // Unreachable: a retry always carries its copy.
            return Err(ProxyError::ClientBody("request body was consumed".into()));
        };
        let copy = (n < max).then(|| pool::replay_of(&req)).flatten();
        let now = Instant::now();
        let member = pick(target, set, &req, client.0.ip(), now)?;
        let ep = member.ep.clone();
        let mtls = ep.use_mtls(ctx.registry.dialer());
        x.attempts = n;
        x.upstream = Some(ep.addr);
        x.peer = Peer(if mtls { ep.identity.clone() } else { None });
        let permit = set.state.admit_request(now).map_err(|limit| {
            ctx.metrics.count_overflow(&set.service, limit.label());
            limit.into_error(&set.service)
        })?;
        // Between proxies, HTTP/1 requests may share one multiplexed HTTP/2 mTLS
        // connection (`--mesh-protocol h2`); upgrades keep their own HTTP/1 connection.
        let orig_h1 = mtls && !h2 && !upgrade && ctx.settings.mesh_http2;
        let shape = Shape {
            h2: h2 || orig_h1,
            orig_h1,
        };
        shape.apply(&mut req, &ep.authority)?;
        let per_try = retry.and_then(|p| p.per_try_timeout);
        let method = req.method().clone();
        let (outcome, result) = attempt(
            ctx,
            &ep,
            mtls,
            shape.h2,
            req,
            head,
            per_try,
            permit,
            set.state.breaker.as_ref(),
            &set.service,
        )
        .await;
        let refused = matches!(result, Err(ProxyError::Overflow { .. }));
        if !refused && set.state.report(&ep, outcome, Instant::now()) {
            x.flags |= Flags::EJECTED;
            ctx.metrics.count_ejection(&set.service);
        }
        if let (Some(policy), Some(budget)) = (retry, &route.state.budget) {
            let replayable = copy.is_some();
            match policy.decide(n, outcome, &method, replayable, budget, Instant::now()) {
                Decision::Retry { after } => {
                    if let Some(copy) = copy {
                        ctx.metrics.count_retry(&route.name, "retried");
                        x.flags |= Flags::RETRIED;
                        tokio::time::sleep(after).await;
                        next = Some(copy);
                        continue;
                    }
                }
                Decision::Stop(Stop::BudgetExhausted) => {
                    ctx.metrics.count_retry(&route.name, "budget_exhausted");
                }
                Decision::Stop(Stop::BodyNotReplayable) => {
                    ctx.metrics.count_retry(&route.name, "body_not_replayable");
                }
                Decision::Stop(_) => {}
            }
        }
        let mut resp = result?;
        if let Some(cookie) = set_cookie {
            resp.headers_mut().append(header::SET_COOKIE, cookie);
        }
        return Ok(resp);
    }
}

/// The backend set of one request: the split's choice for a service, the endpoint's own
/// set for an endpoint addressed directly.
fn backend<'t>(
    target: &'t Target,
    headers: &HeaderMap,
) -> Result<&'t Arc<EndpointSet>, ProxyError> {
    match target {
        Target::Endpoint { set, .. } => Ok(set),
        Target::Service(route) => route
            .backend(Some(headers))
            .map_err(|e| ProxyError::NoEndpoints(e.service)),
    }
}

/// The endpoint of `set` for one attempt.
fn pick<'t>(
    target: &Target,
    set: &'t EndpointSet,
    req: &http::Request<UpstreamBody>,
    client: IpAddr,
    now: Instant,
) -> Result<&'t Member, ProxyError> {
    let member = match target {
        Target::Endpoint { index, .. } => set.members.get(*index),
        Target::Service(_) => {
            let key = set.hash_key(Some(req.headers()), client);
            set.pick(key, now)
        }
    };
    member.ok_or_else(|| ProxyError::NoEndpoints(target.service().name.clone()))
}

/// One attempt on one endpoint: its outcome (for health, breaker and retries) and the
/// response or error the client would get.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    ctx: &Context,
    ep: &Arc<Endpoint>,
    mtls: bool,
    h2: bool,
    req: http::Request<UpstreamBody>,
    head: bool,
    per_try: Option<Duration>,
    permit: RequestPermit,
    limits: Option<&Arc<Breaker>>,
    service: &Arc<str>,
) -> (Outcome, Result<Response<ProxyBody>, ProxyError>) {
    let in_flight = InFlight::start(ep.clone(), Instant::now());
    let pools = ep.pools(ctx.registry.dialer(), mtls);
    let sent = dial::with_limits(limits, pools.send(h2, req));
    let result = match per_try {
        Some(t) => match tokio::time::timeout(t, sent).await {
            Ok(r) => r,
            Err(_) => {
                permit.finish(Outcome::Timeout, Instant::now());
                return (
                    Outcome::Timeout,
                    Err(ProxyError::RequestTimeout(
                        Arc::from(ep.authority.as_str()),
                        t,
                    )),
                );
            }
        },
        None => sent.await,
    };
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            if let Some(overflow) = overflow_of(&e) {
                // Refused before any connection: neither the endpoint's nor the
                // breaker's failure.
                drop(permit);
                return (
                    Outcome::Connected,
                    Err(Refused(Rejected::Overflow(overflow)).into_error(service)),
                );
            }
            let outcome = if e.is_connect() {
                Outcome::ConnectFailure
            } else {
                Outcome::Reset
            };
            permit.finish(outcome, Instant::now());
            return (
                outcome,
                Err(ProxyError::from_upstream(ep.authority.clone(), &e)),
            );
        }
    };
    let now = Instant::now();
    ep.load
        .observe(now.saturating_duration_since(in_flight.started()), now);
    let outcome = Outcome::Response(resp.status().as_u16());
    match read_small_body(resp, head, &ep.authority).await {
        // Read whole: the exchange with this endpoint is over.
        Ok(resp) if resp.body().is_end_stream() || resp.body().size_hint().exact().is_some() => {
            permit.finish(outcome, Instant::now());
            (outcome, Ok(resp))
        }
        // Streamed: the endpoint stays busy, and the request holds its slot, until the
        // body ends.
        Ok(resp) => (
            outcome,
            Ok(resp.map(|inner| {
                Guarded {
                    inner,
                    guard: Some((in_flight, permit, outcome)),
                }
                .boxed()
            })),
        ),
        Err(e) => {
            permit.finish(Outcome::Reset, Instant::now());
            (Outcome::Reset, Err(e))
        }
    }
}

/// The connection-limit overflow that failed a send, if that is what failed it.
fn overflow_of(e: &UpstreamError) -> Option<Overflow> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e.cause());
    while let Some(s) = source {
        if let Some(o) = s.downcast_ref::<Overflow>() {
            return Some(*o);
        }
        source = s.source();
    }
    None
}

/// A response body that holds its endpoint's in-flight count and its service's request
/// permit until it ends; the breaker hears the outcome then.
struct Guarded {
    inner: ProxyBody,
    guard: Option<(InFlight<Arc<Endpoint>>, RequestPermit, Outcome)>,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled
            && let Some((in_flight, permit, outcome)) = self.guard.take()
        {
            permit.finish(outcome, Instant::now());
            drop(in_flight);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Adds the sticky-session cookie to a request that lacks it, and returns the
/// `Set-Cookie` for its response.
fn sticky_cookie(
    target: &Target,
    set: &EndpointSet,
    req: &mut http::Request<UpstreamBody>,
) -> Option<HeaderValue> {
    if matches!(target, Target::Endpoint { .. }) {
        return None;
    }
    let cookie = set.policy.hash.as_ref()?.cookie.as_ref()?;
    if balance::hash::cookie_value(req.headers(), &cookie.name).is_some() {
        return None;
    }
    let value = balance::hash::new_cookie_value();
    let pair = format!("{}={value}", cookie.name);
    let merged = match req
        .headers()
        .get(header::COOKIE)
        .and_then(|c| c.to_str().ok())
    {
        Some(existing) if !existing.is_empty() => format!("{existing}; {pair}"),
        _ => pair.clone(),
    };
    req.headers_mut()
        .insert(header::COOKIE, HeaderValue::from_str(&merged).ok()?);
    let mut set_cookie = format!("{pair}; Path={}; HttpOnly", cookie.path);
    if let Some(ttl) = cookie.ttl {
        set_cookie.push_str(&format!("; Max-Age={}", ttl.as_secs()));
    }
    HeaderValue::from_str(&set_cookie).ok()
}

/// How long a mirrored request may take before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// Copies a share of requests to the shadow service, fire and forget: never delays or
/// fails the primary. Only bodies already read whole can be copied.
fn mirror(
    ctx: &Context,
    m: &MirrorRoute,
    req: &http::Request<UpstreamBody>,
    h2: bool,
    x: &mut Exchange,
) {
    if fastrand::u32(0..100) >= m.percent {
        return;
    }
    let Some(mut copy) = pool::replay_of(req) else {
        ctx.metrics.count_mirror("skipped_streamed_body");
        return;
    };
    let Some(member) = m.set.pick(None, Instant::now()) else {
        ctx.metrics.count_mirror("no_endpoints");
        return;
    };
    x.flags |= Flags::MIRRORED;
    let ep = member.ep.clone();
    let dialer = ctx.registry.dialer().clone();
    let metrics = ctx.metrics.clone();
    let mtls = ep.use_mtls(&dialer);
    tokio::spawn(async move {
        if (Shape { h2, orig_h1: false })
            .apply(&mut copy, &ep.authority)
            .is_err()
        {
            return;
        }
        let sent = async {
            let resp = ep.pools(&dialer, mtls).send(h2, copy).await.ok()?;
            // Read the answer to its end so its connection goes back to the pool.
            resp.into_body().collect().await.ok()
        };
        let outcome = match tokio::time::timeout(MIRROR_TIMEOUT, sent).await {
            Ok(Some(_)) => "sent",
            Ok(None) => "failed",
            Err(_) => "timed_out",
        };
        metrics
            .mirror
            .get_or_create(&ReasonLabels {
                reason: Static(outcome),
            })
            .inc();
    });
}
