//! The config being served and its standalone source: a YAML file (`--config`) polled for
//! changes. Each accepted config is compiled into a [`Snapshot`] and published through an
//! `ArcSwap`, so the data path reads it with one atomic load per connection or request.
//! A file that does not parse, does not validate or does not carry a newer version is
//! rejected with a logged reason and a metric; the last good snapshot keeps serving.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use remora_crds::proxy::{ConfigError, ProxyConfig};

use crate::{
    inbound::{LimiterRegistry, Limiters},
    metrics::{Metrics, ReasonLabels, Static},
    outbound::{RouteTable, endpoint::Registry, service::ServiceRegistry},
};

/// One config version, compiled for the data path.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub config: ProxyConfig,
    pub routes: RouteTable,
    pub limiters: Limiters,
}

/// The long-lived state config versions are compiled against: endpoints, per-service
/// state (breakers, budgets, outlier detectors) and inbound rate limiters. What a new
/// version still lists keeps its state.
#[derive(Debug)]
pub struct Compiler {
    pub endpoints: Arc<Registry>,
    pub services: ServiceRegistry,
    pub limiters: LimiterRegistry,
}

impl Compiler {
    pub fn new(endpoints: Arc<Registry>) -> Self {
        Self {
            endpoints,
            services: ServiceRegistry::default(),
            limiters: LimiterRegistry::default(),
        }
    }

    /// Compiles `config` for the data path.
    pub fn compile(&self, config: ProxyConfig) -> Snapshot {
        let mut generation = self.endpoints.generation();
        let routes = RouteTable::new(
            &config.outbound,
            config.locality.zone.as_deref(),
            &mut generation,
            &self.services,
        );
        generation.commit();
        let limiters = self.limiters.compile(&config.inbound);
        Snapshot {
            config,
            routes,
            limiters,
        }
    }
}

impl Snapshot {
    pub fn version(&self) -> u64 {
        self.config.version
    }
}

/// Why a config was not applied.
#[derive(Debug, thiserror::Error)]
pub enum RejectReason {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("version {new} is not newer than the version being served ({current})")]
    Stale { new: u64, current: u64 },
}

impl RejectReason {
    fn label(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read_error",
            Self::Invalid(ConfigError::Parse(_)) => "parse_error",
            Self::Invalid(ConfigError::Invalid { .. }) => "invalid",
            Self::Stale { .. } => "stale_version",
        }
    }
}

/// The current snapshot, swapped atomically.
#[derive(Debug)]
pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    compiler: Compiler,
}

impl ConfigStore {
    pub fn new(initial: ProxyConfig, metrics: &Metrics, endpoints: Arc<Registry>) -> Self {
        metrics
            .config_version
            .set(i64::try_from(initial.version).unwrap_or(i64::MAX));
        metrics
            .config_reloads
            .get_or_create(&ReasonLabels {
                reason: Static("applied"),
            })
            .inc();
        let compiler = Compiler::new(endpoints);
        Self {
            current: ArcSwap::from_pointee(compiler.compile(initial)),
            compiler,
        }
    }

    /// The snapshot in force.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Applies `config` if its version is newer than the current one.
    pub fn apply(&self, config: ProxyConfig, metrics: &Metrics) -> Result<u64, RejectReason> {
        let current = self.current.load().version();
        if config.version <= current {
            let err = RejectReason::Stale {
                new: config.version,
                current,
            };
            metrics
                .config_reloads
                .get_or_create(&ReasonLabels {
                    reason: Static(err.label()),
                })
                .inc();
            return Err(err);
        }
        Ok(self.install(config, metrics))
    }

    /// Installs an assembled Kubernetes-mode config whatever its version. The pieces it
    /// is made of were each checked to be newer than the piece they replace (see
    /// `control::subscriptions`); its version, the max of theirs, may go down when an idle
    /// subscription holding the max is dropped, which the file's "strictly newer" rule
    /// would wrongly refuse. The caller validated it.
    pub fn install(&self, config: ProxyConfig, metrics: &Metrics) -> u64 {
        let version = config.version;
        self.current.store(Arc::new(self.compiler.compile(config)));
        metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        metrics
            .config_reloads
            .get_or_create(&ReasonLabels {
                reason: Static("applied"),
            })
            .inc();
        version
    }

    /// Counts a rejected file.
    pub fn reject(&self, reason: &RejectReason, metrics: &Metrics) {
        metrics
            .config_reloads
            .get_or_create(&ReasonLabels {
                reason: Static(reason.label()),
            })
            .inc();
    }
}

