//! The discovery index: cluster state ([`model::Snapshot`]) → derived proxy config pieces
//! ([`derive`]), each with a version that only grows ([`version`]), recomputed once per
//! burst of changes ([`debounce`]).
//!
//! This module is the pure core: the watches that feed the snapshot and the stream server
//! that reads the pieces sit around it. [`Index::recompute`] keeps the version of each
//! piece that did not change and gives all changed pieces one new version, so a storm of
//! changes yields one version. It is incremental: watch events applied with
//! [`Index::apply`] record what they touched ([`dirty`]), and only the pieces those
//! objects can affect are derived again, with the same result as deriving everything.

pub mod api;
pub mod debounce;
pub mod derive;
pub mod dirty;
pub mod feed;
pub mod model;
pub mod version;
pub mod watch;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
};

use remora_crds::proxy::OutboundService;

use self::{
    derive::{Destination, PodPiece},
    dirty::{Dirty, Relations},
    feed::{Feed, Kind, Obj, Update},
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
#[derive(Debug)]
pub struct Index {
    snapshot: Snapshot,
    outbound: BTreeMap<Destination, Versioned<OutboundService>>,
    inbound: BTreeMap<ObjKey, Versioned<PodPiece>>,
    /// Address → the destinations having it, sorted; the last one answers (as if the
    /// destinations had been entered in order, each overwriting the one before).
    by_address: HashMap<SocketAddr, Vec<Destination>>,
    versions: Versioner,
    /// What changed since the last recomputation.
    dirty: Dirty,
    /// The snapshot's slice relations, kept up to date by [`Index::apply`].
    relations: Relations,
    /// `false`: every recomputation derives everything (for comparisons).
    incremental: bool,
}

impl Default for Index {
    fn default() -> Self {
        Self::new(Snapshot::default(), Versioner::default())
    }
}

/// A derived piece for each key of `keys` (`None`: it has none now).
type Derived<K, V> = Vec<(K, Option<V>)>;

/// Freshly derived pieces: outbound and inbound.
type Pieces = (
    Derived<Destination, OutboundService>,
    Derived<ObjKey, PodPiece>,
);

/// Derives the pieces of `dests` and `pods`.
fn pieces(
    lookup: &derive::Lookup<'_>,
    dests: BTreeSet<Destination>,
    pods: BTreeSet<ObjKey>,
) -> Pieces {
    let outbound = dests
        .into_iter()
        .map(|d| {
            let piece = lookup.outbound(&d);
            (d, piece)
        })
        .collect();
    let inbound = pods
        .into_iter()
        .map(|k| {
            let piece = lookup.pod(&k);
            (k, piece)
        })
        .collect();
    (outbound, inbound)
}

/// Compares freshly derived pieces with the current ones: (changed, removed), in key order.
fn diff<K: Ord + Clone, V: PartialEq>(
    old: &BTreeMap<K, Versioned<V>>,
    new: &Derived<K, V>,
) -> (Vec<K>, Vec<K>) {
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    for (k, v) in new {
        match (old.get(k), v) {
            (Some(_), None) => removed.push(k.clone()),
            (None, Some(_)) => changed.push(k.clone()),
            (Some(o), Some(v)) if o.value != *v => changed.push(k.clone()),
            _ => {}
        }
    }
    (changed, removed)
}

/// Puts changed pieces (`new` holds only those) in with `version`, drops removed ones.
fn merge<K: Ord, V>(old: &mut BTreeMap<K, Versioned<V>>, new: Derived<K, V>, version: u64) {
    for (k, v) in new {
        match v {
            None => {
                old.remove(&k);
            }
            Some(value) => {
                old.insert(k, Versioned { version, value });
            }
        }
    }
}

/// Is `k` among the (sorted) changed or removed keys?
fn touched<K: Ord>(changed: &[K], removed: &[K], k: &K) -> bool {
    changed.binary_search(k).is_ok() || removed.binary_search(k).is_ok()
}

fn add_addresses(
    by_address: &mut HashMap<SocketAddr, Vec<Destination>>,
    dest: &Destination,
    piece: &OutboundService,
) {
    for a in &piece.addresses {
        let dests = by_address.entry(*a).or_default();
        if let Err(at) = dests.binary_search(dest) {
            dests.insert(at, dest.clone());
        }
    }
}

fn remove_addresses(
    by_address: &mut HashMap<SocketAddr, Vec<Destination>>,
    dest: &Destination,
    piece: &OutboundService,
) {
    for a in &piece.addresses {
        if let Some(dests) = by_address.get_mut(a) {
            dests.retain(|d| d != dest);
            if dests.is_empty() {
                by_address.remove(a);
            }
        }
    }
}

/// What an update touches, read before it is applied (a slice as it was).
enum Touch {
    None,
    All,
    Service(ObjKey),
    Slice(ObjKey),
    Pod(ObjKey),
    /// A Node: the Pods on it (their zone).
    Node(String),
}

impl Index {
    pub fn new(snapshot: Snapshot, versions: Versioner) -> Self {
        Self {
            snapshot,
            outbound: BTreeMap::new(),
            inbound: BTreeMap::new(),
            by_address: HashMap::new(),
            versions,
            dirty: Dirty::everything(),
            relations: Relations::default(),
            incremental: true,
        }
    }

    /// `false`: derive everything on every recomputation, as before recomputation was
    /// incremental (the results are the same; for benchmarks and tests to compare).
    pub fn set_incremental(&mut self, incremental: bool) {
        self.incremental = incremental;
    }

    /// The cluster state, to change directly; the next [`Index::recompute`] then derives
    /// everything. Watch events go through [`Index::apply`], which records what they touch.
    pub fn snapshot_mut(&mut self) -> &mut Snapshot {
        self.dirty.all = true;
        &mut self.snapshot
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Applies a watch event to the snapshot through `feed` and records what it touched;
    /// returns whether the snapshot may have changed.
    pub fn apply(&mut self, feed: &mut Feed, update: Update) -> bool {
        let touch = match &update {
            Update::Upsert(Obj::Service(k, _)) | Update::Delete(Kind::Service, k) => {
                Touch::Service(k.clone())
            }
            Update::Upsert(Obj::EndpointSlice(k, _)) | Update::Delete(Kind::EndpointSlice, k) => {
                Touch::Slice(k.clone())
            }
            Update::Upsert(Obj::Pod(k, _)) | Update::Delete(Kind::Pod, k) => Touch::Pod(k.clone()),
            Update::Upsert(Obj::Node(name, _)) => Touch::Node(name.clone()),
            Update::Delete(Kind::Node, k) => Touch::Node(k.name.clone()),
            Update::RelistStart(_) => Touch::None,
            _ => Touch::All,
        };
        // A slice's relations and what it makes dirty, read from the slice as the snapshot
        // has it and as the update has it (no copy) before the update moves in; the feed
        // changes a slice exactly when the two differ.
        if let Touch::Slice(k) = &touch {
            let old = self.snapshot.slices.get(k);
            let new = match &update {
                Update::Upsert(Obj::EndpointSlice(_, new)) => new.as_ref(),
                _ => None,
            };
            if old != new {
                self.relations.replace(k, old, new);
                self.dirty.slice(&k.namespace, old, new);
            }
        }
        if let Update::Upsert(Obj::Pod(k, new)) = &update
            && let Some(e) = &new.weight_error
            && self
                .snapshot
                .pods
                .get(k)
                .is_none_or(|old| old.weight_error != new.weight_error)
        {
            // Once per Pod and value: the webhook refuses such pods at creation, so this
            // is an annotation changed later.
            tracing::warn!(pod = %k, "{e}");
        }
        let changed = feed.apply(&mut self.snapshot, update);
        if changed {
            match touch {
                Touch::None | Touch::Slice(_) => {}
                Touch::All => self.dirty.all = true,
                Touch::Service(k) => {
                    self.dirty.services.insert(k);
                }
                Touch::Pod(k) => {
                    self.dirty.pods.insert(k);
                }
                Touch::Node(name) => {
                    let on_node = self
                        .snapshot
                        .pods
                        .iter()
                        .filter(|(_, p)| p.node.as_deref() == Some(name.as_str()))
                        .map(|(k, _)| k.clone());
                    self.dirty.inbound.extend(on_node);
                }
            }
        }
        changed
    }

    /// Derives the pieces that changes since the last call can affect (all of them the
    /// first time, after direct snapshot edits and after broad changes), at wall-clock
    /// time `now_micros`; changed pieces get one new version, unchanged ones keep theirs.
    pub fn recompute(&mut self, now_micros: u64) -> Changes {
        let dirty = std::mem::take(&mut self.dirty);
        let (outbound, inbound) = if dirty.all || !self.incremental {
            self.relations = Relations::of(&self.snapshot);
            self.derive_all()
        } else if dirty.is_empty() {
            return Changes::default();
        } else {
            self.derive_dirty(&dirty)
        };
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
        let outbound: Derived<_, _> = outbound
            .into_iter()
            .filter(|(d, _)| touched(&out_changed, &out_removed, d))
            .collect();
        let inbound: Derived<_, _> = inbound
            .into_iter()
            .filter(|(k, _)| touched(&in_changed, &in_removed, k))
            .collect();
        for (dest, piece) in &outbound {
            if let Some(old) = self.outbound.get(dest) {
                remove_addresses(&mut self.by_address, dest, &old.value);
            }
            if let Some(new) = piece {
                add_addresses(&mut self.by_address, dest, new);
            }
        }
        merge(&mut self.outbound, outbound, version);
        merge(&mut self.inbound, inbound, version);
        Changes {
            version: Some(version),
            outbound: out_changed,
            outbound_removed: out_removed,
            inbound: in_changed,
            inbound_removed: in_removed,
        }
    }

    /// Every piece, and `None` for each current piece that is gone, in key order.
    fn derive_all(&self) -> Pieces {
        let snap = &self.snapshot;
        let lookup = derive::Lookup::new(snap);
        let dests: BTreeSet<Destination> = derive::destinations(snap)
            .into_iter()
            .chain(self.outbound.keys().cloned())
            .collect();
        let pods: BTreeSet<ObjKey> = snap
            .pods
            .keys()
            .chain(self.inbound.keys())
            .cloned()
            .collect();
        pieces(&lookup, dests, pods)
    }

    /// The pieces `dirty` can affect (see [`dirty`]), in key order.
    fn derive_dirty(&self, dirty: &Dirty) -> Pieces {
        let snap = &self.snapshot;
        let rel = &self.relations;
        let service_of = |slice: &ObjKey| {
            snap.slices
                .get(slice)
                .map(|s| ObjKey::new(slice.namespace.clone(), s.service.clone()))
        };
        let pods_of = |slice: &ObjKey| -> Vec<ObjKey> {
            snap.slices.get(slice).map_or_else(Vec::new, |s| {
                s.endpoints
                    .iter()
                    .filter_map(|e| e.pod.as_ref())
                    .map(|p| ObjKey::new(slice.namespace.clone(), p.clone()))
                    .collect()
            })
        };

        let mut services: BTreeSet<ObjKey> = dirty.outbound.clone();
        let mut pods: BTreeSet<ObjKey> = dirty.inbound.clone();
        for svc in &dirty.services {
            services.insert(svc.clone());
            // Split roots naming it (their backends must exist with the port).
            for (key, ts) in &snap.splits {
                let spec = &ts.spec;
                let names = spec.backends.iter().any(|b| b.service == svc.name)
                    || spec.matches.iter().any(|m| m.backend == svc.name)
                    || spec.mirror.as_ref().is_some_and(|m| m.service == svc.name);
                if names && key.namespace == svc.namespace {
                    services.insert(ObjKey::new(svc.namespace.clone(), spec.service.clone()));
                }
            }
            for slice in rel.slices_of_service(svc) {
                pods.extend(pods_of(slice));
            }
        }
        for pod in &dirty.pods {
            pods.insert(pod.clone());
            services.extend(rel.slices_of_pod(pod).filter_map(service_of));
        }

        // Only the slices these pieces read.
        let for_services: BTreeSet<&ObjKey> = services
            .iter()
            .flat_map(|s| rel.slices_of_service(s))
            .collect();
        let for_pods: BTreeSet<&ObjKey> = pods.iter().flat_map(|p| rel.slices_of_pod(p)).collect();
        let get = |k: &ObjKey| snap.slices.get_key_value(k);
        let lookup = derive::Lookup::with_slices(
            snap,
            for_services.into_iter().filter_map(get),
            for_pods.into_iter().filter_map(get),
        );

        let mut dests: BTreeSet<Destination> = BTreeSet::new();
        for svc in &services {
            let from = Destination {
                service: svc.clone(),
                port: 0,
            };
            let to = Destination {
                service: svc.clone(),
                port: u16::MAX,
            };
            dests.extend(self.outbound.range(from..=to).map(|(d, _)| d.clone()));
            if let Some(state) = snap.services.get(svc) {
                dests.extend(state.ports.iter().filter(|p| p.protocol == "TCP").map(|p| {
                    Destination {
                        service: svc.clone(),
                        port: p.port,
                    }
                }));
            }
        }
        pieces(&lookup, dests, pods)
    }

    /// The outbound piece of a destination.
    pub fn outbound(&self, dest: &Destination) -> Option<&Versioned<OutboundService>> {
        self.outbound.get(dest)
    }

    /// The destination a proxy's connection to `addr` (a VIP:port, or a pod IP:port of a
    /// headless Service) goes to (the last in order when several have it).
    pub fn destination_of(&self, addr: SocketAddr) -> Option<&Destination> {
        self.by_address.get(&addr).and_then(|d| d.last())
    }

    /// The inbound piece of a Pod (with its zone).
    pub fn inbound(&self, pod: &ObjKey) -> Option<&Versioned<PodPiece>> {
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
    use crate::index::feed::Kind;

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
    fn node_zones_and_pod_weights_version_only_the_pieces_they_reach() {
        let mut snap = shop();
        snap.pods
            .get_mut(&ObjKey::new("shop", "reviews-1"))
            .expect("pod")
            .node = Some("n1".to_owned());
        let mut index = Index::new(snap, Versioner::default());
        let mut feed = Feed::default();
        index.recompute(1_000);
        let zone = |index: &Index| {
            index
                .inbound(&ObjKey::new("shop", "reviews-1"))
                .map(|p| (p.version, p.value.locality.zone.clone()))
        };
        assert_eq!(zone(&index), Some((1_000, None)), "node not known yet");

        assert!(index.apply(
            &mut feed,
            Update::Upsert(Obj::Node("n1".to_owned(), Some("zone-a".to_owned())))
        ));
        let changes = index.recompute(2_000);
        assert_eq!(changes.inbound, vec![ObjKey::new("shop", "reviews-1")]);
        assert!(changes.outbound.is_empty(), "a zone is no outbound news");
        assert_eq!(zone(&index), Some((2_000, Some("zone-a".to_owned()))));
        assert_eq!(
            index
                .inbound(&ObjKey::new("shop", "reviews-2"))
                .map(|p| p.version),
            Some(1_000),
            "a pod on no node keeps its version"
        );
        assert!(
            !index.apply(
                &mut feed,
                Update::Upsert(Obj::Node("n1".to_owned(), Some("zone-a".to_owned())))
            ),
            "the same zone (a Node status update) changes nothing"
        );
        assert!(index.apply(
            &mut feed,
            Update::Delete(Kind::Node, feed::namespace_key("n1"))
        ));
        index.recompute(3_000);
        assert_eq!(zone(&index), Some((3_000, None)));

        let mut pod = index.snapshot().pods[&ObjKey::new("shop", "reviews-1")].clone();
        pod.weight = 7;
        index.apply(
            &mut feed,
            Update::Upsert(Obj::Pod(ObjKey::new("shop", "reviews-1"), pod)),
        );
        let changes = index.recompute(4_000);
        assert!(changes.outbound.contains(&dest("reviews", 9080)));
        let weights: Vec<u32> = index
            .outbound(&dest("reviews", 9080))
            .expect("piece")
            .value
            .endpoints
            .iter()
            .map(|e| e.weight)
            .collect();
        assert_eq!(weights, [7, 1]);
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

    /// A small deterministic generator (xorshift), so the sequence is the same every run.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len() as u64) as usize]
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    const NAMESPACES: [&str; 2] = ["shop", "web"];
    const SERVICES: [&str; 5] = ["a", "b", "c", "d", "e"];
    const PODS: [&str; 6] = ["p0", "p1", "p2", "p3", "p4", "p5"];
    const SLICES: [&str; 6] = ["s0", "s1", "s2", "s3", "s4", "s5"];

    fn random_service(g: &mut Gen) -> model::ServiceState {
        use crate::index::derive::tests::svc;
        // Few VIPs, so destinations share addresses; some headless.
        let ip = g.pick(&["", "10.96.0.1", "10.96.0.2", "10.96.0.3"]);
        let ports: Vec<(&str, u16)> = [("http", 80), ("admin", 9090), ("grpc", 81)]
            .into_iter()
            .filter(|_| g.chance(60))
            .collect();
        let mut s = svc(ip, &ports);
        if g.chance(20) {
            s.opaque_ports.insert(80);
        }
        if let Some(p) = s.ports.first_mut().filter(|_| g.chance(30)) {
            p.app_protocol = Some("http".to_owned());
        }
        s
    }

    fn random_slice(g: &mut Gen) -> model::SliceState {
        use crate::index::derive::tests::slice;
        let ports: Vec<(&str, u16)> = [("http", 8080), ("admin", 9091), ("grpc", 8081)]
            .into_iter()
            .filter(|_| g.chance(60))
            .collect();
        let eps: Vec<(String, &str, bool)> = (0..g.below(4))
            .map(|_| {
                let ip = format!("10.244.0.{}", g.below(6));
                let pod = g.pick(&["", "p0", "p1", "p2", "p3", "p4", "p5"]);
                (ip, pod, g.chance(70))
            })
            .collect();
        let eps: Vec<(&str, &str, bool)> =
            eps.iter().map(|(ip, p, r)| (ip.as_str(), *p, *r)).collect();
        slice(g.pick(&SERVICES), &ports, &eps)
    }

    fn random_pod(g: &mut Gen) -> model::PodState {
        let mut p = model::PodState {
            service_account: g.pick(&["sa-1", "sa-2"]).to_owned(),
            meshed: g.chance(60),
            ..model::PodState::default()
        };
        if g.chance(20) {
            p.opaque_ports.insert(8080);
        }
        p.node = g.chance(80).then(|| g.pick(&["n1", "n2"]).to_owned());
        if g.chance(20) {
            p.weight = 1 + g.below(5) as u32;
        }
        p
    }

    fn random_policy(g: &mut Gen, ns: &str, name: &str) -> remora_crds::MeshPolicy {
        use crate::index::derive::tests::policy;
        use remora_crds::{
            MeshPolicySpec,
            policy::{LbAlgorithm, LoadBalancer, MtlsMode, MtlsPolicy, RateLimit},
        };
        let target = g.chance(60).then(|| g.pick(&SERVICES));
        let mut spec = MeshPolicySpec {
            mtls: g.chance(50).then_some(MtlsPolicy {
                mode: MtlsMode::Strict,
            }),
            rate_limit: g.chance(50).then(|| RateLimit {
                requests_per_second: 1 + g.below(10) as u32,
                burst: None,
                per_identity: g.chance(30),
            }),
            ..MeshPolicySpec::default()
        };
        if g.chance(15) {
            // Invalid: consistent hashing without a key.
            spec.load_balancer = Some(LoadBalancer {
                algorithm: LbAlgorithm::ConsistentHash,
                consistent_hash: None,
                locality: None,
            });
        }
        policy(ns, name, g.below(5) as i64, target, spec)
    }

    fn random_split(g: &mut Gen, ns: &str, name: &str) -> remora_crds::TrafficSplit {
        use remora_crds::{
            TrafficSplit, TrafficSplitSpec,
            traffic_split::{SplitBackend, SplitMirror},
        };
        let backends = (0..1 + g.below(3))
            .map(|_| SplitBackend {
                service: g.pick(&SERVICES).to_owned(),
                weight: g.below(3) as u32,
            })
            .collect();
        let mirror = g.chance(30).then(|| SplitMirror {
            service: g.pick(&SERVICES).to_owned(),
            percent: 10,
        });
        let mut ts = TrafficSplit::new(
            name,
            TrafficSplitSpec {
                service: g.pick(&SERVICES).to_owned(),
                backends,
                matches: Vec::new(),
                mirror,
            },
        );
        ts.metadata.namespace = Some(ns.to_owned());
        ts.metadata.creation_timestamp = Some(derive::tests::at(g.below(5) as i64));
        ts
    }

    /// One random watch event.
    fn random_update(g: &mut Gen, snap: &Snapshot) -> Update {
        let ns = g.pick(&NAMESPACES);
        let delete = g.chance(20);
        let k = |name: &str| ObjKey::new(ns, name);
        match g.below(100) {
            0..=19 => {
                let key = k(g.pick(&SERVICES));
                if delete {
                    Update::Delete(Kind::Service, key)
                } else {
                    Update::Upsert(Obj::Service(key, random_service(g)))
                }
            }
            20..=49 => {
                let key = k(g.pick(&SLICES));
                if delete {
                    Update::Delete(Kind::EndpointSlice, key)
                } else if let Some(mut s) = snap.slices.get(&key).cloned().filter(|_| g.chance(40))
                {
                    // The same slice, its endpoints' state and Pods changed.
                    for e in &mut s.endpoints {
                        e.ready = g.chance(50);
                        if g.chance(30) {
                            e.pod = Some(g.pick(&PODS).to_owned());
                        }
                    }
                    if g.chance(30) {
                        s.endpoints.pop();
                    }
                    Update::Upsert(Obj::EndpointSlice(key, Some(s)))
                } else if g.chance(5) {
                    Update::Upsert(Obj::EndpointSlice(key, None))
                } else {
                    Update::Upsert(Obj::EndpointSlice(key, Some(random_slice(g))))
                }
            }
            50..=74 => {
                let key = k(g.pick(&PODS));
                if delete {
                    Update::Delete(Kind::Pod, key)
                } else {
                    Update::Upsert(Obj::Pod(key, random_pod(g)))
                }
            }
            75..=84 => {
                let name = g.pick(&["pa", "pb", "pc"]);
                if delete {
                    Update::Delete(Kind::MeshPolicy, k(name))
                } else {
                    Update::Upsert(Obj::MeshPolicy(Box::new(random_policy(g, ns, name))))
                }
            }
            85..=94 => {
                let name = g.pick(&["ta", "tb"]);
                if delete {
                    Update::Delete(Kind::TrafficSplit, k(name))
                } else {
                    Update::Upsert(Obj::TrafficSplit(Box::new(random_split(g, ns, name))))
                }
            }
            95..=96 => {
                let name = g.pick(&["n1", "n2", "n3"]);
                if delete {
                    Update::Delete(Kind::Node, feed::namespace_key(name))
                } else {
                    let zone = g
                        .chance(80)
                        .then(|| g.pick(&["zone-a", "zone-b"]).to_owned());
                    Update::Upsert(Obj::Node(name.to_owned(), zone))
                }
            }
            _ => {
                if delete {
                    Update::Delete(Kind::Namespace, feed::namespace_key(ns))
                } else {
                    let labels = [("team".to_owned(), g.pick(&["x", "y"]).to_owned())];
                    Update::Upsert(Obj::Namespace(ns.to_owned(), labels.into_iter().collect()))
                }
            }
        }
    }

    fn pieces(index: &Index) -> (Vec<String>, Vec<(SocketAddr, Destination)>) {
        let mut by_address: Vec<(SocketAddr, Destination)> = index
            .by_address
            .keys()
            .filter_map(|a| index.destination_of(*a).map(|d| (*a, d.clone())))
            .collect();
        by_address.sort();
        let text = index
            .outbound
            .iter()
            .map(|(d, v)| format!("{d} {} {:?}", v.version, v.value))
            .chain(
                index
                    .inbound
                    .iter()
                    .map(|(k, v)| format!("{k} {} {:?}", v.version, v.value)),
            )
            .collect();
        (text, by_address)
    }

    #[test]
    fn incremental_recomputation_equals_a_full_one_after_every_step() {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        let mut incremental = Index::default();
        let mut full = Index::default();
        full.set_incremental(false);
        let (mut feed_i, mut feed_f) = (Feed::default(), Feed::default());
        let (mut versions, mut partial, mut relists) = (0, 0, 0);
        for step in 0..3_000u64 {
            let mut updates: Vec<Update> = (0..1 + g.below(4))
                .map(|_| random_update(&mut g, incremental.snapshot()))
                .collect();
            if g.chance(2) {
                // A relist of one kind that lists only some of what the index holds.
                let kind = Kind::ALL[g.below(6) as usize];
                updates.insert(0, Update::RelistStart(kind));
                updates.push(Update::RelistDone(kind));
                relists += 1;
            }
            for u in updates {
                let a = incremental.apply(&mut feed_i, u.clone());
                let b = full.apply(&mut feed_f, u);
                assert_eq!(a, b, "step {step}: the feed answers alike");
            }
            let was_partial = !incremental.dirty.all;
            let now = 1_000 + step * 10;
            let ci = incremental.recompute(now);
            let cf = full.recompute(now);
            assert_eq!(ci, cf, "step {step}: the same changes");
            assert_eq!(pieces(&incremental), pieces(&full), "step {step}");
            assert_eq!(incremental.by_address, full.by_address, "step {step}");
            // And from scratch, without history (versions aside).
            let mut fresh = Index::new(incremental.snapshot().clone(), Versioner::default());
            fresh.recompute(now);
            let values = |i: &Index| {
                (
                    i.outbound
                        .iter()
                        .map(|(d, v)| (d.clone(), v.value.clone()))
                        .collect::<Vec<_>>(),
                    i.inbound
                        .iter()
                        .map(|(k, v)| (k.clone(), v.value.clone()))
                        .collect::<Vec<_>>(),
                )
            };
            assert_eq!(
                values(&incremental),
                values(&fresh),
                "step {step}: from scratch"
            );
            assert_eq!(
                pieces(&incremental).1,
                pieces(&fresh).1,
                "step {step}: addresses"
            );
            assert_eq!(
                incremental.relations,
                Relations::of(incremental.snapshot()),
                "step {step}"
            );
            if ci.version.is_some() {
                versions += 1;
                partial += usize::from(was_partial);
            }
        }
        // The sequence exercised what it claims to.
        assert!(versions > 1_000, "{versions} versions");
        assert!(partial > 500, "{partial} incremental versions");
        assert!(relists > 20, "{relists} relists");
        assert!(!incremental.outbound.is_empty() && !incremental.inbound.is_empty());
    }

    #[test]
    fn an_endpoint_change_derives_its_service_only_and_a_deletion_is_reported() {
        let mut index = Index::new(shop(), Versioner::default());
        index.recompute(1_000);
        let mut feed = Feed::default();
        let mut s = index
            .snapshot()
            .slices
            .get(&ObjKey::new("shop", "reviews-abc"))
            .cloned()
            .expect("slice");
        s.endpoints[0].ready = false;
        assert!(index.apply(
            &mut feed,
            Update::Upsert(Obj::EndpointSlice(
                ObjKey::new("shop", "reviews-abc"),
                Some(s)
            ))
        ));
        assert!(!index.dirty.all);
        let changes = index.recompute(2_000);
        assert_eq!(
            changes.outbound,
            vec![dest("reviews", 9080), dest("reviews", 9090)]
        );
        assert!(
            changes.inbound.is_empty(),
            "inbound pieces read no readiness"
        );
        assert_eq!(
            index
                .outbound(&dest("reviews-v1", 9080))
                .expect("v1")
                .version,
            1_000
        );

        assert!(index.apply(
            &mut feed,
            Update::Delete(Kind::Service, ObjKey::new("shop", "reviews"))
        ));
        let changes = index.recompute(3_000);
        assert_eq!(
            changes.outbound_removed,
            vec![dest("reviews", 9080), dest("reviews", 9090)]
        );
        assert_eq!(changes.version, Some(3_000));
        assert!(
            index
                .destination_of("10.96.0.12:9080".parse().expect("addr"))
                .is_none()
        );
        assert!(index.recompute(4_000).is_empty(), "nothing pending");
    }
}
