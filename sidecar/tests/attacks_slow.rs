//! Slow clients against the real proxy pair (each proxy its own process, see
//! `common::attack`): a slowloris head, a request body that stops, and a client that never
//! reads its response. Each is cut off by its timeout (shortened here; the defaults are in
//! DESIGN.md), the proxies' resident memory (`/proc/<pid>/status`) does not grow with the
//! attack, and another client is served meanwhile.

mod common;

use std::{
    net::SocketAddr,
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use common::attack::{
    Knobs, Pair, metric, probe_latency,
    raw_http::{Recorder, statuses},
    stop_probe, upstreams,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// RSS growth a proxy may show after an attack ended: allocator caches, not the attack.
const RSS_SLACK_KIB: u64 = 8 * 1024;

/// Writes `head`, then one byte of `drip` every `every`, until the proxy answers or
/// closes; returns how long that took and the statuses it answered with.
async fn drip(
    addr: SocketAddr,
    head: Vec<u8>,
    every: Duration,
    give_up: Duration,
) -> (Duration, Vec<u16>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&head).await.expect("head");
    // From the head on: a burst of connects may wait for a SYN retransmission first.
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        assert!(
            started.elapsed() < give_up,
            "not cut off within {give_up:?}"
        );
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return (started.elapsed(), statuses(&got)),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if !statuses(&got).is_empty() {
                        return (started.elapsed(), statuses(&got));
                    }
                }
            },
            _ = tick.tick() => {
                if s.write_all(b"a").await.is_err() {
                    return (started.elapsed(), statuses(&got));
                }
            }
        }
    }
}

/// The first and last of `ds`.
fn span(ds: &[Duration]) -> (Duration, Duration) {
    (
        ds.iter().min().copied().unwrap_or_default(),
        ds.iter().max().copied().unwrap_or_default(),
    )
}

