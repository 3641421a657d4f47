//! `make demo`: Remora's main job, on a real single-node Kubernetes.
//!
//! Brings up the node in a box (`remora_e2e::Node`: etcd, apiserver, controller-manager,
//! scheduler, containerd, kubelet and kube-proxy in a network namespace of their own),
//! installs Remora as users do (the image tarballs imported, `kubectl apply -k
//! config/default`), applies `config/samples` and waits for the demo pods, whose loadgen
//! calls the reviews Service through the mesh. Then it shows a live summary every second
//! until Ctrl-C or SIGTERM (or the end of `--duration`), from the proxies' own metrics:
//! requests per backend, success rate, p50/p99, the SPIFFE identities authenticated,
//! each certificate's expiry. On exit, also after an error or a signal, it tears the
//! node down and reports anything left behind. `--keep` leaves the cluster up
//! ([`keep`]).

mod args;
mod bringup;
mod keep;
mod live;
mod prom;
mod render;
mod scrape;
mod signals;
mod summary;

use std::process::ExitCode;

use remora_e2e::{HarnessError, Node};

use args::{Mode, Options};
use bringup::{Clock, NAMESPACE};
use live::Live;
use signals::Shutdown;

/// Why the demo did not end well.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Harness(#[from] HarnessError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error("stopped by {0} before the demo was up (what had started is torn down)")]
    Interrupted(&'static str),
    #[error("the mesh did not show working: {}", .0.join("; "))]
    Check(Vec<String>),
    #[error("teardown left things behind:\n  {}", .0.join("\n  "))]
    Leftovers(Vec<String>),
}

/// Stops the node and prints what teardown found; the leftovers.
pub fn stop_node(node: Node, clock: &Clock) -> Vec<String> {
    clock.step("tearing down: every process by PID, the network namespace, cgroups, mounts");
    let report = node.stop();
    for s in &report.restored_sysctls {
        println!("    restored {s}");
    }
    if report.problems.is_empty() {
        println!("    nothing left behind");
    }
    for p in &report.problems {
        println!("    LEFT BEHIND: {p}");
    }
    report.problems
}

/// Everything in this process: up, summary, down.
async fn run(opts: &Options, shutdown: &mut Shutdown) -> Result<(), DemoError> {
    let clock = Clock::start();
    let node = bringup::start_node(&clock, shutdown).await?;
    let outcome = async {
        let phases = tokio::select! {
            up = bringup::install(&node, &clock) => up?,
            signal = shutdown.wait() => return Err(DemoError::Interrupted(signal)),
        };
        println!("==> {}", bringup::report(&phases, &clock));
        let kubeconfig = node.kubeconfig()?.display().to_string();
        let until = opts
            .duration
            .map(|d| format!("Ctrl-C or the end of --duration={}s", d.as_secs()))
            .unwrap_or_else(|| "Ctrl-C".to_owned());
        let live = Live {
            client: node.client().await?,
            namespace: NAMESPACE,
            title: format!("Remora demo · node {} · namespace {NAMESPACE}", node.name()),
            footer: format!(
                "{until} stops the demo and tears the node down · kubectl meanwhile: KUBECONFIG={kubeconfig}"
            ),
            duration: opts.duration,
        };
        live::run(live, shutdown, || Some(node.memory_bytes())).await
    }
    .await;
    if let Ok(line) = &outcome {
        println!("\ncheck: {line}");
    }
    let problems = stop_node(node, &clock);
    outcome?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(DemoError::Leftovers(problems))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let opts = match args::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("remora-demo: {e}\n\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    // Before anything starts: a signal from here on is a request to tear down.
    let mut shutdown = match Shutdown::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("remora-demo: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match &opts.mode {
        Mode::Help => {
            println!("{}", args::USAGE);
            Ok(())
        }
        Mode::Run => run(&opts, &mut shutdown).await,
        Mode::Keep => keep::keep(&opts, &mut shutdown).await,
        Mode::Daemon(dir) => keep::daemon(dir, &mut shutdown).await,
        Mode::Stop(dir) => keep::stop(dir.clone()).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remora-demo: {e}");
            ExitCode::FAILURE
        }
    }
}
