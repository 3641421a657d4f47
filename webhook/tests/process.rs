//! The `remora-webhook` binary as a real process on loopback: `/mutate` over TLS answers
//! AdmissionReviews, malformed ones get 400 with a reason, the serving certificate is
//! swapped on disk without a restart, `/metrics` counts the decisions, SIGTERM exits 0; and
//! `remora-webhook inject` rewrites a stream on stdout and fails cleanly on bad input.

use std::io::Write as _;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
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

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Writes a new self-signed pair for localhost/127.0.0.1; returns the certificate PEM.
fn write_pair(dir: &Path) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    let cert = params.self_signed(&key).expect("cert");
    // Write to temporary names and rename, as a Secret volume update does.
    let (c, k) = (dir.join(".tls.crt.new"), dir.join(".tls.key.new"));
    std::fs::write(&k, key.serialize_pem()).expect("write key");
    std::fs::write(&c, cert.pem()).expect("write cert");
    std::fs::rename(&k, dir.join("tls.key")).expect("rename key");
    std::fs::rename(&c, dir.join("tls.crt")).expect("rename cert");
    cert.pem()
}

fn client_config(cert_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// One HTTP/1.1 request over TLS; returns (status, body).
async fn https(
    port: u16,
    trust: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let connector = tokio_rustls::TlsConnector::from(client_config(trust));
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await?;
    Ok(split_response(&out))
}

async fn http(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await?;
    Ok(split_response(&out))
}

fn split_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn review(object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3a1c6c1e-1d4b-4a8e-9d1f-0c7e2b6f8a90",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": object,
        }
    }))
    .expect("json")
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"containers": [{"name": "web", "image": "nginx",
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}]}
    })
}

#[tokio::test]
async fn serves_reviews_over_tls_and_reloads_the_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first_cert = write_pair(dir.path());
    let (port, metrics_port) = (free_port(), free_port());
    let mut webhook = Running(
        Command::new(BIN)
            .args([
                &format!("--listen=127.0.0.1:{port}"),
                &format!("--metrics-listen=127.0.0.1:{metrics_port}"),
                &format!("--tls-cert={}", dir.path().join("tls.crt").display()),
                &format!("--tls-key={}", dir.path().join("tls.key").display()),
                "--tls-reload-interval=200ms",
                "--native-sidecar=false",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("start remora-webhook"),
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, _)) = http(metrics_port, "/readyz").await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "remora-webhook did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A pod is injected (classic mode, as forced by the flag) with a patch that applies.
    let (status, body) = https(port, &first_cert, "POST", "/mutate", &review(pod()))
        .await
        .expect("mutate");
    assert_eq!(status, 200, "{body}");
    let resp: Value = serde_json::from_str(&body).expect("response JSON");
    assert_eq!(resp["kind"], "AdmissionReview");
    assert_eq!(
        resp["response"]["uid"],
        "3a1c6c1e-1d4b-4a8e-9d1f-0c7e2b6f8a90"
    );
    assert_eq!(resp["response"]["allowed"], true);
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(resp["response"]["patch"].as_str().expect("patch"))
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("RFC 6902");
    let mut patched = pod();
    json_patch::patch(&mut patched, &patch).expect("patch applies");
    assert_eq!(patched["spec"]["containers"][0]["name"], "remora-proxy");
    assert_eq!(
        patched["spec"]["containers"][1]["readinessProbe"]["httpGet"]["path"],
        "/app-health/web/readyz"
    );

    // Malformed input: 400 with a reason, and the server keeps serving.
    let (status, body) = https(port, &first_cert, "POST", "/mutate", b"{\"kind\": 42")
        .await
        .expect("mutate");
    assert_eq!(status, 400);
    assert!(body.contains("malformed AdmissionReview"), "{body}");
    let mut not_a_pod: Value =
        serde_json::from_slice(&review(json!({"kind": "Deployment"}))).expect("json");
    not_a_pod["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let (status, body) = https(
        port,
        &first_cert,
        "POST",
        "/mutate",
        &serde_json::to_vec(&not_a_pod).expect("json"),
    )
    .await
    .expect("mutate");
    assert_eq!(status, 200);
    let resp: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(resp["response"]["allowed"], false);
    assert!(
        resp["response"]["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("only mutates Pods, got Deployment apps/v1")),
        "{body}"
    );

    // A broken pair on disk is refused; the old certificate keeps serving.
    std::fs::write(dir.path().join("tls.key"), "garbage").expect("write");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, _) = https(port, &first_cert, "POST", "/mutate", &review(pod()))
        .await
        .expect("old cert serves");
    assert_eq!(status, 200);

    // A new valid pair is picked up without a restart.
    let second_cert = write_pair(dir.path());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, _)) = https(port, &second_cert, "POST", "/mutate", &review(pod())).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        https(port, &first_cert, "POST", "/mutate", &review(pod()))
            .await
            .is_err(),
        "the old certificate is no longer served"
    );

    let (status, metrics) = http(metrics_port, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    for line in [
        r#"remora_webhook_admissions_total{decision="error",reason="bad-review"} 2"#,
        r#"remora_webhook_cert_reloads_total{result="success"} 1"#,
        r#"remora_webhook_native_sidecar 0"#,
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert!(
        metrics.contains(r#"remora_webhook_cert_reloads_total{result="failure"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"remora_webhook_admissions_total{decision="injected",reason="classic-sidecar"}"#
        ),
        "{metrics}"
    );
    let (status, body) = http(metrics_port, "/healthz").await.expect("healthz");
    assert_eq!((status, body.as_str()), (200, "ok"));

    // SIGTERM: a clean exit with status 0.
    let kill = Command::new("kill")
        .args(["-TERM", &webhook.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = webhook.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "remora-webhook did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}

#[test]
fn refuses_to_start_without_a_usable_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args([
            "--listen=127.0.0.1:0",
            "--metrics-listen=127.0.0.1:0",
            &format!("--tls-cert={}", dir.path().join("missing.crt").display()),
            &format!("--tls-key={}", dir.path().join("missing.key").display()),
            "--native-sidecar=true",
        ])
        .output()
        .expect("run remora-webhook");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("loading the serving certificate") && stderr.contains("missing.crt"),
        "{stderr}"
    );
}

fn golden_input(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

#[test]
fn inject_command_reads_stdin_and_files() {
    let input = std::fs::read_to_string(golden_input("workloads.input.yaml")).expect("input");
    let mut child = Command::new(BIN)
        .args(["inject", "-f", "-", "--proxy-version=0.1.0"])
        .args([
            "--proxy-image=ghcr.io/remora-mesh/remora-proxy:0.1.0",
            "--init-image=ghcr.io/remora-mesh/remora-init:0.1.0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run inject");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let golden =
        std::fs::read_to_string(golden_input("workloads-classic.output.yaml")).expect("golden");
    // The golden file starts with the per-document report, which the command prints on stderr.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: String = stderr.lines().map(|l| format!("# {l}\n")).collect();
    assert_eq!(
        format!("{report}{}", String::from_utf8_lossy(&out.stdout)),
        golden
    );

    let out = Command::new(BIN)
        .args(["inject", "--native-sidecar", "-f"])
        .arg(golden_input("bad-native-sidecar.input.yaml"))
        .output()
        .expect("run inject");
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "nothing is printed when a document fails"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("config.remora.dev/native-sidecar"),
        "{stderr}"
    );
}
