//! Resource limits under abuse, against an in-process proxy on loopback:
//! - a flood of connections that send a mesh ClientHello and then stall is cut by the
//!   handshake caps (per client IP, in all) and the handshake timeout, while a client on
//!   another address gets through during the flood;
//! - 10,000 idle keep-alive client connections: the proxy keeps serving others, and its
//!   memory per idle connection is measured (RSS delta / 10,000) and bounded. The idle
//!   clients live in a python3 child, so the test process holds only the proxy's side.

mod abuse;
mod common;

use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use abuse::{
    FRONTEND, LOCAL, OTHER, client_config, connect_from, mesh_get, metric, refused, server,
};
use remora_proxy::tls::HandshakeLimits;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The bytes of a mesh ClientHello (ALPN `remora/1`), as a flooder replays them.
fn client_hello() -> Vec<u8> {
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut conn = rustls::ClientConnection::new(client_config(None), name).expect("client");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("ClientHello");
    hello
}

/// `n` connections from `from` that each send `hello` and then say nothing more.
async fn stall(n: usize, from: IpAddr, addr: SocketAddr, hello: &[u8]) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = connect_from(from, addr).await.expect("connect");
        c.write_all(hello).await.expect("ClientHello");
        out.push(c);
    }
    out
}

/// Waits (up to 10 s) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every stalled connection is closed by the proxy within `within`.
async fn all_closed(conns: Vec<TcpStream>, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    for mut c in conns {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
                Err(_) => panic!("a stalled handshake is still open after {within:?}"),
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(_)) => {} // the server's flight; the close follows
            }
        }
    }
}

#[tokio::test]
async fn a_handshake_flood_is_cut_and_another_client_gets_through() {
    let timeout = Duration::from_secs(3);
    let s = server("  default: {mtls: Strict}\n", |st| {
        st.handshake_limits = HandshakeLimits {
            timeout,
            max_concurrent: 200,
            max_per_client: 50,
        };
    })
    .await;
    let addr = s.proxy.inbound_addrs[0];
    let hello = client_hello();
    let started = Instant::now();
    let flood = stall(300, LOCAL, addr, &hello).await;
    until("the flood over the per-client cap refused", || {
        refused(&s.proxy, "handshake_limit_per_client") == 250
    })
    .await;
    assert_eq!(s.proxy.context().handshakes.in_progress(), 50);
    // During the flood, a client on another address gets through.
    let t = Instant::now();
    let got = mesh_get(s.client(FRONTEND), OTHER, addr).await;
    let good = t.elapsed();
    assert_eq!(got.as_deref(), Ok("HTTP/1.1 200 OK"));
    assert_eq!(
        s.proxy.context().handshakes.in_progress(),
        50,
        "the flood still held its slots while the client got through"
    );
    all_closed(flood, timeout * 2).await;
    let cut = started.elapsed();
    until("the stalled handshakes timed out", || {
        refused(&s.proxy, "timeout") == 50
    })
    .await;
    assert_eq!(s.proxy.context().handshakes.in_progress(), 0);
    assert_eq!(s.app.hits(), 1);
    println!(
        "handshake flood: 300 stalled ClientHellos from one address (caps 50 per client, 200 in all, timeout {timeout:?}): 250 closed at once, 50 cut by the timeout, all gone {cut:?} after the flood began; a client on another address got 200 in {good:?} during it"
    );

    // The cap in all: two more flooding addresses fill it, and the excess is closed at once.
    let third: IpAddr = "127.0.0.3".parse().expect("ip");
    let fourth: IpAddr = "127.0.0.4".parse().expect("ip");
    let before = rss();
    let mut flood = stall(50, LOCAL, addr, &hello).await;
    flood.extend(stall(50, OTHER, addr, &hello).await);
    flood.extend(stall(50, third, addr, &hello).await);
    flood.extend(stall(100, fourth, addr, &hello).await);
    until("the cap in all reached", || {
        refused(&s.proxy, "handshake_limit") + refused(&s.proxy, "handshake_limit_per_client")
            == 250 + 50
    })
    .await;
    assert_eq!(s.proxy.context().handshakes.in_progress(), 200);
    let per_handshake = rss().saturating_sub(before) / 200;
    println!(
        "cap in all: 250 more stalled ClientHellos from four addresses, 200 held and the 50 over the cap in all closed at once; about {} KiB per handshake in progress",
        per_handshake / 1024
    );
    assert!(
        per_handshake < 256 * 1024,
        "{per_handshake} bytes per stalled handshake"
    );
    all_closed(flood, timeout * 2).await;
    let got = mesh_get(s.client(FRONTEND), OTHER, addr).await;
    assert_eq!(got.as_deref(), Ok("HTTP/1.1 200 OK"), "after the flood");
    assert_eq!(
        metric(
            &s.proxy,
            r#"remora_proxy_tls_handshakes_total{direction="inbound",outcome="ok"}"#
        ),
        2
    );
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Raises this process's soft descriptor limit to at least `want` (up to the hard limit,
/// which needs no privilege), with util-linux's prlimit.
fn raise_nofile(want: u64) {
    let pid = std::process::id().to_string();
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &pid,
            "--nofile",
            "--output=HARD",
            "--noheadings",
            "--raw",
        ])
        .output()
        .expect("prlimit is required (apt-get install util-linux)");
    let hard: u64 = match String::from_utf8_lossy(&out.stdout).trim() {
        "unlimited" => u64::MAX,
        h => h.parse().expect("hard limit"),
    };
    assert!(
        hard >= want,
        "the test needs {want} file descriptors; the hard limit is {hard} (raise it, e.g. `ulimit -Hn {want}` as root)"
    );
    let status = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={want}:")])
        .status()
        .expect("prlimit");
    assert!(status.success(), "prlimit --nofile={want}: failed");
}

