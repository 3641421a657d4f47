//! The node side of an accelerator test: a cgroup v2 of the test's own, a bpffs mount of
//! its own, a registrations directory, and the `remora-accel` agent (a child process in a
//! network namespace of its own, so that its metrics port cannot meet another test's).
//!
//! The test process itself moves into the cgroup ([`Cgroup::enter`]), so every process it
//! starts afterwards (proxies, apps, clients, the agent) is under it, and the programs the
//! agent attaches there see only this test's sockets. A process-wide lock keeps two tests
//! of one process (plain `cargo test`) from moving it at once; nextest runs each test in a
//! process of its own.
//!
//! Teardown on drop, in this order: the agent is killed, `remora-accel --cleanup` detaches
//! and unpins, the bpffs is unmounted (dropping any pin left), the test process moves back
//! to its original cgroup and the test cgroup is removed (which detaches whatever is still
//! attached to it).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use super::mesh::netns::{Netns, Proc, curl, run, target_bin, wait_for};

/// The agent's metrics address inside its own namespace.
pub const METRICS: &str = "127.0.0.1:15090";

/// Where the kernel's cgroup v2 hierarchy is: `/sys/fs/cgroup/unified` on a hybrid host
/// (this one), `/sys/fs/cgroup` on a pure v2 host.
pub fn cgroup2_root() -> PathBuf {
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let p = Path::new(root);
        if p.join("cgroup.subtree_control").exists() {
            return p.to_path_buf();
        }
    }
    panic!(
        "no cgroup v2 hierarchy at /sys/fs/cgroup/unified or /sys/fs/cgroup: the accelerator tests need one \
         (mount -t cgroup2 none /sys/fs/cgroup/unified), or opt out with REMORA_SKIP_ACCEL=1"
    );
}

/// Fails with what to install or enable when this machine cannot run the accelerator.
pub fn check_prerequisites() {
    super::mesh::netns::check_prerequisites();
    let found = Command::new("sh")
        .args(["-c", "command -v bpftool"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "bpftool is required for the accelerator tests: apt-get install bpftool (or opt out with REMORA_SKIP_ACCEL=1)"
    );
    // The kernel's build options, where it tells them (/proc/config.gz, else /boot).
    let config = Command::new("zcat")
        .arg("/proc/config.gz")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| {
            let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            fs::read_to_string(format!("/boot/config-{}", release.trim())).unwrap_or_default()
        });
    for option in [
        "CONFIG_BPF_SYSCALL",
        "CONFIG_CGROUP_BPF",
        "CONFIG_SOCK_CGROUP_DATA",
        "CONFIG_NET_SOCK_MSG",
    ] {
        assert!(
            config.is_empty() || config.contains(&format!("{option}=y")),
            "the kernel lacks {option}: the accelerator needs BPF syscalls, cgroup BPF and sockmap/sk_msg \
             (see accel/README.md for the versions); opt out with REMORA_SKIP_ACCEL=1"
        );
    }
}

static ENTERED: Mutex<()> = Mutex::new(());

/// A cgroup v2 of the test's own, which the test process is in until drop.
pub struct Cgroup {
    pub path: PathBuf,
    origin: PathBuf,
    _lock: MutexGuard<'static, ()>,
}

