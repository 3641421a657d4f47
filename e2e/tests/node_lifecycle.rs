//! Lifecycle scenarios and bad input, on one real node (or the cluster named by
//! `REMORA_E2E_KUBECONFIG`, where Remora is already installed), each printing
//! `scenario <name>: <figures>`:
//!
//! - `namespace-label`: a namespace labelled `remora.dev/inject=<bogus>` is refused by the
//!   webhook's namespace check with a message naming the accepted values, on CREATE and
//!   on `kubectl label`; good values pass;
//! - `job`: a Job's pod with a sidecar completes — its app, when done, stops the proxy
//!   (`POST /shutdown` on the admin port), the proxy exits 0 and the Job succeeds;
//! - `init-failure`: a pod whose `remora-init` fails (the injected pod with NET_ADMIN
//!   taken away, as a restrictive policy would) never starts its app, and says why;
//! - `no-certificate`: with the operator scaled to 0, a new meshed pod does not become
//!   Ready and its events (classic sidecar) or proxy log (native) name the cause; with the
//!   operator back it becomes Ready.

mod lifecycle;

use std::cell::Cell;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Endpoints, Event, Namespace, Pod, ServiceAccount};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use remora_e2e::NodeOptions;
use remora_e2e::target::Target;

use lifecycle::{
    Cleanup, NS, OperatorBack, app_pod, apply_yaml, describe, eventually, is_ready, kubectl_fails,
    namespace_and_echo, native_sidecar, status_of, wait_available,
};

const LABEL: &str = "remora.dev/inject";

