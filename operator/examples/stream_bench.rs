//! The config stream's fan-out: a synthetic index of 1,000 Services × 10 endpoints (no
//! apiserver: the index is fed directly), the operator's stream server on loopback
//! (TLS 1.3, HTTP/2, mesh client certificates), and 1,000 subscribed outbound streams
//! (one per Service, spread over 10 connections) held by a child process, so the RSS
//! measured is the operator side's alone. Each round changes one endpoint of every
//! Service at once (one new version, 1,000 changed pieces) and times, per stream, the
//! index publishing the version to the line with it arriving (and the same from the start
//! of the recomputation, whose cost alone `index_bench` measures). A second scenario puts
//! every stream on one Service (a popular destination) and changes only that one.
//!
//! `cargo run --release -p remora-operator --example stream_bench [services]
//! [endpoints-per-service] [streams] [connections] [rounds]` (defaults 1000 10 1000 10 5).
//! Targets: p99 ≤ 100 ms, operator RSS ≤ 100 MB.

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
        model::ObjKey,
        version::now_micros,
        watch::{IndexConfig, IndexWriter, channel},
    },
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

async fn operator() {
    let (services, per_service) = (arg(1, 1000), arg(2, 10));
    let (streams, connections, rounds) = (arg(3, 1000), arg(4, 10), arg(5, 5));
    let (rss_start, _) = rss();

    // The index, fed directly.
    let (writer, handle) = channel(IndexConfig {
        trust_domain: "cluster.local".to_owned(),
        quiet: Duration::from_millis(50),
        max_delay: Duration::from_millis(250),
    });
    writer.apply(
        |s| *s = synthetic::snapshot(services, per_service),
        now_micros(),
    );
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
        writer,
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
        "| scenario | services × endpoints | streams / connections | rounds | recompute p50 | fan-out p50 | fan-out p99 | fan-out max | with recompute p50 / p99 | operator RSS subscribed → end |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, row) in [
        ("a stream per Service, every Service changes", &spread),
        ("every stream on one Service, it changes", &shared),
    ] {
        println!(
            "| {name} | {services} × {per_service} | {streams} / {connections} | {rounds} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {:.1} → {:.1} MiB |",
            percentile(&row.recompute, 0.5),
            percentile(&row.latencies, 0.5),
            percentile(&row.latencies, 0.99),
            row.latencies.last().copied().unwrap_or(f64::NAN),
            percentile(&row.end_to_end, 0.5),
            percentile(&row.end_to_end, 0.99),
            row.rss_subscribed,
            row.rss_end,
        );
    }
    println!(
        "operator RSS: {rss_start:.1} MiB at start, {rss_index:.1} MiB with the index, peak {hwm:.1} MiB; subscribing {streams} streams took {:?}.",
        spread.connect_time
    );
    println!(
        "({} samples per scenario; fan-out = the index publishes the version → the line with it arrives at the client; with recompute = from the start of the recomputation; targets: fan-out p99 ≤ 100 ms, RSS ≤ 100 MB)",
        spread.latencies.len()
    );
}

/// The running server and what the scenarios need.
struct Bench {
    addr: SocketAddr,
    bundle: Vec<CertificateDer<'static>>,
    cert: stream_client::ClientCert,
    writer: IndexWriter,
    metrics: StreamMetrics,
    services: u32,
    streams: u32,
    connections: u32,
    rounds: u32,
}

/// One scenario's measurements (latencies sorted, ms).
struct Row {
    recompute: Vec<f64>,
    latencies: Vec<f64>,
    end_to_end: Vec<f64>,
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
            recompute: Vec::new(),
            latencies: Vec::new(),
            end_to_end: Vec::new(),
            rss_subscribed,
            rss_end: 0.0,
            connect_time,
        };
        for round in 0..self.rounds {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let t0 = unix_micros();
            let started = Instant::now();
            let changed = if shared { 1 } else { services };
            let version = self
                .writer
                .apply(
                    |s| {
                        for i in 0..changed {
                            let key = ObjKey::new("bench", format!("svc-{i}-abc"));
                            if let Some(slice) = s.slices.get_mut(&key) {
                                slice.endpoints[0].ready = !slice.endpoints[0].ready;
                            }
                        }
                    },
                    now_micros(),
                )
                .version
                .expect("a new version");
            let published = unix_micros();
            row.recompute.push(started.elapsed().as_secs_f64() * 1e3);
            let mut got = 0;
            while got < streams {
                let line = tokio::time::timeout(Duration::from_secs(30), lines.recv())
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "round {round}: {got} of {streams} streams got the version within 30 s"
                        )
                    })
                    .expect("the client process runs");
                let mut f = line.split(' ').map(|x| x.parse::<u64>().unwrap_or(0));
                let (_, v, at) = (f.next(), f.next().unwrap_or(0), f.next().unwrap_or(0));
                if v == version {
                    got += 1;
                    row.latencies
                        .push(at.saturating_sub(published) as f64 / 1e3);
                    row.end_to_end.push(at.saturating_sub(t0) as f64 / 1e3);
                }
            }
        }
        row.rss_end = rss().0;
        let _ = child.kill();
        let _ = child.wait();
        row.latencies.sort_by(f64::total_cmp);
        row.end_to_end.sort_by(f64::total_cmp);
        row.recompute.sort_by(f64::total_cmp);
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
