//! Which cgroup v2 directory the programs are attached to: `--cgroup` when given, else
//! the cgroup v2 root found under `--cgroup-root` (the host's `/sys/fs/cgroup`, mounted at
//! `/host/sys/fs/cgroup` in the DaemonSet). A pure v2 host mounts cgroup2 there itself; a
//! hybrid (v1 + v2) host mounts it at `unified` below. Finding it here means one manifest
//! fits both kinds of hosts.

use std::path::{Path, PathBuf};

use crate::fsmagic::{self, FsKind};

/// No cgroup v2 to attach to.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "{0} is not a cgroup v2 directory: --cgroup (REMORA_ACCEL_CGROUP) names the cgroup2 \
         mount (/sys/fs/cgroup/unified on a hybrid host, /sys/fs/cgroup on a unified one) \
         or a directory below it"
    )]
    NotCgroup2(PathBuf),
    #[error(
        "no cgroup v2 under {root}: neither it nor {root}/unified is a cgroup2 mount; mount one \
         (mount -t cgroup2 none {root}/unified), point --cgroup-root (REMORA_ACCEL_CGROUP_ROOT) \
         at the host's cgroup tree, or name the directory with --cgroup",
        root = .0.display()
    )]
    NoCgroup2Under(PathBuf),
}

/// The cgroup v2 root under `root`: `root` itself when it is cgroup2 (a pure v2 host),
/// else `root/unified` when that is (a hybrid host), else none.
pub fn find_v2_root(root: &Path, is_cgroup2: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    [root.to_path_buf(), root.join("unified")]
        .into_iter()
        .find(|p| is_cgroup2(p))
}

/// The attach point: `explicit` (checked to be cgroup v2) or the v2 root under `root`.
pub fn attach_point(explicit: Option<&Path>, root: &Path) -> Result<PathBuf, CgroupError> {
    let is_cgroup2 = |p: &Path| fsmagic::is(p, FsKind::Cgroup2).unwrap_or(false);
    match explicit {
        Some(dir) if is_cgroup2(dir) => Ok(dir.to_path_buf()),
        Some(dir) => Err(CgroupError::NotCgroup2(dir.to_path_buf())),
        None => {
            find_v2_root(root, is_cgroup2).ok_or_else(|| CgroupError::NoCgroup2Under(root.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(v2: &'static [&'static str]) -> impl Fn(&Path) -> bool {
        move |p| v2.iter().any(|d| Path::new(d) == p)
    }

    #[test]
    fn pure_v2_hybrid_and_neither() {
        let root = Path::new("/host/sys/fs/cgroup");
        // Pure v2: the root itself, even if something is mounted at unified too.
        assert_eq!(
            find_v2_root(
                root,
                only(&["/host/sys/fs/cgroup", "/host/sys/fs/cgroup/unified"])
            ),
            Some(root.to_path_buf())
        );
        assert_eq!(
            find_v2_root(root, only(&["/host/sys/fs/cgroup/unified"])),
            Some(root.join("unified"))
        );
        // A v1-only host, or a v2 mount somewhere else.
        assert_eq!(find_v2_root(root, only(&[])), None);
        assert_eq!(find_v2_root(root, only(&["/sys/fs/cgroup"])), None);
    }

    #[test]
    fn errors_name_the_way_out() {
        let missing = Path::new("/nonexistent/remora-accel-test");
        let e = attach_point(None, missing).expect_err("no cgroup2 there");
        let text = e.to_string();
        assert!(
            text.contains("--cgroup-root") && text.contains("--cgroup"),
            "{text}"
        );
        assert!(
            text.contains("/nonexistent/remora-accel-test/unified"),
            "{text}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let e = attach_point(Some(dir.path()), missing).expect_err("not cgroup2");
        assert!(
            matches!(e, CgroupError::NotCgroup2(ref p) if p == dir.path()),
            "{e}"
        );
    }

    /// The real statfs on this machine: what is found is a cgroup2 mount, and nothing is
    /// found only when neither candidate is one.
    #[test]
    fn this_host() {
        let root = Path::new("/sys/fs/cgroup");
        let is_v2 = |p: &Path| fsmagic::is(p, FsKind::Cgroup2).unwrap_or(false);
        match attach_point(None, root) {
            Ok(found) => {
                assert!(is_v2(&found), "{}", found.display());
                assert!(
                    found == root || found == root.join("unified"),
                    "{}",
                    found.display()
                );
                assert_eq!(attach_point(Some(&found), root).ok(), Some(found));
            }
            Err(e) => assert!(!is_v2(root) && !is_v2(&root.join("unified")), "{e}"),
        }
    }
}
