//! Command line: `remora-webhook serve` (the admission webhook) and
//! `remora-webhook inject -f FILE|-` (offline injection). Every flag also reads an
//! environment variable, so the Deployment can use either.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};

use crate::accel;
use crate::annotations;
use crate::events::EventRecorder;
use crate::inject::{InjectConfig, ProxyDefaults};
use crate::metrics::Metrics;
use crate::native::{self, NativeSidecarMode};
use crate::offline;
use crate::server::{self, Context};
use crate::tls::{self, CertStore};

/// The Remora sidecar injector. Without a subcommand, serves the webhook (`serve`).
#[derive(Debug, Parser)]
#[command(
    name = "remora-webhook",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of `serve`, accepted without the subcommand name.
    #[command(flatten)]
    pub serve: Box<ServeArgs>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the mutating admission webhook.
    Serve(Box<ServeArgs>),
    /// Inject manifests offline and print them.
    Inject(Box<InjectArgs>),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    annotations::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 500ms, 5s, 5m)"))
}

/// Settings of what gets injected (shared by both subcommands).
#[derive(Debug, Clone, Args)]
pub struct InjectionArgs {
    /// Image of the remora-proxy sidecar.
    #[arg(long, env = "REMORA_WEBHOOK_PROXY_IMAGE", default_value_t = InjectConfig::default().proxy_image)]
    pub proxy_image: String,
    /// Image of the remora-init init container.
    #[arg(long, env = "REMORA_WEBHOOK_INIT_IMAGE", default_value_t = InjectConfig::default().init_image)]
    pub init_image: String,
    /// Version written to the `remora.dev/injected` annotation.
    #[arg(long, env = "REMORA_WEBHOOK_PROXY_VERSION", default_value_t = InjectConfig::default().proxy_version)]
    pub proxy_version: String,
    /// Address of the operator (streams and certify).
    #[arg(long, env = "REMORA_WEBHOOK_OPERATOR_ADDR", default_value_t = InjectConfig::default().operator_addr)]
    pub operator_addr: String,
    /// SPIFFE trust domain.
    #[arg(long, env = "REMORA_WEBHOOK_TRUST_DOMAIN", default_value_t = InjectConfig::default().trust_domain)]
    pub trust_domain: String,
    /// ConfigMap (in each pod's namespace) holding the trust bundle under `ca.crt`.
    #[arg(long, env = "REMORA_WEBHOOK_TRUST_BUNDLE_CONFIGMAP", default_value_t = InjectConfig::default().trust_bundle_configmap)]
    pub trust_bundle_configmap: String,
    /// Default proxy CPU request (empty for none).
    #[arg(long, env = "REMORA_WEBHOOK_PROXY_CPU_REQUEST", default_value = "50m")]
    pub proxy_cpu_request: String,
    /// Default proxy CPU limit (empty for none).
    #[arg(long, env = "REMORA_WEBHOOK_PROXY_CPU_LIMIT", default_value = "")]
    pub proxy_cpu_limit: String,
    /// Default proxy memory request (empty for none).
    #[arg(
        long,
        env = "REMORA_WEBHOOK_PROXY_MEMORY_REQUEST",
        default_value = "32Mi"
    )]
    pub proxy_memory_request: String,
    /// Default proxy memory limit (empty for none).
    #[arg(
        long,
        env = "REMORA_WEBHOOK_PROXY_MEMORY_LIMIT",
        default_value = "128Mi"
    )]
    pub proxy_memory_limit: String,
    /// Default proxy log level.
    #[arg(long, env = "REMORA_WEBHOOK_PROXY_LOG_LEVEL", default_value = "info")]
    pub proxy_log_level: String,
    /// Default proxy drain period on shutdown.
    #[arg(long, env = "REMORA_WEBHOOK_PROXY_SHUTDOWN_GRACE_PERIOD", default_value = "30s", value_parser = parse_duration)]
    pub proxy_shutdown_grace_period: Duration,
    /// Node directory of the remora-accel agent (e.g. /run/remora/accel): remora-init gets
    /// it as a hostPath and registers each pod there. Empty: off. Set it only when every
    /// node runs the agent's DaemonSet (config/accel); elsewhere the iptables path serves.
    #[arg(
        long,
        env = "REMORA_WEBHOOK_ACCEL_REGISTRATIONS",
        default_value = "",
        value_name = "DIR",
        hide_default_value = true
    )]
    pub accel_registrations: String,
}

