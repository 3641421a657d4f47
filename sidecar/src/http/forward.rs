//! The per-request pipeline: admission (inbound), the request rewritten for its upstream,
//! the exchange, the response written back, and what the request leaves behind (metrics,
//! the access log). Policy lives in [`crate::outbound::exchange`] (outbound) and
//! [`crate::inbound`] (admission); this module only moves requests.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use http::{
    HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use remora_crds::proxy::{Protocol, UnknownDestinations};

use super::{
    ConnMeta, ORIG_PROTO, ProxyBody, ProxyError, full,
    headers::{buffered, is_upgrade, strip_hop_by_hop},
    idle::IdleBody,
    upstream::UpstreamBody,
};
use crate::{
    Context,
    access_log::{self, Flags},
    addr::Direction,
    inbound::{self, Admission},
    metrics::{DirLabels, OutcomeLabels, Peer, RequestLabels, Static},
    outbound, trace,
};

/// What became of one request beyond its response: for metrics and the access log.
#[derive(Debug, Default)]
pub struct Exchange {
    /// Attempts sent upstream (retries are the rest).
    pub attempts: u32,
    /// The endpoint of the last attempt.
    pub upstream: Option<SocketAddr>,
    /// The identity of the peer: the upstream's (outbound) or the client's (inbound).
    pub peer: Peer,
    pub flags: Flags,
    /// Response body bytes read whole, when known (streamed bodies are not counted here).
    pub response_bytes: Option<u64>,
    pub request_bytes: Option<u64>,
}

pub(super) async fn handle(
    ctx: &Context,
    meta: &ConnMeta,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let started_at = std::time::SystemTime::now();
    let downstream_version = req.version();
    let log = ctx
        .access_log
        .as_ref()
        .map(|_| access_log::RequestFacts::of(&req));
    let mut x = Exchange::default();
    let mut resp = match forward(ctx, meta, req, &mut x).await {
        Ok(resp) => resp,
        Err(e) => {
            ctx.metrics
                .proxy_errors
                .get_or_create(&OutcomeLabels {
                    direction: meta.direction,
                    outcome: Static(e.label()),
                })
                .inc();
            x.flags |= e.flags();
            tracing::debug!(direction = %meta.direction, client = %meta.client, orig_dst = %meta.orig_dst, error = %e, "request failed");
            e.into_response()
        }
    };
    *resp.version_mut() = downstream_version;
    let elapsed = start.elapsed();
    ctx.metrics
        .requests
        .get_or_create(&RequestLabels {
            direction: meta.direction,
            status: resp.status().as_u16(),
            peer_identity: x.peer.clone(),
        })
        .inc();
    ctx.metrics
        .request_duration
        .get_or_create(&DirLabels {
            direction: meta.direction,
        })
        .observe(elapsed.as_secs_f64());
    if let (Some(writer), Some(facts)) = (&ctx.access_log, log) {
        writer.request(meta, facts, &resp, &x, started_at, elapsed);
    }
    resp
}

async fn forward(
    ctx: &Context,
    meta: &ConnMeta,
    mut req: Request<Incoming>,
    x: &mut Exchange,
) -> Result<Response<ProxyBody>, ProxyError> {
    let downstream_h2 = req.version() == Version::HTTP_2;
    let upgrade = !downstream_h2 && is_upgrade(req.headers());
    match meta.direction {
        Direction::Inbound => {
            x.peer = meta.peer.clone();
            let port = meta.orig_dst.0.port();
            let access = (req.method().as_str(), req.uri().path());
            if let Admission::Refused(refusal) = inbound::admit(
                ctx,
                meta.direction,
                meta.client,
                port,
                &meta.peer,
                Some(access),
            ) {
                return Err(refusal.into());
            }
            // Only a mesh peer may ask for the downgrade; strip the header from anyone.
            let marked = req
                .headers_mut()
                .remove(&ORIG_PROTO)
                .is_some_and(|v| v == "HTTP/1.1");
            let h2 = downstream_h2 && !(marked && meta.peer.0.is_some());
            direct(ctx, meta, req, h2, upgrade, x).await
        }
        Direction::Outbound => {
            let snap = ctx.config.load();
            let target = match snap.routes.lookup(meta.orig_dst.0) {
                Some(t) => t.clone(),
                None => match snap.config.outbound.unknown_destinations {
                    UnknownDestinations::Deny => {
                        return Err(ProxyError::UnknownDenied(meta.orig_dst));
                    }
                    UnknownDestinations::Passthrough => {
                        drop(snap);
                        return direct(ctx, meta, req, downstream_h2, upgrade, x).await;
                    }
                },
            };
            drop(snap);
            let (req, downstream_upgrade, head) =
                guarded(req, upgrade, ctx.settings.http_limits.body_idle_timeout).await?;
            x.request_bytes = request_len(&req);
            let h2 = downstream_h2
                || matches!(target.service().protocol, Protocol::Http2 | Protocol::Grpc);
            let request = outbound::exchange::Request {
                req,
                h2,
                upgrade,
                head,
                client: meta.client,
            };
            let resp = outbound::exchange::send(ctx, &target, request, x).await?;
            x.response_bytes = response_len(&resp);
            Ok(finish(resp, downstream_upgrade, meta.direction))
        }
    }
}