/// Kills and reaps the child on drop, also when the test fails.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Opens `n` keep-alive connections to `addr` (over mesh mTLS with the certificate and
/// key files given as two more arguments), one request each, then holds them until its
/// stdin closes.
const IDLE_CLIENTS: &str = r#"
import resource, socket, ssl, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tls = None
if len(sys.argv) > 5:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    tls.minimum_version = ssl.TLSVersion.TLSv1_3
    tls.load_cert_chain(sys.argv[4], sys.argv[5])
    tls.set_alpn_protocols(["remora/1"])
held = []
for i in range(n):
    s = socket.create_connection((host, port))
    if tls:
        s = tls.wrap_socket(s)
    s.sendall(b"GET /idle HTTP/1.1\r\nhost: app.test\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("connection %d closed before its answer" % i)
        got += chunk
    if not got.startswith(b"HTTP/1.1 200"):
        sys.exit("connection %d: %r" % (i, got[:80]))
    held.append(s)
print("held", len(held), flush=True)
sys.stdin.read()
"#;

/// A server whose idle connections are measured: a next request's head that never comes
/// is HTTP behaviour owned elsewhere, kept out of the way with a long head timeout.
async fn idle_server(inbound: &str) -> abuse::Server {
    server(inbound, |st| {
        st.header_read_timeout = Duration::from_secs(600)
    })
    .await
}

/// Holds `n` idle keep-alive connections to `s` from a python3 child (mesh mTLS with
/// `tls`: certificate and key files); this process's RSS growth per connection, and the
/// child, which holds them until dropped.
async fn hold_idle(s: &abuse::Server, n: u64, tls: Option<[&std::path::Path; 2]>) -> (u64, Reap) {
    raise_nofile(n + 1024);
    let addr = s.proxy.inbound_addrs[0];
    let before = rss();
    let mut args = vec![
        "-c".to_owned(),
        IDLE_CLIENTS.to_owned(),
        addr.ip().to_string(),
        addr.port().to_string(),
        n.to_string(),
    ];
    args.extend(tls.iter().flatten().map(|p| p.display().to_string()));
    let mut clients = Reap(
        Command::new("python3")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 is required (apt-get install python3)"),
    );
    let mut stdout = clients.0.stdout.take().expect("stdout");
    let held = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut stdout), &mut line)
            .map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(240), held)
        .await
        .expect("the connections within 4 minutes")
        .expect("join")
        .expect("read the child's stdout");
    assert!(
        line.starts_with(&format!("held {n}")),
        "the client process says {line:?}"
    );
    let open = metric(
        &s.proxy,
        r#"remora_proxy_open_connections{direction="inbound"}"#,
    );
    assert!(open >= n, "{open} inbound connections open");
    (rss().saturating_sub(before) / n, clients)
}

/// `requests` sorted latencies: (p50, p99).
fn p50_p99(mut l: Vec<Duration>) -> (Duration, Duration) {
    l.sort();
    (l[l.len() / 2], l[l.len() * 99 / 100])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_cost_bounded_memory_and_others_are_served() {
    const N: u64 = 10_000;
    let s = idle_server("  default: {mtls: Permissive}\n").await;
    let addr = s.proxy.inbound_addrs[0];
    // Warm up: the upstream pool, buffers and the allocator's arenas exist before the
    // baseline is taken.
    for _ in 0..50 {
        let got = abuse::plain_get(LOCAL, addr).await;
        assert_eq!(got.as_deref(), Ok("HTTP/1.1 200 OK"));
    }
    let (per_conn, clients) = hold_idle(&s, N, None).await;
    // Others are served while the 10,000 are held.
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let got = abuse::plain_get(OTHER, addr).await;
        latencies.push(t.elapsed());
        assert_eq!(got.as_deref(), Ok("HTTP/1.1 200 OK"));
    }
    let (p50, p99) = p50_p99(latencies);
    drop(clients);
    println!(
        "10,000 idle keep-alive connections: {per_conn} bytes per connection; 200 other requests meanwhile: p50 {p50:?}, p99 {p99:?}"
    );
    assert!(
        per_conn < 48 * 1024,
        "{per_conn} bytes per idle connection (bound: 48 KiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_mesh_connections_cost_bounded_memory_and_others_are_served() {
    const N: u64 = 2_000;
    let s = idle_server("  default: {mtls: Strict}\n").await;
    let addr = s.proxy.inbound_addrs[0];
    let (cert, key) = s.ca.issue(FRONTEND, false);
    let (cert_path, key_path) = (
        s.dir.path().join("client.pem"),
        s.dir.path().join("client-key.pem"),
    );
    std::fs::write(&cert_path, cert).expect("cert");
    std::fs::write(&key_path, key).expect("key");
    for _ in 0..50 {
        let got = mesh_get(s.client(FRONTEND), LOCAL, addr).await;
        assert_eq!(got.as_deref(), Ok("HTTP/1.1 200 OK"));
    }
    let (per_conn, clients) = hold_idle(&s, N, Some([&cert_path, &key_path])).await;
    let mut latencies = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let got = mesh_get(s.client(FRONTEND), OTHER, addr).await;
        latencies.push(t.elapsed());
        assert_eq!(got.as_deref(), Ok("HTTP/1.1 200 OK"));
    }
    let (p50, p99) = p50_p99(latencies);
    drop(clients);
    println!(
        "2,000 idle mesh mTLS keep-alive connections: {per_conn} bytes per connection; 100 other mTLS requests (new connection each) meanwhile: p50 {p50:?}, p99 {p99:?}"
    );
    assert!(
        per_conn < 96 * 1024,
        "{per_conn} bytes per idle mesh connection (bound: 96 KiB)"
    );
}
