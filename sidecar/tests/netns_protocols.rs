//! Every protocol and refusal of the proxy pair, in network namespaces (root; the
//! prerequisites of `tests/netns.rs`): a client pod and a server pod, each with the
//! interception rules `remora-init` installs and a `remora-proxy` process (UID 1337,
//! standalone YAML config, file certificates), and real peers on both sides:
//!
//! - HTTP/2 with prior knowledge, WebSocket (an `Upgrade: websocket` request switched to
//!   101, then bytes both ways), opaque TCP with a half-close, and foreign TLS (a server with
//!   its own CA, validated end to end by SNI: the proxies did not terminate it);
//! - an identity mismatch (the client pod expects another SPIFFE ID of the endpoint) and
//!   authorization denials (HTTP 403 by method and path, an opaque port's connection
//!   closed), each counted;
//! - certificate rotation of both pods under load (keep-alive and new HTTP connections,
//!   new opaque connections, each a fresh mTLS handshake) with zero failed requests.
//!
//! The peers are this test binary re-executed inside a namespace (`common::netns::reexec`,
//! as in `tests/netns_grpc.rs`): with `REMORA_NETNS_PROTO_PEER` set, a `#[test]` plays
//! the server (every port below, until its `Proc` guard kills it) or one client case,
//! which asserts on what it gets and exits non-zero on the first wrong answer.
//! Namespaces, veths and processes are removed by the guards of `common::netns`, also on
//! failure.

mod common;

use std::{
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    full, get, h1, h2, http_echo_on,
    netns::{
        FRONTEND, Pods, REVIEWS, SERVER_IP, check_prerequisites, metric, pods, reexec, wait_for,
    },
    pki::{Ca, IdentityPaths},
    tcp_echo_on,
};
use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Set in the re-executed peers: `server`, or the client case to run.
const PEER: &str = "REMORA_NETNS_PROTO_PEER";
/// The directory of the foreign TLS files, for the peers.
const DIR: &str = "REMORA_NETNS_PROTO_DIR";
/// How long the load of the rotation test runs, for the load peer.
const LOAD_MS: &str = "REMORA_NETNS_PROTO_LOAD_MS";

/// Server pod ports: HTTP echo (HTTP/1.1, HTTP/2, upgrades) on the first three, TCP echo
/// on the next two, a foreign TLS echo on the last.
const HTTP: u16 = 8080;
const HTTP_AUTHZ: u16 = 8081;
const HTTP_IMPOSTOR: u16 = 8082;
const TCP: u16 = 9000;
const TCP_DENIED: u16 = 9001;
const TLS: u16 = 8443;
/// The foreign TLS server's DNS name (its certificate's only SAN).
const TLS_HOST: &str = "shop.example";
const IMPOSTOR: &str = "spiffe://cluster.local/ns/shop/sa/impostor";
const ADMIN: &str = "spiffe://cluster.local/ns/shop/sa/admin";
const DONE: &str = "peer client: every check passed";

/// `true` when this process is a re-executed peer (which has then done its part).
fn peer() -> bool {
    let Ok(role) = std::env::var(PEER) else {
        return false;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        match role.as_str() {
            "server" => serve().await,
            "protocols" => {
                http2().await;
                websocket().await;
                opaque_tcp().await;
                foreign_tls().await;
            }
            "refusals" => refusals().await,
            "load" => load().await,
            other => panic!("{PEER}={other}: unknown role"),
        }
    });
    println!("{DONE}");
    true
}

fn dir() -> PathBuf {
    PathBuf::from(std::env::var(DIR).expect("REMORA_NETNS_PROTO_DIR"))
}

fn server_addr(port: u16) -> std::net::SocketAddr {
    format!("{SERVER_IP}:{port}").parse().expect("addr")
}

/// Both pods meshed (identities from one CA, which the rotation test issues replacements
/// from; the server pod Strict), the server peer running.
struct Setup {
    pods: Pods,
    ca: Ca,
    server_id: IdentityPaths,
    client_id: IdentityPaths,
}

