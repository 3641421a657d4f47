//! `remora-proxy`: flags, logging and signals around [`remora_proxy::Proxy`], and the
//! classic-sidecar lifecycle hooks (`wait-ready`, `drain`) that kubelet runs in the
//! proxy container.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
};

use clap::{Parser, Subcommand, ValueEnum};
use remora_crds::{
    duration::Duration,
    proxy::{ProxyConfig, UnknownDestinations},
};
use remora_proxy::{
    Proxy, Settings,
    admin::LogLevel,
    config,
    control::{
        ControlSettings,
        assemble::LocalRules,
        ports::PortSet,
        target::{OperatorAddr, OperatorName, PodRef},
        transport::OperatorEndpoint,
    },
    lifecycle::{self, Drained},
    listen::OrigDstMode,
};
use tracing_subscriber::{
    EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

/// `--unknown-destinations`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Unknown {
    /// Connect to the original destination, as if there were no proxy.
    #[value(name = "Passthrough", alias = "passthrough")]
    Passthrough,
    /// Refuse the connection.
    #[value(name = "Deny", alias = "deny")]
    Deny,
}

/// How HTTP/1 requests travel between two proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MeshProtocol {
    /// Multiplexed on one HTTP/2 mTLS connection per endpoint (fewest connections, but
    /// about 1.5x the CPU per request of HTTP/1.1 in `make bench`).
    H2,
    /// On pooled HTTP/1.1 mTLS connections, one per concurrent request (the default, as
    /// in Istio: the cheapest per request and the lowest tail latency in `make bench`).
    Http1,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The Remora sidecar proxy. Without a subcommand it runs the proxy with the flags below.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

/// Lifecycle hooks for a classic (non-native) sidecar, run inside the proxy container.
#[derive(Debug, Subcommand)]
enum Command {
    /// postStart hook: wait until the running proxy's `/ready` answers 200; exits non-zero
    /// after the timeout. Kubelet starts the app container only once this returns.
    WaitReady {
        /// How long to wait.
        #[arg(long, default_value = "120s")]
        timeout: Duration,
        /// The proxy's admin address.
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin: SocketAddr,
    },
    /// preStop hook: start the proxy's graceful shutdown (`POST /shutdown`, the same path
    /// as SIGTERM: stop accepting, HTTP/2 GOAWAY, in-flight requests finish), then wait
    /// until the proxy has stopped or the grace period has passed. Exits 0.
    Drain {
        /// How long to wait for the proxy to stop.
        #[arg(long, default_value = "30s")]
        grace_period: Duration,
        /// The proxy's admin address.
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin: SocketAddr,
    },
}

