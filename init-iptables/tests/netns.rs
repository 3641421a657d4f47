//! Network-namespace tests: the real `remora-init` binary installs real rules in a
//! "pod" namespace connected by a veth pair to a "peer" namespace, and `remora-probe`
//! listeners and clients (child processes inside the namespaces) show where
//! connections really arrive and what `SO_ORIGINAL_DST` says.
//!
//! Needs root, `ip` (iproute2) and the iptables tools of both backends (Debian package
//! `iptables`). Every test creates its own uniquely named namespaces and removes them,
//! with its processes, in `Drop` — even when it fails. Addresses (10.250.0.0/16,
//! fd00:250::/64, fd00:251::/64) exist only inside those namespaces; the host
//! namespace's rules are never touched.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use remora_init::probe::Report;

const INIT: &str = env!("CARGO_BIN_EXE_remora-init");
const PROBE: &str = env!("CARGO_BIN_EXE_remora-probe");

const POD_V4: &str = "10.250.0.1";
const PEER_V4: &str = "10.250.0.2";
/// A peer address outside the pod's subnet (reached through the default route).
const FAR_V4: &str = "10.250.1.2";
const POD_V6: &str = "fd00:250::1";
const PEER_V6: &str = "fd00:250::2";
const FAR_V6: &str = "fd00:251::2";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {args:?}: {e} (tests need root, iproute2 and iptables)")
        });
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    format!(
        "{}:{port}",
        if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        }
    )
    .parse()
    .expect("test address")
}

/// A pod namespace and a peer namespace joined by a veth pair; removed on drop.
struct Net {
    pod: String,
    peer: String,
    children: Vec<Child>,
}

impl Net {
    fn new() -> Net {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("rmr{}-{n}", std::process::id());
        let net = Net {
            pod: format!("{id}-pod"),
            peer: format!("{id}-peer"),
            children: Vec::new(),
        };
        // From here on, Drop removes whatever was created.
        let (pod, peer) = (net.pod.as_str(), net.peer.as_str());
        let created = Command::new("ip").args(["netns", "add", pod]).output();
        match created {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "ip netns add failed: {}; the network-namespace tests need root \
                 (CAP_SYS_ADMIN, CAP_NET_ADMIN)",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => panic!(
                "cannot run ip: {e}; the network-namespace tests need the Debian packages \
                 iproute2 and iptables"
            ),
        }
        run(&["ip", "netns", "add", peer]);
        run(&[
            "ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", peer,
        ]);
        for ns in [pod, peer] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            run(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        }
        run(&[
            "ip",
            "-n",
            pod,
            "addr",
            "add",
            &format!("{POD_V4}/24"),
            "dev",
            "eth0",
        ]);
        run(&[
            "ip",
            "-n",
            pod,
            "addr",
            "add",
            &format!("{POD_V6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        run(&[
            "ip",
            "-n",
            peer,
            "addr",
            "add",
            &format!("{PEER_V4}/24"),
            "dev",
            "eth0",
        ]);
        run(&[
            "ip",
            "-n",
            peer,
            "addr",
            "add",
            &format!("{PEER_V6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        run(&[
            "ip",
            "-n",
            peer,
            "addr",
            "add",
            &format!("{FAR_V4}/32"),
            "dev",
            "lo",
        ]);
        run(&[
            "ip",
            "-n",
            peer,
            "addr",
            "add",
            &format!("{FAR_V6}/128"),
            "dev",
            "lo",
        ]);
        run(&["ip", "-n", pod, "route", "add", "default", "via", PEER_V4]);
        run(&[
            "ip", "-n", pod, "-6", "route", "add", "default", "via", PEER_V6,
        ]);
        net
    }

    /// Starts a `remora-probe` TCP listener in `ns` on each address; waits until bound.
    fn listen(&mut self, ns: &str, addrs: &[String]) {
        let args: Vec<String> = addrs
            .iter()
            .flat_map(|a| ["--addr".to_string(), a.clone()])
            .collect();
        self.listen_args(ns, &args);
    }

    /// Starts `remora-probe listen ARGS...` in `ns` and waits until it is bound.
    fn listen_args(&mut self, ns: &str, args: &[String]) {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            ns,
            PROBE,
            "listen",
            "--exit-after-secs",
            "120",
        ]);
        cmd.args(args);
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn remora-probe listen");
        let stdout = child.stdout.take();
        self.children.push(child);
        let mut line = String::new();
        if let Some(out) = stdout {
            BufReader::new(out)
                .read_line(&mut line)
                .expect("read listener readiness");
        }
        assert_eq!(
            line.trim(),
            "ready",
            "listener in {ns} with {args:?} did not start"
        );
    }