fn setup(test: &str) -> Setup {
    check_prerequisites();
    let mut pods = pods();
    let (ca, server_id, client_id) = pods.identities_with_ca();
    // The foreign TLS server's own CA and certificate: nothing the mesh knows.
    let foreign = Ca::new("foreign CA");
    let (cert, key) = foreign.issue_dns(TLS_HOST);
    pods.write("foreign-ca.pem", &foreign.pem);
    pods.write("foreign.pem", &cert);
    pods.write("foreign-key.pem", &key);

    let args = peer_args(&pods, "server", test);
    pods.spawn_until(true, "peer-server", &args, "peer server: listening");
    let server_cfg = pods.write(
        "server.yaml",
        &format!(
            r#"version: 1
{}inbound:
  default: {{mtls: Strict}}
  ports:
    "{HTTP_AUTHZ}":
      authorization:
        default: Deny
        rules:
        - from: {{identities: ["{FRONTEND}"]}}
          to: {{methods: [GET], paths: ["/api/*"]}}
    "{TCP}": {{protocol: opaque}}
    "{TCP_DENIED}":
      protocol: opaque
      authorization:
        default: Deny
        rules:
        - from: {{identities: ["{ADMIN}"]}}
"#,
            server_id.yaml()
        ),
    );
    let service = |name: &str, port: u16, protocol: &str, identity: &str| {
        format!(
            "  - name: {name}.shop\n    addresses: [\"{SERVER_IP}:{port}\"]\n    protocol: {protocol}\n    endpoints:\n    - {{address: \"{SERVER_IP}:{port}\", identity: \"{identity}\", meshed: true}}\n"
        )
    };
    let client_cfg = pods.write(
        "client.yaml",
        &format!(
            "version: 1\n{}outbound:\n  services:\n{}{}{}{}{}{}",
            client_id.yaml(),
            service("echo", HTTP, "detect", REVIEWS),
            service("authz", HTTP_AUTHZ, "detect", REVIEWS),
            // The client pod expects another identity than the server pod's certificate.
            service("impostor", HTTP_IMPOSTOR, "detect", IMPOSTOR),
            service("tcp", TCP, "opaque", REVIEWS),
            service("denied", TCP_DENIED, "opaque", REVIEWS),
            service("tls", TLS, "detect", REVIEWS),
        ),
    );
    pods.proxy(true, &server_cfg);
    pods.proxy(false, &client_cfg);
    Setup {
        pods,
        ca,
        server_id,
        client_id,
    }
}

/// Which pod's proxy a metric is read from.
#[derive(Clone, Copy, Debug)]
enum Pod {
    Client,
    Server,
}
use Pod::{Client, Server};

/// What a counter must read (an absent one reads 0).
#[derive(Clone, Copy, Debug)]
enum Want {
    Exactly(u64),
    AtLeast(u64),
}
use Want::{AtLeast, Exactly};

impl Setup {
    fn expect_counts(&self, checks: &[(Pod, &str, Want)]) {
        for &(pod, line, want) in checks {
            let ns = match pod {
                Client => &self.pods.client,
                Server => &self.pods.server,
            };
            let got = metric(ns, line).unwrap_or(0);
            let ok = match want {
                Exactly(n) => got == n,
                AtLeast(n) => got >= n,
            };
            assert!(
                ok,
                "{pod:?} pod: {line} is {got}, want {want:?}\n{}",
                self.pods.proxy_logs()
            );
        }
    }
}

/// The line of a `remora_proxy_<name>_total{direction, outcome}` counter.
fn outcome(name: &str, direction: &str, outcome: &str) -> String {
    format!(r#"remora_proxy_{name}_total{{direction="{direction}",outcome="{outcome}"}}"#)
}

fn peer_args(pods: &Pods, role: &str, test: &str) -> Vec<String> {
    let mut args = reexec(PEER, role, test);
    // After `env`: the directory of the TLS files and the load's duration.
    args.insert(1, format!("{DIR}={}", pods.dir.path().display()));
    args.insert(1, format!("{LOAD_MS}=4000"));
    args
}

/// Runs the client peer `role` in the client pod (its traffic captured by the client
/// pod's proxy) and fails with everything it and the proxies logged unless it passed.
fn client(s: &Setup, role: &str, test: &str) -> String {
    let args = peer_args(&s.pods, role, test);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = s
        .pods
        .client
        .cmd(&args)
        .stdin(Stdio::null())
        .output()
        .expect("run the client peer");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains(DONE),
        "client peer {role} failed ({:?})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}\n--- peer-server ---\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        s.pods.log("peer-server"),
        s.pods.proxy_logs()
    );
    println!("{stdout}");
    stdout
}

