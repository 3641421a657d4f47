//! Listeners: accept loops for the outbound (15001) and inbound (15006) capture ports.
//! Each accepted connection gets its original destination (`SO_ORIGINAL_DST`); one that
//! was not redirected (no NAT entry, or its destination is one of the proxy's own
//! listeners) is refused and counted, so the proxy can never loop into itself.
//!
//! The accept path makes no system call it can do without: the original destination's
//! address family comes from the client's address (a TCP socket's two ends share it), and
//! the socket's own address (`getsockname`) is asked only when the destination's port is
//! one of the proxy's listener ports, the only case where it can decide a loop. Accepted
//! sockets inherit `TCP_NODELAY` from their listener (set once in [`crate::Proxy::start`]).
//!
//! A failing `accept` (out of file descriptors, most often: the connection stays in the
//! kernel's backlog and the listener stays readable) would otherwise spin the loop at
//! 100 % CPU. The loop backs off instead, 10 ms doubling to 100 ms while the failures go
//! on, counts each one by reason (`remora_proxy_accept_errors_total{reason="emfile"}`),
//! warns once per run of failures and resumes at full speed with the first success. A
//! failure that concerns one connection only (`connection`) is counted and the loop goes on.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use crate::{
    Context,
    addr::{ClientAddr, Direction, OrigDstAddr},
    conn, orig_dst,
};

/// How a listener learns where a connection was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrigDstMode {
    /// Ask the kernel (`SO_ORIGINAL_DST`): production, behind iptables `REDIRECT` rules.
    Kernel,
    /// Every connection goes to this address. Only for in-process test harnesses that run
    /// without iptables; the binary has no flag for it.
    Fixed(SocketAddr),
}

/// Why a connection was not proxied.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("connection from {0} was not redirected (no original destination: {1})")]
    NotRedirected(ClientAddr, std::io::Error),
    #[error("original destination {0} is the proxy's own listener; refusing to loop")]
    Loop(OrigDstAddr),
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotRedirected(..) => "not_redirected",
            Self::Loop(_) => "loop_refused",
        }
    }
}

/// The original destination of `stream`, unless it points back at the proxy.
/// `local_client` is the client of an outbound connection (see [`is_own`]).
pub fn resolve_orig_dst(
    mode: OrigDstMode,
    own: &[SocketAddr],
    stream: &TcpStream,
    client: ClientAddr,
    local_client: Option<ClientAddr>,
) -> Result<OrigDstAddr, Refusal> {
    let dst = match mode {
        OrigDstMode::Kernel => {
            orig_dst::original_dst(stream, client).map_err(|e| Refusal::NotRedirected(client, e))?
        }
        OrigDstMode::Fixed(addr) => OrigDstAddr(addr),
    };
    // The socket's local port is one of `own`'s (it was accepted by one of them), so a
    // destination on any other port can be neither the socket itself nor a listener:
    // no need to ask for the local address.
    if !own.iter().any(|o| o.port() == dst.0.port()) {
        return Ok(dst);
    }
    // Not knowing the local address, refuse: the socket is gone anyway.
    let looped = stream.local_addr().map_or(true, |local| {
        is_own(dst.0, local, local_client.map(|c| c.0), own)
    });
    if looped {
        return Err(Refusal::Loop(dst));
    }
    Ok(dst)
}

/// Does `dst` name one of the proxy's own listeners? It does when it equals the socket's
/// local address (nothing rewrote the destination), or when it is a listener port on a
/// loopback, unspecified or local IP. `local_client` is the client of an outbound
/// connection, which always has one of this host's addresses.
fn is_own(
    dst: SocketAddr,
    local: SocketAddr,
    local_client: Option<SocketAddr>,
    own: &[SocketAddr],
) -> bool {
    let unmap = remora_init::orig_dst::canonical;
    let (dst, local) = (unmap(dst), unmap(local));
    let client_ip = local_client.map(|c| unmap(c).ip());
    if dst == local {
        return true;
    }
    own.iter().map(|o| unmap(*o)).any(|o| {
        o.port() == dst.port()
            && (o.ip() == dst.ip()
                || dst.ip().is_loopback()
                || dst.ip().is_unspecified()
                || dst.ip() == local.ip()
                || Some(dst.ip()) == client_ip)
    })
}

/// The first pause after a failed `accept`, doubled while failures continue ...
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// ... up to this.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// Linux errno values of the accept failures told apart (checked against libc in tests).
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;
const ENOBUFS: i32 = 105;
const ENOMEM: i32 = 12;
const ECONNABORTED: i32 = 103;
const ECONNRESET: i32 = 104;
const EPROTO: i32 = 71;
const EPERM: i32 = 1;

/// The metric label of a failed `accept`.
fn accept_error_reason(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(EMFILE) => "emfile",
        Some(ENFILE) => "enfile",
        Some(ENOBUFS | ENOMEM) => "nomem",
        Some(ECONNABORTED | ECONNRESET | EPROTO | EPERM) => "connection",
        _ => "other",
    }
}

