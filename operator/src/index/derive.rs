//! Derivation: from a [`Snapshot`] to the proxy config pieces of the shared model
//! (`remora_crds::proxy`): one [`OutboundService`] per destination (a Service port) and
//! one [`InboundConfig`] per Pod. Pure functions.
//!
//! Policy resolution matches what the controllers report in status: for a target, the
//! oldest policy is in effect if it is valid; a per-Service policy overrides the
//! namespace-wide one (which applies when the per-Service one is absent or invalid).
//! A split's backends that do not exist or lack the port are left out (their share goes
//! to the others); a split with no weight left is not applied.
//!
//! A destination is a Service *port*: its pieces carry the VIP:port addresses and the
//! endpoints' `ip:targetPort` for that port only, so multi-port Services stay correct
//! with the model's flat endpoint list. Split backends are named `<svc>.<ns>` and resolve
//! to the backend's destination on the same port (backends must expose the root's
//! ports, which the TrafficSplit controller checks).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
};

use remora_crds::{
    MeshPolicy, TrafficSplit,
    proxy::{
        Endpoint, HeaderRoute, InboundConfig, InboundPolicy, Mirror, OutboundService, Protocol,
        ProxyLocality, Split, WeightedBackend,
    },
};

use super::model::{ObjKey, ServiceState, SliceState, Snapshot, app_protocol};
use crate::{conditions::policy_target, conflict, validate};

/// A destination clients connect to: one port of one Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Destination {
    pub service: ObjKey,
    pub port: u16,
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}:{}",
            self.service.name, self.service.namespace, self.port
        )
    }
}

/// What a Pod's proxy gets on its inbound stream: its inbound config and where it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct PodPiece {
    pub inbound: InboundConfig,
    pub locality: ProxyLocality,
}

/// The mesh name of a Service: `<name>.<namespace>`.
pub fn mesh_name(svc: &ObjKey) -> String {
    format!("{}.{}", svc.name, svc.namespace)
}

fn valid_oldest<'a>(
    candidates: impl IntoIterator<Item = &'a MeshPolicy>,
) -> Option<&'a MeshPolicy> {
    conflict::oldest(candidates).filter(|p| validate::mesh_policy_spec(&p.spec).is_empty())
}

/// namespace → name → value, borrowed from the snapshot; looked up with any `&str`.
type Nested<'a, V> = HashMap<&'a str, HashMap<&'a str, V>>;

fn get2<'m, V>(map: &'m Nested<'_, V>, namespace: &str, name: &str) -> Option<&'m V> {
    map.get(namespace)?.get(name)
}

/// The snapshot with the relations derivation follows indexed once, so deriving every
/// piece costs time linear in the cluster's size.
#[derive(Debug)]
pub struct Lookup<'a> {
    snap: &'a Snapshot,
    /// Slices by `(namespace, service)`.
    slices_by_service: Nested<'a, Vec<&'a SliceState>>,
    /// Slices listing a Pod, by `(namespace, pod)`.
    slices_by_pod: Nested<'a, Vec<&'a SliceState>>,
    /// Per-Service policy in effect, by `(namespace, service)`.
    service_policy: Nested<'a, &'a MeshPolicy>,
    /// Namespace-wide policy in effect, by namespace.
    namespace_policy: HashMap<&'a str, &'a MeshPolicy>,
    /// Split in effect, by `(namespace, root service)`.
    split: Nested<'a, &'a TrafficSplit>,
}

impl<'a> Lookup<'a> {
    pub fn new(snap: &'a Snapshot) -> Self {
        Self::with_slices(snap, &snap.slices, &snap.slices)
    }