impl InjectionArgs {
    /// Validates the defaults (with the same rules as the annotations) and builds the config.
    pub fn config(&self, native_sidecar: bool) -> anyhow::Result<InjectConfig> {
        let opt = |flag: &str, v: &str| -> anyhow::Result<Option<String>> {
            let v = v.trim();
            if v.is_empty() {
                return Ok(None);
            }
            if annotations::parse_quantity(v).is_none() {
                bail!("--{flag}: {v:?} is not a Kubernetes quantity");
            }
            Ok(Some(v.to_owned()))
        };
        let level = self.proxy_log_level.to_ascii_lowercase();
        if !annotations::LOG_LEVELS.contains(&level.as_str()) {
            bail!(
                "--proxy-log-level: expected one of {}",
                annotations::LOG_LEVELS.join(", ")
            );
        }
        Ok(InjectConfig {
            proxy_image: self.proxy_image.clone(),
            init_image: self.init_image.clone(),
            proxy_version: self.proxy_version.clone(),
            operator_addr: self.operator_addr.clone(),
            trust_domain: self.trust_domain.clone(),
            trust_bundle_configmap: self.trust_bundle_configmap.clone(),
            native_sidecar,
            accel_registrations: accel::parse_dir(&self.accel_registrations)?,
            defaults: ProxyDefaults {
                cpu_request: opt("proxy-cpu-request", &self.proxy_cpu_request)?,
                cpu_limit: opt("proxy-cpu-limit", &self.proxy_cpu_limit)?,
                memory_request: opt("proxy-memory-request", &self.proxy_memory_request)?,
                memory_limit: opt("proxy-memory-limit", &self.proxy_memory_limit)?,
                log_level: level,
                shutdown_grace_period: self.proxy_shutdown_grace_period,
            },
        })
    }
}

/// `remora-webhook serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// HTTPS address of `/mutate`.
    #[arg(long, env = "REMORA_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    pub listen: SocketAddr,
    /// HTTP address of `/metrics`, `/healthz`, `/readyz`.
    #[arg(
        long,
        env = "REMORA_WEBHOOK_METRICS_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub metrics_listen: SocketAddr,
    /// PEM certificate chain (reloaded when it changes).
    #[arg(
        long,
        env = "REMORA_WEBHOOK_TLS_CERT",
        default_value = "/etc/remora/webhook-tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// PEM private key (reloaded when it changes).
    #[arg(
        long,
        env = "REMORA_WEBHOOK_TLS_KEY",
        default_value = "/etc/remora/webhook-tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// How often the certificate files are checked for changes.
    #[arg(long, env = "REMORA_WEBHOOK_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
    /// Native sidecars: `auto` (detect from the server version), `true` or `false`.
    #[arg(long, env = "REMORA_WEBHOOK_NATIVE_SIDECAR", default_value = "auto")]
    pub native_sidecar: NativeSidecarMode,
    /// How often `auto` re-reads the server version.
    #[arg(long, env = "REMORA_WEBHOOK_VERSION_CHECK_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub version_check_interval: Duration,
    /// Record Events on pod owners (needs a Kubernetes client; skipped without one).
    #[arg(long, env = "REMORA_WEBHOOK_EVENTS", default_value = "true", action = clap::ArgAction::Set)]
    pub events: bool,
    /// Kubeconfig for `auto` and Events (default: in-cluster config or $KUBECONFIG).
    #[arg(long, env = "REMORA_WEBHOOK_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Injection settings.
    #[command(flatten)]
    pub injection: InjectionArgs,
}

/// `remora-webhook inject`.
#[derive(Debug, Clone, Args)]
pub struct InjectArgs {
    /// Input manifests; `-` reads stdin.
    #[arg(short = 'f', long = "filename")]
    pub file: String,
    /// Inject native sidecars (Kubernetes >= 1.29); `--native-sidecar=false` or omitted: classic.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub native_sidecar: bool,
    /// Injection settings.
    #[command(flatten)]
    pub injection: InjectionArgs,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Serve(args)) => serve(*args).await,
        Some(Command::Inject(args)) => inject(&args),
        None => serve(*cli.serve).await,
    }
}

