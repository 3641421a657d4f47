//! `remora-demo-app`: the workload of Remora's demo and end-to-end scenarios, one small
//! binary in one image. `serve` answers who it is (pod, IP, version) over HTTP/1.1, h2c
//! and gRPC health; `load` drives a fixed request rate at a URL and reports answers per
//! pod, success rate and latency percentiles, as text and as JSON lines; with
//! `--stop-proxy` it then stops the pod's classic sidecar, as a Job's app must.

mod args;
mod load;
mod serve;
mod sidecar;
mod stats;

use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use args::{Cli, Cmd};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("remora-demo-app: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let (tx, rx) = watch::channel(false);
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("remora-demo-app: cannot handle SIGTERM: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = tx.send(true);
        });
        match cli.cmd {
            Cmd::Serve(a) => match serve::run(a, rx).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("remora-demo-app: {e}");
                    ExitCode::FAILURE
                }
            },
            Cmd::Load(a) => {
                let min = a.min_success_rate;
                let stop_proxy = a.stop_proxy.then_some(a.proxy_admin);
                let result = load::run(a, rx).await;
                if let Some(admin) = stop_proxy {
                    // Whatever the outcome: the pod must be able to finish either way.
                    match sidecar::stop(admin).await {
                        Ok(()) => eprintln!("remora-demo-app: asked the proxy at {admin} to stop"),
                        Err(e) => eprintln!("remora-demo-app: warning: {e}"),
                    }
                }
                match result {
                    Ok(s) if min.is_some_and(|m| s.success_rate < m) => {
                        eprintln!(
                            "remora-demo-app: success rate {:.2} % is below {:.2} %",
                            s.success_rate,
                            min.unwrap_or_default()
                        );
                        ExitCode::FAILURE
                    }
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("remora-demo-app: {e}");
                        ExitCode::from(2)
                    }
                }
            }
        }
    })
}
