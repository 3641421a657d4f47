//! Opaque TCP to an outbound destination: balanced per connection (by source IP when the
//! policy hashes), bounded by the service's connection limit and breaker, dialed by the
//! one [`Dialer`](super::dial::Dialer), and relayed until both sides are done or the
//! idle timeout in force cuts it. The outcome (connect failure, or a connection that
//! carried traffic) feeds the endpoint's health and the service's breaker.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Target, balance::InFlight, endpoint::Endpoint, outlier::Outcome, service::ServiceState,
};
use crate::{
    Context,
    access_log::Flags,
    addr::{ClientAddr, Direction, OrigDstAddr},
    tcp,
};

/// The facts about a connection the relay logs with.
#[derive(Clone, Copy, Debug)]
pub struct ConnFacts {
    pub direction: Direction,
    pub client: ClientAddr,
    pub orig_dst: OrigDstAddr,
}

/// What became of a relayed connection.
#[derive(Debug, Default)]
pub struct TcpOutcome {
    pub upstream: Option<SocketAddr>,
    /// Bytes from the client, bytes to the client.
    pub bytes: (u64, u64),
    pub flags: Flags,
}

/// Routes one opaque connection to an endpoint of `target` and relays it.
pub async fn route<I>(
    ctx: &Context,
    conn: ConnFacts,
    target: &Target,
    io: &mut I,
    prefix: Bytes,
) -> TcpOutcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    let now = Instant::now();
    let svc = target.service();
    let picked = match target {
        Target::Endpoint { set, index, .. } => set.members.get(*index).map(|m| (set, m)),
        Target::Service(route) => route.backend(None).ok().and_then(|set| {
            let key = set.hash_key(None, conn.client.0.ip());
            set.pick(key, now).map(|m| (set, m))
        }),
    };
    let Some((set, member)) = picked else {
        ctx.metrics.connection(conn.direction, "no_endpoints");
        tracing::info!(direction = %conn.direction, client = %conn.client, orig_dst = %conn.orig_dst, service = %svc.name, "connection refused: no ready endpoints");
        return TcpOutcome {
            flags: Flags::NO_ENDPOINTS,
            ..TcpOutcome::default()
        };
    };
    let admitted = set.state.admit_connection(now);
    let _permit = match admitted {
        Ok(permit) => permit,
        Err(limit) => {
            ctx.metrics.connection(conn.direction, limit.label());
            tracing::info!(direction = %conn.direction, client = %conn.client, service = %set.service, reason = %limit, "connection refused by circuit breaker");
            return TcpOutcome {
                flags: Flags::CIRCUIT_OPEN,
                ..TcpOutcome::default()
            };
        }
    };
    let mtls = member.ep.use_mtls(ctx.registry.dialer());
    let idle = set
        .policy
        .idle_timeout
        .unwrap_or(ctx.settings.tcp_idle_timeout);
    relay_reporting(
        ctx,
        conn,
        &member.ep,
        mtls,
        io,
        prefix,
        idle,
        Some(&set.state),
    )
    .await
}

/// Relays one opaque connection to `ep` with no policy (inbound, passthrough).
pub async fn relay<I>(
    ctx: &Context,
    conn: ConnFacts,
    ep: &Arc<Endpoint>,
    mtls: bool,
    io: &mut I,
    prefix: Bytes,
    idle: std::time::Duration,
) -> TcpOutcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    relay_reporting(ctx, conn, ep, mtls, io, prefix, idle, None).await
}

#[allow(clippy::too_many_arguments)]
async fn relay_reporting<I>(
    ctx: &Context,
    conn: ConnFacts,
    ep: &Arc<Endpoint>,
    mtls: bool,
    io: &mut I,
    prefix: Bytes,
    idle: std::time::Duration,
    state: Option<&Arc<ServiceState>>,
) -> TcpOutcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut outcome = TcpOutcome {
        upstream: Some(ep.addr),
        ..TcpOutcome::default()
    };
    // Counted in flight for as long as the connection lives: least request balances
    // connections by how many each endpoint holds.
    let in_flight = InFlight::start(ep.clone(), Instant::now());
    let upstream = ctx.registry.dialer().dial(ep.dial_target(mtls)).await;
    let now = Instant::now();
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            ctx.metrics.connection(conn.direction, e.label());
            tracing::info!(direction = %conn.direction, client = %conn.client, orig_dst = %conn.orig_dst, upstream = %ep.addr, error = %e, "upstream connect failed");
            if let Some(state) = state
                && state.report(ep, Outcome::ConnectFailure, now)
            {
                outcome.flags |= Flags::EJECTED;
            }
            return outcome;
        }
    };
    ep.load
        .observe(now.saturating_duration_since(in_flight.started()), now);
    let mut upstream = hyper_util::rt::TokioIo::new(&mut upstream);
    let result = tcp::proxy(
        &ctx.metrics,
        conn.direction,
        io,
        prefix,
        &mut upstream,
        idle,
    )
    .await;
    match result {
        Ok(bytes) => outcome.bytes = bytes,
        Err(e) => {
            if e.kind() == std::io::ErrorKind::TimedOut {
                outcome.flags |= Flags::TIMEOUT;
            }
            tracing::debug!(direction = %conn.direction, client = %conn.client, upstream = %ep.addr, error = %e, "TCP connection ended with an error");
        }
    }
    if let Some(state) = state {
        state.report(ep, Outcome::Connected, Instant::now());
    }
    drop(in_flight);
    outcome
}
