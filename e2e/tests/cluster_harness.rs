//! The harness itself: a control plane comes up, answers, and is gone after drop.

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, api::PostParams};
use remora_e2e::{Cluster, ClusterOptions};

#[tokio::test]
async fn control_plane_starts_serves_and_stops_by_pid() {
    let cluster = Cluster::start_with(ClusterOptions {
        controller_manager: false,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let client = cluster.client().await.expect("client");
    let version = client.apiserver_version().await.expect("version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "20")
    );

    let namespaces: Api<Namespace> = Api::all(client);
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "harness"}})).expect("ns");
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
    assert!(namespaces.get_opt("harness").await.expect("get").is_some());

    assert!(cluster.kubeconfig().exists());
    let pids: Vec<u32> = cluster.pids().into_iter().map(|(_, pid)| pid).collect();
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver");
    drop(cluster);
    for pid in pids {
        // A reaped child has no /proc entry any more.
        let gone = (0..50).any(|_| {
            let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
            if alive {
                std::thread::sleep(Duration::from_millis(100));
            }
            !alive
        });
        assert!(gone, "process {pid} still running after drop");
    }
}

#[tokio::test]
async fn a_missing_apiserver_is_an_error_that_says_how_to_get_it() {
    let empty = tempfile::tempdir().expect("tempdir");
    let err = Cluster::start_with(ClusterOptions {
        k8s_bin_dir: Some(empty.path().to_owned()),
        ..ClusterOptions::default()
    })
    .await
    .expect_err("no kube-apiserver in an empty directory");
    let message = err.to_string();
    assert!(message.contains("kube-apiserver"), "{message}");
    assert!(message.contains("e2e/cluster/provision.sh"), "{message}");
}
