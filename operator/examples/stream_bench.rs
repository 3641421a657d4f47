//! The config stream end to end: a synthetic index of 1,000 Services × 10 endpoints (no
//! apiserver: watch events are fed to the index's own loop, `index::watch::drive`, with
//! its debounce), the operator's stream server on loopback (TLS 1.3, HTTP/2, mesh client
//! certificates), and 1,000 subscribed outbound streams (one per Service, spread over 10
//! connections) held by a child process, so the RSS measured is the operator side's
//! alone. Each round changes one endpoint of every Service at once (1,000 EndpointSlice
//! events, one burst) and times, per stream, the event for its Service entering the
//! index's loop (what a watch event does) to the line with the change arriving: debounce,
//! recomputation and fan-out; also the two parts (the version is the wall clock when its
//! recomputation starts). A second scenario puts every stream on one Service (a popular
//! destination) and changes only that one.
//!
//! `cargo run --release -p remora-operator --example stream_bench [services]
//! [endpoints-per-service] [streams] [connections] [rounds] [debounce-ms] [incremental|full]`
//! (defaults 1000 10 1000 10 5 10 incremental; `full` derives everything on every
//! recomputation, as the index did before it was incremental).
//! Targets: end-to-end p99 ≤ 100 ms, operator RSS ≤ 100 MB.

