//! The `remora-webhook` binary under a flood of malformed AdmissionReviews keeps answering
//! good ones: while flooders send broken JSON, JSON nested 100,000 deep, bodies over the
//! 8 MiB limit, reviews of the wrong kind, request heads that never finish their body and
//! TCP connections that never start TLS, a well-behaved client sends a real review every
//! 20 ms on its own connection and every one is injected. Its p50/p99 during the flood are
//! printed next to the same client's without the flood (the figures, not a timed assertion).

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_remora-webhook");

/// Kills the webhook when the test ends, pass or fail.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ignored = self.0.kill();
        let _ignored = self.0.wait();
    }
}

type Tls = BufReader<tokio_rustls::client::TlsStream<TcpStream>>;

async fn connect(port: u16, config: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(BufReader::new(tls))
}

/// One keep-alive POST /mutate; the status and the body.
async fn post(conn: &mut Tls, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    post_declaring(conn, body.len(), body).await
}

/// [`post`] with a `content-length` of `declared` (an oversized one is refused from the
/// head alone, before its body is sent).
async fn post_declaring(
    conn: &mut Tls,
    declared: usize,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut req = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(body);
    conn.get_mut().write_all(&req).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(conn.read_u8().await?);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let bad = || std::io::Error::other(format!("bad response head {text:?}"));
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(bad)?;
    let mut body = vec![0; len];
    conn.read_exact(&mut body).await?;
    Ok((status, body))
}

fn review() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "3a1c6c1e-1d4b-4a8e-9d1f-0c7e2b6f8a90",
                    "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "namespace": "shop", "operation": "CREATE",
                    "object": {"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": "web", "namespace": "shop"},
                               "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}
    }))
    .expect("json")
}

/// The malformed requests of the flood: what, the declared length, the body, the status
/// it must get.
fn malformed() -> Vec<(&'static str, usize, Vec<u8>, u16)> {
    let mut wrong_kind: serde_json::Value = serde_json::from_slice(&review()).expect("json");
    wrong_kind["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let as_is = |what, body: Vec<u8>, status| (what, body.len(), body, status);
    vec![
        as_is("broken JSON", b"{\"kind\": 42".to_vec(), 400),
        as_is(
            "JSON nested 100,000 deep",
            "[".repeat(100_000).into_bytes(),
            400,
        ),
        ("a body over 8 MiB", 8 * 1024 * 1024 + 1, Vec::new(), 413),
        as_is(
            "a review of a Deployment",
            serde_json::to_vec(&wrong_kind).expect("json"),
            200,
        ),
        as_is(
            "not a review",
            b"{\"apiVersion\": \"v1\", \"kind\": \"Pod\"}".to_vec(),
            400,
        ),
    ]
}

/// `n` good reviews, one every 20 ms on one connection; their latencies, sorted.
async fn good_client(port: u16, config: Arc<rustls::ClientConfig>, n: usize) -> Vec<Duration> {
    let mut conn = connect(port, config).await.expect("good client connects");
    let body = review();
    let mut out = Vec::with_capacity(n);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for i in 0..n {
        tick.tick().await;
        let t = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), post(&mut conn, &body)).await;
        let (status, resp) = answer
            .unwrap_or_else(|_| panic!("good review {i}: no answer within 10 s"))
            .expect("good review answered");
        out.push(t.elapsed());
        let resp = String::from_utf8_lossy(&resp);
        assert_eq!(status, 200, "good review {i}: {resp}");
        assert!(
            resp.contains("\"patchType\":\"JSONPatch\""),
            "good review {i} injected: {resp}"
        );
    }
    out.sort();
    out
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_reviews_are_answered_during_a_flood_of_malformed_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.path().join("tls.crt"), cert.pem()).expect("cert");
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).expect("key");
    let port = {
        let l = StdListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let _webhook = Running(
        Command::new(BIN)
            .args([
                &format!("--listen=127.0.0.1:{port}"),
                "--metrics-listen=127.0.0.1:0",
                &format!("--tls-cert={}", dir.path().join("tls.crt").display()),
                &format!("--tls-key={}", dir.path().join("tls.key").display()),
                "--native-sidecar=false",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start remora-webhook"),
    );
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(cert.pem().as_bytes()).expect("pem"))
        .expect("root");
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while connect(port, config.clone()).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "remora-webhook did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let quiet = good_client(port, config.clone(), 100).await;

    // The flood: every malformed kind from 4 connections each, as fast as answered.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut flooders = Vec::new();
    for (what, declared, body, want) in malformed() {
        let body = Arc::new(body);
        for _ in 0..4 {
            let (config, stop, answered, body) =
                (config.clone(), stop.clone(), answered.clone(), body.clone());
            flooders.push(tokio::spawn(async move {
                while !stop.load(Relaxed) {
                    let Ok(mut conn) = connect(port, config.clone()).await else {
                        continue;
                    };
                    // Answered on the same connection until the server closes it (413).
                    while !stop.load(Relaxed) {
                        let sent = post_declaring(&mut conn, declared, &body);
                        let (status, resp) =
                            match tokio::time::timeout(Duration::from_secs(10), sent).await {
                                Err(_) => panic!("{what}: no answer within 10 s"),
                                Ok(Err(_)) => break,
                                Ok(Ok(answer)) => answer,
                            };
                        assert_eq!(status, want, "{what}: {}", String::from_utf8_lossy(&resp));
                        answered.fetch_add(1, Relaxed);
                    }
                }
            }));
        }
    }
    // Heads whose body never comes, and connections that never start TLS.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut conn = connect(port, config.clone()).await.expect("connect");
        conn.get_mut()
            .write_all(b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1000\r\n\r\n{")
            .await
            .expect("head");
        stalled.push(conn);
    }
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = answered.load(Relaxed);
    let flooded = good_client(port, config.clone(), 250).await;
    let during = answered.load(Relaxed) - before;
    stop.store(true, Relaxed);
    for f in flooders {
        f.await.expect("a flooder's answers were as expected");
    }
    assert!(
        during > 0,
        "the flood was answered while the good client ran"
    );
    println!(
        "webhook: good reviews without a flood p50 {:?} p99 {:?}; during a flood of malformed reviews (20 connections, {during} answered in 5 s, plus 50 stalled bodies and 100 silent connections) p50 {:?} p99 {:?} (target p99 5 ms, release build)",
        pct(&quiet, 50),
        pct(&quiet, 99),
        pct(&flooded, 50),
        pct(&flooded, 99)
    );
    drop((stalled, silent));
}
