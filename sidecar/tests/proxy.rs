//! Real sockets on 127.0.0.1: the proxy in-process (original destination fixed by the
//! harness, as there are no iptables rules here) between real clients and servers.

mod common;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use remora_proxy::{admin::LogLevel, listen::OrigDstMode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn header<'a>(resp: &'a http::Response<hyper::body::Incoming>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

fn metric_value(text: &str, line_prefix: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn http1_keep_alive_hop_by_hop_request_id_and_trace() {
    let backend = http_echo().await;
    let proxy = start(settings(backend), "{}").await;
    let mut send = h1(proxy.inbound_addrs[0]).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let req = Request::builder()
            .method("POST")
            .uri(format!("/echo/{i}"))
            .header("host", "app.test")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .body(full(format!("body {i}")))
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            header(&resp, "echo-path"),
            Some(format!("/echo/{i}").as_str())
        );
        assert_eq!(
            header(&resp, "echo-host"),
            Some("app.test"),
            "Host is preserved"
        );
        assert_eq!(
            header(&resp, "echo-x-hop"),
            None,
            "headers named in Connection are removed"
        );
        assert_eq!(header(&resp, "echo-keep-alive"), None);
        let id = header(&resp, "echo-x-request-id")
            .expect("x-request-id added")
            .to_owned();
        assert_eq!(id.len(), 32);
        let tp = header(&resp, "echo-traceparent").expect("traceparent forwarded");
        assert!(
            tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
            "{tp}"
        );
        assert!(
            !tp.contains("b7ad6b7169203331"),
            "a new span id per hop: {tp}"
        );
        assert!(tp.ends_with("-01"));
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, format!("body {i}"));
        ids.push(id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 3, "every request gets its own id");
    // An existing id is kept.
    let req = Request::builder()
        .uri("/")
        .header("host", "a")
        .header("x-request-id", "mine")
        .body(full(""))
        .expect("req");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(header(&resp, "echo-x-request-id"), Some("mine"));
    let metrics = proxy.context().metrics.encode();
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_connections_total{direction="inbound",outcome="accepted"}"#
        ),
        Some(1),
        "all requests rode one client connection:\n{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_requests_total{direction="inbound",status="200",peer_identity=""}"#
        ),
        Some(4),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_detect_total{direction="inbound",outcome="http1"}"#
        ),
        Some(1)
    );
}

#[tokio::test]
async fn http1_chunked_request_body_streams_through() {
    let backend = http_echo().await;
    let proxy = start(settings(backend), "{}").await;
    let mut send = h1(proxy.inbound_addrs[0]).await;
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(4);
    let req = Request::builder()
        .method("POST")
        .uri("/echo")
        .header("host", "a")
        .body(body.boxed())
        .expect("req");
    let resp = tokio::spawn(async move { send.send_request(req).await });
    for part in ["one ", "two ", "three"] {
        tx.send_data(Bytes::from_static(part.as_bytes()))
            .await
            .expect("send chunk");
    }
    drop(tx);
    let resp = resp.await.expect("join").expect("response");
    assert_eq!(
        header(&resp, "echo-transfer-encoding"),
        Some("chunked"),
        "the upstream request is chunked too"
    );
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "one two three");
}

