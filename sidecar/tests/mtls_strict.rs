//! Strict mTLS is never downgraded: every client that is not a mesh workload of this
//! trust domain with a valid certificate is refused before its bytes reach the app, and
//! the refusal is counted by reason (`remora_proxy_inbound_refused_total{reason}`). And
//! Permissive ports make their plaintext clients visible per client IP.
//!
//! The server is an in-process proxy with file certificates on loopback; the clients are
//! raw TLS clients presenting the certificate of each case.

mod abuse;
mod common;

use abuse::{
    FRONTEND, LOCAL, OTHER, Server, client_config, connect_from, mesh_get, metric, refused, server,
};
use common::{pki::Ca, raw_exchange};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn strict() -> Server {
    server("  default: {mtls: Strict}\n", |_| ()).await
}

/// A client presenting `(cert, key)` is refused, counted under `reason`, and the app
/// sees nothing.
async fn refused_with(s: &Server, cert: Option<(String, String)>, reason: &str) {
    let config = client_config(cert.as_ref().map(|(c, k)| (c.as_str(), k.as_str())));
    let got = mesh_get(config, LOCAL, s.proxy.inbound_addrs[0]).await;
    assert!(got.is_err(), "{reason}: the client got an answer: {got:?}");
    assert_eq!(
        refused(&s.proxy, reason),
        1,
        "{reason}: {got:?}\n{}",
        s.proxy.context().metrics.encode()
    );
    assert_eq!(s.app.hits(), 0, "{reason}: the app saw a request");
    assert_eq!(
        metric(
            &s.proxy,
            &format!(
                r#"remora_proxy_tls_handshakes_total{{direction="inbound",outcome="{reason}"}}"#
            )
        ),
        1
    );
    println!("strict mTLS, {reason}: refused ({got:?})");
}

#[tokio::test]
async fn a_workload_of_the_mesh_gets_through() {
    let s = strict().await;
    let got = mesh_get(s.client(FRONTEND), LOCAL, s.proxy.inbound_addrs[0]).await;
    assert_eq!(got.as_deref(), Ok("HTTP/1.1 200 OK"));
    assert_eq!(s.app.hits(), 1);
    assert_eq!(
        metric(
            &s.proxy,
            &format!(
                r#"remora_proxy_requests_total{{direction="inbound",status="200",peer_identity="{FRONTEND}"}}"#
            )
        ),
        1
    );
}

#[tokio::test]
async fn plaintext_is_refused() {
    let s = strict().await;
    for request in [
        &b"GET / HTTP/1.1\r\nhost: app.test\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x00\x01 opaque bytes",
    ] {
        let out = raw_exchange(s.proxy.inbound_addrs[0], request).await;
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    }
    assert_eq!(refused(&s.proxy, "plaintext"), 3);
    assert_eq!(s.app.hits(), 0);
}

#[tokio::test]
async fn tls_without_the_mesh_alpn_is_refused() {
    let s = strict().await;
    let mut config = (*s.client(FRONTEND)).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let got = mesh_get(std::sync::Arc::new(config), LOCAL, s.proxy.inbound_addrs[0]).await;
    assert!(got.is_err(), "{got:?}");
    assert_eq!(refused(&s.proxy, "not_mesh_tls"), 1);
    assert_eq!(s.app.hits(), 0);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let s = strict().await;
    refused_with(&s, None, "no_client_certificate").await;
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_refused() {
    let s = strict().await;
    let rogue = Ca::new("rogue CA");
    refused_with(&s, Some(rogue.issue(FRONTEND, false)), "untrusted").await;
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let s = strict().await;
    let cert = s.ca.issue(FRONTEND, true);
    refused_with(&s, Some(cert), "expired").await;
}

#[tokio::test]
async fn a_foreign_trust_domain_is_refused_even_when_the_root_signs_it() {
    let s = strict().await;
    let cert =
        s.ca.issue("spiffe://evil.example/ns/shop/sa/frontend", false);
    refused_with(&s, Some(cert), "foreign_trust_domain").await;
}

#[tokio::test]
async fn a_malformed_spiffe_id_is_refused() {
    let s = strict().await;
    let cert =
        s.ca.issue("spiffe://cluster.local/ns/shop/sa/../admin", false);
    refused_with(&s, Some(cert), "bad_spiffe_id").await;
}

#[tokio::test]
async fn a_certificate_without_a_spiffe_id_is_refused() {
    let s = strict().await;
    let cert = s.ca.issue_dns("frontend.shop.svc");
    refused_with(&s, Some(cert), "no_spiffe_id").await;
}

#[tokio::test]
async fn a_spiffe_id_the_port_does_not_allow_is_refused() {
    let s = server(
        &format!(
            "  default:\n    mtls: Strict\n    authorization:\n      default: Deny\n      rules:\n      - from: {{identities: [\"{FRONTEND}\"]}}\n"
        ),
        |_| (),
    )
    .await;
    let intruder = s.client("spiffe://cluster.local/ns/shop/sa/intruder");
    let got = mesh_get(intruder, LOCAL, s.proxy.inbound_addrs[0]).await;
    assert_eq!(got.as_deref(), Ok("HTTP/1.1 403 Forbidden"));
    assert_eq!(refused(&s.proxy, "unauthorized"), 1);
    assert_eq!(s.app.hits(), 0);
    let got = mesh_get(s.client(FRONTEND), LOCAL, s.proxy.inbound_addrs[0]).await;
    assert_eq!(
        got.as_deref(),
        Ok("HTTP/1.1 200 OK"),
        "the allowed identity"
    );
    assert_eq!(s.app.hits(), 1);
}

#[tokio::test]
async fn permissive_plaintext_is_counted_per_client_ip() {
    let s = server("  default: {mtls: Permissive}\n", |_| ()).await;
    let addr = s.proxy.inbound_addrs[0];
    for from in [LOCAL, LOCAL, OTHER] {
        let mut c = connect_from(from, addr).await.expect("connect");
        c.write_all(b"GET / HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.expect("read");
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }
    // A mesh client on the same port is not plaintext.
    let got = mesh_get(s.client(FRONTEND), OTHER, addr).await;
    assert_eq!(got.as_deref(), Ok("HTTP/1.1 200 OK"));
    let series = |peer: &str| {
        metric(
            &s.proxy,
            &format!(r#"remora_proxy_inbound_plaintext_accepted_total{{peer="{peer}"}}"#),
        )
    };
    assert_eq!((series("127.0.0.1"), series("127.0.0.2")), (2, 1));
    assert_eq!(s.app.hits(), 4);
}