/// Reads and validates a config file.
pub fn load_file(path: &Path) -> Result<ProxyConfig, RejectReason> {
    let text = std::fs::read_to_string(path).map_err(|source| RejectReason::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(ProxyConfig::from_yaml(&text)?)
}

/// What identifies a version of the file on disk without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        #[cfg(unix)]
        inode: std::os::unix::fs::MetadataExt::ino(&meta),
    })
}

/// Polls `path` every `interval` and applies changed contents, until `stop` resolves.
/// Polling (rather than inotify) also follows Kubernetes ConfigMap symlink swaps.
pub async fn watch_file(
    path: PathBuf,
    interval: Duration,
    store: &ConfigStore,
    metrics: &Metrics,
    stop: impl Future<Output = ()>,
) {
    // Start from nothing: the first tick reads the file, and contents equal to the config
    // being served are skipped quietly (the caller loaded it before starting the watcher).
    let mut last: Option<Stamp> = None;
    let mut last_text: Option<String> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticker.tick() => {}
        }
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(source) => {
                let reason = RejectReason::Read {
                    path: path.clone(),
                    source,
                };
                tracing::warn!(path = %path.display(), %reason, "config file rejected; keeping the last good config");
                store.reject(&reason, metrics);
                continue;
            }
        };
        if last_text.as_deref() == Some(text.as_str()) {
            continue;
        }
        let parsed = ProxyConfig::from_yaml(&text).map_err(RejectReason::from);
        last_text = Some(text);
        if matches!(&parsed, Ok(cfg) if *cfg == store.load().config) {
            continue;
        }
        match parsed.and_then(|cfg| store.apply(cfg, metrics)) {
            Ok(version) => tracing::info!(path = %path.display(), version, "config applied"),
            Err(reason) => {
                if !matches!(reason, RejectReason::Stale { .. }) {
                    store.reject(&reason, metrics);
                }
                tracing::warn!(path = %path.display(), %reason, "config file rejected; keeping the last good config");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_only_grow() {
        let metrics = Arc::new(Metrics::new());
        let store = ConfigStore::new(
            ProxyConfig::from_yaml("version: 5").expect("valid"),
            &metrics,
            Registry::without_identity(metrics.clone()),
        );
        let err = store
            .apply(
                ProxyConfig::from_yaml("version: 5").expect("valid"),
                &metrics,
            )
            .expect_err("same version");
        assert!(err.to_string().contains("not newer"), "{err}");
        store
            .apply(
                ProxyConfig::from_yaml("version: 4").expect("valid"),
                &metrics,
            )
            .expect_err("older");
        assert_eq!(store.load().version(), 5);
        assert_eq!(
            store
                .apply(
                    ProxyConfig::from_yaml("version: 6").expect("valid"),
                    &metrics
                )
                .expect("newer"),
            6
        );
        assert_eq!(store.load().version(), 6);
        let text = metrics.encode();
        assert!(
            text.contains(r#"remora_proxy_config_reloads_total{reason="stale_version"} 2"#),
            "{text}"
        );
        assert!(text.contains("remora_proxy_config_version 6"), "{text}");
    }

    async fn eventually(what: &str, pred: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !pred() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for: {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn watcher_applies_good_files_and_keeps_serving_after_bad_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("proxy.yaml");
        std::fs::write(&path, "version: 1").expect("write");
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(ConfigStore::new(
            load_file(&path).expect("initial"),
            &metrics,
            Registry::without_identity(metrics.clone()),
        ));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let (store, metrics, path) = (store.clone(), metrics.clone(), path.clone());
            tokio::spawn(async move {
                watch_file(path, Duration::from_millis(10), &store, &metrics, async {
                    let _ = stop_rx.await;
                })
                .await;
            })
        };
        // Writes land in a new file that replaces the old one (a new inode), as editors and
        // Kubernetes do, so the change is seen even within one mtime tick.
        let replace = |text: &str| {
            let tmp = dir.path().join("tmp.yaml");
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, &path).expect("rename");
        };
        replace("version: 2\noutbound: {unknownDestinations: Deny}");
        eventually("version 2", || store.load().version() == 2).await;
        replace("version: 3\nversoin: typo");
        eventually("parse error counted", || {
            metrics.encode().contains(r#"reason="parse_error"} 1"#)
        })
        .await;
        replace("version: 4\noutbound: {services: [{name: a}, {name: a}]}");
        eventually("invalid counted", || {
            metrics.encode().contains(r#"reason="invalid"} 1"#)
        })
        .await;
        assert_eq!(
            store.load().version(),
            2,
            "bad files never replace the good config"
        );
        replace("version: 7");
        eventually("version 7", || store.load().version() == 7).await;
        let _ = stop_tx.send(());
        task.await.expect("watcher stops");
    }
}
