//! One accepted connection, from original destination to the end: refuse loops, look up
//! policy (inbound port policy, or the outbound route), detect the protocol unless the
//! port is opaque, terminate mesh mTLS (inbound), and hand the connection to the HTTP
//! server or the TCP copier (over mesh mTLS to meshed endpoints, outbound).

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use remora_crds::{
    policy::MtlsMode,
    proxy::{Protocol as ConfigProtocol, UnknownDestinations},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::{
    Context,
    addr::{ClientAddr, Direction, OrigDstAddr},
    detect::{self, Detection, OpaqueReason, Protocol},
    http::{self, ConnMeta},
    inbound::{self, Admission},
    io::PrefixedIo,
    listen::resolve_orig_dst,
    metrics::{DirLabels, Metrics, OutcomeLabels, Peer, ReasonLabels, Static},
    outbound::{self, Target, endpoint::authority_of},
    tls,
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

/// The facts about a connection every stage needs.
#[derive(Clone, Copy)]
struct Conn {
    direction: Direction,
    client: ClientAddr,
    orig_dst: OrigDstAddr,
}

/// Serves one accepted connection.
pub async fn serve(
    ctx: Arc<Context>,
    direction: Direction,
    mut stream: TcpStream,
    client: ClientAddr,
) {
    let orig_dst = match resolve_orig_dst(
        ctx.settings.orig_dst,
        &ctx.listen_addrs,
        &stream,
        client,
        (direction == Direction::Outbound).then_some(client),
    ) {
        Ok(d) => d,
        Err(refusal) => {
            ctx.metrics.connection(direction, refusal.label());
            tracing::warn!(%direction, %client, reason = %refusal, "connection refused");
            return;
        }
    };
    let conn = Conn {
        direction,
        client,
        orig_dst,
    };
    let _in_flight = ctx.shutdown.track();
    let _open = OpenGuard::new(&ctx.metrics, direction);
    ctx.metrics.connection(direction, "accepted");

    // Kubernetes mode: an outbound destination without a route is asked for first. The
    // route found here is the connection's: resolved once, handed down.
    let (snap, route) = crate::control::snapshot_for(&ctx, direction, orig_dst).await;
    let (declared, upstream, mtls) = match direction {
        Direction::Inbound => {
            let policy = snap.config.inbound.for_port(orig_dst.0.port());
            (policy.protocol, Upstream::Addr(orig_dst.0), policy.mtls)
        }
        Direction::Outbound => match route {
            Some(target) => (
                target.service().protocol,
                Upstream::Route(target),
                MtlsMode::Disabled,
            ),
            None => match snap.config.outbound.unknown_destinations {
                UnknownDestinations::Passthrough => {
                    ctx.metrics
                        .unknown_destinations
                        .get_or_create(&ReasonLabels {
                            reason: Static("passthrough"),
                        })
                        .inc();
                    (
                        ConfigProtocol::Detect,
                        Upstream::Addr(orig_dst.0),
                        MtlsMode::Disabled,
                    )
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
    drop(snap);

    // Inbound, even an opaque port may receive mesh mTLS: meshed clients send their
    // ClientHello at once, so only plaintext clients of a server-speaks-first port wait
    // (the detection timeout) unless its mTLS mode is Disabled.
    let detect_as = if direction == Direction::Inbound
        && declared == ConfigProtocol::Opaque
        && mtls != MtlsMode::Disabled
    {
        ConfigProtocol::Detect
    } else {
        declared
    };
    let Ok(detection) = detect_unless_opaque(&ctx, direction, detect_as, &mut stream).await else {
        ctx.metrics.connection(direction, "detect_error");
        return;
    };
    let (protocol, prefix) = match detection {
        Some(d) => (Some(d.protocol), d.prefix),
        None => (None, Bytes::new()),
    };

    if direction == Direction::Inbound
        && mtls != MtlsMode::Disabled
        && matches!(protocol, Some(Protocol::MeshTls(_)))
    {
        mesh_inbound(ctx.clone(), conn, PrefixedIo::new(prefix, stream), declared).await;
        return;
    }
    if mtls == MtlsMode::Strict {
        ctx.metrics.connection(direction, "plaintext_refused");
        let foreign = matches!(protocol, Some(Protocol::ForeignTls(_)));
        ctx.metrics
            .inbound_refused(if foreign { "not_mesh_tls" } else { "plaintext" });
        tracing::info!(%direction, %client, %orig_dst, "plaintext connection refused: mTLS is Strict on this port");
        return;
    }
    if direction == Direction::Inbound && mtls == MtlsMode::Permissive {
        inbound::plaintext::count(&ctx.metrics, client.0.ip());
    }
    proceed(
        ctx.clone(),
        conn,
        stream,
        protocol,
        prefix,
        declared,
        upstream,
        Peer::default(),
    )
    .await;
}

/// Runs detection unless the port is declared opaque; counts the outcome.
async fn detect_unless_opaque<I: AsyncRead + Unpin>(
    ctx: &Context,
    direction: Direction,
    declared: ConfigProtocol,
    io: &mut I,
) -> std::io::Result<Option<Detection>> {
    if declared == ConfigProtocol::Opaque {
        ctx.metrics
            .detect
            .get_or_create(&OutcomeLabels {
                direction,
                outcome: Static("skipped_opaque_port"),
            })
            .inc();
        return Ok(None);
    }
    let d = detect::detect(io, ctx.settings.detect_timeout).await?;
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
    Ok(Some(d))
}

/// Terminates mesh mTLS on the inbound side, then serves what is inside.
async fn mesh_inbound<I>(ctx: Arc<Context>, conn: Conn, io: I, declared: ConfigProtocol)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Conn {
        direction,
        client,
        orig_dst,
    } = conn;
    let Some(identity) = ctx.identity.current() else {
        ctx.metrics.connection(direction, "no_identity");
        ctx.metrics.inbound_refused("no_identity");
        tracing::warn!(%client, %orig_dst, "mesh mTLS connection refused: no workload identity loaded");
        return;
    };
    let accepted = tls::accept(&ctx.handshakes, client.0.ip(), &identity, io, &ctx.metrics);
    let (mut tls, peer) = match accepted.await {
        Ok(ok) => ok,
        Err(e) => {
            ctx.metrics.connection(direction, "tls_handshake_failed");
            tracing::info!(%client, %orig_dst, reason = tls::failure_reason(&e), error = %e, "mTLS handshake failed");
            return;
        }
    };
    drop(identity);
    let Ok(inner) = detect_unless_opaque(&ctx, direction, declared, &mut tls).await else {
        ctx.metrics.connection(direction, "detect_error");
        return;
    };
    let (protocol, prefix) = match inner {
        Some(d) => (Some(d.protocol), d.prefix),
        None => (None, Bytes::new()),
    };
    proceed(
        ctx,
        conn,
        tls,
        protocol,
        prefix,
        declared,
        Upstream::Addr(orig_dst.0),
        Peer(peer),
    )
    .await;
}

/// Serves a (plaintext or decrypted) connection as HTTP or opaque TCP.
#[allow(clippy::too_many_arguments)]
async fn proceed<I>(
    ctx: Arc<Context>,
    conn: Conn,
    mut io: I,
    protocol: Option<Protocol>,
    prefix: Bytes,
    declared: ConfigProtocol,
    upstream: Upstream,
    peer: Peer,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Conn {
        direction,
        client,
        orig_dst,
    } = conn;
    let http_declared = matches!(
        declared,
        ConfigProtocol::Http | ConfigProtocol::Http2 | ConfigProtocol::Grpc
    );
    let http = match &protocol {
        // An opaque port stays opaque whatever its bytes look like.
        _ if declared == ConfigProtocol::Opaque => None,
        Some(Protocol::Http1) => Some(false),
        Some(Protocol::Http2) => Some(true),
        // A port declared HTTP gets HTTP even for garbage (hyper answers 400) ...
        Some(Protocol::Opaque(OpaqueReason::Unrecognised)) if http_declared => Some(false),
        // ... and a silent client is cut off rather than proxied as TCP.
        Some(Protocol::Opaque(OpaqueReason::Timeout | OpaqueReason::Eof)) if http_declared => {
            ctx.metrics.connection(direction, "http_detect_timeout");
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
            peer,
        });
        http::serve(ctx.clone(), meta, PrefixedIo::new(prefix, io), h2).await;
        return;
    }

    if direction == Direction::Inbound
        && let Admission::Refused(refusal) =
            inbound::admit(&ctx, direction, client, orig_dst.0.port(), &peer, None)
    {
        ctx.metrics.connection(direction, refusal_label(&refusal));
        return;
    }
    let start = std::time::SystemTime::now();
    let started = std::time::Instant::now();
    let outcome = match upstream {
        Upstream::Addr(addr) => {
            let ep = ctx.registry.adhoc(addr);
            let idle = ctx.settings.tcp_idle_timeout;
            outbound::tcp::relay(&ctx, conn.into(), &ep, false, &mut io, prefix, idle).await
        }
        Upstream::Route(target) => {
            outbound::tcp::route(&ctx, conn.into(), &target, &mut io, prefix).await
        }
    };
    if let Some(log) = &ctx.access_log {
        log.connection(
            direction,
            client,
            orig_dst,
            outcome.upstream,
            &peer,
            outcome.bytes,
            outcome.flags,
            start,
            started.elapsed(),
        );
    }
}

fn refusal_label(r: &inbound::Refusal) -> &'static str {
    match r {
        inbound::Refusal::Unauthorized { .. } => "unauthorized",
        inbound::Refusal::RateLimited { .. } => "rate_limited",
    }
}

impl From<Conn> for outbound::tcp::ConnFacts {
    fn from(c: Conn) -> Self {
        Self {
            direction: c.direction,
            client: c.client,
            orig_dst: c.orig_dst,
        }
    }
}
