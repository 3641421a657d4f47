//! The proxy's side of the control plane (Kubernetes mode, enabled by `--operator-addr`):
//! it certifies itself with the operator's CA and serves the config the operator derives
//! for it, streamed over HTTP/2 (docs/stream.md).
//!
//! - [`certify`]: in-memory P-256 key, CSR, `POST /v1/certify`, renewal at 70 %.
//! - [`stream`]: one watch (inbound for this pod, or outbound for one destination) with
//!   heartbeat timeout and reconnects that resume with `since`.
//! - [`subscriptions`]: the pieces held, version rules, lazy outbound subscriptions and
//!   their idle expiry; [`assemble`] (pure) builds the served config from them.
//! - [`transport`]: TLS to the operator and the shared HTTP/2 channel.
//! - [`received`] (pure): pieces that do not parse or validate keep their previous
//!   version, so one inconsistent piece does not spoil a message.
//! - [`message`], [`target`], [`ports`], [`backoff`]: line framing (the messages are
//!   `remora_crds::wire`), names, port lists, retry schedule.

pub mod assemble;
pub mod backoff;
pub mod certify;
pub mod message;
pub mod ports;
pub mod received;
pub mod stream;
pub mod subscriptions;
pub mod target;
pub mod transport;

use std::{path::PathBuf, sync::Arc, time::Duration};

use remora_crds::proxy::ProxyConfig;

use self::{
    assemble::LocalRules,
    certify::CertifySettings,
    message::Message,
    ports::PortSet,
    stream::Watch,
    subscriptions::{Applied, Subscriptions},
    target::{PodRef, Target, Version, inbound_path, outbound_path},
    transport::{Channel, OperatorEndpoint},
};
use crate::{
    Context, addr::Direction, addr::OrigDstAddr, config::ConfigStore, config::Snapshot,
    metrics::Metrics, shutdown::Shutdown, tls::IdentityStore,
};

