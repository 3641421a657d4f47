//! One accepted connection, from original destination to the end: refuse loops, look up
//! policy (inbound port policy, or the outbound route), detect the protocol unless the
//! port is opaque, and hand the connection to the HTTP server or the TCP copier.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use remora_crds::{
    policy::MtlsMode,
    proxy::{Protocol as ConfigProtocol, UnknownDestinations},
};
use tokio::net::TcpStream;

use crate::{
    Context,
    addr::{ClientAddr, Direction, LocalAddr, OrigDstAddr},
    detect::{self, OpaqueReason, Protocol},
    http::{self, ConnMeta},
    io::PrefixedIo,
    listen::resolve_orig_dst,
    metrics::{DirLabels, Metrics, OutcomeLabels, Peer, ReasonLabels, Static},
    route::{Target, authority_of},
    tcp,
};

/// Counts a connection as open while alive.
struct OpenGuard<'a> {
    metrics: &'a Metrics,
    direction: Direction,
}

impl<'a> OpenGuard<'a> {
    fn new(metrics: &'a Metrics, direction: Direction) -> Self {
        metrics
            .open_connections
            .get_or_create(&DirLabels { direction })
            .inc();
        Self { metrics, direction }
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.metrics
            .open_connections
            .get_or_create(&DirLabels {
                direction: self.direction,
            })
            .dec();
    }
}

/// Where the bytes of an opaque connection go (picked only if it turns out opaque, so
/// HTTP connections do not skew the balancer).
enum Upstream {
    Addr(SocketAddr),
    Route(Target),
}

