//! The Remora sidecar proxy: transparent interception, protocol detection, HTTP and TCP
//! proxying, mutual TLS with SPIFFE identities.
//!
//! [`Proxy::start`] binds the outbound (15001), inbound (15006) and admin (15020)
//! listeners and serves until [`Shutdown`](shutdown::Shutdown) is triggered; the binary
//! (`main.rs`) only parses flags, sets up logging and turns SIGTERM into that trigger.

pub mod access_log;
pub mod addr;
pub mod admin;
pub mod app_health;
pub mod config;
pub mod conn;
pub mod control;
pub mod detect;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod io;
pub mod lifecycle;
pub mod listen;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod pool;
pub mod shutdown;
pub mod tcp;
pub mod tls;
pub mod trace;

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use remora_crds::proxy::ProxyConfig;
use tokio::net::{TcpListener, TcpSocket};

use crate::{
    addr::Direction, admin::LogLevel, config::ConfigStore, listen::OrigDstMode, metrics::Metrics,
    shutdown::Shutdown, tls::IdentityStore,
};

/// Everything the proxy is told at start.
#[derive(Clone, Debug)]
pub struct Settings {
    pub outbound_listen: Vec<SocketAddr>,
    pub inbound_listen: Vec<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub orig_dst: OrigDstMode,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1 buffer, HTTP/2 header list) before 431.
    pub max_header_bytes: usize,
    /// Slow bodies, unread responses, HTTP/2 streams.
    pub http_limits: http::HttpLimits,
    pub shutdown_grace: Duration,
    /// An opaque TCP connection with no traffic either way for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// The standalone config file, watched for changes.
    pub config_path: Option<PathBuf>,
    pub config_poll_interval: Duration,
    /// Original targets of the app probes rewritten to `/app-health/...`.
    pub app_probes: Arc<app_health::AppProbes>,
    /// The pod IP app probes go to (loopback when unset).
    pub pod_ip: Option<IpAddr>,
    /// Kubernetes mode: certify with the operator and serve its streamed config (the
    /// `config` given to [`Proxy::start`] is then ignored).
    pub control: Option<control::ControlSettings>,
    /// HTTP/1 requests to a meshed endpoint ride one multiplexed HTTP/2 mTLS connection
    /// (true) or pooled HTTP/1 mTLS connections (false, the default: less CPU per request,
    /// more connections between proxies).
    pub mesh_http2: bool,
    /// One JSON line per HTTP request and per TCP connection on stdout
    /// (`--access-log`, `REMORA_PROXY_ACCESS_LOG`; the pod annotation
    /// `config.remora.dev/access-log: "true"`).
    pub access_log: bool,
    /// Bounds on inbound mesh TLS handshakes (timeout, caps in all and per client IP).
    pub handshake_limits: tls::HandshakeLimits,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            outbound_listen: vec![SocketAddr::from((Ipv6Addr::UNSPECIFIED, 15001))],
            inbound_listen: vec![SocketAddr::from((Ipv6Addr::UNSPECIFIED, 15006))],
            admin_listen: Some(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 15020))),
            orig_dst: OrigDstMode::Kernel,
            detect_timeout: detect::DEFAULT_TIMEOUT,
            connect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            http_limits: http::HttpLimits::default(),
            shutdown_grace: Duration::from_secs(30),
            tcp_idle_timeout: Duration::from_secs(3600),
            config_path: None,
            config_poll_interval: Duration::from_secs(1),
            app_probes: Arc::default(),
            pod_ip: None,
            control: None,
            mesh_http2: false,
            access_log: false,
            handshake_limits: tls::HandshakeLimits::default(),
        }
    }
}

