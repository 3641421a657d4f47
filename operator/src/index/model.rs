//! The cluster state the index derives from, reduced to what derivation reads, and the
//! conversions from Kubernetes objects (Services, EndpointSlices `v1` and `v1beta1`,
//! Pods, Nodes, Namespaces). Pure: objects in, plain values out.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::ResourceExt;
use remora_crds::{
    MeshPolicy, TrafficSplit,
    proxy::{DEFAULT_ENDPOINT_WEIGHT, MAX_WEIGHT, Protocol},
};
use serde::Deserialize;

/// Pod annotation the webhook sets on injected pods.
pub const INJECTED_ANNOTATION: &str = "remora.dev/injected";
/// Pod (or Service) annotation listing opaque ports: `3306,6379` or ranges `8000-8010`.
pub const OPAQUE_PORTS_ANNOTATION: &str = "config.remora.dev/opaque-ports";
/// Pod annotation giving the pod's endpoints a weight for the `Weighted` algorithm:
/// an integer 1..=1000000 (default 1).
pub const WEIGHT_ANNOTATION: &str = "config.remora.dev/weight";
/// EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Node/topology label carrying the zone (EndpointSlice `v1beta1` topology key).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a namespaced object (`default` namespace when unset).
    pub fn of<K: ResourceExt>(obj: &K) -> Self {
        Self::new(
            obj.namespace().unwrap_or_else(|| "default".to_owned()),
            obj.name_any(),
        )
    }
}

impl std::fmt::Display for ObjKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcPort {
    pub name: String,
    pub port: u16,
    pub protocol: String,
    pub app_protocol: Option<String>,
}

/// A Service as the index needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceState {
    /// Cluster IPs (none for a headless Service).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<SvcPort>,
    /// Ports listed in the Service's opaque-ports annotation.
    pub opaque_ports: BTreeSet<u16>,
}

impl ServiceState {
    pub fn from_service(svc: &Service) -> Self {
        let spec = svc.spec.as_ref();
        let mut ips: Vec<String> = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = spec.and_then(|s| s.cluster_ip.clone())
        {
            ips.push(ip);
        }
        let cluster_ips = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|p| {
                        Some(SvcPort {
                            name: p.name.clone().unwrap_or_default(),
                            port: u16::try_from(p.port).ok().filter(|p| *p != 0)?,
                            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
                            app_protocol: p.app_protocol.clone(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            cluster_ips,
            ports,
            opaque_ports: opaque_ports(svc.annotations().get(OPAQUE_PORTS_ANNOTATION)),
        }
    }

    pub fn is_headless(&self) -> bool {
        self.cluster_ips.is_empty()
    }

    pub fn port(&self, port: u16) -> Option<&SvcPort> {
        self.ports
            .iter()
            .find(|p| p.port == port && p.protocol == "TCP")
    }
}

/// One endpoint of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone: Option<String>,
    /// The backing Pod, when the slice names one.
    pub pod: Option<String>,
}

/// A port of a slice: the Service port's name and the endpoints' (target) port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

/// An EndpointSlice, whichever API version served it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceState {
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

fn slice_ports(ports: Vec<(Option<String>, Option<i32>, Option<String>)>) -> Vec<SlicePort> {
    ports
        .into_iter()
        .filter_map(|(name, port, protocol)| {
            Some(SlicePort {
                name: name.unwrap_or_default(),
                port: u16::try_from(port?).ok().filter(|p| *p != 0)?,
                protocol: protocol.unwrap_or_else(|| "TCP".to_owned()),
            })
        })
        .collect()
}

/// Endpoint conditions as the API defines the defaults: unknown `ready` counts as ready,
/// unknown `serving` follows `ready`, unknown `terminating` is false.
fn conditions(
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
) -> (bool, bool, bool) {
    let ready = ready.unwrap_or(true);
    (
        ready,
        serving.unwrap_or(ready),
        terminating.unwrap_or(false),
    )
}

fn pod_ref(kind: Option<&str>, name: Option<&String>) -> Option<String> {
    (kind == Some("Pod")).then(|| name.cloned()).flatten()
}

impl SliceState {
    /// From a `discovery.k8s.io/v1` EndpointSlice; `None` when it names no Service.
    pub fn from_v1(slice: &EndpointSlice) -> Option<Self> {
        let service = slice.labels().get(SERVICE_NAME_LABEL)?.clone();
        let ports = slice_ports(
            slice
                .ports
                .iter()
                .flatten()
                .map(|p| (p.name.clone(), p.port, p.protocol.clone()))
                .collect(),
        );
        let endpoints = slice
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref();
                let (ready, serving, terminating) = conditions(
                    c.and_then(|c| c.ready),
                    c.and_then(|c| c.serving),
                    c.and_then(|c| c.terminating),
                );
                SliceEndpoint {
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    ready,
                    serving,
                    terminating,
                    zone: e.zone.clone(),
                    pod: e
                        .target_ref
                        .as_ref()
                        .and_then(|r| pod_ref(r.kind.as_deref(), r.name.as_ref())),
                }
            })
            .collect();
        Some(Self {
            service,
            ports,
            endpoints,
        })
    }