const PROTOCOLS: &str = "http2_websocket_opaque_tcp_and_foreign_tls_cross_the_pair";

#[test]
fn http2_websocket_opaque_tcp_and_foreign_tls_cross_the_pair() {
    if peer() {
        return;
    }
    let s = setup(PROTOCOLS);
    client(&s, "protocols", PROTOCOLS);
    let from_frontend = |status: u16| {
        format!(
            r#"remora_proxy_requests_total{{direction="inbound",status="{status}",peer_identity="{FRONTEND}"}}"#
        )
    };
    s.expect_counts(&[
        // HTTP/2 and the WebSocket upgrade reached the app from the client's identity.
        (Server, &from_frontend(200), Exactly(1)),
        (Server, &from_frontend(101), Exactly(1)),
        (Client, &outcome("detect", "outbound", "http2"), Exactly(1)),
        // Opaque TCP skipped detection; the foreign ClientHello was recognised and not
        // terminated (the client validated the server's own certificate).
        (
            Client,
            &outcome("detect", "outbound", "skipped_opaque_port"),
            Exactly(1),
        ),
        (
            Client,
            &outcome("detect", "outbound", "foreign_tls"),
            Exactly(1),
        ),
        // Every connection crossed between the pods over mesh mTLS: none was refused.
        (
            Server,
            &outcome("tls_handshakes", "inbound", "ok"),
            AtLeast(3),
        ),
        (
            Server,
            &outcome("connections", "inbound", "plaintext_refused"),
            Exactly(0),
        ),
    ]);
}

const REFUSALS: &str = "identity_mismatch_and_authorization_denials_are_refused_and_counted";

#[test]
fn identity_mismatch_and_authorization_denials_are_refused_and_counted() {
    if peer() {
        return;
    }
    let s = setup(REFUSALS);
    client(&s, "refusals", REFUSALS);
    s.expect_counts(&[
        (
            Client,
            &outcome("tls_handshakes", "outbound", "identity_mismatch"),
            AtLeast(1),
        ),
        (
            Server,
            &outcome("tls_handshakes", "inbound", "rejected_by_peer"),
            AtLeast(1),
        ),
        // The impostor's request never reached the server pod's app: only the allowed GET.
        (
            Server,
            r#"remora_proxy_requests_total{direction="inbound",status="200""#,
            Exactly(1),
        ),
        // POST /api/items, GET /admin and the opaque connection.
        (Server, &outcome("authz", "inbound", "deny"), Exactly(3)),
        (Server, &outcome("authz", "inbound", "allow"), Exactly(1)),
    ]);
    let b = &s.pods.server;
    wait_for(
        "the denied opaque connection counted",
        || {
            metric(
                b,
                r#"remora_proxy_connections_total{direction="inbound",outcome="unauthorized"}"#,
            ) == Some(1)
        },
        || s.pods.proxy_logs(),
    );
}

const ROTATION: &str = "certificate_rotation_of_both_pods_under_load_fails_no_request";
const EXPIRY: &str = "remora_proxy_cert_expiry_timestamp_seconds ";
const APPLIED: &str = r#"remora_proxy_identity_reloads_total{reason="applied"}"#;
const OUT_OK: &str = r#"remora_proxy_tls_handshakes_total{direction="outbound",outcome="ok"}"#;
const IN_OK: &str = r#"remora_proxy_tls_handshakes_total{direction="inbound",outcome="ok"}"#;
/// 2098-06-01T00:00:00Z, the rotated certificates' end (the first ones end in 2099).
const ROTATED_UNTIL: (i32, u8, u8) = (2098, 6, 1);
const ROTATED_EXPIRY: u64 = 4_052_419_200;

