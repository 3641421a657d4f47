//! What the leader publishes for `kubectl apply -k config/default`, against a real
//! kube-apiserver with the operator in-process: the trust bundle ConfigMap in labelled
//! namespaces only (also one labelled later, and following a root rotation step), the
//! injector's serving certificate (its Service names, verifying against the bundle), the
//! caBundle of the MutatingWebhookConfiguration from `config/webhook/`,
//! `--manage-webhook-certificate=false`, and all of it under the RBAC of
//! `config/rbac/operator.yaml` alone.

mod support;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{ConfigMap, Namespace, Secret},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use remora_operator::{Args, Operator, ca::CaMaterial};
use rustls::{
    client::danger::ServerCertVerifier,
    pki_types::{CertificateDer, ServerName},
};
use tokio::{sync::oneshot, task::JoinHandle};
use x509_parser::extensions::{GeneralName, ParsedExtension};

const OPERATOR_NS: &str = "remora-system";
const BUNDLE_CM: &str = "remora-trust-bundle";
const WEBHOOK_SECRET: &str = "remora-webhook-tls";
const WEBHOOK_CONFIG: &str = "remora-webhook";
/// The CA re-reads its Secret every 30 s; a bundle change must be published after that.
const ROTATION_DEADLINE: Duration = Duration::from_secs(60);

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), remora_operator::Error>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the operator stops")
            .expect("no panic")
            .expect("the operator ran without error");
    }
}

/// The operator (the only replica; no election unless `extra` asks), its CA on a free
/// loopback port.
async fn operator(client: &Client, extra: &[&str]) -> Running {
    let [port] = remora_e2e::cluster::free_ports::<1>().expect("a free port");
    let mut flags = vec![
        "remora-operator".to_owned(),
        "--metrics-listen=127.0.0.1:0".to_owned(),
        "--pod-name=op-bootstrap".to_owned(),
        format!("--pod-namespace={OPERATOR_NS}"),
        format!("--ca-listen=127.0.0.1:{port}"),
    ];
    if !extra.iter().any(|f| f.starts_with("--leader-elect")) {
        flags.push("--leader-elect=false".to_owned());
    }
    flags.extend(extra.iter().map(|f| (*f).to_owned()));
    let args = <Args as clap::Parser>::try_parse_from(flags).expect("flags");
    let op = Operator::bind(args, client.clone())
        .await
        .expect("operator binds");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(op.run(async move {
        let _ = stopped.await;
    }));
    Running { stop, task }
}

async fn labelled_namespace(client: &Client, name: &str, inject: Option<&str>) {
    let mut meta = serde_json::json!({"name": name});
    if let Some(v) = inject {
        meta["labels"] = serde_json::json!({"remora.dev/inject": v});
    }
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &support::from_json(serde_json::json!({"metadata": meta})),
        )
        .await
        .expect("namespace created");
}

async fn set_inject_label(client: &Client, name: &str, value: Option<&str>) {
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"labels": {"remora.dev/inject": value}}}),
            ),
        )
        .await
        .expect("namespace labelled");
}

/// The injector's registration, as `kubectl apply -k config/default` creates it.
async fn apply_webhook_configuration(client: &Client) {
    apply_manifest(client, "config/webhook/mutatingwebhookconfiguration.yaml").await;
}

async fn apply_manifest(client: &Client, relative: &str) {
    // This checkout's manifests (the e2e crate may have been built from another one).
    let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(relative);
    let yaml = std::fs::read_to_string(&path).expect("the manifest is readable");
    let docs = remora_e2e::apply::parse_documents(&yaml, relative).expect("the manifest parses");
    remora_e2e::apply::apply_all(client, &docs, false)
        .await
        .expect("the manifest is applied");
}

async fn config_map_bundle(client: &Client, ns: &str) -> Option<String> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(BUNDLE_CM)
        .await
        .expect("get ConfigMap")
        .and_then(|cm| cm.data)
        .and_then(|d| d.get("ca.crt").cloned())
}

