//! Every demo pod injected and Ready: `remora-init` ran, the proxy runs as a classic
//! sidecar (first container, postStart holding the app until the proxy is ready) or a
//! native one (an init container with `restartPolicy: Always`, Kubernetes ≥ 1.29), the
//! app started no earlier than the proxy, and the app's probes, rewritten to the proxy's
//! admin port, are answered by the proxy (asked here through the apiserver's pod proxy).

use std::time::Instant;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ADMIN_PORT, SHOP, ScenarioError, Shop, ensure, is_ready, name};

const PROXY: &str = "remora-proxy";
const INIT: &str = "remora-init";

fn started_at(
    statuses: Option<&Vec<ContainerStatus>>,
    container: &str,
) -> Option<k8s_openapi::jiff::Timestamp> {
    statuses?
        .iter()
        .find(|s| s.name == container)?
        .state
        .as_ref()?
        .running
        .as_ref()?
        .started_at
        .as_ref()
        .map(|t| t.0)
}

/// Checks one pod; returns (sidecar mode, probes answered, proxy→app start gap in s).
fn check_pod(shop: &Shop<'_>, p: &Pod) -> Result<(&'static str, usize, f64), ScenarioError> {
    let pod = name(p);
    let spec = p
        .spec
        .as_ref()
        .ok_or_else(|| ScenarioError::failed(format!("{pod}: no spec")))?;
    let status = p.status.as_ref();
    let inits = spec.init_containers.as_deref().unwrap_or_default();
    ensure(inits.iter().any(|c| c.name == INIT), || {
        format!("{pod}: no {INIT} init container")
    })?;
    let init_ok = status
        .and_then(|s| s.init_container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == INIT))
        .and_then(|c| c.state.as_ref()?.terminated.as_ref())
        .is_some_and(|t| t.exit_code == 0);
    ensure(init_ok, || {
        format!("{pod}: {INIT} did not complete with exit code 0")
    })?;

    let native = inits
        .iter()
        .any(|c| c.name == PROXY && c.restart_policy.as_deref() == Some("Always"));
    let (mode, proxy_started) = if native {
        (
            "native",
            started_at(
                status.and_then(|s| s.init_container_statuses.as_ref()),
                PROXY,
            ),
        )
    } else {
        ensure(
            spec.containers.first().is_some_and(|c| c.name == PROXY),
            || format!("{pod}: {PROXY} is neither a native sidecar nor the first container"),
        )?;
        let hook = spec.containers[0]
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.as_ref())
            .is_some_and(|c| c.iter().any(|a| a == "wait-ready"));
        ensure(hook, || {
            format!("{pod}: the classic sidecar has no postStart wait-ready hook")
        })?;
        (
            "classic",
            started_at(status.and_then(|s| s.container_statuses.as_ref()), PROXY),
        )
    };
    let app = spec
        .containers
        .iter()
        .find(|c| c.name != PROXY)
        .ok_or_else(|| ScenarioError::failed(format!("{pod}: no app container")))?;
    let app_started = started_at(
        status.and_then(|s| s.container_statuses.as_ref()),
        &app.name,
    );
    let gap = match (proxy_started, app_started) {
        (Some(p), Some(a)) if p <= a => (a.as_millisecond() - p.as_millisecond()) as f64 / 1000.0,
        (p, a) => {
            return Err(ScenarioError::failed(format!(
                "{pod}: the app must start after the proxy; proxy started {p:?}, app {a:?}"
            )));
        }
    };

    let mut answered = 0;
    for (kind, probe) in [
        ("readiness", app.readiness_probe.as_ref()),
        ("liveness", app.liveness_probe.as_ref()),
        ("startup", app.startup_probe.as_ref()),
    ] {
        let Some(get) = probe.and_then(|p| p.http_get.as_ref()) else {
            continue;
        };
        ensure(get.port == IntOrString::Int(i32::from(ADMIN_PORT)), || {
            format!("{pod}: the {kind} probe was not rewritten to the proxy's admin port: {get:?}")
        })?;
        let path = get.path.as_deref().unwrap_or("/");
        shop.admin_get(SHOP, pod, path).map_err(|e| {
            ScenarioError::failed(format!(
                "{pod}: the proxy did not answer the rewritten {kind} probe {path}: {e}"
            ))
        })?;
        answered += 1;
    }
    Ok((mode, answered, gap))
}

/// Runs the scenario over every pod of the demo namespace.
pub async fn run(shop: &Shop<'_>) -> Result<(), ScenarioError> {
    let t = Instant::now();
    let pods = shop.ready_pods("").await?;
    let all = shop.pods_in(SHOP, "").await?;
    ensure(pods.len() == all.len() && !pods.is_empty(), || {
        format!("{} of {} pods in {SHOP} are Ready", pods.len(), all.len())
    })?;
    let (mut probes, mut max_gap, mut modes) = (0, 0.0f64, std::collections::BTreeSet::new());
    for p in &pods {
        ensure(is_ready(p), || format!("{} not Ready", name(p)))?;
        let (mode, answered, gap) = check_pod(shop, p)?;
        modes.insert(mode);
        probes += answered;
        max_gap = max_gap.max(gap);
    }
    println!(
        "scenario injected: {} pods injected and Ready ({} sidecars), remora-init exited 0 in each, every app started after its proxy (largest gap {max_gap:.0} s, kubelet's 1 s resolution), {probes} rewritten probes answered by the proxies through the pod proxy ({:.1} s)",
        pods.len(),
        modes.into_iter().collect::<Vec<_>>().join("+"),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
