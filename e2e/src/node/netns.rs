//! The node's network namespace and mount namespace.
//!
//! The network namespace (`ip netns add remora-node-<id>`) holds only `lo` and the pod
//! bridge: no veth to the host, no default route. The bridge and a route for the Service
//! range are created before anything starts, so kubelet's `--node-ip` exists and a
//! ClusterIP is routable from the node itself until kube-proxy's rules rewrite it.
//!
//! Every component is started with `nsenter`, not `ip netns exec`: the latter also gives
//! each process a private mount namespace with a fresh `/sys` (no cgroup mounts), and
//! kubelet's volume mounts would then be invisible to containerd. Instead one holder
//! process owns a mount namespace (a slave copy of the host's) in which the host paths
//! kubelet and containerd hard-code are bind-mounted from the run directory; every
//! component joins it and the network namespace. When the node's processes are gone, that
//! mount namespace and every mount made in it (volumes, overlays, pod netns) go with it:
//! nothing is ever mounted in the host's mount namespace.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::{HarnessError, components::Process, io_err};

use super::config::{BRIDGE, Layout, NODE_IP, POD_PREFIX, SERVICE_CIDR};

/// Runs a command to completion; fails with its stderr.
pub fn run(cmd: &mut Command) -> Result<String, HarnessError> {
    let described = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(io_err(format!("running {described}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HarnessError::Command {
            command: described,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// A named network namespace; deleted on drop.
#[derive(Debug)]
pub struct NodeNetns {
    name: String,
    path: PathBuf,
    deleted: bool,
}

impl NodeNetns {
    /// Creates the namespace with `lo`, the bridge at the node address, the Service route,
    /// IP forwarding (kube-proxy) and bridged traffic through iptables (a pod reaching a
    /// Service whose endpoint is on the same bridge).
    pub fn create(name: &str) -> Result<Self, HarnessError> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_owned(),
            path: Path::new("/run/netns").join(name),
            deleted: false,
        };
        let ip = |args: &[&str]| run(Command::new("ip").arg("-n").arg(name).args(args));
        ip(&["link", "set", "lo", "up"])?;
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{NODE_IP}/{POD_PREFIX}"),
            "dev",
            BRIDGE,
        ])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        ip(&["route", "add", SERVICE_CIDR, "dev", BRIDGE])?;
        run(ns.command("sysctl").args([
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
            "net.bridge.bridge-nf-call-iptables=1",
        ]))?;
        Ok(ns)
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `program` to be run inside the namespace (network only; the host's filesystem).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// The namespace's addresses and routes, for checks and post-mortems.
    pub fn describe(&self) -> String {
        let addrs =
            run(Command::new("ip").args(["-n", &self.name, "-br", "addr"])).unwrap_or_default();
        let routes = run(Command::new("ip").args(["-n", &self.name, "route"])).unwrap_or_default();
        format!("{addrs}{routes}")
    }

    /// Deletes the namespace. Idempotent.
    pub fn delete(&mut self) -> Result<(), HarnessError> {
        if !self.deleted {
            run(Command::new("ip").args(["netns", "delete", &self.name]))?;
            self.deleted = true;
        }
        Ok(())
    }
}

impl Drop for NodeNetns {
    fn drop(&mut self) {
        let _ = self.delete();
    }
}

/// Starts the holder of the node's mount namespace (inside the network namespace) and
/// waits until its bind mounts are in place.
pub fn start_holder(netns: &NodeNetns, layout: &Layout) -> Result<Process, HarnessError> {
    let ready = layout.run.join("mount-namespace.ready");
    let mut script = String::from("set -e\n");
    for (host, local) in layout.shadowed() {
        script.push_str(&format!(
            "mount --bind '{}' '{}'\n",
            local.display(),
            host.display()
        ));
    }
    script.push_str(&format!(
        "touch '{}'\nexec sleep infinity\n",
        ready.display()
    ));
    let args = [
        format!("--net={}", netns.path().display()),
        "--".to_owned(),
        "unshare".to_owned(),
        "--mount".to_owned(),
        "--propagation".to_owned(),
        "slave".to_owned(),
        "--".to_owned(),
        "sh".to_owned(),
        "-c".to_owned(),
        script,
    ];
    let mut holder = Process::start(
        "mount-namespace",
        Path::new("nsenter"),
        &args,
        &[],
        &layout.run,
    )?;
    let start = Instant::now();
    while !ready.exists() {
        holder.check_running()?;
        if start.elapsed() > Duration::from_secs(10) {
            return Err(HarnessError::Timeout {
                what: "the node's mount namespace".to_owned(),
                secs: 10,
                last: "bind mounts not done".to_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(holder)
}

/// The command prefix every node component is started with: join the holder's network and
/// mount namespaces, move into the node's cgroup, then exec the component (same PID).
pub fn launcher(holder_pid: u32, procs_file: &Path) -> Vec<String> {
    vec![
        "nsenter".to_owned(),
        format!("--target={holder_pid}"),
        "--net".to_owned(),
        "--mount".to_owned(),
        "--".to_owned(),
        "sh".to_owned(),
        "-c".to_owned(),
        format!("echo $$ > '{}' && exec \"$@\"", procs_file.display()),
        "remora-node".to_owned(),
    ]
}
