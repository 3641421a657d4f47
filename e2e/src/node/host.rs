//! Host state a node touches, and how it is put back: the kernel settings kubelet changes
//! host-wide (saved before start, restored on teardown), and the node's own cgroup in every
//! cgroup hierarchy (processes listed and killed by PID, then the directories removed).

#![allow(unsafe_code)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{HarnessError, io_err};

/// Host-wide settings kubelet 1.20 sets at start-up (`setupKernelTunables`) or that the
/// node's networking could be suspected of changing; the `net.*` ones are per network
/// namespace, read here from the host's, to show they stay untouched.
pub const SYSCTLS: &[&str] = &[
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "kernel/keys/maxkeys",
    "kernel/keys/maxbytes",
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
];

/// Saved values of [`SYSCTLS`] (those that exist on this kernel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctls(Vec<(String, String)>);

impl Sysctls {
    /// Reads the current values.
    pub fn save() -> Self {
        Self(
            SYSCTLS
                .iter()
                .filter_map(|k| {
                    let v = std::fs::read_to_string(Path::new("/proc/sys").join(k)).ok()?;
                    Some(((*k).to_owned(), v.trim().to_owned()))
                })
                .collect(),
        )
    }

    /// Writes back every saved value that differs now; returns `key: now -> saved` for each.
    pub fn restore(&self) -> Result<Vec<String>, HarnessError> {
        let mut changed = Vec::new();
        for (key, saved) in &self.0 {
            let path = Path::new("/proc/sys").join(key);
            let now = std::fs::read_to_string(&path).unwrap_or_default();
            if now.trim() != saved {
                std::fs::write(&path, saved)
                    .map_err(io_err(format!("restoring {}", path.display())))?;
                changed.push(format!("{key}: {} -> {saved}", now.trim()));
            }
        }
        Ok(changed)
    }

    /// The settings whose current value differs from the saved one.
    pub fn differences(&self) -> Vec<String> {
        let now = Self::save();
        self.0
            .iter()
            .filter(|entry| !now.0.contains(entry))
            .map(|(k, v)| format!("{k} was {v}"))
            .collect()
    }
}

/// The node's cgroup `/<name>` in every hierarchy mounted under `/sys/fs/cgroup` (cgroup
/// v1, or the v2 unified root). kubelet's `cgroupRoot` points here, so every pod lives
/// below it, and the node's own processes join `<pids hierarchy>/<name>/node`.
#[derive(Debug)]
pub struct NodeCgroup {
    name: String,
    roots: Vec<PathBuf>,
}

const CGROUP_FS: &str = "/sys/fs/cgroup";

fn hierarchies() -> Result<Vec<PathBuf>, HarnessError> {
    let root = Path::new(CGROUP_FS);
    if root.join("cgroup.controllers").exists() {
        return Ok(vec![root.to_owned()]);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(io_err(format!("listing {CGROUP_FS}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    dirs.sort();
    Ok(dirs)
}

impl NodeCgroup {
    /// Creates `/<name>` (and `/<name>/node`) in every hierarchy; cpuset gets its parent's
    /// CPUs and memory nodes, without which no process could join it.
    pub fn create(name: &str) -> Result<Self, HarnessError> {
        let hs = hierarchies()?;
        let mut created = Self {
            name: name.to_owned(),
            roots: Vec::new(),
        };
        for h in hs {
            let dir = h.join(name);
            for d in [dir.clone(), dir.join("node")] {
                std::fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let parent = d.parent().map(|p| p.join(file));
                    if let Some(value) = parent.and_then(|p| std::fs::read_to_string(p).ok()) {
                        std::fs::write(d.join(file), value.trim())
                            .map_err(io_err(format!("setting {}/{file}", d.display())))?;
                    }
                }
            }
            created.roots.push(dir);
        }
        Ok(created)
    }

    /// The `cgroup.procs` file the node's own processes are written to (the pids
    /// hierarchy, or the unified one).
    pub fn node_procs_file(&self) -> PathBuf {
        self.roots
            .iter()
            .find(|r| r.parent().is_some_and(|h| h.ends_with("pids")))
            .or_else(|| self.roots.first())
            .map(|r| r.join("node/cgroup.procs"))
            .unwrap_or_else(|| {
                PathBuf::from(CGROUP_FS)
                    .join(&self.name)
                    .join("node/cgroup.procs")
            })
    }

    /// Every PID in the node's cgroups, in any hierarchy.
    pub fn pids(&self) -> BTreeSet<u32> {
        let mut pids = BTreeSet::new();
        for root in &self.roots {
            walk(root, &mut |dir| {
                if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                    pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
                }
            });
        }
        pids
    }

    /// Resident memory of every process of the node, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        self.pids().into_iter().map(rss_of).sum()
    }

    /// SIGKILLs every process in the node's cgroups, by PID, until none is left.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), HarnessError> {
        let start = Instant::now();
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            for pid in &pids {
                let Ok(pid) = libc::pid_t::try_from(*pid) else {
                    continue;
                };
                // SAFETY: kill(2) takes plain integers and touches no memory of ours; the PID
                // was just read from the node's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if start.elapsed() > timeout {
                return Err(HarnessError::Timeout {
                    what: format!("the node's processes to exit (cgroup {})", self.name),
                    secs: timeout.as_secs(),
                    last: format!("still running: {pids:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes the node's cgroup directories, deepest first. Returns those that could not
    /// be removed.
    pub fn remove(&self) -> Vec<String> {
        let mut left = Vec::new();
        for root in &self.roots {
            let mut dirs = Vec::new();
            walk(root, &mut |d| dirs.push(d.to_owned()));
            // Deepest first: a cgroup directory can only go once it has no children.
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                // Retried briefly: a killed task leaves its cgroup asynchronously.
                let gone = (0..40).any(|_| {
                    if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(25));
                    false
                });
                if !gone {
                    left.push(d.display().to_string());
                }
            }
        }
        left
    }

    /// Cgroup directories of the node that still exist.
    pub fn remaining(&self) -> Vec<String> {
        self.roots
            .iter()
            .filter(|r| r.exists())
            .map(|r| r.display().to_string())
            .collect()
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    f(dir);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, f);
            }
        }
    }
}

/// `VmRSS` of a process in bytes (0 once it is gone).
pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_sysctls_include_what_kubelet_changes_and_compare_equal_when_untouched() {
        let saved = Sysctls::save();
        let keys: Vec<&str> = saved.0.iter().map(|(k, _)| k.as_str()).collect();
        for k in ["kernel/panic", "vm/overcommit_memory"] {
            assert!(keys.contains(&k), "{k} not saved: {keys:?}");
        }
        assert!(saved.differences().is_empty());
    }

    #[test]
    fn rss_of_this_process_is_positive_and_of_a_missing_one_zero() {
        assert!(rss_of(std::process::id()) > 0);
        assert_eq!(rss_of(u32::MAX), 0);
    }
}
