//! Stopping a node and checking that it left nothing behind: processes killed by PID
//! (kubelet first, then kube-proxy, the scheduler, containerd, the control plane, then
//! whatever is left in the node's cgroup), the mount namespace released, the network
//! namespace and cgroups removed, the kernel settings restored, then a search for
//! leftovers (mounts, processes, the namespace, changed settings).

use std::{process::Command, time::Duration};

use super::{Node, netns::run};

/// What teardown found and did.
#[derive(Debug, Default)]
pub struct Teardown {
    /// Kernel settings that had changed and were written back (`key: now -> saved`).
    pub restored_sysctls: Vec<String>,
    /// Anything left behind: mounts, processes, the namespace, cgroups, settings.
    pub problems: Vec<String>,
}

impl Node {
    pub(super) fn teardown(&mut self) -> Teardown {
        let mut report = Teardown::default();
        if self.torn_down {
            return report;
        }
        self.torn_down = true;
        self.forwarder = None;
        self.dns = None;
        // kubelet first (nothing restarts containers), then kube-proxy, the scheduler and
        // containerd: each killed by PID and reaped.
        for name in ["kubelet", "kube-proxy", "kube-scheduler", "containerd"] {
            self.processes.retain(|p| p.name() != name);
        }
        self.processes.clear();
        // The control plane: controller-manager, apiserver, etcd, by PID.
        self.cluster = None;
        // Shims and containers: whatever is left in the node's cgroups.
        if let Some(Err(e)) = self
            .cgroup
            .as_ref()
            .map(|cg| cg.kill_all(Duration::from_secs(15)))
        {
            report.problems.push(e.to_string());
        }
        // The last process in the node's mount namespace: its mounts go with it.
        self.holder = None;
        if let Some(Err(e)) = self.netns.take().map(|mut ns| ns.delete()) {
            report.problems.push(e.to_string());
        }
        if let Some(cg) = self.cgroup.take() {
            report
                .problems
                .extend(cg.remove().into_iter().map(|d| format!("cgroup left: {d}")));
        }
        for d in self.created_dirs.drain(..).rev() {
            if std::fs::remove_dir(&d).is_err() {
                report
                    .problems
                    .push(format!("could not remove {} (not empty?)", d.display()));
            }
        }
        match self.sysctls.restore() {
            Ok(changed) => report.restored_sysctls = changed,
            Err(e) => report.problems.push(e.to_string()),
        }
        report.problems.extend(self.leftovers());
        let keep = std::env::var_os("REMORA_E2E_KEEP").is_some() || std::thread::panicking();
        if let Some(dir) = self.dir.take() {
            if keep {
                eprintln!("remora-e2e: kept node directory {}", dir.keep().display());
            } else if let Err(e) = dir.close() {
                report
                    .problems
                    .push(format!("removing the node directory: {e}"));
            }
        }
        report
    }

    /// What the node could have left behind: mounts of its run directory or namespace,
    /// processes mentioning its run directory, the namespace, changed settings.
    fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        let run_dir = self.layout.run.display().to_string();
        let name = &self.layout.name;
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            found.extend(
                mounts
                    .lines()
                    .filter(|l| l.contains(&run_dir) || l.contains(name.as_str()))
                    .map(|l| format!("mount left: {l}")),
            );
        }
        let namespaces = run(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
        if namespaces
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str()))
        {
            found.push(format!("network namespace {name} still exists"));
        }
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains(&run_dir) {
                    found.push(format!("process left: {pid} {cmdline}"));
                }
            }
        }
        found.extend(
            self.sysctls
                .differences()
                .into_iter()
                .map(|d| format!("sysctl changed: {d}")),
        );
        found
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for p in self.teardown().problems {
            eprintln!("remora-e2e: node teardown: {p}");
        }
    }
}
