//! Traffic policy end to end in network namespaces (root): three server "pods" behind one
//! service, a client pod with `remora-init`'s real interception rules and the
//! `remora-proxy` binary (UID 1337) reading its policy from a config file, and a client
//! app that calls the service's ClusterIP as any app would. Balancing, retries, outlier
//! ejection and the circuit breaker are observed from the outside: which server answered,
//! and with what.
//!
//! Topology: a hub namespace with a bridge; the client pod (10.78.0.1) and the servers
//! (10.78.0.11-13) each have a veth to it. The ClusterIP 10.96.78.10:8080 exists only as a
//! route in the client pod: iptables sends every connection to it to the proxy.

mod common;

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
};

use common::netns::{Netns, Proc, check_prerequisites, curl, run, wait_for};

const CLIENT: &str = "10.78.0.1";
const SERVERS: [&str; 3] = ["10.78.0.11", "10.78.0.12", "10.78.0.13"];
const VIP: &str = "10.96.78.10:8080";
const FAILING_VIP: &str = "10.96.78.11:8080";

/// Answers its name; `/flaky` fails on server s0 only, `/fail` fails everywhere.
const SERVER_APP: &str = r#"
import http.server, socketserver, sys, itertools
name = sys.argv[2]
counter = itertools.count(1)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        n = next(counter)
        fail = self.path == "/fail" or (self.path == "/flaky" and name == "s0")
        body = name.encode()
        self.send_response(503 if fail else 200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
print("listening", flush=True)
S(("0.0.0.0", 8080), H).serve_forever()
"#;

/// Sends N GETs to a URL on one kept-alive connection; prints `{"<status> <body>": n}`.
const CLIENT_APP: &str = r#"
import http.client, json, sys
host, port = sys.argv[1].split(":")
path, n = sys.argv[2], int(sys.argv[3])
counts = {}
c = http.client.HTTPConnection(host, int(port), timeout=10)
for _ in range(n):
    c.request("GET", path)
    r = c.getresponse()
    key = "%d %s" % (r.status, r.read().decode())
    if r.status != 200:
        key = "%d %s" % (r.status, r.getheader("x-remora-proxy-error") or "upstream")
    counts[key] = counts.get(key, 0) + 1
print(json.dumps(counts))
"#;

struct Mesh {
    procs: Vec<Proc>,
    client: Netns,
    servers: Vec<Netns>,
    _hub: Netns,
    dir: tempfile::TempDir,
}

impl Mesh {
    fn new(config: &str) -> Self {
        let tag = format!("{}", std::process::id() % 100_000);
        let hub = Netns::new(format!("rph{tag}"));
        run(&mut hub.cmd(&["ip", "link", "add", "br0", "type", "bridge"]));
        run(&mut hub.cmd(&["ip", "link", "set", "br0", "up"]));
        let attach = |ns: &Netns, i: usize, ip: &str| {
            let (inner, outer) = (format!("rpv{tag}{i}"), format!("rpw{tag}{i}"));
            run(Command::new("ip").args([
                "link", "add", &inner, "netns", &ns.name, "type", "veth", "peer", "name", &outer,
                "netns", &hub.name,
            ]));
            run(&mut hub.cmd(&["ip", "link", "set", &outer, "master", "br0", "up"]));
            run(&mut ns.cmd(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &inner]));
            run(&mut ns.cmd(&["ip", "link", "set", &inner, "up"]));
            inner
        };
        let client = Netns::new(format!("rpc{tag}"));
        let dev = attach(&client, 0, CLIENT);
        run(&mut client.cmd(&["ip", "route", "add", "10.96.0.0/16", "dev", &dev]));
        client.remora_init();
        let servers: Vec<Netns> = SERVERS
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                let ns = Netns::new(format!("rps{tag}{i}"));
                attach(&ns, i + 1, ip);
                ns
            })
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut mesh = Self {
            procs: Vec::new(),
            client,
            servers,
            _hub: hub,
            dir,
        };
        let app = mesh.write("server.py", SERVER_APP);
        for i in 0..SERVERS.len() {
            let name = format!("s{i}");
            mesh.spawn(Some(i), &name, &["/usr/bin/python3", &app, "8080", &name]);
            wait_for(
                &format!("{name} listening"),
                || mesh.log(&name).contains("listening"),
                || mesh.log(&name),
            );
        }
        let cfg = mesh.write("proxy.yaml", config);
        let bin = env!("CARGO_BIN_EXE_remora-proxy");
        mesh.spawn(
            None,
            "proxy",
            &[
                "setpriv",
                "--reuid=1337",
                "--regid=1337",
                "--clear-groups",
                bin,
                "--config",
                &cfg,
                "--log-level",
                "info",
            ],
        );
        wait_for(
            "proxy ready",
            || curl(&mesh.client, "http://127.0.0.1:15020/ready").is_some_and(|(c, _)| c == 200),
            || mesh.log("proxy"),
        );
        mesh
    }

    fn write(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        fs::write(&p, text).expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        p.display().to_string()
    }

    fn spawn(&mut self, server: Option<usize>, what: &str, args: &[&str]) {
        let ns = match server {
            Some(i) => &self.servers[i],
            None => &self.client,
        };
        let log = fs::File::create(self.dir.path().join(format!("{what}.log"))).expect("log");
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
    }

    fn log(&self, what: &str) -> String {
        fs::read_to_string(self.dir.path().join(format!("{what}.log"))).unwrap_or_default()
    }

    /// `n` requests from the client app to `vip` + `path`: counts by "status body".
    fn call(&self, vip: &str, path: &str, n: usize) -> HashMap<String, usize> {
        let script = self.write("client.py", CLIENT_APP);
        let out =
            run(&mut self
                .client
                .cmd(&["/usr/bin/python3", &script, vip, path, &n.to_string()]));
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("client output {text:?}: {e}\n{}", self.log("proxy")))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Processes first, then the namespaces (fields drop in order after this).
        self.procs.clear();
    }
}