/// Flags of the proxy itself (the default mode).
#[derive(Debug, clap::Args)]
struct Args {
    /// Standalone config file (YAML, the derived proxy config), watched for changes.
    #[arg(long, env = "REMORA_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Outbound capture listener(s); `[::]` is dual-stack (IPv4 alone where IPv6 is off).
    #[arg(
        long,
        env = "REMORA_PROXY_OUTBOUND_LISTEN",
        value_delimiter = ',',
        default_value = "[::]:15001"
    )]
    outbound_listen: Vec<SocketAddr>,
    /// Inbound capture listener(s); `[::]` is dual-stack (IPv4 alone where IPv6 is off).
    #[arg(
        long,
        env = "REMORA_PROXY_INBOUND_LISTEN",
        value_delimiter = ',',
        default_value = "[::]:15006"
    )]
    inbound_listen: Vec<SocketAddr>,
    /// Admin listener (/ready, /live, /metrics, ...).
    #[arg(long, env = "REMORA_PROXY_ADMIN_LISTEN", default_value = "[::]:15020")]
    admin_listen: SocketAddr,
    /// How long protocol detection waits for the client's first bytes.
    #[arg(long, env = "REMORA_PROXY_DETECT_TIMEOUT", default_value = "300ms")]
    detect_timeout: Duration,
    /// Upstream TCP connect timeout.
    #[arg(long, env = "REMORA_PROXY_CONNECT_TIMEOUT", default_value = "1s")]
    connect_timeout: Duration,
    /// How long an HTTP/1 client may take to send a request head.
    #[arg(long, env = "REMORA_PROXY_HEADER_READ_TIMEOUT", default_value = "10s")]
    header_read_timeout: Duration,
    /// Largest request head in bytes; larger gets 431.
    #[arg(long, env = "REMORA_PROXY_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// A request body that sends nothing for this long is cut off (408).
    #[arg(long, env = "REMORA_PROXY_BODY_IDLE_TIMEOUT", default_value = "5m")]
    body_idle_timeout: Duration,
    /// A client that takes none of its response for this long is disconnected.
    #[arg(long, env = "REMORA_PROXY_WRITE_STALL_TIMEOUT", default_value = "60s")]
    write_stall_timeout: Duration,
    /// HTTP/2 streams one client connection may have open at once.
    #[arg(
        long,
        env = "REMORA_PROXY_H2_MAX_CONCURRENT_STREAMS",
        default_value_t = 200
    )]
    h2_max_concurrent_streams: u32,
    /// After SIGTERM, how long in-flight connections may take to finish.
    #[arg(
        long,
        env = "REMORA_PROXY_SHUTDOWN_GRACE_PERIOD",
        default_value = "30s"
    )]
    shutdown_grace_period: Duration,
    /// Opaque TCP connections with no traffic either way for this long are closed.
    #[arg(long, env = "REMORA_PROXY_TCP_IDLE_TIMEOUT", default_value = "1h")]
    tcp_idle_timeout: Duration,
    /// How often the config file is checked for changes.
    #[arg(long, env = "REMORA_PROXY_CONFIG_POLL_INTERVAL", default_value = "1s")]
    config_poll_interval: Duration,
    /// Log filter (tracing EnvFilter syntax); changeable at run time via /log-level.
    #[arg(long, env = "REMORA_PROXY_LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[arg(
        long,
        env = "REMORA_PROXY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Original targets of the app probes the webhook rewrote to /app-health/... (JSON).
    #[arg(long, env = "REMORA_PROXY_APP_PROBES")]
    app_probes: Option<String>,
    /// The pod IP that app probes are sent to (loopback when unset).
    #[arg(long, env = "REMORA_PROXY_POD_IP")]
    pod_ip: Option<IpAddr>,
    #[command(flatten)]
    kube: KubeArgs,
    /// How HTTP/1 requests travel to a meshed endpoint's proxy (HTTP/2 and upgrades keep
    /// their own protocol).
    #[arg(
        long,
        env = "REMORA_PROXY_MESH_PROTOCOL",
        value_enum,
        default_value = "http1"
    )]
    mesh_protocol: MeshProtocol,
    /// Runtime worker threads. 1 (the default) runs a single-threaded runtime: the cheapest
    /// per request, since the app shares the pod's cores; raise it for proxies whose own
    /// CPU is the bottleneck.
    #[arg(long, env = "REMORA_PROXY_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
    /// Log one JSON line per HTTP request and per TCP connection (set by the webhook from
    /// the pod annotation `config.remora.dev/access-log: "true"`).
    #[arg(
        long,
        env = "REMORA_PROXY_ACCESS_LOG",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    access_log: bool,
    /// How long an inbound mesh client may take to finish its TLS handshake.
    #[arg(
        long,
        env = "REMORA_PROXY_TLS_HANDSHAKE_TIMEOUT",
        default_value = "10s"
    )]
    tls_handshake_timeout: Duration,
    /// Inbound mesh TLS handshakes in progress at once; a connection over it is closed.
    #[arg(long, env = "REMORA_PROXY_MAX_TLS_HANDSHAKES", default_value_t = 1024)]
    max_tls_handshakes: usize,
    /// Inbound mesh TLS handshakes in progress at once from one client IP.
    #[arg(
        long,
        env = "REMORA_PROXY_MAX_TLS_HANDSHAKES_PER_CLIENT",
        default_value_t = 256
    )]
    max_tls_handshakes_per_client: usize,
}

