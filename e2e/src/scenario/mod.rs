//! The mesh's end-to-end scenarios (issue 12, item 4: traffic), run against a
//! [`Target`]: the node in a box, or an existing cluster with Remora and the samples
//! installed (the kind tier). Everything goes through what both offer: the API (a
//! client and `kubectl`), `kubectl exec` into meshed pods for load, and the apiserver's
//! pod proxy for the proxies' metrics and rewritten probes. The one node-only part, the
//! packet capture on the pod bridge, says so in its output.
//!
//! Each scenario prints `scenario <name>: <figures>` and returns an error saying what was
//! wrong; the test calls them in order against one cluster ([`setup`] first).

pub mod capture;
pub mod churn;
pub mod injected;
pub mod load;
pub mod prom;
pub mod traffic;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Endpoints, Pod};
use kube::{Api, api::ListParams};

use crate::target::Target;
use crate::{HarnessError, apply::repo_root, prereqs};

/// The demo namespace of `config/samples`.
pub const SHOP: &str = "shop";
/// The proxy's admin port (metrics, readiness, rewritten probes).
pub const ADMIN_PORT: u16 = 15020;
/// The SPIFFE identity of a `shop` service account.
pub fn identity(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{SHOP}/sa/{sa}")
}

/// Why a scenario failed.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Harness(#[from] HarnessError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Failed(String),
}

impl ScenarioError {
    pub fn failed(what: impl Into<String>) -> Self {
        Self::Failed(what.into())
    }
}

/// Fails with `what` unless `ok`.
pub fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), ScenarioError> {
    if ok {
        Ok(())
    } else {
        Err(ScenarioError::Failed(what()))
    }
}

/// The cluster and namespace the scenarios share.
pub struct Shop<'a> {
    target: &'a Target,
    client: kube::Client,
}

impl std::fmt::Debug for Shop<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shop")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// A caller outside the frontend's identity: the namespace's `default` service account,
/// serving so that `kubectl exec` has a container to run load from.
const OUTSIDER: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: outsider, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: outsider}}
  template:
    metadata: {labels: {app: outsider, version: v1}}
    spec:
      serviceAccountName: default
      containers:
      - name: outsider
        image: ghcr.io/remora-mesh/remora-demo-app:0.1.0
        imagePullPolicy: IfNotPresent
        args: ["serve", "--listen=0.0.0.0:8080", "--grpc-listen=off"]
        env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        ports:
        - {name: http, containerPort: 8080, protocol: TCP}
        readinessProbe:
          httpGet: {path: /readyz, port: http}
          periodSeconds: 2
        resources:
          requests: {cpu: 10m, memory: 8Mi}
          limits: {memory: 64Mi}
"#;

/// The deployments the scenarios need Ready.
const DEPLOYMENTS: [&str; 4] = ["frontend", "reviews-v1", "reviews-v2", "outsider"];

impl<'a> Shop<'a> {
    pub async fn new(target: &'a Target) -> Result<Self, ScenarioError> {
        Ok(Self {
            target,
            client: target.client().await?,
        })
    }

    pub fn target(&self) -> &Target {
        self.target
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// `kubectl <args>`; its stdout.
    pub fn kubectl<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String, ScenarioError> {
        Ok(self.target.kubectl(args)?)
    }

    /// A `kubectl` command pointed at the cluster, to spawn.
    pub fn kubectl_command(&self) -> Result<Command, ScenarioError> {
        let mut cmd = Command::new(prereqs::kubectl()?);
        cmd.arg(format!(
            "--kubeconfig={}",
            self.target.kubeconfig()?.display()
        ));
        Ok(cmd)
    }

    /// The node's network namespace (`/run/netns/<name>`); `None` on an external cluster.
    pub fn node_netns(&self) -> Option<PathBuf> {
        match self.target {
            Target::Node(n) => Some(PathBuf::from("/run/netns").join(n.name())),
            Target::External(_) => None,
        }
    }

    /// The pods of `ns` matching `selector` that are not being deleted.
    pub async fn pods_in(&self, ns: &str, selector: &str) -> Result<Vec<Pod>, ScenarioError> {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let params = if selector.is_empty() {
            ListParams::default()
        } else {
            ListParams::default().labels(selector)
        };
        let list = api.list(&params).await?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect())
    }

    /// The Ready `shop` pods matching `selector`, by name.
    pub async fn ready_pods(&self, selector: &str) -> Result<Vec<Pod>, ScenarioError> {
        let mut pods: Vec<Pod> = self
            .pods_in(SHOP, selector)
            .await?
            .into_iter()
            .filter(is_ready)
            .collect();
        pods.sort_by(|a, b| name(a).cmp(name(b)));
        Ok(pods)
    }

