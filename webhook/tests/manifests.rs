//! The MutatingWebhookConfiguration in `config/webhook/` parses as the Kubernetes type and
//! says what the injector relies on: fail closed, no side effects, a short timeout, v1
//! reviews, pod CREATE only, labelled namespaces only, never kube-system or remora-system.
//! The `config/accel` component's webhook flag is one this webhook accepts, naming the
//! directory the agent's DaemonSet shares with the nodes.

use std::path::Path;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;

#[test]
fn mutating_webhook_configuration() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config/webhook/mutatingwebhookconfiguration.yaml");
    let text = std::fs::read_to_string(&path).expect("read the manifest");
    let mwc: MutatingWebhookConfiguration =
        serde_yaml::from_str(&text).expect("a MutatingWebhookConfiguration");
    let hooks = mwc.webhooks.expect("webhooks");
    assert_eq!(hooks.len(), 1);
    let h = &hooks[0];
    assert_eq!(h.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(h.side_effects, "None");
    assert!(h.timeout_seconds.is_some_and(|t| t <= 5));
    assert_eq!(h.admission_review_versions, ["v1"]);
    let svc = h.client_config.service.as_ref().expect("service");
    assert_eq!(svc.path.as_deref(), Some("/mutate"));
    let rules = h.rules.as_ref().expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].operations.as_deref(),
        Some(&["CREATE".to_owned()][..])
    );
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["pods".to_owned()][..])
    );
    let ns = h.namespace_selector.as_ref().expect("namespaceSelector");
    assert_eq!(
        ns.match_labels
            .as_ref()
            .and_then(|l| l.get("remora.dev/inject"))
            .map(String::as_str),
        Some("enabled")
    );
    let excluded = ns.match_expressions.as_ref().expect("matchExpressions");
    assert_eq!(excluded[0].key, "kubernetes.io/metadata.name");
    assert_eq!(excluded[0].operator, "NotIn");
    assert_eq!(
        excluded[0].values.as_deref(),
        Some(&["kube-system".to_owned(), "remora-system".to_owned()][..])
    );
}

/// The ValidatingWebhookConfiguration: namespaces carrying the mesh's label only (so no
/// other namespace can be blocked by it), CREATE and UPDATE, fail closed, never the
/// control plane's namespaces, served by the same Service as `/mutate`.
#[test]
fn validating_webhook_configuration() {
    use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/webhook");
    let text = std::fs::read_to_string(dir.join("validatingwebhookconfiguration.yaml"))
        .expect("read the manifest");
    let vwc: ValidatingWebhookConfiguration =
        serde_yaml::from_str(&text).expect("a ValidatingWebhookConfiguration");
    // The operator fills the caBundle of both configurations under one name.
    assert_eq!(vwc.metadata.name.as_deref(), Some("remora-webhook"));
    let hooks = vwc.webhooks.expect("webhooks");
    assert_eq!(hooks.len(), 1);
    let h = &hooks[0];
    assert_eq!(h.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(h.side_effects, "None");
    assert!(h.timeout_seconds.is_some_and(|t| t <= 5));
    assert_eq!(h.admission_review_versions, ["v1"]);
    let svc = h.client_config.service.as_ref().expect("service");
    assert_eq!(
        (
            svc.name.as_str(),
            svc.namespace.as_str(),
            svc.path.as_deref()
        ),
        (
            "remora-webhook",
            "remora-system",
            Some("/validate-namespace")
        )
    );
    let rules = h.rules.as_ref().expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].operations.as_deref(),
        Some(&["CREATE".to_owned(), "UPDATE".to_owned()][..])
    );
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["namespaces".to_owned()][..])
    );
    let objects = h.object_selector.as_ref().expect("objectSelector");
    let exprs = objects
        .match_expressions
        .as_ref()
        .expect("matchExpressions");
    assert_eq!(
        (exprs[0].key.as_str(), exprs[0].operator.as_str()),
        (remora_webhook::annotations::NAMESPACE_LABEL, "Exists")
    );
    assert!(
        objects.match_labels.is_none(),
        "every value must be reviewed"
    );
    let ns = h.namespace_selector.as_ref().expect("namespaceSelector");
    let excluded = ns.match_expressions.as_ref().expect("matchExpressions");
    assert_eq!(excluded[0].key, "kubernetes.io/metadata.name");
    assert_eq!(excluded[0].operator, "NotIn");
    let kustomization =
        std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization");
    assert!(
        kustomization.contains("- validatingwebhookconfiguration.yaml"),
        "{kustomization}"
    );
}

/// The flag `config/accel` adds to the webhook parses, and the directory it gives every
/// injected remora-init is the host directory the agent's DaemonSet reads.
#[test]
fn the_accel_component_and_the_webhook_agree_on_the_registration_dir() {
    use clap::Parser as _;
    use k8s_openapi::api::apps::v1::DaemonSet;
    use remora_webhook::cli::Cli;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/accel");
    let kustomization: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("kustomization.yaml")).expect("read the component"),
    )
    .expect("YAML");
    assert_eq!(kustomization["kind"], "Component");
    let patch: serde_yaml::Value = serde_yaml::from_str(
        kustomization["patches"][0]["patch"]
            .as_str()
            .expect("an inline patch"),
    )
    .expect("patch YAML");
    let flag = patch[0]["value"].as_str().expect("the added argument");
    let cli = Cli::try_parse_from(["remora-webhook", flag]).expect("the webhook accepts the flag");
    let cfg = cli
        .serve
        .injection
        .config(true)
        .expect("valid injection settings");
    let registrations = cfg.accel_registrations.expect("the accelerator is on");

    let ds: DaemonSet = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("daemonset.yaml")).expect("read the DaemonSet"),
    )
    .expect("a DaemonSet");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    let host = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "registrations")
        .and_then(|v| v.host_path.as_ref())
        .expect("the registrations hostPath");
    assert_eq!(host.path, registrations);
    let args = pod.containers[0].args.clone().unwrap_or_default();
    assert!(
        args.contains(&format!("--registrations={registrations}")),
        "{args:?}"
    );
}
