//! The discovery index against a real kube-apiserver 1.20: it detects that only
//! `discovery.k8s.io/v1beta1` EndpointSlices are served, follows Services, slices, Pods
//! and policies into the derived config (a Pod's weight annotation into its endpoints, its
//! Node's zone into its inbound piece), and its versions only grow — also across an
//! operator restart.

mod support;

use std::{net::SocketAddr, time::Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use remora_operator::index::{api::SliceApi, model::ObjKey};
use support::*;

const NS: &str = "idx";

#[tokio::test]
async fn index_follows_the_cluster_and_versions_only_grow_across_a_restart() {
    let (_cluster, client) = cluster().await;
    let op = operator(&client, "op-index").await;
    namespace(&client, NS).await;
    let svc: Service = service(&client, NS, "reviews", &[9080]).await;
    let vip: std::net::IpAddr = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("cluster IP allocated")
        .parse()
        .expect("IP");
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &from_json(serde_json::json!({
                "metadata": {"name": "idx-node", "labels": {"topology.kubernetes.io/zone": "zone-b"}},
            })),
        )
        .await
        .expect("node created");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    pods.create(
        &PostParams::default(),
        &from_json(serde_json::json!({
            "metadata": {"name": "reviews-1", "annotations": {
                "remora.dev/injected": "test", "config.remora.dev/weight": "4"}},
            "spec": {"serviceAccountName": "reviews", "nodeName": "idx-node", "containers": [
                {"name": "app", "image": "reviews", "ports": [{"containerPort": 8080}]}
            ]},
        })),
    )
    .await
    .expect("pod created");
    reviews_slice(&client, NS, &["10.244.0.7"]).await;

    op.index.wait_synced().await;
    assert_eq!(
        op.index.slice_api(),
        Some(SliceApi::V1Beta1),
        "Kubernetes 1.20 serves v1beta1 only"
    );
    // The Pod and EndpointSlice watches are separate streams: a version may hold the
    // endpoint before the Pod that gives it its identity has arrived. Wait for both.
    let (v1, p) = wait_reviews(
        &op.index,
        NS,
        "reviews with its endpoint and identity",
        0,
        |p| p.endpoints.len() == 1 && p.endpoints[0].identity.is_some(),
    )
    .await;
    assert_eq!(p.name, "reviews.idx");
    assert_eq!(p.addresses, vec![SocketAddr::new(vip, 9080)]);
    let e = &p.endpoints[0];
    assert_eq!(e.address.to_string(), "10.244.0.7:8080");
    assert_eq!(
        e.identity.as_deref(),
        Some("spiffe://cluster.local/ns/idx/sa/reviews")
    );
    assert_eq!(e.zone.as_deref(), Some("zone-a"));
    assert!(e.meshed && e.ready);
    assert_eq!(e.weight, 4, "the Pod's weight annotation");

    // The Pod's proxy learns its zone from its Node, and a relabelled Node moves it.
    let pod_key = ObjKey::new(NS, "reviews-1");
    let zone_of = |want: &'static str| {
        let index = op.index.clone();
        let pod_key = pod_key.clone();
        async move {
            eventually(&format!("inbound piece in {want}"), || {
                let index = index.clone();
                let pod_key = pod_key.clone();
                async move {
                    let index = index.read();
                    let piece = index.inbound(&pod_key).ok_or("no inbound piece")?;
                    match piece.value.locality.zone.as_deref() {
                        Some(z) if z == want => Ok(piece.version),
                        other => Err(format!("zone {other:?}")),
                    }
                }
            })
            .await
        }
    };
    let zoned = zone_of("zone-b").await;
    nodes
        .patch(
            "idx-node",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "metadata": {"labels": {"topology.kubernetes.io/zone": "zone-c"}}
            })),
        )
        .await
        .expect("node relabelled");
    assert!(zone_of("zone-c").await > zoned, "a newer version");
    assert_eq!(
        op.index.read().destination_of(SocketAddr::new(vip, 9080)),
        Some(&reviews(NS))
    );

    // An EndpointSlice change reaches the index with a newer version.
    let changed_at = Instant::now();
    reviews_slice(&client, NS, &["10.244.0.7", "10.244.0.9"]).await;
    let (v2, _) = wait_reviews(&op.index, NS, "second endpoint", v1, |p| {
        p.endpoints.len() == 2
    })
    .await;
    eprintln!(
        "EndpointSlice change → index version in {:?}",
        changed_at.elapsed()
    );

    // A policy for the Service lands in its outbound piece.
    let policies: Api<remora_crds::MeshPolicy> = Api::namespaced(client.clone(), NS);
    policies
        .create(
            &PostParams::default(),
            &from_json(serde_json::json!({
                "apiVersion": "remora.dev/v1alpha1", "kind": "MeshPolicy",
                "metadata": {"name": "reviews"},
                "spec": {"targetRef": {"kind": "Service", "name": "reviews"},
                         "timeouts": {"request": "3s"}},
            })),
        )
        .await
        .expect("policy created");
    let (v3, p) = wait_reviews(&op.index, NS, "the policy's timeout", v2, |p| {
        p.policy.is_some()
    })
    .await;
    assert_eq!(
        p.policy
            .and_then(|p| p.timeouts)
            .and_then(|t| t.request)
            .map(|d| d.to_string()),
        Some("3s".to_owned())
    );

    let (_, metrics) = http_get(op.addr, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains("remora_operator_index_version "),
        "{metrics}"
    );
    assert!(
        metrics.contains("remora_operator_index_recomputes_total"),
        "{metrics}"
    );

    // Restart: a new operator with no memory of the old one issues higher versions.
    op.stop().await;
    let op = operator(&client, "op-index-2").await;
    op.index.wait_synced().await;
    let (v4, p) = wait_reviews(&op.index, NS, "after restart", 0, |p| {
        p.endpoints.len() == 2 && p.policy.is_some()
    })
    .await;
    assert!(v4 > v3, "version {v4} after restart is not above {v3}");
    assert!(p.policy.is_some());

    // The slice goes: no endpoints, newer version still.
    let gvk = kube::api::GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice");
    let ar = kube::api::ApiResource::from_gvk_with_plural(&gvk, "endpointslices");
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), "idx", &ar);
    api.delete("reviews-abc", &DeleteParams::default())
        .await
        .expect("slice deleted");
    wait_reviews(&op.index, NS, "no endpoints", v4, |p| {
        p.endpoints.is_empty()
    })
    .await;
    op.stop().await;
}