#[tokio::test]
async fn lifecycle_scenarios_and_bad_input() {
    let started = Instant::now();
    let target = Target::from_env_or_start(NodeOptions::default())
        .await
        .expect("the node starts (or REMORA_E2E_KUBECONFIG names a cluster)");
    if let Target::Node(node) = &target {
        println!("node Ready in {:.1} s", node.started_in().as_secs_f64());
        let installed = node
            .install_remora(Duration::from_secs(180))
            .await
            .expect("Remora installs from config/default");
        println!(
            "Remora installed: images imported in {:.1} s, control plane Ready and caBundles set {:.1} s after kubectl apply -k",
            installed.import.as_secs_f64(),
            installed.ready.as_secs_f64()
        );
    }
    let client = target.client().await.expect("client");
    // An external cluster keeps nothing of ours, even when a scenario fails.
    let _cleanup = Cleanup(&target);

    let t = Instant::now();
    apply_yaml(&client, &namespace_and_echo(), "namespace and echo").await;
    let label_figures = namespace_label(&target, &client).await;
    // Pods created directly need the namespace's default ServiceAccount, which the
    // controller-manager adds shortly after the namespace.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    eventually(
        "the default ServiceAccount",
        Duration::from_secs(30),
        || {
            let accounts = accounts.clone();
            async move {
                accounts
                    .get_opt("default")
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|_| ())
                    .ok_or_else(|| "not created yet".to_owned())
            }
        },
    )
    .await;
    // Started now, observed later: it needs no operator, and failing takes a while.
    let init_pod = start_init_failure(&client).await;
    wait_available(&client, NS, "echo", Duration::from_secs(120)).await;
    println!(
        "namespace {NS} and echo Ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    println!("scenario namespace-label: {label_figures}");

    job_completes(&target, &client).await;
    init_failure(&target, &client, &init_pod).await;
    no_certificate(&target, &client).await;

    println!(
        "all lifecycle scenarios in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(_cleanup);
    if let Target::Node(node) = target {
        println!(
            "memory of the box: {} MiB",
            node.memory_bytes() / (1024 * 1024)
        );
        let report = node.stop();
        assert!(
            report.problems.is_empty(),
            "left behind: {:#?}",
            report.problems
        );
    }
}

/// Bad values of the injection label are refused on CREATE and UPDATE with a message;
/// good values and unrelated changes pass. Returns the figures.
async fn namespace_label(target: &Target, client: &Client) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    // CREATE with a bogus value.
    let bogus: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "remora-bogus-label", "labels": {LABEL: "true"}}
    }))
    .expect("namespace");
    let t = Instant::now();
    let err = api
        .create(&PostParams::default(), &bogus)
        .await
        .expect_err("a namespace labelled remora.dev/inject=true must be refused");
    let create_ms = t.elapsed().as_secs_f64() * 1e3;
    let msg = err.to_string();
    assert!(
        msg.contains(r#"remora.dev/inject="true" is not valid"#)
            && msg.contains(r#"use "enabled""#),
        "{msg}"
    );
    // UPDATE through kubectl, as users do it.
    let t = Instant::now();
    let stderr = kubectl_fails(
        target,
        &[
            "label",
            "namespace",
            NS,
            &format!("{LABEL}=yes-please"),
            "--overwrite",
        ],
    );
    let label_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(
        stderr.contains(r#"admission webhook "namespace.remora.dev" denied the request"#)
            && stderr.contains(r#"namespace label remora.dev/inject="yes-please" is not valid"#),
        "{stderr}"
    );
    let ns = api.get(NS).await.expect("namespace");
    let value = ns.metadata.labels.unwrap_or_default().remove(LABEL);
    assert_eq!(
        value.as_deref(),
        Some("enabled"),
        "the refused change left no trace"
    );
    // Unrelated changes of a meshed namespace, and the good values, pass.
    target
        .kubectl(&["label", "namespace", NS, "team=lifecycle", "--overwrite"])
        .expect("an unrelated label on a meshed namespace");
    let message = stderr
        .split("Error from server")
        .nth(1)
        .map(|m| format!("Error from server{}", m.trim_end()))
        .unwrap_or_default();
    format!(
        "CREATE with {LABEL}=true refused in {create_ms:.0} ms, `kubectl label ns {NS} {LABEL}=yes-please` refused in {label_ms:.0} ms: {message}"
    )
}

/// A Job's pod: its app sends load through the mesh, then stops its sidecar; the proxy
/// exits 0 and the pod and the Job succeed. Measures app exit → pod Succeeded.
async fn job_completes(target: &Target, client: &Client) {
    let created = Instant::now();
    apply_yaml(client, &lifecycle::job(), "the Job").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let list = ListParams::default().labels("app=batch");
    let app_exit_seen: Cell<Option<Instant>> = Cell::new(None);
    let seen = &app_exit_seen;
    let pod = eventually("the Job's pod Succeeded", Duration::from_secs(120), || {
        let (pods, list) = (pods.clone(), list.clone());
        async move {
            let all = pods.list(&list).await.map_err(|e| e.to_string())?;
            let pod = all.items.into_iter().next().ok_or("no pod yet")?;
            let app_done = status_of(&pod, "batch")
                .and_then(|s| s.state)
                .is_some_and(|s| s.terminated.is_some());
            if app_done && seen.get().is_none() {
                seen.set(Some(Instant::now()));
            }
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
            match phase.as_deref() {
                Some("Succeeded") => Ok((pod, Instant::now())),
                Some("Failed") => panic!("the Job's pod failed: {}", describe(&pod)),
                _ => Err(describe(&pod)),
            }
        }
    })
    .await;
    let (pod, succeeded_at) = pod;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let native = native_sidecar(&pod);
    let terminated = |c: &str| {
        status_of(&pod, c)
            .and_then(|s| s.state)
            .and_then(|s| s.terminated)
            .unwrap_or_else(|| panic!("{c} of {name} not terminated: {}", describe(&pod)))
    };
    let (app, proxy) = (terminated("batch"), terminated("remora-proxy"));
    assert_eq!(app.exit_code, 0, "the app: {app:?}");
    assert_eq!(
        proxy.exit_code, 0,
        "the proxy exits 0 when stopped: {proxy:?}"
    );
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let complete = eventually("the Job Complete", Duration::from_secs(30), || {
        let jobs = jobs.clone();
        async move {
            let j = jobs.get("batch").await.map_err(|e| e.to_string())?;
            let s = j.status.unwrap_or_default();
            let done = s
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Complete" && c.status == "True");
            (done && s.succeeded == Some(1))
                .then(Instant::now)
                .ok_or_else(|| format!("succeeded={:?}", s.succeeded))
        }
    })
    .await;
    let logs = |c: &str| {
        target
            .kubectl(&["-n", NS, "logs", &name, "-c", c])
            .unwrap_or_else(|e| panic!("logs of {c}: {e}"))
    };
    let proxy_log = logs("remora-proxy");
    assert!(
        proxy_log.contains("shutdown requested on the admin port"),
        "the proxy stopped because the app asked:\n{proxy_log}"
    );
    let app_log = logs("batch");
    let summary = app_log
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .unwrap_or_else(|| panic!("no JSON summary in the app's log:\n{app_log}"));
    let s = &summary["summary"];
    assert_eq!(s["failed"], 0, "{s}");
    let ok = s["ok"].as_u64().unwrap_or(0);
    assert!(ok >= 20, "{s}");
    let exit_to_succeeded = app_exit_seen
        .get()
        .map(|t| succeeded_at.saturating_duration_since(t))
        .unwrap_or_default();
    let stamps = |t: &k8s_openapi::api::core::v1::ContainerStateTerminated| {
        t.finished_at.as_ref().map(|f| f.0.as_second())
    };
    let proxy_after_app = match (stamps(&app), stamps(&proxy)) {
        (Some(a), Some(p)) => format!("{} s", p - a),
        _ => "?".to_owned(),
    };
    let exit_to_succeeded = if exit_to_succeeded.is_zero() {
        "< 0.2 s (both seen in the same 200 ms poll)".to_owned()
    } else {
        format!(
            "{:.0} ms (polled every 200 ms)",
            exit_to_succeeded.as_secs_f64() * 1e3
        )
    };
    println!(
        "scenario job: {} sidecar; {ok} requests through the mesh, 0 failed; app exit -> pod Succeeded {exit_to_succeeded}; proxy finishedAt - app finishedAt = {proxy_after_app} (1 s resolution); Job created -> Complete {:.1} s; both containers exit 0, the proxy because the app asked",
        if native { "native" } else { "classic" },
        complete.duration_since(created).as_secs_f64(),
    );
}

/// Creates the pod whose remora-init will fail: the pod the webhook injects (asked with a
/// server-side dry run), with NET_ADMIN and NET_RAW taken from remora-init as a
/// restrictive admission policy would. The webhook admits it unchanged (already
/// injected). Returns its name.
async fn start_init_failure(client: &Client) -> String {
    let name = "init-fails";
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let plain: Pod = serde_json::from_value(app_pod(name, "{}")).expect("pod");
    let injected = pods
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &plain,
        )
        .await
        .expect("dry-run create (the webhook injects it)");
    let mut spec = injected.spec.expect("spec");
    let init = spec
        .init_containers
        .iter_mut()
        .flatten()
        .find(|c| c.name == "remora-init")
        .expect("the webhook added remora-init");
    if let Some(caps) = init
        .security_context
        .as_mut()
        .and_then(|s| s.capabilities.as_mut())
    {
        caps.add = None;
    }
    let pod = Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(NS.to_owned()),
            labels: injected.metadata.labels,
            annotations: injected.metadata.annotations,
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the pod without NET_ADMIN");
    name.to_owned()
}

/// The pod of [`start_init_failure`]: remora-init fails (and is retried), the app never
/// starts, and the reason is in the init container's status and log.
async fn init_failure(target: &Target, client: &Client, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pod = pods.get(name).await.expect("the pod");
    let created = pod
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .expect("creationTimestamp");
    let (pod, failed) = eventually(
        "remora-init failed at least twice",
        Duration::from_secs(90),
        || {
            let pods = pods.clone();
            async move {
                let pod = pods.get(name).await.map_err(|e| e.to_string())?;
                let init = status_of(&pod, "remora-init").ok_or("no remora-init status yet")?;
                let failed = init
                    .last_state
                    .as_ref()
                    .and_then(|s| s.terminated.clone())
                    .filter(|t| t.exit_code != 0);
                match failed {
                    Some(t) if init.restart_count >= 1 => Ok((pod, t)),
                    _ => Err(describe(&pod)),
                }
            }
        },
    )
    .await;
    let init = status_of(&pod, "remora-init").expect("remora-init status");
    let message = failed.message.clone().unwrap_or_default();
    assert!(
        message.contains("remora-init: error:"),
        "the init container's termination message says why: {failed:?}"
    );
    for app in ["app", "remora-proxy"] {
        let Some(s) = status_of(&pod, app) else {
            continue;
        };
        let state = s.state.clone().unwrap_or_default();
        let last = s.last_state.clone().unwrap_or_default();
        assert!(
            state.running.is_none()
                && state.terminated.is_none()
                && last.running.is_none()
                && last.terminated.is_none(),
            "{app} must never start while remora-init fails: {}",
            describe(&pod)
        );
        assert_eq!(s.restart_count, 0, "{app}: {}", describe(&pod));
    }
    assert!(!is_ready(&pod));
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    assert_eq!(phase.as_deref(), Some("Pending"), "{}", describe(&pod));
    let log = target
        .kubectl(&["-n", NS, "logs", name, "-c", "remora-init", "--previous"])
        .unwrap_or_default();
    let first_failure = failed
        .finished_at
        .as_ref()
        .map(|f| f.0.duration_since(created).as_secs_f64())
        .unwrap_or(f64::NAN);
    let why = message
        .lines()
        .find(|l| l.contains("remora-init: error:"))
        .unwrap_or_default()
        .trim();
    println!(
        "scenario init-failure: remora-init exited {} (first failure {first_failure:.0} s after pod creation, 1 s resolution), {} restarts by now, app never started (pod {}); termination message: {why}{}",
        failed.exit_code,
        init.restart_count,
        describe(&pod),
        if log.contains("remora-init: error") {
            "; same in `kubectl logs -c remora-init`"
        } else {
            ""
        },
    );
}

/// The operator scaled to 0: a new meshed pod cannot certify, is not Ready, and says why;
/// once the operator is back, the pod becomes Ready.
async fn no_certificate(target: &Target, client: &Client) {
    let replicas: i32 = target
        .kubectl(&[
            "-n",
            "remora-system",
            "get",
            "deployment/remora-operator",
            "-o",
            "jsonpath={.spec.replicas}",
        ])
        .expect("operator replicas")
        .trim()
        .parse()
        .expect("a number");
    let mut back = OperatorBack {
        target,
        replicas,
        restored: false,
    };
    target
        .kubectl(&[
            "-n",
            "remora-system",
            "scale",
            "deployment/remora-operator",
            "--replicas=0",
        ])
        .expect("scale the operator to 0");
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "remora-system");
    let t = Instant::now();
    eventually(
        "the operator Service without endpoints",
        Duration::from_secs(60),
        || {
            let endpoints = endpoints.clone();
            async move {
                let e = endpoints
                    .get("remora-operator")
                    .await
                    .map_err(|e| e.to_string())?;
                let ready: usize = e
                    .subsets
                    .unwrap_or_default()
                    .iter()
                    .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
                    .sum();
                (ready == 0)
                    .then_some(())
                    .ok_or_else(|| format!("{ready} ready addresses"))
            }
        },
    )
    .await;
    let gone = t.elapsed();

    let name = "no-certificate";
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pod: Pod = serde_json::from_value(app_pod(
        name,
        "{config.remora.dev/proxy-ready-timeout: 15s}",
    ))
    .expect("pod");
    let created = Instant::now();
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");
    let native = native_sidecar(&pod);
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let why = if native {
        // Kubelet reports a failing startupProbe only by status code; the proxy's log
        // says why.
        eventually(
            "the proxy's log names the cause",
            Duration::from_secs(60),
            move || async move {
                let log = target
                    .kubectl(&["-n", NS, "logs", name, "-c", "remora-proxy"])
                    .map_err(|e| e.to_string())?;
                log.lines()
                    .find(|l| l.contains("certify failed") && l.contains("remora-operator"))
                    .map(|l| l.trim().to_owned())
                    .ok_or(log)
            },
        )
        .await
    } else {
        // Classic: the postStart hook's output is the event's message.
        eventually(
            "a FailedPostStartHook event",
            Duration::from_secs(60),
            || {
                let events = events.clone();
                async move {
                    let list = events
                        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
                        .await
                        .map_err(|e| e.to_string())?;
                    list.items
                        .iter()
                        .find(|e| e.reason.as_deref() == Some("FailedPostStartHook"))
                        .and_then(|e| e.message.clone())
                        .ok_or_else(|| {
                            let reasons: Vec<_> =
                                list.items.iter().filter_map(|e| e.reason.clone()).collect();
                            format!("events: {reasons:?}")
                        })
                }
            },
        )
        .await
    };
    let said_after = created.elapsed();
    assert!(
        why.contains("cannot certify with the operator")
            && why.contains("remora-operator.remora-system.svc:15012")
            || native,
        "the reason names the operator and the failure: {why}"
    );
    let now = pods.get(name).await.expect("pod");
    assert!(
        !is_ready(&now),
        "not Ready without a certificate: {}",
        describe(&now)
    );

    back.restore();
    let restored = Instant::now();
    wait_available(
        client,
        "remora-system",
        "remora-operator",
        Duration::from_secs(120),
    )
    .await;
    let operator_back = restored.elapsed();
    eventually(
        "the pod Ready once the operator is back",
        Duration::from_secs(150),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get(name).await.map_err(|e| e.to_string())?;
                is_ready(&p).then_some(()).ok_or_else(|| describe(&p))
            }
        },
    )
    .await;
    let ready_after = restored.elapsed();
    let detail = why
        .split("remora-proxy wait-ready: ")
        .nth(1)
        .unwrap_or(&why)
        .split(", message:")
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    println!(
        "scenario no-certificate: operator scaled to 0 (endpoints gone in {:.1} s); the new pod not Ready, {} {:.1} s after creation: {detail}; operator back and Ready in {:.1} s, the pod Ready {:.1} s after the restore (proxy restarted by kubelet)",
        gone.as_secs_f64(),
        if native {
            "its proxy log said why"
        } else {
            "event FailedPostStartHook said why"
        },
        said_after.as_secs_f64(),
        operator_back.as_secs_f64(),
        ready_after.as_secs_f64(),
    );
}
