//! Every protocol through the accelerated Remora pair (issue 14, tests): HTTP/1.1, HTTP/2
//! with prior knowledge, gRPC (`grpc.health.v1.Health/Check`, tonic on both ends), a
//! WebSocket upgrade with bytes both ways, and a server-first protocol (the server greets,
//! then echoes a line; opaque on both proxies). Then the agent's counters show that the
//! app↔proxy hops of those connections were redirected (otherwise the test would prove
//! nothing about the accelerator).
//!
//! The peers are this test binary re-executed in the pods (`mesh::netns::reexec`): with
//! `REMORA_ACCEL_PROTO_PEER` set, the test plays the server (until its guard kills it) or
//! the client (which asserts on every answer and exits non-zero on the first wrong one).

mod common;

use std::{net::SocketAddr, time::Duration};

use common::{
    mesh::{
        get, h1, h2, http_echo_on,
        netns::{SERVER_IP, reexec},
        request, tcp_server,
    },
    pair::pair,
};
use http::{StatusCode, Version};
use http_body_util::BodyExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::transport::{Channel, Server, server::TcpIncoming};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const PEER: &str = "REMORA_ACCEL_PROTO_PEER";
const TEST: &str = "http1_http2_grpc_websocket_and_server_first_cross_the_accelerated_pair";
/// The server pod's ports (declared in `common::pair`): HTTP echo (HTTP/1.1, HTTP/2,
/// upgrades), gRPC, and the greeter (opaque).
const HTTP: u16 = 8081;
const GRPC: u16 = 50051;
const GREETER: u16 = 2525;
const DONE: &str = "protocols client: every check passed";
const LISTENING: &str = "protocols server: listening";

#[test]
fn http1_http2_grpc_websocket_and_server_first_cross_the_accelerated_pair() {
    match std::env::var(PEER).as_deref() {
        Ok("server") => return runtime().block_on(serve()),
        Ok("client") => return runtime().block_on(client()),
        Ok(other) => panic!("{PEER}={other}: expected server or client"),
        Err(_) => {}
    }
    let mut p = pair("pp", true);
    p.pods.spawn_until(
        true,
        "protocols-server",
        &reexec(PEER, "server", TEST),
        LISTENING,
    );
    let before = p.accelerated();
    let args = reexec(PEER, "client", TEST);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = p.pods.client.cmd(&args).output().expect("run the client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains(DONE),
        "the client peer failed:\n{text}\n--- server ---\n{}\n{}",
        p.pods.log("protocols-server"),
        p.logs()
    );
    // One connection each: HTTP/1.1, HTTP/2, WebSocket, gRPC, greeter.
    p.accelerated().assert_since(&before, 5, || p.logs());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn addr(port: u16) -> SocketAddr {
    format!("{SERVER_IP}:{port}").parse().expect("addr")
}

async fn serve() {
    http_echo_on(([0, 0, 0, 0], HTTP).into()).await;
    tcp_server(([0, 0, 0, 0], GREETER).into(), |mut s| async move {
        let _ = s.write_all(b"220 greeter ESMTP\r\n").await;
        let mut buf = [0u8; 1024];
        if let Ok(n) = s.read(&mut buf).await {
            let _ = s.write_all(&buf[..n]).await;
        }
    })
    .await;
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = TcpIncoming::bind(([0, 0, 0, 0], GRPC).into()).expect("bind the gRPC port");
    println!("{LISTENING}");
    Server::builder()
        .add_service(health)
        .serve_with_incoming(incoming)
        .await
        .expect("gRPC server");
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer in 20 s"))
}

async fn client() {
    within("HTTP/1.1", http1()).await;
    within("HTTP/2", http2()).await;
    within("WebSocket", websocket()).await;
    within("gRPC", grpc()).await;
    within("server first", server_first()).await;
    println!("{DONE}");
}

async fn http1() {
    let mut send = h1(addr(HTTP)).await;
    let body = vec![b'a'; 300_000];
    for _ in 0..3 {
        send.ready().await.expect("the connection is ready again");
        let resp = send
            .send_request(request("POST", "/h1", body.clone()))
            .await
            .expect("HTTP/1.1 response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["echo-version"], "HTTP/1.1");
        let back = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(back.len(), body.len(), "the POST body came back whole");
        assert!(back.iter().all(|&b| b == b'a'));
    }
    println!("protocols client: HTTP/1.1 ok");
}

async fn http2() {
    let mut send = h2(addr(HTTP)).await;
    let mut streams = Vec::new();
    for i in 0..8 {
        // HTTP/2 requests carry :scheme and :authority.
        let mut req = get(&format!("http://{SERVER_IP}:{HTTP}/h2/{i}"));
        *req.version_mut() = Version::HTTP_2;
        streams.push(send.send_request(req));
    }
    for (i, s) in streams.into_iter().enumerate() {
        let resp = s.await.expect("HTTP/2 response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["echo-version"], "HTTP/2.0");
        assert_eq!(resp.headers()["echo-path"], format!("/h2/{i}").as_str());
    }
    println!("protocols client: HTTP/2 ok");
}

async fn websocket() {
    let mut s = TcpStream::connect(addr(HTTP)).await.expect("connect");
    s.write_all(
        format!(
            "GET /chat HTTP/1.1\r\nHost: svc{HTTP}.shop\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write the upgrade");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.expect("read the head");
        assert!(n == 1, "closed after {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for (i, size) in [5usize, 70_000, 1].into_iter().enumerate() {
        let msg: Vec<u8> = (0..size).map(|j| (j * 7 + i) as u8).collect();
        s.write_all(&msg).await.expect("write");
        let mut back = vec![0u8; size];
        s.read_exact(&mut back).await.expect("read the echo");
        assert_eq!(back, msg, "message {i} came back intact");
    }
    println!("protocols client: WebSocket ok");
}

async fn grpc() {
    let channel = Channel::from_shared(format!("http://{SERVER_IP}:{GRPC}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect through the client proxy");
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Check(\"\")");
    assert_eq!(
        resp.metadata()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()),
        Some("0"),
        "the grpc-status trailer arrived: {:?}",
        resp.metadata()
    );
    assert_eq!(resp.into_inner().status(), ServingStatus::Serving);
    println!("protocols client: gRPC ok");
}

async fn server_first() {
    let mut s = TcpStream::connect(addr(GREETER)).await.expect("connect");
    let mut greeting = [0u8; 19];
    s.read_exact(&mut greeting).await.expect("the greeting");
    assert_eq!(&greeting, b"220 greeter ESMTP\r\n");
    s.write_all(b"EHLO client\r\n").await.expect("write");
    let mut echo = [0u8; 13];
    s.read_exact(&mut echo).await.expect("the echo");
    assert_eq!(&echo, b"EHLO client\r\n");
    println!("protocols client: server first ok");
}