#[test]
fn certificate_rotation_of_both_pods_under_load_fails_no_request() {
    if peer() {
        return;
    }
    let mut s = setup(ROTATION);
    let (a, b) = (&s.pods.client, &s.pods.server);
    let before = (metric(a, EXPIRY), metric(b, EXPIRY));
    assert!(
        before.0.is_some_and(|e| e > ROTATED_EXPIRY) && before.1 == before.0,
        "{before:?}"
    );
    let args = peer_args(&s.pods, "load", ROTATION);
    let load = s
        .pods
        .spawn_until(false, "peer-load", &args, "load: running");
    std::thread::sleep(Duration::from_millis(800));
    // New files from the same CA, both pods, mid-load (the proxies poll every 100 ms).
    for id in [&s.server_id, &s.client_id] {
        let (cert, key) = s.ca.issue_until(&id.spiffe_id, ROTATED_UNTIL);
        id.replace(&cert, &key);
    }
    let (a, b) = (&s.pods.client, &s.pods.server);
    wait_for(
        "both pods loaded their new certificates",
        || metric(a, APPLIED) == Some(2) && metric(b, APPLIED) == Some(2),
        || s.pods.proxy_logs(),
    );
    let rotated = Instant::now();
    let mid = (
        metric(a, OUT_OK).unwrap_or(0),
        metric(b, IN_OK).unwrap_or(0),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = s.pods.procs[load].child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the load did not end");
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = s.pods.log("peer-load");
    println!("{log}");
    assert!(
        status.success() && log.contains(DONE),
        "a request failed during the rotation ({status:?})\n--- peer-load ---\n{log}\n{}",
        s.pods.proxy_logs()
    );
    assert!(
        rotated.elapsed() > Duration::from_millis(500),
        "the load went on after the rotation\n{log}"
    );
    // The new certificates are in force on both sides and new mTLS handshakes (new opaque
    // connections) happened after both were loaded.
    assert_eq!(
        (metric(a, EXPIRY), metric(b, EXPIRY)),
        (Some(ROTATED_EXPIRY), Some(ROTATED_EXPIRY)),
        "{}",
        s.pods.proxy_logs()
    );
    let after = (
        metric(a, OUT_OK).unwrap_or(0),
        metric(b, IN_OK).unwrap_or(0),
    );
    assert!(
        after.0 > mid.0 && after.1 > mid.1,
        "handshakes after the rotation: {mid:?} → {after:?}\n{log}"
    );
    for (ns, name) in [(a, "client"), (b, "server")] {
        assert_eq!(
            metric(
                ns,
                r#"remora_proxy_identity_reloads_total{reason="bad_certificate"}"#
            ),
            None,
            "{name} pod never saw a half-written certificate"
        );
    }
    // Every load request was answered 200 (checked by the peer) and the server pod
    // counted them from the client's identity, before and after the rotation.
    let served = metric(
        b,
        &format!(
            r#"remora_proxy_requests_total{{direction="inbound",status="200",peer_identity="{FRONTEND}"}}"#
        ),
    )
    .unwrap_or(0);
    assert!(served >= 20, "{served} requests\n{log}");
}

// ---- The peers -------------------------------------------------------------------------

/// The server peer (server pod): HTTP echo, TCP echo and a foreign TLS echo on every port
/// of the test, plain as an app in a meshed pod serves them; runs until killed.
async fn serve() {
    for port in [HTTP, HTTP_AUTHZ, HTTP_IMPOSTOR] {
        http_echo_on(([0, 0, 0, 0], port).into()).await;
    }
    for port in [TCP, TCP_DENIED] {
        tcp_echo_on(([0, 0, 0, 0], port).into()).await;
    }
    let dir = dir();
    let cert = std::fs::read(dir.join("foreign.pem")).expect("foreign cert");
    let key = std::fs::read(dir.join("foreign-key.pem")).expect("foreign key");
    let config = rustls::ServerConfig::builder_with_provider(remora_proxy::identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(&cert).expect("cert")],
            PrivateKeyDer::from_pem_slice(&key).expect("key"),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(("0.0.0.0", TLS)).await.expect("bind TLS");
    println!("peer server: listening");
    loop {
        let (stream, _) = listener.accept().await.expect("accept");
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(stream).await else {
                return;
            };
            // Says which name the client asked for, then echoes until the client's
            // close_notify.
            let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
            let _ = tls.write_all(format!("sni={sni};").as_bytes()).await;
            let _ = echo_until_eof(&mut tls).await;
            let _ = tls.shutdown().await;
        });
    }
}