    /// Connects from `ns` (as `uid`/`gid` if given) and returns the listener's report.
    fn connect_as(
        &self,
        ns: &str,
        addr: SocketAddr,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<Report, String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, PROBE, "connect", &addr.to_string()]);
        cmd.args(["--timeout-ms", "3000"]);
        if let Some(uid) = uid {
            cmd.args(["--uid", &uid.to_string()]);
        }
        if let Some(gid) = gid {
            cmd.args(["--gid", &gid.to_string()]);
        }
        let out = cmd.output().expect("run remora-probe connect");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Report::parse(String::from_utf8_lossy(&out.stdout).trim())
    }

    fn connect(&self, ns: &str, addr: SocketAddr) -> Report {
        self.connect_as(ns, addr, None, None)
            .unwrap_or_else(|e| panic!("connect from {ns} to {addr}: {e}"))
    }

    /// Runs `remora-init` in the pod namespace.
    fn init(&self, args: &[&str]) -> Output {
        self.init_env(args, &[])
    }

    fn init_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.pod, INIT])
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("run remora-init")
    }

    fn init_ok(&self, args: &[&str]) -> Output {
        let out = self.init(args);
        assert!(
            out.status.success(),
            "remora-init {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `iptables-save` and `ip6tables-save` of `backend` in the pod namespace, with
    /// comments and packet counters removed.
    fn save(&self, backend: &str) -> String {
        let mut all = String::new();
        for tool in ["iptables", "ip6tables"] {
            let out = run(&[
                "ip",
                "netns",
                "exec",
                &self.pod,
                &format!("{tool}-{backend}-save"),
            ]);
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if line.starts_with('#') {
                    continue;
                }
                let line = match line.rfind(" [") {
                    Some(i) if line.starts_with(':') => &line[..i],
                    _ => line,
                };
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_redirected(r: &Report, port: u16, orig: SocketAddr) {
    assert_eq!(r.served_by.port(), port, "not redirected to {port}: {r:?}");
    assert_eq!(r.orig_dst, Some(orig), "wrong original destination: {r:?}");
}

fn assert_direct(r: &Report, dest: SocketAddr) {
    assert_eq!(
        r.served_by, dest,
        "expected a direct connection to {dest}: {r:?}"
    );
}

/// Generates one `#[test]` per backend for each scenario.
macro_rules! both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod nft {
            $( #[test] fn $scenario() { super::$scenario("nft") } )*
        }
        mod legacy {
            $( #[test] fn $scenario() { super::$scenario("legacy") } )*
        }
    };
}

both_backends!(
    outbound_ipv4,
    outbound_ipv6_and_dual_stack_listener,
    inbound,
    skipped_ports_and_cidrs_bypass,
    included_cidrs_and_inbound_port_list,
    custom_ports_and_proxy_identity,
    idempotent_and_cleanup_restores_save_output,
    validate,
    failure_midway_leaves_no_rules,
    golden_cases_apply,
    udp_and_dns_untouched,
);

fn outbound_ipv4(backend: &str) {
    let mut net = Net::new();
    let (pod, peer) = (net.pod.clone(), net.peer.clone());
    net.init_ok(&["--backend", backend]);
    // IPv4-only listeners: the plain AF_INET path of SO_ORIGINAL_DST.
    net.listen(&pod, &["0.0.0.0:15001".into(), "0.0.0.0:8080".into()]);
    net.listen(&peer, &["0.0.0.0:8080".into()]);

    let dest = sock(PEER_V4, 8080);
    assert_redirected(&net.connect(&pod, dest), 15001, dest);
    // Loop guard: the proxy's UID, or its GID alone, is not captured.
    let as_proxy = net
        .connect_as(&pod, dest, Some(1337), Some(1337))
        .expect("uid 1337");
    assert_direct(&as_proxy, dest);
    let gid_only = net
        .connect_as(&pod, dest, Some(1000), Some(1337))
        .expect("gid 1337");
    assert_direct(&gid_only, dest);
    let other = net
        .connect_as(&pod, dest, Some(1000), Some(1000))
        .expect("uid 1000");
    assert_redirected(&other, 15001, dest);
    // Loopback bypasses; the app calling its own pod address through lo is captured.
    let lo = sock("127.0.0.1", 8080);
    assert_direct(&net.connect(&pod, lo), lo);
    let own = sock(POD_V4, 8080);
    assert_redirected(&net.connect(&pod, own), 15001, own);
}

fn outbound_ipv6_and_dual_stack_listener(backend: &str) {
    let mut net = Net::new();
    let (pod, peer) = (net.pod.clone(), net.peer.clone());
    net.init_ok(&["--backend", backend]);
    // Dual-stack listeners: IPv6 and IPv4-mapped connections on one socket.
    net.listen(&pod, &["[::]:15001".into(), "[::]:8080".into()]);
    net.listen(&peer, &["[::]:8080".into()]);

    let dest6 = sock(PEER_V6, 8080);
    assert_redirected(&net.connect(&pod, dest6), 15001, dest6);
    let dest4 = sock(PEER_V4, 8080);
    assert_redirected(&net.connect(&pod, dest4), 15001, dest4);
    let as_proxy = net
        .connect_as(&pod, dest6, Some(1337), Some(1337))
        .expect("uid 1337");
    assert_direct(&as_proxy, dest6);
    let lo = sock("::1", 8080);
    assert_direct(&net.connect(&pod, lo), lo);
    let own = sock(POD_V6, 8080);
    assert_redirected(&net.connect(&pod, own), 15001, own);
}

fn inbound(backend: &str) {
    let mut net = Net::new();
    let (pod, peer) = (net.pod.clone(), net.peer.clone());
    net.init_ok(&["--backend", backend]);
    net.listen(
        &pod,
        &["[::]:15006".into(), "[::]:8080".into(), "[::]:15020".into()],
    );
    for ip in [POD_V4, POD_V6] {
        let app = sock(ip, 8080);
        assert_redirected(&net.connect(&peer, app), 15006, app);
        // The admin port is never redirected.
        let admin = sock(ip, 15020);
        assert_direct(&net.connect(&peer, admin), admin);
    }
}

fn skipped_ports_and_cidrs_bypass(backend: &str) {
    let mut net = Net::new();
    let (pod, peer) = (net.pod.clone(), net.peer.clone());
    net.init_ok(&[
        "--backend",
        backend,
        "--skip-outbound-ports",
        "9090",
        "--skip-outbound-cidrs",
        &format!("10.250.1.0/24,{FAR_V6}"),
        "--skip-inbound-ports",
        "8080",
    ]);
    net.listen(
        &pod,
        &[
            "[::]:15001".into(),
            "[::]:15006".into(),
            "[::]:8080".into(),
            "[::]:8081".into(),
        ],
    );
    net.listen(&peer, &["[::]:8080".into(), "[::]:9090".into()]);
    for (near, far, pod_ip) in [(PEER_V4, FAR_V4, POD_V4), (PEER_V6, FAR_V6, POD_V6)] {
        let skipped_port = sock(near, 9090);
        assert_direct(&net.connect(&pod, skipped_port), skipped_port);
        let skipped_cidr = sock(far, 8080);
        assert_direct(&net.connect(&pod, skipped_cidr), skipped_cidr);
        let captured = sock(near, 8080);
        assert_redirected(&net.connect(&pod, captured), 15001, captured);
        let skipped_in = sock(pod_ip, 8080);
        assert_direct(&net.connect(&peer, skipped_in), skipped_in);
        let captured_in = sock(pod_ip, 8081);
        assert_redirected(&net.connect(&peer, captured_in), 15006, captured_in);
    }
}

fn included_cidrs_and_inbound_port_list(backend: &str) {
    let mut net = Net::new();
    let (pod, peer) = (net.pod.clone(), net.peer.clone());
    net.init_ok(&[
        "--backend",
        backend,
        "--include-outbound-cidrs",
        "10.250.1.0/24,fd00:251::/64",
        "--inbound-ports",
        "8081",
    ]);
    net.listen(
        &pod,
        &[
            "[::]:15001".into(),
            "[::]:15006".into(),
            "[::]:8080".into(),
            "[::]:8081".into(),
        ],
    );
    net.listen(&peer, &["[::]:8080".into()]);
    for (near, far, pod_ip) in [(PEER_V4, FAR_V4, POD_V4), (PEER_V6, FAR_V6, POD_V6)] {
        let included = sock(far, 8080);
        assert_redirected(&net.connect(&pod, included), 15001, included);
        let outside = sock(near, 8080);
        assert_direct(&net.connect(&pod, outside), outside);
        let listed = sock(pod_ip, 8081);
        assert_redirected(&net.connect(&peer, listed), 15006, listed);
        let unlisted = sock(pod_ip, 8080);
        assert_direct(&net.connect(&peer, unlisted), unlisted);
    }
}

fn custom_ports_and_proxy_identity(backend: &str) {
    let mut net = Net::new();
    let (pod, peer) = (net.pod.clone(), net.peer.clone());
    net.init_ok(&[
        "--backend",
        backend,
        "--outbound-port",
        "4140",
        "--inbound-port",
        "4143",
        "--admin-port",
        "4191",
        "--proxy-uid",
        "2102",
        "--proxy-gid",
        "2103",
    ]);
    net.listen(
        &pod,
        &["[::]:4140".into(), "[::]:4143".into(), "[::]:4191".into()],
    );
    net.listen(&peer, &["[::]:8080".into()]);
    for (near, pod_ip) in [(PEER_V4, POD_V4), (PEER_V6, POD_V6)] {
        let dest = sock(near, 8080);
        assert_redirected(&net.connect(&pod, dest), 4140, dest);
        let proxy = net
            .connect_as(&pod, dest, Some(2102), Some(1000))
            .expect("uid 2102");
        assert_direct(&proxy, dest);
        let proxy_gid = net
            .connect_as(&pod, dest, Some(1000), Some(2103))
            .expect("gid 2103");
        assert_direct(&proxy_gid, dest);
        // 1337 is nobody special under this configuration.
        let other = net
            .connect_as(&pod, dest, Some(1337), Some(1337))
            .expect("uid 1337");
        assert_redirected(&other, 4140, dest);
        let app = sock(pod_ip, 8080);
        assert_redirected(&net.connect(&peer, app), 4143, app);
        let admin = sock(pod_ip, 4191);
        assert_direct(&net.connect(&peer, admin), admin);
    }
}

fn idempotent_and_cleanup_restores_save_output(backend: &str) {
    let mut net = Net::new();
    let (pod, peer) = (net.pod.clone(), net.peer.clone());
    // Someone else's rules, in nat (the table Remora uses) and filter, must survive.
    for tool in ["iptables", "ip6tables"] {
        let t = format!("{tool}-{backend}");
        run(&[
            "ip", "netns", "exec", &pod, &t, "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport",
            "53", "-j", "RETURN",
        ]);
        run(&[
            "ip",
            "netns",
            "exec",
            &pod,
            &t,
            "-t",
            "nat",
            "-N",
            "OTHER_CHAIN",
        ]);
        run(&[
            "ip", "netns", "exec", &pod, &t, "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j",
            "ACCEPT",
        ]);
    }
    let before = net.save(backend);

    net.init_ok(&["--backend", backend]);
    let once = net.save(backend);
    assert_ne!(once, before, "apply changed nothing");
    assert_eq!(
        once.matches("-j REMORA_OUTPUT").count(),
        2,
        "one jump per family:\n{once}"
    );
    net.init_ok(&["--backend", backend]);
    let twice = net.save(backend);
    pretty_assertions::assert_eq!(once, twice, "applying twice differs from once");

    // The rules applied twice still work.
    net.listen(&pod, &["[::]:15001".into()]);
    net.listen(&peer, &["[::]:8080".into()]);
    let dest = sock(PEER_V4, 8080);
    assert_redirected(&net.connect(&pod, dest), 15001, dest);

    net.init_ok(&["--backend", backend, "--cleanup"]);
    pretty_assertions::assert_eq!(before, net.save(backend), "cleanup left a difference");
    assert_direct(&net.connect(&pod, dest), dest);
    // Cleaning up again finds nothing and changes nothing.
    net.init_ok(&["--backend", backend, "--cleanup"]);
    pretty_assertions::assert_eq!(before, net.save(backend));
}

fn validate(backend: &str) {
    let net = Net::new();
    let fast = ["--validate-timeout-ms", "1000"];
    // No rules: the probe leaves the pod and never arrives.
    let out = net.init(&[&["--validate"][..], &fast].concat());
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("outbound TCP is not redirected"),
        "{}",
        stderr(&out)
    );

    net.init_ok(&["--backend", backend]);
    let before = net.save(backend);
    let out = net.init_ok(&[&["--validate"][..], &fast].concat());
    let msg = stderr(&out);
    assert!(
        msg.contains("validated: a connection to 192.0.2.1:20001"),
        "{msg}"
    );
    assert!(
        msg.contains("validated: a connection to [2001:db8::1]:20001"),
        "{msg}"
    );
    assert_eq!(before, net.save(backend), "--validate changed the rules");

    // Rules redirect to 15001, but the proxy is expected on 15002.
    let out = net.init(&[&["--validate", "--outbound-port", "15002"][..], &fast].concat());
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("refused"), "{}", stderr(&out));

    // Without an IPv6 route only IPv4 can be proven; that is said, and is enough.
    run(&["ip", "-n", &net.pod, "-6", "route", "del", "default"]);
    let out = net.init_ok(&[&["--validate"][..], &fast].concat());
    let msg = stderr(&out);
    assert!(
        msg.contains("validated: a connection to 192.0.2.1:20001"),
        "{msg}"
    );
    assert!(
        msg.contains("not validated: no route to [2001:db8::1]:20001"),
        "{msg}"
    );

    // A probe address the configuration does not capture is bad input.
    let out = net.init(&["--validate", "--validate-addr", "127.0.0.1:80"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--validate-addr"), "{}", stderr(&out));
}

fn failure_midway_leaves_no_rules(backend: &str) {
    let net = Net::new();
    // Another component's nat rule, so that the comparison is about rules rather than
    // about the kernel creating an empty nat table on first use.
    for tool in ["iptables", "ip6tables"] {
        run(&[
            "ip",
            "netns",
            "exec",
            &net.pod,
            &format!("{tool}-{backend}"),
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "--dport",
            "53",
            "-j",
            "RETURN",
        ]);
    }
    let before = net.save(backend);
    // Failure injection: an ip6tables-restore that rejects everything, after the IPv4
    // rules went in. The real tools cannot be made to fail on valid input.
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = dir.path().join(format!("ip6tables-{backend}-restore"));
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'ip6tables-restore: line 2 failed (injected)' >&2\nexit 1\n",
    )
    .expect("write fake restore");
    run(&["chmod", "+x", &fake.display().to_string()]);
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = net.init_env(&["--backend", backend], &[("PATH", &path)]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("injected"), "{}", stderr(&out));
    assert!(stderr(&out).contains("removed again"), "{}", stderr(&out));
    let after = net.save(backend);
    assert!(
        !after.contains("REMORA"),
        "a partial rule set was left:\n{after}"
    );
    pretty_assertions::assert_eq!(before, after, "a partial rule set was left");
}

fn udp_and_dns_untouched(backend: &str) {
    let mut net = Net::new();
    let (pod, peer) = (net.pod.clone(), net.peer.clone());
    net.init_ok(&["--backend", backend]);
    let udp = |addrs: &[&str], tag: &str| -> Vec<String> {
        let mut args: Vec<String> = addrs
            .iter()
            .flat_map(|a| ["--udp".into(), a.to_string()])
            .collect();
        args.extend(["--tag".into(), tag.into()]);
        args
    };
    // Were UDP redirected, the "proxy" would answer instead of the real listener.
    net.listen_args(&pod, &udp(&["[::]:15001", "[::]:15006"], "proxy"));
    net.listen_args(&pod, &udp(&["[::]:53"], "pod-dns"));
    net.listen_args(&peer, &udp(&["[::]:53"], "peer-dns"));
    for (dest, ns, expected) in [
        (sock(PEER_V4, 53), &pod, "peer-dns"),
        (sock(PEER_V6, 53), &pod, "peer-dns"),
        (sock(POD_V4, 53), &peer, "pod-dns"),
        (sock(POD_V6, 53), &peer, "pod-dns"),
    ] {
        let out = run(&[
            "ip",
            "netns",
            "exec",
            ns,
            PROBE,
            "send-udp",
            &dest.to_string(),
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            expected,
            "UDP to {dest}"
        );
    }
}

#[test]
fn missing_iptables_tools_exit_3_without_touching_anything() {
    let net = Net::new();
    let before = (net.save("nft"), net.save("legacy"));
    for (backend, needle) in [
        ("legacy", "cannot run iptables-legacy-save"),
        ("auto", "no working iptables backend"),
    ] {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.pod,
                "env",
                "PATH=/nonexistent",
                INIT,
                "--backend",
                backend,
            ])
            .output()
            .expect("run remora-init");
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("install the iptables package"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(before, (net.save("nft"), net.save("legacy")));
}

/// The guard removes namespaces and kills processes even when the test panics.
#[test]
fn guard_cleans_up_after_a_failure() {
    let mut seen: Option<(String, String, u32)> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut net = Net::new();
        let pod = net.pod.clone();
        net.listen(&pod, &["[::]:8080".into()]);
        let pid = net.children[0].id();
        seen = Some((net.pod.clone(), net.peer.clone(), pid));
        panic!("deliberate failure inside a namespace test");
    }));
    assert!(result.is_err());
    let (pod, peer, pid) = seen.expect("the test body ran");
    let list = String::from_utf8_lossy(&run(&["ip", "netns", "list"]).stdout).into_owned();
    assert!(
        !list
            .lines()
            .any(|l| l.split_whitespace().next() == Some(pod.as_str())),
        "{list}"
    );
    assert!(
        !list
            .lines()
            .any(|l| l.split_whitespace().next() == Some(peer.as_str())),
        "{list}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "listener {pid} survived"
    );
}

#[test]
fn auto_detection_follows_existing_rules() {
    let net = Net::new();
    // Fresh namespace: nf_tables.
    let out = net.init_ok(&[]);
    assert!(stderr(&out).contains("(nft backend)"), "{}", stderr(&out));
    net.init_ok(&["--cleanup"]);
    assert!(!net.save("nft").contains("REMORA"));
    // Rules installed through legacy are found and removed through legacy.
    net.init_ok(&["--backend", "legacy"]);
    assert!(net.save("legacy").contains(":REMORA_OUTPUT"));
    let out = net.init_ok(&["--cleanup"]);
    assert!(
        stderr(&out).contains("(legacy backend)"),
        "{}",
        stderr(&out)
    );
    assert!(
        !net.save("legacy").contains("REMORA"),
        "{}",
        net.save("legacy")
    );
}

#[test]
fn dry_run_touches_nothing_and_reads_env() {
    let net = Net::new();
    let before = (net.save("nft"), net.save("legacy"));
    let out = net.init_env(
        &["--dry-run"],
        &[("REMORA_INIT_SKIP_OUTBOUND_PORTS", "3306")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let golden = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/skip_outbound_ports.rules"
    ))
    .expect("golden file");
    // The golden case skips 3306,5432-5433; the binary's output has the same shape.
    assert!(
        golden.contains(text.lines().nth(8).expect("restore text")),
        "{text}"
    );
    assert!(text.contains("-j REDIRECT --to-ports 15001"), "{text}");
    assert!(
        text.contains("--dport 3306 -m comment --comment \"remora: skipped outbound port 3306\""),
        "{text}"
    );
    let out = net.init(&["--dry-run", "--cleanup"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("-X REMORA_OUTPUT"));
    assert_eq!(
        before,
        (net.save("nft"), net.save("legacy")),
        "--dry-run touched the rules"
    );
}

/// Flags, environment variables, and the flag the error must name.
type BadCase = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[test]
fn bad_input_is_rejected_before_any_rule_is_touched() {
    let net = Net::new();
    let before = (net.save("nft"), net.save("legacy"));
    let cases: &[BadCase] = &[
        (
            &["--skip-outbound-ports", "15001"],
            &[],
            "--skip-outbound-ports",
        ),
        (
            &["--skip-inbound-ports", "15000-15010"],
            &[],
            "--skip-inbound-ports",
        ),
        (&["--inbound-ports", "15020"], &[], "--inbound-ports"),
        (&["--inbound-port", "70000"], &[], "--inbound-port"),
        (&["--outbound-port", "http"], &[], "--outbound-port"),
        (
            &["--skip-outbound-cidrs", "10.0.0.0/33"],
            &[],
            "--skip-outbound-cidrs",
        ),
        (
            &["--include-outbound-cidrs", "10.0.0.1/8"],
            &[],
            "--include-outbound-cidrs",
        ),
        (&["--backend", "iptables-foo"], &[], "--backend"),
        (
            &["--ipv6", "false", "--skip-outbound-cidrs", "fd00::/8"],
            &[],
            "--skip-outbound-cidrs",
        ),
        (&["--proxy-uid", "0"], &[], "--proxy-uid"),
        (
            &[],
            &[("REMORA_INIT_SKIP_INBOUND_PORTS", "22,ssh")],
            "--skip-inbound-ports",
        ),
        (&[], &[("REMORA_INIT_BACKEND", "nftables-ng")], "--backend"),
    ];
    for (args, env, flag) in cases {
        let out = net.init_env(args, env);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} {env:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(flag),
            "{args:?} {env:?} must name {flag}: {}",
            stderr(&out)
        );
    }
    assert_eq!(
        before,
        (net.save("nft"), net.save("legacy")),
        "bad input touched the rules"
    );
}

/// The `remora: ...` comments of the `-A` lines in some rules text, sorted.
fn comments(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("-A "))
        .filter_map(|l| l.split_once("--comment \"").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once('"').map(|(c, _)| c.to_string()))
        .collect();
    out.sort();
    out
}

