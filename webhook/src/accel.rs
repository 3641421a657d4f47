//! What the injector adds when the cluster runs the `remora-accel` socket accelerator
//! (`--accel-registrations DIR`): `remora-init` gets `REMORA_INIT_ACCEL_REGISTRATIONS=DIR`
//! and the node's DIR as a hostPath volume, so that after installing its iptables rules it
//! can leave a registration file for the node's agent.
//!
//! Admission runs before the scheduler picks a node, so the webhook cannot know whether
//! the pod's node runs the agent. The switch is therefore cluster-wide (the agent is a
//! DaemonSet on every node), and a node without the agent costs nothing: the file is
//! never read and the pod's traffic takes the iptables path, which stays installed.

use k8s_openapi::api::core::v1::{EnvVar, HostPathVolumeSource, Volume, VolumeMount};

/// The init container's environment variable (its `--accel-registrations` flag).
pub const INIT_ENV: &str = "REMORA_INIT_ACCEL_REGISTRATIONS";
/// The hostPath volume holding the node's registration directory.
pub const VOLUME: &str = "remora-accel";

/// Why `--accel-registrations` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--accel-registrations: {0:?} must be an absolute directory path without '..' or ':' (e.g. /run/remora/accel)"
)]
pub struct DirError(pub String);

/// Checks the directory: Kubernetes wants absolute hostPath and mount paths, and a mount
/// path cannot hold ':'. Trailing slashes are dropped; empty means off (`None`).
pub fn parse_dir(dir: &str) -> Result<Option<String>, DirError> {
    let dir = dir.trim();
    if dir.is_empty() {
        return Ok(None);
    }
    let trimmed = dir.trim_end_matches('/');
    let bad = !dir.starts_with('/')
        || trimmed.is_empty()
        || dir.contains(':')
        || trimmed.split('/').any(|c| c == ".." || c == ".");
    if bad {
        return Err(DirError(dir.to_owned()));
    }
    Ok(Some(trimmed.to_owned()))
}

/// The init container's environment variable naming `dir`.
pub fn init_env(dir: &str) -> EnvVar {
    EnvVar {
        name: INIT_ENV.to_owned(),
        value: Some(dir.to_owned()),
        value_from: None,
    }
}

/// The init container's mount of the node's `dir` at the same path (read-write: it
/// writes the registration there).
pub fn init_mount(dir: &str) -> VolumeMount {
    VolumeMount {
        name: VOLUME.to_owned(),
        mount_path: dir.to_owned(),
        ..Default::default()
    }
}

/// The node's `dir`, created by the kubelet if the agent has not made it yet.
pub fn volume(dir: &str) -> Volume {
    Volume {
        name: VOLUME.to_owned(),
        host_path: Some(HostPathVolumeSource {
            path: dir.to_owned(),
            type_: Some("DirectoryOrCreate".to_owned()),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_checked() {
        assert_eq!(parse_dir(""), Ok(None));
        assert_eq!(parse_dir("  "), Ok(None));
        assert_eq!(
            parse_dir("/run/remora/accel/"),
            Ok(Some("/run/remora/accel".to_owned()))
        );
        for bad in ["run/remora", "/", "/run/../etc", "/run/./x", "/run:x", "//"] {
            let err = parse_dir(bad).expect_err(bad);
            assert!(err.to_string().contains("--accel-registrations"), "{err}");
        }
    }
}
