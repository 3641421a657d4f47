//! Remora's own binaries run as real processes next to a test cluster: located in the
//! workspace's target directory, logging to the cluster directory, killed by PID on drop.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::{HarnessError, io_err};

/// A workspace binary (`remora-operator`, `remora-webhook`, …) built next to the running
/// executable: tests live in `target/<profile>/deps/`, binaries in `target/<profile>/`.
pub fn workspace_binary(name: &str) -> Result<PathBuf, HarnessError> {
    let exe = std::env::current_exe().map_err(io_err("locating the running executable"))?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| HarnessError::Missing {
            what: format!("the {name} binary (looked in {})", candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")),
            how: "build the workspace's binaries first: `cargo build --workspace --bins` (make test and make demo do)".to_owned(),
        })
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running component. Dropping it kills the process and waits for it.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `binary` with `args` and `env`, stdout and stderr appended to `log_dir/<name>.log`.
    pub fn start<S: AsRef<std::ffi::OsStr>>(
        name: &str,
        binary: &Path,
        args: &[S],
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> Result<Self, HarnessError> {
        let log = log_dir.join(format!("{name}.log"));
        // Appended: a component restarted under the same name keeps its earlier log.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_err(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err("duplicating a log file handle"))?;
        let mut cmd = Command::new(binary);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .map_err(io_err(format!("starting {}", binary.display())))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Starts `binary` through `launcher` (a command that ends by exec'ing its arguments,
    /// such as `nsenter … --`), so that the PID is still the component's own.
    pub fn start_via<S: AsRef<std::ffi::OsStr>>(
        launcher: &[String],
        name: &str,
        binary: &Path,
        args: &[S],
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> Result<Self, HarnessError> {
        let Some((program, prefix)) = launcher.split_first() else {
            return Self::start(name, binary, args, env, log_dir);
        };
        let mut all: Vec<std::ffi::OsString> = prefix.iter().map(Into::into).collect();
        all.push(binary.as_os_str().to_owned());
        all.extend(args.iter().map(|a| a.as_ref().to_owned()));
        Self::start(name, Path::new(program), &all, env, log_dir)
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check_running(&mut self) -> Result<(), HarnessError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(HarnessError::ProcessExited {
                process: self.name.clone(),
                status: status.to_string(),
                log: self.log.display().to_string(),
                tail: tail(&self.log, 25),
            }),
            Ok(None) | Err(_) => Ok(()),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PID, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where its output goes.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over HTTP/1.1 (`Connection: close`): the status code and body, for admin
/// endpoints of the components under test.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((code, body.to_owned()))
}