fn config() -> String {
    let eps: Vec<String> = SERVERS
        .iter()
        .map(|ip| format!("{{address: \"{ip}:8080\"}}"))
        .collect();
    let eps = eps.join(", ");
    format!(
        r#"outbound:
  services:
  - name: app.shop
    addresses: ["{VIP}"]
    protocol: http
    policy:
      loadBalancer: {{algorithm: RoundRobin}}
      retries: {{attempts: 2, retryOn: ["503"], backoff: {{base: 1ms, max: 2ms}}, budgetPercent: 100}}
      outlierDetection: {{consecutiveErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 34}}
    endpoints: [{eps}]
  - name: failing.shop
    addresses: ["{FAILING_VIP}"]
    protocol: http
    policy:
      circuitBreaker: {{errorRatePercent: 50, minRequests: 10, window: 10s, openFor: 30s}}
    endpoints: [{eps}]
"#
    )
}

#[test]
fn policy_from_a_config_file_balances_retries_ejects_and_breaks_end_to_end() {
    check_prerequisites();
    let mesh = Mesh::new(&config());

    let spread = mesh.call(VIP, "/", 300);
    println!("round robin, 300 requests over 3 servers: {spread:?}");
    for s in ["s0", "s1", "s2"] {
        let n = spread.get(&format!("200 {s}")).copied().unwrap_or(0);
        assert!((95..=105).contains(&n), "{s}: {n} ({spread:?})");
    }

    // One server of three fails every request: retries (to the next server) hide it.
    let flaky = mesh.call(VIP, "/flaky", 200);
    println!("one failing server, with retries: {flaky:?}");
    let ok: usize = flaky
        .iter()
        .filter(|(k, _)| k.starts_with("200 "))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(ok, 200, "{flaky:?}\n{}", mesh.log("proxy"));

    // The error-rate breaker of a service whose every server fails opens and fast-fails.
    let failing = mesh.call(FAILING_VIP, "/fail", 40);
    println!("failing service behind a breaker: {failing:?}");
    let open = failing
        .iter()
        .filter(|(k, _)| k.contains("circuit breaker of failing.shop is open"))
        .map(|(_, n)| n)
        .sum::<usize>();
    assert!(
        open >= 25,
        "the breaker opened after 10 failures: {failing:?}"
    );
}
