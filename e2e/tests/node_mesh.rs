//! Remora on a real node, installed as users install it: `kubectl apply -k config/default`
//! with the images imported, the operator and webhook as pods bootstrapping their own CA,
//! certificate and caBundle; then the samples in a labelled namespace: every pod injected
//! and Running, and the frontend's requests to the reviews Service carried over mTLS by
//! both sidecars, each naming the other's SPIFFE identity.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};
use remora_e2e::Node;

const SHOP: &str = "shop";

fn pod_ip(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn samples_run_injected_and_talk_over_mtls_between_both_sidecars() {
    let node = Node::start().await.expect("node starts");
    println!("node Ready in {:.1} s", node.started_in().as_secs_f64());
    let installed = node
        .install_remora(Duration::from_secs(180))
        .await
        .expect("Remora installs from config/default");
    println!(
        "images imported in {:.1} s; operator and webhook Ready, caBundle set {:.1} s after kubectl apply -k config/default",
        installed.import.as_secs_f64(),
        installed.ready.as_secs_f64()
    );

    let applied = Instant::now();
    let samples = remora_e2e::apply::repo_root().join("config/samples");
    node.kubectl(&["apply", "-k", &samples.display().to_string()])
        .expect("kubectl apply -k config/samples");
    for d in ["frontend", "reviews-v1", "reviews-v2", "loadgen"] {
        node.wait_deployment(SHOP, d, Duration::from_secs(180))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    println!(
        "demo pods Ready {:.1} s after kubectl apply -k config/samples",
        applied.elapsed().as_secs_f64()
    );

    let pods: Api<Pod> = Api::namespaced(node.client().await.expect("client"), SHOP);
    let list = pods.list(&ListParams::default()).await.expect("pods");
    for p in &list.items {
        let spec = p.spec.as_ref().expect("spec");
        let name = p.metadata.name.as_deref().unwrap_or_default();
        assert!(
            spec.containers.iter().any(|c| c.name == "remora-proxy"),
            "{name} has no remora-proxy container"
        );
        assert!(
            spec.init_containers
                .iter()
                .flatten()
                .any(|c| c.name == "remora-init"),
            "{name} has no remora-init init container"
        );
        let ip = pod_ip(p);
        assert!(ip.starts_with("10.244.0."), "{name}: pod IP {ip}");
        // The app's readiness probe is rewritten to the proxy's admin port, and kubelet
        // finds it passing (the pod is Ready): the proxy answers it.
        let app = spec
            .containers
            .iter()
            .find(|c| c.name != "remora-proxy")
            .expect("an app container");
        if let Some(probe) = &app.readiness_probe {
            let port = probe.http_get.as_ref().map(|h| h.port.clone());
            assert_eq!(
                port,
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15020)),
                "{name}: readiness probe not rewritten to the proxy"
            );
        }
        // Classic sidecar: the proxy is the first container and its postStart hook holds
        // the app back until it is ready, so the app cannot start before it.
        assert_eq!(
            spec.containers[0].name, "remora-proxy",
            "{name}: proxy not first"
        );
        let started = |c: &str| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|cs| cs.iter().find(|s| s.name == c))
                .and_then(|s| s.state.as_ref())
                .and_then(|s| s.running.as_ref())
                .and_then(|r| r.started_at.clone())
                .map(|t| t.0)
        };
        let (proxy, app_start) = (started("remora-proxy"), started(&app.name));
        assert!(
            proxy.is_some() && app_start.is_some() && proxy <= app_start,
            "{name}: proxy started {proxy:?}, app {app_start:?}"
        );
    }
    println!("{} pods injected and Ready", list.items.len());

    // Requests from the frontend's app container to the reviews Service's ClusterIP: the
    // frontend's sidecar intercepts them, the reviews sidecar receives them over mTLS.
    let frontend = list
        .items
        .iter()
        .find(|p| {
            p.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("frontend-"))
        })
        .expect("a frontend pod");
    let frontend_name = frontend.metadata.name.clone().unwrap_or_default();
    let reviews_ip = node
        .kubectl(&[
            "-n",
            SHOP,
            "get",
            "service",
            "reviews",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .expect("reviews service");
    let summary = node
        .kubectl(&[
            "-n",
            SHOP,
            "exec",
            &frontend_name,
            "-c",
            "frontend",
            "--",
            "remora-demo-app",
            "load",
            &format!("--url=http://{reviews_ip}:9080/api/reviews"),
            "--rps=50",
            "--duration=4s",
            "--interval=10s",
        ])
        .expect("load from the frontend pod");
    println!("load from {frontend_name} to reviews {reviews_ip}:9080:\n{summary}");
    let json = summary
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .expect("a JSON summary line");
    let s = &json["summary"];
    assert_eq!(s["failed"], 0, "failed requests: {s}");
    assert!(s["ok"].as_u64().unwrap_or(0) >= 100, "too few answers: {s}");
    let backends = s["by_pod"].as_object().map(|m| m.len()).unwrap_or(0);
    assert!(backends >= 1, "no backend named in the answers: {s}");

    let metrics = |ip: &str| {
        node.exec_in_netns(&[
            "curl",
            "-sS",
            "--max-time",
            "2",
            &format!("http://{ip}:15020/metrics"),
        ])
        .expect("proxy metrics")
    };
    let frontend_metrics = metrics(&pod_ip(frontend));
    assert!(
        frontend_metrics.contains(r#"peer_identity="spiffe://cluster.local/ns/shop/sa/reviews""#),
        "the frontend's proxy saw no reviews identity:\n{frontend_metrics}"
    );
    let reviews_seen = list
        .items
        .iter()
        .filter(|p| {
            p.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("reviews-"))
        })
        .map(|p| metrics(&pod_ip(p)))
        .filter(|m| m.contains(r#"peer_identity="spiffe://cluster.local/ns/shop/sa/frontend""#))
        .count();
    assert!(
        reviews_seen > 0,
        "no reviews proxy saw the frontend identity inbound"
    );
    println!(
        "mTLS both ways: frontend proxy saw sa/reviews, {reviews_seen} reviews proxies saw sa/frontend; memory of the box: {} MiB",
        node.memory_bytes() / (1024 * 1024)
    );

    let report = node.stop();
    assert!(
        report.problems.is_empty(),
        "left behind: {:#?}",
        report.problems
    );
}