/// Serves one accepted connection.
pub async fn serve(
    ctx: Arc<Context>,
    direction: Direction,
    mut stream: TcpStream,
    client: ClientAddr,
    local: LocalAddr,
) {
    let orig_dst = match resolve_orig_dst(ctx.settings.orig_dst, &ctx.listen_addrs, &stream, local)
    {
        Ok(d) => d,
        Err(refusal) => {
            ctx.metrics.connection(direction, refusal.label());
            tracing::warn!(%direction, %client, reason = %refusal, "connection refused");
            return;
        }
    };
    let _in_flight = ctx.shutdown.track();
    let _open = OpenGuard::new(&ctx.metrics, direction);
    ctx.metrics.connection(direction, "accepted");
    let _ = stream.set_nodelay(true);

    let snap = ctx.config.load();
    // The declared protocol, and for outbound the opaque upstream.
    let (declared, upstream) = match direction {
        Direction::Inbound => {
            let policy = snap.config.inbound.for_port(orig_dst.0.port());
            (policy.protocol, Upstream::Addr(orig_dst.0))
        }
        Direction::Outbound => match snap.routes.lookup(orig_dst.0) {
            Some(target) => (target.service().protocol, Upstream::Route(target.clone())),
            None => match snap.config.outbound.unknown_destinations {
                UnknownDestinations::Passthrough => {
                    ctx.metrics
                        .unknown_destinations
                        .get_or_create(&ReasonLabels {
                            reason: Static("passthrough"),
                        })
                        .inc();
                    (ConfigProtocol::Detect, Upstream::Addr(orig_dst.0))
                }
                UnknownDestinations::Deny => {
                    ctx.metrics
                        .unknown_destinations
                        .get_or_create(&ReasonLabels {
                            reason: Static("denied"),
                        })
                        .inc();
                    ctx.metrics.connection(direction, "unknown_denied");
                    tracing::info!(%direction, %client, %orig_dst, "unknown destination denied");
                    return;
                }
            },
        },
    };
    let strict = direction == Direction::Inbound
        && snap.config.inbound.for_port(orig_dst.0.port()).mtls == MtlsMode::Strict;
    drop(snap);

    let detection = if declared == ConfigProtocol::Opaque {
        ctx.metrics
            .detect
            .get_or_create(&OutcomeLabels {
                direction,
                outcome: Static("skipped_opaque_port"),
            })
            .inc();
        None
    } else {
        match detect::detect(&mut stream, ctx.settings.detect_timeout).await {
            Ok(d) => {
                ctx.metrics
                    .detect
                    .get_or_create(&OutcomeLabels {
                        direction,
                        outcome: Static(d.protocol.label()),
                    })
                    .inc();
                ctx.metrics
                    .detect_duration
                    .get_or_create(&DirLabels { direction })
                    .observe(d.elapsed.as_secs_f64());
                Some(d)
            }
            Err(e) => {
                tracing::debug!(%direction, %client, error = %e, "connection failed during detection");
                ctx.metrics.connection(direction, "detect_error");
                return;
            }
        }
    };
    let (protocol, prefix) = match detection {
        Some(d) => (Some(d.protocol), d.prefix),
        None => (None, Bytes::new()),
    };

    if strict && !matches!(protocol, Some(Protocol::MeshTls(_))) {
        ctx.metrics.connection(direction, "plaintext_refused");
        tracing::info!(%direction, %client, %orig_dst, "plaintext connection refused: mTLS is Strict on this port");
        return;
    }

    let http_declared = matches!(
        declared,
        ConfigProtocol::Http | ConfigProtocol::Http2 | ConfigProtocol::Grpc
    );
    let http = match &protocol {
        Some(Protocol::Http1) => Some(false),
        Some(Protocol::Http2) => Some(true),
        // A port declared HTTP gets HTTP even for garbage (hyper answers 400) ...
        Some(Protocol::Opaque(OpaqueReason::Unrecognised)) if http_declared => Some(false),
        // ... and a silent client is cut off rather than proxied as TCP.
        Some(Protocol::Opaque(OpaqueReason::Timeout | OpaqueReason::Eof)) if http_declared => {
            ctx.metrics.connection(direction, "http_detect_timeout");
            return;
        }
        Some(Protocol::MeshTls(_)) => {
            // Terminating mesh mTLS is not built yet: refusing is safer than handing TLS
            // meant for the proxy to the application.
            ctx.metrics.connection(direction, "mesh_tls_unsupported");
            tracing::warn!(%direction, %client, %orig_dst, "mesh mTLS connection refused: mTLS termination is not available");
            return;
        }
        _ => None,
    };

    if let Some(h2) = http {
        let meta = Arc::new(ConnMeta {
            direction,
            client,
            orig_dst,
            orig_authority: authority_of(orig_dst.0),
            peer: Peer::default(),
        });
        http::serve(ctx.clone(), meta, PrefixedIo::new(prefix, stream), h2).await;
        return;
    }

    let addr = match upstream {
        Upstream::Addr(a) => a,
        Upstream::Route(target) => match target.pick(None) {
            Ok(ep) => ep.addr,
            Err(e) => {
                ctx.metrics.connection(direction, "no_endpoints");
                tracing::info!(%direction, %client, %orig_dst, reason = %e, "connection refused");
                return;
            }
        },
    };
    opaque(&ctx, direction, client, orig_dst, stream, prefix, addr).await;
}

async fn opaque(
    ctx: &Context,
    direction: Direction,
    client: ClientAddr,
    orig_dst: OrigDstAddr,
    mut stream: TcpStream,
    prefix: Bytes,
    addr: SocketAddr,
) {
    let connect =
        tokio::time::timeout(ctx.settings.connect_timeout, TcpStream::connect(addr)).await;
    let mut upstream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ctx.metrics.connection(direction, "connect_failed");
            tracing::info!(%direction, %client, %orig_dst, upstream = %addr, error = %e, "upstream connect failed");
            return;
        }
        Err(_) => {
            ctx.metrics.connection(direction, "connect_timeout");
            tracing::info!(%direction, %client, %orig_dst, upstream = %addr, "upstream connect timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if let Err(e) = tcp::proxy(&ctx.metrics, direction, &mut stream, prefix, &mut upstream).await {
        tracing::debug!(%direction, %client, upstream = %addr, error = %e, "TCP connection ended with an error");
    }
}