    /// A lookup that knows only some slices (each given in key order, as the snapshot
    /// holds them): the pieces of a Service are right when every slice of it is among
    /// `for_services`, those of a Pod when every slice listing it is among `for_pods`; the
    /// policies and splits are always all indexed. An incremental recomputation uses it
    /// to read only what the changed pieces need.
    pub fn with_slices(
        snap: &'a Snapshot,
        for_services: impl IntoIterator<Item = (&'a ObjKey, &'a SliceState)>,
        for_pods: impl IntoIterator<Item = (&'a ObjKey, &'a SliceState)>,
    ) -> Self {
        let mut slices_by_service: Nested<'a, Vec<&'a SliceState>> = HashMap::new();
        let mut slices_by_pod: Nested<'a, Vec<&'a SliceState>> = HashMap::new();
        for (key, slice) in for_services {
            slices_by_service
                .entry(key.namespace.as_str())
                .or_default()
                .entry(slice.service.as_str())
                .or_default()
                .push(slice);
        }
        for (key, slice) in for_pods {
            let pods: BTreeSet<&str> = slice
                .endpoints
                .iter()
                .filter_map(|e| e.pod.as_deref())
                .collect();
            for pod in pods {
                slices_by_pod
                    .entry(key.namespace.as_str())
                    .or_default()
                    .entry(pod)
                    .or_default()
                    .push(slice);
            }
        }
        let mut per_service: Nested<'a, Vec<&'a MeshPolicy>> = HashMap::new();
        let mut per_namespace: HashMap<&'a str, Vec<&'a MeshPolicy>> = HashMap::new();
        for (key, p) in &snap.policies {
            match policy_target(p) {
                Some(target) => per_service
                    .entry(key.namespace.as_str())
                    .or_default()
                    .entry(target)
                    .or_default()
                    .push(p),
                None => per_namespace
                    .entry(key.namespace.as_str())
                    .or_default()
                    .push(p),
            }
        }
        let mut splits: Nested<'a, Vec<&'a TrafficSplit>> = HashMap::new();
        for (key, ts) in &snap.splits {
            splits
                .entry(key.namespace.as_str())
                .or_default()
                .entry(ts.spec.service.as_str())
                .or_default()
                .push(ts);
        }
        Self {
            snap,
            slices_by_service,
            slices_by_pod,
            service_policy: per_service
                .into_iter()
                .map(|(ns, by_name)| {
                    let winners = by_name
                        .into_iter()
                        .filter_map(|(name, ps)| valid_oldest(ps).map(|p| (name, p)))
                        .collect();
                    (ns, winners)
                })
                .collect(),
            namespace_policy: per_namespace
                .into_iter()
                .filter_map(|(k, ps)| valid_oldest(ps).map(|p| (k, p)))
                .collect(),
            split: splits
                .into_iter()
                .map(|(ns, by_root)| {
                    let winners = by_root
                        .into_iter()
                        .filter_map(|(root, ss)| {
                            conflict::oldest(ss)
                                .filter(|s| validate::traffic_split_spec(&s.spec).is_empty())
                                .map(|s| (root, s))
                        })
                        .collect();
                    (ns, winners)
                })
                .collect(),
        }
    }