async fn echo_until_eof(io: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = io.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        io.write_all(&buf[..n]).await?;
    }
}

/// `n` bytes of a binary pattern (every byte value, NULs included).
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"))
}

/// HTTP/2 with prior knowledge: the app answers over HTTP/2 (the echo reports the version
/// it got), `:authority` and the body come through.
async fn http2() {
    let mut c = h2(server_addr(HTTP)).await;
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://reviews.shop:{HTTP}/h2"))
        .body(full(pattern(100_000, 1)))
        .expect("request");
    let resp = within("HTTP/2 request", c.send_request(req))
        .await
        .expect("HTTP/2 response");
    assert_eq!(resp.status(), StatusCode::OK, "{resp:?}");
    assert_eq!(resp.version(), Version::HTTP_2);
    let h = resp.headers();
    assert_eq!(h.get("echo-version").expect("version"), "HTTP/2.0", "{h:?}");
    assert_eq!(h.get("echo-path").expect("path"), "/h2");
    assert_eq!(
        h.get("echo-authority").expect(":authority"),
        &format!("reviews.shop:{HTTP}")
    );
    assert!(h.get("echo-remora-orig-proto").is_none(), "{h:?}");
    let body = within("HTTP/2 body", resp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, Bytes::from(pattern(100_000, 1)));
    println!("peer client: HTTP/2 ok");
}

/// Reads until the end of an HTTP/1 head; returns the head and what followed it.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = got.split_off(end + 4);
            return (String::from_utf8_lossy(&got).into_owned(), rest);
        }
        let n = within("response head", s.read(&mut buf))
            .await
            .expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

