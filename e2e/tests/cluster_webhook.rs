//! The injector against a real kube-apiserver: registered by URL, it injects pods that a
//! Deployment's ReplicaSet creates in a labelled namespace, leaves other namespaces and
//! opted-out pods alone, and — failing closed — blocks pod creation while it is down.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use remora_e2e::{
    Cluster,
    apply::{apply_all, parse_documents},
    mesh::{register_webhook, start_webhook},
};

async fn apply_yaml(client: &Client, yaml: &str) {
    let objects = parse_documents(yaml, "test").expect("parses");
    apply_all(client, &objects, false).await.expect("applies");
}

fn namespace(name: &str, labelled: bool) -> String {
    let labels = if labelled {
        "labels: {remora.dev/inject: enabled}"
    } else {
        "labels: {}"
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, {labels}}}\n")
}

fn deployment(ns: &str, name: &str, annotations: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata:
      labels: {{app: {name}}}
      annotations: {{{annotations}}}
    spec:
      containers:
      - name: app
        image: registry.example/app:1
        ports: [{{containerPort: 8080, protocol: TCP}}]
        readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}}}
"#
    )
}

/// The pods of `app` in `ns`, once the ReplicaSet has created at least one.
async fn pods_of(client: &Client, ns: &str, app: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = pods
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .expect("list");
        if !list.items.is_empty() {
            return list.items;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pod for {ns}/{app} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn container_names(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let spec = pod.spec.as_ref().expect("spec");
    let names = |cs: &[k8s_openapi::api::core::v1::Container]| {
        cs.iter().map(|c| c.name.clone()).collect::<Vec<_>>()
    };
    (
        names(spec.init_containers.as_deref().unwrap_or_default()),
        names(&spec.containers),
    )
}

#[tokio::test]
async fn deployments_in_labelled_namespaces_get_injected_pods() {
    let cluster = Cluster::start().await.expect("cluster starts");
    let client = cluster.client().await.expect("client");
    let mut webhook = start_webhook(&cluster, &[]).await.expect("webhook starts");
    register_webhook(&client, &webhook.url, &webhook.ca_pem)
        .await
        .expect("registered");

    apply_yaml(&client, &namespace("meshed", true)).await;
    apply_yaml(&client, &namespace("plain", false)).await;
    for ns in ["meshed", "plain"] {
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), ns);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while sa.get_opt("default").await.expect("get sa").is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no default service account in {ns}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    apply_yaml(&client, &deployment("meshed", "web", "")).await;
    apply_yaml(
        &client,
        &deployment("meshed", "batch", "remora.dev/inject: disabled"),
    )
    .await;
    apply_yaml(&client, &deployment("plain", "web", "")).await;

    let injected = &pods_of(&client, "meshed", "web").await[0];
    let (init, containers) = container_names(injected);
    assert_eq!(
        init,
        ["remora-init"],
        "classic mode on 1.20: only remora-init is an init container"
    );
    assert_eq!(
        containers,
        ["remora-proxy", "app"],
        "the proxy starts first"
    );
    let annotations = injected.metadata.annotations.clone().unwrap_or_default();
    assert!(
        annotations.contains_key("remora.dev/injected"),
        "{annotations:?}"
    );
    // The app's HTTP probe now goes through the proxy's admin port.
    let app = injected
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == "app"))
        .expect("app");
    let probe = app
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("http probe kept");
    assert_eq!(probe.path.as_deref(), Some("/app-health/app/readyz"));

    for (ns, app) in [("meshed", "batch"), ("plain", "web")] {
        let (init, containers) = container_names(&pods_of(&client, ns, app).await[0]);
        assert!(init.is_empty(), "{ns}/{app} must not be injected: {init:?}");
        assert_eq!(containers, ["app"], "{ns}/{app} must not be injected");
    }
    webhook
        .process
        .check_running()
        .expect("webhook still running");

    // Down: pods in meshed namespaces are refused, never created unmeshed.
    drop(webhook);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "meshed");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "while-down"},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))
    .expect("pod");
    match pods.create(&PostParams::default(), &pod).await {
        Ok(_) => panic!("a pod was created in a meshed namespace while the webhook was down"),
        Err(kube::Error::Api(status)) => {
            assert!(
                status.message.contains("inject.remora.dev"),
                "the refusal names the webhook: {}",
                status.message
            );
        }
        Err(other) => panic!("unexpected error: {other}"),
    }
    // Unlabelled namespaces are not affected by the outage.
    let plain: Api<Pod> = Api::namespaced(client.clone(), "plain");
    plain
        .create(&PostParams::default(), &pod)
        .await
        .expect("unmeshed namespace unaffected");
}
