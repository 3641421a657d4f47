//! The command line (`remora-accel --help`); every flag has an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clap::builder::BoolishValueParser;

/// Remora's eBPF socket accelerator, the node agent: loads and attaches the programs
/// (connect4/connect6, sockops, sk_msg, getsockopt) to a cgroup v2 with pinned BPF
/// links, feeds the map of meshed pods from the registrations their init containers
/// write, and serves /metrics and /ready. SIGTERM leaves the programs attached;
/// `--cleanup` removes them.
#[derive(Debug, Clone, Parser)]
#[command(name = "remora-accel", version)]
pub struct Cli {
    /// Detach and unpin everything under --bpffs, remove that directory, and exit
    /// (exits 0 when nothing was there).
    #[arg(long)]
    pub cleanup: bool,

    /// The cgroup v2 directory the programs are attached to (they see the sockets of
    /// every process below it). Default: the cgroup v2 root under --cgroup-root.
    #[arg(long, env = "REMORA_ACCEL_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// Where the host's cgroup tree is, searched when --cgroup is not given: the cgroup v2
    /// root is this directory on a pure v2 host, its `unified` on a hybrid (v1 + v2) one.
    #[arg(
        long,
        env = "REMORA_ACCEL_CGROUP_ROOT",
        default_value = "/sys/fs/cgroup"
    )]
    pub cgroup_root: PathBuf,

    /// The directory of the pinned links and maps; it or its parent must be a mounted
    /// BPF filesystem (`mount -t bpf bpf /sys/fs/bpf`).
    #[arg(long, env = "REMORA_ACCEL_BPFFS", default_value = "/sys/fs/bpf/remora")]
    pub bpffs: PathBuf,

    /// Where pods' init containers write their registrations (`<netns cookie>.json`).
    #[arg(
        long,
        env = "REMORA_ACCEL_REGISTRATIONS",
        default_value = remora_init::accel::DEFAULT_REGISTRATION_DIR
    )]
    pub registrations: PathBuf,

    /// Address of the HTTP server for /metrics (Prometheus text) and /ready.
    #[arg(
        long,
        env = "REMORA_ACCEL_METRICS_ADDR",
        default_value = "0.0.0.0:15090"
    )]
    pub metrics_addr: SocketAddr,

    /// Also hand the proxy's sends straight to the app's sockets (both loopback hops
    /// accelerated in both directions). Off by default: a socket that receives through
    /// the sockhash can see a blocking recv() fail with EAGAIN on Linux 6.18 (see
    /// accel/README.md); turn it on only when every app of the node reads with
    /// non-blocking sockets. Without it only the app's sends are accelerated.
    #[arg(long, env = "REMORA_ACCEL_REDIRECT_TO_APP", value_parser = BoolishValueParser::new(),
          action = clap::ArgAction::SetTrue)]
    pub redirect_to_app: bool,

    /// How often the registrations directory is read, in milliseconds.
    #[arg(
        long,
        env = "REMORA_ACCEL_POLL_MS",
        default_value_t = 500,
        value_parser = clap::value_parser!(u64).range(1..=3_600_000)
    )]
    pub poll: u64,
}

impl Cli {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_flags() -> Result<(), clap::Error> {
        let d = Cli::try_parse_from(["remora-accel"])?;
        assert!(!d.cleanup);
        assert!(!d.redirect_to_app);
        assert_eq!(d.cgroup, None);
        assert_eq!(d.cgroup_root, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(d.bpffs, PathBuf::from("/sys/fs/bpf/remora"));
        assert_eq!(d.registrations, PathBuf::from("/run/remora/accel"));
        assert_eq!(d.poll_interval(), Duration::from_millis(500));
        let c = Cli::try_parse_from([
            "remora-accel",
            "--cleanup",
            "--cgroup",
            "/sys/fs/cgroup/unified/test",
            "--bpffs",
            "/tmp/b/remora",
            "--metrics-addr",
            "127.0.0.1:0",
            "--poll",
            "50",
        ])?;
        assert!(c.cleanup);
        assert_eq!(c.cgroup, Some(PathBuf::from("/sys/fs/cgroup/unified/test")));
        let r = Cli::try_parse_from(["remora-accel", "--cgroup-root", "/host/sys/fs/cgroup"])?;
        assert_eq!(r.cgroup_root, PathBuf::from("/host/sys/fs/cgroup"));
        assert_eq!(c.metrics_addr, "127.0.0.1:0".parse().expect("addr"));
        assert!(Cli::try_parse_from(["remora-accel", "--poll", "0"]).is_err());
        assert!(Cli::try_parse_from(["remora-accel", "--metrics-addr", "nope"]).is_err());
        Ok(())
    }
}
