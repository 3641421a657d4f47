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
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::netns::{
    CLIENT_IP, FRONTEND, Pods, REVIEWS, SERVER_IP, SERVER_IP6, check_prerequisites, curl,
    curl_around_proxy, metric, pods, run, wait_for,
};

/// Waits until the client's slow request is inside the client proxy (an open outbound
/// connection), so the shutdown that follows really has a request in flight.
fn wait_request_in_flight(pods: &Pods) {
    wait_for(
        "the slow request in flight through the client proxy",
        || {
            metric(
                &pods.client,
                "remora_proxy_open_connections{direction=\"outbound\"}",
            )
            .is_some_and(|n| n >= 1)
        },
        || pods.log("proxy-client"),
    );
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

/// Both pods meshed: identities from one CA, the server strict mTLS, the app on 8080.
fn meshed_pods() -> (Pods, PathBuf) {
    let mut pods = pods();
    let (server_id, client_id) = pods.identities();
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
    let direct = curl_around_proxy(&pods.client, &url);
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
    wait_request_in_flight(&pods);
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
    wait_request_in_flight(&pods);
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