/// State shared by every task of the proxy, passed as `Arc`.
#[derive(Debug)]
pub struct Context {
    pub settings: Settings,
    /// The addresses the capture listeners are bound to (for loop detection).
    pub listen_addrs: Vec<SocketAddr>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<ConfigStore>,
    pub identity: Arc<IdentityStore>,
    pub shutdown: Shutdown,
    /// Every upstream endpoint, with its pools, load and health.
    pub registry: Arc<outbound::endpoint::Registry>,
    pub access_log: Option<access_log::AccessLog>,
    pub log: Option<LogLevel>,
    /// The control-plane client (Kubernetes mode only).
    pub control: Option<Arc<control::Control>>,
    /// Inbound mesh TLS handshakes in progress, under `settings.handshake_limits`.
    pub handshakes: tls::HandshakeGate,
}

impl Context {
    /// Why `/ready` fails, or `None` when the proxy is ready. Without a certificate it
    /// names the last certify error, so what kubelet reports (the postStart hook's
    /// output in the pod's events) says why, e.g. that the operator refused connections.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.shutdown.is_triggered() {
            return Some("shutting down".to_owned());
        }
        if self.config.load().config.identity.is_some() && self.identity.current().is_none() {
            return Some("certificate not loaded".to_owned());
        }
        if let Some(control) = &self.control {
            if self.identity.current().is_none() {
                return Some(match self.identity.last_failure() {
                    Some(why) => format!("no certificate from the operator yet: {why}"),
                    None => "no certificate from the operator yet".to_owned(),
                });
            }
            if !control.inbound_received() {
                return Some("no inbound config from the operator yet".to_owned());
            }
        }
        None
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
}

/// How often upstream pools are checked for idleness (a pooled connection idle past the
/// policy's `timeouts.idle` closes within one or two sweeps of it)…
const POOL_SWEEP_EVERY: Duration = Duration::from_secs(10);
/// …and how long a pool may go unused before it is forgotten.
const POOL_IDLE: Duration = Duration::from_secs(300);

/// Forgets idle upstream pools until shutdown.
async fn prune_pools(ctx: Arc<Context>) {
    let mut stop = std::pin::pin!(ctx.shutdown.signaled());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POOL_SWEEP_EVERY) => {}
            _ = &mut stop => return,
        }
        let pruned = ctx.registry.prune(POOL_IDLE);
        if pruned > 0 {
            tracing::debug!(pruned, "forgot idle upstream pools");
        }
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    ctx: Arc<Context>,
    pub outbound_addrs: Vec<SocketAddr>,
    pub inbound_addrs: Vec<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
}

fn bind(addrs: &[SocketAddr], what: &'static str) -> Result<Vec<TcpListener>, StartError> {
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let l = match listen(*addr) {
            Ok(l) => l,
            // `[::]` is dual-stack; on a host without IPv6, serve IPv4 alone.
            Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() => {
                let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
                tracing::info!(%addr, error = %e, "IPv6 unavailable; listening on IPv4 only");
                listen(v4).map_err(|source| StartError::Bind {
                    addr: v4,
                    what,
                    source,
                })?
            }
            Err(source) => {
                return Err(StartError::Bind {
                    addr: *addr,
                    what,
                    source,
                });
            }
        };
        out.push(l);
    }
    Ok(out)
}

/// A listener as `TcpListener::bind` makes it (`SO_REUSEADDR`, the same backlog), with
/// `TCP_NODELAY` set: every socket it accepts inherits the option, which saves a
/// `setsockopt` per connection.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// `TcpListener::bind`'s backlog (mio's, the standard library's).
const LISTEN_BACKLOG: u32 = 128;

fn local_addrs(ls: &[TcpListener]) -> Vec<SocketAddr> {
    ls.iter().filter_map(|l| l.local_addr().ok()).collect()
}

