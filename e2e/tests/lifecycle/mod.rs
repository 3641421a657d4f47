//! Helpers of `node_lifecycle.rs` that work on both targets (the node in a box and an
//! external cluster): polling with a deadline, pod and container state, the manifests.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::{Api, Client};
use remora_e2e::apply::{apply_all, parse_documents};
use remora_e2e::target::Target;

/// The scenarios' namespace, labelled for injection.
pub const NS: &str = "remora-lifecycle";
/// The demo app's image (`make images`), never pulled.
pub const DEMO_IMAGE: &str = "ghcr.io/remora-mesh/remora-demo-app:0.1.0";

/// Polls `check` every 200 ms until it returns `Ok`, or panics after `timeout` with
/// `what` and the last `Err` (which says what was seen instead).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => assert!(
                start.elapsed() < timeout,
                "{what}: not after {timeout:?}; last seen: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Server-side applies multi-document YAML.
pub async fn apply_yaml(client: &Client, yaml: &str, what: &str) {
    let objects = parse_documents(yaml, what).unwrap_or_else(|e| panic!("{what}: {e}"));
    apply_all(client, &objects, false)
        .await
        .unwrap_or_else(|e| panic!("applying {what}: {e}"));
}

/// Waits until every replica of a Deployment is available.
pub async fn wait_available(client: &Client, ns: &str, name: &str, timeout: Duration) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("deployment {ns}/{name} available"),
        timeout,
        || {
            let api = api.clone();
            async move {
                let d = api.get(name).await.map_err(|e| e.to_string())?;
                let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                let have = d
                    .status
                    .as_ref()
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0);
                (have >= want)
                    .then_some(())
                    .ok_or_else(|| format!("{have}/{want} available"))
            }
        },
    )
    .await;
}

/// Every container status of a pod, init containers first.
pub fn statuses(pod: &Pod) -> Vec<ContainerStatus> {
    let s = pod.status.clone().unwrap_or_default();
    s.init_container_statuses
        .unwrap_or_default()
        .into_iter()
        .chain(s.container_statuses.unwrap_or_default())
        .collect()
}

/// The status of container `name`, among init and app containers.
pub fn status_of(pod: &Pod, name: &str) -> Option<ContainerStatus> {
    statuses(pod).into_iter().find(|c| c.name == name)
}

/// Whether the pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// One line per container: name, state, restarts — for failure messages.
pub fn describe(pod: &Pod) -> String {
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    let containers: Vec<String> = statuses(pod)
        .iter()
        .map(|c| {
            let state = c.state.clone().unwrap_or_default();
            let now = if let Some(w) = state.waiting {
                format!("waiting {}", w.reason.unwrap_or_default())
            } else if let Some(t) = state.terminated {
                format!(
                    "terminated {} {}",
                    t.exit_code,
                    t.reason.unwrap_or_default()
                )
            } else {
                "running".to_owned()
            };
            format!("{}={now} restarts={}", c.name, c.restart_count)
        })
        .collect();
    format!("{phase} [{}]", containers.join(", "))
}

/// Whether the proxy is a native sidecar (an init container) in this pod.
pub fn native_sidecar(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|i| i.iter().any(|c| c.name == "remora-proxy"))
}

/// The `kubectl` error text of a command that must fail.
pub fn kubectl_fails(target: &Target, args: &[&str]) -> String {
    match target.kubectl(args) {
        Ok(out) => panic!("kubectl {args:?} must fail, but said: {out}"),
        Err(e) => e.to_string(),
    }
}

/// The labelled namespace, an echo server (the demo app) and its Service.
pub fn namespace_and_echo() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
  labels: {{remora.dev/inject: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: {NS}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: echo
        image: {DEMO_IMAGE}
        imagePullPolicy: IfNotPresent
        args: ["serve", "--listen=0.0.0.0:8080", "--grpc-listen=off"]
        env:
        - name: POD_NAME
          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
        ports: [{{name: http, containerPort: 8080, protocol: TCP}}]
        readinessProbe: {{httpGet: {{path: /readyz, port: http}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {NS}}}
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 8080, targetPort: http, protocol: TCP}}]
"#
    )
}

/// A Job whose app sends load to the echo Service through the mesh, then stops its
/// sidecar (`--stop-proxy`: `POST /shutdown` on the proxy's admin port) and exits.
pub fn job() -> String {
    format!(
        r#"apiVersion: batch/v1
kind: Job
metadata: {{name: batch, namespace: {NS}}}
spec:
  backoffLimit: 0
  template:
    metadata: {{labels: {{app: batch}}}}
    spec:
      restartPolicy: Never
      containers:
      - name: batch
        image: {DEMO_IMAGE}
        imagePullPolicy: IfNotPresent
        args: ["load", "--url=http://echo.{NS}.svc:8080/", "--rps=20", "--duration=2s",
               "--interval=0s", "--min-success-rate=100", "--stop-proxy"]
"#
    )
}

/// A plain pod of the demo app (the webhook injects it on creation).
pub fn app_pod(name: &str, annotations: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"app": name},
            "annotations": serde_yaml::from_str::<serde_json::Value>(annotations)
                .expect("annotations YAML"),
        },
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "app",
                "image": DEMO_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "args": ["serve", "--listen=0.0.0.0:8080", "--grpc-listen=off"],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
            }],
        },
    })
}

/// Deletes the scenarios' namespace on an external cluster (the node is torn down whole),
/// also when a scenario fails.
pub struct Cleanup<'a>(pub &'a Target);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if self.0.is_external() {
            let _ = self.0.kubectl(&[
                "delete",
                "namespace",
                NS,
                "--wait=false",
                "--ignore-not-found",
            ]);
        }
    }
}

/// Scales the operator back to `replicas` when restored or dropped (also when the
/// scenario fails, so an external cluster keeps its control plane).
pub struct OperatorBack<'a> {
    pub target: &'a Target,
    pub replicas: i32,
    pub restored: bool,
}

impl OperatorBack<'_> {
    pub fn restore(&mut self) {
        if !self.restored {
            self.restored = true;
            let replicas = format!("--replicas={}", self.replicas);
            if let Err(e) = self.target.kubectl(&[
                "-n",
                "remora-system",
                "scale",
                "deployment/remora-operator",
                &replicas,
            ]) {
                eprintln!("restoring the operator failed: {e}");
            }
        }
    }
}

impl Drop for OperatorBack<'_> {
    fn drop(&mut self) {
        self.restore();
    }
}