/// Kubernetes mode: certify with the operator and serve the config it streams.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Kubernetes mode")]
struct KubeArgs {
    /// Kubernetes mode: the operator's certify + config-stream listener (host:port). Set
    /// by the webhook; excludes --config.
    #[arg(long, env = "REMORA_PROXY_OPERATOR_ADDR")]
    operator_addr: Option<OperatorAddr>,
    /// The DNS name the operator's certificate must carry (default: the host of
    /// --operator-addr).
    #[arg(long, env = "REMORA_PROXY_OPERATOR_SERVER_NAME")]
    operator_server_name: Option<String>,
    /// The projected service-account token (audience `remora`), re-read for every certify.
    #[arg(long, env = "REMORA_PROXY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The mesh trust bundle (PEM) that the operator's certificate chains to.
    #[arg(long, env = "REMORA_PROXY_TRUST_BUNDLE_FILE")]
    trust_bundle_file: Option<PathBuf>,
    /// This pod's name (its inbound config is watched).
    #[arg(long, env = "REMORA_PROXY_POD_NAME")]
    pod_name: Option<String>,
    /// This pod's namespace.
    #[arg(long, env = "REMORA_PROXY_POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// This pod's service account: the certificate must be for
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> (unchecked when unset).
    #[arg(long, env = "REMORA_PROXY_SERVICE_ACCOUNT")]
    service_account: Option<String>,
    /// The mesh trust domain.
    #[arg(
        long,
        env = "REMORA_PROXY_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    trust_domain: String,
    /// How long a connection to a destination without a route waits for the operator's
    /// answer before the unknown-destinations rule applies.
    #[arg(long, env = "REMORA_PROXY_DISCOVERY_TIMEOUT", default_value = "1s")]
    discovery_timeout: Duration,
    /// Outbound config subscriptions no connection used for this long are dropped.
    #[arg(long, env = "REMORA_PROXY_OUTBOUND_IDLE_TIMEOUT", default_value = "5m")]
    outbound_idle_timeout: Duration,
    /// The operator's stream heartbeat interval; a stream silent for three is reconnected.
    #[arg(
        long,
        env = "REMORA_PROXY_STREAM_HEARTBEAT_INTERVAL",
        default_value = "10s"
    )]
    stream_heartbeat_interval: Duration,
    /// What outbound connections to destinations the mesh does not know get.
    #[arg(
        long,
        env = "REMORA_PROXY_UNKNOWN_DESTINATIONS",
        value_enum,
        default_value = "Passthrough"
    )]
    unknown_destinations: Unknown,
    /// Inbound ports served as opaque TCP (no detection) unless the operator's config
    /// sets a protocol for them: `3306,6379,8000-8010` (the pod's opaque-ports annotation).
    #[arg(long, env = "REMORA_PROXY_OPAQUE_PORTS", default_value = "")]
    opaque_ports: PortSet,
    /// The ports the app declares (containerPorts); checked against --opaque-ports and
    /// logged at start.
    #[arg(long, env = "REMORA_PROXY_INBOUND_PORTS", default_value = "")]
    inbound_ports: PortSet,
}

fn init_logging(args: &Args) -> anyhow::Result<LogLevel> {
    let filter = EnvFilter::try_new(&args.log_level)?;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()?;
    Ok(LogLevel::new(&args.log_level, move |s| {
        let f = EnvFilter::try_new(s).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    }))
}