impl Proxy {
    /// Binds every listener and starts serving `config` (already loaded and validated).
    pub async fn start(
        settings: Settings,
        config: ProxyConfig,
        log: Option<LogLevel>,
    ) -> Result<Self, StartError> {
        let outbound = bind(&settings.outbound_listen, "outbound")?;
        let inbound = bind(&settings.inbound_listen, "inbound")?;
        let admin = match settings.admin_listen {
            Some(a) => bind(&[a], "admin")?.pop(),
            None => None,
        };
        let outbound_addrs = local_addrs(&outbound);
        let inbound_addrs = local_addrs(&inbound);
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let metrics = Arc::new(Metrics::new());
        let identity = Arc::new(IdentityStore::default());
        let identity_seen = config.identity.as_ref().map(|files| {
            let seen = tls::IdentitySeen::of(files);
            // A failure is logged and counted; /ready stays false until a reload succeeds.
            let _ = identity.reload(files, &metrics);
            seen
        });
        let registry = Arc::new(outbound::endpoint::Registry::new(
            outbound::dial::Dialer::new(identity.clone(), metrics.clone()),
            settings.connect_timeout,
        ));
        let config = Arc::new(ConfigStore::new(config, &metrics, registry.clone()));
        let control = settings.control.clone().map(|c| {
            let control =
                control::Control::new(c, config.clone(), identity.clone(), metrics.clone());
            config.install(control.initial_config(), &metrics);
            Arc::new(control)
        });
        let ctx = Arc::new(Context {
            listen_addrs: outbound_addrs
                .iter()
                .chain(&inbound_addrs)
                .copied()
                .collect(),
            registry,
            access_log: settings
                .access_log
                .then(|| access_log::AccessLog::stdout(metrics.clone())),
            config,
            identity,
            metrics,
            shutdown: Shutdown::new(),
            log,
            handshakes: tls::HandshakeGate::new(settings.handshake_limits),
            settings,
            control,
        });
        if let Some(control) = &ctx.control {
            control.start(ctx.identity.clone(), &ctx.shutdown);
        }
        for l in outbound {
            tokio::spawn(listen::accept_loop(ctx.clone(), l, Direction::Outbound));
        }
        for l in inbound {
            tokio::spawn(listen::accept_loop(ctx.clone(), l, Direction::Inbound));
        }
        if let Some(l) = admin {
            tokio::spawn(admin::serve(ctx.clone(), l));
        }
        tokio::spawn(prune_pools(ctx.clone()));
        if let Some(path) = ctx.settings.config_path.clone() {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let stop = ctx.shutdown.signaled();
                config::watch_file(
                    path,
                    ctx.settings.config_poll_interval,
                    &ctx.config,
                    &ctx.metrics,
                    stop,
                )
                .await;
            });
        }
        {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let stop = ctx.shutdown.signaled();
                tls::watch_identity(
                    &ctx.config,
                    &ctx.identity,
                    &ctx.metrics,
                    ctx.settings.config_poll_interval,
                    identity_seen,
                    stop,
                )
                .await;
            });
        }
        tracing::info!(
            ?outbound_addrs,
            ?inbound_addrs,
            ?admin_addr,
            version = ctx.config.load().version(),
            "proxy started"
        );
        Ok(Self {
            ctx,
            outbound_addrs,
            inbound_addrs,
            admin_addr,
        })
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Starts the shutdown (as SIGTERM does).
    pub fn shutdown(&self) {
        self.ctx.shutdown.trigger();
    }

    /// Waits for the shutdown to start, then for in-flight connections to finish within the
    /// grace period. Returns true when every connection finished in time.
    pub async fn wait(self) -> bool {
        self.ctx.shutdown.signaled().await;
        let grace = self.ctx.settings.shutdown_grace;
        tracing::info!(
            in_flight = self.ctx.shutdown.in_flight(),
            ?grace,
            "draining"
        );
        let drained = self.ctx.shutdown.drained(grace).await;
        if drained {
            tracing::info!("drained; exiting");
        } else {
            tracing::warn!(
                in_flight = self.ctx.shutdown.in_flight(),
                "grace period over; closing remaining connections"
            );
        }
        drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-connection `setsockopt` is gone only because accepted sockets inherit
    /// `TCP_NODELAY` from the listener (Linux does): checked for both families.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let mut addrs = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            addrs.push("[::]:0".parse().expect("addr"));
        }
        for addr in addrs {
            let l = listen(addr).expect("listen");
            let port = l.local_addr().expect("addr").port();
            let _client = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            let (accepted, _) = l.accept().await.expect("accept");
            assert!(accepted.nodelay().expect("nodelay"), "{addr}");
        }
    }
}
