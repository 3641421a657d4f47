//! The accelerated Remora pair of the pair bench (issue 14): the same `remora-proxy` build
//! and config as the **remora** path, in pods of its own, with the `remora-accel` agent
//! (`make bench` builds it in release) taking the app↔proxy hops out of the TCP stack:
//! `connect4` sends the load generator's connections straight to proxy A,
//! `getsockopt(SO_ORIGINAL_DST)` is answered from a map, and `sk_msg` hands each send on
//! the app↔proxy sockets to the peer's receive queue. The iptables rules stay (the
//! fallback), as in a pod.
//!
//! The agent's programs are attached to a cgroup v2 of the bench's own
//! (`/sys/fs/cgroup/unified/remora-bench-<pid>`, or under `/sys/fs/cgroup` on a pure v2
//! host) that holds only this pair's processes: the bench steps into it while it starts
//! them and while it runs their load generator ([`Node::enter`]), so they inherit it, and
//! steps back out. It pins under a bpffs of its own (a temporary mount), and both pods are
//! registered with a netns cookie read inside each pod (`pair --netns-cookie`, this program
//! re-executed there) and the capture lists of the bench's rules. On drop: the agent is
//! stopped, `remora-accel --cleanup` detaches and unpins, the bpffs is unmounted and the
//! cgroup removed.
//!
//! The agent's counters are checked after the run ([`Node::check`]): a pair that was not
//! actually redirected must not be reported as accelerated.
//!
//! Two pairs, one per agent mode ([`Mode`]): **accel**, the default (only the apps' sends
//! are handed over, to the proxies' sockets), and **accel-both**, `--redirect-to-app` (the
//! proxies' sends to the apps' sockets too). Each has its own agent, cgroup and bpffs; the
//! cgroups are siblings, so each agent's programs see only its own pair's sockets.
//! `REMORA_BENCH_SKIP_ACCEL_BOTH=1` leaves the second out.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use remora_init::{
    accel::Registration,
    config::{Config, PortRange},
};

use crate::netns::{Netns, Proc};

/// Opts out of the accelerated pairs (documented in the README).
pub const SKIP_ENV: &str = "REMORA_BENCH_SKIP_ACCEL";

/// Opts out of the both-directions pair only.
pub const SKIP_BOTH_ENV: &str = "REMORA_BENCH_SKIP_ACCEL_BOTH";

/// Opts out of the accelerated floor pair only (the floor's own opt-out does too).
pub const SKIP_FLOOR_ENV: &str = "REMORA_BENCH_SKIP_ACCEL_FLOOR";

/// Which pair the agent accelerates, and which sends it hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The Remora pair, the default mode: the apps' sends, to the proxies' sockets.
    AppToProxy,
    /// The Remora pair, `--redirect-to-app`: the proxies' sends to the apps' sockets too.
    Both,
    /// The floor's TCP relay pair, the default mode: the control measurement. What the
    /// agent saves on a sidecar that does nothing but the hops is the most it can save on
    /// any sidecar; set beside what it saves on Remora, it tells how much of Remora's cost
    /// is the hops at all.
    Floor,
}

impl Mode {
    /// The modes to measure, less those opted out.
    pub fn wanted(with_floor: bool) -> Vec<Self> {
        let skip = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
        let mut modes = vec![Self::AppToProxy];
        if !skip(SKIP_BOTH_ENV) {
            modes.push(Self::Both);
        }
        if with_floor && !skip(SKIP_FLOOR_ENV) {
            modes.push(Self::Floor);
        }
        modes
    }

    /// The pair's name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Self::AppToProxy => "accel",
            Self::Both => "accel-both",
            Self::Floor => "accel-floor",
        }
    }

    /// The letter of the pair's namespaces.
    pub fn pod(self) -> char {
        match self {
            Self::AppToProxy => 'a',
            Self::Both => 'w',
            Self::Floor => 'r',
        }
    }

    /// The plain pair this one is the accelerated twin of.
    pub fn plain(self) -> &'static str {
        match self {
            Self::AppToProxy | Self::Both => "remora",
            Self::Floor => "floor",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::AppToProxy => "app -> proxy only (the default)",
            Self::Both => "both directions (--redirect-to-app)",
            Self::Floor => "the floor's relays, app -> relay only (the default)",
        }
    }
}

/// The agent's metrics address, inside the accelerated client pod.
const METRICS: &str = "127.0.0.1:15090";

/// The `remora-accel` binary beside this bench in the target directory (`make bench`
/// builds it); `None` when opted out.
pub fn binary() -> anyhow::Result<Option<PathBuf>> {
    if std::env::var(SKIP_ENV).is_ok_and(|v| !v.is_empty()) {
        return Ok(None);
    }
    let me = std::env::current_exe()?;
    let bin = me
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("remora-accel"))
        .filter(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no remora-accel beside {}: run the bench with `make bench` (cargo build --release -p remora-accel), or opt out with {SKIP_ENV}=1",
                me.display()
            )
        })?;
    Ok(Some(bin))
}

/// The capture configuration of the bench's rules (`pods` in `pair.rs`): IPv4 only, the
/// direct ports left out.
pub fn config(direct_ports: &[u16]) -> Config {
    Config {
        skip_outbound_ports: direct_ports.iter().map(|p| PortRange::single(*p)).collect(),
        ipv6: false,
        ..Config::default()
    }
}

/// Prints the netns cookie of the namespace this process runs in (`--netns-cookie`).
pub fn print_netns_cookie() -> anyhow::Result<()> {
    println!("{}", remora_init::accel::current_netns_cookie()?);
    Ok(())
}