/// The Kubernetes-mode settings, when `--operator-addr` is set.
fn control_settings(all: &Args) -> anyhow::Result<Option<ControlSettings>> {
    let args = &all.kube;
    let Some(addr) = args.operator_addr.clone() else {
        return Ok(None);
    };
    if let Some(path) = &all.config {
        anyhow::bail!(
            "--operator-addr (REMORA_PROXY_OPERATOR_ADDR) and --config ({}) are both set: \
             choose Kubernetes mode or the standalone file",
            path.display()
        );
    }
    fn required<'a, T>(value: &'a Option<T>, flag: &str, env: &str) -> anyhow::Result<&'a T> {
        value.as_ref().ok_or_else(|| {
            anyhow::anyhow!("Kubernetes mode (--operator-addr) needs --{flag} ({env})")
        })
    }
    let token_file = required(&args.token_file, "token-file", "REMORA_PROXY_TOKEN_FILE")?;
    let trust_bundle = required(
        &args.trust_bundle_file,
        "trust-bundle-file",
        "REMORA_PROXY_TRUST_BUNDLE_FILE",
    )?;
    let name = required(&args.pod_name, "pod-name", "REMORA_PROXY_POD_NAME")?;
    let namespace = required(
        &args.pod_namespace,
        "pod-namespace",
        "REMORA_PROXY_POD_NAMESPACE",
    )?;
    let server_name = args
        .operator_server_name
        .clone()
        .unwrap_or_else(|| addr.host().to_owned());
    let server = OperatorName::new(&server_name)
        .map_err(|e| anyhow::anyhow!("--operator-server-name: {e}"))?;
    Ok(Some(ControlSettings {
        endpoint: OperatorEndpoint {
            addr,
            name: server,
            trust_bundle: trust_bundle.clone(),
        },
        token_file: token_file.clone(),
        pod: PodRef {
            namespace: namespace.clone(),
            name: name.clone(),
        },
        spiffe_id: args
            .service_account
            .as_ref()
            .map(|sa| ControlSettings::spiffe_id_of(&args.trust_domain, namespace, sa)),
        heartbeat_interval: args.stream_heartbeat_interval.get(),
        discovery_timeout: args.discovery_timeout.get(),
        outbound_idle_timeout: args.outbound_idle_timeout.get(),
        rules: LocalRules {
            unknown_destinations: match args.unknown_destinations {
                Unknown::Passthrough => UnknownDestinations::Passthrough,
                Unknown::Deny => UnknownDestinations::Deny,
            },
            opaque_ports: args.opaque_ports.clone(),
        },
        inbound_ports: args.inbound_ports.clone(),
    }))
}

async fn run(args: Args, log: LogLevel) -> anyhow::Result<()> {
    let control = control_settings(&args)?;
    let initial = match &args.config {
        Some(path) => config::load_file(path)
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?,
        None => ProxyConfig::default(),
    };
    let app_probes = match &args.app_probes {
        Some(json) => remora_proxy::app_health::parse(json)
            .map_err(|e| anyhow::anyhow!("REMORA_PROXY_APP_PROBES is not valid probe JSON: {e}"))?,
        None => Default::default(),
    };
    let settings = Settings {
        app_probes: Arc::new(app_probes),
        pod_ip: args.pod_ip,
        outbound_listen: args.outbound_listen,
        inbound_listen: args.inbound_listen,
        admin_listen: Some(args.admin_listen),
        orig_dst: OrigDstMode::Kernel,
        detect_timeout: args.detect_timeout.get(),
        connect_timeout: args.connect_timeout.get(),
        header_read_timeout: args.header_read_timeout.get(),
        max_header_bytes: args.max_header_bytes,
        http_limits: remora_proxy::http::HttpLimits {
            body_idle_timeout: args.body_idle_timeout.get(),
            write_stall_timeout: args.write_stall_timeout.get(),
            h2_max_concurrent_streams: args.h2_max_concurrent_streams,
            ..Default::default()
        },
        shutdown_grace: args.shutdown_grace_period.get(),
        tcp_idle_timeout: args.tcp_idle_timeout.get(),
        config_path: args.config,
        config_poll_interval: args.config_poll_interval.get(),
        control,
        mesh_http2: args.mesh_protocol == MeshProtocol::H2,
        access_log: args.access_log,
        handshake_limits: remora_proxy::tls::HandshakeLimits {
            timeout: args.tls_handshake_timeout.get(),
            max_concurrent: args.max_tls_handshakes,
            max_per_client: args.max_tls_handshakes_per_client,
        },
    };
    let proxy = Proxy::start(settings, initial, Some(log)).await?;
    let ctx = proxy.context().clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        ctx.shutdown.trigger();
    });
    proxy.wait().await;
    Ok(())
}

