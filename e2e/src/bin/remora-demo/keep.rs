//! `--keep`: the cluster outlives the summary. The node's apiserver forwarder and DNS
//! responder are threads of the process that started the node, so a kept node needs a
//! process that stays: this one starts itself again as `--daemon=DIR` in a process group
//! of its own (Ctrl-C in the terminal does not reach it), follows its log until the
//! cluster is up, shows the summary, and leaves. `--stop DIR` sends that process SIGTERM;
//! it tears the node down as a normal run does and writes what it found left behind to
//! `DIR/stopped`.
//!
//! The state directory holds `pid`, `demo.log` (the daemon's output), `ready` (the
//! kubeconfig, once the cluster is up) and `stopped` (the teardown's findings, one per
//! line; empty when clean).

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use remora_e2e::target::External;
use serde::{Deserialize, Serialize};

use crate::{
    DemoError,
    args::Options,
    bringup::{self, Clock, NAMESPACE},
    live::{self, Live},
    signals::Shutdown,
};

const PREFIX: &str = "remora-demo-";

/// What the daemon tells the foreground once the cluster is up.
#[derive(Debug, Serialize, Deserialize)]
struct Ready {
    pid: u32,
    kubeconfig: PathBuf,
    node: String,
    run_dir: PathBuf,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> DemoError {
    move |source| DemoError::Io { context, source }
}

/// The command that stops the kept demo in `dir`.
pub fn stop_command(dir: &Path) -> String {
    format!("make demo ARGS=\"--stop {}\"", dir.display())
}

/// The foreground of `--keep`.
pub async fn keep(opts: &Options, shutdown: &mut Shutdown) -> Result<(), DemoError> {
    let dir = tempfile::Builder::new()
        .prefix(PREFIX)
        .tempdir()
        .map_err(io("creating the demo's state directory".into()))?
        .keep();
    let log_path = dir.join("demo.log");
    let log = File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
    let err = log.try_clone().map_err(io("duplicating the log".into()))?;
    let exe = std::env::current_exe().map_err(io("locating remora-demo".into()))?;
    let mut child = Command::new(&exe)
        .arg(format!("--daemon={}", dir.display()))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        // Its own process group: the terminal's Ctrl-C stops the summary, not the cluster.
        .process_group(0)
        .spawn()
        .map_err(io(format!("starting {}", exe.display())))?;
    println!(
        "==> the cluster runs in a background process of its own (PID {}); state and log in {}",
        child.id(),
        dir.display()
    );
    let mut follow =
        File::open(&log_path).map_err(io(format!("opening {}", log_path.display())))?;
    let ready_path = dir.join("ready");
    let ready: Ready = loop {
        echo_new(&mut follow);
        if let Ok(text) = std::fs::read_to_string(&ready_path) {
            echo_new(&mut follow);
            break serde_json::from_str(&text)
                .map_err(|e| DemoError::Setup(format!("{}: {e}", ready_path.display())))?;
        }
        if let Ok(Some(status)) = child.try_wait() {
            echo_new(&mut follow);
            return Err(DemoError::Setup(format!(
                "the background demo exited ({status}) before the cluster was up; its log: {}",
                log_path.display()
            )));
        }
        if let Some(signal) = shutdown.received() {
            println!(
                "\n{signal}: no longer following; the cluster keeps coming up in the background.\nIts log: {}\nStop it: {}",
                log_path.display(),
                stop_command(&dir)
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let client = External::new(ready.kubeconfig.clone())?.client().await?;
    let footer = format!(
        "{} ends this summary; the cluster stays up (stop it: {})",
        opts.duration
            .map(|d| format!("Ctrl-C or the end of --duration={}s", d.as_secs()))
            .unwrap_or_else(|| "Ctrl-C".to_owned()),
        stop_command(&dir)
    );
    let checked = live::run(
        Live {
            client,
            namespace: NAMESPACE,
            title: format!(
                "Remora demo · node {} (kept) · namespace {NAMESPACE}",
                ready.node
            ),
            footer,
            duration: opts.duration,
        },
        shutdown,
        || None,
    )
    .await;
    if let Ok(line) = &checked {
        println!("\ncheck: {line}");
    }
    println!(
        "\nThe cluster is still up (remora-demo PID {}, node {}, its logs in {}):\n  export KUBECONFIG={}\n  kubectl -n {NAMESPACE} get pods\nStop it and remove everything it made:\n  {}\n  (or: {} --stop {})",
        ready.pid,
        ready.node,
        ready.run_dir.display(),
        ready.kubeconfig.display(),
        stop_command(&dir),
        exe.display(),
        dir.display()
    );
    checked.map(|_| ())
}

/// Copies what was appended to the daemon's log to our stdout.
fn echo_new(log: &mut File) {
    let mut buf = Vec::new();
    if log.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&buf);
        let _ = out.flush();
    }
}

/// The background process of `--keep`: brings the cluster up, says so in `dir/ready`,
/// and tears it down on SIGTERM (or SIGINT), writing what was left to `dir/stopped`.
pub async fn daemon(dir: &Path, shutdown: &mut Shutdown) -> Result<(), DemoError> {
    write_atomic(&dir.join("pid"), &std::process::id().to_string())?;
    let clock = Clock::start();
    let node = match bringup::start_node(&clock, shutdown).await {
        Ok(n) => n,
        Err(e) => {
            write_atomic(&dir.join("stopped"), "")?;
            return Err(e);
        }
    };
    let outcome = async {
        let phases = tokio::select! {
            up = bringup::install(&node, &clock) => up?,
            signal = shutdown.wait() => return Err(DemoError::Interrupted(signal)),
        };
        println!("==> {}", bringup::report(&phases, &clock));
        let ready = Ready {
            pid: std::process::id(),
            kubeconfig: node.kubeconfig()?.to_owned(),
            node: node.name().to_owned(),
            run_dir: node.run_dir().to_owned(),
        };
        let text = serde_json::to_string(&ready)
            .map_err(|e| DemoError::Setup(format!("encoding the ready file: {e}")))?;
        write_atomic(&dir.join("ready"), &text)?;
        println!(
            "==> up; waiting for SIGTERM (remora-demo --stop {})",
            dir.display()
        );
        let signal = shutdown.wait().await;
        println!("==> {signal}: stopping");
        Ok(())
    }
    .await;
    if let Err(e) = &outcome {
        println!("remora-demo: {e}");
    }
    let problems = crate::stop_node(node, &clock);
    write_atomic(&dir.join("stopped"), &problems.join("\n"))?;
    outcome
}

fn write_atomic(path: &Path, text: &str) -> Result<(), DemoError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("writing {}", path.display())))
}