/// A request sent where the client meant it to go, with no policy: inbound to the local
/// app, or outbound to a destination the config does not know (passthrough).
async fn direct(
    ctx: &Context,
    meta: &ConnMeta,
    req: Request<Incoming>,
    h2: bool,
    upgrade: bool,
    x: &mut Exchange,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut req, downstream_upgrade, head) =
        guarded(req, upgrade, ctx.settings.http_limits.body_idle_timeout).await?;
    let request_len_hint = request_len(&req);
    Shape { h2, orig_h1: false }.apply(&mut req, &meta.orig_authority)?;
    let ep = ctx.registry.adhoc(meta.orig_dst.0);
    x.attempts = 1;
    x.upstream = Some(ep.addr);
    let resp = ep
        .pools(ctx.registry.dialer(), false)
        .send(h2, req)
        .await
        .map_err(|e| ProxyError::from_upstream(ep.authority.clone(), &e))?;
    let resp = read_small_body(resp, head, &ep.authority).await?;
    x.request_bytes = request_len_hint;
    x.response_bytes = response_len(&resp);
    Ok(finish(resp, downstream_upgrade, meta.direction))
}

/// The upgrade half a switching response hands over, taken from the request.
type DownstreamUpgrade = Option<hyper::upgrade::OnUpgrade>;

/// Rewrites a request for any upstream: hop-by-hop headers out, a request id and a new
/// span in, and a small HTTP/1 body read whole (`Host` is [`Shape::apply`]'s). Returns the request, the
/// downstream half of an upgrade, and whether it is a `HEAD`. Public for the fuzz
/// targets (`fuzz/`) only.
#[doc(hidden)]
pub async fn prepare(
    req: Request<Incoming>,
    upgrade: bool,
) -> Result<(Request<UpstreamBody>, DownstreamUpgrade, bool), ProxyError> {
    guarded(req, upgrade, super::HttpLimits::default().body_idle_timeout).await
}

/// [`prepare`], the body failing once it sends nothing for `body_idle`.
async fn guarded(
    mut req: Request<Incoming>,
    upgrade: bool,
    body_idle: Duration,
) -> Result<(Request<UpstreamBody>, DownstreamUpgrade, bool), ProxyError> {
    let downstream_h2 = req.version() == Version::HTTP_2;
    strip_hop_by_hop(req.headers_mut(), upgrade);
    trace::ensure_request_id(req.headers_mut());
    trace::new_span(req.headers_mut());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let head = req.method() == Method::HEAD;
    let req = if !downstream_h2 && !upgrade && buffered(req.headers()) {
        let (parts, body) = req.into_parts();
        let bytes = IdleBody::new(body, body_idle)
            .collect()
            .await
            .map_err(|e| ProxyError::from_client_body(e.as_ref()))?
            .to_bytes();
        Request::from_parts(parts, Either::Right(Full::new(bytes)))
    } else {
        req.map(|body| Either::Left(IdleBody::new(body, body_idle)))
    };
    Ok((req, downstream_upgrade, head))
}

