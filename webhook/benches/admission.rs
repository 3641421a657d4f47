//! Admission latency and memory of `remora-webhook` (issue targets: p99 ≤ 5 ms at 200
//! reviews/s, RSS ≤ 30 MB). Starts the release binary on loopback with a self-signed
//! certificate, drives `/mutate` over TLS with an open-loop schedule (latency is measured
//! from dispatch, including any wait for a free connection, so a stall is not hidden by
//! coordinated omission), reads
//! the process's RSS from /proc, and prints a table next to the in-process cost of the
//! same review (no I/O) as a baseline.
//!
//! `cargo bench -p remora-webhook --bench admission` (`BENCH_SECONDS`, `BENCH_RATE`,
//! `BENCH_CONNECTIONS` override the defaults of 10 s, 200/s and 4 connections).

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use remora_webhook::admission;
use remora_webhook::inject::InjectConfig;
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

const BIN: &str = env!("CARGO_BIN_EXE_remora-webhook");

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ignored = self.0.kill();
        let _ignored = self.0.wait();
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-7d9f8c-", "namespace": "shop",
                     "labels": {"app": "web", "pod-template-hash": "7d9f8c"},
                     "annotations": {"config.remora.dev/skip-outbound-ports": "5432"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8c",
                                          "uid": "6c1e3a1c-1d4b-4a8e-9d1f-0c7e2b6f8a90", "controller": true}]},
        "spec": {
            "serviceAccountName": "web",
            "containers": [
                {"name": "web", "image": "nginx:1.27", "ports": [{"name": "http", "containerPort": 8080}],
                 "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
                 "readinessProbe": {"tcpSocket": {"port": 8080}}},
                {"name": "exporter", "image": "prom/nginx-exporter:1.3", "ports": [{"containerPort": 9113}]}
            ],
            "volumes": [{"name": "config", "configMap": {"name": "web"}}]
        }
    })
}

fn review_body() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "3a1c6c1e-1d4b-4a8e-9d1f-0c7e2b6f8a90",
                    "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "namespace": "shop", "operation": "CREATE", "object": pod()}
    }))
    .expect("json")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(port: u16, config: Arc<rustls::ClientConfig>) -> BufReader<Tls> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    BufReader::new(tls)
}

/// One keep-alive HTTP/1.1 POST; returns the status code.
async fn post(conn: &mut BufReader<Tls>, body: &[u8]) -> u16 {
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    conn.get_mut().write_all(&req).await.expect("write");
    let mut headers = Vec::new();
    while !headers.ends_with(b"\r\n\r\n") {
        headers.push(conn.read_u8().await.expect("read headers"));
    }
    let text = String::from_utf8_lossy(&headers).to_ascii_lowercase();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let mut body = vec![0; len];
    conn.read_exact(&mut body).await.expect("read body");
    status
}

fn in_process(iterations: usize) -> Vec<Duration> {
    let cfg = InjectConfig::default();
    let body = review_body();
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        let r = admission::review(&body, &cfg);
        samples.push(start.elapsed());
        assert_eq!(r.decision.label(), "injected");
    }
    samples.sort();
    samples
}

#[tokio::main]
async fn main() {
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let rate: u64 = env_or("BENCH_RATE", 200);
    let connections: usize = env_or("BENCH_CONNECTIONS", 4);

    let baseline = in_process(5000);

    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.path().join("tls.crt"), cert.pem()).expect("write");
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).expect("write");
    let (port, metrics_port) = (free_port(), free_port());
    let child = Command::new(BIN)
        .args([
            &format!("--listen=127.0.0.1:{port}"),
            &format!("--metrics-listen=127.0.0.1:{metrics_port}"),
            &format!("--tls-cert={}", dir.path().join("tls.crt").display()),
            &format!("--tls-key={}", dir.path().join("tls.key").display()),
            "--native-sidecar=true",
            "--events=false",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start remora-webhook");
    let pid = child.id();
    let _webhook = Running(child);

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
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "remora-webhook did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_idle = rss_kib(pid, "VmRSS:");

    let body = Arc::new(review_body());
    let (tx, rx) = mpsc::channel::<Instant>(1024);
    let rx = Arc::new(Mutex::new(rx));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Duration, u16)>();
    for _ in 0..connections {
        let mut conn = connect(port, Arc::clone(&config)).await;
        let (rx, done_tx, body) = (Arc::clone(&rx), done_tx.clone(), Arc::clone(&body));
        tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(scheduled) = next else { return };
                let status = post(&mut conn, &body).await;
                let _closed = done_tx.send((scheduled.elapsed(), status));
            }
        });
    }
    drop(done_tx);

    // Warm-up, then the measured open-loop run.
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let total = (seconds * rate) as usize;
    let warmup = (rate as usize).min(total / 5);
    let start = Instant::now();
    for i in 0..total + warmup {
        let at = start + interval * i as u32;
        tokio::time::sleep_until(at.into()).await;
        // Latency counts from dispatch (waiting for a free connection included), not from
        // `at`: tokio's timer wheel has 1 ms granularity, which is the load generator's
        // lateness, not the webhook's.
        tx.send(Instant::now()).await.expect("workers alive");
    }
    drop(tx);
    let mut samples = Vec::with_capacity(total);
    let mut errors = 0;
    let mut i = 0;
    while let Some((latency, status)) = done_rx.recv().await {
        i += 1;
        if status != 200 {
            errors += 1;
        }
        if i > warmup {
            samples.push(latency);
        }
    }
    let elapsed = start.elapsed();
    samples.sort();
    let rss = rss_kib(pid, "VmRSS:");
    let hwm = rss_kib(pid, "VmHWM:");

    let p99 = percentile(&samples, 99.0);
    let base_p99 = percentile(&baseline, 99.0);
    println!();
    println!(
        "remora-webhook admission benchmark ({} reviews at {rate}/s over {connections} TLS keep-alive connections, {:.1} s, {errors} non-200)",
        samples.len(),
        elapsed.as_secs_f64()
    );
    println!();
    println!(
        "| measurement                         | p50        | p90        | p99        | max        | target      |"
    );
    println!(
        "|-------------------------------------|------------|------------|------------|------------|-------------|"
    );
    println!(
        "| in-process review (builder, no I/O) | {:>10} | {:>10} | {:>10} | {:>10} |             |",
        ms(percentile(&baseline, 50.0)),
        ms(percentile(&baseline, 90.0)),
        ms(base_p99),
        ms(percentile(&baseline, 100.0))
    );
    println!(
        "| HTTPS /mutate, open loop            | {:>10} | {:>10} | {:>10} | {:>10} | p99 ≤ 5 ms  |",
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 90.0)),
        ms(p99),
        ms(percentile(&samples, 100.0))
    );
    println!();
    println!(
        "| memory (remora-webhook process)     | idle       | after run  | peak (HWM) | target      |"
    );
    println!(
        "|-------------------------------------|------------|------------|------------|-------------|"
    );
    println!(
        "| RSS                                 | {:>7.1} MB | {:>7.1} MB | {:>7.1} MB | ≤ 30 MB     |",
        rss_idle as f64 / 1024.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!();
    println!(
        "p99 over HTTPS is {:.1}x the in-process p99; target p99 {} ({}), RSS peak {:.1} MB ({})",
        p99.as_secs_f64() / base_p99.as_secs_f64().max(1e-9),
        ms(p99),
        if p99 <= Duration::from_millis(5) {
            "met"
        } else {
            "MISSED"
        },
        hwm as f64 / 1024.0,
        if hwm <= 30 * 1024 { "met" } else { "MISSED" },
    );
}
