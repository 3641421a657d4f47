//! Network-namespace tests (root, `ip`, `iptables`, `curl`, `python3`, `setpriv`): two
//! "pods" in their own namespaces joined by a veth pair, each with the interception rules
//! `remora-init` installs (outbound TCP → 15001 except the proxy's UID 1337 and loopback;
//! inbound TCP → 15006), the `remora-proxy` binary running as UID 1337 with a standalone
//! config and file certificates, and real clients and servers. The original destination
//! comes from the kernel (`SO_ORIGINAL_DST`), as in a pod.
//!
//! Every namespace, veth and process is removed by a guard's `Drop`, also on failure.
//! A missing prerequisite fails the test with what to install; a machine without root opts
//! out of the whole tier with `REMORA_SKIP_NETNS=1 make test` (the tests are then not run).

mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use common::pki::{Ca, IdentityPaths};

const CLIENT_IP: &str = "10.77.0.1";
const SERVER_IP: &str = "10.77.0.2";
const CLIENT_IP6: &str = "fd77::1";
const SERVER_IP6: &str = "fd77::2";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const REVIEWS: &str = "spiffe://cluster.local/ns/shop/sa/reviews";

fn check_prerequisites() {
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

fn run(cmd: &mut Command) -> Output {
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
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        run(&mut ns.cmd(&["ip", "link", "set", "lo", "up"]));
        ns
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    fn rules(&self, tool: &str, rules: &[&str]) {
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
struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    fn pid(&self) -> u32 {
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
struct Pods {
    // Field order is drop order: processes before namespaces.
    procs: Vec<Proc>,
    client: Netns,
    server: Netns,
    dir: tempfile::TempDir,
}

fn pods() -> Pods {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tag = format!("{}{n}", std::process::id() % 100_000);
    let client = Netns::new(format!("rpc{tag}"));
    let server = Netns::new(format!("rps{tag}"));
    let (va, vb) = (format!("rva{tag}"), format!("rvb{tag}"));
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
    for (ns, dev, ip, ip6) in [
        (&client, &va, CLIENT_IP, CLIENT_IP6),
        (&server, &vb, SERVER_IP, SERVER_IP6),
    ] {
        run(&mut ns.cmd(&["ip", "addr", "add", &format!("{ip}/24"), "dev", dev]));
        run(&mut ns.cmd(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            dev,
            "nodad",
        ]));
        run(&mut ns.cmd(&["ip", "link", "set", dev, "up"]));
    }
    for (tool, lo) in [("iptables", "127.0.0.1/32"), ("ip6tables", "::1/128")] {
        let outbound = [
            "-A OUTPUT -p tcp -m owner --uid-owner 1337 -j RETURN".to_owned(),
            format!("-A OUTPUT -p tcp -d {lo} -j RETURN"),
            "-A OUTPUT -p tcp -j REDIRECT --to-ports 15001".to_owned(),
        ];
        let outbound: Vec<&str> = outbound.iter().map(String::as_str).collect();
        client.rules(tool, &outbound);
        server.rules(tool, &outbound);
        // The admin port (probes) is not captured, as remora-init leaves it.
        server.rules(
            tool,
            &[
                "-A PREROUTING -p tcp --dport 15020 -j RETURN",
                "-A PREROUTING -p tcp -j REDIRECT --to-ports 15006",
            ],
        );
    }
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

const APP: &str = r#"
import http.server, socketserver, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/slow/"):
            time.sleep(int(self.path[6:]) / 1000)
        body = ("path=%s host=%s request-id=%s\n" % (self.path, self.headers.get("host"), self.headers.get("x-request-id"))).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
S(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// A server-speaks-first TCP server (like SMTP) on IPv6: greets, then echoes one line.
const GREETER: &str = r#"
import socket, sys, threading
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(16)
def serve(c):
    with c:
        c.sendall(b"220 greeter ESMTP\r\n")
        data = c.recv(1024)
        c.sendall(data)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A client that waits for the greeting before it says anything.
const GREETER_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
greeting = c.recv(1024)
c.sendall(b"EHLO client\r\n")
echo = c.recv(1024)
print(greeting.decode().strip() + "|" + echo.decode().strip())
"#;

impl Pods {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, text).expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        p
    }

    fn spawn(&mut self, ns_is_server: bool, what: &str, args: &[&str]) -> usize {
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

    fn log(&self, what: &str) -> String {
        fs::read_to_string(self.dir.path().join(format!("{what}.log"))).unwrap_or_default()
    }

    fn proxy(&mut self, server: bool, config: &Path) -> usize {
        let bin = env!("CARGO_BIN_EXE_remora-proxy");
        let cfg = config.display().to_string();
        let what = if server {
            "proxy-server"
        } else {
            "proxy-client"
        };
        let idx = self.spawn(
            server,
            what,
            &[
                "setpriv",
                "--reuid=1337",
                "--regid=1337",
                "--clear-groups",
                bin,
                "--config",
                &cfg,
                "--config-poll-interval",
                "100ms",
                "--shutdown-grace-period",
                "5s",
                "--log-level",
                "debug",
            ],
        );
        let ns = if server { &self.server } else { &self.client };
        wait_for(
            &format!("{what} ready"),
            || curl(ns, "http://127.0.0.1:15020/ready").is_some_and(|(code, _)| code == 200),
            || self.log(what),
        );
        idx
    }
}

fn curl(ns: &Netns, url: &str) -> Option<(u16, String)> {
    let out = ns
        .cmd(&["curl", "-sS", "-m", "10", "-w", "\n%{http_code}", url])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_owned()))
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool, logs: impl Fn() -> String) {
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

/// Both pods meshed: identities from one CA, the server strict mTLS, the app on 8080.
fn meshed_pods() -> (Pods, PathBuf) {
    let mut pods = pods();
    let ca = Ca::new("remora netns CA");
    let server_id = IdentityPaths::write(pods.dir.path(), "reviews", REVIEWS, &ca, &ca);
    let client_id = IdentityPaths::write(pods.dir.path(), "frontend", FRONTEND, &ca, &ca);
    for p in [
        &server_id.cert,
        &server_id.key,
        &server_id.bundle,
        &client_id.cert,
        &client_id.key,
        &client_id.bundle,
    ] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let greeter = pods.write("greeter.py", GREETER);
    pods.spawn(
        true,
        "greeter",
        &["/usr/bin/python3", &greeter.display().to_string(), "2525"],
    );
    let app = pods.write("app.py", APP);
    pods.spawn(
        true,
        "app",
        &["/usr/bin/python3", &app.display().to_string(), "8080"],
    );
    wait_for(
        "app listening",
        || curl(&pods.server, "http://127.0.0.1:8080/").is_some_and(|(c, _)| c == 200),
        || pods.log("app"),
    );
    let server_cfg = pods.write(
        "server.yaml",
        &format!(
            "version: 1\n{}inbound:\n  default: {{mtls: Strict}}\n  ports: {{\"2525\": {{protocol: opaque}}}}\n",
            server_id.yaml()
        ),
    );
    let client_cfg = pods.write(
        "client.yaml",
        &format!(
            "version: 1\n{}outbound:\n  services:\n  - name: reviews.shop\n    addresses: [\"{SERVER_IP}:8080\"]\n    endpoints:\n    - {{address: \"{SERVER_IP}:8080\", identity: \"{REVIEWS}\", meshed: true}}\n  - name: mail.shop\n    addresses: [\"[{SERVER_IP6}]:2525\"]\n    protocol: opaque\n    endpoints:\n    - {{address: \"[{SERVER_IP6}]:2525\", identity: \"{REVIEWS}\", meshed: true}}\n",
            client_id.yaml()
        ),
    );
    pods.proxy(true, &server_cfg);
    pods.proxy(false, &client_cfg);
    (pods, server_cfg)
}

fn metric(ns: &Netns, prefix: &str) -> Option<u64> {
    let (_, text) = curl(ns, "http://127.0.0.1:15020/metrics")?;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn intercepted_http_rides_mtls_between_two_pods() {
    check_prerequisites();
    let (pods, server_cfg) = meshed_pods();
    let url = format!("http://{SERVER_IP}:8080/hello");
    let (code, body) = curl(&pods.client, &url).expect("curl");
    assert_eq!(
        code,
        200,
        "{body}\n{}\n{}",
        pods.log("proxy-client"),
        pods.log("proxy-server")
    );
    assert!(
        body.starts_with(&format!("path=/hello host={SERVER_IP}:8080 request-id=")),
        "{body}"
    );
    assert!(
        !body.contains("request-id=None"),
        "x-request-id was added: {body}"
    );
    // The server pod saw the client's SPIFFE ID over mTLS; its plaintext port is closed (Strict).
    assert_eq!(
        metric(
            &pods.server,
            &format!(
                r#"remora_proxy_requests_total{{direction="inbound",status="200",peer_identity="{FRONTEND}"}}"#
            )
        ),
        Some(1),
        "{}",
        pods.log("proxy-server")
    );
    assert_eq!(
        metric(
            &pods.client,
            r#"remora_proxy_tls_handshakes_total{direction="outbound",outcome="ok"}"#
        ),
        Some(1)
    );
    // Going around the client proxy (as UID 1337 would) hits the server's Strict mTLS.
    let direct = pods
        .client
        .cmd(&[
            "setpriv",
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            "curl",
            "-sS",
            "-m",
            "5",
            &url,
        ])
        .output()
        .expect("curl");
    assert!(
        !direct.status.success(),
        "plaintext to a Strict pod must fail"
    );
    assert!(
        metric(
            &pods.server,
            r#"remora_proxy_connections_total{direction="inbound",outcome="plaintext_refused"}"#
        )
        .unwrap_or(0)
            >= 1
    );
    // A bad config file is rejected; the proxy keeps serving the last good one.
    fs::write(
        &server_cfg,
        "version: 2\ninbound: {default: {mtls: Sometimes}}\n",
    )
    .expect("write");
    wait_for(
        "bad config rejected",
        || {
            metric(
                &pods.server,
                r#"remora_proxy_config_reloads_total{reason="parse_error"}"#,
            )
            .unwrap_or(0)
                >= 1
        },
        || pods.log("proxy-server"),
    );
    assert_eq!(curl(&pods.client, &url).expect("curl").0, 200);
    // Connections to the proxy's own port are refused, not looped.
    let (code, _) =
        curl(&pods.client, &format!("http://{CLIENT_IP}:15001/")).unwrap_or((0, String::new()));
    assert_eq!(
        code, 0,
        "a connection to the proxy itself gets no HTTP answer"
    );
    assert!(
        metric(
            &pods.client,
            r#"remora_proxy_connections_total{direction="outbound",outcome="loop_refused"}"#
        )
        .unwrap_or(0)
            + metric(
                &pods.client,
                r#"remora_proxy_connections_total{direction="outbound",outcome="not_redirected"}"#
            )
            .unwrap_or(0)
            >= 1,
        "{}",
        pods.log("proxy-client")
    );
}

#[test]
fn sigterm_lets_in_flight_requests_finish_and_exits_zero() {
    check_prerequisites();
    let (mut pods, _) = meshed_pods();
    let url = format!("http://{SERVER_IP}:8080/slow/1500");
    let in_flight = pods
        .client
        .cmd(&["curl", "-sS", "-m", "10", "-w", "\n%{http_code}", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl");
    std::thread::sleep(Duration::from_millis(500));
    let proxy = pods
        .procs
        .iter()
        .position(|p| p.what == "proxy-client")
        .expect("client proxy");
    run(Command::new("kill").args(["-TERM", &pods.procs[proxy].pid().to_string()]));
    let out = in_flight.wait_with_output().expect("curl finishes");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n200"),
        "the in-flight request completed: {text}\n{}",
        pods.log("proxy-client")
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(Some(s)) = pods.procs[proxy].child.try_wait() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "proxy did not exit\n{}",
            pods.log("proxy-client")
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "exit code 0 after SIGTERM: {status:?}\n{}",
        pods.log("proxy-client")
    );
    assert!(
        pods.log("proxy-client").contains("drained"),
        "{}",
        pods.log("proxy-client")
    );
}

#[test]
fn drain_hook_lets_in_flight_requests_finish_and_the_proxy_exits_zero() {
    check_prerequisites();
    let (mut pods, _) = meshed_pods();
    let bin = env!("CARGO_BIN_EXE_remora-proxy");
    // The postStart hook, as kubelet runs it in the proxy container.
    let out = run(&mut pods.client.cmd(&[bin, "wait-ready", "--timeout=10s"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is ready"));
    let url = format!("http://{SERVER_IP}:8080/slow/1500");
    let in_flight = pods
        .client
        .cmd(&["curl", "-sS", "-m", "10", "-w", "\n%{http_code}", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl");
    std::thread::sleep(Duration::from_millis(500));
    // The preStop hook: returns once the proxy has drained and exited.
    let drain = run(&mut pods.client.cmd(&[bin, "drain", "--grace-period=10s"]));
    let drain_err = String::from_utf8_lossy(&drain.stderr).into_owned();
    assert!(
        drain_err.contains("drained; the proxy has stopped"),
        "{drain_err}\n{}",
        pods.log("proxy-client")
    );
    let out = in_flight.wait_with_output().expect("curl finishes");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n200"),
        "the in-flight request completed: {text}\n{}",
        pods.log("proxy-client")
    );
    let proxy = pods
        .procs
        .iter()
        .position(|p| p.what == "proxy-client")
        .expect("client proxy");
    let status = pods.procs[proxy]
        .child
        .try_wait()
        .expect("try_wait")
        .expect("the proxy has exited when drain returns");
    assert!(
        status.success(),
        "exit code 0 after drain: {status:?}\n{}",
        pods.log("proxy-client")
    );
    assert!(
        pods.log("proxy-client")
            .contains("shutdown requested on the admin port"),
        "{}",
        pods.log("proxy-client")
    );
}

#[test]
fn server_speaks_first_over_ipv6_mtls_and_admin_is_local_only() {
    check_prerequisites();
    let (pods, _) = meshed_pods();
    let client = pods.write("greeter_client.py", GREETER_CLIENT);
    let out = run(&mut pods.client.cmd(&[
        "/usr/bin/python3",
        &client.display().to_string(),
        SERVER_IP6,
        "2525",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        "220 greeter ESMTP|EHLO client",
        "{}\n{}",
        pods.log("proxy-client"),
        pods.log("proxy-server")
    );
    // IPv6 original destinations (IP6T_SO_ORIGINAL_DST); an opaque service skips detection
    // on the client side, and the server side terminates the mesh mTLS.
    assert_eq!(
        metric(
            &pods.client,
            r#"remora_proxy_detect_total{direction="outbound",outcome="skipped_opaque_port"}"#
        ),
        Some(1)
    );
    assert_eq!(
        metric(
            &pods.server,
            r#"remora_proxy_detect_total{direction="inbound",outcome="mesh_tls"}"#
        ),
        Some(1)
    );
    assert_eq!(
        metric(
            &pods.server,
            r#"remora_proxy_tls_handshakes_total{direction="inbound",outcome="ok"}"#
        ),
        Some(1)
    );
    // /shutdown and /log-level answer only to localhost.
    for path in ["shutdown", "log-level"] {
        let out = pods
            .client
            .cmd(&[
                "curl",
                "-sS",
                "-m",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                &format!("http://{SERVER_IP}:15020/{path}"),
            ])
            .output()
            .expect("curl");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "403",
            "/{path} from another pod"
        );
    }
    let (code, _) = curl(&pods.server, "http://127.0.0.1:15020/ready").expect("curl");
    assert_eq!(code, 200, "still serving");
    let out = pods
        .server
        .cmd(&[
            "curl",
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "http://127.0.0.1:15020/shutdown",
        ])
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "/shutdown from localhost"
    );
}