    /// From a `discovery.k8s.io/v1beta1` EndpointSlice as JSON (Kubernetes 1.17–1.24),
    /// where the zone is in `topology`.
    pub fn from_v1beta1(obj: &serde_json::Value) -> Result<Option<Self>, serde_json::Error> {
        let slice = V1Beta1Slice::deserialize(obj)?;
        let Some(service) = slice.metadata.labels.get(SERVICE_NAME_LABEL).cloned() else {
            return Ok(None);
        };
        let ports = slice_ports(
            slice
                .ports
                .into_iter()
                .map(|p| (p.name, p.port, p.protocol))
                .collect(),
        );
        let endpoints = slice
            .endpoints
            .into_iter()
            .map(|e| {
                let (ready, serving, terminating) = conditions(
                    e.conditions.ready,
                    e.conditions.serving,
                    e.conditions.terminating,
                );
                SliceEndpoint {
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    ready,
                    serving,
                    terminating,
                    zone: e.topology.get(ZONE_LABEL).cloned(),
                    pod: e
                        .target_ref
                        .and_then(|r| pod_ref(r.kind.as_deref(), r.name.as_ref())),
                }
            })
            .collect();
        Ok(Some(Self {
            service,
            ports,
            endpoints,
        }))
    }
}

#[derive(Deserialize)]
struct V1Beta1Meta {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct V1Beta1Slice {
    metadata: V1Beta1Meta,
    #[serde(default)]
    ports: Vec<V1Beta1Port>,
    #[serde(default)]
    endpoints: Vec<V1Beta1Endpoint>,
}

#[derive(Deserialize)]
struct V1Beta1Port {
    name: Option<String>,
    port: Option<i32>,
    protocol: Option<String>,
}

#[derive(Default, Deserialize)]
struct V1Beta1Conditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize)]
struct V1Beta1Ref {
    kind: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct V1Beta1Endpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: V1Beta1Conditions,
    #[serde(default)]
    topology: BTreeMap<String, String>,
    target_ref: Option<V1Beta1Ref>,
}

/// A container port of a Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPort {
    pub name: Option<String>,
    pub port: u16,
}

/// A Pod as the index needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodState {
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// Injected by the webhook (it carries the mesh proxy).
    pub meshed: bool,
    pub opaque_ports: BTreeSet<u16>,
    pub ports: Vec<PodPort>,
    /// `spec.nodeName`, once scheduled.
    pub node: Option<String>,
    /// Its endpoints' weight ([`WEIGHT_ANNOTATION`]; 1 when absent or unusable).
    pub weight: u32,
    /// Why the weight annotation was not usable (the weight is then 1).
    pub weight_error: Option<String>,
}

