//! Test harness: an in-process proxy on loopback ports, echo backends (HTTP/1.1 and
//! HTTP/2 on one port, and raw TCP), and small clients.
#![allow(dead_code)]

pub mod attack;
pub mod backends;
pub mod netns;
pub mod pki;

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use remora_crds::proxy::ProxyConfig;
use remora_proxy::{Proxy, Settings, listen::OrigDstMode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

pub type Body = BoxBody<Bytes, hyper::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Loopback-only settings with ephemeral ports; every connection goes to `target`.
pub fn settings(target: SocketAddr) -> Settings {
    Settings {
        outbound_listen: vec!["127.0.0.1:0".parse().expect("addr")],
        inbound_listen: vec!["127.0.0.1:0".parse().expect("addr")],
        admin_listen: Some("127.0.0.1:0".parse().expect("addr")),
        orig_dst: OrigDstMode::Fixed(target),
        detect_timeout: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(5),
        ..Settings::default()
    }
}

pub async fn start(settings: Settings, yaml: &str) -> Proxy {
    let config = ProxyConfig::from_yaml(yaml).expect("test config is valid");
    Proxy::start(settings, config, None)
        .await
        .expect("proxy starts")
}

/// An HTTP echo server (HTTP/1.1 and HTTP/2 prior knowledge):
/// - every request header comes back as `echo-<name>`, plus `echo-method`, `echo-path`,
///   `echo-version`;
/// - the request body is streamed back as the response body;
/// - `/trailers` adds `grpc-status: 0` trailers; `/slow/<ms>` waits before answering;
///   `/status/<code>` answers that code; an `Upgrade` request is switched and echoed.
pub async fn http_echo() -> SocketAddr {
    http_echo_on("127.0.0.1:0".parse().expect("addr")).await
}

/// [`http_echo`] on `bind` (in a network namespace: `0.0.0.0:<port>`).
pub async fn http_echo_on(bind: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(bind).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req| async move {
                    let mut resp = echo(req).await?;
                    resp.headers_mut().insert(
                        "echo-server",
                        HeaderValue::try_from(addr.to_string()).expect("value"),
                    );
                    Ok::<_, Infallible>(resp)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn echo(mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let mut headers = http::HeaderMap::new();
    for (k, v) in req.headers() {
        if let Ok(name) = HeaderName::try_from(format!("echo-{k}")) {
            headers.append(name, v.clone());
        }
    }
    let put = |h: &mut http::HeaderMap, k: &'static str, v: String| {
        h.insert(k, HeaderValue::try_from(v).expect("value"));
    };
    put(&mut headers, "echo-method", req.method().to_string());
    put(&mut headers, "echo-path", req.uri().path().to_owned());
    if let Some(a) = req.uri().authority() {
        put(&mut headers, "echo-authority", a.to_string());
    }
    put(&mut headers, "echo-version", format!("{:?}", req.version()));
    let path = req.uri().path().to_owned();
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    if req.headers().contains_key(http::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert("connection", HeaderValue::from_static("upgrade"));
        resp.headers_mut()
            .insert("upgrade", req.headers()["upgrade"].clone());
        return Ok(resp);
    }
    let status = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    let body = req.into_body();
    if path == "/grpc.health.v1.Health/Check" {
        // HealthCheckResponse { status: SERVING }, then grpc-status 0.
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let msg = full(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x01]));
        let mut resp = Response::new(msg.with_trailers(async move { Some(Ok(trailers)) }).boxed());
        resp.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        return Ok(resp);
    }
    let body: Body = if path == "/trailers" {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static("ok"));
        body.with_trailers(async move { Some(Ok(trailers)) })
            .boxed()
    } else {
        body.boxed()
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// A TCP echo server: every byte read is written back; the peer's half-close is answered
/// with one (after everything is echoed).
pub async fn tcp_echo() -> SocketAddr {
    tcp_echo_on("127.0.0.1:0".parse().expect("addr")).await
}

/// [`tcp_echo`] on `bind`.
pub async fn tcp_echo_on(bind: SocketAddr) -> SocketAddr {
    tcp_server(bind, |mut s| async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = s.shutdown().await;
                    return;
                }
                Ok(n) => {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await
}

/// A TCP server on `bind` that runs `conn` on each accepted connection, in a task of its
/// own; its address.
pub async fn tcp_server<F, Fut>(bind: SocketAddr, conn: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(bind).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(conn(s));
        }
    });
    addr
}

/// A server that speaks first (like SMTP or MySQL): greets, then echoes one line.
pub async fn greeting_server(greeting: &'static [u8]) -> SocketAddr {
    tcp_server(loopback(), move |mut s| async move {
        let _ = s.write_all(greeting).await;
        let mut buf = [0u8; 1024];
        if let Ok(n) = s.read(&mut buf).await {
            let _ = s.write_all(&buf[..n]).await;
        }
    })
    .await
}

/// Any free port on 127.0.0.1.
pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// An HTTP/1.1 connection to `addr`.
pub async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn.with_upgrades());
    send
}

/// An HTTP/2 (prior knowledge) connection to `addr`.
pub async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// Sends raw bytes and reads everything until the peer closes (or 5 s pass).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

/// A plain GET over an admin HTTP connection; returns status and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    admin_request(addr, "GET", path, "").await
}

pub async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &'static str,
) -> (StatusCode, String) {
    let mut send = h1(addr).await;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .body(full(body))
        .expect("request");
    let resp = send.send_request(req).await.expect("admin response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

pub fn get(path: &str) -> Request<Body> {
    request("GET", path, Bytes::new())
}

/// A `method` request for `path` on host `app.test` with `body`.
pub fn request(method: &str, path: &str, body: impl Into<Bytes>) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "app.test")
        .body(full(body))
        .expect("request")
}
