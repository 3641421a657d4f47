//! The iptables backend (nf_tables or legacy x_tables): the programs of each, and the
//! detection of the one in use.
//!
//! Both backends can be present on a node, and rules written through one are invisible
//! to the other's tools, so remora-init must write (and later clean up) through the one
//! the namespace already uses. Detection, unless a backend is forced with `--backend`:
//! the backend that already holds Remora's chains wins; otherwise the one holding more
//! rules; on a tie (typically an empty pod namespace) nf_tables, when its tools work.

use std::fmt;
use std::process::Command;
use std::str::FromStr;

use crate::config::Family;
use crate::installed::Installed;

/// An iptables backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft`: iptables rules stored in nf_tables.
    Nft,
    /// `iptables-legacy`: the x_tables kernel interface.
    Legacy,
}

impl Backend {
    /// The program that applies rules for `family` (`iptables-nft-restore`, ...).
    pub fn restore_program(self, family: Family) -> String {
        format!("{}-{}-restore", prefix(family), self.suffix())
    }

    /// The program that prints rules for `family` (`iptables-nft-save`, ...).
    pub fn save_program(self, family: Family) -> String {
        format!("{}-{}-save", prefix(family), self.suffix())
    }

    fn suffix(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }
}

fn prefix(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix())
    }
}

/// `--backend`: `auto` (detect), `nft` or `legacy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// Detect the backend in use.
    Auto,
    /// Use this backend.
    Forced(Backend),
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(BackendChoice::Auto),
            "nft" | "nf_tables" => Ok(BackendChoice::Forced(Backend::Nft)),
            "legacy" => Ok(BackendChoice::Forced(Backend::Legacy)),
            other => Err(format!(
                "unknown backend '{other}'; expected auto, nft or legacy"
            )),
        }
    }
}

/// The tools of a backend could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A program could not be started.
    #[error("cannot run {program}: {source} (install the iptables package)")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Neither backend works.
    #[error("no working iptables backend: nft: {nft}; legacy: {legacy}")]
    NoneWorks {
        /// Why nft does not work.
        nft: Box<BackendError>,
        /// Why legacy does not work.
        legacy: Box<BackendError>,
    },
}

/// Runs `program args...` and returns its stdout, or why it failed.
pub fn run_save(program: &str, args: &[&str]) -> Result<String, BackendError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| BackendError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(BackendError::Failed {
            program: program.to_string(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What one backend holds in the tables of `families` (read without creating any
/// table); fails when a tool of the backend does not work.
fn survey(backend: Backend, families: &[Family]) -> Result<Installed, BackendError> {
    let mut all = Installed::default();
    for family in families {
        let found = Installed::parse(&run_save(&backend.save_program(*family), &[])?);
        all.chains.extend(found.chains);
        all.jumps.extend(found.jumps);
        all.rule_count += found.rule_count;
    }
    Ok(all)
}

/// Picks the backend from what each one holds (`None`: its tools do not work); pure,
/// see the module docs. With neither working it answers nf_tables, the modern default.
pub fn choose(nft: Option<&Installed>, legacy: Option<&Installed>) -> Backend {
    match (nft, legacy) {
        (None, Some(_)) => Backend::Legacy,
        (None, None) | (Some(_), None) => Backend::Nft,
        (Some(n), Some(l)) => {
            let legacy_wins = if n.is_empty() != l.is_empty() {
                !l.is_empty()
            } else {
                l.rule_count > n.rule_count
            };
            if legacy_wins {
                Backend::Legacy
            } else {
                Backend::Nft
            }
        }
    }
}

/// Resolves `--backend` for the families to be written: a forced backend must have
/// working tools for each of them; `auto` detects among the backends that do.
pub fn resolve(choice: BackendChoice, families: &[Family]) -> Result<Backend, BackendError> {
    match choice {
        BackendChoice::Forced(b) => survey(b, families).map(|_| b),
        BackendChoice::Auto => match (
            survey(Backend::Nft, families),
            survey(Backend::Legacy, families),
        ) {
            (Err(nft), Err(legacy)) => Err(BackendError::NoneWorks {
                nft: Box::new(nft),
                legacy: Box::new(legacy),
            }),
            (nft, legacy) => Ok(choose(nft.as_ref().ok(), legacy.as_ref().ok())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(rules: usize, ours: bool) -> Installed {
        Installed {
            chains: if ours {
                vec!["REMORA_OUTPUT".into()]
            } else {
                vec![]
            },
            jumps: vec![],
            rule_count: rules,
        }
    }

    #[test]
    fn program_names() {
        assert_eq!(
            Backend::Nft.restore_program(Family::V4),
            "iptables-nft-restore"
        );
        assert_eq!(
            Backend::Legacy.save_program(Family::V6),
            "ip6tables-legacy-save"
        );
    }

    #[test]
    fn detection() {
        let empty = with(0, false);
        assert_eq!(choose(Some(&empty), Some(&empty)), Backend::Nft);
        assert_eq!(choose(Some(&empty), Some(&with(3, false))), Backend::Legacy);
        assert_eq!(
            choose(Some(&with(9, false)), Some(&with(1, true))),
            Backend::Legacy
        );
        assert_eq!(
            choose(Some(&with(1, true)), Some(&with(9, false))),
            Backend::Nft
        );
        assert_eq!(
            choose(Some(&with(2, true)), Some(&with(9, true))),
            Backend::Legacy
        );
        assert_eq!(choose(None, Some(&empty)), Backend::Legacy);
    }

    #[test]
    fn parses_choice() {
        assert_eq!("auto".parse(), Ok(BackendChoice::Auto));
        assert_eq!("legacy".parse(), Ok(BackendChoice::Forced(Backend::Legacy)));
        assert!("iptables".parse::<BackendChoice>().is_err());
    }
}
