//! The thin side-effecting executor: reads what is installed, then applies or removes
//! Remora's rules with one `iptables-restore --noflush` transaction per family.
//!
//! Each transaction is atomic. Across families, a failure applying IPv6 after IPv4
//! succeeded removes the IPv4 rules again, so a failed run leaves no partial rule set.

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::backend::{Backend, BackendError, run_save};
use crate::config::{Config, Family};
use crate::installed::Installed;
use crate::rules;

/// Seconds `iptables-restore` waits for the xtables lock held by another writer.
const LOCK_WAIT_SECS: &str = "10";

/// Applying or removing rules failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Reading the current rules failed.
    #[error("reading the {family} rules: {source}")]
    Read {
        /// The family.
        family: Family,
        /// Why.
        source: BackendError,
    },
    /// A restore program could not be started.
    #[error("cannot run {program}: {source} (install the iptables package)")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// A restore transaction was rejected; nothing of it was applied.
    #[error("{program} --noflush rejected the {family} rules ({status}): {stderr}")]
    Restore {
        /// The program.
        program: String,
        /// The family.
        family: Family,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A later family failed; the families applied before it were removed again.
    #[error("{source}; the rules already applied for {rolled_back} were removed again")]
    RolledBack {
        /// The failure.
        source: Box<ExecError>,
        /// The families rolled back.
        rolled_back: String,
    },
    /// A later family failed, and removing the earlier ones failed too.
    #[error("{source}; removing the rules already applied failed as well: {rollback}")]
    RollbackFailed {
        /// The failure.
        source: Box<ExecError>,
        /// Why the rollback failed.
        rollback: Box<ExecError>,
    },
}

/// Applies and removes Remora's rules through one backend.
#[derive(Debug, Clone, Copy)]
pub struct Executor {
    backend: Backend,
}

impl Executor {
    /// An executor writing through `backend`.
    pub fn new(backend: Backend) -> Self {
        Self { backend }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// What is installed for `family` now.
    pub fn installed(&self, family: Family) -> Result<Installed, ExecError> {
        run_save(&self.backend.save_program(family), &[])
            .map(|s| Installed::parse(&s))
            .map_err(|source| ExecError::Read { family, source })
    }

    fn restore(&self, family: Family, script: &str) -> Result<(), ExecError> {
        let program = self.backend.restore_program(family);
        let mut child = Command::new(&program)
            .args(["--noflush", "--wait", LOCK_WAIT_SECS])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ExecError::Spawn {
                program: program.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error (the program exited early) shows up in its status below.
            let _ = stdin.write_all(script.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|source| ExecError::Spawn {
                program: program.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ExecError::Restore {
                program,
                family,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    fn apply_family(&self, cfg: &Config, family: Family) -> Result<(), ExecError> {
        let installed = self.installed(family)?;
        let script = rules::build(cfg, family).restore_script(&installed.jumps);
        self.restore(family, &script)
    }

    /// Installs (or replaces) the rules of every configured family; idempotent.
    pub fn apply(&self, cfg: &Config) -> Result<(), ExecError> {
        let mut done: Vec<Family> = Vec::new();
        for family in cfg.families() {
            if let Err(e) = self.apply_family(cfg, family) {
                if done.is_empty() {
                    return Err(e);
                }
                let rollback: Result<(), ExecError> =
                    done.iter().try_for_each(|f| self.cleanup_family(*f));
                return Err(match rollback {
                    Ok(()) => ExecError::RolledBack {
                        source: Box::new(e),
                        rolled_back: done
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    },
                    Err(r) => ExecError::RollbackFailed {
                        source: Box::new(e),
                        rollback: Box::new(r),
                    },
                });
            }
            done.push(family);
        }
        Ok(())
    }

    /// Removes Remora's chains and jumps of one family; a no-op when none are installed.
    pub fn cleanup_family(&self, family: Family) -> Result<(), ExecError> {
        match self.installed(family)?.cleanup_script() {
            Some(script) => self.restore(family, &script),
            None => Ok(()),
        }
    }

    /// Removes Remora's chains and jumps, nothing else, from both families: IPv6 too
    /// when `--ipv6=false` (rules from an earlier run with IPv6 on must not survive), but
    /// then an IPv6 failure (say, a kernel without IPv6) is not an error.
    pub fn cleanup(&self, cfg: &Config) -> Result<(), ExecError> {
        self.cleanup_family(Family::V4)?;
        match self.cleanup_family(Family::V6) {
            Err(e) if cfg.ipv6 => Err(e),
            _ => Ok(()),
        }
    }
}