/// The agent and everything it needs on the node. Field order is drop order.
pub struct Node {
    pub mode: Mode,
    agent: Option<Proc>,
    bin: PathBuf,
    registrations: tempfile::TempDir,
    bpffs: tempfile::TempDir,
    cgroup: PathBuf,
    origin: PathBuf,
    log: PathBuf,
}

impl Node {
    /// A cgroup, a bpffs and a registrations directory of the bench's own; no agent yet.
    pub fn new(bin: PathBuf, mode: Mode) -> anyhow::Result<Self> {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.subtree_control").exists())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no cgroup v2 hierarchy at /sys/fs/cgroup/unified or /sys/fs/cgroup: the accelerated pair needs one; opt out with {SKIP_ENV}=1"
                )
            })?;
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| anyhow::anyhow!("no cgroup v2 line in /proc/self/cgroup"))?;
        let origin = root.join(rel.trim_start_matches('/'));
        let cgroup = root.join(format!(
            "remora-bench-{}-{}",
            std::process::id(),
            mode.name()
        ));
        let _ = fs::remove_dir(&cgroup);
        fs::create_dir(&cgroup)?;
        let bpffs = tempfile::tempdir()?;
        let registrations = tempfile::tempdir()?;
        let log = registrations.path().with_extension("agent.log");
        let node = Self {
            mode,
            agent: None,
            bin,
            registrations,
            bpffs,
            cgroup,
            origin,
            log,
        };
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(node.bpffs.path())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "cannot mount a bpffs (the kernel lacks BPF?): {}; opt out with {SKIP_ENV}=1",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(node)
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--cgroup".into(),
            self.cgroup.display().to_string(),
            "--bpffs".into(),
            self.bpffs.path().join("remora").display().to_string(),
        ]
    }

    /// Starts the agent in `ns` (its metrics port there) and waits until it is attached.
    pub fn start_agent(&mut self, ns: &Netns) -> anyhow::Result<()> {
        let file = fs::File::create(&self.log)?;
        let bin = self.bin.display().to_string();
        let regs = self.registrations.path().display().to_string();
        let flags = self.flags();
        let mut args = vec![bin.as_str()];
        args.extend(flags.iter().map(String::as_str));
        args.extend(["--registrations", &regs, "--metrics-addr", METRICS]);
        args.extend(["--poll", "100"]);
        if self.mode == Mode::Both {
            args.push("--redirect-to-app");
        }
        // nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup mounts.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .arg("--")
            .args(&args)
            // The mode is the flag's, not the bench's environment's.
            .env_remove("REMORA_ACCEL_REDIRECT_TO_APP")
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()?;
        let mut agent = Proc {
            child,
            what: "remora-accel".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains("remora-accel: ready") {
                break;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                anyhow::bail!("remora-accel exited ({status}) before it was ready:\n{text}");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "remora-accel not ready after 30 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.agent = Some(agent);
        Ok(())
    }

    /// Registers the pod `ns` with `config`, its netns cookie read inside it by this
    /// program re-executed there, and waits until the agent has taken it.
    pub fn register(&self, ns: &Netns, me: &str, config: &Config) -> anyhow::Result<()> {
        let out = ns.cmd(&[me, "--netns-cookie"]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let cookie: u64 = text
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("netns cookie of {}: {text:?}: {e}", ns.name))?;
        let path = Registration::new(cookie, config).write_into(self.registrations.path())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while path.exists() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent did not take {}:\n{}",
                path.display(),
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Moves this process into the pair's cgroup until the guard drops: what it starts
    /// meanwhile is the pair's.
    pub fn enter(&self) -> anyhow::Result<Inside<'_>> {
        fs::write(
            self.cgroup.join("cgroup.procs"),
            std::process::id().to_string(),
        )?;
        Ok(Inside(self))
    }

    /// The agent's counters (`/metrics`, read in `ns`): fails unless the app↔proxy hops
    /// were redirected; the summary line for the table.
    pub fn check(&self, ns: &Netns) -> anyhow::Result<String> {
        let out = ns
            .cmd(&[
                "curl",
                "-sS",
                "-m",
                "5",
                &format!("http://{METRICS}/metrics"),
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let sum = |prefix: &str| -> u64 {
            text.lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .map(|v| v as u64)
                .sum()
        };
        let connects = sum("remora_accel_connects_redirected_total");
        let messages = sum("remora_accel_messages_redirected_total");
        let sockets = sum("remora_accel_sockets_accelerated_total");
        let fallbacks = sum("remora_accel_message_fallbacks_total")
            + sum("remora_accel_unread_limit_fallbacks_total");
        let orig = sum("remora_accel_orig_dst_served_total");
        anyhow::ensure!(
            connects > 0 && messages > 0 && orig > 0,
            "the accelerated pair was not accelerated (connects redirected {connects}, messages redirected {messages}, original destinations served {orig}):\n{text}\n{}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
        Ok(format!(
            "{} agent, sends handed over {}: {connects} connects redirected, {orig} original destinations served, {sockets} sockets in the map, {messages} messages redirected, {fallbacks} sends back to TCP",
            self.mode.name(),
            self.mode.describe(),
        ))
    }
}

/// The bench process inside the pair's cgroup; back in its own on drop.
pub struct Inside<'a>(&'a Node);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        let _ = fs::write(
            self.0.origin.join("cgroup.procs"),
            std::process::id().to_string(),
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.child.kill();
            let _ = agent.child.wait();
        }
        let _ = Command::new(&self.bin)
            .arg("--cleanup")
            .args(self.flags())
            .output();
        let ok = Command::new("umount")
            .arg(self.bpffs.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.bpffs.path())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.cgroup).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