/// Waits until ConfigMap `ns/remora-trust-bundle` holds `want`.
async fn wait_bundle(client: &Client, ns: &str, want: &str, deadline: Duration) {
    let start = tokio::time::Instant::now();
    loop {
        let got = config_map_bundle(client, ns).await;
        if got.as_deref() == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "ConfigMap {ns}/{BUNDLE_CM} does not hold the bundle within {deadline:?}; it holds {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn ca_bundles(client: &Client) -> Vec<Option<String>> {
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get(WEBHOOK_CONFIG)
        .await
        .expect("get MutatingWebhookConfiguration")
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .map(|w| {
            w.client_config
                .ca_bundle
                .map(|b| String::from_utf8(b.0).expect("caBundle is PEM"))
        })
        .collect()
}

async fn wait_ca_bundle(client: &Client, want: &str, deadline: Duration) {
    let start = tokio::time::Instant::now();
    loop {
        let got = ca_bundles(client).await;
        if !got.is_empty() && got.iter().all(|b| b.as_deref() == Some(want)) {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "caBundle not set to the mesh bundle within {deadline:?}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn ca_material(client: &Client) -> CaMaterial {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), OPERATOR_NS);
    let start = tokio::time::Instant::now();
    loop {
        if let Some(s) = secrets.get_opt("remora-ca").await.expect("get CA Secret") {
            return CaMaterial::from_secret(&s).expect("CA material");
        }
        assert!(
            start.elapsed() < support::DEADLINE,
            "the operator created no CA Secret"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pem_certs(text: &[u8]) -> Vec<CertificateDer<'static>> {
    x509_parser::pem::Pem::iter_from_buffer(text)
        .map(|p| CertificateDer::from(p.expect("PEM").contents))
        .collect()
}

/// The webhook Secret's chain, once it exists.
async fn webhook_chain(client: &Client) -> (Vec<CertificateDer<'static>>, Secret) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), OPERATOR_NS);
    let start = tokio::time::Instant::now();
    loop {
        if let Some(s) = secrets.get_opt(WEBHOOK_SECRET).await.expect("get Secret") {
            let data = s.data.clone().expect("Secret data");
            assert!(data.contains_key("tls.key"), "the Secret holds the key");
            let chain = pem_certs(&data["tls.crt"].0);
            return (chain, s);
        }
        assert!(
            start.elapsed() < support::DEADLINE,
            "the operator created no {WEBHOOK_SECRET} Secret"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn dns_names(leaf: &CertificateDer<'_>) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).expect("x509");
    cert.extensions()
        .iter()
        .filter_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.clone()),
            _ => None,
        })
        .flatten()
        .map(|n| match n {
            GeneralName::DNSName(d) => d.to_owned(),
            other => panic!("only DNS names expected, got {other:?}"),
        })
        .collect()
}

/// Whether the apiserver, trusting `bundle`, accepts `chain` for `name`.
fn verifies(bundle: &str, chain: &[CertificateDer<'static>], name: &str) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    for r in pem_certs(bundle.as_bytes()) {
        roots.add(r).expect("root");
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    let now = rustls::pki_types::UnixTime::since_unix_epoch(
        SystemTime::now().duration_since(UNIX_EPOCH).expect("clock"),
    );
    let server = ServerName::try_from(name.to_owned()).expect("server name");
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &server, &[], now)
        .is_ok()
}

#[tokio::test]
async fn the_leader_publishes_the_bundle_the_webhook_certificate_and_the_ca_bundle() {
    let (_cluster, client) = support::cluster().await;
    labelled_namespace(&client, "meshed", Some("enabled")).await;
    labelled_namespace(&client, "plain", None).await;
    labelled_namespace(&client, "off", Some("disabled")).await;
    labelled_namespace(&client, "later", None).await;
    apply_webhook_configuration(&client).await;
    assert!(
        ca_bundles(&client).await.iter().all(Option::is_none),
        "the manifest has no caBundle"
    );
    let running = operator(&client, &[]).await;

    let old = ca_material(&client).await;
    let bundle = old.bundle_pem.clone();
    wait_bundle(&client, "meshed", &bundle, support::DEADLINE).await;

    // A namespace labelled later gets it too.
    set_inject_label(&client, "later", Some("enabled")).await;
    wait_bundle(&client, "later", &bundle, support::DEADLINE).await;

    // The serving certificate: exactly the Service's names, from the mesh issuer.
    let (chain, secret) = webhook_chain(&client).await;
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let mut names = dns_names(&chain[0]);
    names.sort();
    assert_eq!(
        names,
        vec![
            "remora-webhook.remora-system.svc".to_owned(),
            "remora-webhook.remora-system.svc.cluster.local".to_owned(),
        ]
    );
    assert!(verifies(
        &bundle,
        &chain,
        "remora-webhook.remora-system.svc"
    ));
    assert!(!verifies(
        &bundle,
        &chain,
        "remora-operator.remora-system.svc"
    ));
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("x509");
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(life, 30 * 24 * 3600 + 60, "30 days (+1 min backdate)");

    wait_ca_bundle(&client, &bundle, support::DEADLINE).await;

    // A namespace that loses the label keeps its ConfigMap (running pods mount it).
    set_inject_label(&client, "later", None).await;

    // Rotation step 1 of docs/ca.md: a second root joins the bundle; everything follows.
    let new = CaMaterial::generate(SystemTime::now(), Duration::from_secs(86400 * 365))
        .expect("new root");
    let both = format!("{}{}", old.bundle_pem, new.bundle_pem);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), OPERATOR_NS);
    let current = secrets.get("remora-ca").await.expect("CA Secret");
    let mut next = CaMaterial {
        bundle_pem: both.clone(),
        ..old.clone()
    }
    .to_secret(OPERATOR_NS, "remora-ca");
    next.metadata.resource_version = current.metadata.resource_version;
    secrets
        .replace("remora-ca", &PostParams::default(), &next)
        .await
        .expect("CA Secret updated");
    wait_bundle(&client, "meshed", &both, ROTATION_DEADLINE).await;
    wait_ca_bundle(&client, &both, support::DEADLINE).await;
    // The issuer did not change: the serving certificate stays, and verifies with both.
    let (after, _) = webhook_chain(&client).await;
    assert_eq!(after, chain, "same issuer, same certificate");
    assert!(verifies(&both, &after, "remora-webhook.remora-system.svc"));

    assert_eq!(
        config_map_bundle(&client, "later").await.as_deref(),
        Some(bundle.as_str()),
        "a namespace that lost the label keeps its (no longer updated) ConfigMap"
    );
    for ns in ["plain", "off"] {
        assert_eq!(
            config_map_bundle(&client, ns).await,
            None,
            "{ns} is not meshed: no ConfigMap"
        );
    }
    running.stop().await;
}

#[tokio::test]
async fn cert_manager_users_turn_the_webhook_certificate_off() {
    let (_cluster, client) = support::cluster().await;
    labelled_namespace(&client, "meshed", Some("enabled")).await;
    apply_webhook_configuration(&client).await;
    let running = operator(&client, &["--manage-webhook-certificate=false"]).await;

    let bundle = ca_material(&client).await.bundle_pem;
    wait_bundle(&client, "meshed", &bundle, support::DEADLINE).await;
    // The leader is publishing; give the webhook task (were it on) time to act.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), OPERATOR_NS);
    assert!(
        secrets
            .get_opt(WEBHOOK_SECRET)
            .await
            .expect("get Secret")
            .is_none(),
        "no webhook Secret when turned off"
    );
    assert!(
        ca_bundles(&client).await.iter().all(Option::is_none),
        "the caBundle is left to cert-manager"
    );
    running.stop().await;
}

/// The operator running as its service account, with only `config/rbac/operator.yaml`:
/// the ConfigMaps, the webhook Secret and the caBundle are all within its grants.
#[tokio::test]
async fn the_rbac_of_config_rbac_is_enough() {
    let (cluster, admin) = support::cluster().await;
    apply_manifest(&admin, "config/rbac/operator.yaml").await;
    apply_webhook_configuration(&admin).await;
    labelled_namespace(&admin, "meshed", Some("enabled")).await;

    let kubeconfig = kube::config::Kubeconfig::read_from(cluster.kubeconfig()).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("client config");
    config.auth_info.impersonate = Some(format!(
        "system:serviceaccount:{OPERATOR_NS}:remora-operator"
    ));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{OPERATOR_NS}"),
        "system:authenticated".to_owned(),
    ]);
    let as_operator = Client::try_from(config).expect("impersonating client");
    let running = operator(
        &as_operator,
        &[
            "--leader-elect=true",
            "--lease-duration=4s",
            "--lease-renew=1s",
        ],
    )
    .await;

    let bundle = ca_material(&admin).await.bundle_pem;
    wait_bundle(&admin, "meshed", &bundle, support::DEADLINE).await;
    let (chain, _) = webhook_chain(&admin).await;
    assert!(verifies(
        &bundle,
        &chain,
        "remora-webhook.remora-system.svc"
    ));
    wait_ca_bundle(&admin, &bundle, support::DEADLINE).await;
    running.stop().await;
}
