//! The index's Kubernetes side: watches Services, EndpointSlices (the version detected at
//! start), Pods, Nodes (metadata only: their zone label), Namespaces and both CRDs, applies their events to the snapshot
//! ([`super::feed`]), and recomputes the derived config once per debounced burst. Readers
//! hold an [`IndexHandle`]: the index behind a lock, the latest version on a watch
//! channel, and whether the first full list is in.

use std::{
    future::Future,
    sync::{Arc, RwLock, RwLockReadGuard},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, PartialObjectMeta},
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use remora_crds::{MeshPolicy, TrafficSplit};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::{
    Index,
    api::{self, SliceApi},
    debounce::Debouncer,
    feed::{Feed, Kind, Obj, Update},
    model::{ObjKey, SliceState, Snapshot, node_zone},
    version::{Versioner, now_micros},
};
use crate::metrics::IndexMetrics;

/// Index settings.
#[derive(Clone, Debug)]
pub struct IndexConfig {
    pub trust_domain: String,
    /// Recompute once no change arrived for this long…
    pub quiet: Duration,
    /// …or this long after the first pending change.
    pub max_delay: Duration,
}

/// Read access to the index, cheap to clone.
#[derive(Clone, Debug)]
pub struct IndexHandle {
    index: Arc<RwLock<Index>>,
    version: watch::Receiver<u64>,
    synced: watch::Receiver<bool>,
    slice_api: watch::Receiver<Option<SliceApi>>,
}

impl IndexHandle {
    /// The index, for reading pieces.
    pub fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest published version; `changed()` on it wakes on every new version.
    pub fn versions(&self) -> watch::Receiver<u64> {
        self.version.clone()
    }

    /// Whether every watch has listed once and the first version is published.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Completes once the index is synced (or its writer is gone).
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.clone();
        let _ = synced.wait_for(|s| *s).await;
    }

    /// The EndpointSlice API in use, once detected.
    pub fn slice_api(&self) -> Option<SliceApi> {
        *self.slice_api.borrow()
    }
}

/// The writing side, consumed by [`run`].
#[derive(Debug)]
pub struct IndexWriter {
    index: Arc<RwLock<Index>>,
    version: watch::Sender<u64>,
    synced: watch::Sender<bool>,
    slice_api: watch::Sender<Option<SliceApi>>,
    config: IndexConfig,
}

impl IndexWriter {
    /// Changes the snapshot with `f`, recomputes at `now_micros` and publishes the new
    /// version (if any) and the synced state, as [`run`] does after a debounced burst:
    /// for feeding the index without an apiserver (benchmarks, tests).
    pub fn apply(&self, f: impl FnOnce(&mut Snapshot), now_micros: u64) -> super::Changes {
        let changes = {
            let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
            f(index.snapshot_mut());
            index.recompute(now_micros)
        };
        if let Some(version) = changes.version {
            self.version.send_replace(version);
        }
        self.synced.send_replace(true);
        changes
    }

    /// `false`: every recomputation derives everything ([`Index::set_incremental`]).
    pub fn set_incremental(&self, incremental: bool) {
        self.index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set_incremental(incremental);
    }
}

/// A new, empty index and its handle.
pub fn channel(config: IndexConfig) -> (IndexWriter, IndexHandle) {
    let index = Arc::new(RwLock::new(Index::new(
        Snapshot::new(config.trust_domain.clone()),
        Versioner::default(),
    )));
    let (version, version_rx) = watch::channel(0);
    let (synced, synced_rx) = watch::channel(false);
    let (slice_api, slice_api_rx) = watch::channel(None);
    (
        IndexWriter {
            index: index.clone(),
            version,
            synced,
            slice_api,
            config,
        },
        IndexHandle {
            index,
            version: version_rx,
            synced: synced_rx,
            slice_api: slice_api_rx,
        },
    )
}