async fn read_until(s: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(needle.len()).any(|w| w == needle) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("timely read")
            .expect("read");
        assert!(
            n > 0,
            "closed before {:?}; got {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[tokio::test]
async fn expect_100_continue() {
    let backend = http_echo().await;
    let proxy = start(settings(backend), "{}").await;
    let mut s = TcpStream::connect(proxy.inbound_addrs[0])
        .await
        .expect("connect");
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("write head");
    let interim = read_until(&mut s, b"\r\n\r\n").await;
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(b"hello").await.expect("write body");
    let resp = read_until(&mut s, b"hello").await;
    assert!(
        resp.starts_with(b"HTTP/1.1 200 OK"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
}

#[tokio::test]
async fn websocket_upgrade_passes_through() {
    let backend = http_echo().await;
    let proxy = start(settings(backend), "{}").await;
    let mut s = TcpStream::connect(proxy.inbound_addrs[0])
        .await
        .expect("connect");
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let head = read_until(&mut s, b"\r\n\r\n").await;
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"frame one"[..], b"frame two"] {
        s.write_all(msg).await.expect("write frame");
        let got = read_until(&mut s, msg).await;
        assert_eq!(got, msg);
    }
}

#[tokio::test]
async fn http2_bidirectional_streaming_and_trailers() {
    let backend = http_echo().await;
    let proxy = start(settings(backend), "{}").await;
    let mut send = h2(proxy.inbound_addrs[0]).await;
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(1);
    let req = Request::builder()
        .method("POST")
        .uri("http://app.test/trailers")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body.boxed())
        .expect("req");
    tx.send_data(Bytes::from_static(b"ping-1"))
        .await
        .expect("send");
    let resp = send
        .send_request(req)
        .await
        .expect("response headers before the request ends");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "echo-version"), Some("HTTP/2.0"));
    assert_eq!(
        header(&resp, "echo-authority"),
        Some("app.test"),
        ":authority is kept"
    );
    assert_eq!(
        header(&resp, "echo-te"),
        Some("trailers"),
        "te: trailers survives for gRPC"
    );
    let mut body = resp.into_body();
    // Bidirectional: each message comes back before the next one is sent.
    let first = body
        .frame()
        .await
        .expect("frame")
        .expect("ok")
        .into_data()
        .expect("data");
    assert_eq!(first, "ping-1");
    tx.send_data(Bytes::from_static(b"ping-2"))
        .await
        .expect("send");
    let second = body
        .frame()
        .await
        .expect("frame")
        .expect("ok")
        .into_data()
        .expect("data");
    assert_eq!(second, "ping-2");
    drop(tx);
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("frame");
        if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    let trailers = trailers.expect("trailers arrive");
    assert_eq!(trailers.get("grpc-status").expect("grpc-status"), "0");
    let metrics = proxy.context().metrics.encode();
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_detect_total{direction="inbound",outcome="http2"}"#
        ),
        Some(1)
    );
}

