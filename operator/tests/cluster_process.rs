//! The operator as the Deployment runs it: the real binary, configured only through the
//! environment, against a real kube-apiserver; leadership through the Lease; SIGTERM.
//! And two in-process replicas: only the leader writes, a standby takes over.

mod support;

use std::{
    fs::File,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use remora_crds::MeshPolicy;
use support::*;

/// Kills the child if the test fails before it exits.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn free_port() -> u16 {
    let [port] = remora_e2e::cluster::free_ports::<1>().expect("free port");
    port
}

async fn lease_holder(client: &Client) -> Result<Option<String>, String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "remora-system");
    let lease = leases
        .get_opt("remora-operator")
        .await
        .map_err(|e| e.to_string())?;
    Ok(lease
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

fn policy_status(p: &MeshPolicy) -> Option<&remora_crds::PolicyStatus> {
    p.status.as_ref()
}

#[test]
fn help_documents_every_flag_and_its_env_var() {
    let out = Command::new(env!("CARGO_BIN_EXE_remora-operator"))
        .arg("--help")
        .output()
        .expect("binary runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env) in [
        ("--metrics-listen", "REMORA_METRICS_LISTEN"),
        ("--pod-namespace", "POD_NAMESPACE"),
        ("--pod-name", "POD_NAME"),
        ("--leader-elect", "REMORA_LEADER_ELECT"),
        ("--lease-name", "REMORA_LEASE_NAME"),
        ("--lease-duration", "REMORA_LEASE_DURATION"),
        ("--lease-renew", "REMORA_LEASE_RENEW"),
        ("--trust-domain", "REMORA_TRUST_DOMAIN"),
        ("--index-debounce", "REMORA_INDEX_DEBOUNCE"),
        ("--index-max-delay", "REMORA_INDEX_MAX_DELAY"),
        ("--kubeconfig", "KUBECONFIG"),
        ("--log", "REMORA_LOG"),
        ("--log-format", "REMORA_LOG_FORMAT"),
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
        assert!(
            help.contains(&format!("[env: {env}")),
            "{env} missing from --help:\n{help}"
        );
    }
}

#[test]
fn bad_flag_values_are_refused_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_remora-operator"))
        .arg("--lease-duration=soon")
        .output()
        .expect("binary runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--lease-duration"), "{err}");
}