fn updates<K>(
    api: Api<K>,
    kind: Kind,
    to_obj: impl Fn(K) -> Option<Obj> + Send + Sync + 'static,
    key_of: impl Fn(&K) -> ObjKey + Send + Sync + 'static,
    metrics: IndexMetrics,
) -> BoxStream<'static, Update>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default + Clone + Eq + std::hash::Hash,
{
    let to_obj = Arc::new(to_obj);
    events(api, kind, metrics)
        .filter_map(move |ev| {
            let to_obj = to_obj.clone();
            let update = match ev {
                Event::Apply(o) | Event::InitApply(o) => to_obj(o).map(Update::Upsert),
                Event::Delete(o) => Some(Update::Delete(kind, key_of(&o))),
                Event::Init => Some(Update::RelistStart(kind)),
                Event::InitDone => Some(Update::RelistDone(kind)),
            };
            futures::future::ready(update)
        })
        .boxed()
}

fn events<K>(
    api: Api<K>,
    kind: Kind,
    metrics: IndexMetrics,
) -> impl futures::Stream<Item = Event<K>> + Send
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default + Clone + Eq + std::hash::Hash,
{
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |ev| {
            let ev = match ev {
                Ok(ev) => Some(ev),
                Err(e) => {
                    // Retried with backoff; the index keeps serving what it has.
                    tracing::warn!(kind = kind.as_str(), "index watch: {e}");
                    metrics.watch_error(kind.as_str());
                    None
                }
            };
            futures::future::ready(ev)
        })
}

/// Nodes, as metadata only: the zone label is all the index reads, and a Node's status
/// (images, conditions) is large and changes often.
fn nodes(client: Client, metrics: IndexMetrics) -> BoxStream<'static, Update> {
    let kind = Kind::Node;
    watcher::watcher(
        Api::<PartialObjectMeta<Node>>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .filter_map(move |ev| {
        let update = match ev {
            Ok(Event::Apply(m) | Event::InitApply(m)) => {
                Some(Update::Upsert(Obj::Node(m.name_any(), node_zone(&m))))
            }
            Ok(Event::Delete(m)) => Some(Update::Delete(
                kind,
                super::feed::namespace_key(&m.name_any()),
            )),
            Ok(Event::Init) => Some(Update::RelistStart(kind)),
            Ok(Event::InitDone) => Some(Update::RelistDone(kind)),
            Err(e) => {
                tracing::warn!(kind = kind.as_str(), "index watch: {e}");
                metrics.watch_error(kind.as_str());
                None
            }
        };
        futures::future::ready(update)
    })
    .boxed()
}

fn v1beta1_slices(client: Client, metrics: IndexMetrics) -> BoxStream<'static, Update> {
    let gvk = GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "endpointslices");
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |ev| {
            let kind = Kind::EndpointSlice;
            let convert = |o: DynamicObject| {
                let key = ObjKey::of(&o);
                let state = serde_json::to_value(&o)
                    .and_then(|v| SliceState::from_v1beta1(&v))
                    .unwrap_or_else(|e| {
                        tracing::warn!(slice = %key, "unreadable v1beta1 EndpointSlice, not indexed: {e}");
                        None
                    });
                Update::Upsert(Obj::EndpointSlice(key, state))
            };
            let update = match ev {
                Ok(Event::Apply(o) | Event::InitApply(o)) => Some(convert(o)),
                Ok(Event::Delete(o)) => Some(Update::Delete(kind, ObjKey::of(&o))),
                Ok(Event::Init) => Some(Update::RelistStart(kind)),
                Ok(Event::InitDone) => Some(Update::RelistDone(kind)),
                Err(e) => {
                    tracing::warn!(kind = kind.as_str(), "index watch: {e}");
                    metrics.watch_error(kind.as_str());
                    None
                }
            };
            futures::future::ready(update)
        })
        .boxed()
}

/// How long to wait before asking the server again which EndpointSlice API it serves.
const DETECT_RETRY: Duration = Duration::from_secs(5);

