//! Mesh mTLS between two in-process proxies on loopback: client → proxy A (outbound) →
//! mTLS → proxy B (inbound) → server. Certificates come from a test CA (rcgen) and are
//! loaded from files, as in standalone mode.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::{pki::*, *};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use remora_proxy::Proxy;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const REVIEWS: &str = "spiffe://cluster.local/ns/shop/sa/reviews";
const VIP: &str = "10.96.0.12:9080";

struct Mesh {
    _dir: TempDir,
    ca: Ca,
    a: Proxy,
    b: Proxy,
    b_ids: IdentityPaths,
}

struct MeshSpec<'a> {
    /// The app behind proxy B.
    backend: SocketAddr,
    /// `protocol:` of the outbound service.
    protocol: &'a str,
    /// Extra YAML for proxy B (its inbound policy).
    b_extra: &'a str,
    /// The identity proxy A expects of B.
    expect: &'a str,
    /// B's certificate comes from a CA that A does not trust.
    b_untrusted: bool,
    /// Proxy A runs with `--mesh-protocol http1`; otherwise with `h2` (not the default),
    /// so that most tests here cover HTTP/1 riding HTTP/2 between the proxies.
    a_mesh_http1: bool,
    /// Proxy B's `--header-read-timeout`, when not the default.
    b_header_read_timeout: Option<Duration>,
}

impl Default for MeshSpec<'_> {
    fn default() -> Self {
        Self {
            backend: "127.0.0.1:1".parse().expect("addr"),
            protocol: "detect",
            b_extra: "",
            expect: REVIEWS,
            b_untrusted: false,
            a_mesh_http1: false,
            b_header_read_timeout: None,
        }
    }
}

fn fast(mut s: remora_proxy::Settings) -> remora_proxy::Settings {
    s.config_poll_interval = Duration::from_millis(20);
    s
}

async fn mesh(spec: MeshSpec<'_>) -> Mesh {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("remora test CA");
    let rogue = Ca::new("rogue CA");
    let b_issuer = if spec.b_untrusted { &rogue } else { &ca };
    let b_ids = IdentityPaths::write(dir.path(), "reviews", REVIEWS, b_issuer, &ca);
    let a_ids = IdentityPaths::write(dir.path(), "frontend", FRONTEND, &ca, &ca);
    let mut b_settings = fast(settings(spec.backend));
    if let Some(t) = spec.b_header_read_timeout {
        b_settings.header_read_timeout = t;
    }
    let b = start(
        b_settings,
        &format!("version: 1\n{}{}", b_ids.yaml(), spec.b_extra),
    )
    .await;
    let b_in = b.inbound_addrs[0];
    let a_yaml = format!(
        "version: 1\n{}outbound:\n  services:\n  - name: reviews.shop\n    addresses: [\"{VIP}\"]\n    protocol: {}\n    endpoints:\n    - {{address: \"{b_in}\", identity: \"{}\", meshed: true}}\n",
        a_ids.yaml(),
        spec.protocol,
        spec.expect
    );
    let mut a_settings = fast(settings(VIP.parse().expect("vip")));
    a_settings.mesh_http2 = !spec.a_mesh_http1;
    let a = start(a_settings, &a_yaml).await;
    Mesh {
        _dir: dir,
        ca,
        a,
        b,
        b_ids,
    }
}

