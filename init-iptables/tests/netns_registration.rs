//! `remora-init --accel-registrations`: the real binary, run inside a network namespace
//! this test creates, applies its rules and then writes the pod's registration for the
//! node's `remora-accel` agent. The file must carry that namespace's own cookie (read
//! independently, by Python inside the namespace) and exactly the capture lists of the
//! flags; a directory it cannot write to is a warning, never a failed pod. It needs no BPF,
//! so it is not a `netns_accel*` binary (those are skipped by REMORA_SKIP_ACCEL).
//!
//! Needs root, `ip` (iproute2), the iptables tools (Debian package `iptables`) and
//! `python3`. The namespace is removed in `Drop`, also when an assertion fails; the
//! registration directories are temporary directories removed the same way.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;
use remora_init::accel::{Registration, current_netns_cookie};
use remora_init::config::OutboundCapture;
use remora_init::flags::Flags;

const INIT: &str = env!("CARGO_BIN_EXE_remora-init");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace with loopback up; deleted on drop.
struct Pod {
    name: String,
}

impl Pod {
    fn new() -> Pod {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("rmra{}-{n}", std::process::id());
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "ip netns add failed: {}; this test needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => panic!("cannot run ip: {e}; install the Debian package iproute2"),
        }
        let pod = Pod { name };
        pod.exec_ok(&["ip", "link", "set", "lo", "up"]);
        pod
    }

    fn exec(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {}: {e}", self.name))
    }

    fn exec_ok(&self, args: &[&str]) -> Output {
        let out = self.exec(args, &[]);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        out
    }

    /// The namespace's cookie as Python reads it from inside (`SO_NETNS_COOKIE` = 71).
    fn cookie(&self) -> u64 {
        let script = "import socket,struct; s=socket.socket(); \
                      print(struct.unpack('=Q', s.getsockopt(socket.SOL_SOCKET, 71, 8))[0])";
        let out = self.exec(&["python3", "-c", script], &[]);
        assert!(
            out.status.success(),
            "reading the cookie with python3 failed (install python3): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("python3 printed a cookie")
    }

    /// The pod's IPv4 NAT rules as the nf_tables backend shows them.
    fn nat_rules(&self) -> String {
        let out = self.exec_ok(&["iptables-nft-save", "-t", "nat"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read the registration dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

const CAPTURE_FLAGS: [&str; 10] = [
    "--skip-outbound-ports",
    "3306,9000-9100",
    "--skip-outbound-cidrs",
    "169.254.169.254/32,fd00::/8",
    "--include-outbound-cidrs",
    "10.96.0.0/12,fd00:10:96::/112",
    "--proxy-uid",
    "2102",
    "--proxy-gid",
    "2103",
];

#[test]
fn the_registration_carries_the_namespaces_cookie_and_the_flags_capture() {
    let pod = Pod::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_arg = dir.path().to_str().expect("utf-8 temp path");
    let args = [
        &["--backend", "nft", "--outbound-port", "4140"][..],
        &CAPTURE_FLAGS,
    ]
    .concat();
    let out = pod.exec(
        &[&[INIT][..], &args, &["--accel-registrations", dir_arg]].concat(),
        &[],
    );
    assert!(out.status.success(), "remora-init failed: {}", stderr(&out));

    let cookie = pod.cookie();
    let host = current_netns_cookie().expect("the host's cookie");
    assert_ne!(cookie, host, "the pod namespace has its own cookie");
    assert_eq!(files_in(dir.path()), [format!("{cookie}.json")]);
    assert!(
        stderr(&out).contains(&format!(
            "registered with remora-accel: {dir_arg}/{cookie}.json"
        )),
        "{}",
        stderr(&out)
    );

    let (reg, capture) =
        Registration::read(&dir.path().join(format!("{cookie}.json"))).expect("a valid file");
    // Exactly what the same flags build, field by field.
    let flags = Flags::try_parse_from([&["remora-init"][..], &args].concat()).expect("flags");
    let config = flags.config().expect("valid flags");
    assert_eq!(reg, Registration::new(cookie, &config));
    assert_eq!(
        (reg.proxy_uid, reg.proxy_gid, reg.outbound_port),
        (2102, 2103, 4140)
    );
    assert_eq!(reg.skip_outbound_ports, "3306,9000-9100");
    assert_eq!(reg.skip_outbound_cidrs, "169.254.169.254/32,fd00::/8");
    assert_eq!(reg.include_outbound_cidrs, "10.96.0.0/12,fd00:10:96::/112");
    assert!(reg.ipv6);
    assert_eq!(capture.skip_outbound_ports, config.skip_outbound_ports);
    assert_eq!(capture.skip_outbound_cidrs, config.skip_outbound_cidrs);
    assert_eq!(capture.outbound, config.outbound);

    // The iptables rules stay installed: they are the path when no agent runs.
    let rules = pod.nat_rules();
    assert!(
        rules.contains("-j REDIRECT --to-ports 4140"),
        "the outbound rules are missing:\n{rules}"
    );
}

#[test]
fn the_environment_variable_turns_it_on_and_other_modes_write_nothing() {
    let pod = Pod::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_arg = dir.path().to_str().expect("utf-8 temp path");
    let env = [("REMORA_INIT_ACCEL_REGISTRATIONS", dir_arg)];
    for mode in ["--dry-run", "--validate", "--cleanup"] {
        let out = pod.exec(&[INIT, "--backend", "nft", "--ipv6", "false", mode], &env);
        // --validate fails here (no rules yet), the others succeed; none may register.
        assert!(
            !stderr(&out).contains("remora-accel"),
            "{mode}: {}",
            stderr(&out)
        );
        assert!(
            files_in(dir.path()).is_empty(),
            "{mode} wrote a registration"
        );
    }
    let out = pod.exec(&[INIT, "--backend", "nft", "--ipv6", "false"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let cookie = pod.cookie();
    let (reg, capture) =
        Registration::read(&dir.path().join(format!("{cookie}.json"))).expect("a valid file");
    assert_eq!(
        (reg.proxy_uid, reg.outbound_port, reg.ipv6),
        (1337, 15001, false)
    );
    assert_eq!(capture.outbound, OutboundCapture::All);
    assert!(capture.skip_outbound_ports.is_empty());

    // Applying again (an init container restart) rewrites the same file.
    let out = pod.exec(&[INIT, "--backend", "nft", "--ipv6", "false"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(files_in(dir.path()), [format!("{cookie}.json")]);
}

#[test]
fn an_unwritable_directory_is_a_warning_and_the_rules_still_apply() {
    let pod = Pod::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("not-mounted");
    let missing_arg = missing.to_str().expect("utf-8 temp path");
    let out = pod.exec(
        &[
            INIT,
            "--backend",
            "nft",
            "--accel-registrations",
            missing_arg,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "a failed registration must not fail the pod ({}): {}",
        out.status,
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("warning: not registered with remora-accel")
            && err.contains(missing_arg)
            && err.contains("through the iptables rules"),
        "{err}"
    );
    assert!(!missing.exists());
    let rules = pod.nat_rules();
    assert!(rules.contains("-j REDIRECT --to-ports 15001"), "{rules}");
}