    /// The per-Service policy in effect for `svc`, if any.
    pub fn service_policy(&self, svc: &ObjKey) -> Option<&'a MeshPolicy> {
        get2(&self.service_policy, &svc.namespace, &svc.name).copied()
    }

    /// The namespace-wide policy in effect in `namespace`, if any.
    pub fn namespace_policy(&self, namespace: &str) -> Option<&'a MeshPolicy> {
        self.namespace_policy.get(namespace).copied()
    }

    fn slices_of(&self, svc: &ObjKey) -> &[&'a SliceState] {
        get2(&self.slices_by_service, &svc.namespace, &svc.name).map_or(&[], Vec::as_slice)
    }

    /// The split of `dest`'s Service, on `dest`'s port: a backend (or match, or mirror)
    /// whose Service does not exist or does not expose that port is left out, so every
    /// name the split uses has a piece of its own on the port.
    fn split(&self, dest: &Destination) -> Option<Split> {
        let svc = &dest.service;
        let ts = get2(&self.split, &svc.namespace, &svc.name)?;
        let exists = |name: &str| {
            self.snap
                .services
                .get(&ObjKey::new(svc.namespace.clone(), name))
                .is_some_and(|s| s.port(dest.port).is_some())
        };
        let name = |s: &str| mesh_name(&ObjKey::new(svc.namespace.clone(), s));
        let backends: Vec<WeightedBackend> = ts
            .spec
            .backends
            .iter()
            .filter(|b| exists(&b.service))
            .map(|b| WeightedBackend {
                service: name(&b.service),
                weight: b.weight,
            })
            .collect();
        if backends.iter().all(|b| b.weight == 0) {
            return None;
        }
        Some(Split {
            matches: ts
                .spec
                .matches
                .iter()
                .filter(|m| exists(&m.backend))
                .map(|m| HeaderRoute {
                    headers: m.headers.clone(),
                    backend: name(&m.backend),
                })
                .collect(),
            mirror: ts
                .spec
                .mirror
                .as_ref()
                .filter(|m| exists(&m.service))
                .map(|m| Mirror {
                    service: name(&m.service),
                    percent: m.percent,
                }),
            backends,
        })
    }

    /// The endpoints of `dest`: every address of every slice of the Service, on the
    /// slice's port for the Service port's name, sorted by address.
    pub fn endpoints(&self, dest: &Destination) -> Vec<Endpoint> {
        let snap = self.snap;
        let Some(svc_port) = snap
            .services
            .get(&dest.service)
            .and_then(|s| s.port(dest.port))
        else {
            return Vec::new();
        };
        let mut out: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
        for slice in self.slices_of(&dest.service) {
            let Some(target) = slice
                .ports
                .iter()
                .find(|p| p.name == svc_port.name && p.protocol == svc_port.protocol)
            else {
                continue;
            };
            for e in &slice.endpoints {
                let pod = e.pod.as_ref().and_then(|name| {
                    snap.pods
                        .get(&ObjKey::new(dest.service.namespace.clone(), name.clone()))
                });
                let meshed = pod.is_some_and(|p| p.meshed);
                let identity = pod
                    .filter(|p| p.meshed)
                    .map(|p| snap.spiffe_id(&dest.service.namespace, &p.service_account));
                let weight = pod.map_or(remora_crds::proxy::DEFAULT_ENDPOINT_WEIGHT, |p| p.weight);
                for ip in &e.addresses {
                    let address = SocketAddr::new(*ip, target.port);
                    out.entry(address).or_insert_with(|| Endpoint {
                        address,
                        identity: identity.clone(),
                        zone: e.zone.clone(),
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                        meshed,
                        weight,
                    });
                }
            }
        }
        out.into_values().collect()
    }

    /// The outbound piece of `dest`; `None` when the Service or port does not exist.
    pub fn outbound(&self, dest: &Destination) -> Option<OutboundService> {
        let svc = self.snap.services.get(&dest.service)?;
        svc.port(dest.port)?;
        let endpoints = self.endpoints(dest);
        let addresses: BTreeSet<SocketAddr> = if svc.is_headless() {
            endpoints.iter().map(|e| e.address).collect()
        } else {
            svc.cluster_ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, dest.port))
                .collect()
        };
        let policy = self
            .service_policy(&dest.service)
            .or_else(|| self.namespace_policy(&dest.service.namespace))
            .map(|p| p.spec.traffic_policy());
        Some(OutboundService {
            name: mesh_name(&dest.service),
            addresses: addresses.into_iter().collect(),
            protocol: protocol(svc, dest.port),
            policy,
            split: self.split(dest),
            endpoints,
        })
    }

    /// The inbound piece of a Pod; `None` when the Pod is unknown.
    ///
    /// `default` is the workload default overlaid with the namespace-wide policy; a port
    /// gets an entry when a Service exposing it has a policy in effect (the oldest such
    /// policy wins if several Services expose the port) or when it is opaque.
    pub fn inbound(&self, pod_key: &ObjKey) -> Option<InboundConfig> {
        let snap = self.snap;
        let pod = snap.pods.get(pod_key)?;
        let mut default = InboundPolicy::workload_default();
        if let Some(ns_policy) = self.namespace_policy(&pod_key.namespace) {
            let p = inbound_policy(ns_policy, None);
            default.mtls = p.mtls.or(default.mtls);
            default.authorization = p.authorization.or(default.authorization);
            default.rate_limit = p.rate_limit.or(default.rate_limit);
        }

        // Pod port → (policy, protocol hint) from the Services whose slices list it.
        let mut by_port: BTreeMap<u16, (Option<&MeshPolicy>, Option<Protocol>)> = BTreeMap::new();
        let slices = get2(&self.slices_by_pod, &pod_key.namespace, &pod_key.name)
            .map_or(&[][..], Vec::as_slice);
        for slice in slices {
            let svc_key = ObjKey::new(pod_key.namespace.clone(), slice.service.clone());
            let Some(svc) = snap.services.get(&svc_key) else {
                continue;
            };
            let policy = self.service_policy(&svc_key);
            for sp in &slice.ports {
                let Some(svc_port) = svc.ports.iter().find(|p| {
                    p.name == sp.name && p.protocol == sp.protocol && sp.protocol == "TCP"
                }) else {
                    continue;
                };
                let hint = if svc.opaque_ports.contains(&svc_port.port) {
                    Some(Protocol::Opaque)
                } else {
                    app_protocol(svc_port.app_protocol.as_deref())
                };
                let entry = by_port.entry(sp.port).or_insert((None, None));
                entry.0 = match (entry.0, policy) {
                    (Some(a), Some(b)) => conflict::oldest([a, b]),
                    (a, b) => a.or(b),
                };
                entry.1 = entry.1.or(hint);
            }
        }
        for port in &pod.opaque_ports {
            by_port.entry(*port).or_insert((None, None)).1 = Some(Protocol::Opaque);
        }

        let ports = by_port
            .into_iter()
            .filter_map(|(port, (policy, hint))| {
                let hint = if pod.opaque_ports.contains(&port) {
                    Some(Protocol::Opaque)
                } else {
                    hint
                };
                match (policy, hint) {
                    (None, None) => None,
                    (Some(p), hint) => Some((port, inbound_policy(p, hint))),
                    (None, hint) => Some((
                        port,
                        InboundPolicy {
                            protocol: hint,
                            ..InboundPolicy::default()
                        },
                    )),
                }
            })
            .collect();
        Some(InboundConfig { default, ports })
    }
}