#[tokio::test]
async fn malformed_http_gets_400_and_the_connection_closes() {
    let backend = http_echo().await;
    let proxy = start(settings(backend), "{}").await;
    let out = raw_exchange(
        proxy.inbound_addrs[0],
        b"GET / HTTP/1.1\r\nHost: a\r\nbad header line\r\n\r\n",
    )
    .await;
    assert!(
        out.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // A port declared HTTP answers garbage with 400 too, instead of tunnelling it.
    let port = backend.port();
    let proxy = start(
        settings(backend),
        &format!("inbound: {{ports: {{\"{port}\": {{protocol: http}}}}}}"),
    )
    .await;
    let out = raw_exchange(proxy.inbound_addrs[0], b"\x01\x02 not http at all\r\n\r\n").await;
    assert!(
        out.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let backend = http_echo().await;
    let mut s = settings(backend);
    s.max_header_bytes = 8192;
    let proxy = start(s, "{}").await;
    let mut req = b"GET / HTTP/1.1\r\nHost: a\r\nx-big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 20_000));
    req.extend(b"\r\n\r\n");
    let out = raw_exchange(proxy.inbound_addrs[0], &req).await;
    assert!(
        out.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

async fn closed_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

#[tokio::test]
async fn upstream_refusing_gets_502_with_a_reason() {
    let dead = closed_port().await;
    let proxy = start(settings(dead), "{}").await;
    let mut send = h1(proxy.inbound_addrs[0]).await;
    let resp = send.send_request(get("/")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let reason = header(&resp, "x-remora-proxy-error").expect("reason header");
    assert!(reason.contains("refused"), "{reason}");
    let metrics = proxy.context().metrics.encode();
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_proxy_errors_total{direction="inbound",outcome="connect_refused"}"#
        ),
        Some(1),
        "{metrics}"
    );
}

#[tokio::test]
async fn outbound_vip_round_robins_over_ready_endpoints() {
    let (a, b) = (http_echo().await, http_echo().await);
    let vip: SocketAddr = "10.96.0.12:9080".parse().expect("addr");
    let yaml = format!(
        "outbound:\n  services:\n  - name: reviews.shop\n    addresses: [\"{vip}\"]\n    policy: {{loadBalancer: {{algorithm: RoundRobin}}}}\n    endpoints:\n    - {{address: \"{a}\"}}\n    - {{address: \"{b}\"}}\n    - {{address: \"127.0.0.1:1\", ready: false}}\n"
    );
    let proxy = start(settings(vip), &yaml).await;
    let mut send = h1(proxy.outbound_addrs[0]).await;
    let mut servers = Vec::new();
    for _ in 0..4 {
        let resp = send.send_request(get("/")).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        servers.push(header(&resp, "echo-server").expect("server").to_owned());
    }
    // One client connection, balanced per request.
    assert_eq!(
        servers,
        vec![a.to_string(), b.to_string(), a.to_string(), b.to_string()]
    );
    // Opaque TCP to the VIP is balanced per connection.
    let (c, d) = (tcp_echo().await, tcp_echo().await);
    let yaml = format!(
        "outbound:\n  services:\n  - name: db.shop\n    addresses: [\"{vip}\"]\n    protocol: opaque\n    endpoints: [{{address: \"{c}\"}}, {{address: \"{d}\"}}]\n"
    );
    let proxy = start(settings(vip), &yaml).await;
    for _ in 0..2 {
        assert_eq!(
            raw_exchange_half_close(proxy.outbound_addrs[0], b"select 1").await,
            b"select 1"
        );
    }
    let metrics = proxy.context().metrics.encode();
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_detect_total{direction="outbound",outcome="skipped_opaque_port"}"#
        ),
        Some(2),
        "{metrics}"
    );
}

/// Writes, half-closes, and reads the reply to the end.
async fn raw_exchange_half_close(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("reply within 5 s")
        .expect("read");
    out
}

#[tokio::test]
async fn outbound_unknown_destinations_pass_through_or_are_denied() {
    let backend = http_echo().await;
    let proxy = start(
        settings(backend),
        "outbound: {unknownDestinations: Passthrough}",
    )
    .await;
    let mut send = h1(proxy.outbound_addrs[0]).await;
    assert_eq!(
        send.send_request(get("/"))
            .await
            .expect("response")
            .status(),
        StatusCode::OK
    );
    let metrics = proxy.context().metrics.encode();
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_unknown_destinations_total{reason="passthrough"}"#
        ),
        Some(1)
    );

    let proxy = start(settings(backend), "outbound: {unknownDestinations: Deny}").await;
    let out = raw_exchange(
        proxy.outbound_addrs[0],
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert!(
        out.is_empty(),
        "denied connections are closed: {}",
        String::from_utf8_lossy(&out)
    );
    let metrics = proxy.context().metrics.encode();
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_unknown_destinations_total{reason="denied"}"#
        ),
        Some(1)
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_connections_total{direction="outbound",outcome="unknown_denied"}"#
        ),
        Some(1)
    );
}

#[tokio::test]
async fn service_without_ready_endpoints_gets_503() {
    let vip: SocketAddr = "10.96.0.99:80".parse().expect("addr");
    let yaml = format!(
        "outbound:\n  services:\n  - name: empty.shop\n    addresses: [\"{vip}\"]\n    protocol: http\n    endpoints: [{{address: \"127.0.0.1:1\", ready: false}}]\n"
    );
    let proxy = start(settings(vip), &yaml).await;
    let mut send = h1(proxy.outbound_addrs[0]).await;
    let resp = send.send_request(get("/")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        header(&resp, "x-remora-proxy-error"),
        Some("service empty.shop has no ready endpoints")
    );
}

#[tokio::test]
async fn opaque_tcp_with_half_close() {
    let backend = tcp_echo().await;
    let proxy = start(settings(backend), "{}").await;
    let payload = b"\x00\x01binary protocol bytes \xff".repeat(1000);
    assert_eq!(
        raw_exchange_half_close(proxy.inbound_addrs[0], &payload).await,
        payload
    );
    let metrics = proxy.context().metrics.encode();
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_detect_total{direction="inbound",outcome="opaque"}"#
        ),
        Some(1)
    );
    // The byte counters are written when the connection ends.
    for _ in 0..100 {
        let m = proxy.context().metrics.encode();
        if metric_value(
            &m,
            r#"remora_proxy_tcp_bytes_total{direction="inbound",flow="from_client"}"#,
        ) == Some(payload.len() as u64)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "tcp byte counters never matched:\n{}",
        proxy.context().metrics.encode()
    );
}