/// How a prepared request leaves for one upstream attempt.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Sent over HTTP/2.
    pub h2: bool,
    /// An HTTP/1 request riding HTTP/2 between two proxies (marked for the far side).
    pub orig_h1: bool,
}

impl Shape {
    /// Sets version, URI form and markers. HTTP/2 keeps the request's own authority as
    /// `:authority` (the endpoint's pool decides where the connection goes); HTTP/1 sends
    /// the origin form, `Host` naming the authority (`fallback` when it had none).
    pub fn apply(
        self,
        req: &mut Request<UpstreamBody>,
        fallback: &Authority,
    ) -> Result<(), ProxyError> {
        if self.orig_h1 {
            req.headers_mut()
                .insert(&ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
        // HTTP/1 names the authority in `Host`: an HTTP/2 request's `:authority` (or an
        // absolute-form target's) becomes it when the request goes on as HTTP/1. Over
        // HTTP/2 `:authority` says it, and a `Host` beside it would be one more header
        // to encode and decode on every hop.
        if !self.h2 && !req.headers().contains_key(header::HOST) {
            let authority = req.uri().authority().unwrap_or(fallback);
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        // An absolute-form target may have an empty path (`http://a#x`, found by fuzzing),
        // which an origin form without its authority would send as an empty request
        // target: rebuild it from its normalised text (origin forms always have a path).
        let path = match req.uri().path_and_query() {
            Some(p) if req.uri().authority().is_none() => p.clone(),
            Some(p) => {
                let s = p.as_str();
                let s = if s.starts_with('/') || s == "*" {
                    s.to_owned()
                } else {
                    format!("/{s}")
                };
                PathAndQuery::try_from(s)
                    .map_err(|e| ProxyError::Upstream(fallback.clone(), e.to_string()))?
            }
            None => PathAndQuery::from_static("/"),
        };
        let mut parts = http::uri::Parts::default();
        if self.h2 {
            let authority = req.uri().authority().cloned().or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            });
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(authority.unwrap_or_else(|| fallback.clone()));
        }
        parts.path_and_query = Some(path);
        *req.uri_mut() = Uri::from_parts(parts)
            .map_err(|e| ProxyError::Upstream(fallback.clone(), e.to_string()))?;
        *req.version_mut() = if self.h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        Ok(())
    }
}

/// Reads a small HTTP/1 response body whole (see [`buffered`]); a HEAD, 204 or 304
/// answer has a length but no body to read.
pub async fn read_small_body(
    resp: Response<ProxyBody>,
    head: bool,
    authority: &Authority,
) -> Result<Response<ProxyBody>, ProxyError> {
    let bodiless =
        head || matches!(
            resp.status(),
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        ) || resp.status().is_informational();
    if resp.version() != Version::HTTP_11 || bodiless || !buffered(resp.headers()) {
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| ProxyError::Upstream(authority.clone(), e.to_string()))?
        .to_bytes();
    Ok(Response::from_parts(parts, full(bytes)))
}

/// Hands a switched connection's two halves to a copier, and drops hop-by-hop headers.
fn finish(
    mut resp: Response<ProxyBody>,
    downstream_upgrade: DownstreamUpgrade,
    direction: Direction,
) -> Response<ProxyBody> {
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (Some(downstream), true) = (downstream_upgrade, switching) {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(downstream, upstream) {
                Ok((down, up)) => {
                    let mut down = TokioIo::new(down);
                    let mut up = TokioIo::new(up);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                        tracing::debug!(%direction, error = %e, "upgraded connection ended with an error");
                    }
                }
                Err(e) => tracing::debug!(%direction, error = %e, "upgrade failed"),
            }
        });
        strip_hop_by_hop(resp.headers_mut(), true);
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    resp
}

fn request_len(req: &Request<UpstreamBody>) -> Option<u64> {
    match req.body() {
        Either::Right(full) => hyper::body::Body::size_hint(full).exact(),
        Either::Left(_) => None,
    }
}

fn response_len(resp: &Response<ProxyBody>) -> Option<u64> {
    hyper::body::Body::size_hint(resp.body()).exact()
}
