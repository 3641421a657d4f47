//! Bringing the demo up, phase by phase, each timed and printed: the node, Remora
//! installed as users install it (images imported, `kubectl apply -k config/default`),
//! then `kubectl apply -k config/samples` and every demo Deployment available.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{Api, api::ListParams};
use remora_e2e::{HarnessError, Node, NodeOptions, apply::repo_root, node::install};

use crate::{DemoError, signals::Shutdown};

/// The samples' namespace (config/samples/demo-namespace.yaml).
pub const NAMESPACE: &str = "shop";
/// How long each wait may take (a cold containerd and the first pods are the slow part).
const TIMEOUT: Duration = Duration::from_secs(180);
/// The target: node up, Remora installed and the demo pods Ready.
const TARGET: Duration = Duration::from_secs(90);
/// Set by `make demo` to when make started (nanoseconds since the epoch), so the total
/// includes building the images and the demo.
const MAKE_STARTED_ENV: &str = "REMORA_DEMO_MAKE_STARTED_NS";

/// When the demo started, for the `[  12.3 s]` stamps.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Self {
        Self(Instant::now())
    }

    pub fn step(&self, text: &str) {
        println!("==> [{:6.1} s] {text}", self.0.elapsed().as_secs_f64());
    }
}

/// How long each phase took.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    pub node: Duration,
    pub import: Duration,
    pub install: Duration,
    pub pods: Duration,
}

/// Starts the node; a signal during start-up stops what was started.
pub async fn start_node(clock: &Clock, shutdown: &mut Shutdown) -> Result<Node, DemoError> {
    // A missing image fails now, not after half a minute of node start-up.
    let images = install::images_dir();
    if let Some(name) = install::IMAGES
        .iter()
        .find(|n| !images.join(format!("{n}.tar")).is_file())
    {
        return Err(HarnessError::Missing {
            what: format!("the {name} image (no {name}.tar in {})", images.display()),
            how: "build the images first: `make images` (make demo does)".to_owned(),
        }
        .into());
    }
    clock.step(
        "starting a Kubernetes 1.20 node: etcd, kube-apiserver, controller-manager, scheduler, containerd, kubelet and kube-proxy in a network namespace of their own",
    );
    let node = tokio::select! {
        node = Node::start_with(NodeOptions::default()) => node?,
        // Dropping the start-up future drops the half-built node, which tears it down.
        signal = shutdown.wait() => return Err(DemoError::Interrupted(signal)),
    };
    println!(
        "    node Ready in {:.1} s (network namespace {}, run directory {})",
        node.started_in().as_secs_f64(),
        node.name(),
        node.run_dir().display()
    );
    Ok(node)
}

/// Installs Remora and the samples and waits for the demo pods.
pub async fn install(node: &Node, clock: &Clock) -> Result<Phases, DemoError> {
    clock.step(
        "installing Remora as users do: its image tarballs imported into containerd, kubectl apply -k config/default",
    );
    let installed = node.install_remora(TIMEOUT).await?;
    println!(
        "    images imported in {:.1} s; operator and webhook Ready, webhook caBundle set {:.1} s after kubectl apply",
        installed.import.as_secs_f64(),
        installed.ready.as_secs_f64()
    );

    clock.step("kubectl apply -k config/samples: the shop namespace, labelled for injection");
    let applied = Instant::now();
    let samples = repo_root().join("config/samples");
    let out = node.kubectl(&["apply", "-k", &samples.display().to_string()])?;
    for line in out.lines() {
        println!("    {line}");
    }
    let client = node.client().await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let names: Vec<String> = deployments
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|d| d.metadata.name)
        .collect();
    if names.is_empty() {
        return Err(DemoError::Setup(format!(
            "config/samples created no Deployment in namespace {NAMESPACE}"
        )));
    }
    for name in &names {
        node.wait_deployment(NAMESPACE, name, TIMEOUT).await?;
    }
    let pods = applied.elapsed();
    println!(
        "    {} Ready {:.1} s after kubectl apply:",
        names.join(", "),
        pods.as_secs_f64()
    );
    let list = Api::<Pod>::namespaced(client, NAMESPACE)
        .list(&ListParams::default())
        .await?;
    for p in &list.items {
        let spec = p.spec.clone().unwrap_or_default();
        let names = |cs: &[k8s_openapi::api::core::v1::Container]| {
            cs.iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "      {} {} · init: {} · containers: {}",
            p.metadata.name.as_deref().unwrap_or_default(),
            p.status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .unwrap_or("-"),
            names(spec.init_containers.as_deref().unwrap_or_default()),
            names(&spec.containers),
        );
    }
    Ok(Phases {
        node: node.started_in(),
        import: installed.import,
        install: installed.import + installed.ready,
        pods,
    })
}

/// The line saying how long the whole bring-up took, against the 90 s target.
pub fn report(phases: &Phases, clock: &Clock) -> String {
    let total = clock.0.elapsed();
    let since_make = std::env::var(MAKE_STARTED_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u128>().ok())
        .and_then(|started| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .ok()?
                .as_nanos();
            now.checked_sub(started)
        })
        .map(|ns| Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)));
    let overall = since_make.unwrap_or(total);
    format!(
        "up: node {:.1} s + Remora {:.1} s (images {:.1} s) + demo pods {:.1} s = {:.1} s in remora-demo{}; target {} s: {}",
        phases.node.as_secs_f64(),
        phases.install.as_secs_f64(),
        phases.import.as_secs_f64(),
        phases.pods.as_secs_f64(),
        total.as_secs_f64(),
        since_make
            .map(|d| format!(
                ", {:.1} s since `make demo` started (prerequisites, images and build included)",
                d.as_secs_f64()
            ))
            .unwrap_or_default(),
        TARGET.as_secs(),
        if overall <= TARGET { "met" } else { "MISSED" },
    )
}