/// Runs a lifecycle hook on a small single-threaded runtime; messages go to stderr.
fn hook(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("remora-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Command::WaitReady { timeout, admin } => {
            match runtime.block_on(lifecycle::wait_ready(admin, timeout.get())) {
                Ok(()) => {
                    eprintln!("remora-proxy wait-ready: the proxy at {admin} is ready");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("remora-proxy wait-ready: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Drain {
            grace_period,
            admin,
        } => match runtime.block_on(lifecycle::drain(admin, grace_period.get())) {
            Ok(outcome) => {
                let what = match outcome {
                    Drained::Stopped => "drained; the proxy has stopped",
                    Drained::NotRunning => "no proxy listens there; nothing to drain",
                    Drained::GracePeriodOver => "grace period over with the proxy still draining",
                };
                eprintln!("remora-proxy drain: {admin}: {what}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                // Kubelet reports the failed hook and still sends SIGTERM, which drains.
                eprintln!("remora-proxy drain: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        return hook(command);
    }
    let args = cli.args;
    let log = match init_logging(&args) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("remora-proxy: invalid log settings: {e}");
            return ExitCode::from(2);
        }
    };
    // One worker: a current-thread runtime, with no cross-thread wake-ups or work
    // stealing — the cheapest per request when the pod's app shares the same cores.
    let runtime = if args.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.worker_threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("remora-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "remora-proxy failed");
            eprintln!("remora-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("remora-proxy").chain(flags.iter().copied()))
            .map(|c| c.args)
    }

    const KUBE: &[&str] = &[
        "--operator-addr=remora-operator.remora-system.svc:15012",
        "--token-file=/var/run/secrets/remora/token",
        "--trust-bundle-file=/var/run/remora/ca.crt",
        "--pod-name=web-1",
        "--pod-namespace=shop",
    ];

    #[test]
    fn kubernetes_mode_from_the_webhook_flags() {
        let standalone = parse(&["--config=proxy.yaml"]).expect("flags");
        assert!(control_settings(&standalone).expect("valid").is_none());

        let mut flags = KUBE.to_vec();
        flags.extend([
            "--service-account=web",
            "--unknown-destinations=Deny",
            "--opaque-ports=3306, 8000-8002",
            "--inbound-ports=8080,3306",
        ]);
        let c = control_settings(&parse(&flags).expect("flags"))
            .expect("valid")
            .expect("Kubernetes mode");
        assert_eq!(
            c.spiffe_id.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(
            c.endpoint.name,
            OperatorName::new("remora-operator.remora-system.svc").expect("name"),
            "the certificate is checked for the host of the address"
        );
        assert_eq!(c.pod.to_string(), "shop/web-1");
        assert_eq!(c.rules.unknown_destinations, UnknownDestinations::Deny);
        assert_eq!(c.rules.opaque_ports.to_string(), "3306,8000-8002");
        assert_eq!(c.undeclared_opaque_ports(), [8000, 8001, 8002]);
        assert_eq!(c.discovery_timeout, std::time::Duration::from_secs(1));
        assert_eq!(c.outbound_idle_timeout, std::time::Duration::from_secs(300));
        assert_eq!(c.heartbeat_interval, std::time::Duration::from_secs(10));
    }

    #[test]
    fn kubernetes_mode_errors_say_what_is_wrong() {
        let mut both = KUBE.to_vec();
        both.push("--config=proxy.yaml");
        let err = control_settings(&parse(&both).expect("flags")).expect_err("both modes");
        assert!(err.to_string().contains("are both set"), "{err}");

        let no_token: Vec<&str> = KUBE
            .iter()
            .copied()
            .filter(|f| !f.starts_with("--token-file"))
            .collect();
        let err = control_settings(&parse(&no_token).expect("flags")).expect_err("no token");
        assert!(err.to_string().contains("REMORA_PROXY_TOKEN_FILE"), "{err}");

        assert!(parse(&["--operator-addr=no-port"]).is_err());
        assert!(parse(&["--opaque-ports=redis"]).is_err());
        assert!(parse(&["--unknown-destinations=Maybe"]).is_err());
    }

    #[test]
    fn the_access_log_flag() {
        assert!(!parse(&[]).expect("flags").access_log, "off by default");
        assert!(parse(&["--access-log"]).expect("flags").access_log);
        assert!(parse(&["--access-log=true"]).expect("flags").access_log);
        assert!(!parse(&["--access-log=false"]).expect("flags").access_log);
        assert!(parse(&["--access-log=loud"]).is_err());
    }
}