/// A second wave of an attack must find the memory the first one left: RSS that grows
/// from wave to wave would be a leak; what the first wave leaves is the allocator's.
fn assert_flat(who: &str, after_first: u64, after_second: u64) {
    assert!(
        after_second <= after_first + RSS_SLACK_KIB,
        "{who}'s memory grew from one wave to the next: {after_first} → {after_second} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_heads_are_cut_off_by_the_header_read_timeout() {
    common::attack::serve_if_child().await;
    let up = Recorder::start().await;
    let timeout = Duration::from_secs(2);
    let knobs = Knobs {
        header_read_timeout: Some(timeout),
        ..Knobs::default()
    };
    let pair = Pair::start(
        "slowloris_heads_are_cut_off_by_the_header_read_timeout",
        up.addr,
        knobs,
        "http",
    );
    let mut rss = vec![pair.b.rss_kib()];
    let probe = probe_latency(pair.b.inbound, "/probe", Duration::from_millis(100));
    let mut cut = Vec::new();
    for _wave in 0..2 {
        // The request line arrives at once (so the connection is HTTP), then one header
        // byte a second: the timeout bounds the whole head, however steadily it trickles.
        let attackers: Vec<_> = (0..200)
            .map(|_| {
                let head = b"GET /slow HTTP/1.1\r\nHost: app.test\r\nX-Slow: ".to_vec();
                let every = Duration::from_secs(1);
                tokio::spawn(drip(pair.b.inbound, head, every, Duration::from_secs(30)))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        rss.push(pair.b.rss_kib());
        for a in attackers {
            cut.push(a.await.expect("attacker").0);
        }
        rss.push(pair.b.rss_kib());
    }
    let latencies = stop_probe(probe).await;
    let (min, max) = span(&cut);
    println!(
        "slowloris, 2 waves x 200 connections at B's inbound port, header read timeout {timeout:?}: \
         cut off after {min:?}..{max:?}; B RSS before / during / after wave 1 / during / after wave 2: \
         {rss:?} KiB; other client: {}",
        latencies.summary()
    );
    let counted = metric(
        pair.b.admin,
        r#"remora_proxy_http_cutoffs_total{direction="inbound",outcome="header_timeout"}"#,
    )
    .await;
    println!("B counted {counted} header timeouts");
    assert!(counted >= 400, "each cut-off is counted: {counted}");
    assert!(min >= timeout, "not before the timeout: {min:?}");
    assert!(
        max < timeout + Duration::from_secs(5),
        "cut off late: {max:?}"
    );
    assert_flat("B", rss[2], rss[4]);
    assert!(
        latencies.max() < Duration::from_secs(2),
        "{}",
        latencies.summary()
    );
    assert!(
        up.requests().iter().all(|r| r.path == "/probe"),
        "no slow request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stops_is_cut_off_with_408() {
    common::attack::serve_if_child().await;
    let up = Recorder::start().await;
    let idle = Duration::from_secs(1);
    let knobs = Knobs {
        body_idle_timeout: Some(idle),
        ..Knobs::default()
    };
    let pair = Pair::start(
        "a_request_body_that_stops_is_cut_off_with_408",
        up.addr,
        knobs,
        "http",
    );
    let mut rss = vec![pair.rss_kib()];
    let probe = probe_latency(pair.a.outbound, "/probe", Duration::from_millis(100));
    let mut lines = std::collections::BTreeMap::new();
    for _wave in 0..2 {
        // Ten body bytes at once, then one every 2.5 s: the first gap outlasts the
        // timeout. A small length is read whole by the proxy; a large one streams on.
        let mut attackers = Vec::new();
        for len in [100u64, 1_000_000] {
            for (entry, via) in [
                (pair.a.outbound, "client → A → B"),
                (pair.b.inbound, "client → B"),
            ] {
                for _ in 0..25 {
                    let head = format!(
                        "POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: {len}\r\n\r\n0123456789"
                    );
                    let every = Duration::from_millis(2500);
                    let task = tokio::spawn(drip(
                        entry,
                        head.into_bytes(),
                        every,
                        Duration::from_secs(30),
                    ));
                    attackers.push((len, via, task));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss.push(pair.rss_kib());
        for (len, via, task) in attackers {
            let (took, got) = task.await.expect("attacker");
            assert_eq!(
                got,
                vec![408],
                "Content-Length {len} via {via}, after {took:?}"
            );
            assert!(
                took >= idle && took < idle + Duration::from_secs(5),
                "Content-Length {len} via {via}: {took:?}"
            );
            lines.entry((len, via)).or_insert_with(Vec::new).push(took);
        }
        rss.push(pair.rss_kib());
    }
    let latencies = stop_probe(probe).await;
    for ((len, via), took) in &lines {
        let (min, max) = span(took);
        println!(
            "slow body (Content-Length {len}), 2 waves x 25 {via}: 408 after {min:?}..{max:?} (body idle timeout {idle:?})"
        );
    }
    println!(
        "RSS (A, B) before / during / after wave 1 / during / after wave 2: {rss:?} KiB; other client: {}",
        latencies.summary()
    );
    assert_flat("A", rss[2].0, rss[4].0);
    assert_flat("B", rss[2].1, rss[4].1);
    assert!(
        latencies.max() < Duration::from_secs(2),
        "{}",
        latencies.summary()
    );
    assert!(
        up.requests().iter().all(|r| r.path == "/probe"),
        "the upstream never completed a request whose body stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_by_the_write_stall_timeout() {
    common::attack::serve_if_child().await;
    let (endless, sent) = upstreams::endless().await;
    let stall = Duration::from_secs(2);
    let knobs = Knobs {
        write_stall_timeout: Some(stall),
        ..Knobs::default()
    };
    let pair = Pair::start(
        "a_client_that_never_reads_is_cut_off_by_the_write_stall_timeout",
        endless,
        knobs,
        "http",
    );
    let mut rss = vec![pair.rss_kib()];
    let mut cut = Vec::new();
    for wave in 1..=2 {
        let started = Instant::now();
        let mut clients = Vec::new();
        for entry in [pair.a.outbound, pair.b.inbound] {
            for _ in 0..10 {
                let mut s = TcpStream::connect(entry).await.expect("connect");
                s.write_all(b"GET /endless HTTP/1.1\r\nHost: app.test\r\n\r\n")
                    .await
                    .expect("request");
                clients.push(s); // never read
            }
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        rss.push(pair.rss_kib());
        let deadline = started + stall + Duration::from_secs(20);
        // The upstream's response streams end when the proxies let go of them.
        while sent.ended.lock().expect("ended").len() < 20 * wave {
            assert!(
                Instant::now() < deadline,
                "the upstream still streams to stalled clients"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ends = sent.ended.lock().expect("ended").clone();
        cut.extend(ends[20 * (wave - 1)..].iter().map(|t| *t - started));
        rss.push(pair.rss_kib());
        drop(clients);
    }
    let (first, last) = span(&cut);
    let bytes = sent.bytes.load(Relaxed);
    println!(
        "never-reading clients, 2 waves x 20 (10 via A, 10 at B): the upstream's streams stopped after \
         {first:?}..{last:?} (write stall timeout {stall:?}); it sent {} MiB per client (socket buffers); \
         RSS (A, B) before / during / after wave 1 / during / after wave 2: {rss:?} KiB",
        (bytes / 40) >> 20
    );
    // Each proxy counts the clients it cut off: A its 10 per wave, B its 10 direct ones
    // per wave and the connections from A that stalled behind them.
    let series = |direction: &str| {
        format!(
            r#"remora_proxy_http_cutoffs_total{{direction="{direction}",outcome="write_stall"}}"#
        )
    };
    let a_cut = metric(pair.a.admin, &series("outbound")).await;
    let b_cut = metric(pair.b.admin, &series("inbound")).await;
    println!("write stalls counted: A {a_cut}, B {b_cut}");
    assert!(
        a_cut >= 20 && b_cut >= 20,
        "each cut-off is counted: A {a_cut}, B {b_cut}"
    );
    assert!(
        first >= stall,
        "cut before the write stalled for the timeout: {first:?}"
    );
    assert!(
        bytes / 40 < 128 << 20,
        "bounded by buffers, not the response: {bytes}"
    );
    assert_flat("A", rss[2].0, rss[4].0);
    assert_flat("B", rss[2].1, rss[4].1);
}