impl Default for PodState {
    fn default() -> Self {
        Self {
            service_account: String::new(),
            ips: Vec::new(),
            meshed: false,
            opaque_ports: BTreeSet::new(),
            ports: Vec::new(),
            node: None,
            weight: DEFAULT_ENDPOINT_WEIGHT,
            weight_error: None,
        }
    }
}

/// Reads the weight annotation: `Ok(None)` when absent, the reason when it is not an
/// integer in 1..=1000000. The webhook refuses such pods at creation; the annotation
/// may still be changed afterwards.
pub fn weight(value: Option<&String>) -> Result<Option<u32>, String> {
    let Some(v) = value else { return Ok(None) };
    match v.trim().parse::<u32>() {
        Ok(w) if (1..=MAX_WEIGHT).contains(&w) => Ok(Some(w)),
        _ => Err(format!(
            "{WEIGHT_ANNOTATION}={v:?} is not an integer in 1..={MAX_WEIGHT}; using weight \
             {DEFAULT_ENDPOINT_WEIGHT}"
        )),
    }
}

/// The zone of a Node (its `topology.kubernetes.io/zone` label), from the Node or its
/// metadata.
pub fn node_zone(node: &impl ResourceExt) -> Option<String> {
    node.labels()
        .get(ZONE_LABEL)
        .filter(|z| !z.is_empty())
        .cloned()
}

impl PodState {
    pub fn from_pod(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        let ports = spec
            .map(|s| {
                s.containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .filter_map(|p| {
                        Some(PodPort {
                            name: p.name.clone(),
                            port: u16::try_from(p.container_port).ok().filter(|p| *p != 0)?,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (weight, weight_error) = match weight(pod.annotations().get(WEIGHT_ANNOTATION)) {
            Ok(w) => (w.unwrap_or(DEFAULT_ENDPOINT_WEIGHT), None),
            Err(e) => (DEFAULT_ENDPOINT_WEIGHT, Some(e)),
        };
        Self {
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            ips,
            meshed: pod.annotations().contains_key(INJECTED_ANNOTATION),
            opaque_ports: opaque_ports(pod.annotations().get(OPAQUE_PORTS_ANNOTATION)),
            ports,
            node: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            weight,
            weight_error,
        }
    }
}

/// Parses `3306,6379,8000-8002` leniently: the webhook already rejected bad values on
/// pods; anything unparsable here is skipped rather than guessed.
pub fn opaque_ports(value: Option<&String>) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for part in value.map(String::as_str).unwrap_or_default().split(',') {
        let part = part.trim();
        if let Some((a, b)) = part.split_once('-') {
            if let (Ok(a), Ok(b)) = (a.trim().parse::<u16>(), b.trim().parse::<u16>())
                && a != 0
                && a <= b
            {
                out.extend(a..=b);
            }
        } else if let Ok(p) = part.parse::<u16>()
            && p != 0
        {
            out.insert(p);
        }
    }
    out
}

/// The protocol a Service port's `appProtocol` announces.
pub fn app_protocol(app: Option<&str>) -> Option<Protocol> {
    match app?.to_ascii_lowercase().as_str() {
        "http" | "http/1.1" => Some(Protocol::Http),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(Protocol::Http2),
        "grpc" => Some(Protocol::Grpc),
        "tcp" | "opaque" => Some(Protocol::Opaque),
        _ => None,
    }
}

/// Everything derivation reads.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// SPIFFE trust domain (`cluster.local`).
    pub trust_domain: String,
    pub services: BTreeMap<ObjKey, ServiceState>,
    /// By slice key; a Service may have several.
    pub slices: BTreeMap<ObjKey, SliceState>,
    pub pods: BTreeMap<ObjKey, PodState>,
    /// Nodes that exist, with their zone.
    pub nodes: BTreeMap<String, Option<String>>,
    /// Namespaces that exist, with their labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub policies: BTreeMap<ObjKey, MeshPolicy>,
    pub splits: BTreeMap<ObjKey, TrafficSplit>,
}

impl Snapshot {
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            ..Self::default()
        }
    }

    /// Records a Namespace.
    pub fn set_namespace(&mut self, ns: &Namespace) {
        self.namespaces.insert(ns.name_any(), ns.labels().clone());
    }

    /// The zone of the node Pod `pod` runs on, if known.
    pub fn zone_of(&self, pod: &PodState) -> Option<&String> {
        self.nodes.get(pod.node.as_ref()?)?.as_ref()
    }

    /// The slices of Service `svc`.
    pub fn slices_of<'a>(&'a self, svc: &'a ObjKey) -> impl Iterator<Item = &'a SliceState> + 'a {
        self.slices
            .range(ObjKey::new(svc.namespace.clone(), String::new())..)
            .take_while(move |(k, _)| k.namespace == svc.namespace)
            .filter(move |(_, s)| s.service == svc.name)
            .map(|(_, s)| s)
    }

    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;
    use pretty_assertions::assert_eq;

    fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("fixture")
    }

