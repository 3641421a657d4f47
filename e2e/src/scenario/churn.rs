//! The mesh while the cluster changes under load: a pod deleted while serving, a
//! Deployment scaled down, the operator pod deleted, and certificates with a short
//! lifetime rotating. Load runs from the frontend pod with 250 ms windows whose lines
//! the host stamps on arrival, so "the last answer from a pod" is known to one window.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

use super::load::{LoadReport, LoadSpec, RunningLoad};
use super::{SHOP, ScenarioError, Shop, ensure, name, pod_ip};

const WINDOW: Duration = Duration::from_millis(250);
const OPERATOR_NS: &str = "remora-system";
const OPERATOR: &str = "remora-operator";

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn start_frontend_load(
    shop: &Shop<'_>,
    rps: u32,
    duration: Duration,
) -> Result<(Pod, RunningLoad), ScenarioError> {
    let frontend = shop.ready_pod("app=frontend").await?;
    let url = format!("http://{}:9080/api/reviews", shop.cluster_ip("reviews")?);
    let load = shop.start_load(
        name(&frontend),
        "frontend",
        &LoadSpec::new(url, rps, duration).interval(WINDOW),
    )?;
    Ok((frontend, load))
}

/// Waits until `ip` is no longer a ready address of the reviews Endpoints.
async fn left_endpoints(
    shop: &Shop<'_>,
    ip: &str,
    timeout: Duration,
) -> Result<Instant, ScenarioError> {
    let start = Instant::now();
    loop {
        if !shop
            .ready_addresses("reviews")
            .await?
            .iter()
            .any(|a| a == ip)
        {
            return Ok(Instant::now());
        }
        if start.elapsed() > timeout {
            return Err(ScenarioError::failed(format!(
                "{ip} still a ready address of {SHOP}/reviews {} s later",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn no_failures(what: &str, r: &LoadReport) -> Result<(), ScenarioError> {
    ensure(r.summary.failed == 0 && r.summary.ok > 0, || {
        format!("{what}: {}", r.summary.line())
    })
}

/// A reviews-v1 pod deleted while it serves: its proxy and app drain, the client's
/// proxy stops choosing it, and no request fails.
pub async fn drain(shop: &Shop<'_>) -> Result<(), ScenarioError> {
    let t = Instant::now();
    let v1 = shop.ready_pods("app=reviews,version=v1").await?;
    ensure(v1.len() >= 2, || {
        format!("want 2 ready reviews-v1 pods, have {}", v1.len())
    })?;
    let victim = &v1[0];
    let (victim_name, victim_ip) = (name(victim).to_owned(), pod_ip(victim)?.to_string());
    let (_, load) = start_frontend_load(shop, 80, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deleted = Instant::now();
    shop.kubectl(&["-n", SHOP, "delete", "pod", &victim_name, "--wait=false"])?;
    let gone = left_endpoints(shop, &victim_ip, Duration::from_secs(15)).await?;
    let r = load.finish()?;
    no_failures(&format!("load while {victim_name} was deleted"), &r)?;
    let served = r.summary.by_pod.get(&victim_name).copied().unwrap_or(0);
    let last = r.last_answer_from(&victim_name);
    let before = r.windows.iter().filter(|w| w.seen < deleted).count();
    ensure(served > 0 && before > 0, || {
        format!(
            "{victim_name} served nothing before its deletion: {:?}",
            r.summary.by_pod
        )
    })?;
    let exits = exits(shop, &victim_name).await?;
    let replaced = Instant::now();
    shop.rollout_status(SHOP, "reviews-v1", Duration::from_secs(120))?;
    println!(
        "scenario drain: {victim_name} deleted under 80 req/s: {}; it answered {served} (last {} after the delete), left the Endpoints {:.1} s after the delete; its containers {:.0} s after the delete: {exits}; replacement rollout done {:.1} s after the load ({:.1} s)",
        r.summary.line(),
        last.map_or("never".to_owned(), |l| format!(
            "{:.2} s",
            secs(l.saturating_duration_since(deleted))
        )),
        secs(gone - deleted),
        secs(replaced.saturating_duration_since(deleted)),
        secs(replaced.elapsed()),
        secs(t.elapsed())
    );
    Ok(())
}

/// How a deleted pod's containers ended (a pod object may outlive them by 8–50 s on
/// kubelet 1.20, or be gone already); a container that exited did so with status 0.
async fn exits(shop: &Shop<'_>, pod: &str) -> Result<String, ScenarioError> {
    let api: kube::Api<Pod> = kube::Api::namespaced(shop.client(), SHOP);
    let Some(p) = api.get_opt(pod).await? else {
        return Ok("pod object gone".to_owned());
    };
    let mut states = Vec::new();
    for c in p
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
    {
        let state = match c.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            Some(t) => {
                ensure(t.exit_code == 0, || {
                    format!(
                        "{pod}: {} exited {} ({}) when deleted, want a clean drain",
                        c.name,
                        t.exit_code,
                        t.reason.clone().unwrap_or_default()
                    )
                })?;
                "exited 0".to_owned()
            }
            None => "still running".to_owned(),
        };
        states.push(format!("{} {state}", c.name));
    }
    Ok(states.join(", "))
}

/// reviews-v1 scaled from 2 to 1 under load: the removed pod gets no more requests
/// within 5 s of the scale (what a user does and sees; the pod object itself lingers for
/// 8–50 s on kubelet 1.20, so it is not the mark), and none fails.
pub async fn scale_down(shop: &Shop<'_>) -> Result<(), ScenarioError> {
    let t = Instant::now();
    let before: Vec<String> = shop
        .ready_pods("app=reviews,version=v1")
        .await?
        .iter()
        .map(|p| name(p).to_owned())
        .collect();
    ensure(before.len() == 2, || {
        format!("want 2 ready reviews-v1 pods, have {before:?}")
    })?;
    let (_, load) = start_frontend_load(shop, 80, Duration::from_secs(9)).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let scaled = Instant::now();
    shop.kubectl(&["-n", SHOP, "scale", "deployment/reviews-v1", "--replicas=1"])?;
    // The ReplicaSet picks the pod to remove: the one now marked for deletion.
    let api: kube::Api<Pod> = kube::Api::namespaced(shop.client(), SHOP);
    let (victim, victim_ip) = loop {
        let mut found = None;
        for n in &before {
            if let Some(p) = api.get_opt(n).await?
                && p.metadata.deletion_timestamp.is_some()
            {
                found = Some((n.clone(), pod_ip(&p)?.to_string()));
            }
        }
        if let Some(f) = found {
            break f;
        }
        ensure(scaled.elapsed() < Duration::from_secs(10), || {
            format!("no reviews-v1 pod of {before:?} marked for deletion 10 s after the scale")
        })?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let gone = left_endpoints(shop, &victim_ip, Duration::from_secs(15)).await?;
    let r = load.finish()?;
    let last = r.last_answer_from(&victim).ok_or_else(|| {
        ScenarioError::failed(format!(
            "{victim} answered nothing during the load: {:?}",
            r.summary.by_pod
        ))
    })?;
    let stop_after = last.saturating_duration_since(scaled);
    ensure(stop_after <= Duration::from_secs(5), || {
        format!(
            "{victim} still answered {:.2} s after the scale-down (want ≤ 5 s)",
            secs(stop_after)
        )
    })?;
    // Windows ending well after the last answer show the load went on without it.
    ensure(
        r.windows
            .last()
            .is_some_and(|w| w.seen > last + Duration::from_secs(2)),
        || "the load did not run long enough after the last answer to show it stopped".to_owned(),
    )?;
    no_failures("load during the scale-down", &r)?;
    println!(
        "scenario scale-down: reviews-v1 2 -> 1 under 80 req/s: {victim} left the Endpoints {:.2} s after the scale, its last answer ≤ {:.2} s after the scale ({:.2} s after leaving the Endpoints, 250 ms windows); {} ({:.1} s)",
        secs(gone - scaled),
        secs(stop_after),
        secs(last.saturating_duration_since(gone)),
        r.summary.line(),
        secs(t.elapsed())
    );
    Ok(())
}

struct ControlState {
    reconnects: f64,
    version: f64,
}

fn control_state(shop: &Shop<'_>, pod: &str) -> Result<ControlState, ScenarioError> {
    let m = shop.metrics(pod)?;
    Ok(ControlState {
        reconnects: m.sum("remora_proxy_control_stream_reconnects_total", &[]),
        version: m.value("remora_proxy_config_version").unwrap_or(0.0),
    })
}

/// The operator pod deleted mid-load: no request fails (the proxies keep their config),
/// and the proxies reconnect to the replacement and apply its newer config version.
pub async fn operator_restart(shop: &Shop<'_>) -> Result<(), ScenarioError> {
    let t = Instant::now();
    let operators = shop
        .pods_in(OPERATOR_NS, "app.kubernetes.io/name=remora-operator")
        .await?;
    let old: Vec<String> = operators.iter().map(|p| name(p).to_owned()).collect();
    ensure(!old.is_empty(), || "no operator pod".to_owned())?;
    let watched: Vec<String> = [
        shop.ready_pod("app=frontend").await?,
        shop.ready_pod("app=reviews,version=v1").await?,
    ]
    .iter()
    .map(|p| name(p).to_owned())
    .collect();
    let before = watched
        .iter()
        .map(|p| control_state(shop, p))
        .collect::<Result<Vec<_>, _>>()?;
    let (_, load) = start_frontend_load(shop, 60, Duration::from_secs(14)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deleted = Instant::now();
    let mut args = vec!["-n", OPERATOR_NS, "delete", "pod", "--wait=false"];
    args.extend(old.iter().map(String::as_str));
    shop.kubectl(&args)?;
    // The replacement: a Ready operator pod that is not one of the old ones.
    let ready = loop {
        let now = shop
            .pods_in(OPERATOR_NS, "app.kubernetes.io/name=remora-operator")
            .await?;
        if now
            .iter()
            .any(|p| !old.iter().any(|o| o == name(p)) && super::is_ready(p))
        {
            break Instant::now();
        }
        ensure(deleted.elapsed() < Duration::from_secs(60), || {
            "no replacement operator pod Ready 60 s after the deletion".to_owned()
        })?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Each watched proxy reconnected and applied a newer version from the replacement.
    let mut resynced = Vec::new();
    for (pod, b) in watched.iter().zip(&before) {
        loop {
            let now = control_state(shop, pod)?;
            if now.reconnects > b.reconnects && now.version > b.version {
                resynced.push(format!(
                    "{pod} {:.1} s (reconnects +{}, config version {} -> {})",
                    secs(deleted.elapsed()),
                    now.reconnects - b.reconnects,
                    b.version,
                    now.version
                ));
                break;
            }
            ensure(deleted.elapsed() < Duration::from_secs(60), || {
                format!(
                    "{pod}'s proxy did not resync 60 s after the operator's deletion: reconnects {} -> {}, version {} -> {}",
                    b.reconnects, now.reconnects, b.version, now.version
                )
            })?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let r = load.finish()?;
    no_failures("load while the operator was replaced", &r)?;
    println!(
        "scenario operator-restart: {old:?} deleted under 60 req/s: {}; replacement Ready {:.1} s after the delete; resynced from it: {} ({:.1} s)",
        r.summary.line(),
        secs(ready - deleted),
        resynced.join(", "),
        secs(t.elapsed())
    );
    Ok(())
}

/// The operator's workload certificate lifetime (`REMORA_CERT_TTL`).
pub const SHORT_TTL: &str = "35s";

fn renewals(shop: &Shop<'_>, pod: &str) -> Result<(f64, f64), ScenarioError> {
    let m = shop.metrics(pod)?;
    Ok((
        m.sum(
            "remora_proxy_certificate_renewals_total",
            &[("reason", "issued")],
        ),
        m.value("remora_proxy_cert_expiry_timestamp_seconds")
            .unwrap_or(0.0),
    ))
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Certificates with a short configured lifetime (the operator's `REMORA_CERT_TTL`)
/// rotate under load with no failed request. The operator is reconfigured and the demo
/// pods restarted so their proxies certify under the new lifetime.
pub async fn cert_rotation(shop: &Shop<'_>) -> Result<(), ScenarioError> {
    let t = Instant::now();
    shop.kubectl(&[
        "-n",
        OPERATOR_NS,
        "set",
        "env",
        &format!("deployment/{OPERATOR}"),
        &format!("REMORA_CERT_TTL={SHORT_TTL}"),
    ])?;
    shop.rollout_status(OPERATOR_NS, OPERATOR, Duration::from_secs(120))?;
    let deployments = ["frontend", "reviews-v1", "reviews-v2"];
    let mut restart = vec!["-n", SHOP, "rollout", "restart"];
    let named: Vec<String> = deployments
        .iter()
        .map(|d| format!("deployment/{d}"))
        .collect();
    restart.extend(named.iter().map(String::as_str));
    shop.kubectl(&restart)?;
    for d in deployments {
        shop.rollout_status(SHOP, d, Duration::from_secs(120))?;
    }
    let reconfigured = t.elapsed();
    let mut pods: Vec<String> = vec![name(&shop.ready_pod("app=frontend").await?).to_owned()];
    pods.extend(
        shop.ready_pods("app=reviews")
            .await?
            .iter()
            .map(|p| name(p).to_owned()),
    );
    let before = pods
        .iter()
        .map(|p| renewals(shop, p))
        .collect::<Result<Vec<_>, _>>()?;
    for (p, (_, expiry)) in pods.iter().zip(&before) {
        let left = expiry - unix_now();
        ensure(left > 0.0 && left <= 40.0, || {
            format!("{p}: certificate expires in {left:.0} s, want the {SHORT_TTL} lifetime")
        })?;
    }
    let (_, load) = start_frontend_load(shop, 60, Duration::from_secs(20)).await?;
    let r = load.finish()?;
    no_failures("load while certificates rotated", &r)?;
    let mut rotated = Vec::new();
    for (p, (issued, expiry)) in pods.iter().zip(&before) {
        let (issued_now, expiry_now) = renewals(shop, p)?;
        ensure(issued_now >= issued + 2.0 && expiry_now > *expiry, || {
            format!(
                "{p}: {issued} -> {issued_now} certificates issued, expiry {expiry} -> {expiry_now}; want ≥ 2 rotations in 20 s"
            )
        })?;
        rotated.push(format!("{p} +{}", issued_now - issued));
    }
    println!(
        "scenario cert-rotation: REMORA_CERT_TTL={SHORT_TTL} (valid from 60 s back, renewed at 70 %: every ~6.5 s), operator and demo pods rolled in {:.1} s; 20 s at 60 req/s: {}; certificates issued per proxy during the load: {} ({:.1} s)",
        secs(reconfigured),
        r.summary.line(),
        rotated.join(", "),
        secs(t.elapsed())
    );
    Ok(())
}