    /// One Ready `shop` pod matching `selector`.
    pub async fn ready_pod(&self, selector: &str) -> Result<Pod, ScenarioError> {
        self.ready_pods(selector)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ScenarioError::failed(format!("no Ready pod in {SHOP} with {selector}")))
    }

    /// The zone label (`topology.kubernetes.io/zone`) of the node a pod runs on.
    pub async fn zone_of(&self, pod: &Pod) -> Result<Option<String>, ScenarioError> {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
            return Ok(None);
        };
        let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client());
        Ok(api
            .get(node)
            .await?
            .metadata
            .labels
            .and_then(|l| l.get("topology.kubernetes.io/zone").cloned()))
    }

    /// The ClusterIP of a `shop` Service.
    pub fn cluster_ip(&self, service: &str) -> Result<String, ScenarioError> {
        let ip = self.kubectl(&[
            "-n",
            SHOP,
            "get",
            "service",
            service,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])?;
        ensure(ip.parse::<Ipv4Addr>().is_ok(), || {
            format!("service {service} has no IPv4 ClusterIP: {ip:?}")
        })?;
        Ok(ip)
    }

    /// `GET <path>` on a pod's proxy admin port through the apiserver's pod proxy.
    pub fn admin_get(&self, ns: &str, pod: &str, path: &str) -> Result<String, ScenarioError> {
        self.kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/{ns}/pods/{pod}:{ADMIN_PORT}/proxy{path}"),
        ])
    }

    /// A `shop` pod's proxy metrics.
    pub fn metrics(&self, pod: &str) -> Result<prom::Metrics, ScenarioError> {
        Ok(prom::Metrics::parse(
            &self.admin_get(SHOP, pod, "/metrics")?,
        ))
    }

    /// The ready addresses of a `shop` Service's Endpoints.
    pub async fn ready_addresses(&self, service: &str) -> Result<Vec<String>, ScenarioError> {
        let api: Api<Endpoints> = Api::namespaced(self.client(), SHOP);
        let ep = api.get_opt(service).await?;
        Ok(ep
            .and_then(|e| e.subsets)
            .unwrap_or_default()
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .map(|a| a.ip.clone())
            .collect())
    }

    /// `kubectl rollout status` of a Deployment.
    pub fn rollout_status(
        &self,
        ns: &str,
        deployment: &str,
        timeout: Duration,
    ) -> Result<(), ScenarioError> {
        self.kubectl(&[
            "-n",
            ns,
            "rollout",
            "status",
            &format!("deployment/{deployment}"),
            &format!("--timeout={}s", timeout.as_secs()),
        ])
        .map(|_| ())
    }

    /// Runs load from a `shop` pod's app container to the end.
    pub fn load(
        &self,
        pod: &str,
        container: &str,
        spec: &load::LoadSpec,
    ) -> Result<load::LoadReport, ScenarioError> {
        load::run(self.kubectl_command()?, SHOP, pod, container, spec)
    }

    /// Starts load from a `shop` pod's app container.
    pub fn start_load(
        &self,
        pod: &str,
        container: &str,
        spec: &load::LoadSpec,
    ) -> Result<load::RunningLoad, ScenarioError> {
        load::start(self.kubectl_command()?, SHOP, pod, container, spec)
    }
}

/// A pod's name.
pub fn name(p: &Pod) -> &str {
    p.metadata.name.as_deref().unwrap_or_default()
}

/// A pod's IPv4 address.
pub fn pod_ip(p: &Pod) -> Result<Ipv4Addr, ScenarioError> {
    let ip = p
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default();
    ip.parse()
        .map_err(|_| ScenarioError::failed(format!("pod {} has no IPv4 address ({ip:?})", name(p))))
}

/// Whether a pod's Ready condition is true.
pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Makes the cluster ready for the scenarios: on the node, Remora from `config/default`
/// and the samples (an external cluster has both); on both, the outsider caller, the
/// samples' background loadgen scaled to 0 (the scenarios count every answer they cause
/// and stay under reviews' per-identity rate limit), and every demo Deployment Ready.
pub async fn setup(target: &Target) -> Result<(), ScenarioError> {
    let start = Instant::now();
    let mut figures = Vec::new();
    if let Target::Node(node) = target {
        let installed = node.install_remora(Duration::from_secs(180)).await?;
        figures.push(format!(
            "images imported {:.1} s, operator and webhook Ready with caBundle {:.1} s after apply -k config/default",
            installed.import.as_secs_f64(),
            installed.ready.as_secs_f64()
        ));
        let samples = repo_root().join("config/samples");
        target.kubectl(&["apply", "-k", &samples.display().to_string()])?;
    }
    let applied = Instant::now();
    let dir = tempfile::tempdir().map_err(|e| ScenarioError::failed(format!("tempdir: {e}")))?;
    let outsider = dir.path().join("outsider.yaml");
    std::fs::write(&outsider, OUTSIDER)
        .map_err(|e| ScenarioError::failed(format!("writing {}: {e}", outsider.display())))?;
    target.kubectl(&["apply", "-f", &outsider.display().to_string()])?;
    target.kubectl(&["-n", SHOP, "scale", "deployment/loadgen", "--replicas=0"])?;
    let shop = Shop::new(target).await?;
    for d in DEPLOYMENTS {
        shop.rollout_status(SHOP, d, Duration::from_secs(180))?;
    }
    figures.push(format!(
        "demo pods and the outsider Ready {:.1} s after apply",
        applied.elapsed().as_secs_f64()
    ));
    println!(
        "setup ({:.1} s): {}",
        start.elapsed().as_secs_f64(),
        figures.join("; ")
    );
    Ok(())
}

/// Puts an external cluster back as `make kind-e2e` left it (other tests may follow);
/// the node is torn down instead.
pub fn restore(target: &Target) -> Result<(), ScenarioError> {
    if !target.is_external() {
        return Ok(());
    }
    target.kubectl(&[
        "-n",
        SHOP,
        "delete",
        "deployment/outsider",
        "--ignore-not-found",
    ])?;
    target.kubectl(&["-n", SHOP, "scale", "deployment/reviews-v1", "--replicas=2"])?;
    target.kubectl(&["-n", SHOP, "scale", "deployment/loadgen", "--replicas=1"])?;
    target.kubectl(&[
        "-n",
        "remora-system",
        "set",
        "env",
        "deployment/remora-operator",
        "REMORA_CERT_TTL-",
    ])?;
    Ok(())
}
