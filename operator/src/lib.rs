//! The Remora control plane.
//!
//! - [`controller`]: kube-runtime controllers for `MeshPolicy` and `TrafficSplit` that
//!   check what the schema cannot, resolve references and write `status.conditions`
//!   with server-side apply, with Events on misconfiguration. The decisions are pure
//!   functions in [`validate`], [`conflict`] and [`conditions`]; [`status`] writes.
//! - [`index`]: the discovery index — watches → snapshot → derived proxy config pieces
//!   with versions that only grow, debounced; every replica runs it.
//! - [`leader`]: a Lease so only one replica writes status.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`ca`]: the mesh certificate authority, `POST /v1/certify` on `--ca-listen` (TLS 1.3);
//!   every replica runs it.
//! - [`stream`]: the derived-config stream (`/v1/watch/*`) on the same listener, read
//!   from the index; every replica serves it.
//! - [`bootstrap`]: the leader publishes the trust bundle ConfigMap into meshed namespaces
//!   and the injector's serving certificate and caBundle.
//!
//! [`Operator::bind`] then [`Operator::run`] is the whole process; `main.rs` only parses
//! flags, builds the client and waits for SIGTERM.

pub mod admin;
pub mod bootstrap;
pub mod ca;
pub mod cli;
pub mod conditions;
pub mod conflict;
pub mod context;
pub mod controller;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod status;
pub mod stream;
pub mod validate;

use std::{future::Future, net::SocketAddr, sync::Arc};

use kube::Client;
use prometheus_client::registry::Registry;
use remora_crds::{MeshPolicy, TrafficSplit};
use tokio::{net::TcpListener, sync::watch};

pub use cli::Args;

use crate::{
    admin::Health,
    context::Context,
    index::watch::{IndexConfig, IndexHandle, IndexWriter},
    leader::{Elector, LeaseConfig},
    metrics::{IndexMetrics, Metrics},
};

