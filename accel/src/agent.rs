//! The agent's life: prepare the pin directory, load or reuse the programs, say ready,
//! then read registrations until SIGTERM/SIGINT, which end the process and nothing
//! else (the programs stay attached: acceleration survives the agent).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::signal::unix::{SignalKind, signal};

use crate::cgroup::{self, CgroupError};
use crate::cli::Cli;
use crate::maps::{Maps, SETTING_REDIRECT_TO_APP, Settings, describe};
use crate::metrics::Metrics;
use crate::pins::{PinDir, PinDirError};
use crate::programs::{self, ProgramsError, Start};
use crate::registrations::{self, Decision, Outcome};
use crate::server::{self, Shared};

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    PinDir(#[from] PinDirError),
    #[error(transparent)]
    Programs(#[from] ProgramsError),
    #[error("registrations directory {path}: {source}")]
    Registrations {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metrics address {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("writing the settings map: {}", describe(.0.as_ref()))]
    Settings(Box<aya::maps::MapError>),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
}

/// `--cleanup`: removes every pin under --bpffs (detaching the programs).
pub fn cleanup(cli: &Cli) -> Result<(), AgentError> {
    let removed = programs::cleanup(&PinDir::new(&cli.bpffs))?;
    tracing::info!(
        bpffs = %cli.bpffs.display(),
        removed = removed.len(),
        "remora-accel: cleaned up"
    );
    Ok(())
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cli: Cli) -> Result<(), AgentError> {
    let reg_dir = cli.registrations.clone();
    std::fs::create_dir_all(&reg_dir).map_err(|source| AgentError::Registrations {
        path: reg_dir.clone(),
        source,
    })?;
    let listener = tokio::net::TcpListener::bind(cli.metrics_addr)
        .await
        .map_err(|source| AgentError::Listen {
            addr: cli.metrics_addr,
            source,
        })?;
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;

    let cgroup = cgroup::attach_point(cli.cgroup.as_deref(), &cli.cgroup_root)?;
    tracing::info!(cgroup = %cgroup.display(), given = cli.cgroup.is_some(), "cgroup v2 attach point");
    let pins = PinDir::prepare(&cli.bpffs)?;
    let (mut maps, start) = programs::load_or_reuse(&pins, &cgroup)?;
    let flags = if cli.redirect_to_app {
        SETTING_REDIRECT_TO_APP
    } else {
        0
    };
    maps.set_settings(Settings { flags })
        .map_err(|e| AgentError::Settings(Box::new(e)))?;
    let maps = Arc::new(Mutex::new(maps));
    let metrics = Arc::new(Metrics::over(maps.clone()));
    let ready = Arc::new(AtomicBool::new(false));
    let app = server::router(Shared {
        metrics: metrics.clone(),
        ready: ready.clone(),
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server: {e}");
        }
    });

    // Registrations already waiting are in the map before the agent says ready.
    poll(&reg_dir, &maps, &metrics);
    ready.store(true, Ordering::Release);
    tracing::info!(
        cgroup = %cgroup.display(),
        bpffs = %cli.bpffs.display(),
        programs = match start { Start::Reused => "reused from pins", Start::Attached => "attached" },
        redirect_to_app = cli.redirect_to_app,
        "remora-accel started"
    );
    eprintln!("remora-accel: ready");

    let mut tick = tokio::time::interval(cli.poll_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => poll(&reg_dir, &maps, &metrics),
        }
    }
    tracing::info!("remora-accel stopping; the programs stay attached");
    Ok(())
}

/// Handles every registration file waiting in `dir`.
fn poll(dir: &std::path::Path, maps: &Mutex<Maps>, metrics: &Metrics) {
    let files = match registrations::pending(dir) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "reading the registrations: {e}");
            return;
        }
    };
    for path in files {
        let outcome = apply(&path, maps);
        metrics.registration(outcome);
    }
}

fn apply(path: &std::path::Path, maps: &Mutex<Maps>) -> Outcome {
    let Ok(mut maps) = maps.lock() else {
        return Outcome::Error;
    };
    let set_aside = |suffix| {
        if let Err(e) = registrations::set_aside(path, suffix) {
            tracing::warn!(path = %path.display(), "cannot set the file aside: {e}");
        }
    };
    match registrations::decide(path) {
        Decision::Load {
            netns_cookie,
            config,
        } => {
            if let Err(e) = maps.insert_pod(netns_cookie, &config) {
                tracing::warn!(path = %path.display(), "meshed_pods update failed (retried): {}", describe(&e));
                return Outcome::Error;
            }
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), "loaded but not deleted: {e}");
            }
            tracing::info!(netns_cookie, "pod registered");
            Outcome::Loaded
        }
        Decision::Invalid(e) => {
            tracing::warn!(path = %path.display(), "invalid registration, set aside as .invalid: {e}");
            set_aside("invalid");
            Outcome::Invalid
        }
        Decision::Refused {
            netns_cookie,
            reason,
        } => {
            // An earlier registration of the same pod must not stay half right.
            if let Err(e) = maps.remove_pod(netns_cookie) {
                tracing::warn!(netns_cookie, "removing the earlier entry: {}", describe(&e));
            }
            tracing::warn!(
                path = %path.display(),
                netns_cookie,
                "registration refused, the pod stays on iptables (set aside as .refused): {reason}"
            );
            set_aside("refused");
            Outcome::Refused
        }
    }
}
