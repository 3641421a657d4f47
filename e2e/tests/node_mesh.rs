//! The mesh on a real cluster, every traffic scenario of issue 12 against ONE cluster
//! (the node in a box, or `REMORA_E2E_KUBECONFIG`'s on the kind tier), in order: the
//! node and Remora take over a minute to start, the scenarios seconds each. On the node,
//! Remora is installed as users install it (`kubectl apply -k config/default` with the
//! images imported; the operator and webhook bootstrap their CA, certificate and
//! caBundle) and the samples applied in their labelled namespace.
//!
//! Each scenario prints `scenario <name>: <figures>`; a failing one is reported and the
//! rest still run (those that need what it broke fail with their own message), and the
//! test fails at the end naming every failed scenario.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use remora_e2e::node::NodeOptions;
use remora_e2e::scenario::{self, ScenarioError, Shop, churn, injected, traffic};
use remora_e2e::target::Target;

type Scenario =
    for<'a> fn(&'a Shop<'a>) -> Pin<Box<dyn Future<Output = Result<(), ScenarioError>> + 'a>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_carries_balances_splits_authorizes_and_survives_churn() {
    let t = Instant::now();
    let target = Target::from_env_or_start(NodeOptions::default())
        .await
        .expect("the cluster starts (or REMORA_E2E_KUBECONFIG names one)");
    if let Target::Node(n) = &target {
        println!("node Ready in {:.1} s", n.started_in().as_secs_f64());
    }
    scenario::setup(&target)
        .await
        .unwrap_or_else(|e| panic!("setup: {e}"));
    let shop = Shop::new(&target).await.expect("client");

    let scenarios: [(&str, Scenario); 8] = [
        ("injected", |s| Box::pin(injected::run(s))),
        ("mtls", |s| Box::pin(traffic::mtls(s))),
        ("split-and-spread", |s| {
            Box::pin(traffic::split_and_spread(s))
        }),
        ("authz", |s| Box::pin(traffic::authz(s))),
        ("drain", |s| Box::pin(churn::drain(s))),
        ("scale-down", |s| Box::pin(churn::scale_down(s))),
        ("operator-restart", |s| Box::pin(churn::operator_restart(s))),
        ("cert-rotation", |s| Box::pin(churn::cert_rotation(s))),
    ];
    let mut failed = Vec::new();
    for (name, run) in scenarios {
        if let Err(e) = run(&shop).await {
            println!("scenario {name}: FAILED: {e}");
            failed.push(format!("{name}: {e}"));
        }
    }
    drop(shop);
    scenario::restore(&target).unwrap_or_else(|e| panic!("restoring the external cluster: {e}"));
    match target {
        Target::Node(node) => {
            println!(
                "memory of the box: {} MiB; scenarios done {:.1} s after the start",
                node.memory_bytes() / (1024 * 1024),
                t.elapsed().as_secs_f64()
            );
            let report = node.stop();
            assert!(
                report.problems.is_empty(),
                "left behind: {:#?}",
                report.problems
            );
        }
        Target::External(_) => println!("scenarios done in {:.1} s", t.elapsed().as_secs_f64()),
    }
    assert!(
        failed.is_empty(),
        "{} scenarios failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