#[tokio::test]
async fn server_speaks_first_is_not_stalled() {
    let server = greeting_server(b"220 smtp.test ESMTP\r\n").await;
    // Detection gives up after its timeout and connects; the greeting flows.
    let proxy = start(settings(server), "{}").await;
    let mut s = TcpStream::connect(proxy.inbound_addrs[0])
        .await
        .expect("connect");
    let greeting = read_until(&mut s, b"\r\n").await;
    assert_eq!(greeting, b"220 smtp.test ESMTP\r\n");
    s.write_all(b"EHLO me\r\n").await.expect("write");
    assert_eq!(read_until(&mut s, b"EHLO me\r\n").await, b"EHLO me\r\n");
    let metrics = proxy.context().metrics.encode();
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_detect_total{direction="inbound",outcome="timeout"}"#
        ),
        Some(1)
    );
    // An opaque port without mTLS skips detection: no wait at all. (With mTLS enabled it
    // still looks for a mesh ClientHello, which meshed clients send at once.)
    let port = server.port();
    let proxy = start(
        settings(server),
        &format!("inbound: {{ports: {{\"{port}\": {{protocol: opaque, mtls: Disabled}}}}}}"),
    )
    .await;
    let mut s = TcpStream::connect(proxy.inbound_addrs[0])
        .await
        .expect("connect");
    assert_eq!(
        read_until(&mut s, b"\r\n").await,
        b"220 smtp.test ESMTP\r\n"
    );
    let metrics = proxy.context().metrics.encode();
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_detect_total{direction="inbound",outcome="skipped_opaque_port"}"#
        ),
        Some(1)
    );
}

/// A TLS 1.2/1.3-style ClientHello record without the mesh ALPN.
fn foreign_client_hello() -> Vec<u8> {
    let sni = b"example.com";
    let mut ext = Vec::new();
    let mut list = vec![0u8];
    list.extend((sni.len() as u16).to_be_bytes());
    list.extend(sni);
    ext.extend(0u16.to_be_bytes());
    ext.extend(((list.len() + 2) as u16).to_be_bytes());
    ext.extend((list.len() as u16).to_be_bytes());
    ext.extend(list);
    let mut body = vec![3, 3];
    body.extend([9u8; 32]);
    body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![1u8];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

#[tokio::test]
async fn foreign_tls_passes_through_untouched() {
    let backend = tcp_echo().await;
    let proxy = start(settings(backend), "{}").await;
    let hello = foreign_client_hello();
    assert_eq!(
        raw_exchange_half_close(proxy.outbound_addrs[0], &hello).await,
        hello
    );
    let metrics = proxy.context().metrics.encode();
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_detect_total{direction="outbound",outcome="foreign_tls"}"#
        ),
        Some(1)
    );
}

