//! What changed since the last recomputation, so [`super::Index::recompute`] derives only
//! the pieces a change can affect: the objects touched by watch events, and the relations
//! (which slices belong to a Service, which slices list a Pod) kept up to date as slices
//! come and go. Pure bookkeeping.
//!
//! What each piece reads (`derive`): a destination's outbound piece reads its Service, the
//! Service's slices, the Pods those slices list, the policies and the split of the Service
//! (whose backends must exist with the port); a Pod's inbound piece reads the Pod, the
//! slices listing it, their Services and the policies. So:
//!
//! - a Service changes → its destinations, the split roots naming it, the inbound pieces
//!   of the Pods its slices list;
//! - a slice changes → its Service's destinations and the inbound pieces of the Pods it
//!   lists, before and after the change;
//! - a Pod changes → its inbound piece and the destinations whose slices list it;
//! - a Node changes (its zone) → the inbound pieces of the Pods on it;
//! - Namespaces, MeshPolicies, TrafficSplits and relists are rare and broad: everything.

use std::collections::{BTreeSet, HashMap};

use super::model::{ObjKey, SliceState, Snapshot};

/// Objects changed since the last recomputation.
#[derive(Clone, Debug, Default)]
pub struct Dirty {
    /// Derive everything (the first computation, broad kinds, relists, direct snapshot
    /// edits).
    pub all: bool,
    /// Service objects that changed (or went).
    pub services: BTreeSet<ObjKey>,
    /// Services whose destinations must be derived again (their slices changed).
    pub outbound: BTreeSet<ObjKey>,
    /// Pods whose inbound piece must be derived again (slices listing them changed).
    pub inbound: BTreeSet<ObjKey>,
    /// Pod objects that changed (or went).
    pub pods: BTreeSet<ObjKey>,
}

impl Dirty {
    /// Everything must be derived.
    pub fn everything() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all
            && self.services.is_empty()
            && self.outbound.is_empty()
            && self.inbound.is_empty()
            && self.pods.is_empty()
    }

    /// A slice of namespace `namespace` changed from `old` to `new` (`None`: absent): its
    /// Services' destinations, and the inbound pieces of the Pods it lists — of all of
    /// them when its Service or ports changed, else only of those it started or stopped
    /// listing (an inbound piece reads the slice's Service, ports and Pods, not the
    /// endpoints' state).
    pub fn slice(&mut self, namespace: &str, old: Option<&SliceState>, new: Option<&SliceState>) {
        if old == new {
            return;
        }
        for s in old.iter().chain(new.iter()) {
            self.outbound
                .insert(ObjKey::new(namespace, s.service.clone()));
        }
        let (old_pods, new_pods) = (
            old.map(pods_of).unwrap_or_default(),
            new.map(pods_of).unwrap_or_default(),
        );
        let same_shape = match (old, new) {
            (Some(o), Some(n)) => o.service == n.service && o.ports == n.ports,
            _ => false,
        };
        let pods: Vec<&str> = if same_shape {
            old_pods.symmetric_difference(&new_pods).copied().collect()
        } else {
            old_pods.union(&new_pods).copied().collect()
        };
        self.inbound
            .extend(pods.into_iter().map(|p| ObjKey::new(namespace, p)));
    }
}

/// Slice keys by Service and by the Pods they list (keys in the slice's namespace).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Relations {
    slices_of_service: SliceMap,
    slices_of_pod: SliceMap,
}

/// Slice keys (sorted) by the object they relate to; mostly one slice each, so a `Vec`
/// (a `BTreeSet` node per Pod would cost ~0.5 KiB).
type SliceMap = HashMap<ObjKey, Vec<ObjKey>>;

fn link(map: &mut SliceMap, from: ObjKey, slice: &ObjKey) {
    let slices = map.entry(from).or_default();
    if let Err(at) = slices.binary_search(slice) {
        slices.insert(at, slice.clone());
    }
}

fn unlink(map: &mut SliceMap, from: ObjKey, slice: &ObjKey) {
    if let Some(slices) = map.get_mut(&from) {
        slices.retain(|s| s != slice);
        if slices.is_empty() {
            map.remove(&from);
        }
    }
}

fn pods_of(slice: &SliceState) -> BTreeSet<&str> {
    slice
        .endpoints
        .iter()
        .filter_map(|e| e.pod.as_deref())
        .collect()
}

impl Relations {
    /// The relations of every slice of `snap`.
    pub fn of(snap: &Snapshot) -> Self {
        let mut rel = Self::default();
        for (key, slice) in &snap.slices {
            rel.add(key, slice);
        }
        rel
    }

    /// Slice `key` changed from `old` to `new` (`None`: absent); nothing to do when its
    /// Service and Pods stay (an endpoint's state changed).
    pub fn replace(&mut self, key: &ObjKey, old: Option<&SliceState>, new: Option<&SliceState>) {
        if let (Some(o), Some(n)) = (old, new)
            && o.service == n.service
            && pods_of(o) == pods_of(n)
        {
            return;
        }
        if let Some(old) = old {
            self.remove(key, old);
        }
        if let Some(new) = new {
            self.add(key, new);
        }
    }

    /// Records slice `key`.
    pub fn add(&mut self, key: &ObjKey, slice: &SliceState) {
        self.each(key, slice, link);
    }

    /// Forgets slice `key` (as it was: `slice`).
    pub fn remove(&mut self, key: &ObjKey, slice: &SliceState) {
        self.each(key, slice, unlink);
    }

    /// `op` on each relation of slice `key`.
    fn each(&mut self, key: &ObjKey, slice: &SliceState, op: fn(&mut SliceMap, ObjKey, &ObjKey)) {
        let ns = key.namespace.as_str();
        op(
            &mut self.slices_of_service,
            ObjKey::new(ns, slice.service.clone()),
            key,
        );
        for pod in pods_of(slice) {
            op(&mut self.slices_of_pod, ObjKey::new(ns, pod), key);
        }
    }

    /// The slices of Service `svc`.
    pub fn slices_of_service(&self, svc: &ObjKey) -> impl Iterator<Item = &ObjKey> {
        self.slices_of_service.get(svc).into_iter().flatten()
    }

    /// The slices listing Pod `pod`.
    pub fn slices_of_pod(&self, pod: &ObjKey) -> impl Iterator<Item = &ObjKey> {
        self.slices_of_pod.get(pod).into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::derive::tests::slice;

    #[test]
    fn relations_follow_slices_and_forget_what_went() {
        let mut snap = Snapshot::new("cluster.local");
        let key = ObjKey::new("shop", "a-1");
        let s = slice("a", &[("http", 80)], &[("10.244.0.1", "pod-1", true)]);
        snap.slices.insert(key.clone(), s.clone());
        let mut rel = Relations::default();
        rel.add(&key, &s);
        assert_eq!(rel, Relations::of(&snap));
        let svc = ObjKey::new("shop", "a");
        assert_eq!(rel.slices_of_service(&svc).collect::<Vec<_>>(), vec![&key]);
        assert_eq!(
            rel.slices_of_pod(&ObjKey::new("shop", "pod-1"))
                .collect::<Vec<_>>(),
            vec![&key]
        );
        rel.remove(&key, &s);
        assert_eq!(rel, Relations::default());
        assert_eq!(rel.slices_of_service(&svc).count(), 0);
    }
}
