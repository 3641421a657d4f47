//! `remora-demo-app`: the workload of Remora's demo and end-to-end scenarios, one small
//! binary in one image. `serve` answers who it is (pod, IP, version) over HTTP/1.1, h2c
//! and gRPC health; `load` drives a fixed request rate at a URL and reports answers per
//! pod, success rate and latency percentiles, as text and as JSON lines.

mod args;
mod load;
mod serve;
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
                match load::run(a, rx).await {
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
