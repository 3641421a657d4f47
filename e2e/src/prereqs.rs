//! Where the harness finds etcd, kube-apiserver, kube-controller-manager and kubectl.

use std::path::{Path, PathBuf};

use crate::HarnessError;

const PROVISION: &str = "run `e2e/cluster/provision.sh` (or `make test`, which runs it)";

/// The directory holding the kube-apiserver and kube-controller-manager built by
/// `e2e/cluster/provision.sh`: `$REMORA_K8S_BIN`, else `$REMORA_CACHE/k8s-1.20.2/bin`,
/// else `$XDG_CACHE_HOME/remora/…` or `~/.cache/remora/…`.
pub fn k8s_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REMORA_K8S_BIN") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("REMORA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("remora")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/remora")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/remora"));
    cache.join("k8s-1.20.2/bin")
}

fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds `name` on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| executable(p))
}

/// A binary built by the provisioning script, in `dir`.
pub fn k8s_binary(dir: &Path, name: &str) -> Result<PathBuf, HarnessError> {
    let path = dir.join(name);
    if executable(&path) {
        Ok(path)
    } else {
        Err(HarnessError::Missing {
            what: format!("{} (looked for {})", name, path.display()),
            how: format!(
                "{PROVISION}; it builds {name} from Debian's kubernetes source package once and caches it"
            ),
        })
    }
}

/// A binary from a Debian package, found on `PATH`.
pub fn system_binary(name: &str, package: &str) -> Result<PathBuf, HarnessError> {
    on_path(name).ok_or_else(|| HarnessError::Missing {
        what: format!("{name} is not on PATH"),
        how: format!("install Debian's {package} (apt-get install {package}) or {PROVISION}"),
    })
}

/// kubectl, used to render kustomizations.
pub fn kubectl() -> Result<PathBuf, HarnessError> {
    system_binary("kubectl", "kubernetes-client")
}
