//! One look at the demo namespace, once a second: every meshed pod's proxy metrics
//! (`/metrics` on the proxy's admin port, read through the apiserver's pod proxy, so the
//! same code works for a node in a box and any cluster a kubeconfig reaches), and the
//! loadgen's latest report from its log.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ListParams, LogParams},
};

use crate::prom::{self, Samples};

/// The container the webhook injects and its admin port (`remora-admin`).
const PROXY_CONTAINER: &str = "remora-proxy";
const ADMIN_PORT_NAME: &str = "remora-admin";
const DEFAULT_ADMIN_PORT: i32 = 15020;
/// The samples' load generator: its Deployment's `app` label and container.
pub const LOADGEN: &str = "loadgen";

/// A meshed pod and what its proxy reported.
#[derive(Debug, Clone, PartialEq)]
pub struct PodMetrics {
    pub pod: String,
    /// The `version` label (the samples label every Deployment with one).
    pub version: String,
    pub service_account: String,
    pub samples: Samples,
}

/// The loadgen's latest interval report (`{"kind":"interval",...}` in its log).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadgenReport {
    pub pod: String,
    pub requests: u64,
    pub success_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub by_pod: Vec<(String, u64)>,
}

/// One scrape of the namespace.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// Seconds since the summary started (monotonic), when the scrape began.
    pub t: f64,
    /// Wall clock then, unix seconds.
    pub unix: i64,
    pub pods: Vec<PodMetrics>,
    pub loadgen: Option<LoadgenReport>,
    /// What could not be read (a pod's metrics, the log), to show, not to hide.
    pub errors: Vec<String>,
}

impl Snapshot {
    pub fn pod(&self, name: &str) -> Option<&PodMetrics> {
        self.pods.iter().find(|p| p.pod == name)
    }
}

fn admin_port(pod: &Pod) -> Option<i32> {
    let proxy = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == PROXY_CONTAINER)?;
    Some(
        proxy
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(ADMIN_PORT_NAME))
            .map_or(DEFAULT_ADMIN_PORT, |p| p.container_port),
    )
}

fn running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && pod.metadata.deletion_timestamp.is_none()
}

/// Reads every running meshed pod of `ns` (and the loadgen's log) once.
pub async fn scrape(client: &Client, ns: &str, started: Instant) -> Snapshot {
    let t = started.elapsed().as_secs_f64();
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut snap = Snapshot {
        t,
        unix,
        ..Snapshot::default()
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pods = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => {
            snap.errors.push(format!("listing pods in {ns}: {e}"));
            return snap;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for pod in pods.iter().filter(|p| running(p)) {
        let Some(port) = admin_port(pod) else {
            continue;
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let version = labels.get("version").cloned().unwrap_or_default();
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default();
        let (client, ns) = (client.clone(), ns.to_owned());
        tasks.spawn(async move {
            let path = format!("/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy/metrics");
            let text = metrics_text(&client, &path).await;
            let parsed = text.and_then(|t| prom::parse(&t).map_err(|e| e.to_string()));
            parsed
                .map(|samples| PodMetrics {
                    pod: name.clone(),
                    version,
                    service_account,
                    samples,
                })
                .map_err(|e| format!("{name}: {e}"))
        });
    }
    if let Some(loadgen) = pods.iter().find(|p| {
        running(p)
            && p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app"))
                .is_some_and(|a| a == LOADGEN)
    }) {
        let name = loadgen.metadata.name.clone().unwrap_or_default();
        let params = LogParams {
            container: Some(LOADGEN.to_owned()),
            tail_lines: Some(20),
            ..LogParams::default()
        };
        match api.logs(&name, &params).await {
            Ok(log) => snap.loadgen = last_interval_report(&name, &log),
            Err(e) => snap.errors.push(format!("{name}'s log: {e}")),
        }
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(p)) => snap.pods.push(p),
            Ok(Err(e)) => snap.errors.push(e),
            Err(e) => snap.errors.push(format!("a scrape task failed: {e}")),
        }
    }
    snap.pods.sort_by(|a, b| a.pod.cmp(&b.pod));
    snap
}

async fn metrics_text(client: &Client, path: &str) -> Result<String, String> {
    let request = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(3), client.request_text(request))
        .await
        .map_err(|_| "metrics: no answer within 3 s".to_owned())?
        .map_err(|e| format!("metrics: {e}"))
}

/// The last `{"kind":"interval","summary":{...}}` line of the load client's output.
pub fn last_interval_report(pod: &str, log: &str) -> Option<LoadgenReport> {
    log.lines().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
        if v.get("kind")?.as_str()? != "interval" {
            return None;
        }
        let s = v.get("summary")?;
        let f = |k: &str| s.get(k).and_then(serde_json::Value::as_f64);
        Some(LoadgenReport {
            pod: pod.to_owned(),
            requests: s.get("requests")?.as_u64()?,
            success_rate: f("success_rate")?,
            p50_ms: f("p50_ms")?,
            p99_ms: f("p99_ms")?,
            by_pod: s
                .get("by_pod")
                .and_then(serde_json::Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, n)| Some((k.clone(), n.as_u64()?)))
                        .collect()
                })
                .unwrap_or_default(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_interval_line_of_the_load_client_is_read() {
        let log = r#"[   5.0s] 100 req, 100.00 % ok, p50 1.2 ms, p99 3.0 ms | a=60 b=40
{"kind":"interval","t":5.0,"summary":{"requests":100,"ok":100,"failed":0,"success_rate":100.0,"p50_ms":1.2,"p90_ms":2.0,"p99_ms":3.0,"max_ms":4.0,"by_pod":{"a":60,"b":40},"by_status":{"200":100},"errors":{},"skipped":0}}
{"kind":"interval","t":10.0,"summary":{"requests":98,"ok":97,"failed":1,"success_rate":98.97,"p50_ms":1.1,"p90_ms":2.0,"p99_ms":2.5,"max_ms":4.0,"by_pod":{"a":50,"b":47},"by_status":{"200":97,"503":1},"errors":{},"skipped":0}}
[  10.0s] 98 req, 98.97 % ok, p50 1.1 ms, p99 2.5 ms | a=50 b=47 | failed: 503=1
"#;
        let r = last_interval_report("loadgen-x", log).expect("a report");
        assert_eq!(
            r,
            LoadgenReport {
                pod: "loadgen-x".into(),
                requests: 98,
                success_rate: 98.97,
                p50_ms: 1.1,
                p99_ms: 2.5,
                by_pod: vec![("a".into(), 50), ("b".into(), 47)],
            }
        );
        assert_eq!(last_interval_report("x", "starting\nnot json {\n"), None);
    }
}
