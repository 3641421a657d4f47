//! Network-namespace scaffolding of the `netns*` tests (root, `ip`, `iptables`,
//! `ip6tables`, `curl`, `python3`, `setpriv`): two "pods" in their own namespaces joined by
//! a veth pair, each with the interception rules of `remora-init`'s own rule builder
//! (outbound TCP → 15001 except the proxy's UID/GID 1337 and loopback; inbound TCP → 15006
//! except the admin port), and the
//! `remora-proxy` binary running as UID 1337 with a standalone config and file
//! certificates. The original destination comes from the kernel (`SO_ORIGINAL_DST`), as in
//! a pod.
//!
//! Every namespace, veth and process is removed by a guard's `Drop`, also on failure.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use super::pki::{Ca, IdentityPaths};

pub const CLIENT_IP: &str = "10.77.0.1";
pub const SERVER_IP: &str = "10.77.0.2";
pub const CLIENT_IP6: &str = "fd77::1";
pub const SERVER_IP6: &str = "fd77::2";
pub const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
pub const REVIEWS: &str = "spiffe://cluster.local/ns/shop/sa/reviews";

pub fn check_prerequisites() {
    // Root, read from /proc (no libc call needed).
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    assert_eq!(
        uid,
        Some("0"),
        "network-namespace tests need root (machines without root opt out of the tier with `REMORA_SKIP_NETNS=1 make test`)"
    );
    for tool in [
        "ip",
        "iptables",
        "ip6tables",
        "curl",
        "/usr/bin/python3",
        "setpriv",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is required for network-namespace tests: apt-get install iproute2 iptables curl python3 util-linux"
        );
    }
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        run(&mut ns.cmd(&["ip", "link", "set", "lo", "up"]));
        ns
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Installs remora-init's default interception rules (IPv4 and IPv6) in this
    /// namespace: the output of its rule builder, applied with `*tables-restore --noflush`
    /// as its executor does.
    pub fn remora_init(&self) {
        use remora_init::{
            config::{Config, Family},
            rules,
        };
        for (family, tool) in [
            (Family::V4, "iptables-restore"),
            (Family::V6, "ip6tables-restore"),
        ] {
            let script = rules::build(&Config::default(), family).restore_script(&[]);
            let mut child = self
                .cmd(&[tool, "--noflush"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start *tables-restore");
            if let Some(mut stdin) = child.stdin.take() {
                use std::io::Write as _;
                stdin.write_all(script.as_bytes()).expect("write the rules");
            }
            let out = child.wait_with_output().expect("*tables-restore ran");
            assert!(
                out.status.success(),
                "{tool} in {}: {}\n{script}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    pub fn rules(&self, tool: &str, rules: &[&str]) {
        for rule in rules {
            let args: Vec<&str> = rule.split_whitespace().collect();
            let mut c = self.cmd(&[tool, "-t", "nat"]);
            c.args(args);
            run(&mut c);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth end inside it (and so its peer).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A process killed on drop.
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Two pods joined by a veth pair, with interception rules.
pub struct Pods {
    // Field order is drop order: processes before namespaces.
    pub procs: Vec<Proc>,
    pub client: Netns,
    pub server: Netns,
    pub dir: tempfile::TempDir,
}

/// Two namespaces, `{prefix}c<tag>` (client) and `{prefix}s<tag>` (server), joined by a
/// veth pair, with `client_addrs` and `server_addrs` (CIDR; IPv6 ones without duplicate
/// address detection) on its ends. The tag is unique per process and call.
pub fn joined(prefix: &str, client_addrs: &[&str], server_addrs: &[&str]) -> (Netns, Netns) {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tag = format!("{}{n}", std::process::id() % 100_000);
    let client = Netns::new(format!("{prefix}c{tag}"));
    let server = Netns::new(format!("{prefix}s{tag}"));
    let (va, vb) = (format!("{prefix}a{tag}"), format!("{prefix}b{tag}"));
    run(Command::new("ip").args([
        "link",
        "add",
        &va,
        "netns",
        &client.name,
        "type",
        "veth",
        "peer",
        "name",
        &vb,
        "netns",
        &server.name,
    ]));
    for (ns, dev, addrs) in [(&client, &va, client_addrs), (&server, &vb, server_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                run(&mut ns.cmd(&["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"]));
            } else {
                run(&mut ns.cmd(&["ip", "addr", "add", addr, "dev", dev]));
            }
        }
        run(&mut ns.cmd(&["ip", "link", "set", dev, "up"]));
    }
    (client, server)
}

pub fn pods() -> Pods {
    let (client, server) = joined(
        "rp",
        &[&format!("{CLIENT_IP}/24"), &format!("{CLIENT_IP6}/64")],
        &[&format!("{SERVER_IP}/24"), &format!("{SERVER_IP6}/64")],
    );
    // Both pods get exactly what remora-init installs with its defaults (proxy UID/GID
    // 1337, outbound → 15001, inbound → 15006 except the admin port 15020, loopback
    // bypass), from its own rule builder.
    client.remora_init();
    server.remora_init();
    // Wait until both families route across the veth (IPv6 neighbour discovery takes a
    // moment): a refused connection (nothing listens yet) proves reachability. As UID 1337,
    // so the client's own capture rules stay out of the way.
    for ip in [SERVER_IP, SERVER_IP6] {
        let probe = format!(
            "import socket,sys\ntry:\n  socket.create_connection(('{ip}', 9), timeout=1)\nexcept ConnectionRefusedError:\n  sys.exit(0)\nexcept OSError:\n  sys.exit(1)\nsys.exit(0)"
        );
        wait_for(
            &format!("{ip} reachable"),
            || {
                client
                    .cmd(&[
                        "setpriv",
                        "--reuid=1337",
                        "--regid=1337",
                        "--clear-groups",
                        "/usr/bin/python3",
                        "-c",
                        &probe,
                    ])
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
            String::new,
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // The proxies run as UID 1337 and must read their files.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    Pods {
        procs: Vec::new(),
        client,
        server,
        dir,
    }
}

impl Pods {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, text).expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        p
    }

    /// Identities from one CA: the server pod's (`REVIEWS`) and the client pod's
    /// (`FRONTEND`), readable by the proxies.
    pub fn identities(&self) -> (IdentityPaths, IdentityPaths) {
        let (_, server_id, client_id) = self.identities_with_ca();
        (server_id, client_id)
    }

    /// [`Pods::identities`] and their CA, which issues the replacements of a rotation.
    pub fn identities_with_ca(&self) -> (Ca, IdentityPaths, IdentityPaths) {
        let ca = Ca::new("remora netns CA");
        let server_id = IdentityPaths::write(self.dir.path(), "reviews", REVIEWS, &ca, &ca);
        let client_id = IdentityPaths::write(self.dir.path(), "frontend", FRONTEND, &ca, &ca);
        for id in [&server_id, &client_id] {
            for p in [&id.cert, &id.key, &id.bundle] {
                fs::set_permissions(p, fs::Permissions::from_mode(0o644)).expect("chmod");
            }
        }
        (ca, server_id, client_id)
    }

    pub fn spawn(&mut self, ns_is_server: bool, what: &str, args: &[&str]) -> usize {
        let ns = if ns_is_server {
            &self.server
        } else {
            &self.client
        };
        let log = fs::File::create(self.dir.path().join(format!("{what}.log"))).expect("log file");
        let child = ns
            .cmd(args)
            .stdout(Stdio::from(log.try_clone().expect("clone")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        self.procs.push(Proc {
            child,
            what: what.to_owned(),
        });
        self.procs.len() - 1
    }

    /// [`Pods::spawn`], then waits until the process's log shows `marker` (a peer saying
    /// it listens or runs).
    pub fn spawn_until(
        &mut self,
        ns_is_server: bool,
        what: &str,
        args: &[String],
        marker: &str,
    ) -> usize {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let idx = self.spawn(ns_is_server, what, &args);
        wait_for(
            &format!("{what}: {marker}"),
            || self.log(what).contains(marker),
            || self.log(what),
        );
        idx
    }

    pub fn log(&self, what: &str) -> String {
        fs::read_to_string(self.dir.path().join(format!("{what}.log"))).unwrap_or_default()
    }

    /// Both proxies' logs, for failure messages.
    pub fn proxy_logs(&self) -> String {
        format!(
            "--- proxy-client ---\n{}\n--- proxy-server ---\n{}",
            self.log("proxy-client"),
            self.log("proxy-server")
        )
    }

    pub fn proxy(&mut self, server: bool, config: &Path) -> usize {
        self.proxy_with(server, config, &[])
    }

    /// [`Pods::proxy`] with more flags (`--access-log`).
    pub fn proxy_with(&mut self, server: bool, config: &Path, extra: &[&str]) -> usize {
        let bin = proxy_bin();
        let cfg = config.display().to_string();
        let what = if server {
            "proxy-server"
        } else {
            "proxy-client"
        };
        let mut args = vec![
            "setpriv",
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            &bin,
            "--config",
            &cfg,
            "--config-poll-interval",
            "100ms",
            "--shutdown-grace-period",
            "5s",
            "--log-level",
            "debug",
        ];
        args.extend_from_slice(extra);
        let idx = self.spawn(server, what, &args);
        let ns = if server { &self.server } else { &self.client };
        wait_for(
            &format!("{what} ready"),
            || curl(ns, "http://127.0.0.1:15020/ready").is_some_and(|(code, _)| code == 200),
            || self.log(what),
        );
        idx
    }
}

/// The `remora-proxy` binary: cargo's for this package's tests; for another crate's tests
/// that reuse this harness (`accel/tests`), the one in the target directory.
pub fn proxy_bin() -> String {
    match option_env!("CARGO_BIN_EXE_remora-proxy") {
        Some(bin) => bin.to_owned(),
        None => target_bin("remora-proxy"),
    }
}

/// A workspace binary in the target directory beside this test binary (`cargo nextest run
/// --workspace` builds them all).
pub fn target_bin(name: &str) -> String {
    let me = std::env::current_exe().expect("test binary");
    let bin = me
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "no {name} beside {}: build it first (cargo build --bin {name})",
                me.display()
            )
        });
    bin.display().to_string()
}

/// The command that re-executes this test binary as a peer inside a namespace: `env
/// {var}={role} <test binary> --exact {test} --nocapture`. The `#[test]` function named
/// `test` sees `var` set and plays `role` instead of orchestrating.
pub fn reexec(var: &str, role: &str, test: &str) -> Vec<String> {
    let me = std::env::current_exe().expect("test binary");
    vec![
        "env".to_owned(),
        format!("{var}={role}"),
        me.display().to_string(),
        "--exact".to_owned(),
        test.to_owned(),
        "--nocapture".to_owned(),
    ]
}

/// curl run as the proxy's UID, which the pod's capture rules let around its proxy.
pub fn curl_around_proxy(ns: &Netns, url: &str) -> Output {
    ns.cmd(&[
        "setpriv",
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        "curl",
        "-sS",
        "-m",
        "5",
        url,
    ])
    .output()
    .expect("curl")
}

pub fn curl(ns: &Netns, url: &str) -> Option<(u16, String)> {
    let out = ns
        .cmd(&["curl", "-sS", "-m", "10", "-w", "\n%{http_code}", url])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_owned()))
}

pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool, logs: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of the first admin metric line starting with `prefix`.
pub fn metric(ns: &Netns, prefix: &str) -> Option<u64> {
    let (_, text) = curl(ns, "http://127.0.0.1:15020/metrics")?;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