#[path = "../tests/support/stream_client.rs"]
mod stream_client;
#[path = "common/synthetic.rs"]
mod synthetic;

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use remora_operator::{
    ca::{
        CaMaterial, Issuer, TrustDomain,
        current::CurrentIssuer,
        root::ROOT_VALIDITY,
        tls::{ServingCert, TlsListener, server_config, serving_names},
    },
    index::{
        feed::{Kind, Obj, Update},
        model::{ObjKey, Snapshot},
        version::now_micros,
        watch::{IndexConfig, IndexHandle, channel, drive},
    },
    metrics::IndexMetrics,
    stream::{self, StreamState, metrics::StreamMetrics, peer::Peer},
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Deserialize;

fn arg(n: usize, default: u32) -> u32 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn unix_micros() -> u64 {
    now_micros()
}

/// Resident and peak memory of this process, from /proc/self/status (MiB).
fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// What the client process needs, passed as one JSON line on its stdin.
#[derive(serde::Serialize, Deserialize)]
struct ClientSetup {
    addr: SocketAddr,
    bundle: Vec<Vec<u8>>,
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
    targets: Vec<String>,
    connections: usize,
}

#[derive(Deserialize)]
struct Versioned {
    version: u64,
}

/// The client process: subscribes, prints `ready` once every stream has its first line,
/// then `<stream> <version> <unix µs>` per line received.
async fn clients() {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .expect("setup on stdin");
    let setup: ClientSetup = serde_json::from_str(&line).expect("setup JSON");
    let bundle: Vec<CertificateDer<'static>> =
        setup.bundle.into_iter().map(CertificateDer::from).collect();
    let cert = stream_client::ClientCert {
        chain: setup.chain.into_iter().map(CertificateDer::from).collect(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(setup.key)),
    };
    let mut conns = Vec::new();
    for _ in 0..setup.connections.max(1) {
        let options = stream_client::Options {
            cert: Some(cert.clone()),
            window: None,
        };
        conns.push(
            stream_client::connect(setup.addr, &bundle, options)
                .await
                .expect("connected"),
        );
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64, u64)>();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for (i, target) in setup.targets.iter().enumerate() {
        let mut conn = conns[i % conns.len()].clone();
        let path = format!("/v1/watch/outbound?target={target}");
        let (tx, ready_tx) = (tx.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let mut w = conn.get(&path).await.expect("subscribed");
            assert_eq!(w.status, hyper::StatusCode::OK);
            let mut first = true;
            while let Ok(Some(line)) = w.line().await {
                let at = unix_micros();
                let Ok(v) = serde_json::from_slice::<Versioned>(&line) else {
                    continue;
                };
                if first {
                    first = false;
                    let _ = ready_tx.send(());
                } else if tx.send((i, v.version, at)).is_err() {
                    return;
                }
            }
        });
    }
    drop((tx, ready_tx));
    for _ in 0..setup.targets.len() {
        ready_rx.recv().await.expect("every stream answers");
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").expect("stdout");
    out.flush().expect("stdout");
    drop(out);
    while let Some((i, version, at)) = rx.recv().await {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{i} {version} {at}")
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
    }
}

/// The synthetic cluster as watch events: a list of every kind.
fn listing(snap: Snapshot) -> Vec<Update> {
    let mut out = Vec::new();
    let mut list = |kind: Kind, objs: Vec<Obj>| {
        out.push(Update::RelistStart(kind));
        out.extend(objs.into_iter().map(Update::Upsert));
        out.push(Update::RelistDone(kind));
    };
    list(
        Kind::Namespace,
        vec![Obj::Namespace("bench".to_owned(), Default::default())],
    );
    list(
        Kind::Service,
        snap.services
            .into_iter()
            .map(|(k, s)| Obj::Service(k, s))
            .collect(),
    );
    list(
        Kind::EndpointSlice,
        snap.slices
            .into_iter()
            .map(|(k, s)| Obj::EndpointSlice(k, Some(s)))
            .collect(),
    );
    list(
        Kind::Pod,
        snap.pods.into_iter().map(|(k, p)| Obj::Pod(k, p)).collect(),
    );
    list(Kind::MeshPolicy, Vec::new());
    list(Kind::TrafficSplit, Vec::new());
    out
}

async fn operator() {
    let (services, per_service) = (arg(1, 1000), arg(2, 10));
    let (streams, connections, rounds) = (arg(3, 1000), arg(4, 10), arg(5, 5));
    let debounce = Duration::from_millis(u64::from(arg(6, 10)));
    let incremental = std::env::args().nth(7).as_deref() != Some("full");
    let (rss_start, _) = rss();

    // The index and its loop, fed watch events directly.
    let (writer, handle) = channel(IndexConfig {
        trust_domain: "cluster.local".to_owned(),
        quiet: debounce,
        max_delay: Duration::from_millis(250),
    });
    writer.set_incremental(incremental);
    let (events, mut events_rx) = tokio::sync::mpsc::unbounded_channel::<Update>();
    let index_metrics = IndexMetrics::new(&mut prometheus_client::registry::Registry::default());
    tokio::spawn(async move {
        let updates = futures::stream::poll_fn(move |cx| events_rx.poll_recv(cx));
        drive(
            &writer,
            updates,
            &index_metrics,
            std::future::pending::<()>(),
        )
        .await;
    });
    for u in listing(synthetic::snapshot(services, per_service)) {
        events.send(u).expect("the index loop runs");
    }
    handle.wait_synced().await;
    let (rss_index, _) = rss();

    // The CA's TLS listener with the stream routes, as the operator serves them.
    let now = SystemTime::now();
    let td = TrustDomain::new("cluster.local").expect("trust domain");
    let material = CaMaterial::generate(now, ROOT_VALIDITY).expect("root");
    let issuer =
        Issuer::new(&material, td.clone(), Duration::from_secs(3600), now).expect("issuer");
    let cert = stream_client::client_cert(&issuer, "bench", "sa-0");
    let bundle = issuer.trust_bundle().to_vec();
    let current = Arc::new(CurrentIssuer::new(material, issuer));
    let serving = ServingCert::new(
        current.clone(),
        serving_names("remora-operator", "remora-system"),
        now,
    )
    .expect("serving certificate");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = tcp.local_addr().expect("addr");
    let tls = TlsListener::new(tcp, server_config(serving).expect("TLS config")).expect("listener");
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let metrics = StreamMetrics::unregistered();
    let app = stream::router(StreamState {
        index: handle.clone(),
        heartbeat: Duration::from_secs(10),
        stop,
        metrics: metrics.clone(),
    });
    tokio::spawn(async move {
        axum::serve(tls, app.into_make_service_with_connect_info::<Peer>())
            .await
            .expect("serving");
    });

    let bench = Bench {
        addr,
        bundle,
        cert,
        events,
        handle,
        metrics,
        services,
        streams,
        connections,
        rounds,
    };
    let spread = bench.run(false).await;
    let shared = bench.run(true).await;
    let (_, hwm) = rss();

    println!(
        "| scenario | services × endpoints | streams / connections | rounds | debounce, recompute | versions per round | last event → recompute p50 / p99 | recompute + fan-out p50 / p99 | end to end p50 / p99 / max | operator RSS subscribed → end |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, row) in [
        ("a stream per Service, every Service changes", &spread),
        ("every stream on one Service, it changes", &shared),
    ] {
        println!(
            "| {name} | {services} × {per_service} | {streams} / {connections} | {rounds} | {debounce:?}, {} | {} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} / {:.1} ms | {:.1} → {:.1} MiB |",
            if incremental { "incremental" } else { "full" },
            row.versions_per_round,
            percentile(&row.to_recompute, 0.5),
            percentile(&row.to_recompute, 0.99),
            percentile(&row.latencies, 0.5),
            percentile(&row.latencies, 0.99),
            percentile(&row.end_to_end, 0.5),
            percentile(&row.end_to_end, 0.99),
            row.end_to_end.last().copied().unwrap_or(f64::NAN),
            row.rss_subscribed,
            row.rss_end,
        );
    }
    println!(
        "operator RSS: {rss_start:.1} MiB at start, {rss_index:.1} MiB with the index, peak {hwm:.1} MiB; subscribing {streams} streams took {:?}.",
        spread.connect_time
    );
    println!(
        "({} samples per scenario; end to end = the watch event for a stream's Service enters the index loop → the line with the change arrives at the client (debounce, recomputation, fan-out); last event → recompute = the round's last event enters the loop → its recomputation starts (the version is the wall clock then: the debounce); recompute + fan-out = that start → the line arrives; versions per round: the most any round took; targets: end-to-end p99 ≤ 100 ms, RSS ≤ 100 MB)",
        spread.latencies.len()
    );
}

/// The running server and what the scenarios need.
struct Bench {
    addr: SocketAddr,
    bundle: Vec<CertificateDer<'static>>,
    cert: stream_client::ClientCert,
    /// Watch events into the index's loop.
    events: tokio::sync::mpsc::UnboundedSender<Update>,
    handle: IndexHandle,
    metrics: StreamMetrics,
    services: u32,
    streams: u32,
    connections: u32,
    rounds: u32,
}

/// One scenario's measurements (latencies sorted, ms).
struct Row {
    to_recompute: Vec<f64>,
    latencies: Vec<f64>,
    end_to_end: Vec<f64>,
    versions_per_round: usize,
    rss_subscribed: f64,
    rss_end: f64,
    connect_time: Duration,
}

impl Bench {
    /// `shared`: every stream watches `svc-0`, whose endpoint changes; otherwise stream
    /// `i` watches `svc-<i>` and every Service's endpoint changes.
    async fn run(&self, shared: bool) -> Row {
        let (services, streams) = (self.services, self.streams);
        // The clients, in a child process.
        let targets: Vec<String> = (0..streams)
            .map(|i| {
                let svc = if shared { 0 } else { i % services };
                format!("{}:80", synthetic::vip(svc))
            })
            .collect();
        let setup = ClientSetup {
            addr: self.addr,
            bundle: self.bundle.iter().map(|c| c.to_vec()).collect(),
            chain: self.cert.chain.iter().map(|c| c.to_vec()).collect(),
            key: self.cert.key.secret_der().to_vec(),
            targets,
            connections: self.connections as usize,
        };
        let exe = std::env::current_exe().expect("own path");
        let mut child = Command::new(exe)
            .arg("clients")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("client process");
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(
            stdin,
            "{}",
            serde_json::to_string(&setup).expect("setup JSON")
        )
        .expect("setup sent");
        let stdout = child.stdout.take().expect("stdout");
        let (line_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if line_tx.send(line).is_err() {
                    return;
                }
            }
        });
        let subscribed = Instant::now();
        let ready = lines.recv().await.expect("the client process answers");
        assert_eq!(ready, "ready");
        let connect_time = subscribed.elapsed();
        // (The previous scenario's streams end once the server sees their connections
        // close.)
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.metrics.subscribers("outbound") != i64::from(streams) {
            assert!(Instant::now() < deadline, "subscribers do not settle");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (rss_subscribed, _) = rss();

        let mut row = Row {
            to_recompute: Vec::new(),
            latencies: Vec::new(),
            end_to_end: Vec::new(),
            versions_per_round: 0,
            rss_subscribed,
            rss_end: 0.0,
            connect_time,
        };
        let changed = if shared { 1 } else { services };
        for round in 0..self.rounds {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let base = self.handle.read().version();
            // The events, prepared before the clock starts: one endpoint of each Service
            // flips readiness.
            let updates: Vec<Update> = {
                let index = self.handle.read();
                (0..changed)
                    .filter_map(|i| {
                        let key = ObjKey::new("bench", format!("svc-{i}-abc"));
                        let mut slice = index.snapshot().slices.get(&key)?.clone();
                        let e = slice.endpoints.first_mut()?;
                        e.ready = !e.ready;
                        Some(Update::Upsert(Obj::EndpointSlice(key, Some(slice))))
                    })
                    .collect()
            };
            // When the event of Service i entered the index's loop.
            let mut sent = Vec::with_capacity(updates.len());
            for u in updates {
                sent.push(unix_micros());
                self.events.send(u).expect("the index loop runs");
            }
            let last_sent = sent.last().copied().unwrap_or(0);
            let mut got = 0;
            let mut seen = vec![false; streams as usize];
            let mut arrivals = Vec::with_capacity(streams as usize);
            while got < streams {
                let line = tokio::time::timeout(Duration::from_secs(30), lines.recv())
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "round {round}: {got} of {streams} streams got the change within 30 s"
                        )
                    })
                    .expect("the client process runs");
                let mut f = line.split(' ').map(|x| x.parse::<u64>().unwrap_or(0));
                let (i, v, at) = (
                    f.next().unwrap_or(0) as usize,
                    f.next().unwrap_or(0),
                    f.next().unwrap_or(0),
                );
                // A stream's first line after the round's events is its change.
                if v > base && i < seen.len() && !seen[i] {
                    seen[i] = true;
                    got += 1;
                    let svc = if shared { 0 } else { i % services as usize };
                    let t0 = sent.get(svc).copied().unwrap_or(last_sent);
                    row.end_to_end.push(at.saturating_sub(t0) as f64 / 1e3);
                    arrivals.push((v, at));
                }
            }
            // A version is the wall clock (µs) when its recomputation started.
            let versions: std::collections::BTreeSet<u64> =
                arrivals.iter().map(|(v, _)| *v).collect();
            row.versions_per_round = row.versions_per_round.max(versions.len());
            if let Some(first) = versions.first() {
                row.to_recompute
                    .push(first.saturating_sub(last_sent) as f64 / 1e3);
            }
            for (v, at) in arrivals {
                row.latencies.push(at.saturating_sub(v) as f64 / 1e3);
            }
        }
        row.rss_end = rss().0;
        let _ = child.kill();
        let _ = child.wait();
        row.latencies.sort_by(f64::total_cmp);
        row.end_to_end.sort_by(f64::total_cmp);
        row.to_recompute.sort_by(f64::total_cmp);
        row
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if std::env::args().nth(1).as_deref() == Some("clients") {
        runtime.block_on(clients());
    } else {
        runtime.block_on(operator());
    }
}