/// Runs the index until `shutdown` completes. Detection of the EndpointSlice API is
/// retried until it succeeds; watch failures are retried with backoff while the index
/// keeps serving what it has.
pub async fn run(
    client: Client,
    writer: IndexWriter,
    metrics: IndexMetrics,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let slice_api = loop {
        match api::detect(&client).await {
            Ok(found) => break found,
            Err(e) => {
                tracing::warn!("index: {e}; retrying in {DETECT_RETRY:?}");
                metrics.watch_error(Kind::EndpointSlice.as_str());
            }
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(DETECT_RETRY) => {}
        }
    };
    tracing::info!(
        version = slice_api.version(),
        "indexing discovery.k8s.io EndpointSlices"
    );
    writer.slice_api.send_replace(Some(slice_api));

    let slices = match slice_api {
        SliceApi::V1 => updates(
            Api::<EndpointSlice>::all(client.clone()),
            Kind::EndpointSlice,
            |s: EndpointSlice| Some(Obj::EndpointSlice(ObjKey::of(&s), SliceState::from_v1(&s))),
            ObjKey::of,
            metrics.clone(),
        ),
        SliceApi::V1Beta1 => v1beta1_slices(client.clone(), metrics.clone()),
    };
    let stream = futures::stream::select_all([
        updates(
            Api::<Service>::all(client.clone()),
            Kind::Service,
            |s: Service| Some(Obj::service(&s)),
            ObjKey::of,
            metrics.clone(),
        ),
        slices,
        updates(
            Api::<Pod>::all(client.clone()),
            Kind::Pod,
            |p: Pod| Some(Obj::pod(&p)),
            ObjKey::of,
            metrics.clone(),
        ),
        nodes(client.clone(), metrics.clone()),
        updates(
            Api::<Namespace>::all(client.clone()),
            Kind::Namespace,
            |n: Namespace| Some(Obj::namespace(&n)),
            |n: &Namespace| super::feed::namespace_key(&n.name_any()),
            metrics.clone(),
        ),
        updates(
            Api::<MeshPolicy>::all(client.clone()),
            Kind::MeshPolicy,
            |p: MeshPolicy| Some(Obj::MeshPolicy(Box::new(p))),
            ObjKey::of,
            metrics.clone(),
        ),
        updates(
            Api::<TrafficSplit>::all(client),
            Kind::TrafficSplit,
            |s: TrafficSplit| Some(Obj::TrafficSplit(Box::new(s))),
            ObjKey::of,
            metrics.clone(),
        ),
    ]);

    drive(&writer, stream, &metrics, shutdown).await;
}

/// Applies `updates` (watch events) to the index, recomputes once per debounced burst and
/// publishes each new version, until `updates` ends or `shutdown` completes: [`run`]'s
/// loop, also for feeding the index without an apiserver (benchmarks).
pub async fn drive(
    writer: &IndexWriter,
    updates: impl futures::Stream<Item = Update> + Unpin,
    metrics: &IndexMetrics,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut updates = updates;
    let mut feed = Feed::default();
    let mut debounce = Debouncer::new(writer.config.quiet, writer.config.max_delay);
    let mut synced = false;
    loop {
        let due = debounce.due_at().filter(|_| synced);
        tokio::select! {
            _ = &mut shutdown => break,
            update = updates.next() => {
                let Some(update) = update else { break };
                let changed = writer
                    .index
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .apply(&mut feed, update);
                if changed || (!synced && feed.synced()) {
                    debounce.changed(Instant::now());
                }
                synced = synced || feed.synced();
            }
            _ = sleep_until(due) => {
                let now = Instant::now();
                let since = debounce.pending_since();
                if debounce.fire(now) {
                    let changes = writer
                        .index
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .recompute(now_micros());
                    metrics.recomputed(since.map(|s| now.duration_since(s)));
                    if let Some(version) = changes.version {
                        tracing::debug!(
                            version,
                            outbound = changes.outbound.len() + changes.outbound_removed.len(),
                            inbound = changes.inbound.len() + changes.inbound_removed.len(),
                            "index version"
                        );
                        metrics.set_version(version);
                        writer.version.send_replace(version);
                    }
                    if !*writer.synced.borrow() {
                        tracing::info!("index synced");
                        writer.synced.send_replace(true);
                    }
                }
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}
