//! The operator while kube-apiserver is unavailable: the discovery index keeps serving its
//! last state (what the stream hands to proxies), the process stays healthy, watch failures
//! are counted and retried with backoff, and once the apiserver is back the index catches
//! up with a newer version and the controllers write status again (the Lease, lost during
//! the outage, is re-acquired).

mod support;

use std::time::Duration;

use kube::Api;
use remora_crds::MeshPolicy;
use remora_operator::index::watch::IndexHandle;
use support::*;

const NS: &str = "outage";

/// The `reviews` piece's version and endpoint count.
fn piece(index: &IndexHandle) -> Option<(u64, usize)> {
    reviews_piece(index, NS).map(|(v, p)| (v, p.endpoints.len()))
}

async fn wait_endpoints(index: &IndexHandle, what: &str, after: u64, count: usize) -> u64 {
    wait_reviews(index, NS, what, after, |p| p.endpoints.len() == count)
        .await
        .0
}

fn watch_errors(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("remora_operator_index_watch_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_index_serves_its_last_state_while_the_apiserver_is_down_and_catches_up_after() {
    let (mut cluster, client) = cluster().await;
    let op = operator(&client, "op-outage").await;
    namespace(&client, NS).await;
    service(&client, NS, "reviews", &[9080]).await;
    reviews_slice(&client, NS, &["10.244.0.7"]).await;
    op.index.wait_synced().await;
    let v1 = wait_endpoints(&op.index, "reviews with one endpoint", 0, 1).await;

    cluster.stop_apiserver();
    // Longer than the Lease (4 s in the tests) and several watch retries.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        piece(&op.index),
        Some((v1, 1)),
        "the index keeps its last state while the apiserver is down"
    );
    let (code, _) = http_get(op.addr, "/healthz").await.expect("healthz");
    assert_eq!(code, 200, "the process stays healthy");
    let (_, metrics) = http_get(op.addr, "/metrics").await.expect("metrics");
    assert!(
        watch_errors(&metrics) > 0.0,
        "watch failures are counted: {metrics}"
    );

    cluster
        .start_apiserver()
        .await
        .expect("the apiserver starts again");
    reviews_slice(&client, NS, &["10.244.0.7", "10.244.0.9"]).await;
    let v2 = wait_endpoints(&op.index, "the change made after the outage", v1, 2).await;
    assert!(v2 > v1);

    // The controllers are back as well: a new policy gets its conditions.
    mesh_policy(&client, NS, "reviews", Some("reviews")).await;
    let api: Api<MeshPolicy> = Api::namespaced(client.clone(), NS);
    wait_conditions(
        &api,
        "reviews",
        |p| p.status.as_ref(),
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )
    .await;
    op.stop().await;
}