    #[test]
    fn service_state() {
        let svc: Service = from(serde_json::json!({
            "metadata": {"name": "reviews", "namespace": "shop",
                         "annotations": {OPAQUE_PORTS_ANNOTATION: "6379, 7000-7001"}},
            "spec": {"clusterIP": "10.96.0.12", "ports": [
                {"name": "http", "port": 9080, "appProtocol": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ]},
        }));
        let s = ServiceState::from_service(&svc);
        assert_eq!(
            s.cluster_ips,
            vec!["10.96.0.12".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.port(9080).map(|p| p.name.as_str()), Some("http"));
        assert_eq!(s.port(53), None, "UDP is not proxied");
        assert_eq!(s.opaque_ports, BTreeSet::from([6379, 7000, 7001]));
        assert!(!s.is_headless());
        let headless: Service = from(serde_json::json!({"spec": {"clusterIP": "None"}}));
        assert!(ServiceState::from_service(&headless).is_headless());
    }

    #[test]
    fn opaque_port_lists() {
        let v = |s: &str| opaque_ports(Some(&s.to_owned()));
        assert_eq!(v("3306"), BTreeSet::from([3306]));
        assert_eq!(v("1-3, x, 0, 9-8, 70000"), BTreeSet::from([1, 2, 3]));
        assert_eq!(opaque_ports(None), BTreeSet::new());
    }

    #[test]
    fn slices_from_both_api_versions_agree() {
        let v1: EndpointSlice = from(serde_json::json!({
            "metadata": {"name": "reviews-abc", "namespace": "shop",
                         "labels": {SERVICE_NAME_LABEL: "reviews"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.0.7"], "conditions": {"ready": true}, "zone": "zone-a",
                 "targetRef": {"kind": "Pod", "name": "reviews-1", "namespace": "shop"}},
                {"addresses": ["10.244.0.8"],
                 "conditions": {"ready": false, "serving": true, "terminating": true}},
            ],
        }));
        let beta = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "reviews-abc", "namespace": "shop",
                         "labels": {SERVICE_NAME_LABEL: "reviews"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.0.7"], "conditions": {"ready": true},
                 "topology": {ZONE_LABEL: "zone-a", "kubernetes.io/hostname": "n1"},
                 "targetRef": {"kind": "Pod", "name": "reviews-1", "namespace": "shop"}},
                {"addresses": ["10.244.0.8"],
                 "conditions": {"ready": false, "serving": true, "terminating": true}},
            ],
        });
        let a = SliceState::from_v1(&v1).expect("has a service");
        let b = SliceState::from_v1beta1(&beta)
            .expect("parses")
            .expect("has a service");
        assert_eq!(a, b);
        assert_eq!(a.service, "reviews");
        assert_eq!(
            a.endpoints[0],
            SliceEndpoint {
                addresses: vec!["10.244.0.7".parse().expect("ip")],
                ready: true,
                serving: true,
                terminating: false,
                zone: Some("zone-a".to_owned()),
                pod: Some("reviews-1".to_owned()),
            }
        );
        assert!(!a.endpoints[1].ready && a.endpoints[1].serving && a.endpoints[1].terminating);
        // No Service label: not ours to index.
        let orphan = serde_json::json!({"metadata": {"name": "x"}, "endpoints": []});
        assert_eq!(SliceState::from_v1beta1(&orphan).expect("parses"), None);
        assert!(SliceState::from_v1beta1(&serde_json::json!({"endpoints": 3})).is_err());
    }

    #[test]
    fn pod_state() {
        let pod: Pod = from(serde_json::json!({
            "metadata": {"name": "reviews-1", "namespace": "shop",
                         "annotations": {INJECTED_ANNOTATION: "0.1.0", OPAQUE_PORTS_ANNOTATION: "6379"}},
            "spec": {"serviceAccountName": "reviews", "containers": [
                {"name": "app", "image": "x", "ports": [{"name": "http", "containerPort": 9080}]}
            ]},
            "status": {"podIP": "10.244.0.7", "podIPs": [{"ip": "10.244.0.7"}, {"ip": "fd00::7"}]},
        }));
        let p = PodState::from_pod(&pod);
        assert_eq!(p.service_account, "reviews");
        assert!(p.meshed);
        assert_eq!(p.ips.len(), 2);
        assert_eq!(p.opaque_ports, BTreeSet::from([6379]));
        assert_eq!(
            p.ports,
            vec![PodPort {
                name: Some("http".to_owned()),
                port: 9080
            }]
        );
        assert_eq!((p.node, p.weight, p.weight_error), (None, 1, None));
        let bare = PodState::from_pod(&Pod::default());
        assert_eq!(
            (bare.service_account.as_str(), bare.meshed),
            ("default", false)
        );
    }

    #[test]
    fn weights_and_nodes() {
        let pod = |w: &str| -> PodState {
            PodState::from_pod(&from(serde_json::json!({
                "metadata": {"name": "a", "annotations": {WEIGHT_ANNOTATION: w}},
                "spec": {"nodeName": "n1", "containers": []},
            })))
        };
        let p = pod("30");
        assert_eq!((p.weight, p.node.as_deref()), (30, Some("n1")));
        assert_eq!(p.weight_error, None);
        assert_eq!(pod(" 1000000 ").weight, 1_000_000);
        for bad in ["0", "1000001", "-3", "heavy", "1.5", ""] {
            let p = pod(bad);
            assert_eq!(p.weight, 1, "{bad:?}");
            let e = p.weight_error.expect("an error");
            assert!(
                e.contains(WEIGHT_ANNOTATION) && e.contains("1..=1000000"),
                "{e}"
            );
        }
        let node: Node = from(serde_json::json!({
            "metadata": {"name": "n1", "labels": {ZONE_LABEL: "zone-b"}}
        }));
        assert_eq!(node_zone(&node).as_deref(), Some("zone-b"));
        assert_eq!(node_zone(&Node::default()), None);
        let mut snap = Snapshot::new("cluster.local");
        snap.nodes.insert("n1".to_owned(), node_zone(&node));
        assert_eq!(snap.zone_of(&pod("2")).map(String::as_str), Some("zone-b"));
        assert_eq!(snap.zone_of(&PodState::default()), None);
    }

    #[test]
    fn app_protocols() {
        assert_eq!(app_protocol(Some("HTTP")), Some(Protocol::Http));
        assert_eq!(
            app_protocol(Some("kubernetes.io/h2c")),
            Some(Protocol::Http2)
        );
        assert_eq!(app_protocol(Some("grpc")), Some(Protocol::Grpc));
        assert_eq!(app_protocol(Some("mysql")), None);
        assert_eq!(app_protocol(None), None);
    }
}
