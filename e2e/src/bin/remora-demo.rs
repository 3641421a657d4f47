//! `make demo`: Remora's main job as far as it exists, on a real control plane on loopback.
//!
//! Starts etcd + kube-apiserver + kube-controller-manager, installs the CRDs and
//! `config/default`, runs `remora-operator` and `remora-webhook` as local processes against
//! it, applies `config/samples`, and prints what a user sees: the policies with their
//! status, the injected pods, and the interception rules. `--keep` leaves it running until
//! Ctrl-C.

use std::{process::ExitCode, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    api::{DynamicObject, ListParams},
};
use remora_crds::MeshPolicy;
use remora_e2e::{
    Cluster, HarnessError,
    apply::{apply_all, install_crds, kustomize, parse_documents, repo_root},
    components::workspace_binary,
    mesh::{register_webhook, start_operator, start_webhook, wait_listening},
};

fn step(text: &str) {
    println!("\n==> {text}");
}

fn kind(o: &DynamicObject) -> &str {
    o.types
        .as_ref()
        .map(|t| t.kind.as_str())
        .unwrap_or_default()
}

fn kubectl(cluster: &Cluster, args: &[&str]) -> Result<(), HarnessError> {
    println!("$ kubectl {}", args.join(" "));
    let out = cluster
        .kubectl()?
        .args(args)
        .output()
        .map_err(|e| HarnessError::Command {
            command: format!("kubectl {}", args.join(" ")),
            stderr: e.to_string(),
        })?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

async fn run(keep: bool) -> Result<(), HarnessError> {
    step(
        "starting a control plane on loopback (etcd, kube-apiserver 1.20, kube-controller-manager)",
    );
    let cluster = Cluster::start().await?;
    let client = cluster.client().await?;
    println!(
        "apiserver {} — run directory {}",
        cluster.api_url(),
        cluster.dir()?.display()
    );

    step("installing the mesh: config/crd, then config/default");
    install_crds(&client).await?;
    let default = parse_documents(
        &kustomize(&repo_root().join("config/default"))?,
        "config/default",
    )?;
    // The in-cluster Deployments cannot run here (no kubelet); the operator and webhook run
    // as local processes instead, and the webhook is registered by URL below.
    let install: Vec<_> = default
        .into_iter()
        .filter(|o| kind(o) != "MutatingWebhookConfiguration")
        .collect();
    for o in apply_all(&client, &install, false).await? {
        println!("applied {} {}", kind(&o), o.name_any());
    }

    step("starting remora-operator and remora-webhook as local processes");
    let mut operator = start_operator(&cluster)?;
    wait_listening(
        &mut operator.process,
        operator.admin_port,
        Duration::from_secs(30),
    )
    .await?;
    println!(
        "remora-operator: admin on 127.0.0.1:{}, certificate authority on 127.0.0.1:{} (log {})",
        operator.admin_port,
        operator.ca_port,
        operator.process.log().display()
    );
    let webhook = start_webhook(&cluster, &[]).await?;
    register_webhook(&client, &webhook.url, &webhook.ca_pem).await?;
    println!(
        "remora-webhook: {} (log {})",
        webhook.url,
        webhook.process.log().display()
    );

    step(
        "applying config/samples: a demo namespace labelled for injection, two services, a MeshPolicy, a TrafficSplit",
    );
    let samples = parse_documents(
        &kustomize(&repo_root().join("config/samples"))?,
        "config/samples",
    )?;
    for o in apply_all(&client, &samples, false).await? {
        println!("applied {} {}", kind(&o), o.name_any());
    }

    step("waiting for the operator's verdict and the injected pods");
    let policies: Api<MeshPolicy> = Api::namespaced(client.clone(), "shop");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let judged = policies
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .all(|p| p.status.as_ref().is_some_and(|s| !s.conditions.is_empty()));
        let pod_count = pods.list(&ListParams::default()).await?.items.len();
        if judged && pod_count >= 4 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            println!(
                "(not everything settled within 60 s: policies judged: {judged}, pods: {pod_count})"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    kubectl(
        &cluster,
        &["get", "meshpolicies,trafficsplits", "-n", "shop"],
    )?;
    kubectl(
        &cluster,
        &[
            "get",
            "pods",
            "-n",
            "shop",
            "-o",
            "custom-columns=POD:.metadata.name,INIT:.spec.initContainers[*].name,CONTAINERS:.spec.containers[*].name,INJECTED:.metadata.annotations.remora\\.dev/injected",
        ],
    )?;

    step("the interception rules remora-init installs in each pod (remora-init --dry-run)");
    let out = std::process::Command::new(workspace_binary("remora-init")?)
        .arg("--dry-run")
        .output()
        .map_err(|e| HarnessError::Command {
            command: "remora-init --dry-run".to_owned(),
            stderr: e.to_string(),
        })?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    if keep {
        step("running; Ctrl-C stops everything");
        println!("export KUBECONFIG={}", cluster.kubeconfig().display());
        let _ = tokio::signal::ctrl_c().await;
    }
    step("stopping every process");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let keep = std::env::args().skip(1).any(|a| a == "--keep");
    match run(keep).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remora-demo: {e}");
            ExitCode::FAILURE
        }
    }
}
