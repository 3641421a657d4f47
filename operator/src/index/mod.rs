//! The discovery index: cluster state ([`model::Snapshot`]) → derived proxy config pieces
//! ([`derive`]), each with a version that only grows ([`version`]), recomputed once per
//! burst of changes ([`debounce`]).
//!
//! This module is the pure core: the watches that feed the snapshot and the stream server
//! that reads the pieces sit around it. [`Index::recompute`] derives every piece, keeps
//! the version of each piece that did not change and gives all changed pieces one new
//! version, so a storm of changes yields one version.

pub mod api;
pub mod debounce;
pub mod derive;
pub mod feed;
pub mod model;
pub mod version;
pub mod watch;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use remora_crds::proxy::{InboundConfig, OutboundService};

use self::{
    derive::Destination,
    model::{ObjKey, Snapshot},
    version::Versioner,
};

/// A piece with the version it last changed at.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub version: u64,
    pub value: T,
}

/// What one recomputation changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The version every changed piece now carries (`None` when nothing changed).
    pub version: Option<u64>,
    pub outbound: Vec<Destination>,
    pub outbound_removed: Vec<Destination>,
    pub inbound: Vec<ObjKey>,
    pub inbound_removed: Vec<ObjKey>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.version.is_none()
    }
}

/// The derived state.
#[derive(Debug, Default)]
pub struct Index {
    snapshot: Snapshot,
    outbound: BTreeMap<Destination, Versioned<OutboundService>>,
    inbound: BTreeMap<ObjKey, Versioned<InboundConfig>>,
    by_address: HashMap<SocketAddr, Destination>,
    versions: Versioner,
}

fn diff<K: Ord + Clone, V: PartialEq>(
    old: &BTreeMap<K, Versioned<V>>,
    new: &BTreeMap<K, V>,
) -> (Vec<K>, Vec<K>) {
    let changed = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_none_or(|o| o.value != **v))
        .map(|(k, _)| k.clone())
        .collect();
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    (changed, removed)
}

fn merge<K: Ord + Clone, V>(
    old: &mut BTreeMap<K, Versioned<V>>,
    mut new: BTreeMap<K, V>,
    changed: &[K],
    removed: &[K],
    version: u64,
) {
    for k in removed {
        old.remove(k);
    }
    for k in changed {
        if let Some(value) = new.remove(k) {
            old.insert(k.clone(), Versioned { version, value });
        }
    }
}

impl Index {
    pub fn new(snapshot: Snapshot, versions: Versioner) -> Self {
        Self {
            snapshot,
            versions,
            ..Self::default()
        }
    }

