//! The controllers against a real kube-apiserver: conditions, Events, reactions to
//! Services appearing and disappearing, conflicts, TrafficSplit backends, and the admin
//! endpoints. The operator runs in-process on the test's runtime.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
};
use remora_crds::{MeshPolicy, TrafficSplit};
use support::*;

fn policy_status(p: &MeshPolicy) -> Option<&remora_crds::PolicyStatus> {
    p.status.as_ref()
}

fn split_status(s: &TrafficSplit) -> Option<&remora_crds::PolicyStatus> {
    s.status.as_ref()
}

#[tokio::test]
async fn valid_policy_is_accepted_with_an_event_and_metrics() {
    let (_cluster, client) = cluster().await;
    let op = operator(&client, "op-valid").await;
    namespace(&client, "valid").await;
    service(&client, "valid", "reviews", &[9080]).await;
    mesh_policy(&client, "valid", "reviews", Some("reviews")).await;

    let api: Api<MeshPolicy> = Api::namespaced(client.clone(), "valid");
    let p = wait_conditions(
        &api,
        "reviews",
        policy_status,
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )
    .await;
    let event = wait_event(&client, "valid", "reviews", "Normal", "Accepted").await;
    assert_eq!(event.involved_object.kind.as_deref(), Some("MeshPolicy"));

    // The status belongs to the operator's field manager, written by apply.
    let managers: Vec<(String, String)> = p
        .managed_fields()
        .iter()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managers.contains(&("remora-operator".to_owned(), "Apply".to_owned())),
        "{managers:?}"
    );

    // A spec change moves observedGeneration; the unchanged conditions keep their
    // lastTransitionTime.
    let before: Vec<_> = p
        .status
        .as_ref()
        .expect("status")
        .conditions
        .iter()
        .map(|c| c.last_transition_time.clone())
        .collect();
    api.patch(
        "reviews",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"mtls": {"mode": "Permissive"}}})),
    )
    .await
    .expect("spec patched");
    let p = wait_conditions(
        &api,
        "reviews",
        policy_status,
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )
    .await;
    assert_eq!(p.metadata.generation, Some(2));
    let status = p.status.as_ref().expect("status");
    assert_eq!(status.observed_generation, Some(2));
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(2))
    );
    let after: Vec<_> = status
        .conditions
        .iter()
        .map(|c| c.last_transition_time.clone())
        .collect();
    assert_eq!(
        before, after,
        "lastTransitionTime kept while the status holds"
    );

    // Operations endpoints.
    assert_eq!(http_get(op.addr, "/healthz").await.expect("healthz").0, 200);
    eventually("/readyz 200", || async {
        match http_get(op.addr, "/readyz").await? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (code, metrics) = http_get(op.addr, "/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("remora_operator_leader 1"), "{metrics}");
    assert!(
        metrics.contains("remora_operator_reconciles_total{kind=\"MeshPolicy\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("remora_operator_status_writes_total{kind=\"MeshPolicy\"}"),
        "{metrics}"
    );
    op.stop().await;
}

#[tokio::test]
async fn conflicting_policies_oldest_wins_and_the_loser_takes_over() {
    let (_cluster, client) = cluster().await;
    let op = operator(&client, "op-conflict").await;
    namespace(&client, "conflict").await;
    service(&client, "conflict", "reviews", &[9080]).await;
    let api: Api<MeshPolicy> = Api::namespaced(client.clone(), "conflict");

    // "zz-old" is older; by name alone "aa-new" would sort first.
    mesh_policy(&client, "conflict", "zz-old", Some("reviews")).await;
    wait_conditions(
        &api,
        "zz-old",
        policy_status,
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )
    .await;
    // creationTimestamp has one-second resolution: make the ages differ.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    mesh_policy(&client, "conflict", "aa-new", Some("reviews")).await;
    // Two namespace-wide policies conflict too.
    mesh_policy(&client, "conflict", "ns-wide-1", None).await;

    let loser = wait_conditions(
        &api,
        "aa-new",
        policy_status,
        ("False", "Conflicted"),
        ("True", "ResolvedRefs"),
    )
    .await;
    let message = &loser
        .status
        .as_ref()
        .and_then(|s| s.condition("Accepted"))
        .expect("Accepted")
        .message;
    assert!(message.contains("zz-old"), "{message}");
    let event = wait_event(&client, "conflict", "aa-new", "Warning", "Conflicted").await;
    assert!(
        event
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("zz-old"),
        "{event:?}"
    );
    wait_conditions(
        &api,
        "zz-old",
        policy_status,
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )
    .await;
    wait_conditions(
        &api,
        "ns-wide-1",
        policy_status,
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    mesh_policy(&client, "conflict", "ns-wide-0", None).await;
    wait_conditions(
        &api,
        "ns-wide-0",
        policy_status,
        ("False", "Conflicted"),
        ("True", "ResolvedRefs"),
    )
    .await;

    // The winner goes: the loser is re-reconciled and takes over.
    api.delete("zz-old", &DeleteParams::default())
        .await
        .expect("winner deleted");
    wait_conditions(
        &api,
        "aa-new",
        policy_status,
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )
    .await;
    op.stop().await;
}

#[tokio::test]
async fn dangling_policy_resolves_when_its_service_appears() {
    let (_cluster, client) = cluster().await;
    let op = operator(&client, "op-dangling").await;
    namespace(&client, "dangling").await;
    service(&client, "dangling", "unrelated", &[80]).await;
    mesh_policy(&client, "dangling", "ratings", Some("ratings")).await;
    let api: Api<MeshPolicy> = Api::namespaced(client.clone(), "dangling");

    let p = wait_conditions(
        &api,
        "ratings",
        policy_status,
        ("True", "Accepted"),
        ("False", "ServiceNotFound"),
    )
    .await;
    let message = &p
        .status
        .as_ref()
        .and_then(|s| s.condition("ResolvedRefs"))
        .expect("ResolvedRefs")
        .message;
    assert_eq!(message, "Service ratings not found in namespace dangling");
    let event = wait_event(&client, "dangling", "ratings", "Warning", "ServiceNotFound").await;
    assert_eq!(
        event.message.as_deref(),
        Some("Service ratings not found in namespace dangling")
    );

    // The Service appears: the policy is re-reconciled without touching it.
    service(&client, "dangling", "ratings", &[9080]).await;
    wait_conditions(
        &api,
        "ratings",
        policy_status,
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )
    .await;

    // And disappears again.
    let services: Api<Service> = Api::namespaced(client.clone(), "dangling");
    services
        .delete("ratings", &DeleteParams::default())
        .await
        .expect("service deleted");
    wait_conditions(
        &api,
        "ratings",
        policy_status,
        ("True", "Accepted"),
        ("False", "ServiceNotFound"),
    )
    .await;
    op.stop().await;
}

#[tokio::test]
async fn traffic_split_backends_must_exist_and_expose_the_root_ports() {
    let (_cluster, client) = cluster().await;
    let op = operator(&client, "op-split").await;
    let ns = "split";
    namespace(&client, ns).await;
    service(&client, ns, "reviews", &[9080]).await;
    service(&client, ns, "reviews-v1", &[9080, 9443]).await;
    service(&client, ns, "details", &[9080, 9090]).await;
    service(&client, ns, "details-v1", &[9080]).await;
    service(&client, ns, "ratings", &[9080]).await;
    let api: Api<TrafficSplit> = Api::namespaced(client.clone(), ns);

    // A backend that does not exist.
    traffic_split(
        &client,
        ns,
        "missing",
        "reviews",
        &[("reviews-v1", 90), ("reviews-v2", 10)],
    )
    .await;
    let s = wait_conditions(
        &api,
        "missing",
        split_status,
        ("True", "Accepted"),
        ("False", "BackendNotFound"),
    )
    .await;
    assert_eq!(
        s.status
            .as_ref()
            .and_then(|s| s.condition("ResolvedRefs"))
            .map(|c| c.message.as_str()),
        Some("backend Services not found in namespace split: reviews-v2")
    );
    wait_event(&client, ns, "missing", "Warning", "BackendNotFound").await;

    // A backend without one of the root's ports.
    traffic_split(&client, ns, "ports", "details", &[("details-v1", 1)]).await;
    let s = wait_conditions(
        &api,
        "ports",
        split_status,
        ("True", "Accepted"),
        ("False", "BackendPortMismatch"),
    )
    .await;
    let message = s
        .status
        .as_ref()
        .and_then(|s| s.condition("ResolvedRefs"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("details-v1 lacks 9090/TCP"), "{message}");
    wait_event(&client, ns, "ports", "Warning", "BackendPortMismatch").await;

    // All weights zero.
    traffic_split(&client, ns, "zero", "ratings", &[("ratings", 0)]).await;
    wait_conditions(
        &api,
        "zero",
        split_status,
        ("False", "Invalid"),
        ("True", "ResolvedRefs"),
    )
    .await;
    wait_event(&client, ns, "zero", "Warning", "Invalid").await;

    // The missing backend appears, the port is added: both resolve.
    service(&client, ns, "reviews-v2", &[9080]).await;
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    services
        .patch(
            "details-v1",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"ports": [
                {"name": "p9080", "port": 9080}, {"name": "p9090", "port": 9090}
            ]}})),
        )
        .await
        .expect("port added");
    wait_conditions(
        &api,
        "missing",
        split_status,
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )
    .await;
    wait_conditions(
        &api,
        "ports",
        split_status,
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )
    .await;
    op.stop().await;
}

#[tokio::test]
async fn new_policy_fields_are_checked_by_the_schema_and_the_operator() {
    let (_cluster, client) = cluster().await;
    let op = operator(&client, "op-fields").await;
    let ns = "fields";
    namespace(&client, ns).await;
    service(&client, ns, "reviews", &[9080]).await;
    mesh_policy(&client, ns, "reviews", Some("reviews")).await;
    let api: Api<MeshPolicy> = Api::namespaced(client.clone(), ns);
    let patch = |spec: serde_json::Value| {
        let api = api.clone();
        async move {
            api.patch(
                "reviews",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": spec })),
            )
            .await
        }
    };

    // Every new field, valid: accepted, and the schema filled in the locality default.
    patch(serde_json::json!({
        "fault": {"delay": {"fixed": "100ms", "percent": 10}, "abort": {"httpStatus": 503, "percent": 5}},
        "loadBalancer": {"algorithm": "ConsistentHash",
                         "consistentHash": {"cookie": {"name": "sid", "path": "/shop"}},
                         "locality": {"preferSameZone": true}},
        "rateLimit": {"requestsPerSecond": 10, "perIdentity": true},
    }))
    .await
    .expect("a valid spec");
    let p = wait_conditions(
        &api,
        "reviews",
        policy_status,
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )
    .await;
    let locality = p
        .spec
        .load_balancer
        .as_ref()
        .and_then(|l| l.locality.as_ref())
        .expect("locality");
    assert_eq!(locality.min_healthy_percent, 70);

    // What the schema holds: the API server refuses it.
    for bad in [
        serde_json::json!({"fault": {"abort": {"httpStatus": 99, "percent": 5}}}),
        serde_json::json!({"fault": {"delay": {"fixed": "100ms", "percent": 101}}}),
        serde_json::json!({"loadBalancer": {"locality": {"minHealthyPercent": 101}}}),
        serde_json::json!({"loadBalancer": {"consistentHash": {"cookie": {"name": "sid", "path": "shop"}}}}),
    ] {
        let err = patch(bad.clone()).await.expect_err("the schema refuses it");
        assert!(err.to_string().contains("Invalid"), "{bad}: {err}");
    }

    // What only the operator checks: Accepted=False, reason Invalid, with the field.
    patch(serde_json::json!({"fault": {"delay": null, "abort": null}}))
        .await
        .expect("schema-valid");
    let p = wait_conditions(
        &api,
        "reviews",
        policy_status,
        ("False", "Invalid"),
        ("True", "ResolvedRefs"),
    )
    .await;
    let message = p
        .status
        .as_ref()
        .and_then(|s| s.condition("Accepted"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("fault needs a delay, an abort or both"),
        "{message}"
    );
    wait_event(&client, ns, "reviews", "Warning", "Invalid").await;
    op.stop().await;
}
