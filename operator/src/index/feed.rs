//! Applying watch events to the [`Snapshot`]: upserts, deletes, and relists (a watch
//! that restarts lists everything again; what the new list lacks was deleted meanwhile).
//! Pure: the watch I/O turns kube-runtime events into [`Update`]s.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::ResourceExt;
use remora_crds::{MeshPolicy, TrafficSplit};

use super::model::{ObjKey, PodState, ServiceState, SliceState, Snapshot};

/// The kinds the index watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Node,
    Namespace,
    MeshPolicy,
    TrafficSplit,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Node,
        Kind::Namespace,
        Kind::MeshPolicy,
        Kind::TrafficSplit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Pod => "Pod",
            Self::Node => "Node",
            Self::Namespace => "Namespace",
            Self::MeshPolicy => "MeshPolicy",
            Self::TrafficSplit => "TrafficSplit",
        }
    }
}

/// An object as the index keeps it.
#[derive(Clone, Debug)]
pub enum Obj {
    Service(ObjKey, ServiceState),
    /// `None`: the slice belongs to no Service (nothing to index).
    EndpointSlice(ObjKey, Option<SliceState>),
    Pod(ObjKey, PodState),
    /// Name and zone.
    Node(String, Option<String>),
    /// Name and labels.
    Namespace(String, BTreeMap<String, String>),
    MeshPolicy(Box<MeshPolicy>),
    TrafficSplit(Box<TrafficSplit>),
}

impl Obj {
    pub fn service(svc: &Service) -> Self {
        Self::Service(ObjKey::of(svc), ServiceState::from_service(svc))
    }

    pub fn pod(pod: &Pod) -> Self {
        Self::Pod(ObjKey::of(pod), PodState::from_pod(pod))
    }

    pub fn namespace(ns: &Namespace) -> Self {
        Self::Namespace(ns.name_any(), ns.labels().clone())
    }

    fn kind(&self) -> Kind {
        match self {
            Self::Service(..) => Kind::Service,
            Self::EndpointSlice(..) => Kind::EndpointSlice,
            Self::Pod(..) => Kind::Pod,
            Self::Node(..) => Kind::Node,
            Self::Namespace(..) => Kind::Namespace,
            Self::MeshPolicy(_) => Kind::MeshPolicy,
            Self::TrafficSplit(_) => Kind::TrafficSplit,
        }
    }

    fn key(&self) -> ObjKey {
        match self {
            Self::Service(k, _) | Self::EndpointSlice(k, _) | Self::Pod(k, _) => k.clone(),
            Self::Namespace(name, _) | Self::Node(name, _) => namespace_key(name),
            Self::MeshPolicy(p) => ObjKey::of(&**p),
            Self::TrafficSplit(s) => ObjKey::of(&**s),
        }
    }
}

/// Namespaces (and Nodes) are keyed by name with an empty namespace.
pub fn namespace_key(name: &str) -> ObjKey {
    ObjKey::new(String::new(), name)
}

/// One watch event.
#[derive(Clone, Debug)]
pub enum Update {
    Upsert(Obj),
    Delete(Kind, ObjKey),
    /// A (re)list of `Kind` begins; the objects it lists follow as `Upsert`s.
    RelistStart(Kind),
    /// The (re)list is complete: objects of `Kind` it did not list are gone.
    RelistDone(Kind),
}

/// Relist bookkeeping and which kinds have been listed once.
#[derive(Debug, Default)]
pub struct Feed {
    relisting: HashMap<Kind, HashSet<ObjKey>>,
    synced: BTreeSet<Kind>,
}

fn keys(snap: &Snapshot, kind: Kind) -> Vec<ObjKey> {
    match kind {
        Kind::Service => snap.services.keys().cloned().collect(),
        Kind::EndpointSlice => snap.slices.keys().cloned().collect(),
        Kind::Pod => snap.pods.keys().cloned().collect(),
        Kind::Node => snap.nodes.keys().map(|n| namespace_key(n)).collect(),
        Kind::Namespace => snap.namespaces.keys().map(|n| namespace_key(n)).collect(),
        Kind::MeshPolicy => snap.policies.keys().cloned().collect(),
        Kind::TrafficSplit => snap.splits.keys().cloned().collect(),
    }
}

fn remove(snap: &mut Snapshot, kind: Kind, key: &ObjKey) -> bool {
    match kind {
        Kind::Service => snap.services.remove(key).is_some(),
        Kind::EndpointSlice => snap.slices.remove(key).is_some(),
        Kind::Pod => snap.pods.remove(key).is_some(),
        Kind::Node => snap.nodes.remove(&key.name).is_some(),
        Kind::Namespace => snap.namespaces.remove(&key.name).is_some(),
        Kind::MeshPolicy => snap.policies.remove(key).is_some(),
        Kind::TrafficSplit => snap.splits.remove(key).is_some(),
    }
}

fn upsert<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, key: K, value: V) -> bool {
    if map.get(&key) == Some(&value) {
        return false;
    }
    map.insert(key, value);
    true
}