#[tokio::test]
async fn binary_leads_reconciles_and_releases_the_lease_on_sigterm() {
    let (cluster, client) = cluster().await;
    let port = free_port();
    let log_path = cluster
        .dir()
        .expect("cluster dir")
        .join("remora-operator.log");
    let log = File::create(&log_path).expect("log file");
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_remora-operator"))
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("REMORA_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .env("REMORA_CA_LISTEN", "127.0.0.1:0")
            .env("POD_NAME", "remora-operator-0")
            .env("POD_NAMESPACE", "remora-system")
            .env("REMORA_LOG", "info,remora_operator=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("operator starts"),
    );
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");

    eventually("the binary is ready", || async {
        match http_get(addr, "/readyz").await? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("the binary holds the Lease", || async {
        match lease_holder(&client).await? {
            Some(h) if h == "remora-operator-0" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    namespace(&client, "proc").await;
    mesh_policy(&client, "proc", "dangling", Some("nowhere")).await;
    let api: Api<MeshPolicy> = Api::namespaced(client.clone(), "proc");
    wait_conditions(
        &api,
        "dangling",
        policy_status,
        ("True", "Accepted"),
        ("False", "ServiceNotFound"),
    )
    .await;
    wait_event(&client, "proc", "dangling", "Warning", "ServiceNotFound").await;
    let (_, metrics) = http_get(addr, "/metrics").await.expect("metrics");
    assert!(metrics.contains("remora_operator_leader 1"), "{metrics}");

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let start = Instant::now();
    let exit = loop {
        if let Some(exit) = child.0.try_wait().expect("try_wait") {
            break exit;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "operator still running {DEADLINE:?} after SIGTERM; log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(exit.success(), "exit {exit}; log:\n{logs}");
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert_eq!(
        lease_holder(&client).await.expect("lease readable"),
        None,
        "the Lease is released on shutdown"
    );
}

#[tokio::test]
async fn only_the_leader_writes_and_a_standby_takes_over() {
    let (_cluster, client) = cluster().await;
    let first = operator(&client, "replica-a").await;
    let holder = eventually("replica-a leads", || async {
        match lease_holder(&client).await? {
            Some(h) => Ok(h),
            None => Err("no holder".to_owned()),
        }
    })
    .await;
    assert_eq!(holder, "replica-a");
    let second = operator(&client, "replica-b").await;
    eventually("the standby is ready", || async {
        match http_get(second.addr, "/readyz").await? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    namespace(&client, "ha").await;
    service(&client, "ha", "reviews", &[9080]).await;
    mesh_policy(&client, "ha", "first", Some("reviews")).await;
    let api: Api<MeshPolicy> = Api::namespaced(client.clone(), "ha");
    wait_conditions(
        &api,
        "first",
        policy_status,
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )
    .await;
    // The counter moves just after the write the test observed: poll for it.
    let leader_metrics = eventually("the leader counted its status write", || async {
        match http_get(first.addr, "/metrics").await? {
            (200, body)
                if body.contains("remora_operator_status_writes_total{kind=\"MeshPolicy\"}") =>
            {
                Ok(body)
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (_, standby_metrics) = http_get(second.addr, "/metrics").await.expect("metrics");
    assert!(
        leader_metrics.contains("remora_operator_leader 1"),
        "{leader_metrics}"
    );
    assert!(
        leader_metrics.contains("remora_operator_status_writes_total{kind=\"MeshPolicy\"}"),
        "{leader_metrics}"
    );
    assert!(
        standby_metrics.contains("remora_operator_leader 0"),
        "{standby_metrics}"
    );
    assert!(
        !standby_metrics.contains("remora_operator_status_writes_total{"),
        "the standby wrote status:\n{standby_metrics}"
    );

    // The leader stops and releases the Lease; the standby takes over and reconciles.
    first.stop().await;
    eventually("replica-b leads", || async {
        match lease_holder(&client).await? {
            Some(h) if h == "replica-b" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    mesh_policy(&client, "ha", "second", Some("missing")).await;
    wait_conditions(
        &api,
        "second",
        policy_status,
        ("True", "Accepted"),
        ("False", "ServiceNotFound"),
    )
    .await;
    let (_, metrics) = http_get(second.addr, "/metrics").await.expect("metrics");
    assert!(metrics.contains("remora_operator_leader 1"), "{metrics}");
    second.stop().await;
}

#[tokio::test]
async fn a_lease_left_by_a_dead_holder_is_taken_over_after_it_expires() {
    let (_cluster, client) = cluster().await;
    // A holder that never renews (a crashed replica), with a 2 s Lease.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "remora-system");
    leases
        .create(
            &kube::api::PostParams::default(),
            &from_json(serde_json::json!({
                "metadata": {"name": "remora-operator"},
                "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": 2,
                         "leaseTransitions": 0},
            })),
        )
        .await
        .expect("stale Lease created");
    let op = operator(&client, "survivor").await;
    let (_, metrics) = eventually("the survivor reports itself a standby first", || async {
        match http_get(op.addr, "/metrics").await? {
            (200, body) if body.contains("remora_operator_leader 0") => Ok(((), body)),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(metrics.contains("remora_operator_leader 0"));
    eventually("the survivor takes the expired Lease", || async {
        match lease_holder(&client).await? {
            Some(h) if h == "survivor" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let lease = leases.get("remora-operator").await.expect("lease");
    let spec = lease.spec.expect("spec");
    assert_eq!(spec.lease_transitions, Some(1));
    assert_eq!(
        spec.lease_duration_seconds,
        Some(4),
        "the new holder's duration"
    );
    // Graceful shutdown is covered by the other tests; this one is about the takeover.
    drop(op);
}