fn protocol(svc: &ServiceState, port: u16) -> Protocol {
    if svc.opaque_ports.contains(&port) {
        return Protocol::Opaque;
    }
    svc.port(port)
        .and_then(|p| app_protocol(p.app_protocol.as_deref()))
        .unwrap_or_default()
}

fn inbound_policy(p: &MeshPolicy, protocol: Option<Protocol>) -> InboundPolicy {
    InboundPolicy {
        protocol,
        mtls: p.spec.mtls.as_ref().map(|m| m.mode),
        authorization: p.spec.authorization.clone(),
        rate_limit: p.spec.rate_limit.clone(),
    }
}

impl Lookup<'_> {
    /// The piece a Pod's proxy watches: [`Lookup::inbound`] and the zone of its node.
    pub fn pod(&self, pod_key: &ObjKey) -> Option<PodPiece> {
        let inbound = self.inbound(pod_key)?;
        let zone = self
            .snap
            .pods
            .get(pod_key)
            .and_then(|p| self.snap.zone_of(p))
            .cloned();
        Some(PodPiece {
            inbound,
            locality: ProxyLocality { zone },
        })
    }
}

/// Every destination of the snapshot (TCP ports of every Service).
pub fn destinations(snap: &Snapshot) -> Vec<Destination> {
    snap.services
        .iter()
        .flat_map(|(key, svc)| {
            svc.ports
                .iter()
                .filter(|p| p.protocol == "TCP")
                .map(|p| Destination {
                    service: key.clone(),
                    port: p.port,
                })
        })
        .collect()
}