/// How long the controllers may take to finish once told to stop.
const CONTROLLER_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// What can stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the metrics listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving /metrics, /healthz and /readyz: {0}")]
    Serve(#[source] std::io::Error),
    #[error("a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The operator with its admin listener bound.
pub struct Operator {
    args: Args,
    client: Client,
    listener: TcpListener,
    index: IndexWriter,
    index_handle: IndexHandle,
}

/// A future that completes once `rx` holds a value satisfying `pred` (or its sender is
/// gone); `Send + Sync`, as kube-runtime's shutdown triggers must be.
fn when<T: Send + Sync + 'static>(
    mut rx: watch::Receiver<T>,
    pred: impl Fn(&T) -> bool + Send + Sync + 'static,
) -> impl Future<Output = ()> + Send + Sync + 'static {
    let (tx, done) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = rx.wait_for(|v| pred(v)).await;
        let _ = tx.send(());
    });
    async move {
        let _ = done.await;
    }
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("args", &self.args)
            .field("listener", &self.listener)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Operator {
    /// Binds `--metrics-listen`; nothing else happens until [`Operator::run`].
    pub async fn bind(args: Args, client: Client) -> Result<Self, Error> {
        let listener = TcpListener::bind(args.metrics_listen)
            .await
            .map_err(|source| Error::Bind {
                addr: args.metrics_listen,
                source,
            })?;
        let (index, index_handle) = index::watch::channel(IndexConfig {
            trust_domain: args.trust_domain.clone(),
            quiet: args.index_debounce.get(),
            max_delay: args.index_max_delay.get(),
        });
        Ok(Self {
            args,
            client,
            listener,
            index,
            index_handle,
        })
    }

    /// Read access to the discovery index (valid before and during [`Operator::run`]).
    pub fn index(&self) -> IndexHandle {
        self.index_handle.clone()
    }

    /// The bound admin address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener.local_addr().map_err(Error::Serve)
    }

    /// Runs until `shutdown` completes: then the controllers finish their reconciles,
    /// the Lease is released and the admin server drains.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let Self {
            args,
            client,
            listener,
            index,
            index_handle,
        } = self;
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let ca_metrics = ca::metrics::CaMetrics::new(&mut registry);
        let index_metrics = IndexMetrics::new(&mut registry);
        let health = Arc::new(Health::default());
        let identity = args.identity();
        let ctx = Arc::new(Context::new(
            client.clone(),
            metrics.clone(),
            identity.clone(),
        ));

        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            stop_tx.send_replace(true);
        });

        // Every replica serves certificates; the leader publishes the CA's material.
        let (ca_material_tx, ca_material) = watch::channel(None);
        let stream_routes = stream::router(stream::StreamState {
            index: index_handle.clone(),
            heartbeat: args.stream_heartbeat.get(),
            stop: stop_rx.clone(),
            metrics: stream::metrics::StreamMetrics::new(&mut registry),
        });
        let ca = tokio::spawn(ca::server::run(
            client.clone(),
            args.clone(),
            ca_metrics,
            ca_material_tx,
            stop_rx.clone(),
            stream_routes,
        ));
        let bootstrap_settings = bootstrap::Settings::from_args(&args);

        let admin = {
            let router = admin::router(registry, health.clone());
            let done = when(stop_rx.clone(), |s| *s);
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(done)
                    .await
                    .map_err(Error::Serve)
            })
        };

        let index_task = tokio::spawn(index::watch::run(
            client.clone(),
            index,
            index_metrics,
            when(stop_rx.clone(), |s| *s),
        ));
        {
            let health = health.clone();
            tokio::spawn(async move {
                index_handle.wait_synced().await;
                if index_handle.is_synced() {
                    health.set_index_ready();
                }
            });
        }

        // The Lease is released only after the controllers have stopped writing.
        let (released_tx, released_rx) = watch::channel(false);
        let (lead_tx, lead_rx) = watch::channel::<Option<bool>>(None);
        let elector = if args.leader_elect {
            let cfg = LeaseConfig {
                namespace: args.pod_namespace.clone(),
                name: args.lease_name.clone(),
                identity,
                duration: args.lease_duration.get(),
                renew_every: args.lease_renew.get(),
            };
            tokio::spawn(Elector::new(client, cfg).run(lead_tx, metrics.clone(), released_rx))
        } else {
            metrics.set_leader(true);
            lead_tx.send_replace(Some(true));
            // The sender lives until the controllers are done.
            let done = when(released_rx, |r| *r);
            tokio::spawn(async move {
                done.await;
                drop(lead_tx);
            })
        };

        // A standby is ready as soon as it knows it is one.
        {
            let health = health.clone();
            let mut lead = lead_rx.clone();
            tokio::spawn(async move {
                if let Ok(v) = lead.wait_for(Option::is_some).await
                    && *v == Some(false)
                {
                    health.set_controllers_ready();
                }
            });
        }

        let mut stop = stop_rx.clone();
        let mut lead = lead_rx.clone();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                r = lead.wait_for(|l| *l == Some(true)) => if r.is_err() { break },
            }
            tracing::info!("leading: starting the controllers");
            let stopped = || {
                let (tx, rx) = watch::channel(());
                let a = when(stop_rx.clone(), |s| *s);
                let b = when(lead_rx.clone(), |l| *l != Some(true));
                tokio::spawn(async move {
                    futures::future::select(Box::pin(a), Box::pin(b)).await;
                    drop(tx);
                });
                when(rx, |_| false)
            };
            let (policies, run_policies) =
                controller::controller::<MeshPolicy>(ctx.clone(), stopped());
            let (splits, run_splits) =
                controller::controller::<TrafficSplit>(ctx.clone(), stopped());
            let synced = {
                let health = health.clone();
                async move {
                    if policies.wait_until_ready().await.is_ok()
                        && splits.wait_until_ready().await.is_ok()
                    {
                        health.set_controllers_ready();
                    }
                }
            };
            let publish = bootstrap::run(
                ctx.client.clone(),
                bootstrap_settings.clone(),
                ca_material.clone(),
                stopped(),
            );
            // `synced` must not outlive the controllers it waits for.
            let synced = futures::future::select(Box::pin(synced), Box::pin(stopped()));
            let all = async {
                futures::join!(run_policies, run_splits, synced, publish);
            };
            // Once told to stop (SIGTERM or leadership lost) the controllers get a grace
            // period to finish their reconciles; a stuck one (seen while the apiserver is
            // down) must neither hold the process nor keep a re-elected leader from
            // starting fresh controllers.
            let grace = {
                let told = stopped();
                async move {
                    told.await;
                    tokio::time::sleep(CONTROLLER_STOP_GRACE).await;
                }
            };
            tokio::select! {
                () = all => tracing::info!("controllers stopped"),
                () = grace => tracing::warn!(
                    "controllers did not stop within {CONTROLLER_STOP_GRACE:?}; leaving them"
                ),
            }
            if *stop_rx.borrow() {
                break;
            }
        }

        released_tx.send_replace(true);
        elector.await?;
        index_task.await?;
        ca.await?;
        admin.await?
    }
}