/// WebSocket: the upgrade is answered 101 by the app, then bytes go both ways over the
/// upgraded connection, several times and in sizes beyond one read.
async fn websocket() {
    let mut s = TcpStream::connect(server_addr(HTTP))
        .await
        .expect("connect");
    s.write_all(
        format!(
            "GET /chat HTTP/1.1\r\nHost: reviews.shop:{HTTP}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    // The app answered (its echo server names itself), not a proxy.
    assert!(
        lower.contains(&format!("echo-server: 0.0.0.0:{HTTP}")),
        "{head}"
    );
    assert!(rest.is_empty(), "nothing before the first frame: {rest:?}");
    for (i, size) in [5usize, 70_000, 1].into_iter().enumerate() {
        let msg = pattern(size, i as u8);
        s.write_all(&msg).await.expect("write");
        let mut back = vec![0u8; size];
        within("upgraded echo", s.read_exact(&mut back))
            .await
            .expect("read the echo");
        assert_eq!(back, msg, "message {i} came back intact");
    }
    s.shutdown().await.expect("half-close");
    let mut tail = Vec::new();
    within("upgraded close", s.read_to_end(&mut tail))
        .await
        .expect("read to the end");
    assert!(tail.is_empty(), "{tail:?}");
    println!("peer client: WebSocket ok");
}

/// Opaque TCP, client first, binary: everything is sent, the write side shut down, and the
/// whole echo still read back before the server's close.
async fn opaque_tcp() {
    let out = tcp_round_trip(TCP, &pattern(300_000, 7)).await;
    assert_eq!(out.len(), 300_000, "the whole answer after the half-close");
    assert!(out == pattern(300_000, 7), "the echo is byte for byte");
    println!("peer client: opaque TCP with half-close ok");
}

/// Sends `msg`, half-closes, reads until the peer closes.
async fn tcp_round_trip(port: u16, msg: &[u8]) -> Vec<u8> {
    let (sent, read) = tcp_exchange(port, msg).await;
    sent.expect("send and half-close");
    read.expect("read to the end")
}

/// [`tcp_round_trip`], with the results of both directions (a refused peer may reset).
async fn tcp_exchange(port: u16, msg: &[u8]) -> (std::io::Result<()>, std::io::Result<Vec<u8>>) {
    let mut s = TcpStream::connect(server_addr(port))
        .await
        .expect("connect");
    let (mut r, mut w) = s.split();
    let mut out = Vec::new();
    let (sent, read) = within("TCP exchange", async {
        tokio::join!(
            async {
                w.write_all(msg).await?;
                w.shutdown().await
            },
            r.read_to_end(&mut out)
        )
    })
    .await;
    (sent, read.map(|_| out))
}

/// Foreign TLS: the client validates the server's certificate against the server's own CA
/// and name; the certificate it gets is exactly the server's, the SNI reached the server.
async fn foreign_tls() {
    let dir = dir();
    let ca = std::fs::read(dir.join("foreign-ca.pem")).expect("foreign CA");
    let cert = std::fs::read(dir.join("foreign.pem")).expect("foreign cert");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&ca).expect("CA"))
        .expect("root");
    let config = rustls::ClientConfig::builder_with_provider(remora_proxy::identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(server_addr(TLS)).await.expect("connect");
    let name = ServerName::try_from(TLS_HOST).expect("name");
    let mut tls = within("foreign TLS handshake", connector.connect(name, tcp))
        .await
        .expect("the server's own certificate validates end to end");
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a peer certificate")
        .clone();
    assert!(
        presented == CertificateDer::from_pem_slice(&cert).expect("cert"),
        "the server's own certificate, not a proxy's"
    );
    let greeting = format!("sni={TLS_HOST};");
    let msg = pattern(50_000, 3);
    tls.write_all(&msg).await.expect("write");
    tls.shutdown().await.expect("close_notify");
    let mut out = Vec::new();
    within("foreign TLS echo", tls.read_to_end(&mut out))
        .await
        .expect("read");
    assert!(
        out.starts_with(greeting.as_bytes()),
        "{}",
        String::from_utf8_lossy(&out[..out.len().min(64)])
    );
    assert!(
        out[greeting.len()..] == msg[..],
        "the echo over foreign TLS"
    );
    println!("peer client: foreign TLS passed through ok");
}

/// One request on a keep-alive HTTP/1.1 connection, once it is ready for one (the previous
/// response's end is seen by the connection task a moment after its body is read).
async fn send(
    c: &mut hyper::client::conn::http1::SendRequest<common::Body>,
    req: Request<common::Body>,
) -> http::Response<hyper::body::Incoming> {
    within("connection ready", c.ready())
        .await
        .expect("the connection takes another request");
    within("request", c.send_request(req))
        .await
        .expect("a response")
}

fn proxy_error(resp: &http::Response<hyper::body::Incoming>) -> String {
    resp.headers()
        .get("x-remora-proxy-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("x-remora-proxy-error on {resp:?}"))
        .to_owned()
}

/// The refusals: the impostor endpoint, the authorization denials.
async fn refusals() {
    // The client pod expects IMPOSTOR of the server pod, which presents REVIEWS.
    let mut c = h1(server_addr(HTTP_IMPOSTOR)).await;
    let resp = send(&mut c, get("/")).await;
    assert!(
        matches!(
            resp.status(),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
        ),
        "{resp:?}"
    );
    println!(
        "peer client: identity mismatch refused: {}",
        proxy_error(&resp)
    );

    // Only GET /api/* from FRONTEND.
    let mut c = h1(server_addr(HTTP_AUTHZ)).await;
    let resp = send(&mut c, get("/api/items")).await;
    assert_eq!(resp.status(), StatusCode::OK, "{resp:?}");
    assert_eq!(resp.headers().get("echo-path").expect("path"), "/api/items");
    let _ = resp.into_body().collect().await;
    let post = Request::builder()
        .method("POST")
        .uri("/api/items")
        .header("host", "authz.shop")
        .body(full("x"))
        .expect("request");
    let resp = send(&mut c, post).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{resp:?}");
    let reason = proxy_error(&resp);
    assert!(reason.contains(FRONTEND), "{reason}");
    let _ = resp.into_body().collect().await;
    let resp = send(&mut c, get("/admin")).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{resp:?}");
    let reason = proxy_error(&resp);
    assert!(
        reason.contains(FRONTEND) && reason.contains("/admin"),
        "{reason}"
    );
    println!("peer client: authorization denied: {reason}");

    // An opaque port that allows only ADMIN: the connection is closed, nothing echoed.
    // (The write may fail with a reset once the connection is closed; nothing comes back.)
    let (_, read) = tcp_exchange(TCP_DENIED, b"let me in").await;
    assert!(
        read.as_ref().is_ok_and(Vec::is_empty) || read.is_err(),
        "denied: {read:?}"
    );
    println!("peer client: denied opaque connection closed");
}

/// The load of the rotation test, for `REMORA_NETNS_PROTO_LOAD_MS`: two HTTP/1.1 loops
/// (keep-alive, a new connection every 10 requests), an HTTP/2 loop and an opaque TCP loop
/// (a new connection, so a new mTLS handshake, each time). Any failure panics.
async fn load() {
    let ms: u64 = std::env::var(LOAD_MS)
        .expect("REMORA_NETNS_PROTO_LOAD_MS")
        .parse()
        .expect("milliseconds");
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    println!("load: running");
    let http1 = |seed: u8| {
        tokio::spawn(async move {
            let mut n = 0u32;
            let mut c = h1(server_addr(HTTP)).await;
            while tokio::time::Instant::now() < deadline {
                if n.is_multiple_of(10) {
                    c = h1(server_addr(HTTP)).await;
                }
                let path = format!("/load/{seed}/{n}");
                let resp = send(&mut c, get(&path)).await;
                assert_eq!(resp.status(), StatusCode::OK, "{path}: {resp:?}");
                assert_eq!(resp.headers().get("echo-path").expect("path"), &path);
                let _ = resp.into_body().collect().await.expect("body");
                n += 1;
            }
            n
        })
    };
    let http2 = tokio::spawn(async move {
        let mut n = 0u32;
        let mut c = h2(server_addr(HTTP)).await;
        while tokio::time::Instant::now() < deadline {
            let req = Request::builder()
                .uri(format!("http://reviews.shop:{HTTP}/load/h2/{n}"))
                .body(full(Bytes::new()))
                .expect("request");
            within("HTTP/2 connection ready", c.ready())
                .await
                .expect("the connection takes another stream");
            let resp = within("HTTP/2 request", c.send_request(req))
                .await
                .expect("HTTP/2 response");
            assert_eq!(resp.status(), StatusCode::OK, "{resp:?}");
            let _ = resp.into_body().collect().await.expect("body");
            n += 1;
        }
        n
    });
    let tcp = tokio::spawn(async move {
        let mut n = 0u32;
        while tokio::time::Instant::now() < deadline {
            let msg = pattern(4096, n as u8);
            assert!(tcp_round_trip(TCP, &msg).await == msg, "TCP echo {n}");
            n += 1;
        }
        n
    });
    let (a, b) = (http1(1), http1(2));
    let counts = (
        a.await.expect("HTTP/1.1 loop"),
        b.await.expect("HTTP/1.1 loop"),
        http2.await.expect("HTTP/2 loop"),
        tcp.await.expect("TCP loop"),
    );
    println!(
        "load: HTTP/1.1 {} + {}, HTTP/2 {}, opaque TCP {}: all answered",
        counts.0, counts.1, counts.2, counts.3
    );
    assert!(counts.0 > 0 && counts.1 > 0 && counts.2 > 0 && counts.3 > 0);
}
