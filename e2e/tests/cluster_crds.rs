//! The mesh API against a real kube-apiserver: the generated CRDs install and become
//! Established, the samples are accepted and read back unchanged, the schema rejects bad
//! values naming the field, and `config/default` applies.

use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams},
};
use remora_crds::{MeshPolicy, TrafficSplit, policy::MtlsMode};
use remora_e2e::{
    Cluster, ClusterOptions,
    apply::{self, apply_all, install_crds, kustomize, parse_documents, repo_root},
};

async fn cluster_with_crds() -> (Cluster, Client) {
    let cluster = Cluster::start_with(ClusterOptions {
        controller_manager: false,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let client = cluster.client().await.expect("client");
    let names = install_crds(&client)
        .await
        .expect("CRDs install and become Established");
    assert_eq!(
        names,
        ["meshpolicies.remora.dev", "trafficsplits.remora.dev"]
    );
    (cluster, client)
}

fn sample(file: &str) -> Vec<DynamicObject> {
    let path = repo_root().join("config/samples").join(file);
    let text = std::fs::read_to_string(&path).expect("sample readable");
    parse_documents(&text, file).expect("sample parses")
}

#[tokio::test]
async fn samples_are_accepted_and_read_back() {
    let (cluster, client) = cluster_with_crds().await;
    let rendered = kustomize(&repo_root().join("config/samples")).expect("samples render");
    let objects = parse_documents(&rendered, "config/samples").expect("parses");
    apply_all(&client, &objects, false)
        .await
        .expect("samples apply");

    let policies: Api<MeshPolicy> = Api::namespaced(client.clone(), "shop");
    let stored = policies.get("reviews").await.expect("policy stored");
    let written: MeshPolicy =
        serde_json::from_value(serde_json::to_value(&sample("meshpolicy.yaml")[0]).expect("json"))
            .expect("sample is a MeshPolicy");
    assert_eq!(stored.spec, written.spec, "the API server kept every field");
    assert_eq!(stored.spec.mtls.map(|m| m.mode), Some(MtlsMode::Strict));
    assert_eq!(
        policies
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        2
    );

    let splits: Api<TrafficSplit> = Api::namespaced(client.clone(), "shop");
    let stored = splits.get("reviews-canary").await.expect("split stored");
    let written: TrafficSplit = serde_json::from_value(
        serde_json::to_value(&sample("trafficsplit-canary.yaml")[0]).expect("json"),
    )
    .expect("sample is a TrafficSplit");
    assert_eq!(stored.spec, written.spec);

    // Short names and printer columns, as a user sees them.
    let out = cluster
        .kubectl()
        .expect("kubectl")
        .args(["get", "mp,ts", "-n", "shop"])
        .output()
        .expect("kubectl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl get failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "TARGET",
        "MTLS",
        "ACCEPTED",
        "reviews",
        "Strict",
        "shop-defaults",
        "SERVICE",
        "reviews-canary",
    ] {
        assert!(
            text.contains(expected),
            "`kubectl get mp,ts` lacks {expected:?}:\n{text}"
        );
    }
}

/// Creates `yaml` and returns the API server's refusal message.
async fn refusal(client: &Client, yaml: &str) -> String {
    let objects = parse_documents(yaml, "test").expect("parses");
    match apply::apply(client, &objects[0], false).await {
        Ok(obj) => panic!(
            "the API server accepted an invalid object: {}",
            obj.name_any()
        ),
        Err(remora_e2e::HarnessError::Kube(kube::Error::Api(status))) => {
            assert_eq!(status.code, 422, "{status:?}");
            status.message
        }
        Err(other) => panic!("unexpected error: {other}"),
    }
}

#[tokio::test]
async fn invalid_resources_are_rejected_naming_the_field() {
    let (_cluster, client) = cluster_with_crds().await;
    let policy = |spec: &str| {
        format!(
            "apiVersion: remora.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: bad, namespace: default}}\nspec: {spec}\n"
        )
    };
    let split = |spec: &str| {
        format!(
            "apiVersion: remora.dev/v1alpha1\nkind: TrafficSplit\nmetadata: {{name: bad, namespace: default}}\nspec: {spec}\n"
        )
    };
    let cases = [
        (policy("{retries: {attempts: 11}}"), "spec.retries.attempts"),
        (policy("{mtls: {mode: Sometimes}}"), "spec.mtls.mode"),
        (
            policy("{loadBalancer: {algorithm: Fastest}}"),
            "spec.loadBalancer.algorithm",
        ),
        (
            policy("{timeouts: {request: 5 seconds}}"),
            "spec.timeouts.request",
        ),
        (
            policy("{rateLimit: {requestsPerSecond: 0}}"),
            "spec.rateLimit.requestsPerSecond",
        ),
        (
            policy("{circuitBreaker: {errorRatePercent: 101}}"),
            "spec.circuitBreaker.errorRatePercent",
        ),
        (
            policy("{authorization: {rules: [{to: {ports: [70000]}}]}}"),
            "spec.authorization.rules[0].to.ports[0]",
        ),
        (
            policy("{authorization: {default: Maybe}}"),
            "spec.authorization.default",
        ),
        (
            policy("{targetRef: {kind: Deployment, name: web}}"),
            "spec.targetRef.kind",
        ),
        (
            split("{service: reviews, backends: [{service: v1, weight: 1000001}]}"),
            "spec.backends[0].weight",
        ),
        (split("{service: reviews, backends: []}"), "spec.backends"),
        (
            split("{backends: [{service: v1, weight: 1}]}"),
            "spec.service",
        ),
        (
            split(
                "{service: reviews, backends: [{service: v1, weight: 1}], mirror: {service: v1, percent: 120}}",
            ),
            "spec.mirror.percent",
        ),
    ];
    for (yaml, field) in cases {
        let message = refusal(&client, &yaml).await;
        // 1.20 names list items without an index (`rules.to.ports`), newer servers with
        // one (`rules[0].to.ports[0]`); compare without indices.
        let unindexed = |s: &str| {
            let mut out = String::new();
            let mut in_index = false;
            for c in s.chars() {
                match c {
                    '[' => in_index = true,
                    ']' if in_index => in_index = false,
                    _ if !in_index => out.push(c),
                    _ => {}
                }
            }
            out
        };
        assert!(
            unindexed(&message).contains(&unindexed(field)),
            "refusal of\n{yaml}should name {field:?}: {message}"
        );
    }
    // Nothing invalid was stored.
    let policies: Api<MeshPolicy> = Api::namespaced(client.clone(), "default");
    assert!(policies.get_opt("bad").await.expect("get").is_none());
}

#[tokio::test]
async fn default_install_applies() {
    let cluster = Cluster::start_with(ClusterOptions {
        controller_manager: false,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let client = cluster.client().await.expect("client");
    let rendered = kustomize(&repo_root().join("config/default")).expect("config/default renders");
    let objects = parse_documents(&rendered, "config/default").expect("parses");
    // Namespace and CRDs first, for real; then everything with a server-side dry run (and
    // then for real, to prove the dry run was not vacuous).
    let (first, rest): (Vec<_>, Vec<_>) = objects.into_iter().partition(|o| {
        matches!(
            o.types.as_ref().map(|t| t.kind.as_str()),
            Some("Namespace" | "CustomResourceDefinition")
        )
    });
    apply_all(&client, &first, false)
        .await
        .expect("namespace and CRDs apply");
    apply_all(&client, &rest, true)
        .await
        .expect("config/default applies (dry run)");
    let deployments: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "remora-system",
        &kube::discovery::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "apps",
            "v1",
            "Deployment",
        )),
    );
    assert!(
        deployments
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty(),
        "dry run stored nothing"
    );
    apply_all(&client, &rest, false)
        .await
        .expect("config/default applies");
    let names: Vec<String> = deployments
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|d| d.name_any())
        .collect();
    assert_eq!(names, ["remora-operator", "remora-webhook"]);
}