/// Whether `pid` is the daemon of `dir` (not a process that reused the PID).
fn is_daemon_of(pid: u32, dir: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let want = format!("--daemon={}", dir.display());
    cmdline.split(|b| *b == 0).any(|arg| arg == want.as_bytes())
}

fn read_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The kept demos whose daemon still runs.
fn running_demos() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX))
                && read_pid(p).is_some_and(|pid| is_daemon_of(pid, p))
        })
        .collect();
    found.sort();
    found
}

#[allow(unsafe_code)]
fn terminate(pid: u32) -> Result<(), DemoError> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| DemoError::Setup(format!("PID {pid} out of range")))?;
    // SAFETY: kill(2) takes two integers and touches no memory of this process.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(DemoError::Io {
            context: format!("sending SIGTERM to {pid}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `--stop [DIR]`.
pub async fn stop(dir: Option<PathBuf>) -> Result<(), DemoError> {
    let dir = match dir {
        Some(d) => d,
        None => {
            let mut running = running_demos();
            match running.len() {
                1 => running.remove(0),
                0 => {
                    return Err(DemoError::Setup(format!(
                        "no kept demo is running (none of {}/{PREFIX}* has a live daemon)",
                        std::env::temp_dir().display()
                    )));
                }
                _ => {
                    let list: Vec<String> =
                        running.iter().map(|d| d.display().to_string()).collect();
                    return Err(DemoError::Setup(format!(
                        "several kept demos are running; name one: --stop DIR, DIR one of {}",
                        list.join(", ")
                    )));
                }
            }
        }
    };
    let pid = read_pid(&dir).ok_or_else(|| {
        DemoError::Setup(format!(
            "{} is not a kept demo's directory (no pid file)",
            dir.display()
        ))
    })?;
    let log = dir.join("demo.log");
    let mut follow = File::open(&log).map_err(io(format!("opening {}", log.display())))?;
    let _ = follow.seek(SeekFrom::End(0));
    if is_daemon_of(pid, &dir) {
        println!("==> stopping the demo of {} (PID {pid})", dir.display());
        terminate(pid)?;
        let started = Instant::now();
        while is_daemon_of(pid, &dir) {
            echo_new(&mut follow);
            if started.elapsed() > Duration::from_secs(180) {
                return Err(DemoError::Setup(format!(
                    "PID {pid} still runs 180 s after SIGTERM; its log: {}",
                    log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        echo_new(&mut follow);
    } else {
        println!("==> the demo of {} is no longer running", dir.display());
    }
    let stopped = std::fs::read_to_string(dir.join("stopped")).map_err(|_| {
        DemoError::Setup(format!(
            "the demo ended without a teardown report: processes, mounts or the network namespace may be left; see {}",
            log.display()
        ))
    })?;
    let problems: Vec<String> = stopped
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    if !problems.is_empty() {
        return Err(DemoError::Leftovers(problems));
    }
    std::fs::remove_dir_all(&dir).map_err(io(format!("removing {}", dir.display())))?;
    println!(
        "==> stopped; nothing left behind ({} removed)",
        dir.display()
    );
    Ok(())
}