fn metric(p: &Proxy, line_prefix: &str) -> Option<u64> {
    let text = p.context().metrics.encode();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn http1_and_http2_ride_mtls_with_peer_identities() {
    let backend = http_echo().await;
    let m = mesh(MeshSpec {
        backend,
        ..Default::default()
    })
    .await;
    for p in [&m.a, &m.b] {
        let admin = p.admin_addr.expect("admin");
        assert_eq!(
            admin_get(admin, "/ready").await.0,
            StatusCode::OK,
            "ready once config and certificate are loaded"
        );
    }
    let mut c1 = h1(m.a.outbound_addrs[0]).await;
    for _ in 0..3 {
        let resp = c1.send_request(get("/hello")).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers().get("echo-host").expect("host"), "app.test");
        assert_eq!(
            resp.headers().get("echo-server").expect("server"),
            &backend.to_string()
        );
        // HTTP/1 rode HTTP/2 between the proxies and reaches the app as HTTP/1 again.
        assert_eq!(
            resp.headers().get("echo-version").expect("version"),
            "HTTP/1.1"
        );
        assert!(resp.headers().get("echo-remora-orig-proto").is_none());
    }
    let mut c2 = h2(m.a.outbound_addrs[0]).await;
    let req = Request::builder()
        .uri("http://app.test/trailers")
        .header("te", "trailers")
        .body(full("x"))
        .expect("req");
    let resp = c2.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("echo-authority").expect(":authority"),
        "app.test",
        "HTTP/2 :authority survives both proxies"
    );
    let collected = resp.into_body().collect().await.expect("body");
    assert_eq!(
        collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .expect("trailers through mTLS"),
        "0"
    );

    assert!(
        metric(
            &m.a,
            r#"remora_proxy_tls_handshakes_total{direction="outbound",outcome="ok"}"#
        )
        .unwrap_or(0)
            >= 1
    );
    // HTTP/1 and HTTP/2 clients share one multiplexed HTTP/2 mTLS connection.
    assert_eq!(
        metric(
            &m.b,
            r#"remora_proxy_tls_handshakes_total{direction="inbound",outcome="ok"}"#
        ),
        Some(1)
    );
    assert_eq!(
        metric(
            &m.b,
            r#"remora_proxy_detect_total{direction="inbound",outcome="http2"}"#
        ),
        Some(1)
    );
    assert_eq!(
        metric(
            &m.b,
            &format!(
                r#"remora_proxy_requests_total{{direction="inbound",status="200",peer_identity="{FRONTEND}"}}"#
            )
        ),
        Some(4),
        "B sees A's SPIFFE ID"
    );
    assert_eq!(
        metric(
            &m.a,
            &format!(
                r#"remora_proxy_requests_total{{direction="outbound",status="200",peer_identity="{REVIEWS}"}}"#
            )
        ),
        Some(4),
    );
    assert!(
        metric(&m.a, "remora_proxy_cert_expiry_timestamp_seconds").unwrap_or(0) > 4_000_000_000
    );
}

