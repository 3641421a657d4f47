//! Long and large streams through the real proxy pair (each proxy its own process, see
//! `common::attack`): a huge chunked body streams with flat memory, and a WebSocket that
//! never closes and a half-closed TCP stream are held without the proxies spinning (their
//! CPU time, from `/proc/<pid>/stat`, stays flat while the streams sit idle).

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::attack::{Knobs, Pair, peak_rss, upstreams};
use http::Request;
use http_body_util::BodyExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The body streamed by the size test: the 10 GiB. Through the pair on this
/// 2-core machine (client, both proxies with mTLS between them, and the upstream sharing
/// the cores) it took 25 s, about 400 MiB/s.
const BODY_BYTES: u64 = 10 << 30;

/// CPU time (clock ticks, 10 ms each on Linux) a proxy may use while its streams idle for
/// [`IDLE_FOR`]: a spinning task would use all of it (300 ticks).
const IDLE_TICKS: u64 = 20;
const IDLE_FOR: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_chunked_body_streams_through_with_flat_memory() {
    common::attack::serve_if_child().await;
    let (up, counted) = upstreams::counting().await;
    let pair = Pair::start(
        "a_huge_chunked_body_streams_through_with_flat_memory",
        up,
        Knobs::default(),
        "http",
    );
    let (a0, b0) = pair.rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = peak_rss(vec![pair.a.pid, pair.b.pid], stop.clone());
    let mut send = common::h1(pair.a.outbound).await;
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(4);
    let req = Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "app.test")
        .body(body.boxed())
        .expect("request");
    let started = Instant::now();
    let response = tokio::spawn(async move { send.send_request(req).await });
    // One 1 MiB chunk, sent again and again (cloning `Bytes` copies nothing).
    let chunk = Bytes::from(vec![b'z'; 1 << 20]);
    let mut sent = 0u64;
    while sent < BODY_BYTES {
        tx.send_data(chunk.clone())
            .await
            .expect("the proxy takes the body");
        sent += chunk.len() as u64;
    }
    drop(tx);
    let resp = response.await.expect("join").expect("response");
    let took = started.elapsed();
    stop.store(true, Relaxed);
    let peak = sampler.join().expect("sampler");
    let (a1, b1) = pair.rss_kib();
    let at_upstream: u64 = resp
        .headers()
        .get("x-body-bytes")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("x-body-bytes");
    println!(
        "{} MiB chunked through client → A → B → upstream in {took:?} ({:.0} MiB/s); \
         the upstream counted {} MiB; RSS A {a0} → peak {} → {a1} KiB, B {b0} → peak {} → {b1} KiB",
        sent >> 20,
        (sent >> 20) as f64 / took.as_secs_f64(),
        at_upstream >> 20,
        peak[0],
        peak[1]
    );
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert_eq!(at_upstream, sent, "every byte reached the upstream");
    assert_eq!(counted.load(Relaxed), sent);
    // Flat: a few buffers in flight, not a share of the body (1 GiB would be 1,048,576).
    for (who, before, peak) in [("A", a0, peak[0]), ("B", b0, peak[1])] {
        assert!(
            peak <= before + 32 * 1024,
            "{who}'s memory followed the body: {before} → {peak} KiB"
        );
    }
}

/// The CPU ticks `pair`'s proxies use over [`IDLE_FOR`].
async fn idle_ticks(pair: &Pair) -> (u64, u64) {
    let (a0, b0) = (pair.a.cpu_ticks(), pair.b.cpu_ticks());
    tokio::time::sleep(IDLE_FOR).await;
    (pair.a.cpu_ticks() - a0, pair.b.cpu_ticks() - b0)
}

async fn read_exact_text(s: &mut TcpStream, n: usize) -> String {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_that_never_close_are_held_without_spinning() {
    common::attack::serve_if_child().await;
    let echo = common::http_echo().await;
    let pair = Pair::start(
        "websockets_that_never_close_are_held_without_spinning",
        echo,
        Knobs::default(),
        "http",
    );
    let mut sockets = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(pair.a.outbound).await.expect("connect");
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("upgrade request");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.expect("response head");
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        s.write_all(b"ping").await.expect("write");
        assert_eq!(read_exact_text(&mut s, 4).await, "ping");
        sockets.push(s);
    }
    let (a, b) = idle_ticks(&pair).await;
    for s in &mut sockets {
        s.write_all(b"again").await.expect("still open");
        assert_eq!(read_exact_text(s, 5).await, "again");
    }
    println!(
        "50 idle WebSockets through client → A → B → app for {IDLE_FOR:?}: CPU A {a} ticks, B {b} ticks \
         (of {} available); all still echo afterwards",
        IDLE_FOR.as_millis() / 10
    );
    assert!(
        a <= IDLE_TICKS && b <= IDLE_TICKS,
        "a proxy spun: A {a}, B {b} ticks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_tcp_streams_are_held_without_spinning() {
    common::attack::serve_if_child().await;
    let (release, released) = tokio::sync::watch::channel(false);
    // A server that answers only after the client has half-closed, and only when told.
    let server = common::tcp_server(common::loopback(), move |mut s| {
        let mut released = released.clone();
        async move {
            let mut got = Vec::new();
            if s.read_to_end(&mut got).await.is_err() {
                return;
            }
            let _ = released.wait_for(|r| *r).await;
            let _ = s.write_all(&got).await;
            let _ = s.write_all(b" late").await;
        }
    })
    .await;
    let pair = Pair::start(
        "half_closed_tcp_streams_are_held_without_spinning",
        server,
        Knobs::default(),
        "opaque",
    );
    let mut streams = Vec::new();
    for i in 0..50 {
        let mut s = TcpStream::connect(pair.a.outbound).await.expect("connect");
        s.write_all(format!("hello {i:02}").as_bytes())
            .await
            .expect("write");
        s.shutdown().await.expect("half-close");
        streams.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a, b) = idle_ticks(&pair).await;
    release.send(true).expect("release");
    for (i, s) in streams.iter_mut().enumerate() {
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(String::from_utf8_lossy(&back), format!("hello {i:02} late"));
    }
    println!(
        "50 half-closed TCP streams through client → A → B → server for {IDLE_FOR:?}: CPU A {a} ticks, \
         B {b} ticks (of {} available); each got its answer after the half-close",
        IDLE_FOR.as_millis() / 10
    );
    assert!(
        a <= IDLE_TICKS && b <= IDLE_TICKS,
        "a proxy spun: A {a}, B {b} ticks"
    );
}
