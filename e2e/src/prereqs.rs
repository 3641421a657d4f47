//! Where the harness finds etcd, kube-apiserver, kube-controller-manager and kubectl, and
//! the node tier's tools (containerd, runc, the CNI plugins, ...). A missing one is an
//! error saying what to install.

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

/// The node tier's tools on `PATH` and the Debian package of each.
pub const NODE_TOOLS: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("containerd-shim-runc-v2", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("conntrack", "conntrack"),
    ("iptables", "iptables"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("ip", "iproute2"),
];

/// The CNI plugins the node's pod network uses (Debian's containernetworking-plugins).
pub const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];

/// How to get every node tool at once.
const NODE_APT: &str = "apt-get install containerd runc containernetworking-plugins conntrack iptables util-linux iproute2 (or run e2e/cluster/provision.sh as root)";

/// Checks the node tier's tools (found by `lookup`, normally [`on_path`]), its CNI plugins
/// in `cni_dir` and that the caller is `root`; the tools' paths, or what to install.
pub fn node_tools(
    lookup: impl Fn(&str) -> Option<PathBuf>,
    cni_dir: &Path,
    root: bool,
) -> Result<Vec<PathBuf>, HarnessError> {
    let mut found = Vec::new();
    for (name, pkg) in NODE_TOOLS {
        found.push(lookup(name).ok_or_else(|| HarnessError::Missing {
            what: format!("{name} is not on PATH (Debian package {pkg})"),
            how: NODE_APT.to_owned(),
        })?);
    }
    for plugin in CNI_PLUGINS {
        let p = cni_dir.join(plugin);
        if !p.is_file() {
            return Err(HarnessError::Missing {
                what: format!(
                    "the CNI plugin {} (Debian package containernetworking-plugins)",
                    p.display()
                ),
                how: NODE_APT.to_owned(),
            });
        }
    }
    if !root {
        return Err(HarnessError::Missing {
            what: "root: the node tier creates network namespaces, cgroups and mounts".to_owned(),
            how: "run the node tier as root, or opt out with REMORA_SKIP_NODE=1".to_owned(),
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cni_dir(plugins: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for p in plugins {
            std::fs::write(dir.path().join(p), "").expect("plugin file");
        }
        dir
    }

    fn all_but(missing: &'static str) -> impl Fn(&str) -> Option<PathBuf> {
        move |name| (name != missing).then(|| PathBuf::from("/usr/bin").join(name))
    }

    #[test]
    fn every_node_tool_present_passes() {
        let cni = cni_dir(CNI_PLUGINS);
        let found = node_tools(all_but(""), cni.path(), true).expect("all there");
        assert_eq!(found.len(), NODE_TOOLS.len());
    }

    #[test]
    fn a_missing_node_tool_names_itself_and_its_package() {
        let cni = cni_dir(CNI_PLUGINS);
        for (tool, pkg) in NODE_TOOLS {
            let msg = node_tools(all_but(tool), cni.path(), true)
                .expect_err(tool)
                .to_string();
            assert!(
                msg.starts_with("missing prerequisite: ")
                    && msg.contains(&format!("{tool} is not on PATH (Debian package {pkg})"))
                    && msg.contains("apt-get install")
                    && msg.contains(pkg),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_missing_cni_plugin_or_root_says_what_to_do() {
        let cni = cni_dir(&["bridge", "loopback"]);
        let msg = node_tools(all_but(""), cni.path(), true)
            .expect_err("host-local missing")
            .to_string();
        assert!(
            msg.contains("host-local") && msg.contains("containernetworking-plugins"),
            "{msg}"
        );
        let cni = cni_dir(CNI_PLUGINS);
        let msg = node_tools(all_but(""), cni.path(), false)
            .expect_err("not root")
            .to_string();
        assert!(msg.contains("REMORA_SKIP_NODE=1"), "{msg}");
    }

    #[test]
    fn a_missing_kubernetes_binary_points_at_the_provisioning_script() {
        let dir = tempfile::tempdir().expect("tempdir");
        let msg = k8s_binary(dir.path(), "kubelet")
            .expect_err("absent")
            .to_string();
        assert!(
            msg.contains("kubelet") && msg.contains("e2e/cluster/provision.sh"),
            "{msg}"
        );
        // Present but not executable is missing too.
        std::fs::write(dir.path().join("kube-proxy"), "").expect("file");
        assert!(k8s_binary(dir.path(), "kube-proxy").is_err());
        let msg = system_binary("remora-no-such-tool", "remora-pkg")
            .expect_err("absent")
            .to_string();
        assert!(msg.contains("apt-get install remora-pkg"), "{msg}");
    }
}