/// Every golden case's flags, applied for real: the kernel accepts the rules, exactly
/// the golden rules get installed, re-applying changes nothing and cleanup removes them.
fn golden_cases_apply(backend: &str) {
    let net = Net::new();
    for tool in ["iptables", "ip6tables"] {
        run(&[
            "ip",
            "netns",
            "exec",
            &net.pod,
            &format!("{tool}-{backend}"),
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "--dport",
            "53",
            "-j",
            "RETURN",
        ]);
    }
    let before = net.save(backend);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");
    let mut cases: Vec<_> = std::fs::read_dir(dir)
        .expect("golden dir")
        .map(|e| e.expect("golden entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "rules"))
        .filter(|p| p.file_stem().is_some_and(|s| s != "cleanup"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "golden cases missing in {dir}");
    for case in cases {
        let golden = std::fs::read_to_string(&case).expect("read golden");
        let flags_line = golden.lines().next().unwrap_or_default();
        let flags: Vec<&str> = match flags_line.strip_prefix("# flags: ") {
            Some("(defaults)") => Vec::new(),
            Some(f) => f.split_whitespace().collect(),
            None => panic!("{} lacks its flags line", case.display()),
        };
        let args = [&["--backend", backend][..], &flags].concat();
        net.init_ok(&args);
        let installed = net.save(backend);
        pretty_assertions::assert_eq!(
            comments(&golden),
            comments(&installed),
            "{}: installed rules differ from the golden file",
            case.display()
        );
        net.init_ok(&args);
        assert_eq!(
            installed,
            net.save(backend),
            "{}: not idempotent",
            case.display()
        );
        net.init_ok(&[&["--cleanup"][..], &args].concat());
        assert_eq!(
            before,
            net.save(backend),
            "{}: cleanup left rules",
            case.display()
        );
    }
}