    /// The cluster state, to apply watch events to; call [`Index::recompute`] after.
    pub fn snapshot_mut(&mut self) -> &mut Snapshot {
        &mut self.snapshot
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Derives every piece from the snapshot at wall-clock time `now_micros`; changed
    /// pieces get one new version, unchanged ones keep theirs.
    pub fn recompute(&mut self, now_micros: u64) -> Changes {
        let snap = &self.snapshot;
        let lookup = derive::Lookup::new(snap);
        let outbound: BTreeMap<Destination, OutboundService> = derive::destinations(snap)
            .into_iter()
            .filter_map(|d| lookup.outbound(&d).map(|o| (d, o)))
            .collect();
        let inbound: BTreeMap<ObjKey, InboundConfig> = snap
            .pods
            .keys()
            .filter_map(|k| lookup.inbound(k).map(|i| (k.clone(), i)))
            .collect();
        let (out_changed, out_removed) = diff(&self.outbound, &outbound);
        let (in_changed, in_removed) = diff(&self.inbound, &inbound);
        if out_changed.is_empty()
            && out_removed.is_empty()
            && in_changed.is_empty()
            && in_removed.is_empty()
        {
            return Changes::default();
        }
        let version = self.versions.next(now_micros);
        self.by_address = outbound
            .iter()
            .flat_map(|(d, o)| o.addresses.iter().map(move |a| (*a, d.clone())))
            .collect();
        merge(
            &mut self.outbound,
            outbound,
            &out_changed,
            &out_removed,
            version,
        );
        merge(
            &mut self.inbound,
            inbound,
            &in_changed,
            &in_removed,
            version,
        );
        Changes {
            version: Some(version),
            outbound: out_changed,
            outbound_removed: out_removed,
            inbound: in_changed,
            inbound_removed: in_removed,
        }
    }

    /// The outbound piece of a destination.
    pub fn outbound(&self, dest: &Destination) -> Option<&Versioned<OutboundService>> {
        self.outbound.get(dest)
    }

    /// The destination a proxy's connection to `addr` (a VIP:port, or a pod IP:port of a
    /// headless Service) goes to.
    pub fn destination_of(&self, addr: SocketAddr) -> Option<&Destination> {
        self.by_address.get(&addr)
    }

    /// The inbound piece of a Pod.
    pub fn inbound(&self, pod: &ObjKey) -> Option<&Versioned<InboundConfig>> {
        self.inbound.get(pod)
    }

    /// The last version issued.
    pub fn version(&self) -> u64 {
        self.versions.last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::derive::tests::{shop, slice};

    fn dest(name: &str, port: u16) -> Destination {
        Destination {
            service: ObjKey::new("shop", name),
            port,
        }
    }

    #[test]
    fn first_computation_versions_everything_once() {
        let mut index = Index::new(shop(), Versioner::default());
        let changes = index.recompute(1_000);
        assert_eq!(changes.version, Some(1_000));
        assert_eq!(changes.outbound.len(), 4);
        assert_eq!(changes.inbound.len(), 2);
        let reviews = index.outbound(&dest("reviews", 9080)).expect("piece");
        assert_eq!(reviews.version, 1_000);
        assert_eq!(
            index.destination_of("10.96.0.12:9090".parse().expect("addr")),
            Some(&dest("reviews", 9090))
        );
        assert!(
            index.recompute(2_000).is_empty(),
            "nothing changed, no version"
        );
        assert_eq!(index.version(), 1_000);
    }

    #[test]
    fn a_burst_of_changes_yields_one_version_on_changed_pieces_only() {
        let mut index = Index::new(shop(), Versioner::default());
        index.recompute(1_000);
        // 50 endpoint changes to reviews-v1 before the debounced recomputation.
        for i in 0..50u8 {
            let ip = format!("10.244.1.{i}");
            index.snapshot_mut().slices.insert(
                ObjKey::new("shop", "reviews-v1-abc"),
                slice("reviews-v1", &[("http", 9080)], &[(ip.as_str(), "", true)]),
            );
        }
        let changes = index.recompute(1_001);
        assert_eq!(changes.version, Some(1_001));
        assert_eq!(changes.outbound, vec![dest("reviews-v1", 9080)]);
        assert!(changes.inbound.is_empty());
        let v1 = index.outbound(&dest("reviews-v1", 9080)).expect("v1");
        assert_eq!(v1.version, 1_001);
        assert_eq!(v1.value.endpoints.len(), 1);
        assert_eq!(
            v1.value.endpoints[0].address.to_string(),
            "10.244.1.49:9080"
        );
        assert_eq!(
            index
                .outbound(&dest("reviews", 9080))
                .expect("root")
                .version,
            1_000
        );
    }

    #[test]
    fn removals_are_reported_and_versions_never_go_back() {
        let mut index = Index::new(shop(), Versioner::default());
        index.recompute(5_000);
        index
            .snapshot_mut()
            .services
            .remove(&ObjKey::new("shop", "reviews-v2"));
        index
            .snapshot_mut()
            .pods
            .remove(&ObjKey::new("shop", "reviews-2"));
        // The clock stepped back: the version still grows.
        let changes = index.recompute(10);
        assert_eq!(changes.version, Some(5_001));
        assert_eq!(changes.outbound_removed, vec![dest("reviews-v2", 9080)]);
        assert_eq!(
            changes.inbound_removed,
            vec![ObjKey::new("shop", "reviews-2")]
        );
        // (reviews-2 was not meshed, so the endpoints of reviews did not change.)
        assert!(!changes.outbound.contains(&dest("reviews", 9080)));
        assert!(index.outbound(&dest("reviews-v2", 9080)).is_none());
        assert!(
            index
                .destination_of("10.96.0.14:9080".parse().expect("addr"))
                .is_none()
        );
    }
}
