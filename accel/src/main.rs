//! `remora-accel`: see the crate docs and `--help`.

use std::io::IsTerminal;

use clap::Parser;

use remora_accel::agent;
use remora_accel::cli::Cli;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = if cli.cleanup {
        agent::cleanup(&cli)
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(agent::AgentError::Signal)
            .and_then(|rt| rt.block_on(agent::run(cli)))
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remora-accel: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