fn inject(args: &InjectArgs) -> anyhow::Result<()> {
    let cfg = args.injection.config(args.native_sidecar)?;
    let input = if args.file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file))?
    };
    let out = offline::inject_stream(&input, &cfg)?;
    for r in &out.reports {
        eprintln!("{} {}", r.what, r.result);
    }
    std::io::stdout()
        .write_all(out.output.as_bytes())
        .context("writing stdout")?;
    Ok(())
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let initial_native = match args.native_sidecar {
        NativeSidecarMode::On => true,
        // Classic works on every cluster; `auto` upgrades once the version is known.
        NativeSidecarMode::Off | NativeSidecarMode::Auto => false,
    };
    let cfg = args.injection.config(initial_native)?;
    // One process-wide TLS provider for the serving side and the Kubernetes client.
    let _already_installed = rustls::crypto::ring::default_provider().install_default();

    let store = Arc::new(
        CertStore::open(&args.tls_cert, &args.tls_key)
            .context("loading the serving certificate")?,
    );
    let tls_config = tls::server_config(Arc::clone(&store)).context("building the TLS config")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config));

    let auto = args.native_sidecar == NativeSidecarMode::Auto;
    let client = if auto || args.events {
        match kube_client(args.kubeconfig.as_ref()).await {
            Ok(client) => Some(client),
            // `auto` cannot work without the API server; Events are optional.
            Err(e) if auto => return Err(e.context("building the Kubernetes client")),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "no Kubernetes client; Events are not recorded");
                None
            }
        }
    } else {
        None
    };
    let mut context = Context::new(cfg, Metrics::new());
    if let (true, Some(client)) = (args.events, &client) {
        context = context.with_events(EventRecorder::new(client.clone()));
    }
    let ctx = Arc::new(context);

    if let (true, Some(client)) = (auto, client) {
        match native::detect(&client).await {
            Ok(native) => {
                ctx.set_native_sidecar(native);
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the server version yet; injecting classic sidecars until it is known")
            }
        }
        tokio::spawn(native::watch(
            client,
            Arc::clone(&ctx),
            args.version_check_interval,
        ));
    }
    tracing::info!(native_sidecar = ctx.native_sidecar(), mode = ?args.native_sidecar, "sidecar mode");

    let mutate_tcp = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let metrics_tcp = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    tracing::info!(listen = %mutate_tcp.local_addr()?, metrics = %metrics_tcp.local_addr()?, "serving");
    let tls_listener = server::TlsListener::new(mutate_tcp, acceptor)?;
    tokio::spawn(server::watch_certs(
        Arc::clone(&store),
        Arc::clone(&ctx),
        args.tls_reload_interval,
    ));

    // On SIGTERM/SIGINT: report not ready, then let both servers finish their requests.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopping = Arc::clone(&ctx);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        stopping.set_ready(false);
        let _unobserved = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _closed = rx.wait_for(|stop| *stop).await;
    };
    let mutate = axum::serve(tls_listener, server::mutate_router(Arc::clone(&ctx)))
        .with_graceful_shutdown(stopped(stop_rx.clone()));
    let health = axum::serve(metrics_tcp, server::health_router(Arc::clone(&ctx)))
        .with_graceful_shutdown(stopped(stop_rx));
    ctx.set_ready(true);
    let (a, b) = tokio::join!(mutate.into_future(), health.into_future());
    a.context("webhook server")?;
    b.context("metrics server")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => {}
        r = tokio::signal::ctrl_c() => {
            if let Err(e) = r {
                tracing::error!(error = %e, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_is_the_default_subcommand() {
        let cli = Cli::try_parse_from([
            "remora-webhook",
            "--listen=127.0.0.1:1",
            "--native-sidecar=false",
        ])
        .expect("parse");
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen, "127.0.0.1:1".parse().expect("addr"));
        assert_eq!(cli.serve.native_sidecar, NativeSidecarMode::Off);
        let cli = Cli::try_parse_from(["remora-webhook", "inject", "-f", "-", "--native-sidecar"])
            .expect("parse");
        let Some(Command::Inject(args)) = cli.command else {
            panic!("inject expected");
        };
        assert!(args.native_sidecar);
        assert!(Cli::try_parse_from(["remora-webhook", "--native-sidecar=sometimes"]).is_err());
    }

    #[test]
    fn bad_defaults_are_refused() {
        let cli =
            Cli::try_parse_from(["remora-webhook", "--proxy-memory-limit=lots"]).expect("parse");
        let err = cli.serve.injection.config(true).expect_err("bad quantity");
        assert!(err.to_string().contains("--proxy-memory-limit"), "{err}");
        let cli =
            Cli::try_parse_from(["remora-webhook", "--accel-registrations=run/x"]).expect("parse");
        let err = cli.serve.injection.config(true).expect_err("relative");
        assert!(err.to_string().contains("--accel-registrations"), "{err}");
    }

    #[test]
    fn the_accelerator_is_off_unless_its_directory_is_given() {
        let off = Cli::try_parse_from(["remora-webhook"]).expect("parse");
        let cfg = off.serve.injection.config(true).expect("config");
        assert_eq!(cfg.accel_registrations, None);
        let on = Cli::try_parse_from([
            "remora-webhook",
            "inject",
            "-f",
            "-",
            "--accel-registrations",
            "/run/remora/accel",
        ])
        .expect("parse");
        let Some(Command::Inject(args)) = on.command else {
            panic!("inject expected");
        };
        let cfg = args.injection.config(true).expect("config");
        assert_eq!(
            cfg.accel_registrations.as_deref(),
            Some("/run/remora/accel")
        );
    }
}