/// The pause after `prev` (zero: the first failure of a run).
fn next_backoff(prev: Duration) -> Duration {
    (prev * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX)
}

/// The run of failed accepts in progress, if any.
#[derive(Debug, Default)]
struct AcceptFailures {
    run: u64,
    backoff: Duration,
}

impl AcceptFailures {
    /// Counts a failure; the pause before the next attempt.
    /// A failure of one connection (`connection`: aborted before it was accepted, refused
    /// by a security module, ...) is no reason to slow down: the next attempt is at once,
    /// or a client resetting connections in a loop would stall everyone's accepts.
    fn failed(&mut self, ctx: &Context, direction: Direction, e: &std::io::Error) -> Duration {
        let reason = accept_error_reason(e);
        ctx.metrics
            .abuse
            .accept_errors
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: crate::metrics::Static(reason),
            })
            .inc();
        if reason == "connection" {
            tracing::debug!(%direction, error = %e, "accept failed for one connection");
            return Duration::ZERO;
        }
        if self.run == 0 {
            tracing::warn!(%direction, reason, error = %e, "accept failed; backing off until it works again");
        }
        self.run += 1;
        self.backoff = next_backoff(self.backoff);
        self.backoff
    }

    /// An accept worked: the run of failures, if any, is over.
    fn succeeded(&mut self, direction: Direction) {
        if self.run > 0 {
            tracing::info!(%direction, failures = self.run, "accepting again");
            *self = Self::default();
        }
    }
}

/// Accepts connections until shutdown starts, then returns (closing the listener).
pub async fn accept_loop(ctx: Arc<Context>, listener: TcpListener, direction: Direction) {
    let shutdown = ctx.shutdown.signaled();
    tokio::pin!(shutdown);
    let mut failures = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                failures.succeeded(direction);
                a
            }
            Err(e) => {
                let pause = failures.failed(&ctx, direction, &e);
                if pause.is_zero() {
                    continue;
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
        };
        // Boxed: the connection's state machine (detection, TLS) is several KB, and
        // spawning it unboxed copies all of it more than once per connection. hyper's
        // connection is boxed apart (`http::server::until_drained`), so this box stays
        // small.
        tokio::spawn(Box::pin(conn::serve(
            ctx.clone(),
            direction,
            stream,
            ClientAddr(peer),
        )));
    }
    tracing::info!(%direction, "listener closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_by_reason() {
        assert_eq!(
            (EMFILE, ENFILE, ENOBUFS, ENOMEM),
            (libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM)
        );
        let e = |n| std::io::Error::from_raw_os_error(n);
        assert_eq!(accept_error_reason(&e(libc::EMFILE)), "emfile");
        assert_eq!(accept_error_reason(&e(libc::ENFILE)), "enfile");
        assert_eq!(accept_error_reason(&e(libc::ENOBUFS)), "nomem");
        assert_eq!(
            (ECONNABORTED, ECONNRESET, EPROTO, EPERM),
            (
                libc::ECONNABORTED,
                libc::ECONNRESET,
                libc::EPROTO,
                libc::EPERM
            )
        );
        assert_eq!(accept_error_reason(&e(libc::ECONNABORTED)), "connection");
        assert_eq!(accept_error_reason(&e(libc::EBADF)), "other");
        let mut pauses = Vec::new();
        let mut backoff = Duration::ZERO;
        for _ in 0..6 {
            backoff = next_backoff(backoff);
            pauses.push(backoff.as_millis());
        }
        assert_eq!(pauses, [10, 20, 40, 80, 100, 100]);
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn own_listeners_are_loops() {
        let own = [a("0.0.0.0:15001"), a("0.0.0.0:15006")];
        let local = a("10.0.0.5:15001");
        assert!(
            is_own(a("10.0.0.5:15001"), local, None, &own),
            "not redirected"
        );
        assert!(
            is_own(a("127.0.0.1:15006"), local, None, &own),
            "loopback to a listener port"
        );
        assert!(
            is_own(a("10.0.0.5:15006"), local, None, &own),
            "own pod IP, listener port"
        );
        assert!(is_own(
            a("[::ffff:10.0.0.5]:15001"),
            a("[::ffff:10.0.0.5]:15001"),
            None,
            &own
        ));
        assert!(!is_own(a("10.96.0.12:9080"), local, None, &own));
        assert!(
            !is_own(a("10.0.0.9:15001"), local, None, &own),
            "another pod's proxy port is a real destination"
        );
        // Redirected from OUTPUT: the local address is loopback, the client has the pod IP.
        assert!(
            is_own(
                a("10.0.0.5:15001"),
                a("127.0.0.1:15001"),
                Some(a("10.0.0.5:40000")),
                &own
            ),
            "the pod's own IP, seen through the client address"
        );
        assert!(!is_own(
            a("10.0.0.9:15001"),
            a("127.0.0.1:15001"),
            Some(a("10.0.0.5:40000")),
            &own
        ));
    }
}
