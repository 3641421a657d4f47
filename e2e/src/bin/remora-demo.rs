//! `make demo`: Remora's main job as far as it exists, on a real control plane on loopback.
//!
//! Starts etcd + kube-apiserver + kube-controller-manager, installs the CRDs and
//! `config/default`, runs `remora-operator` and `remora-webhook` as local processes against
//! it, applies `config/samples`, and prints what a user sees: the policies with their
//! status, the injected pods, a `remora-proxy` in Kubernetes mode for the frontend pod
//! (certified by the operator, its inbound config streamed), and the interception rules.
//! `--keep` leaves it running until Ctrl-C.

use std::{
    net::SocketAddr,
    process::{Command, ExitCode},
    time::Duration,
};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    Api, ResourceExt,
    api::{DynamicObject, ListParams},
};
use remora_crds::MeshPolicy;
use remora_e2e::{
    Cluster, HarnessError,
    apply::{apply_all, install_crds, kustomize, parse_documents, repo_root},
    cluster::free_ports,
    components::{Process, http_get, workspace_binary},
    mesh::{
        register_webhook, service_account_token, start_operator, start_webhook, wait_listening,
    },
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

    step("remora-proxy for a frontend pod, in Kubernetes mode (what the injected sidecar runs)");
    let (_proxy, report) = start_pod_proxy(&cluster, &client, operator.ca_port).await?;
    print!("{report}");

    step("the interception rules remora-init installs in each pod (remora-init --dry-run)");
    let out = Command::new(workspace_binary("remora-init")?)
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

/// Runs `remora-proxy` as the frontend pod's sidecar would run it, with the flags the
/// webhook injects (as environment) pointed at the local operator: a projected-style token
/// from the TokenRequest API and the trust bundle the operator published into the
/// namespace. Returns what a user would look at: readiness, identity, the config received.
async fn start_pod_proxy(
    cluster: &Cluster,
    client: &kube::Client,
    ca_port: u16,
) -> Result<(Process, String), HarnessError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let pod = loop {
        let found = pods
            .list(&ListParams::default().labels("app=frontend"))
            .await?
            .items
            .into_iter()
            .next();
        match found {
            Some(p) => break p,
            None if tokio::time::Instant::now() > deadline => {
                return Err(HarnessError::Missing {
                    what: "a frontend pod in namespace shop".to_owned(),
                    how: "the frontend Deployment of config/samples creates it".to_owned(),
                });
            }
            None => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    let dir = cluster.dir()?.join("frontend-proxy");
    let io = |what: String| {
        move |e: std::io::Error| HarnessError::Command {
            command: what.clone(),
            stderr: e.to_string(),
        }
    };
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let token = service_account_token(client, "shop", "frontend", "remora", 3600).await?;
    std::fs::write(dir.join("token"), token).map_err(io("writing the token".to_owned()))?;
    let bundles: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let bundle = loop {
        let published = bundles
            .get_opt("remora-trust-bundle")
            .await?
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("ca.crt").cloned());
        match published {
            Some(b) => break b,
            None if tokio::time::Instant::now() > deadline => {
                return Err(HarnessError::Missing {
                    what: "ConfigMap shop/remora-trust-bundle".to_owned(),
                    how: "the operator publishes it into namespaces labelled for injection"
                        .to_owned(),
                });
            }
            None => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    std::fs::write(dir.join("ca.crt"), bundle).map_err(io("writing the bundle".to_owned()))?;
    let [outbound, inbound, admin] = free_ports::<3>()?;
    let path = |f: &str| dir.join(f).display().to_string();
    let mut process = Process::start(
        "remora-proxy-frontend",
        &workspace_binary("remora-proxy")?,
        &[] as &[&str],
        &[
            (
                "REMORA_PROXY_OUTBOUND_LISTEN",
                format!("127.0.0.1:{outbound}"),
            ),
            (
                "REMORA_PROXY_INBOUND_LISTEN",
                format!("127.0.0.1:{inbound}"),
            ),
            ("REMORA_PROXY_ADMIN_LISTEN", format!("127.0.0.1:{admin}")),
            ("REMORA_PROXY_OPERATOR_ADDR", format!("127.0.0.1:{ca_port}")),
            (
                "REMORA_PROXY_OPERATOR_SERVER_NAME",
                "remora-operator.remora-system.svc".to_owned(),
            ),
            ("REMORA_PROXY_TOKEN_FILE", path("token")),
            ("REMORA_PROXY_TRUST_BUNDLE_FILE", path("ca.crt")),
            ("REMORA_PROXY_POD_NAME", pod.name_any()),
            ("REMORA_PROXY_POD_NAMESPACE", "shop".to_owned()),
            ("REMORA_PROXY_SERVICE_ACCOUNT", "frontend".to_owned()),
        ],
        cluster.dir()?,
    )?;
    let ready = Command::new(workspace_binary("remora-proxy")?)
        .args([
            "wait-ready",
            "--timeout=30s",
            &format!("--admin=127.0.0.1:{admin}"),
        ])
        .output()
        .map_err(io("remora-proxy wait-ready".to_owned()))?;
    process.check_running()?;
    let mut out = format!(
        "pod shop/{} — proxy admin on 127.0.0.1:{admin} (log {})\n$ remora-proxy wait-ready → {}\n",
        pod.name_any(),
        process.log().display(),
        if ready.status.success() {
            "ready: certificate and inbound config are in"
        } else {
            "NOT ready"
        },
    );
    let get = |path: &'static str| async move {
        http_get(SocketAddr::from(([127, 0, 0, 1], admin)), path)
            .await
            .map(|(_, body)| body)
            .map_err(|stderr| HarnessError::Command {
                command: format!("GET 127.0.0.1:{admin}{path}"),
                stderr,
            })
    };
    let metrics = get("/metrics").await?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("remora_proxy_certificate_renewals_total")
            || l.starts_with("remora_proxy_config_version")
            || l.starts_with("remora_proxy_control_subscriptions")
    }) {
        out.push_str(&format!("  {line}\n"));
    }
    let dump = get("/config_dump").await?;
    out.push_str("$ curl 127.0.0.1:ADMIN/config_dump (the inbound config the operator streamed)\n");
    for line in dump.lines().take(20) {
        out.push_str(&format!("  {line}\n"));
    }
    // The proxy stops with the demo (its Process is killed when dropped).
    Ok((process, out))
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
