//! Shared pieces of the operator's cluster tests: a control plane with the CRDs, the
//! operator running in-process, objects from JSON, polling with a deadline, and a tiny
//! HTTP/1.1 GET for the admin endpoints.

#![allow(dead_code)]

use std::{
    future::Future,
    net::SocketAddr,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Event, Namespace, Service};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use remora_crds::proxy::OutboundService;
use remora_crds::{MeshPolicy, PolicyStatus, TrafficSplit};
use remora_e2e::{Cluster, ClusterOptions, apply::install_crds};
use remora_operator::{
    Args, Operator,
    index::{derive::Destination, model::ObjKey, watch::IndexHandle},
};
use serde::de::DeserializeOwned;
use tokio::{sync::oneshot, task::JoinHandle};

/// How long the operator may take to react to a change.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A control plane (no controller-manager: nothing here needs pods) with the CRDs and the
/// operator's namespace.
pub async fn cluster() -> (Cluster, Client) {
    // Logs show up for failing tests (captured otherwise); REMORA_TEST_LOG overrides.
    let filter = std::env::var("REMORA_TEST_LOG")
        .unwrap_or_else(|_| "info,remora_operator=debug".to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
    let cluster = Cluster::start_with(ClusterOptions {
        controller_manager: false,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let client = cluster.client().await.expect("client");
    install_crds(&client).await.expect("CRDs installed");
    namespace(&client, "remora-system").await;
    (cluster, client)
}

/// An operator running on the test's runtime; stopped (gracefully) by [`Running::stop`],
/// aborted when dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub index: IndexHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), remora_operator::Error>>>,
}

impl Running {
    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("operator stops within the deadline")
                .expect("operator task did not panic")
                .expect("operator ran without error");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts the operator in-process as replica `identity`, with short Lease timings.
pub async fn operator(client: &Client, identity: &str) -> Running {
    operator_with(client, identity, &[]).await
}

/// [`operator`] with more flags (`--flag=value`; they replace the defaults above, e.g.
/// `--ca-listen=127.0.0.1:<port>`).
pub async fn operator_with(client: &Client, identity: &str, extra: &[String]) -> Running {
    let flags = [
        "remora-operator".to_owned(),
        "--metrics-listen=127.0.0.1:0".to_owned(),
        // Tests run side by side: no fixed ports.
        "--ca-listen=127.0.0.1:0".to_owned(),
        format!("--pod-name={identity}"),
        "--pod-namespace=remora-system".to_owned(),
        "--leader-elect=true".to_owned(),
        "--lease-duration=4s".to_owned(),
        "--lease-renew=1s".to_owned(),
    ];
    let name = |f: &String| f.split('=').next().map(str::to_owned);
    let defaults = flags
        .iter()
        .filter(|f| !extra.iter().any(|e| name(e) == name(f)));
    let args =
        <Args as clap::Parser>::try_parse_from(defaults.chain(extra)).expect("test flags parse");
    let op = Operator::bind(args, client.clone())
        .await
        .expect("operator binds");
    let addr = op.local_addr().expect("local addr");
    let index = op.index();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(op.run(async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        index,
        stop: Some(stop),
        task: Some(task),
    }
}

pub fn from_json<T: DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("test object deserializes")
}

pub async fn namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &from_json(serde_json::json!({"metadata": {"name": name}})),
    )
    .await
    .expect("namespace created");
}

pub async fn service(client: &Client, ns: &str, name: &str, ports: &[i32]) -> Service {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|p| serde_json::json!({"name": format!("p{p}"), "port": p}))
        .collect();
    api.create(
        &PostParams::default(),
        &from_json(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"ports": ports, "selector": {"app": name}},
        })),
    )
    .await
    .expect("service created")
}

pub async fn mesh_policy(
    client: &Client,
    ns: &str,
    name: &str,
    target: Option<&str>,
) -> MeshPolicy {
    let api: Api<MeshPolicy> = Api::namespaced(client.clone(), ns);
    let mut spec = serde_json::json!({"mtls": {"mode": "Strict"}});
    if let Some(t) = target {
        spec["targetRef"] = serde_json::json!({"kind": "Service", "name": t});
    }
    api.create(
        &PostParams::default(),
        &from_json(serde_json::json!({
            "apiVersion": "remora.dev/v1alpha1", "kind": "MeshPolicy",
            "metadata": {"name": name}, "spec": spec,
        })),
    )
    .await
    .expect("MeshPolicy created")
}

pub async fn traffic_split(
    client: &Client,
    ns: &str,
    name: &str,
    root: &str,
    backends: &[(&str, u32)],
) -> TrafficSplit {
    let api: Api<TrafficSplit> = Api::namespaced(client.clone(), ns);
    let backends: Vec<serde_json::Value> = backends
        .iter()
        .map(|(s, w)| serde_json::json!({"service": s, "weight": w}))
        .collect();
    api.create(
        &PostParams::default(),
        &from_json(serde_json::json!({
            "apiVersion": "remora.dev/v1alpha1", "kind": "TrafficSplit",
            "metadata": {"name": name},
            "spec": {"service": root, "backends": backends},
        })),
    )
    .await
    .expect("TrafficSplit created")
}