impl Feed {
    /// Applies `update`; returns whether the snapshot may have changed.
    pub fn apply(&mut self, snap: &mut Snapshot, update: Update) -> bool {
        match update {
            Update::Upsert(obj) => {
                let (kind, key) = (obj.kind(), obj.key());
                if let Some(seen) = self.relisting.get_mut(&kind) {
                    seen.insert(key.clone());
                }
                match obj {
                    Obj::Service(k, s) => upsert(&mut snap.services, k, s),
                    Obj::EndpointSlice(k, Some(s)) => upsert(&mut snap.slices, k, s),
                    Obj::EndpointSlice(k, None) => snap.slices.remove(&k).is_some(),
                    Obj::Pod(k, p) => upsert(&mut snap.pods, k, p),
                    Obj::Node(name, zone) => upsert(&mut snap.nodes, name, zone),
                    Obj::Namespace(name, labels) => upsert(&mut snap.namespaces, name, labels),
                    // Status and metadata churn (the controllers' own writes) change no
                    // derived config: compare what derivation reads.
                    Obj::MeshPolicy(p) => {
                        let changed = snap.policies.get(&key).is_none_or(|old| {
                            old.spec != p.spec
                                || old.metadata.creation_timestamp != p.metadata.creation_timestamp
                        });
                        snap.policies.insert(key, *p);
                        changed
                    }
                    Obj::TrafficSplit(s) => {
                        let changed = snap.splits.get(&key).is_none_or(|old| {
                            old.spec != s.spec
                                || old.metadata.creation_timestamp != s.metadata.creation_timestamp
                        });
                        snap.splits.insert(key, *s);
                        changed
                    }
                }
            }
            Update::Delete(kind, key) => remove(snap, kind, &key),
            Update::RelistStart(kind) => {
                self.relisting.insert(kind, HashSet::new());
                false
            }
            Update::RelistDone(kind) => {
                self.synced.insert(kind);
                let Some(seen) = self.relisting.remove(&kind) else {
                    return false;
                };
                let mut changed = false;
                for key in keys(snap, kind) {
                    if !seen.contains(&key) {
                        changed |= remove(snap, kind, &key);
                    }
                }
                changed
            }
        }
    }

    /// Has every kind been listed at least once?
    pub fn synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.synced.contains(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::derive::tests::{slice, svc};

    fn key(name: &str) -> ObjKey {
        ObjKey::new("shop", name)
    }

    #[test]
    fn upserts_deletes_and_no_op_updates() {
        let mut snap = Snapshot::new("cluster.local");
        let mut feed = Feed::default();
        let s = svc("10.96.0.1", &[("http", 80)]);
        assert!(feed.apply(&mut snap, Update::Upsert(Obj::Service(key("a"), s.clone()))));
        assert!(
            !feed.apply(&mut snap, Update::Upsert(Obj::Service(key("a"), s.clone()))),
            "same object"
        );
        let sl = slice("a", &[("http", 8080)], &[("10.244.0.1", "", true)]);
        assert!(feed.apply(
            &mut snap,
            Update::Upsert(Obj::EndpointSlice(key("a-1"), Some(sl.clone())))
        ));
        assert!(!feed.apply(
            &mut snap,
            Update::Upsert(Obj::EndpointSlice(key("a-1"), Some(sl)))
        ));
        // A slice that lost its Service label leaves the index.
        assert!(feed.apply(
            &mut snap,
            Update::Upsert(Obj::EndpointSlice(key("a-1"), None))
        ));
        assert!(snap.slices.is_empty());
        assert!(feed.apply(&mut snap, Update::Delete(Kind::Service, key("a"))));
        assert!(!feed.apply(&mut snap, Update::Delete(Kind::Service, key("a"))));
        assert!(snap.services.is_empty());
    }

    #[test]
    fn a_relist_drops_what_was_deleted_while_disconnected() {
        let mut snap = Snapshot::new("cluster.local");
        let mut feed = Feed::default();
        for name in ["a", "b", "c"] {
            feed.apply(
                &mut snap,
                Update::Upsert(Obj::Service(key(name), svc("10.96.0.1", &[("http", 80)]))),
            );
        }
        assert!(!feed.synced());
        assert!(!feed.apply(&mut snap, Update::RelistStart(Kind::Service)));
        feed.apply(
            &mut snap,
            Update::Upsert(Obj::Service(key("b"), svc("10.96.0.1", &[("http", 80)]))),
        );
        assert!(feed.apply(&mut snap, Update::RelistDone(Kind::Service)));
        assert_eq!(
            snap.services.keys().cloned().collect::<Vec<_>>(),
            vec![key("b")]
        );
        for kind in Kind::ALL {
            feed.apply(&mut snap, Update::RelistStart(kind));
            feed.apply(&mut snap, Update::RelistDone(kind));
        }
        assert!(feed.synced());
        assert!(snap.services.is_empty(), "the last relist listed nothing");
    }
}
