//! The registrations directory: every `<cookie>.json` a pod's `remora-init` wrote there
//! (`remora_init::accel::Registration`, written atomically) is read, encoded, put into
//! `meshed_pods` and deleted.
//!
//! Why files rather than watching the API server: only the init container, inside the
//! pod's network namespace, can read that namespace's cookie (`SO_NETNS_COOKIE`), and it
//! knows exactly which capture lists its iptables rules got. The agent then needs no
//! Kubernetes credentials at all, and a registration exists only for a pod whose
//! iptables fallback is already in place.
//!
//! A file that cannot be read as a registration is renamed `<name>.invalid` (kept for
//! the operator to look at, never read again). A registration whose lists do not fit
//! the map value is refused whole, renamed `<name>.refused`, and any earlier entry for
//! the same namespace is removed: that pod stays on its iptables rules.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use remora_init::accel::{Registration, RegistrationError};

use crate::maps::PodConfig;
use crate::pod_config::{DoesNotFit, encode};

/// What one registration file comes to.
#[derive(Debug)]
pub enum Decision {
    /// Put `config` into `meshed_pods` under `netns_cookie`.
    Load {
        netns_cookie: u64,
        config: Box<PodConfig>,
    },
    /// Not a usable registration file.
    Invalid(RegistrationError),
    /// A valid registration that the map value cannot hold.
    Refused {
        netns_cookie: u64,
        reason: DoesNotFit,
    },
}

/// How a registration file was handled (`remora_accel_registrations_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Loaded,
    Invalid,
    Refused,
    /// The map update failed; the file is kept and retried at the next poll.
    Error,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Loaded => "loaded",
            Self::Invalid => "invalid",
            Self::Refused => "refused",
            Self::Error => "error",
        }
    }
}

/// The registration files waiting in `dir`, oldest name first. Temporary files of a
/// writer (`.<name>.tmp`) and files already set aside are not listed.
pub fn pending(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.starts_with('.') && name.ends_with(".json") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads and encodes one registration file.
pub fn decide(path: &Path) -> Decision {
    let (reg, capture) = match Registration::read(path) {
        Ok(r) => r,
        Err(e) => return Decision::Invalid(e),
    };
    match encode(&reg, &capture) {
        Ok(config) => Decision::Load {
            netns_cookie: reg.netns_cookie,
            config: Box::new(config),
        },
        Err(reason) => Decision::Refused {
            netns_cookie: reg.netns_cookie,
            reason,
        },
    }
}

/// Sets a handled file aside under `<name>.<suffix>`.
pub fn set_aside(path: &Path, suffix: &str) -> io::Result<PathBuf> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    let to = path.with_file_name(name);
    fs::rename(path, &to)?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_init::config::Config;

    #[test]
    fn good_bad_and_oversized_registrations() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let good = Registration::new(11, &Config::default()).write_into(dir.path())?;
        let mut big = Registration::new(12, &Config::default());
        big.skip_outbound_ports = (1..=9).map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        let big = big.write_into(dir.path())?;
        fs::write(dir.path().join("13.json"), "{not json")?;
        fs::write(dir.path().join(".14.json.tmp"), "{}")?;
        fs::write(dir.path().join("15.json.invalid"), "{}")?;

        let files = pending(dir.path())?;
        assert_eq!(
            files,
            vec![good.clone(), big.clone(), dir.path().join("13.json")]
        );

        match decide(&good) {
            Decision::Load {
                netns_cookie,
                config,
            } => {
                assert_eq!(netns_cookie, 11);
                assert_eq!(config.outbound_port, Config::default().outbound_port);
            }
            other => return Err(format!("{other:?}").into()),
        }
        match decide(&big) {
            Decision::Refused {
                netns_cookie,
                reason,
            } => {
                assert_eq!(netns_cookie, 12);
                assert_eq!(reason.field, "skipOutboundPorts");
            }
            other => return Err(format!("{other:?}").into()),
        }
        assert!(matches!(decide(&files[2]), Decision::Invalid(_)));

        let aside = set_aside(&files[2], "invalid")?;
        assert_eq!(aside, dir.path().join("13.json.invalid"));
        assert!(!files[2].exists() && aside.exists());
        assert_eq!(pending(dir.path())?.len(), 2);
        assert_eq!(Outcome::Refused.label(), "refused");
        Ok(())
    }
}