/// Everything Kubernetes mode is told at start (flags / the webhook's env).
#[derive(Debug, Clone)]
pub struct ControlSettings {
    pub endpoint: OperatorEndpoint,
    /// The projected service-account token (audience `remora`).
    pub token_file: PathBuf,
    pub pod: PodRef,
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`: the identity the
    /// operator must issue (checked against its answer).
    pub spiffe_id: Option<String>,
    /// The operator's heartbeat interval; a stream silent for three of them is dead.
    pub heartbeat_interval: Duration,
    /// How long a connection to an unknown destination waits for the operator's answer.
    pub discovery_timeout: Duration,
    /// Outbound subscriptions no connection used for this long are dropped.
    pub outbound_idle_timeout: Duration,
    /// `unknownDestinations` and the opaque-ports override.
    pub rules: LocalRules,
    /// The ports the app declares (`REMORA_PROXY_INBOUND_PORTS`), for the start-up
    /// consistency check of the opaque ports.
    pub inbound_ports: PortSet,
}

impl ControlSettings {
    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn spiffe_id_of(trust_domain: &str, namespace: &str, service_account: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
    }

    /// Opaque ports the app does not declare: harmless (the override applies to them all)
    /// but most likely a typo in the annotation, so they are logged at start.
    pub fn undeclared_opaque_ports(&self) -> Vec<u16> {
        if self.inbound_ports.is_empty() {
            return Vec::new();
        }
        self.rules
            .opaque_ports
            .iter()
            .filter(|p| !self.inbound_ports.contains(*p))
            .collect()
    }
}

/// The running control-plane client, shared by the connection path and `/ready`.
#[derive(Debug)]
pub struct Control {
    settings: ControlSettings,
    subscriptions: Arc<Subscriptions>,
    channel: Arc<Channel>,
    metrics: Arc<Metrics>,
}

impl Control {
    pub fn new(
        settings: ControlSettings,
        store: Arc<ConfigStore>,
        identity: Arc<IdentityStore>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let subscriptions = Arc::new(Subscriptions::new(
            settings.rules.clone(),
            settings.discovery_timeout,
            store,
            metrics.clone(),
        ));
        let channel = Arc::new(Channel::new(settings.endpoint.clone(), identity));
        Self {
            settings,
            subscriptions,
            channel,
            metrics,
        }
    }

    /// The config served before any piece arrives (the local rules alone).
    pub fn initial_config(&self) -> ProxyConfig {
        self.subscriptions.initial()
    }

    /// Whether the first inbound config is in.
    pub fn inbound_received(&self) -> bool {
        self.subscriptions.inbound_received()
    }

    pub fn subscriptions(&self) -> &Arc<Subscriptions> {
        &self.subscriptions
    }

    fn watch(&self, what: String) -> Watch {
        Watch {
            channel: self.channel.clone(),
            endpoint: self.settings.endpoint.clone(),
            heartbeat: self.settings.heartbeat_interval,
            what,
        }
    }

    /// Starts certify (and renewal), the inbound watch and the idle sweeper.
    pub fn start(&self, identity: Arc<IdentityStore>, shutdown: &Shutdown) {
        let undeclared = self.settings.undeclared_opaque_ports();
        if !undeclared.is_empty() {
            tracing::warn!(?undeclared, inbound_ports = %self.settings.inbound_ports, "opaque ports the app does not declare (a typo in config.remora.dev/opaque-ports?)");
        }
        tracing::info!(
            operator = %self.settings.endpoint.addr,
            pod = %self.settings.pod,
            inbound_ports = %self.settings.inbound_ports,
            opaque_ports = %self.settings.rules.opaque_ports,
            "Kubernetes mode: certifying and watching the operator's config"
        );
        let certify = CertifySettings {
            endpoint: self.settings.endpoint.clone(),
            token_file: self.settings.token_file.clone(),
            expected: self.settings.spiffe_id.clone(),
        };
        tokio::spawn(certify::run(
            certify,
            identity.clone(),
            self.metrics.clone(),
            shutdown.signaled(),
        ));

        let pod = self.settings.pod.clone();
        let subs = self.subscriptions.clone();
        let watch = self.watch(format!("inbound {pod}"));
        let metrics = self.metrics.clone();
        let stop = shutdown.signaled();
        let stop_watch = shutdown.signaled();
        tokio::spawn(async move {
            // Watches need a client certificate: wait for the first one.
            if !wait_for_identity(&identity, stop).await {
                return;
            }
            let handler = move |m: Message| {
                if let Message::Inbound {
                    version,
                    pod,
                    inbound,
                    locality,
                } = m
                {
                    log_applied(
                        "inbound",
                        subs.apply_inbound(Version(version), &pod, inbound, locality),
                    );
                }
            };
            watch
                .run(
                    move |since| inbound_path(&pod, since),
                    handler,
                    metrics,
                    stop_watch,
                )
                .await;
        });

        let subs = self.subscriptions.clone();
        let idle = self.settings.outbound_idle_timeout;
        let mut stop = Box::pin(shutdown.signaled());
        tokio::spawn(async move {
            let period = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    () = tokio::time::sleep(period) => {}
                }
                let dropped = subs.drop_idle(idle);
                if !dropped.is_empty() {
                    tracing::info!(?dropped, ?idle, "dropped idle outbound subscriptions");
                }
            }
        });
    }

    /// Subscribes to `target` (if not yet) and waits for its first answer, at most the
    /// discovery timeout.
    pub async fn discover(&self, target: Target, shutdown: &Shutdown) -> bool {
        let spawn = || {
            let watch = self.watch(format!("outbound {target}"));
            let subs = self.subscriptions.clone();
            let metrics = self.metrics.clone();
            // Stopped at shutdown, or aborted when the subscription goes idle.
            let stop = shutdown.signaled();
            let handler = move |m: Message| {
                if let Message::Outbound {
                    version, services, ..
                } = m
                {
                    log_applied(
                        "outbound",
                        subs.apply_outbound(target, Version(version), services),
                    );
                }
            };
            tokio::spawn(watch.run(
                move |since| outbound_path(target, since),
                handler,
                metrics,
                stop,
            ))
            .abort_handle()
        };
        self.subscriptions.discover(target, spawn).await
    }
}

fn log_applied(what: &'static str, applied: Applied) {
    match applied {
        Applied::Installed(v) => tracing::info!(what, version = v.0, "config piece applied"),
        Applied::Ignored => tracing::debug!(what, "config piece not newer; ignored"),
        Applied::Rejected(e) => {
            tracing::warn!(what, error = %e, "config piece rejected; keeping the last good config")
        }
    }
}

async fn wait_for_identity(identity: &IdentityStore, stop: impl Future<Output = ()>) -> bool {
    tokio::pin!(stop);
    loop {
        if identity.current().is_some() {
            return true;
        }
        tokio::select! {
            () = &mut stop => return false,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The snapshot a new connection routes with, and the outbound route of its destination
/// when the config has one (looked up once, here). In Kubernetes mode an outbound
/// destination without a route is subscribed to and waited for (at most the discovery
/// timeout); a destination with a route marks its subscription used. Standalone mode:
/// one load.
pub async fn snapshot_for(
    ctx: &Context,
    direction: Direction,
    orig_dst: OrigDstAddr,
) -> (Arc<Snapshot>, Option<crate::outbound::Target>) {
    let snap = ctx.config.load();
    if direction == Direction::Inbound {
        return (snap, None);
    }
    if let Some(route) = snap.routes.lookup(orig_dst.0).cloned() {
        if let Some(control) = &ctx.control {
            control.subscriptions.touch(Target(orig_dst.0));
        }
        return (snap, Some(route));
    }
    let Some(control) = &ctx.control else {
        return (snap, None);
    };
    drop(snap);
    control.discover(Target(orig_dst.0), &ctx.shutdown).await;
    let snap = ctx.config.load();
    let route = snap.routes.lookup(orig_dst.0).cloned();
    (snap, route)
}