/// Polls `probe` every 100 ms until it returns `Some`, or panics after [`DEADLINE`]
/// with `what` and the last observation.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(last) => last,
        };
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}; last seen: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `(status, reason)` of a condition.
pub fn condition(status: Option<&PolicyStatus>, type_: &str) -> Option<(String, String)> {
    status
        .and_then(|s| s.condition(type_))
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Waits until the object's `Accepted` and `ResolvedRefs` conditions are as given, for
/// its current generation; returns the object.
pub async fn wait_conditions<K>(
    api: &Api<K>,
    name: &str,
    status_of: impl Fn(&K) -> Option<&PolicyStatus>,
    accepted: (&str, &str),
    resolved: (&str, &str),
) -> K
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let want = (
        Some((accepted.0.to_owned(), accepted.1.to_owned())),
        Some((resolved.0.to_owned(), resolved.1.to_owned())),
    );
    eventually(
        &format!("{name}: Accepted={accepted:?} ResolvedRefs={resolved:?}"),
        || async {
            let obj = api.get(name).await.map_err(|e| e.to_string())?;
            let status = status_of(&obj);
            let got = (
                condition(status, "Accepted"),
                condition(status, "ResolvedRefs"),
            );
            let generation_seen =
                status.and_then(|s| s.observed_generation) == obj.meta().generation;
            if got == want && generation_seen {
                Ok(obj)
            } else {
                Err(format!("{status:?}"))
            }
        },
    )
    .await
}

/// Waits for an Event about `name` with `reason` and `type_` (core/v1 view).
pub async fn wait_event(client: &Client, ns: &str, name: &str, type_: &str, reason: &str) -> Event {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("{type_} Event {reason} for {ns}/{name}"),
        || async {
            let events = api
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items;
            let summary: Vec<String> = events
                .iter()
                .map(|e| {
                    format!(
                        "{}:{:?}/{:?}",
                        e.involved_object.name.clone().unwrap_or_default(),
                        e.type_,
                        e.reason
                    )
                })
                .collect();
            events
                .into_iter()
                .find(|e| {
                    e.involved_object.name.as_deref() == Some(name)
                        && e.type_.as_deref() == Some(type_)
                        && e.reason.as_deref() == Some(reason)
                })
                .ok_or_else(|| format!("{summary:?}"))
        },
    )
    .await
}

// Not every test binary reads an admin endpoint.
#[allow(unused_imports)]
pub use remora_e2e::components::http_get;

/// The `reviews` fixture of the index and stream tests: Service `reviews` port 9080 in
/// `ns`, its pods listening on 8080 (Pod `reviews-1`).
pub fn reviews(ns: &str) -> Destination {
    Destination {
        service: ObjKey::new(ns, "reviews"),
        port: 9080,
    }
}

/// Applies (creates or replaces) the `reviews` EndpointSlice `reviews-abc` in `ns`, in the
/// `discovery.k8s.io/v1beta1` form the 1.20 test tier serves: port `p9080` → 8080, one
/// ready endpoint per IP in zone `zone-a`, each naming Pod `reviews-1`.
pub async fn reviews_slice(client: &Client, ns: &str, ips: &[&str]) {
    let endpoints: Vec<serde_json::Value> = ips
        .iter()
        .map(|ip| {
            serde_json::json!({
                "addresses": [ip], "conditions": {"ready": true},
                "topology": {"topology.kubernetes.io/zone": "zone-a"},
                "targetRef": {"kind": "Pod", "name": "reviews-1", "namespace": ns},
            })
        })
        .collect();
    let doc = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": "reviews-abc", "namespace": ns,
                     "labels": {"kubernetes.io/service-name": "reviews"}},
        "addressType": "IPv4",
        "ports": [{"name": "p9080", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    });
    let objs = remora_e2e::apply::parse_documents(&doc.to_string(), "slice").expect("slice parses");
    remora_e2e::apply::apply(client, &objs[0], false)
        .await
        .expect("slice applied");
}

/// The `reviews` outbound piece in `ns` and its version.
pub fn reviews_piece(index: &IndexHandle, ns: &str) -> Option<(u64, OutboundService)> {
    index
        .read()
        .outbound(&reviews(ns))
        .map(|v| (v.version, v.value.clone()))
}

/// Waits for a `reviews` piece in `ns` newer than `after` that passes `check`.
pub async fn wait_reviews(
    index: &IndexHandle,
    ns: &str,
    what: &str,
    after: u64,
    check: impl Fn(&OutboundService) -> bool,
) -> (u64, OutboundService) {
    eventually(what, || async {
        match reviews_piece(index, ns) {
            Some((v, p)) if v > after && check(&p) => Ok((v, p)),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}