#[tokio::test]
async fn connections_to_the_proxy_itself_are_refused() {
    // Aim the fixed destination at the proxy's own outbound listener.
    let port = closed_port().await;
    let mut s = settings(port);
    s.outbound_listen = vec![port];
    let proxy = start(s, "{}").await;
    let out = raw_exchange(
        proxy.outbound_addrs[0],
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert!(out.is_empty());
    let metrics = proxy.context().metrics.encode();
    assert_eq!(
        metric_value(
            &metrics,
            r#"remora_proxy_connections_total{direction="outbound",outcome="loop_refused"}"#
        ),
        Some(1),
        "{metrics}"
    );
    // Without iptables, a kernel-mode listener sees no redirection at all: refused too.
    let backend = tcp_echo().await;
    let mut s = settings(backend);
    s.orig_dst = OrigDstMode::Kernel;
    let proxy = start(s, "{}").await;
    let out = raw_exchange(proxy.inbound_addrs[0], b"hello").await;
    assert!(out.is_empty());
    let metrics = proxy.context().metrics.encode();
    let refused = metric_value(
        &metrics,
        r#"remora_proxy_connections_total{direction="inbound",outcome="not_redirected"}"#,
    )
    .or_else(|| {
        metric_value(
            &metrics,
            r#"remora_proxy_connections_total{direction="inbound",outcome="loop_refused"}"#,
        )
    });
    assert_eq!(refused, Some(1), "{metrics}");
}

#[tokio::test]
async fn admin_endpoints() {
    let backend = http_echo().await;
    let yaml = format!(
        "version: 9\noutbound:\n  services:\n  - name: reviews.shop\n    addresses: [\"10.96.0.12:9080\"]\n    endpoints: [{{address: \"{backend}\", identity: \"spiffe://cluster.local/ns/shop/sa/reviews\", meshed: false}}]\n"
    );
    let settings = settings(backend);
    let config = remora_crds::proxy::ProxyConfig::from_yaml(&yaml).expect("valid");
    let level = LogLevel::new("info", |f| {
        if f == "bogus[" {
            Err("bad filter".into())
        } else {
            Ok(())
        }
    });
    let proxy = remora_proxy::Proxy::start(settings, config, Some(level))
        .await
        .expect("start");
    let admin = proxy.admin_addr.expect("admin listener");
    assert_eq!(admin_get(admin, "/live").await.0, StatusCode::OK);
    assert_eq!(
        admin_get(admin, "/ready").await,
        (StatusCode::OK, "ready\n".into())
    );
    let (status, metrics) = admin_get(admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains("remora_proxy_config_version 9"),
        "{metrics}"
    );
    let (_, dump) = admin_get(admin, "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
    assert_eq!(dump["version"], 9);
    assert_eq!(
        dump["config"]["outbound"]["services"][0]["name"],
        "reviews.shop"
    );
    let (_, eps) = admin_get(admin, "/endpoints").await;
    let eps: serde_json::Value = serde_json::from_str(&eps).expect("json");
    assert_eq!(
        eps["services"][0]["endpoints"][0]["address"],
        backend.to_string()
    );
    // Not meshed: no identity is expected of it (plain connections).
    assert_eq!(
        eps["services"][0]["endpoints"][0]["identity"],
        serde_json::Value::Null
    );
    assert_eq!(
        admin_get(admin, "/log-level").await,
        (StatusCode::OK, "info\n".into())
    );
    assert_eq!(
        admin_request(admin, "POST", "/log-level", "debug").await.0,
        StatusCode::OK
    );
    assert_eq!(
        admin_get(admin, "/log-level").await,
        (StatusCode::OK, "debug\n".into())
    );
    assert_eq!(
        admin_request(admin, "POST", "/log-level", "bogus[").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        admin_get(admin, "/shutdown").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        admin_request(admin, "POST", "/shutdown", "").await.0,
        StatusCode::OK
    );
    assert_eq!(
        admin_get(admin, "/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(proxy.wait().await, "nothing in flight: drained at once");
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_sends_goaway() {
    let backend = http_echo().await;
    let proxy = start(settings(backend), "{}").await;
    let inbound = proxy.inbound_addrs[0];
    let mut h1c = h1(inbound).await;
    let mut h2c = h2(inbound).await;
    let slow1 = tokio::spawn(async move { h1c.send_request(get("/slow/300")).await });
    let slow2 = {
        let req = Request::builder()
            .uri("http://a/slow/300")
            .body(full(""))
            .expect("req");
        let fut = h2c.send_request(req);
        tokio::spawn(fut)
    };
    // Let both requests reach the backend before shutting down.
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.shutdown();
    let r1 = slow1
        .await
        .expect("join")
        .expect("in-flight HTTP/1 request completes");
    let r2 = slow2
        .await
        .expect("join")
        .expect("in-flight HTTP/2 request completes");
    assert_eq!((r1.status(), r2.status()), (StatusCode::OK, StatusCode::OK));
    let _ = (
        r1.into_body().collect().await,
        r2.into_body().collect().await,
    );
    // GOAWAY: new streams on the old HTTP/2 connection are refused.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let req = Request::builder()
        .uri("http://a/")
        .body(full(""))
        .expect("req");
    assert!(
        h2c.send_request(req).await.is_err(),
        "new streams after GOAWAY fail"
    );
    assert!(proxy.wait().await, "drained within the grace period");
    // The listener is closed.
    assert!(
        TcpStream::connect(inbound).await.is_err(),
        "no new connections after shutdown"
    );
}

#[tokio::test]
async fn app_health_runs_the_original_probes() {
    let (web, tcp) = (http_echo().await, tcp_echo().await);
    let dead = closed_port().await;
    let json = format!(
        r#"{{
        "/app-health/web/livez": {{"httpGet": {{"path": "/status/204", "port": {w}, "httpHeaders": [{{"name": "x-probe", "value": "1"}}]}}}},
        "/app-health/web/readyz": {{"httpGet": {{"path": "/status/500", "port": {w}}}}},
        "/app-health/db/livez": {{"tcpSocket": {{"port": {t}}}}},
        "/app-health/db/readyz": {{"tcpSocket": {{"port": {d}}}}},
        "/app-health/api/startupz": {{"grpc": {{"port": {w}, "service": "api"}}, "timeoutSeconds": 2}}
    }}"#,
        w = web.port(),
        t = tcp.port(),
        d = dead.port()
    );
    let mut s = settings(web);
    s.app_probes = std::sync::Arc::new(remora_proxy::app_health::parse(&json).expect("probe JSON"));
    let proxy = start(s, "{}").await;
    let admin = proxy.admin_addr.expect("admin");
    assert_eq!(
        admin_get(admin, "/app-health/web/livez").await.0,
        StatusCode::OK
    );
    assert_eq!(
        admin_get(admin, "/app-health/web/readyz").await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        admin_get(admin, "/app-health/db/livez").await.0,
        StatusCode::OK
    );
    assert_eq!(
        admin_get(admin, "/app-health/db/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        admin_get(admin, "/app-health/api/startupz").await,
        (StatusCode::OK, "SERVING\n".into())
    );
    assert_eq!(
        admin_get(admin, "/app-health/nope/livez").await.0,
        StatusCode::NOT_FOUND
    );
}

/// A backend that answers each request head with the canned reply its request line names,
/// then closes: for the bodies that are read whole (a small `Content-Length`).
async fn scripted_backend() -> SocketAddr {
    tcp_server(loopback(), |mut s| async move {
        let head = read_until(&mut s, b"\r\n\r\n").await;
        let line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        let reply: &[u8] = if line.starts_with("HEAD ") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
        } else if line.contains("/not-modified") {
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"
        } else if line.contains("/truncated") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        };
        let _ = s.write_all(reply).await;
        let _ = s.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn bodies_read_whole_keep_head_and_304_bodiless_and_truncation_is_a_502() {
    let backend = scripted_backend().await;
    let proxy = start(settings(backend), "{}").await;
    let req = |method: &str, path: &str| request(method, path, Bytes::new());
    // A HEAD answer announces a length but has no body: it comes back at once, length kept.
    let mut send = h1(proxy.inbound_addrs[0]).await;
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req("HEAD", "/")))
        .await
        .expect("HEAD answered without waiting for a body")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-length"), Some("5000"));
    let mut send = h1(proxy.inbound_addrs[0]).await;
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        send.send_request(req("GET", "/not-modified")),
    )
    .await
    .expect("304 answered without waiting for a body")
    .expect("response");
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
    // A small body is read whole before it is answered with, so an upstream that closes
    // halfway is a 502 with a reason, not a truncated 200.
    let mut send = h1(proxy.inbound_addrs[0]).await;
    let resp = send
        .send_request(req("GET", "/truncated"))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(header(&resp, "x-remora-proxy-error").is_some());
    let mut send = h1(proxy.inbound_addrs[0]).await;
    let resp = send.send_request(req("GET", "/")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "connection"), None, "hop-by-hop stripped");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "hello");
}

