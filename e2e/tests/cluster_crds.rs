//! The mesh API against a real kube-apiserver: the generated CRDs install and become
//! Established, the samples are accepted and read back unchanged, the schema rejects bad
//! values naming the field, and `config/default` applies, alone and with the `config/accel`
//! component.

use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams},
};
use remora_crds::{MeshPolicy, TrafficSplit, policy::MtlsMode};
use remora_e2e::{
    Cluster, ClusterOptions,
    apply::{self, apply_all, install_crds, kustomize, parse_documents, repo_root},
};

/// An API server (no controller-manager) and a client of it.
async fn apiserver() -> (Cluster, Client) {
    let cluster = Cluster::start_with(ClusterOptions {
        controller_manager: false,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let client = cluster.client().await.expect("client");
    (cluster, client)
}

async fn cluster_with_crds() -> (Cluster, Client) {
    let (cluster, client) = apiserver().await;
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

/// Applies the Namespace and the CRDs for real, then everything else with a server-side
/// dry run, which is returned so that the caller applies it for real too (to prove the dry
/// run was not vacuous).
async fn apply_prerequisites_and_dry_run(
    client: &Client,
    objects: Vec<DynamicObject>,
    what: &str,
) -> Vec<DynamicObject> {
    let (first, rest): (Vec<_>, Vec<_>) = objects.into_iter().partition(|o| {
        matches!(
            o.types.as_ref().map(|t| t.kind.as_str()),
            Some("Namespace" | "CustomResourceDefinition")
        )
    });
    apply_all(client, &first, false)
        .await
        .expect("namespace and CRDs apply");
    apply_all(client, &rest, true)
        .await
        .unwrap_or_else(|e| panic!("{what} applies (dry run): {e}"));
    rest
}

#[tokio::test]
async fn default_install_applies() {
    let (_cluster, client) = apiserver().await;
    let rendered = kustomize(&repo_root().join("config/default")).expect("config/default renders");
    let objects = parse_documents(&rendered, "config/default").expect("parses");
    let rest = apply_prerequisites_and_dry_run(&client, objects, "config/default").await;
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

/// `config/default` with the `config/accel` component, rendered by `kubectl kustomize`
/// from a kustomization outside the repository (as a user would write it).
fn render_with_accel() -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    // kustomize refuses absolute paths: reach the repository from the temporary directory.
    let root = repo_root().canonicalize().expect("repository root");
    let up = "../".repeat(dir.path().components().count() - 1);
    let rel = format!("{up}{}", root.to_string_lossy().trim_start_matches('/'));
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources:\n- {rel}/config/default\ncomponents:\n- {rel}/config/accel\n"
        ),
    )
    .expect("write the kustomization");
    kustomize(dir.path()).expect("config/default with config/accel renders")
}

/// The accelerator component adds exactly its DaemonSet and one webhook flag to
/// `config/default`, with the privileges and host paths the design names, and the result
/// applies to a real API server.
#[tokio::test]
async fn accel_component_adds_the_daemonset_and_the_webhook_flag() {
    use k8s_openapi::api::apps::v1::DaemonSet;

    let plain = parse_documents(
        &kustomize(&repo_root().join("config/default")).expect("config/default renders"),
        "config/default",
    )
    .expect("parses");
    assert!(
        !plain.iter().any(|o| o.name_any() == "remora-accel"),
        "config/default must not include the accelerator"
    );
    let with =
        parse_documents(&render_with_accel(), "config/default + config/accel").expect("parses");

    // Everything but the DaemonSet and the webhook's last argument is config/default.
    let kind = |o: &DynamicObject| o.types.as_ref().map(|t| t.kind.clone()).unwrap_or_default();
    let (daemonsets, mut rest): (Vec<_>, Vec<_>) =
        with.iter().cloned().partition(|o| kind(o) == "DaemonSet");
    let webhook = rest
        .iter_mut()
        .find(|o| kind(o) == "Deployment" && o.name_any() == "remora-webhook")
        .expect("the webhook Deployment");
    let args = webhook.data["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array_mut()
        .expect("webhook args");
    assert_eq!(
        args.pop(),
        Some(serde_json::json!("--accel-registrations=/run/remora/accel"))
    );
    let json = |objs: &[DynamicObject]| serde_json::to_value(objs).expect("json");
    assert_eq!(
        json(&rest),
        json(&plain),
        "the component changed more than the webhook flag"
    );

    let [ds] = &daemonsets[..] else {
        panic!("one DaemonSet expected, got {}", daemonsets.len());
    };
    assert_eq!(ds.namespace().as_deref(), Some("remora-system"));
    let ds: DaemonSet =
        serde_json::from_value(serde_json::to_value(ds).expect("json")).expect("a DaemonSet");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert!(
        pod.host_network.is_none(),
        "the agent needs no host network"
    );
    let tolerations = pod.tolerations.expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "runs on every node: {tolerations:?}"
    );
    let [c] = &pod.containers[..] else {
        panic!("one container expected");
    };
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/remora-mesh/remora-accel:0.1.0")
    );
    let sc = c.security_context.as_ref().expect("securityContext");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(
        caps.add.as_deref(),
        Some(&["BPF".to_owned(), "NET_ADMIN".to_owned()][..])
    );
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let args = c.args.clone().unwrap_or_default();
    for want in [
        "--cgroup-root=/host/sys/fs/cgroup",
        "--bpffs=/sys/fs/bpf/remora",
        "--registrations=/run/remora/accel",
        "--metrics-addr=0.0.0.0:15090",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} missing: {args:?}");
    }
    let port = c.ports.as_ref().and_then(|p| p.first()).expect("a port");
    assert_eq!(port.container_port, 15090);
    let ready = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref());
    assert_eq!(ready.and_then(|h| h.path.as_deref()), Some("/ready"));
    assert!(
        c.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some()
    );

    // Each host path, where it is mounted, and whether read-only.
    let volumes = pod.volumes.expect("volumes");
    let mut mounts: Vec<(String, String, String, bool)> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            let host = volumes
                .iter()
                .find(|v| v.name == m.name)
                .and_then(|v| v.host_path.as_ref())
                .unwrap_or_else(|| panic!("{} is not a hostPath volume", m.name));
            (
                host.path.clone(),
                host.type_.clone().unwrap_or_default(),
                m.mount_path.clone(),
                m.read_only == Some(true),
            )
        })
        .collect();
    mounts.sort();
    let owned = |h: &str, t: &str, m: &str, ro| (h.to_owned(), t.to_owned(), m.to_owned(), ro);
    assert_eq!(
        mounts,
        [
            owned(
                "/run/remora/accel",
                "DirectoryOrCreate",
                "/run/remora/accel",
                false
            ),
            owned("/sys/fs/bpf", "Directory", "/sys/fs/bpf", false),
            owned("/sys/fs/cgroup", "Directory", "/host/sys/fs/cgroup", true),
        ]
    );

    // The API server accepts all of it (a dry run first, then for real).
    let (_cluster, client) = apiserver().await;
    let rest = apply_prerequisites_and_dry_run(&client, with, "the accelerated install").await;
    apply_all(&client, &rest, false)
        .await
        .expect("the accelerated install applies");
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), "remora-system");
    let stored = daemonsets
        .get("remora-accel")
        .await
        .expect("the DaemonSet is stored");
    let stored_caps = stored
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers.into_iter().next())
        .and_then(|c| c.security_context)
        .and_then(|sc| sc.capabilities)
        .and_then(|c| c.add);
    assert_eq!(
        stored_caps.as_deref(),
        Some(&["BPF".to_owned(), "NET_ADMIN".to_owned()][..])
    );
}
