//! HTTP/2 floods against a real proxy process (see `common::attack`) on its inbound port,
//! as a client outside the mesh reaches a pod in permissive mode (h2c with prior
//! knowledge; mesh peers reach the same HTTP/2 server through mTLS). The attacker writes
//! raw frames (`common::attack::h2raw`). Each attack must end with the connection closed
//! or its streams limited, with flat memory, while another client keeps being served:
//! its latency during the attack is printed, and bounded generously.

mod common;

use std::{
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use common::attack::{
    Knobs, Latencies, ProxyProc,
    h2raw::{
        self, CANCEL, CONTINUATION, END_HEADERS, HEADERS, RawH2, SETTINGS_INITIAL_WINDOW_SIZE,
    },
    probe_latency, stop_probe, upstreams,
};
use tokio::io::AsyncWriteExt;

/// Another client's worst latency while an attack runs; generous, as the machine is
/// shared: the point is that it is served, not how fast.
const RESPONSIVE: Duration = Duration::from_secs(2);

/// How long an attacker keeps going before the test calls the proxy's reaction missing.
const GIVE_UP: Duration = Duration::from_secs(20);

/// RSS a proxy may keep after an attack ended (allocator caches, not the attack).
const RSS_SLACK_KIB: u64 = 16 * 1024;

fn responsive(l: &Latencies) {
    assert!(
        l.max() < RESPONSIVE,
        "another client waited: {}",
        l.summary()
    );
}

/// Waits until the server has said GOAWAY or closed the attacked connection.
async fn until_ended(c: &RawH2, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while !c.ended() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.ended()
}

/// How long an attacker that reconnects after each GOAWAY keeps at it: long enough for
/// the other client's latency to be measured during the attack.
const REPEAT_FOR: Duration = Duration::from_secs(3);

/// Rapid reset on one new connection: HEADERS then RST_STREAM(CANCEL) for each new
/// stream, 100 streams per write, until the proxy ends the connection (or `GIVE_UP`).
/// Returns the streams opened and whether (and with what GOAWAY code) it ended.
async fn rapid_reset(addr: std::net::SocketAddr) -> (u32, bool, Option<u32>) {
    let mut c = RawH2::connect(addr, &[]).await;
    let started = Instant::now();
    let mut sent = 0u32;
    while sent < 100_000 && !c.ended() && started.elapsed() < GIVE_UP {
        let mut batch = Vec::new();
        for _ in 0..100 {
            let id = 2 * sent + 1;
            batch.extend(h2raw::get(id, "/hold"));
            batch.extend(h2raw::rst_stream(id, CANCEL));
            sent += 1;
        }
        if c.w.write_all(&batch).await.is_err() {
            break;
        }
    }
    let ended = until_ended(&c, Duration::from_secs(5)).await;
    (sent, ended, c.tally().goaway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway() {
    common::attack::serve_if_child().await;
    let (up, held) = upstreams::holding(Duration::from_secs(5)).await;
    let p = ProxyProc::alone("rapid_reset_gets_goaway", up, Knobs::default());
    let rss0 = p.rss_kib();
    let probe = probe_latency(p.inbound, "/probe", Duration::from_millis(50));
    let started = Instant::now();
    // The attacker reconnects after each GOAWAY, for a while.
    let mut per_conn = Vec::new();
    while started.elapsed() < REPEAT_FOR {
        let (sent, ended, goaway) = rapid_reset(p.inbound).await;
        assert!(
            ended,
            "the proxy kept accepting reset streams ({sent} sent)"
        );
        assert_eq!(goaway, Some(11), "GOAWAY ENHANCE_YOUR_CALM");
        per_conn.push(sent);
    }
    let latencies = stop_probe(probe).await;
    let rss1 = p.rss_kib();
    println!(
        "rapid reset: {} connections in {:?}, each ended by GOAWAY ENHANCE_YOUR_CALM after {}..{} streams \
         opened and reset; requests that reached the upstream: {}; RSS {rss0} → {rss1} KiB; other client: {}",
        per_conn.len(),
        started.elapsed(),
        per_conn.iter().min().copied().unwrap_or_default(),
        per_conn.iter().max().copied().unwrap_or_default(),
        held.total.load(Relaxed),
        latencies.summary()
    );
    assert!(
        rss1 <= rss0 + RSS_SLACK_KIB,
        "memory grew: {rss0} → {rss1} KiB"
    );
    responsive(&latencies);
}

/// A header block that never ends on one new connection: HEADERS without END_HEADERS,
/// then CONTINUATIONs carrying `filler` bytes of one more field each (0: empty frames),
/// until the proxy ends the connection. Returns the bytes sent and the GOAWAY code.
async fn continuation_flood(addr: std::net::SocketAddr, filler: usize) -> (usize, Option<u32>) {
    let mut c = RawH2::connect(addr, &[]).await;
    let started = Instant::now();
    let mut block = Vec::new();
    if filler > 0 {
        h2raw::literal(&mut block, "x-flood", &vec![b'a'; filler]);
    }
    let mut bytes = 0usize;
    let head = h2raw::frame(HEADERS, 0, 1, &h2raw::get_block("/flood", &[]));
    let mut ok = c.w.write_all(&head).await.is_ok();
    while ok && !c.ended() && started.elapsed() < GIVE_UP {
        let mut batch = Vec::new();
        for _ in 0..64 {
            batch.extend(h2raw::frame(CONTINUATION, 0, 1, &block));
        }
        bytes += batch.len();
        ok = c.w.write_all(&batch).await.is_ok();
    }
    let ended = until_ended(&c, Duration::from_secs(5)).await;
    assert!(
        ended,
        "a {filler}-byte CONTINUATION flood went on: {:?}",
        c.tally()
    );
    (bytes, c.tally().goaway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off() {
    common::attack::serve_if_child().await;
    let (up, held) = upstreams::holding(Duration::from_millis(1)).await;
    let p = ProxyProc::alone("continuation_flood_is_cut_off", up, Knobs::default());
    let rss0 = p.rss_kib();
    let probe = probe_latency(p.inbound, "/probe", Duration::from_millis(50));
    let mut report = Vec::new();
    for filler in [1000usize, 0] {
        let started = Instant::now();
        let mut sent = Vec::new();
        while started.elapsed() < REPEAT_FOR / 2 {
            let (bytes, goaway) = continuation_flood(p.inbound, filler).await;
            assert_eq!(goaway, Some(11), "GOAWAY ENHANCE_YOUR_CALM");
            sent.push(bytes >> 10);
        }
        report.push(format!(
            "{filler}-byte CONTINUATIONs: {} connections, each ended by GOAWAY ENHANCE_YOUR_CALM after {}..{} KiB",
            sent.len(),
            sent.iter().min().copied().unwrap_or_default(),
            sent.iter().max().copied().unwrap_or_default(),
        ));
    }
    let latencies = stop_probe(probe).await;
    let rss1 = p.rss_kib();
    println!(
        "CONTINUATION flood: {}; RSS {rss0} → {rss1} KiB; requests that reached the upstream: {}; other client: {}",
        report.join("; "),
        held.total.load(Relaxed),
        latencies.summary()
    );
    assert!(
        rss1 <= rss0 + RSS_SLACK_KIB,
        "memory grew: {rss0} → {rss1} KiB"
    );
    responsive(&latencies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_flood_is_bounded() {
    common::attack::serve_if_child().await;
    let (up, _held) = upstreams::holding(Duration::from_millis(1)).await;
    let stall = Duration::from_secs(2);
    let knobs = Knobs {
        write_stall_timeout: Some(stall),
        ..Knobs::default()
    };
    let p = ProxyProc::alone("settings_flood_is_bounded", up, knobs);
    let rss0 = p.rss_kib();
    let probe = probe_latency(p.inbound, "/probe", Duration::from_millis(50));
    let frame = h2raw::settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, 65_535)]);
    let batch: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 1000)
        .collect();
    // An attacker that reads the ACKs: the proxy answers each, and serves others meanwhile.
    let mut reading = RawH2::connect(p.inbound, &[]).await;
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(3) && !reading.ended() {
        if reading.w.write_all(&batch).await.is_err() {
            break;
        }
        sent += 1000;
    }
    let acked = reading.tally().settings;
    // An attacker that never reads them: the ACKs back up, the proxy stops reading, and
    // the write stall timeout closes the connection.
    let (mut unread, _r) = RawH2::connect_unread(p.inbound, &[]).await;
    let started = Instant::now();
    let mut unread_sent = 0u64;
    let mut closed = None;
    while started.elapsed() < GIVE_UP {
        match tokio::time::timeout(Duration::from_secs(1), unread.w.write_all(&batch)).await {
            Ok(Ok(())) => unread_sent += 1000,
            Ok(Err(_)) => {
                closed = Some(started.elapsed());
                break;
            }
            Err(_) => {} // the proxy stopped reading: wait for its stall timeout
        }
    }
    let latencies = stop_probe(probe).await;
    let rss1 = p.rss_kib();
    println!(
        "SETTINGS flood: reading attacker sent {sent} frames in 3 s, {acked} acknowledged; \
         non-reading attacker sent {unread_sent} frames before the proxy stopped reading, closed after {closed:?} \
         (write stall timeout {stall:?}); RSS {rss0} → {rss1} KiB; other client: {}",
        latencies.summary()
    );
    assert!(
        closed.is_some(),
        "the non-reading attacker's connection stayed open"
    );
    assert!(
        rss1 <= rss0 + RSS_SLACK_KIB,
        "memory grew: {rss0} → {rss1} KiB"
    );
    responsive(&latencies);
    drop(reading);
}

/// Up to 10,000 streams opened at once on one new connection (500 HEADERS per write),
/// ignoring the proxy's SETTINGS_MAX_CONCURRENT_STREAMS. Returns the streams opened, the
/// streams the proxy refused (RST_STREAM) and its GOAWAY code once it ended the connection.
async fn ten_thousand_streams(addr: std::net::SocketAddr) -> (u32, u64, Option<u32>) {
    let mut c = RawH2::connect(addr, &[]).await;
    let mut sent = 0u32;
    while sent < 10_000 && !c.ended() {
        let mut batch = Vec::new();
        for _ in 0..500 {
            batch.extend(h2raw::get(2 * sent + 1, "/hold"));
            sent += 1;
        }
        if c.w.write_all(&batch).await.is_err() {
            break;
        }
    }
    let ended = until_ended(&c, Duration::from_secs(5)).await;
    let t = c.tally();
    assert!(
        ended,
        "streams over the limit did not end the connection: {t:?}"
    );
    (sent, t.rst_streams, t.goaway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_streams_on_one_connection_are_limited() {
    common::attack::serve_if_child().await;
    let (up, held) = upstreams::holding(Duration::from_secs(3)).await;
    let p = ProxyProc::alone(
        "ten_thousand_streams_on_one_connection_are_limited",
        up,
        Knobs::default(),
    );
    let limits = remora_proxy::http::HttpLimits::default();
    let rss0 = p.rss_kib();
    let probe = probe_latency(p.inbound, "/probe", Duration::from_millis(50));
    let started = Instant::now();
    let mut runs = Vec::new();
    while started.elapsed() < REPEAT_FOR {
        let (sent, refused, goaway) = ten_thousand_streams(p.inbound).await;
        assert_eq!(goaway, Some(11), "GOAWAY ENHANCE_YOUR_CALM");
        assert!(
            refused <= limits.h2_max_local_error_reset_streams as u64 + 1,
            "refusals are bounded before GOAWAY: {refused}"
        );
        runs.push((sent, refused));
    }
    let latencies = stop_probe(probe).await;
    let rss1 = p.rss_kib();
    println!(
        "10,000 streams at once on a connection: {} connections in {:?}; each: {:?} (streams opened, refused \
         with RST_STREAM) then GOAWAY ENHANCE_YOUR_CALM; the upstream held at most {} at once ({} in all; \
         limit {} streams, {} refusals); RSS {rss0} → {rss1} KiB; other client: {}",
        runs.len(),
        started.elapsed(),
        runs.first().copied().unwrap_or_default(),
        held.max_in_flight.load(Relaxed),
        held.total.load(Relaxed),
        limits.h2_max_concurrent_streams,
        limits.h2_max_local_error_reset_streams,
        latencies.summary()
    );
    assert!(
        held.max_in_flight.load(Relaxed) <= u64::from(limits.h2_max_concurrent_streams),
        "more streams than the limit reached the upstream"
    );
    assert!(
        rss1 <= rss0 + RSS_SLACK_KIB,
        "memory grew: {rss0} → {rss1} KiB"
    );
    responsive(&latencies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_update_stall_holds_bounded_memory() {
    common::attack::serve_if_child().await;
    let (up, sent) = upstreams::endless().await;
    let p = ProxyProc::alone(
        "window_update_stall_holds_bounded_memory",
        up,
        Knobs::default(),
    );
    let rss0 = p.rss_kib();
    // A stream window of zero, never opened: the proxy may send headers, never data.
    let mut c = RawH2::connect(p.inbound, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)]).await;
    let streams = 100u32;
    let mut batch = Vec::new();
    for i in 0..streams {
        batch.extend(h2raw::frame(
            HEADERS,
            h2raw::END_STREAM | END_HEADERS,
            2 * i + 1,
            &h2raw::get_block("/endless", &[]),
        ));
    }
    c.w.write_all(&batch).await.expect("requests");
    let probe = probe_latency(p.inbound, "/probe", Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss1, up1) = (p.rss_kib(), sent.bytes.load(Relaxed));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss2, up2) = (p.rss_kib(), sent.bytes.load(Relaxed));
    let latencies = stop_probe(probe).await;
    let t = c.tally();
    println!(
        "window-update stall, {streams} streams: {} response heads, {} data bytes sent to the attacker; \
         the upstream sent {} KiB by 2 s and {} KiB by 5 s (then nothing more: backpressure); \
         RSS {rss0} → {rss1} → {rss2} KiB ({} KiB per stalled stream); other client: {}",
        t.headers,
        t.data_bytes,
        up1 >> 10,
        up2 >> 10,
        rss2.saturating_sub(rss0) / u64::from(streams),
        latencies.summary()
    );
    assert_eq!(t.data_bytes, 0, "the proxy respected the closed window");
    assert!(
        up2 - up1 <= 64 * 1024 * u64::from(streams),
        "the upstream kept streaming into the proxy: {up1} → {up2}"
    );
    assert!(
        rss2 <= rss1 + RSS_SLACK_KIB,
        "memory grew while stalled: {rss1} → {rss2} KiB"
    );
    responsive(&latencies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_open_http2_stream_is_bounded() {
    common::attack::serve_if_child().await;
    let (up, held) = upstreams::holding(Duration::from_secs(6)).await;
    let p = ProxyProc::alone(
        "memory_per_open_http2_stream_is_bounded",
        up,
        Knobs::default(),
    );
    let limit = remora_proxy::http::HttpLimits::default().h2_max_concurrent_streams;
    // A warm-up stream, so that what follows measures streams, not first-use setup.
    let mut warm = RawH2::connect(p.inbound, &[]).await;
    warm.w
        .write_all(&h2raw::get(1, "/probe"))
        .await
        .expect("warm-up");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = p.rss_kib();
    // Ten clients, each with as many streams open as the proxy allows, all held upstream.
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut c = RawH2::connect(p.inbound, &[]).await;
        let mut batch = Vec::new();
        for i in 0..limit {
            batch.extend(h2raw::get(2 * i + 1, "/hold"));
        }
        c.w.write_all(&batch).await.expect("requests");
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = p.rss_kib();
    let streams = 10 * u64::from(limit);
    let per_stream = rss1.saturating_sub(rss0) * 1024 / streams;
    let refused: u64 = clients.iter().map(|c| c.tally().rst_streams).sum();
    println!(
        "{streams} HTTP/2 streams open ({limit} on each of 10 connections), held by the app: RSS {rss0} → {rss1} KiB, \
         {per_stream} bytes per open stream; {} in flight at the app (its own stream limit), {refused} refused",
        held.in_flight.load(Relaxed)
    );
    assert_eq!(refused, 0, "streams within the limit are all accepted");
    assert!(
        per_stream <= 64 * 1024,
        "an open stream costs {per_stream} bytes, over the 64 KiB bound"
    );
}
