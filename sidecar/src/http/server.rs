//! One hyper server per detected HTTP connection, drained on shutdown.

use std::{convert::Infallible, future::Future, pin::Pin, sync::Arc, time::Duration};

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    ConnMeta,
    coalesce::Coalesce,
    exec::Exec,
    forward::handle,
    stall::{StallGuard, is_write_stall},
    upstream::POOL_IDLE_TIMEOUT,
};
use crate::{
    Context,
    addr::Direction,
    metrics::{OutcomeLabels, Static},
};

/// How long an inbound HTTP/1 connection from an authenticated mesh peer may wait for its
/// next request (hyper's header read timeout also bounds the wait between requests on a
/// kept-alive connection). Longer than the peer's pool keeps an idle connection, so the
/// peer always closes first: no request is ever sent on a connection this side is
/// closing, and the peer's pool stays warm across pauses instead of paying a new mTLS
/// handshake after each one.
pub const MESH_PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(POOL_IDLE_TIMEOUT.as_secs() + 30);

/// How long an outbound HTTP/1 connection from the pod's own app may wait for its next
/// request: long (Envoy's default downstream idle timeout), so that the app's client pool,
/// whatever its idle timeout (Go's is 90 s), closes first and never sends a request on a
/// connection the proxy is closing. Slow request heads are not a threat from the pod's
/// own app; `--header-read-timeout` guards the inbound side.
pub const APP_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Serves one HTTP connection until it ends or shutdown drains it.
pub async fn serve<I>(ctx: Arc<Context>, meta: Arc<ConnMeta>, io: I, http2: bool)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let ctx = ctx.clone();
        let meta = meta.clone();
        service_fn(move |req| {
            let ctx = ctx.clone();
            let meta = meta.clone();
            async move { Ok::<_, Infallible>(handle(&ctx, &meta, req).await) }
        })
    };
    // Detection already chose the protocol, so each gets hyper's own server (the `auto`
    // builder would add a version sniffing layer to every read).
    let limits = &ctx.settings.http_limits;
    let io = StallGuard::new(io, limits.write_stall_timeout);
    let result = if http2 {
        let io = TokioIo::new(Coalesce::new(io));
        let conn = hyper::server::conn::http2::Builder::new(Exec)
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(ctx.settings.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
            .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
            .max_send_buf_size(
                limits
                    .h2_max_send_buf_size
                    .min(usize::try_from(u32::MAX).unwrap_or(usize::MAX)),
            )
            .serve_connection(io, service);
        // HTTP/2: GOAWAY, then the streams in flight finish.
        until_drained(&ctx, Box::pin(conn), |c| c.graceful_shutdown()).await
    } else {
        let head_timeout = match (meta.direction, &meta.peer.0) {
            (Direction::Outbound, _) => APP_CLIENT_IDLE_TIMEOUT,
            (Direction::Inbound, Some(_)) => MESH_PEER_IDLE_TIMEOUT,
            (Direction::Inbound, None) => ctx.settings.header_read_timeout,
        }
        .max(ctx.settings.header_read_timeout);
        let io = TokioIo::new(io);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(head_timeout)
            .max_buf_size(ctx.settings.max_header_bytes.max(8192))
            .keep_alive(true)
            .serve_connection(io, service)
            .with_upgrades();
        // HTTP/1: close once the response in flight is written.
        until_drained(&ctx, Box::pin(conn), |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        let cutoff = if e.is_timeout() {
            Some("header_timeout")
        } else if is_write_stall(&e) {
            Some("write_stall")
        } else {
            None
        };
        if let Some(outcome) = cutoff {
            ctx.metrics
                .abuse
                .http_cutoffs
                .get_or_create(&OutcomeLabels {
                    direction: meta.direction,
                    outcome: Static(outcome),
                })
                .inc();
        }
        tracing::debug!(direction = %meta.direction, client = %meta.client, error = %e, "HTTP connection ended with an error");
    }
}

/// Runs `conn` to its end; once the proxy shuts down, `graceful` asks it to finish what
/// is in flight and stop. The connection comes boxed: hyper's connection state (1-3 KiB)
/// would otherwise sit in this future twice (argument and pinned local) and make the
/// connection task's future ~12 KiB, copied whole into its box at every accept.
async fn until_drained<C>(
    ctx: &Context,
    mut conn: Pin<Box<C>>,
    graceful: fn(Pin<&mut C>),
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::select! {
        r = conn.as_mut() => r,
        () = ctx.shutdown.signaled() => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}