#[tokio::test]
async fn opaque_tcp_rides_mtls() {
    let backend = tcp_echo().await;
    let m = mesh(MeshSpec {
        backend,
        protocol: "opaque",
        ..Default::default()
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(m.a.outbound_addrs[0])
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"\x00binary over mtls").await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(out, b"\x00binary over mtls");
    assert_eq!(
        metric(
            &m.b,
            r#"remora_proxy_tls_handshakes_total{direction="inbound",outcome="ok"}"#
        ),
        Some(1)
    );
}

#[tokio::test]
async fn http1_stays_http1_between_proxies_with_mesh_protocol_http1() {
    for (http1, inner) in [(false, "http2"), (true, "http1")] {
        let backend = http_echo().await;
        let m = mesh(MeshSpec {
            backend,
            a_mesh_http1: http1,
            ..Default::default()
        })
        .await;
        let mut c = h1(m.a.outbound_addrs[0]).await;
        for _ in 0..3 {
            let resp = c.send_request(get("/hello")).await.expect("response");
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(
                resp.headers().get("echo-version").expect("version"),
                "HTTP/1.1"
            );
            assert!(resp.headers().get("echo-remora-orig-proto").is_none());
        }
        // What proxy B found inside the mTLS connection, and that it was mTLS at all.
        let detected = |outcome: &str| {
            metric(
                &m.b,
                &format!(r#"remora_proxy_detect_total{{direction="inbound",outcome="{outcome}"}}"#),
            )
        };
        assert!(
            detected(inner).is_some_and(|n| n >= 1),
            "mesh http1={http1}: B detected {inner} inside mTLS\n{}",
            m.b.context().metrics.encode()
        );
        let other = if http1 { "http2" } else { "http1" };
        assert_eq!(detected(other), None, "mesh http1={http1}");
        assert_eq!(
            metric(
                &m.b,
                r#"remora_proxy_tls_handshakes_total{direction="inbound",outcome="ok"}"#
            ),
            Some(1),
            "one pooled mTLS connection for the three requests"
        );
    }
}

#[tokio::test]
async fn wrong_identity_is_refused_and_counted() {
    let backend = http_echo().await;
    let m = mesh(MeshSpec {
        backend,
        expect: "spiffe://cluster.local/ns/shop/sa/impostor",
        ..Default::default()
    })
    .await;
    let mut c = h1(m.a.outbound_addrs[0]).await;
    let resp = c.send_request(get("/")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    // The reason names both identities.
    let reason = resp
        .headers()
        .get("x-remora-proxy-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.contains("not the expected spiffe://cluster.local/ns/shop/sa/impostor")
            && reason.contains("spiffe://cluster.local/ns/"),
        "{reason}"
    );
    assert_eq!(
        metric(
            &m.a,
            r#"remora_proxy_tls_handshakes_total{direction="outbound",outcome="identity_mismatch"}"#
        ),
        Some(1)
    );
    assert_eq!(
        metric(
            &m.b,
            r#"remora_proxy_tls_handshakes_total{direction="inbound",outcome="rejected_by_peer"}"#
        ),
        Some(1)
    );
}

#[tokio::test]
async fn untrusted_certificate_is_refused_and_counted() {
    let backend = http_echo().await;
    // B's own loader refuses a certificate that does not chain to its bundle, so B is not
    // ready and serves no identity: A's handshake fails, B counts why.
    let m = mesh(MeshSpec {
        backend,
        b_untrusted: true,
        ..Default::default()
    })
    .await;
    let admin = m.b.admin_addr.expect("admin");
    let (status, body) = admin_get(admin, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        metric(
            &m.b,
            r#"remora_proxy_identity_reloads_total{reason="untrusted"}"#
        )
        .unwrap_or(0)
            >= 1
    );
    let mut c = h1(m.a.outbound_addrs[0]).await;
    let resp = c.send_request(get("/")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        metric(
            &m.b,
            r#"remora_proxy_connections_total{direction="inbound",outcome="no_identity"}"#
        ),
        Some(1)
    );
}

#[tokio::test]
async fn strict_mtls_refuses_plaintext() {
    let backend = http_echo().await;
    let m = mesh(MeshSpec {
        backend,
        b_extra: "inbound: {default: {mtls: Strict}}\n",
        ..Default::default()
    })
    .await;
    let out = raw_exchange(m.b.inbound_addrs[0], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(
        out.is_empty(),
        "plaintext is refused: {}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(
        metric(
            &m.b,
            r#"remora_proxy_connections_total{direction="inbound",outcome="plaintext_refused"}"#
        ),
        Some(1)
    );
    let mut c = h1(m.a.outbound_addrs[0]).await;
    assert_eq!(
        c.send_request(get("/")).await.expect("response").status(),
        StatusCode::OK,
        "mTLS is accepted"
    );
}

#[tokio::test]
async fn authorization_allows_listed_identity_and_denies_the_rest() {
    let backend = http_echo().await;
    let b_extra = format!(
        "inbound:\n  default:\n    authorization:\n      default: Deny\n      rules:\n      - from: {{identities: [\"{FRONTEND}\"]}}\n        to: {{methods: [GET], paths: [\"/api/*\"]}}\n"
    );
    let m = mesh(MeshSpec {
        backend,
        b_extra: &b_extra,
        ..Default::default()
    })
    .await;
    let mut c = h1(m.a.outbound_addrs[0]).await;
    assert_eq!(
        c.send_request(get("/api/items"))
            .await
            .expect("response")
            .status(),
        StatusCode::OK
    );
    let resp = c.send_request(get("/admin")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let reason = resp
        .headers()
        .get("x-remora-proxy-error")
        .expect("reason")
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        reason.contains(FRONTEND) && reason.contains("/admin"),
        "{reason}"
    );
    // A plaintext client has no identity: denied too.
    let mut plain = h1(m.b.inbound_addrs[0]).await;
    assert_eq!(
        plain
            .send_request(get("/api/items"))
            .await
            .expect("response")
            .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        metric(
            &m.b,
            r#"remora_proxy_authz_total{direction="inbound",outcome="deny"}"#
        ),
        Some(2)
    );
    assert_eq!(
        metric(
            &m.b,
            r#"remora_proxy_authz_total{direction="inbound",outcome="allow"}"#
        ),
        Some(1)
    );
}

#[tokio::test]
async fn authorization_closes_denied_tcp() {
    let backend = tcp_echo().await;
    let m = mesh(MeshSpec {
        backend,
        protocol: "opaque",
        b_extra: "inbound:\n  default:\n    protocol: opaque\n    authorization: {default: Deny}\n",
        ..Default::default()
    })
    .await;
    let out = raw_exchange(m.a.outbound_addrs[0], b"hello").await;
    assert!(out.is_empty());
    for _ in 0..200 {
        if metric(
            &m.b,
            r#"remora_proxy_connections_total{direction="inbound",outcome="unauthorized"}"#,
        ) == Some(1)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "denied TCP connection not counted:\n{}",
        m.b.context().metrics.encode()
    );
}

#[tokio::test]
async fn certificate_rotation_under_load_fails_no_request() {
    let backend = http_echo().await;
    let m = Arc::new(
        mesh(MeshSpec {
            backend,
            ..Default::default()
        })
        .await,
    );
    let before = m.b.context().identity.current().expect("identity");
    let load = {
        let m = m.clone();
        tokio::spawn(async move {
            let mut ok = 0u32;
            let mut c = h1(m.a.outbound_addrs[0]).await;
            let deadline = tokio::time::Instant::now() + Duration::from_millis(800);
            while tokio::time::Instant::now() < deadline {
                let resp = c
                    .send_request(get("/"))
                    .await
                    .expect("every request gets a response");
                assert_eq!(
                    resp.status(),
                    StatusCode::OK,
                    "no failed request during rotation"
                );
                let _ = resp.into_body().collect().await;
                ok += 1;
                // New connections too, which need handshakes with whatever cert is current.
                if ok.is_multiple_of(10) {
                    c = h1(m.a.outbound_addrs[0]).await;
                }
            }
            ok
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (cert, key) = m.ca.issue(REVIEWS, false);
    m.b_ids.replace(&cert, &key);
    let served = load.await.expect("load finished without failures");
    assert!(served > 10, "load ran: {served}");
    let after = m.b.context().identity.current().expect("identity");
    assert!(
        !Arc::ptr_eq(&before, &after),
        "the new certificate was loaded"
    );
    // A broken file never replaces the good identity.
    std::fs::write(&m.b_ids.cert, "not a certificate").expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let still = m.b.context().identity.current().expect("identity");
    assert!(Arc::ptr_eq(&after, &still), "bad files are rejected");
    assert!(
        metric(
            &m.b,
            r#"remora_proxy_identity_reloads_total{reason="bad_certificate"}"#
        )
        .unwrap_or(0)
            >= 1
    );
    let mut c = h1(m.a.outbound_addrs[0]).await;
    assert_eq!(
        c.send_request(get("/")).await.expect("response").status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn websocket_upgrade_rides_mtls_on_its_own_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = http_echo().await;
    let m = mesh(MeshSpec {
        backend,
        ..Default::default()
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(m.a.outbound_addrs[0])
        .await
        .expect("connect");
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s.write_all(b"over mtls").await.expect("write");
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&buf[..n], b"over mtls");
    assert_eq!(
        metric(
            &m.b,
            r#"remora_proxy_detect_total{direction="inbound",outcome="http1"}"#
        ),
        Some(1)
    );
}

#[tokio::test]
async fn expired_server_certificate_is_refused_and_counted() {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("remora test CA");
    // A server that presents an expired certificate for the expected identity. (A Remora
    // proxy would refuse to load it; this one is a bare TLS server.)
    let (cert, key) = ca.issue(REVIEWS, true);
    let server = rustls::ServerConfig::builder_with_provider(remora_proxy::identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let fake = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = acceptor.accept(s).await;
        }
    });
    let a_ids = IdentityPaths::write(dir.path(), "frontend", FRONTEND, &ca, &ca);
    let a_yaml = format!(
        "version: 1\n{}outbound:\n  services:\n  - name: reviews.shop\n    addresses: [\"{VIP}\"]\n    endpoints:\n    - {{address: \"{fake}\", identity: \"{REVIEWS}\", meshed: true}}\n",
        a_ids.yaml()
    );
    let a = start(fast(settings(VIP.parse().expect("vip"))), &a_yaml).await;
    let mut c = h1(a.outbound_addrs[0]).await;
    let resp = c.send_request(get("/")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        metric(
            &a,
            r#"remora_proxy_tls_handshakes_total{direction="outbound",outcome="expired"}"#
        ),
        Some(1),
        "{}",
        a.context().metrics.encode()
    );
    // The proxy's own loader refuses an expired certificate outright.
    let (cert, key) = ca.issue(FRONTEND, true);
    a_ids.replace(&cert, &key);
    let err = remora_proxy::identity::Identity::load(&remora_crds::proxy::IdentityFiles {
        spiffe_id: FRONTEND.into(),
        cert_chain: a_ids.cert.clone(),
        private_key: a_ids.key.clone(),
        trust_bundle: a_ids.bundle.clone(),
    })
    .expect_err("expired");
    assert_eq!(err.label(), "expired", "{err}");
}

#[tokio::test]
async fn idle_mesh_connections_outlive_the_header_read_timeout() {
    let backend = http_echo().await;
    let m = mesh(MeshSpec {
        backend,
        a_mesh_http1: true,
        b_header_read_timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    })
    .await;
    let handshakes = || {
        metric(
            &m.b,
            r#"remora_proxy_tls_handshakes_total{direction="inbound",outcome="ok"}"#,
        )
    };
    let mut c = h1(m.a.outbound_addrs[0]).await;
    let resp = c.send_request(get("/one")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(handshakes(), Some(1));
    // Idle well past B's header read timeout: A's pooled mTLS connection is still open
    // (B waits longer than A's pool for a mesh peer), so no new handshake.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let resp = c.send_request(get("/two")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(handshakes(), Some(1), "the idle mesh connection was reused");
    // A plaintext client of B still gets the short timeout between requests.
    let mut plain = tokio::net::TcpStream::connect(m.b.inbound_addrs[0])
        .await
        .expect("connect");
    plain
        .write_all(b"GET /plain HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let n = plain.read(&mut buf).await.expect("response");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match plain.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "B closes an idle plaintext connection after its header read timeout"
    );
}
