//! The classic-sidecar lifecycle hooks against the real binary on loopback:
//! `remora-proxy wait-ready` (postStart) and `remora-proxy drain` (preStop). Draining
//! with a request in flight through intercepted traffic is in `tests/netns.rs`.

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_remora-proxy");

/// A proxy process, killed on drop.
struct ProxyProc {
    child: Child,
    admin: SocketAddr,
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl ProxyProc {
    /// Waits up to 10 s for the process to exit.
    fn exit_status(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "the proxy did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A loopback port nothing listens on (bound, read, released).
fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn proxy(extra: &[&str]) -> ProxyProc {
    let admin = free_port();
    let child = Command::new(BIN)
        .args([
            "--outbound-listen",
            "127.0.0.1:0",
            "--inbound-listen",
            "127.0.0.1:0",
            "--admin-listen",
            &admin.to_string(),
            "--config-poll-interval",
            "100ms",
            "--log-level",
            "warn",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn remora-proxy");
    ProxyProc { child, admin }
}

fn hook(args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run remora-proxy hook");
    (out, start.elapsed())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn wait_ready_succeeds_once_the_proxy_is_ready() {
    let p = proxy(&[]);
    let admin = format!("--admin={}", p.admin);
    // Started right after the proxy, as kubelet does: it polls until the admin port answers.
    let (out, _) = hook(&["wait-ready", "--timeout=20s", &admin]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("is ready"), "{}", stderr(&out));
}

#[test]
fn wait_ready_fails_with_a_message_when_nothing_listens() {
    let admin = format!("--admin={}", free_port());
    let (out, took) = hook(&["wait-ready", "--timeout=1s", &admin]);
    assert!(!out.status.success(), "must fail: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("not ready after 1s") && err.contains("connection refused"),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(1),
        "waited the timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "gave up: {took:?}");
}

#[test]
fn wait_ready_fails_while_ready_stays_503() {
    // The config names identity files that do not exist: the proxy runs, /ready says 503.
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing");
    let cfg = dir.path().join("proxy.yaml");
    std::fs::write(
        &cfg,
        format!(
            "version: 1\nidentity:\n  spiffeId: spiffe://cluster.local/ns/a/sa/b\n  certChain: {m}.pem\n  privateKey: {m}-key.pem\n  trustBundle: {m}-bundle.pem\n",
            m = missing.display()
        ),
    )
    .expect("write config");
    let mut p = proxy(&["--config", &cfg.display().to_string()]);
    let admin = format!("--admin={}", p.admin);
    let (out, took) = hook(&["wait-ready", "--timeout=2s", &admin]);
    assert!(!out.status.success(), "must fail: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("not ready after 2s") && err.contains("503 not ready: certificate not loaded"),
        "{err}"
    );
    assert!(took < Duration::from_secs(12), "gave up: {took:?}");
    assert!(
        p.child.try_wait().expect("try_wait").is_none(),
        "the proxy keeps running"
    );
}

#[test]
fn drain_stops_the_proxy_which_exits_zero() {
    let mut p = proxy(&["--shutdown-grace-period", "5s"]);
    let admin = format!("--admin={}", p.admin);
    let (out, _) = hook(&["wait-ready", "--timeout=20s", &admin]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (out, took) = hook(&["drain", "--grace-period=10s", &admin]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("drained; the proxy has stopped"),
        "{}",
        stderr(&out)
    );
    assert!(took < Duration::from_secs(10), "returned on exit: {took:?}");
    let status = p.exit_status();
    assert!(status.success(), "exit code 0 after drain: {status:?}");
}

#[test]
fn drain_without_a_proxy_exits_zero_and_says_so() {
    let admin = format!("--admin={}", free_port());
    let (out, _) = hook(&["drain", "--grace-period=1s", &admin]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nothing to drain"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn without_a_subcommand_the_flags_run_the_proxy_and_subcommands_reject_them() {
    let (out, _) = hook(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["wait-ready", "drain", "--config", "--shutdown-grace-period"] {
        assert!(help.contains(word), "--help documents {word}: {help}");
    }
    let (out, _) = hook(&["--config", "/nonexistent.yaml", "wait-ready"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // Proxy flags from the environment (as the webhook sets them) do not get in the way.
    let admin = format!("--admin={}", free_port());
    let out = Command::new(BIN)
        .env("REMORA_PROXY_CONFIG", "/nonexistent.yaml")
        .env("REMORA_PROXY_SHUTDOWN_GRACE_PERIOD", "7s")
        .args(["drain", "--grace-period=1s", &admin])
        .output()
        .expect("run drain");
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `POST <path>` on the admin port with a plain HTTP/1.1 request, as `curl -X POST` from
/// the app container does; the status code and body.
fn post(admin: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(admin).expect("connect to the admin port");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read answer");
    let code = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (code, body.unwrap_or_default())
}

#[test]
fn an_app_that_is_done_stops_the_proxy_by_either_name_and_it_exits_zero() {
    // A Job's app calls this when it is done: the classic sidecar must exit so the pod
    // can reach Succeeded. `/quitquitquit` is Istio's name for the same call.
    for path in ["/shutdown", "/quitquitquit"] {
        let mut p = proxy(&["--shutdown-grace-period", "30s"]);
        let admin = format!("--admin={}", p.admin);
        let (out, _) = hook(&["wait-ready", "--timeout=20s", &admin]);
        assert!(out.status.success(), "{}", stderr(&out));
        let asked = Instant::now();
        let (code, body) = post(p.admin, path);
        assert_eq!((code, body.trim()), (200, "shutting down"), "{path}");
        let status = p.exit_status();
        let took = asked.elapsed();
        assert!(status.success(), "{path}: exit code 0: {status:?}");
        // Nothing is in flight, so nothing holds the exit back for the 30 s grace period.
        assert!(
            took < Duration::from_secs(5),
            "{path}: exited after {took:?}"
        );
    }
}