/// An HTTP/1 backend that counts the connections it accepted and closes a kept-alive
/// connection after `idle` without a request (hyper's header read timeout).
async fn counting_backend(
    idle: Duration,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = tcp_server(loopback(), move |s| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(full("ok")))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(idle)
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
        }
    })
    .await;
    (addr, accepted)
}

#[tokio::test]
async fn upstream_http1_connections_are_reused_and_closed_ones_skipped() {
    use std::sync::atomic::Ordering;
    let (backend, accepted) = counting_backend(Duration::from_millis(300)).await;
    let proxy = start(settings(backend), "{}").await;
    // Sequential requests from two clients share one upstream connection.
    let mut c1 = h1(proxy.inbound_addrs[0]).await;
    let mut c2 = h1(proxy.inbound_addrs[0]).await;
    for i in 0..6 {
        let c = if i % 2 == 0 { &mut c1 } else { &mut c2 };
        let resp = c.send_request(get("/")).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, "ok");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one pooled upstream connection"
    );
    // The backend closes the idle connection; the next request skips it and dials anew.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let resp = c1.send_request(get("/")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // Concurrent requests need as many connections, and all go back to the pool.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(h1(proxy.inbound_addrs[0]).await);
    }
    let sent: Vec<_> = clients
        .iter_mut()
        .map(|c| tokio::spawn(c.send_request(get("/"))))
        .collect();
    for r in sent {
        assert_eq!(
            r.await.expect("join").expect("response").status(),
            StatusCode::OK
        );
    }
    let after_burst = accepted.load(Ordering::SeqCst);
    assert!((2..=4).contains(&after_burst), "{after_burst}");
    for c in &mut clients {
        let resp = c.send_request(get("/")).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        after_burst,
        "the burst's connections were pooled and reused"
    );
}