impl Cgroup {
    pub fn enter(tag: &str) -> Self {
        let lock = ENTERED.lock().unwrap_or_else(|e| e.into_inner());
        let root = cgroup2_root();
        let own = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("this process has a cgroup v2 line in /proc/self/cgroup");
        let origin = root.join(rel.trim_start_matches('/'));
        let path = root.join(format!("remora-accel-test-{tag}"));
        let _ = fs::remove_dir(&path);
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("create the test cgroup {}: {e}", path.display()));
        let cg = Self {
            path,
            origin,
            _lock: lock,
        };
        fs::write(cg.path.join("cgroup.procs"), std::process::id().to_string())
            .unwrap_or_else(|e| panic!("move the test into {}: {e}", cg.path.display()));
        cg
    }

    pub fn display(&self) -> String {
        self.path.display().to_string()
    }

    /// The processes in the cgroup besides this one.
    pub fn others(&self) -> Vec<u32> {
        let me = std::process::id();
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|&p| p != me)
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::write(
            self.origin.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        // Whatever a guard missed was started by this test (it is in this test's cgroup).
        for pid in self.others() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .output();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A bpffs mounted on a temporary directory, unmounted on drop.
pub struct Bpffs {
    pub dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn mount() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a bpffs on {}: {} — the kernel lacks BPF (CONFIG_BPF_SYSCALL) or this is not root; \
             opt out with REMORA_SKIP_ACCEL=1",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    /// The agent's pin directory inside the mount.
    pub fn pins(&self) -> PathBuf {
        self.dir.path().join("remora")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Everything of one test on the node's side. Field order is drop order.
pub struct Node {
    pub agent: Option<Proc>,
    pub ns: Netns,
    pub registrations: tempfile::TempDir,
    pub bpffs: Bpffs,
    pub cgroup: Cgroup,
    pub log: PathBuf,
    starts: u32,
}

pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_remora-accel")
}

impl Node {
    /// The test's cgroup (entered), bpffs and registrations directory, and the agent's
    /// namespace; no agent yet.
    pub fn new(tag: &str) -> Self {
        check_prerequisites();
        let tag = format!("{tag}{}", std::process::id());
        let cgroup = Cgroup::enter(&tag);
        let bpffs = Bpffs::mount();
        let registrations = tempfile::tempdir().expect("tempdir");
        let ns = Netns::new(format!("ran{}", std::process::id() % 1_000_000));
        let log = registrations.path().with_extension("agent.log");
        Self {
            agent: None,
            ns,
            registrations,
            bpffs,
            cgroup,
            log,
            starts: 0,
        }
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--cgroup".into(),
            self.cgroup.display(),
            "--bpffs".into(),
            self.bpffs.pins().display().to_string(),
        ]
    }

    /// Starts the agent and waits for its `remora-accel: ready` line.
    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// [`Node::start_agent`] with more environment (the agent's `REMORA_ACCEL_*` switches).
    pub fn start_agent_with(&mut self, env: &[(&str, &str)]) {
        assert!(self.agent.is_none(), "the agent runs already");
        self.starts += 1;
        let log = self.log.with_extension(format!("{}.log", self.starts));
        let file = fs::File::create(&log).expect("agent log");
        let mut args = vec![agent_bin().to_owned()];
        args.extend(self.flags());
        args.extend([
            "--registrations".into(),
            self.registrations.path().display().to_string(),
            "--metrics-addr".into(),
            METRICS.into(),
            "--poll".into(),
            "100".into(),
        ]);
        // nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup mounts.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns.name))
            .arg("--")
            .args(&args)
            .env("RUST_LOG", "debug")
            .envs(env.iter().copied())
            .stdout(Stdio::from(file.try_clone().expect("clone")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start remora-accel");
        let mut proc = Proc {
            child,
            what: "remora-accel".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains("remora-accel: ready") {
                break;
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!(
                    "remora-accel exited ({status}) before it was ready; a kernel without BPF, cgroup BPF or \
                     sockmap cannot run the accelerator (opt out with REMORA_SKIP_ACCEL=1):\n{text}"
                );
            }
            assert!(
                Instant::now() < deadline,
                "remora-accel not ready after 30 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.log = log;
        self.agent = Some(proc);
    }

    /// The agent's log (the current or last run).
    pub fn agent_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean anything up.
    pub fn kill_agent(&mut self) {
        let mut proc = self.agent.take().expect("the agent runs");
        run(Command::new("kill").args(["-KILL", &proc.pid().to_string()]));
        let _ = proc.child.wait();
    }

    /// SIGTERM; the agent exits 0 and leaves the programs attached.
    pub fn stop_agent(&mut self) {
        let mut proc = self.agent.take().expect("the agent runs");
        run(Command::new("kill").args(["-TERM", &proc.pid().to_string()]));
        let status = proc.child.wait().expect("wait for the agent");
        assert!(
            status.success(),
            "remora-accel exits 0 on SIGTERM, got {status}:\n{}",
            self.agent_log()
        );
    }

    /// `remora-accel --cleanup` for this test's cgroup and bpffs.
    pub fn cleanup(&self) -> Output {
        let mut c = Command::new(agent_bin());
        c.arg("--cleanup").args(self.flags());
        c.output().expect("run remora-accel --cleanup")
    }

    /// Registers `pod` the way its init container does: the real `remora-init
    /// --accel-registrations DIR` inside the pod's namespace, which applies the same
    /// default rules the harness installed (idempotent) and writes the registration with
    /// the namespace's cookie; returns that cookie (read again here, as a cross-check).
    pub fn register(&self, pod: &Netns) -> u64 {
        let init = target_bin("remora-init");
        let dir = self.registrations.path().display().to_string();
        let out = run(&mut pod.cmd(&[&init, "--accel-registrations", &dir]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let cookie = netns_cookie(pod);
        assert!(
            stderr.contains(&format!(
                "registered with remora-accel: {dir}/{cookie}.json"
            )),
            "remora-init in {} did not register the pod's cookie {cookie}:\n{stderr}",
            pod.name
        );
        cookie
    }

    /// Waits until the agent has taken every registration (its files are gone) and its
    /// map holds at least `pods` pods.
    pub fn wait_registered(&self, pods: u64) {
        wait_for(
            "the agent takes the registrations",
            || {
                fs::read_dir(self.registrations.path())
                    .map(|d| d.count() == 0)
                    .unwrap_or(false)
                    && self.metric(r#"remora_accel_map_entries{map="meshed_pods"}"#) >= pods
            },
            || format!("{}\n{}", self.metrics(), self.agent_log()),
        );
    }

    pub fn metrics(&self) -> String {
        curl(&self.ns, &format!("http://{METRICS}/metrics"))
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// The sum of every sample whose name (with its labels) starts with `prefix`.
    pub fn metric(&self, prefix: &str) -> u64 {
        sum_metric(&self.metrics(), prefix)
    }

    /// The programs attached to the test's cgroup, as `bpftool cgroup show` lists them.
    pub fn attached(&self) -> String {
        let out = run(Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&self.cgroup.path));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The BPF objects the agent left attached to a cgroup: program ids and the ids of the
/// maps those programs use.
#[derive(Debug, Default)]
pub struct Objects {
    pub programs: Vec<u64>,
    pub maps: Vec<u64>,
}

impl Objects {
    pub fn of(cgroup: &Path) -> Self {
        let attached = bpftool_json(&["cgroup", "show", &cgroup.display().to_string()]);
        let programs: Vec<u64> = attached
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
            .unwrap_or_default();
        let mut maps = Vec::new();
        for id in &programs {
            // A program detached meanwhile is gone: it has no maps to list.
            let Ok(out) = Command::new("bpftool")
                .args(["-j", "prog", "show", "id", &id.to_string()])
                .output()
            else {
                continue;
            };
            let Ok(prog) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                continue;
            };
            maps.extend(
                prog["map_ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(serde_json::Value::as_u64),
            );
        }
        maps.sort_unstable();
        maps.dedup();
        Self { programs, maps }
    }

    /// Those of the objects the kernel still has (`bpftool prog/map show id`).
    pub fn alive(&self) -> Self {
        let exists = |kind: &str, id: &u64| {
            Command::new("bpftool")
                .args([kind, "show", "id", &id.to_string()])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        Self {
            programs: self
                .programs
                .iter()
                .copied()
                .filter(|id| exists("prog", id))
                .collect(),
            maps: self
                .maps
                .iter()
                .copied()
                .filter(|id| exists("map", id))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.programs.is_empty() && self.maps.is_empty()
    }
}

fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = run(Command::new("bpftool").arg("-j").args(args));
    // `cgroup show` prints nothing at all for a cgroup without programs.
    if out.stdout.trim_ascii().is_empty() {
        return serde_json::Value::Array(Vec::new());
    }
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool -j {args:?}: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut proc) = self.agent.take() {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
        if self.bpffs.pins().exists() {
            let _ = self.cleanup();
        }
    }
}

/// Sums the samples of a Prometheus text whose name and labels start with `prefix`.
pub fn sum_metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The network namespace cookie of `ns` (`SO_NETNS_COOKIE` of a socket created inside
/// it, read by Python: independent of `remora_init::accel::current_netns_cookie`).
pub fn netns_cookie(ns: &Netns) -> u64 {
    let out = run(&mut ns.cmd(&[
        "/usr/bin/python3",
        "-c",
        "import socket, struct\ns = socket.socket()\nprint(struct.unpack('=Q', s.getsockopt(socket.SOL_SOCKET, 71, 8))[0])",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("netns cookie of {}: {text:?}: {e}", ns.name))
}