/// The outbound piece of one destination (builds a [`Lookup`]; use one [`Lookup`] for
/// many pieces).
pub fn outbound(snap: &Snapshot, dest: &Destination) -> Option<OutboundService> {
    Lookup::new(snap).outbound(dest)
}

/// The inbound piece of one Pod (builds a [`Lookup`]; use one [`Lookup`] for many).
pub fn inbound(snap: &Snapshot, pod_key: &ObjKey) -> Option<InboundConfig> {
    Lookup::new(snap).inbound(pod_key)
}

/// The whole piece of one Pod, zone included (builds a [`Lookup`]).
pub fn pod(snap: &Snapshot, pod_key: &ObjKey) -> Option<PodPiece> {
    Lookup::new(snap).pod(pod_key)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::index::model::{PodState, SliceEndpoint, SlicePort, SliceState, SvcPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use pretty_assertions::assert_eq;
    use remora_crds::{
        MeshPolicySpec, TrafficSplitSpec,
        mesh_policy::TargetRef,
        policy::{Authorization, AuthorizationDefault, MtlsMode, MtlsPolicy, RateLimit, Timeouts},
        traffic_split::SplitBackend,
    };

    pub(crate) fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + secs).expect("ts"))
    }

    pub(crate) fn svc(ip: &str, ports: &[(&str, u16)]) -> ServiceState {
        ServiceState {
            cluster_ips: if ip.is_empty() {
                vec![]
            } else {
                vec![ip.parse().expect("ip")]
            },
            ports: ports
                .iter()
                .map(|(name, port)| SvcPort {
                    name: (*name).to_owned(),
                    port: *port,
                    protocol: "TCP".to_owned(),
                    app_protocol: None,
                })
                .collect(),
            opaque_ports: BTreeSet::new(),
        }
    }

    pub(crate) fn slice(
        service: &str,
        ports: &[(&str, u16)],
        eps: &[(&str, &str, bool)],
    ) -> SliceState {
        SliceState {
            service: service.to_owned(),
            ports: ports
                .iter()
                .map(|(name, port)| SlicePort {
                    name: (*name).to_owned(),
                    port: *port,
                    protocol: "TCP".to_owned(),
                })
                .collect(),
            endpoints: eps
                .iter()
                .map(|(ip, pod, ready)| SliceEndpoint {
                    addresses: vec![ip.parse().expect("ip")],
                    ready: *ready,
                    serving: *ready,
                    terminating: false,
                    zone: Some("zone-a".to_owned()),
                    pod: (!pod.is_empty()).then(|| (*pod).to_owned()),
                })
                .collect(),
        }
    }

    fn pod(sa: &str, meshed: bool) -> PodState {
        PodState {
            service_account: sa.to_owned(),
            meshed,
            ..PodState::default()
        }
    }

    pub(crate) fn policy(
        ns: &str,
        name: &str,
        created: i64,
        target: Option<&str>,
        spec: MeshPolicySpec,
    ) -> MeshPolicy {
        let mut p = MeshPolicy::new(
            name,
            MeshPolicySpec {
                target_ref: target.map(|t| TargetRef {
                    kind: Default::default(),
                    name: t.to_owned(),
                }),
                ..spec
            },
        );
        p.metadata.namespace = Some(ns.to_owned());
        p.metadata.creation_timestamp = Some(at(created));
        p
    }

    fn k(ns: &str, name: &str) -> ObjKey {
        ObjKey::new(ns, name)
    }

    /// shop: reviews (VIP, ports http 9080 → 8080 and admin 9090 → 9091), v1 and v2
    /// backends, pods reviews-1 (meshed) and reviews-2 (not).
    pub(crate) fn shop() -> Snapshot {
        let mut s = Snapshot::new("cluster.local");
        s.services.insert(
            k("shop", "reviews"),
            svc("10.96.0.12", &[("http", 9080), ("admin", 9090)]),
        );
        s.services.insert(
            k("shop", "reviews-v1"),
            svc("10.96.0.13", &[("http", 9080)]),
        );
        s.services.insert(
            k("shop", "reviews-v2"),
            svc("10.96.0.14", &[("http", 9080)]),
        );
        s.slices.insert(
            k("shop", "reviews-abc"),
            slice(
                "reviews",
                &[("http", 8080), ("admin", 9091)],
                &[
                    ("10.244.0.7", "reviews-1", true),
                    ("10.244.0.8", "reviews-2", false),
                ],
            ),
        );
        s.pods.insert(k("shop", "reviews-1"), pod("reviews", true));
        s.pods.insert(k("shop", "reviews-2"), pod("reviews", false));
        s
    }

    fn dest(ns: &str, name: &str, port: u16) -> Destination {
        Destination {
            service: k(ns, name),
            port,
        }
    }

    #[test]
    fn outbound_per_port_with_identities() {
        let s = shop();
        let out = outbound(&s, &dest("shop", "reviews", 9080)).expect("destination");
        assert_eq!(out.name, "reviews.shop");
        assert_eq!(
            out.addresses,
            vec!["10.96.0.12:9080".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(out.protocol, Protocol::Detect);
        assert_eq!((out.policy.clone(), out.split.clone()), (None, None));
        assert_eq!(
            out.endpoints,
            vec![
                Endpoint {
                    address: "10.244.0.7:8080".parse().expect("addr"),
                    identity: Some("spiffe://cluster.local/ns/shop/sa/reviews".to_owned()),
                    zone: Some("zone-a".to_owned()),
                    ready: true,
                    serving: true,
                    terminating: false,
                    meshed: true,
                    weight: 1,
                },
                Endpoint {
                    address: "10.244.0.8:8080".parse().expect("addr"),
                    identity: None,
                    zone: Some("zone-a".to_owned()),
                    ready: false,
                    serving: false,
                    terminating: false,
                    meshed: false,
                    weight: 1,
                },
            ]
        );
        let admin = outbound(&s, &dest("shop", "reviews", 9090)).expect("admin port");
        assert_eq!(
            admin
                .endpoints
                .iter()
                .map(|e| e.address.port())
                .collect::<Vec<_>>(),
            vec![9091, 9091]
        );
        assert_eq!(outbound(&s, &dest("shop", "reviews", 1)), None);
        assert_eq!(outbound(&s, &dest("shop", "nope", 9080)), None);
        assert_eq!(destinations(&s).len(), 4);
    }

    #[test]
    fn pod_weights_reach_the_endpoints_and_node_zones_the_pod_piece() {
        let mut s = shop();
        s.pods.get_mut(&k("shop", "reviews-1")).expect("pod").weight = 5;
        let out = outbound(&s, &dest("shop", "reviews", 9080)).expect("destination");
        let weights: Vec<u32> = out.endpoints.iter().map(|e| e.weight).collect();
        assert_eq!(weights, [5, 1], "annotated, and the default");

        let piece = super::pod(&s, &k("shop", "reviews-1")).expect("pod");
        assert_eq!(
            piece.locality,
            ProxyLocality::default(),
            "not scheduled yet"
        );
        assert_eq!(Some(piece.inbound), inbound(&s, &k("shop", "reviews-1")));
        s.pods.get_mut(&k("shop", "reviews-1")).expect("pod").node = Some("n1".to_owned());
        let zone =
            |s: &Snapshot| super::pod(s, &k("shop", "reviews-1")).and_then(|p| p.locality.zone);
        assert_eq!(zone(&s), None, "a node the index does not know");
        s.nodes.insert("n1".to_owned(), None);
        assert_eq!(zone(&s), None, "a node without a zone label");
        s.nodes.insert("n1".to_owned(), Some("zone-b".to_owned()));
        assert_eq!(zone(&s).as_deref(), Some("zone-b"));
        assert_eq!(super::pod(&s, &k("shop", "nope")), None);
    }

    #[test]
    fn headless_services_are_addressed_by_endpoint() {
        let mut s = shop();
        s.services
            .insert(k("shop", "reviews"), svc("", &[("http", 9080)]));
        let out = outbound(&s, &dest("shop", "reviews", 9080)).expect("destination");
        let addrs: Vec<String> = out.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, vec!["10.244.0.7:8080", "10.244.0.8:8080"]);
    }

    #[test]
    fn policies_oldest_valid_wins_and_namespace_wide_is_the_fallback() {
        let mut s = shop();
        let timeouts = |secs| MeshPolicySpec {
            timeouts: Some(Timeouts {
                request: Some(remora_crds::duration::Duration::from_secs(secs)),
                ..Timeouts::default()
            }),
            ..MeshPolicySpec::default()
        };
        s.policies
            .insert(k("shop", "ns"), policy("shop", "ns", 0, None, timeouts(1)));
        let request = |s: &Snapshot| {
            outbound(s, &dest("shop", "reviews", 9080))
                .and_then(|o| o.policy)
                .and_then(|p| p.timeouts)
                .and_then(|t| t.request)
                .map(|d| d.get().as_secs())
        };
        assert_eq!(request(&s), Some(1), "namespace-wide applies");
        s.policies.insert(
            k("shop", "b"),
            policy("shop", "b", 20, Some("reviews"), timeouts(3)),
        );
        s.policies.insert(
            k("shop", "a"),
            policy("shop", "a", 10, Some("reviews"), timeouts(2)),
        );
        assert_eq!(request(&s), Some(2), "the oldest per-service policy");
        // The oldest becomes invalid: nothing per-service is in effect (the younger one
        // is Conflicted), so the namespace-wide policy applies.
        let mut invalid = timeouts(2);
        invalid.load_balancer = Some(remora_crds::policy::LoadBalancer {
            algorithm: remora_crds::policy::LbAlgorithm::ConsistentHash,
            consistent_hash: None,
            locality: None,
        });
        s.policies.insert(
            k("shop", "a"),
            policy("shop", "a", 10, Some("reviews"), invalid),
        );
        assert_eq!(request(&s), Some(1));
        // Other namespaces are untouched.
        s.services
            .insert(k("other", "reviews"), svc("10.96.1.1", &[("http", 9080)]));
        assert_eq!(
            outbound(&s, &dest("other", "reviews", 9080)).and_then(|o| o.policy),
            None
        );
    }

    #[test]
    fn split_names_existing_backends_only() {
        let mut s = shop();
        let mut ts = TrafficSplit::new(
            "canary",
            TrafficSplitSpec {
                service: "reviews".to_owned(),
                backends: vec![
                    SplitBackend {
                        service: "reviews-v1".to_owned(),
                        weight: 90,
                    },
                    SplitBackend {
                        service: "reviews-v3".to_owned(),
                        weight: 10,
                    },
                ],
                matches: Vec::new(),
                mirror: None,
            },
        );
        ts.metadata.namespace = Some("shop".to_owned());
        ts.metadata.creation_timestamp = Some(at(0));
        s.splits.insert(k("shop", "canary"), ts.clone());
        let split = outbound(&s, &dest("shop", "reviews", 9080))
            .and_then(|o| o.split)
            .expect("split");
        assert_eq!(
            split.backends,
            vec![WeightedBackend {
                service: "reviews-v1.shop".to_owned(),
                weight: 90
            }]
        );
        // reviews-v1 lacks the admin port 9090: on that port no backend is left.
        assert_eq!(
            outbound(&s, &dest("shop", "reviews", 9090)).and_then(|o| o.split),
            None
        );
        // Only the missing backend has weight: no split.
        ts.spec.backends[0].weight = 0;
        s.splits.insert(k("shop", "canary"), ts);
        assert_eq!(
            outbound(&s, &dest("shop", "reviews", 9080)).and_then(|o| o.split),
            None
        );
    }

    #[test]
    fn two_services_on_one_pod_port_the_oldest_policy_wins() {
        let mut s = shop();
        // "reviews-alias" selects the same pods on the same target port.
        s.services.insert(
            k("shop", "reviews-alias"),
            svc("10.96.0.20", &[("http", 80)]),
        );
        s.slices.insert(
            k("shop", "reviews-alias-1"),
            slice(
                "reviews-alias",
                &[("http", 8080)],
                &[("10.244.0.7", "reviews-1", true)],
            ),
        );
        let rate = |rps| MeshPolicySpec {
            rate_limit: Some(RateLimit {
                requests_per_second: rps,
                burst: None,
                per_identity: false,
            }),
            ..MeshPolicySpec::default()
        };
        s.policies.insert(
            k("shop", "young"),
            policy("shop", "young", 50, Some("reviews"), rate(1)),
        );
        s.policies.insert(
            k("shop", "old"),
            policy("shop", "old", 5, Some("reviews-alias"), rate(2)),
        );
        let got = inbound(&s, &k("shop", "reviews-1")).expect("pod");
        assert_eq!(
            got.ports[&8080]
                .rate_limit
                .as_ref()
                .map(|r| r.requests_per_second),
            Some(2)
        );
        // The policy of "reviews" still governs its other port.
        assert_eq!(
            got.ports[&9091]
                .rate_limit
                .as_ref()
                .map(|r| r.requests_per_second),
            Some(1)
        );
    }

    #[test]
    fn inbound_from_policies_and_opaque_ports() {
        let mut s = shop();
        assert_eq!(
            inbound(&s, &k("shop", "reviews-1")),
            Some(InboundConfig::default()),
            "no policy: the workload default"
        );
        s.policies.insert(
            k("shop", "ns"),
            policy(
                "shop",
                "ns",
                0,
                None,
                MeshPolicySpec {
                    mtls: Some(MtlsPolicy {
                        mode: MtlsMode::Strict,
                    }),
                    ..MeshPolicySpec::default()
                },
            ),
        );
        s.policies.insert(
            k("shop", "reviews"),
            policy(
                "shop",
                "reviews",
                1,
                Some("reviews"),
                MeshPolicySpec {
                    authorization: Some(Authorization {
                        default: AuthorizationDefault::Deny,
                        rules: Vec::new(),
                    }),
                    rate_limit: Some(RateLimit {
                        requests_per_second: 10,
                        burst: None,
                        per_identity: false,
                    }),
                    ..MeshPolicySpec::default()
                },
            ),
        );
        s.pods
            .get_mut(&k("shop", "reviews-1"))
            .expect("pod")
            .opaque_ports
            .insert(6379);
        let got = inbound(&s, &k("shop", "reviews-1")).expect("pod known");
        assert_eq!(got.default.mtls, Some(MtlsMode::Strict));
        assert_eq!(
            got.ports.keys().copied().collect::<Vec<_>>(),
            vec![6379, 8080, 9091]
        );
        let http = &got.ports[&8080];
        assert_eq!(
            http.authorization.as_ref().map(|a| a.default),
            Some(AuthorizationDefault::Deny)
        );
        assert_eq!(
            http.rate_limit.as_ref().map(|r| r.requests_per_second),
            Some(10)
        );
        assert_eq!(http.mtls, None, "falls back to the namespace default");
        assert_eq!(got.for_port(8080).mtls, MtlsMode::Strict);
        assert_eq!(got.ports[&6379].protocol, Some(Protocol::Opaque));
        assert_eq!(inbound(&s, &k("shop", "nope")), None);
    }
}