#[tokio::test]
async fn the_apps_kept_alive_connections_outlive_the_header_read_timeout() {
    let backend = http_echo().await;
    let mut s = settings(backend);
    s.header_read_timeout = Duration::from_millis(200);
    let proxy = start(s, "{}").await;
    // Outbound: the pod's own app may leave its connection idle longer than the header
    // read timeout (its pool decides when to close); the next request still works.
    let mut c = h1(proxy.outbound_addrs[0]).await;
    let resp = c.send_request(get("/one")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let resp = c
        .send_request(get("/two"))
        .await
        .expect("the idle connection is still open");
    assert_eq!(resp.status(), StatusCode::OK);
    // Inbound, a plaintext client gets the header read timeout between requests.
    let mut c = h1(proxy.inbound_addrs[0]).await;
    let resp = c.send_request(get("/one")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        c.send_request(get("/two")).await.is_err(),
        "closed after 200 ms idle"
    );
}

/// A backend that answers the first request on each connection and closes the connection
/// under the second, unanswered: a keep-alive idle timeout firing as a request arrives.
async fn closes_under_the_second_request() -> SocketAddr {
    tcp_server(loopback(), |mut s| async move {
        read_until(&mut s, b"\r\n\r\n").await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        // Dropped: closed without an answer.
    })
    .await
}

#[tokio::test]
async fn an_idempotent_request_on_a_connection_closed_under_it_is_sent_again() {
    let backend = closes_under_the_second_request().await;
    let proxy = start(settings(backend), "{}").await;
    let mut c = h1(proxy.inbound_addrs[0]).await;
    let resp = c.send_request(get("/first")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.expect("body");
    // The pooled connection sits idle past REPLAY_AFTER_IDLE; the backend then closes it
    // under the next request, which is sent again on a new connection.
    tokio::time::sleep(remora_proxy::pool::REPLAY_AFTER_IDLE + Duration::from_millis(100)).await;
    let resp = c.send_request(get("/second")).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK, "GET sent again");
    resp.into_body().collect().await.expect("body");
    // A POST is not idempotent: the client gets the failure, not a second POST.
    tokio::time::sleep(remora_proxy::pool::REPLAY_AFTER_IDLE + Duration::from_millis(100)).await;
    let resp = c
        .send_request(request("POST", "/third", "x"))
        .await
        .expect("response");
    assert_eq!(
        resp.status(),
        StatusCode::BAD_GATEWAY,
        "POST not sent again"
    );
    assert!(header(&resp, "x-remora-proxy-error").is_some());
}
