//! The proxy-pair benchmark (issue 4 item 10; `make bench`, root): two "pods" in network
//! namespaces this program creates and removes, joined by a veth pair, with the
//! interception rules of `tests/netns.rs` (outbound TCP → 15001 except UID 1337 and
//! loopback; inbound TCP → 15006). Two paths in the same run, to the same server:
//!
//! - **direct**: client → server port 9090 (left out of both pods' capture rules);
//! - **remora**: client → server port 8080, captured: proxy A (outbound) → mTLS →
//!   proxy B (inbound) → server; HTTP/1.1 between the proxies, or HTTP/2 when
//!   `REMORA_BENCH_PROXY_ARGS` has `--mesh-protocol h2`;
//! - **envoy**: the same through an Envoy 1.40 sidecar pair (`pair/envoy.rs`), in a second
//!   pair of pods with the same addresses and rules, and its own server. Envoy must be
//!   installed (`make bench` does it) unless `REMORA_BENCH_SKIP_ENVOY=1` opts out;
//! - **haproxy**: the same through an HAProxy 2.6 pair (`pair/haproxy.rs`, Debian's
//!   `haproxy`, one thread, TLS 1.3 with the mesh CA's certificates), in its own pair of
//!   pods; `make bench` installs it unless `REMORA_BENCH_SKIP_HAPROXY=1` opts out. The
//!   table's last column is Remora ÷ HAProxy;
//! - **floor**: the same through a plain TCP relay pair (`pair/floor.rs`), in its own pair
//!   of pods: what the interception hops alone cost, the least any sidecar pair can cost
//!   here. `REMORA_BENCH_SKIP_FLOOR=1` leaves it out;
//! - **baseline** (only with `REMORA_BENCH_BASELINE=/path/to/remora-proxy`): another build of
//!   the proxy, e.g. main's, as a second Remora pair in its own pods, so a change is
//!   compared with it in the same run;
//! - **accel**: the same build and config as **remora**, in pods of its own, with the
//!   `remora-accel` agent attached to a cgroup holding only that pair's processes
//!   (`pair/accel.rs`): the app↔proxy hops go through `connect4` and `sk_msg` instead of the
//!   TCP stack. `make bench` builds the agent; `REMORA_BENCH_SKIP_ACCEL=1` leaves it out.
//!   **accel-both** is the same with the agent's `--redirect-to-app` (the proxies' sends
//!   handed to the apps too), its own agent on a sibling cgroup;
//!   `REMORA_BENCH_SKIP_ACCEL_BOTH=1` leaves only that one out. **accel-floor** is the
//!   control: the floor's relay pair with the default agent, for what the accelerator
//!   saves on a sidecar that is nothing but the hops (`REMORA_BENCH_SKIP_ACCEL_FLOOR=1`,
//!   or the floor's own opt-out, leaves it out). Their lines under the table give each ÷
//!   its plain twin (added p50 at 2,000 rps, HTTP/1.1 throughput) and CPU per request ÷
//!   the twin (and ÷ floor) by each CPU measure below;
//! - **policy**: the same build as **remora** with the full traffic policy on the service
//!   (least request, retries with a budget, circuit breaker limits and error rate, outlier
//!   detection, timeouts; `POLICY`), where **remora** has round robin and nothing else: what
//!   the policy path costs when nothing fails. `REMORA_BENCH_SKIP_POLICY=1` leaves it out.
//!
//! The load generator and the server are this program, re-executed inside the namespaces
//! (`--load ...`, `--serve`). Phases per path: max throughput (HTTP/1.1 keep-alive,
//! `POST` with a 1 KiB body answered by 1 KiB, 32 connections), an open-loop fixed rate
//! (2,000 rps; latency measured from each request's *intended* send time, so a stall
//! counts against every request it delays — coordinated-omission correction), and new
//! connections per second (one request per connection, `connection: close`), and h2c
//! (an HTTP/2 prior-knowledge client, 4 connections × 16 streams, against the server's
//! HTTP/2 port 8082, direct 9092). Each pod is pinned to a CPU of its own (`taskset`: the
//! client pod's load generator and sidecar on CPU 0, the server pod's app and sidecar on
//! CPU 1), so a sidecar competes with its own app, as under a pod CPU limit. Proxy RSS
//! comes from `/proc/<pid>/status` (VmRSS). CPU per request is measured three ways
//! (`pair/cpu.rs`): the pair's (the two sidecars' utime+stime), the pods' (the sidecars,
//! the server app and the load generator), and the machine's (`/proc/stat`, busy ticks of
//! every CPU, with its softirq share): a loopback hop costs whoever sends on it, app or
//! sidecar, and softirq work in ksoftirqd is charged to no pod. The machine's figures
//! include everything else running, so they mean something only on a quiet machine.
//!
//! Every namespace (and with it the veths) and process is removed by a guard's `Drop` (the
//! guards of `tests/common/netns.rs`, shared with the namespace tests; a failure to set up a
//! namespace panics, and the guards still clean up).

#[path = "pair/accel.rs"]
mod accel;
#[path = "pair/cpu.rs"]
mod cpu;
#[path = "pair/envoy.rs"]
mod envoy;
#[path = "pair/floor.rs"]
mod floor;
#[path = "pair/haproxy.rs"]
mod haproxy;
#[path = "../tests/common/netns.rs"]
#[allow(dead_code)]
mod netns;
#[path = "../tests/common/pki.rs"]
mod pki;

use std::{
    convert::Infallible,
    fs,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    process::{Command, ExitCode, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use netns::{Netns, Proc};
use pki::{Ca, IdentityPaths};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Mutex, mpsc},
};

const CLIENT_IP: &str = "10.78.0.1";
const SERVER_IP: &str = "10.78.0.2";
/// Captured by the proxies.
const MESH_PORT: u16 = 8080;
/// Left out of the capture rules: the direct path.
const DIRECT_PORT: u16 = 9090;
/// The server's HTTP/2 (and HTTP/1.1) port for the h2c phase: captured, and direct.
const H2_PORT: u16 = 8082;
const DIRECT_H2_PORT: u16 = 9092;
/// The h2c phase's client: connections × concurrent streams on each.
const H2_CONNS: usize = 4;
const H2_STREAMS: usize = 16;
const FRONTEND: &str = "spiffe://cluster.local/ns/bench/sa/client";
const BACKEND: &str = "spiffe://cluster.local/ns/bench/sa/server";
const BODY: usize = 1024;
const CONNS: usize = 32;
const RATE: u64 = 2000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--serve") => serve(),
        Some("--load") => load(&args[1..]),
        Some("--relay") => floor::relay(),
        Some("--netns-cookie") => accel::print_netns_cookie(),
        _ => bench(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pair bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

// ---------------------------------------------------------------------------------------
// The server (in the server namespace): answers every request with 1 KiB.

fn serve() -> anyhow::Result<()> {
    runtime()?.block_on(async {
        for port in [H2_PORT, DIRECT_H2_PORT] {
            let l = TcpListener::bind(("0.0.0.0", port)).await?;
            tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    // HTTP/2 prior knowledge, or HTTP/1.1 from a pair that speaks it to
                    // the app (Envoy's inbound cluster).
                    tokio::spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(s), service_fn(answer))
                            .await;
                    });
                }
            });
        }
        for port in [MESH_PORT, DIRECT_PORT] {
            let l = TcpListener::bind(("0.0.0.0", port)).await?;
            tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), service_fn(answer))
                            .await;
                    });
                }
            });
        }
        // Serves until the bench kills it.
        std::future::pending::<anyhow::Result<()>>().await
    })
}

/// Every request's body read, answered with 1 KiB.
async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let _ = req.into_body().collect().await;
    Ok(Response::new(Full::new(Bytes::from_static(&[b'x'; BODY]))))
}

// ---------------------------------------------------------------------------------------
// The load generator (in the client namespace); prints one `key=value ...` line.

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(send)
}

fn request(addr: SocketAddr, close: bool) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut b = Request::post("/bench").header("host", addr.to_string());
    if close {
        b = b.header("connection", "close");
    }
    Ok(b.body(Full::new(Bytes::from_static(&[b'y'; BODY])))?)
}

async fn exchange(send: &mut Sender, addr: SocketAddr, close: bool) -> anyhow::Result<()> {
    send.ready().await?;
    let resp = send.send_request(request(addr, close)?).await?;
    let ok = resp.status().is_success();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(ok && body.len() == BODY, "bad response");
    Ok(())
}

fn load(args: &[String]) -> anyhow::Result<()> {
    let [mode, addr, secs] = args else {
        anyhow::bail!("usage: --load max|rate|connect|h2 ADDR SECONDS");
    };
    let addr: SocketAddr = addr.parse()?;
    let dur = Duration::from_secs_f64(secs.parse()?);
    let rt = runtime()?;
    let line = match mode.as_str() {
        "max" => rt.block_on(load_max(addr, dur))?,
        "rate" => rt.block_on(load_rate(addr, dur))?,
        "connect" => rt.block_on(load_connect(addr, dur))?,
        "h2" => rt.block_on(load_h2(addr, dur))?,
        other => anyhow::bail!("unknown load mode {other}"),
    };
    println!("{line}");
    Ok(())
}

async fn load_max(addr: SocketAddr, dur: Duration) -> anyhow::Result<String> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..CONNS {
        let mut send = connect(addr).await?;
        let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if exchange(&mut send, addr, false).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    match connect(addr).await {
                        Ok(s) => send = s,
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }
        }));
    }
    Ok(count(&done, &errors, &stop, workers, dur).await)
}

/// Warms up for 0.5 s, counts the requests `workers` complete in `dur`, stops them: the
/// `--load` output line.
async fn count(
    done: &AtomicU64,
    errors: &AtomicU64,
    stop: &AtomicBool,
    workers: Vec<tokio::task::JoinHandle<()>>,
    dur: Duration,
) -> String {
    // Warm up, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (d0, start) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(dur).await;
    let (d1, secs) = (done.load(Ordering::Relaxed), start.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    format!(
        "requests={} secs={secs:.3} errors={}",
        d1 - d0,
        errors.load(Ordering::Relaxed)
    )
}

/// Max throughput of HTTP/2 prior-knowledge clients: `H2_CONNS` connections, each with
/// `H2_STREAMS` requests in flight all the time.
async fn load_h2(addr: SocketAddr, dur: Duration) -> anyhow::Result<String> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..H2_CONNS {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await?;
        tokio::spawn(conn);
        for _ in 0..H2_STREAMS {
            let mut send = send.clone();
            let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let one = async {
                        send.ready().await?;
                        // HTTP/2 requests carry :scheme and :authority, as h2load's do.
                        let mut req = request(addr, false)?;
                        *req.uri_mut() = format!("http://{addr}/bench").parse()?;
                        let resp = send.send_request(req).await?;
                        let ok = resp.status().is_success();
                        let body = resp.into_body().collect().await?.to_bytes();
                        anyhow::ensure!(ok && body.len() == BODY, "bad response");
                        Ok(())
                    };
                    if one.await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        // A broken connection stays broken: stop this stream's loop.
                        if send.is_closed() {
                            return;
                        }
                    }
                }
            }));
        }
    }
    Ok(count(&done, &errors, &stop, workers, dur).await)
}

async fn load_rate(addr: SocketAddr, dur: Duration) -> anyhow::Result<String> {
    let total = (RATE as f64 * dur.as_secs_f64()) as u64;
    let (tx, rx) = mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(Mutex::new(rx));
    let errors = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONNS {
        let mut send = connect(addr).await?;
        // One warm-up request per connection.
        exchange(&mut send, addr, false).await?;
        let (rx, errors) = (rx.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some(intended) = rx.lock().await.recv().await else {
                    return lat;
                };
                if exchange(&mut send, addr, false).await.is_ok() {
                    lat.push(intended.elapsed().as_micros() as u64);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    if let Ok(s) = connect(addr).await {
                        send = s;
                    }
                }
            }
        }));
    }
    // The schedule runs on its own thread with std sleeps (~50 µs slack): open loop, the
    // latency of each request counts from when it should have been sent.
    let start = Instant::now();
    let ticker = std::thread::spawn(move || {
        let interval = Duration::from_secs_f64(1.0 / RATE as f64);
        for i in 0..total {
            let intended = start + interval * i as u32;
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            if tx.send(intended).is_err() {
                return;
            }
        }
    });
    let _ = ticker.join();
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await?);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Ok(format!(
        "requests={} secs={secs:.3} errors={} p50={} p90={} p99={} max={}",
        lat.len(),
        errors.load(Ordering::Relaxed),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        lat.last().copied().unwrap_or(0)
    ))
}

async fn load_connect(addr: SocketAddr, dur: Duration) -> anyhow::Result<String> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..CONNS {
        let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let one = async {
                    let mut send = connect(addr).await?;
                    exchange(&mut send, addr, true).await
                };
                if one.await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(dur).await;
    let (d, secs) = (done.load(Ordering::Relaxed), start.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    Ok(format!(
        "requests={d} secs={secs:.3} errors={}",
        errors.load(Ordering::Relaxed)
    ))
}

// ---------------------------------------------------------------------------------------
// The orchestration (root namespace).

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {cmd:?}: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

struct Pods {
    // Field order is drop order: processes before namespaces.
    procs: Vec<Proc>,
    client: Netns,
    server: Netns,
    dir: tempfile::TempDir,
}

/// Two pods; `p` tells the namespace and veth names of one pair of pods from another's.
fn pods(p: char) -> anyhow::Result<Pods> {
    let (client, server) = netns::joined(
        &format!("r{p}"),
        &[&format!("{CLIENT_IP}/24")],
        &[&format!("{SERVER_IP}/24")],
    );
    for ns in [&client, &server] {
        // Room for the new-connection phase's TIME_WAIT sockets.
        run(&mut ns.cmd(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65000",
        ]))?;
        run(&mut ns.cmd(&["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"]))?;
    }
    let direct = format!("-A OUTPUT -p tcp --dport {DIRECT_PORT} -j RETURN");
    let direct_h2 = format!("-A OUTPUT -p tcp --dport {DIRECT_H2_PORT} -j RETURN");
    let outbound = [
        "-A OUTPUT -p tcp -m owner --uid-owner 1337 -j RETURN",
        "-A OUTPUT -p tcp -d 127.0.0.1/32 -j RETURN",
        &direct,
        &direct_h2,
        "-A OUTPUT -p tcp -j REDIRECT --to-ports 15001",
    ];
    client.rules("iptables", &outbound);
    server.rules("iptables", &outbound);
    let direct_in = format!("-A PREROUTING -p tcp --dport {DIRECT_PORT} -j RETURN");
    let direct_h2_in = format!("-A PREROUTING -p tcp --dport {DIRECT_H2_PORT} -j RETURN");
    server.rules(
        "iptables",
        &[
            "-A PREROUTING -p tcp --dport 15020 -j RETURN",
            &direct_in,
            &direct_h2_in,
            "-A PREROUTING -p tcp -j REDIRECT --to-ports 15006",
        ],
    );
    let dir = tempfile::tempdir()?;
    // The proxies run as UID 1337 and must read their files.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
    Ok(Pods {
        procs: Vec::new(),
        client,
        server,
        dir,
    })
}

/// `args` pinned to the CPU of the server or the client pod (`taskset`), when the machine
/// has two CPUs or more: each pod is a CPU, its sidecar competes with its own app.
fn pinned<'a>(server: bool, args: &[&'a str]) -> Vec<&'a str> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut all = Vec::new();
    if cpus >= 2 {
        all.extend(["taskset", "-c", if server { "1" } else { "0" }]);
    }
    all.extend(args);
    all
}

/// Starts `args` in the server or client pod, pinned to its CPU, output to `log`.
fn spawn(ns: &Netns, server: bool, args: &[&str], log: &std::path::Path) -> anyhow::Result<Proc> {
    let file = fs::File::create(log)?;
    let child = ns
        .cmd(&pinned(server, args))
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file))
        .spawn()?;
    Ok(Proc {
        child,
        what: log.display().to_string(),
    })
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
}

#[derive(Debug, Default, Clone)]
struct Load {
    requests: f64,
    secs: f64,
    errors: f64,
    p50: f64,
    p90: f64,
    p99: f64,
}

impl Load {
    fn rate(&self) -> f64 {
        self.requests / self.secs.max(1e-9)
    }
}

fn load_in(ns: &Netns, mode: &str, addr: &str, secs: u64) -> anyhow::Result<Load> {
    let me = std::env::current_exe()?;
    let me = me.display().to_string();
    let secs = secs.to_string();
    let out = run(&mut ns.cmd(&pinned(false, &[&me, "--load", mode, addr, &secs])))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut l = Load::default();
    for kv in text.split_whitespace() {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let v: f64 = v.parse().unwrap_or(f64::NAN);
        match k {
            "requests" => l.requests = v,
            "secs" => l.secs = v,
            "errors" => l.errors = v,
            "p50" => l.p50 = v,
            "p90" => l.p90 = v,
            "p99" => l.p99 = v,
            _ => {}
        }
    }
    anyhow::ensure!(
        l.requests > 0.0,
        "{mode} {addr}: no requests completed: {text}"
    );
    Ok(l)
}

/// The pods' identities, readable by the proxies (UID 1337): (server, client).
fn identities(pods: &Pods) -> anyhow::Result<(IdentityPaths, IdentityPaths)> {
    let ca = Ca::new("remora bench CA");
    let server_id = IdentityPaths::write(pods.dir.path(), "server", BACKEND, &ca, &ca);
    let client_id = IdentityPaths::write(pods.dir.path(), "client", FRONTEND, &ca, &ca);
    for id in [&server_id, &client_id] {
        for p in [&id.cert, &id.key, &id.bundle] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o644))?;
        }
    }
    Ok((server_id, client_id))
}

fn write_config(pods: &Pods, name: &str, text: &str) -> anyhow::Result<String> {
    let path = pods.dir.path().join(name);
    fs::write(&path, text)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
    Ok(path.display().to_string())
}

fn log_path(pods: &Pods, name: &str) -> std::path::PathBuf {
    pods.dir.path().join(format!("{name}.log"))
}

fn logs(pods: &Pods, names: &[&str]) -> String {
    names
        .iter()
        .map(|n| {
            let text = fs::read_to_string(log_path(pods, n)).unwrap_or_default();
            format!("--- {n} ---\n{text}\n")
        })
        .collect()
}

/// Starts `args` as UID 1337 (the UID the capture rules leave out) in `ns`; its PID.
fn sidecar(pods: &mut Pods, server: bool, name: &str, args: &[&str]) -> anyhow::Result<u32> {
    let ns = if server { &pods.server } else { &pods.client };
    let mut all = vec!["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"];
    all.extend(args);
    let p = spawn(ns, server, &all, &log_path(pods, name))?;
    let pid = p.pid();
    pods.procs.push(p);
    Ok(pid)
}

/// The **remora** path's service policy: round robin and nothing else.
const NO_POLICY: &str = "{loadBalancer: {algorithm: RoundRobin}}";

/// The **policy** path's: every policy that does per-request work when nothing fails.
/// Retries are on connect failures and gateway errors, so the bench's `POST`s are
/// retryable only before they reach the server, as for any non-idempotent request.
const POLICY: &str = "{loadBalancer: {algorithm: LeastRequest}, \
    timeouts: {request: 10s, connect: 1s, idle: 60s}, \
    retries: {attempts: 2, perTryTimeout: 5s, retryOn: [connect-failure, gateway-error], \
      backoff: {base: 5ms, max: 50ms}, budgetPercent: 20}, \
    circuitBreaker: {maxConnections: 1000, maxPendingRequests: 1000, maxRequests: 1000, \
      errorRatePercent: 50, window: 10s, minRequests: 20, openFor: 5s}, \
    outlierDetection: {consecutiveErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}}";

/// The Remora pair of `proxy_bin` with `policy` on the service; PIDs of proxy A (client
/// pod) and B (server pod).
fn start_remora(
    pods: &mut Pods,
    proxy_bin: &str,
    extra_args: &str,
    policy: &str,
) -> anyhow::Result<(u32, u32)> {
    let (server_id, client_id) = identities(pods)?;
    let server_cfg = write_config(
        pods,
        "server.yaml",
        &format!(
            "version: 1\n{}inbound:\n  default: {{mtls: Strict}}\n",
            server_id.yaml()
        ),
    )?;
    let client_cfg = write_config(
        pods,
        "client.yaml",
        &format!(
            "version: 1\n{}outbound:\n  services:\n  - name: server.bench\n    addresses: [\"{SERVER_IP}:{MESH_PORT}\"]\n    policy: {policy}\n    endpoints:\n    - {{address: \"{SERVER_IP}:{MESH_PORT}\", identity: \"{BACKEND}\", meshed: true}}\n  - name: server-h2.bench\n    addresses: [\"{SERVER_IP}:{H2_PORT}\"]\n    policy: {policy}\n    endpoints:\n    - {{address: \"{SERVER_IP}:{H2_PORT}\", identity: \"{BACKEND}\", meshed: true}}\n",
            client_id.yaml()
        ),
    )?;
    let mut pids = Vec::new();
    for (server, cfg, name) in [
        (true, &server_cfg, "proxy-b"),
        (false, &client_cfg, "proxy-a"),
    ] {
        let mut args = vec![proxy_bin, "--config", cfg, "--log-level", "warn"];
        args.extend(extra_args.split_whitespace());
        pids.push(sidecar(pods, server, name, &args)?);
        let ns = if server { &pods.server } else { &pods.client };
        let ready = || {
            ns.cmd(&[proxy_bin, "wait-ready", "--timeout=20s"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        wait_for(&format!("{name} ready"), ready)
            .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(pods, &[name])))?;
    }
    Ok((pids[1], pids[0]))
}

/// The Envoy pair (see `envoy.rs`); PIDs of Envoy A (client pod) and B (server pod).
fn start_envoy(
    pods: &mut Pods,
    bin: &str,
    mesh: envoy::MeshProtocol,
) -> anyhow::Result<(u32, u32)> {
    let (server_id, client_id) = identities(pods)?;
    let trust_domain = "cluster.local";
    let mut pids = Vec::new();
    for (server, id, peer, name) in [
        (true, &server_id, FRONTEND, "envoy-b"),
        (false, &client_id, BACKEND, "envoy-a"),
    ] {
        let cfg = write_config(
            pods,
            &format!("{name}.yaml"),
            &envoy::config(id, peer, trust_domain, mesh),
        )?;
        envoy::validate(bin, std::path::Path::new(&cfg))?;
        let args = envoy::args(std::path::Path::new(&cfg));
        let mut all = vec![bin];
        all.extend(args.iter().map(String::as_str));
        pids.push(sidecar(pods, server, name, &all)?);
        // Started = both capture listeners bound (Envoy has no wait-ready hook here), so
        // its idle RSS is read from a running Envoy, as Remora's is after wait-ready.
        wait_listening(pods, server, name)?;
    }
    Ok((pids[1], pids[0]))
}

/// The HAProxy pair (see `haproxy.rs`); PIDs of HAProxy A (client pod) and B (server
/// pod), and their files (stats sockets for `haproxy::check`).
fn start_haproxy(
    pods: &mut Pods,
    bin: &str,
) -> anyhow::Result<((u32, u32), (haproxy::Files, haproxy::Files))> {
    let (server_id, client_id) = identities(pods)?;
    let mut pids = Vec::new();
    let mut files = Vec::new();
    for (server, id, name) in [
        (true, &server_id, "haproxy-b"),
        (false, &client_id, "haproxy-a"),
    ] {
        let f = haproxy::write(pods.dir.path(), name, id)?;
        haproxy::validate(bin, &f.config)?;
        let args = haproxy::args(&f.config);
        let mut all = vec![bin];
        all.extend(args.iter().map(String::as_str));
        pids.push(sidecar(pods, server, name, &all)?);
        wait_listening(pods, server, name)?;
        files.push(f);
    }
    let (a, b) = (files.pop(), files.pop());
    match (a, b) {
        (Some(a), Some(b)) => Ok(((pids[1], pids[0]), (a, b))),
        _ => anyhow::bail!("haproxy files missing"),
    }
}

/// Waits until the sidecar `name` of the server or client pod has bound both capture
/// listeners.
fn wait_listening(pods: &Pods, server: bool, name: &str) -> anyhow::Result<()> {
    let ns = if server { &pods.server } else { &pods.client };
    let listening = || {
        ns.cmd(&["ss", "-Hltn", "( sport = :15001 or sport = :15006 )"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().count() >= 2)
    };
    wait_for(&format!("{name} listening"), listening)
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(pods, &[name])))
}

/// Opts the floor path out.
const SKIP_FLOOR: &str = "REMORA_BENCH_SKIP_FLOOR";

/// Opts the policy path out.
const SKIP_POLICY: &str = "REMORA_BENCH_SKIP_POLICY";

/// A second `remora-proxy` binary to run as the "baseline" path.
const BASELINE_ENV: &str = "REMORA_BENCH_BASELINE";

/// The relay pair of the floor path (`floor.rs`); PIDs of relay A and B.
fn start_floor(pods: &mut Pods, me: &str) -> anyhow::Result<(u32, u32)> {
    let mut pids = Vec::new();
    for (server, name) in [(true, "relay-b"), (false, "relay-a")] {
        pids.push(sidecar(pods, server, name, &[me, "--relay"])?);
        wait_listening(pods, server, name)?;
    }
    Ok((pids[1], pids[0]))
}

/// One way from the client pod to the server: direct, or through a proxy pair.
struct Path<'a> {
    name: &'static str,
    client: &'a Netns,
    addr: String,
    /// The server's HTTP/2 port on this path.
    h2_addr: String,
    /// The pair's PIDs (A, B); none for the direct path.
    pids: Option<(u32, u32)>,
    /// The server app's PID (the one the direct path shares with the remora pair).
    server: u32,
    /// An accelerated pair's node: its load generator runs in the pair's cgroup.
    accel: Option<&'a accel::Node>,
}

impl Path<'_> {
    /// The CPU counters now (`cpu.rs`): this path's sidecars and server app, the load
    /// generators waited for, the machine.
    fn sample(&self) -> anyhow::Result<cpu::Sample> {
        let sidecars = match self.pids {
            Some((a, b)) => vec![a, b],
            None => Vec::new(),
        };
        cpu::Sample::take(&sidecars, &[self.server])
    }

    fn rss(&self) -> anyhow::Result<Option<(u64, u64)>> {
        self.pids
            .map(|(a, b)| Ok((rss_kib(a)?, rss_kib(b)?)))
            .transpose()
    }
}

/// The RSS of every path's pair (`None` for the direct path).
fn rss_of(paths: &[Path<'_>]) -> anyhow::Result<Vec<Option<(u64, u64)>>> {
    paths.iter().map(Path::rss).collect()
}

/// One of a `Series`' figures.
type Field = fn(&Series) -> &Vec<f64>;

/// Per-round figures of one path.
#[derive(Debug, Default)]
struct Series {
    max: Vec<f64>,
    p50: Vec<f64>,
    p90: Vec<f64>,
    p99: Vec<f64>,
    achieved: Vec<f64>,
    connect: Vec<f64>,
    h2: Vec<f64>,
    cpu_rate: Vec<f64>,
    cpu_max: Vec<f64>,
    /// Everything in the two pods: load generator, server app, sidecars.
    pods_rate: Vec<f64>,
    pods_max: Vec<f64>,
    /// The whole machine (`/proc/stat`), and its softirq share.
    machine_rate: Vec<f64>,
    machine_max: Vec<f64>,
    softirq_rate: Vec<f64>,
}

/// A sidecar pair in its own two pods, with its own server.
struct Pair {
    name: &'static str,
    pods: Pods,
    /// A's and B's PIDs.
    pids: (u32, u32),
    /// The server app's PID.
    server: u32,
    /// The log names of A and B.
    logs: [&'static str; 2],
}

impl Pair {
    /// Pods `p` with the bench's server (`me --serve`) in the server pod, and the pair that
    /// `start` starts.
    fn start(
        p: char,
        name: &'static str,
        me: &str,
        logs: [&'static str; 2],
        start: impl FnOnce(&mut Pods) -> anyhow::Result<(u32, u32)>,
    ) -> anyhow::Result<Self> {
        let mut pods = pods(p)?;
        let server = spawn(
            &pods.server,
            true,
            &[me, "--serve"],
            &log_path(&pods, "server"),
        )?;
        let server_pid = server.pid();
        pods.procs.push(server);
        let pids = start(&mut pods)?;
        Ok(Self {
            name,
            pods,
            pids,
            server: server_pid,
            logs,
        })
    }
}

fn bench() -> anyhow::Result<()> {
    let me = std::env::current_exe()?.display().to_string();
    // A missing Envoy fails here, before any namespace exists, unless opted out.
    let envoy_bin = envoy::binary()?.map(|p| p.display().to_string());
    let haproxy_bin = haproxy::binary()?.map(|p| p.display().to_string());
    let accel_bin = accel::binary()?;
    // Extra proxy flags, e.g. REMORA_BENCH_PROXY_ARGS="--worker-threads 1".
    let extra_proxy_args = std::env::var("REMORA_BENCH_PROXY_ARGS").unwrap_or_default();
    let mesh_protocol = envoy::MeshProtocol::of_proxy_args(&extra_proxy_args);
    let remora = Pair::start('b', "remora", &me, ["proxy-a", "proxy-b"], |pods| {
        start_remora(
            pods,
            env!("CARGO_BIN_EXE_remora-proxy"),
            &extra_proxy_args,
            NO_POLICY,
        )
    })?;
    // Every other pair gets its own pods (same addresses, same rules, its own server), so
    // all stay up and the phases can alternate. A baseline is another build of the proxy
    // (say, main's), for a same-run comparison: on a shared 2-core VM, figures from
    // separate runs differ more than most changes do.
    let baseline_bin = std::env::var(BASELINE_ENV).ok().filter(|v| !v.is_empty());
    // Declared before the pairs, so dropped after them: their cgroups must be empty by
    // then. One agent per mode, each on a cgroup and bpffs of its own (sibling cgroups:
    // each agent's programs see only its own pair's sockets).
    let with_floor = !std::env::var(SKIP_FLOOR).is_ok_and(|v| !v.is_empty());
    let mut accel_nodes = match &accel_bin {
        Some(bin) => accel::Mode::wanted(with_floor)
            .into_iter()
            .map(|m| accel::Node::new(bin.clone(), m))
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let mut others = Vec::new();
    for node in &mut accel_nodes {
        let pair = {
            let _inside = node.enter()?;
            let m = node.mode;
            if m == accel::Mode::Floor {
                Pair::start(m.pod(), m.name(), &me, ["relay-a", "relay-b"], |pods| {
                    start_floor(pods, &me)
                })?
            } else {
                Pair::start(m.pod(), m.name(), &me, ["proxy-a", "proxy-b"], |pods| {
                    start_remora(
                        pods,
                        env!("CARGO_BIN_EXE_remora-proxy"),
                        &extra_proxy_args,
                        NO_POLICY,
                    )
                })?
            }
        };
        node.start_agent(&pair.pods.client)?;
        let config = accel::config(&[DIRECT_PORT, DIRECT_H2_PORT]);
        for ns in [&pair.pods.client, &pair.pods.server] {
            node.register(ns, &me, &config)?;
        }
        others.push(pair);
    }
    if let Some(bin) = &baseline_bin {
        others.push(Pair::start(
            'c',
            "baseline",
            &me,
            ["proxy-a", "proxy-b"],
            |pods| start_remora(pods, bin, &extra_proxy_args, NO_POLICY),
        )?);
    }
    if !std::env::var(SKIP_POLICY).is_ok_and(|v| !v.is_empty()) {
        others.push(Pair::start(
            'p',
            "policy",
            &me,
            ["proxy-a", "proxy-b"],
            |pods| {
                start_remora(
                    pods,
                    env!("CARGO_BIN_EXE_remora-proxy"),
                    &extra_proxy_args,
                    POLICY,
                )
            },
        )?);
    }
    let mut haproxy_files = None;
    if let Some(bin) = &haproxy_bin {
        others.push(Pair::start(
            'h',
            "haproxy",
            &me,
            ["haproxy-a", "haproxy-b"],
            |pods| {
                let (pids, files) = start_haproxy(pods, bin)?;
                haproxy_files = Some(files);
                Ok(pids)
            },
        )?);
    }
    if let Some(bin) = &envoy_bin {
        others.push(Pair::start(
            'e',
            "envoy",
            &me,
            ["envoy-a", "envoy-b"],
            |pods| start_envoy(pods, bin, mesh_protocol),
        )?);
    }
    if with_floor {
        others.push(Pair::start(
            'f',
            "floor",
            &me,
            ["relay-a", "relay-b"],
            |pods| start_floor(pods, &me),
        )?);
    }
    let direct = format!("{SERVER_IP}:{DIRECT_PORT}");
    let mesh = format!("{SERVER_IP}:{MESH_PORT}");
    let mut paths = vec![Path {
        name: "direct",
        client: &remora.pods.client,
        addr: direct.clone(),
        h2_addr: format!("{SERVER_IP}:{DIRECT_H2_PORT}"),
        pids: None,
        server: remora.server,
        accel: None,
    }];
    for pair in std::iter::once(&remora).chain(&others) {
        paths.push(Path {
            name: pair.name,
            client: &pair.pods.client,
            addr: mesh.clone(),
            h2_addr: format!("{SERVER_IP}:{H2_PORT}"),
            pids: Some(pair.pids),
            server: pair.server,
            accel: accel_nodes.iter().find(|n| n.mode.name() == pair.name),
        });
    }
    // Ready, before any traffic: what an idle sidecar costs.
    let rss_start = rss_of(&paths)?;
    // Server up on every path, through the sidecars too (Envoy and the relays have no
    // readiness hook here: their path works once both listeners are up).
    wait_for("server reachable directly", || {
        load_in(&remora.pods.client, "connect", &direct, 1).is_ok()
    })?;
    for (pair, path) in std::iter::once(&remora).chain(&others).zip(&paths[1..]) {
        let _inside = path.accel.map(accel::Node::enter).transpose()?;
        wait_for(&format!("the {} path", pair.name), || {
            load_in(&pair.pods.client, "connect", &mesh, 1).is_ok()
        })
        .map_err(|e| {
            anyhow::anyhow!("{} path: {e}\n{}", pair.name, logs(&pair.pods, &pair.logs))
        })?;
        if pair.name == "envoy" {
            envoy::check_mtls(&pair.pods, mesh_protocol)?;
        }
    }
    let rss_idle = rss_of(&paths)?;

    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let (secs, rounds) = (
        env("REMORA_BENCH_SECS", 3),
        env("REMORA_BENCH_ROUNDS", 3).max(1),
    );
    // Each phase's figures as they come (the table has only the medians).
    let verbose = std::env::var("REMORA_BENCH_VERBOSE").is_ok_and(|v| !v.is_empty());
    let names: Vec<&str> = paths.iter().map(|p| p.name).collect();
    eprintln!(
        "pair bench: {rounds} rounds of {secs} s phases, {} alternating; direct = {direct}, pairs = {mesh}",
        names.join(", ")
    );
    let load_before = loadavg();
    let tck = cpu::clk_tck();
    // CPU seconds per 1,000 requests (= vCPU per 1,000 rps). The counted requests exclude
    // each phase's short warm-up, so this errs slightly high.
    let per_k = |ticks: u64, l: &Load| ticks as f64 / tck / (l.requests / 1000.0);
    let mut series: Vec<Series> = paths.iter().map(|_| Series::default()).collect();
    let mut errors = 0.0;
    for round in 0..rounds {
        eprintln!("pair bench: round {}/{rounds}", round + 1);
        for mode in ["max", "rate", "connect", "h2"] {
            for (path, s) in paths.iter().zip(series.iter_mut()) {
                let _inside = path.accel.map(accel::Node::enter).transpose()?;
                let c0 = path.sample()?;
                let addr = if mode == "h2" {
                    &path.h2_addr
                } else {
                    &path.addr
                };
                let l = match load_in(path.client, mode, addr, secs) {
                    Ok(l) => l,
                    // A path that cannot carry h2c shows 0 in its row instead of ending
                    // the run (the other phases' figures stand).
                    Err(e) if mode == "h2" => {
                        eprintln!("pair bench: h2c through {} FAILED: {e:#}", path.name);
                        Load {
                            secs: 1.0,
                            ..Load::default()
                        }
                    }
                    Err(e) => return Err(e),
                };
                let used = path.sample()?.since(c0);
                let cpu = per_k(used.pair, &l);
                let pods = per_k(used.pods, &l);
                let machine = per_k(used.machine, &l);
                if verbose {
                    eprintln!(
                        "pair bench: {mode} {}: {:.0} rps, p50/p90/p99 {:.0}/{:.0}/{:.0} us, CPU s per 1000: pair {cpu:.3}, pods {pods:.3}, machine {machine:.3} (softirq {:.3})",
                        path.name,
                        l.rate(),
                        l.p50,
                        l.p90,
                        l.p99,
                        per_k(used.softirq, &l),
                    );
                }
                errors += l.errors;
                match mode {
                    "max" => {
                        s.max.push(l.rate());
                        s.cpu_max.push(cpu);
                        s.pods_max.push(pods);
                        s.machine_max.push(machine);
                    }
                    "rate" => {
                        s.p50.push(l.p50);
                        s.p90.push(l.p90);
                        s.p99.push(l.p99);
                        s.achieved.push(l.rate());
                        s.cpu_rate.push(cpu);
                        s.pods_rate.push(pods);
                        s.machine_rate.push(machine);
                        s.softirq_rate.push(per_k(used.softirq, &l));
                    }
                    "connect" => s.connect.push(l.rate()),
                    _ => s.h2.push(l.rate()),
                }
            }
        }
    }
    let rss_after = rss_of(&paths)?;
    let load_after = loadavg();
    if let Some((a, b)) = &haproxy_files {
        let haproxy = others.iter().find(|p| p.name == "haproxy");
        haproxy::check(a, b, true).map_err(|e| {
            let text = haproxy.map(|p| logs(&p.pods, &p.logs)).unwrap_or_default();
            anyhow::anyhow!("{e}\n{text}")
        })?;
    }

    println!();
    println!(
        "proxy pair benchmark (release; client ns -> proxy A -> mTLS -> proxy B -> server ns; {} between the proxies of remora and envoy {}; haproxy {}: HTTP/1.1 and HTTP/2 kept; floor: plain TCP relays; each pod pinned to a CPU)",
        mesh_protocol.label(),
        envoy::VERSION,
        haproxy_bin
            .as_deref()
            .map_or("left out".into(), haproxy::version),
    );
    let remora_flags = if extra_proxy_args.is_empty() {
        "defaults"
    } else {
        &extra_proxy_args
    };
    let envoy_flags = match envoy_bin {
        Some(_) => format!("--concurrency {}", envoy::concurrency()),
        None => format!("left out ({} set)", envoy::SKIP_ENV),
    };
    println!("remora flags: {remora_flags}; envoy: {envoy_flags}");
    if let Some(bin) = &baseline_bin {
        println!("baseline: {bin} with the same flags");
    }
    println!(
        "medians of {rounds} rounds x {secs} s; 1-min load average {load_before} before, {load_after} after (2 cores: anything else running skews every figure)"
    );
    let mut head = format!("{:<44}", "metric");
    for p in &paths {
        head += &format!(" {:>10}", p.name);
    }
    for p in &paths[1..] {
        head += &format!(" {:>17}", format!("{} vs direct", p.name));
    }
    println!("{head} {:>17}   target", "remora ÷ haproxy");
    let row = |m: &str, cells: Vec<String>, vs: Vec<String>, hap: String, t: &str| {
        let mut line = format!("{m:<44}");
        for c in cells {
            line += &format!(" {c:>10}");
        }
        for c in vs {
            line += &format!(" {c:>17}");
        }
        println!("{line} {hap:>17}   {t}");
    };
    let d = &series[0];
    let pairs = &series[1..];
    // Remora ÷ HAProxy, the median of the per-round ratios of `f` (of the added latency
    // with `added`): "-" without the HAProxy path.
    let hap_index = paths.iter().position(|p| p.name == "haproxy");
    let vs_haproxy = |f: Field, added: bool| -> String {
        let Some(h) = hap_index else {
            return "-".into();
        };
        let (r, hp) = (f(&series[1]), f(&series[h]));
        let base = |i: usize| if added { f(d)[i] } else { 0.0 };
        let ratios = (0..r.len().min(hp.len()))
            .map(|i| (r[i] - base(i)) / (hp[i] - base(i)))
            .collect();
        format!("{:.2}", median(ratios))
    };
    let ratio = |f: Field| -> Vec<String> {
        pairs
            .iter()
            .map(|s| {
                let r = f(s).iter().zip(f(d)).map(|(x, d)| x / d).collect();
                format!("{:.2}x", median(r))
            })
            .collect()
    };
    let delta = |f: Field| -> Vec<String> {
        pairs
            .iter()
            .map(|s| {
                let r = f(s).iter().zip(f(d)).map(|(x, d)| x - d).collect();
                format!("{:+.0} us", median(r))
            })
            .collect()
    };
    let cells = |f: Field, digits: usize| -> Vec<String> {
        series
            .iter()
            .map(|s| format!("{:.digits$}", median(f(s).clone())))
            .collect()
    };
    let pair_cells = |f: Field| -> Vec<String> {
        std::iter::once("-".to_owned())
            .chain(pairs.iter().map(|s| format!("{:.3}", median(f(s).clone()))))
            .collect()
    };
    let none = || vec![String::new(); pairs.len()];
    row(
        "throughput, 32 conns keep-alive (rps)",
        cells(|s| &s.max, 0),
        ratio(|s| &s.max),
        vs_haproxy(|s| &s.max, false),
        "remora >= 0.30x, >= 1.1x haproxy",
    );
    row(
        &format!("h2c, {H2_CONNS} conns x {H2_STREAMS} streams (rps)"),
        cells(|s| &s.h2, 0),
        ratio(|s| &s.h2),
        vs_haproxy(|s| &s.h2, false),
        "remora >= 1.0x haproxy",
    );
    let latency: [(&str, Field, &str); 3] = [
        ("p50", |s| &s.p50, "remora <= +150 us"),
        ("p90", |s| &s.p90, ""),
        ("p99", |s| &s.p99, "remora <= +500 us, <= haproxy's"),
    ];
    for (name, f, t) in latency {
        row(
            &format!("latency {name} at {RATE} rps, CO-corrected (us)"),
            cells(f, 0),
            delta(f),
            // Of the latency each pair adds.
            vs_haproxy(f, true),
            t,
        );
    }
    row(
        &format!("achieved rate at {RATE} rps (rps)"),
        cells(|s| &s.achieved, 0),
        none(),
        String::new(),
        "",
    );
    row(
        "new connections per second",
        cells(|s| &s.connect, 0),
        ratio(|s| &s.connect),
        vs_haproxy(|s| &s.connect, false),
        "remora >= 0.7x, >= 1.0x haproxy",
    );
    row(
        &format!("pair CPU s per 1000 req at {RATE} rps"),
        pair_cells(|s| &s.cpu_rate),
        none(),
        vs_haproxy(|s| &s.cpu_rate, false),
        "remora <= 0.08, <= 0.9x haproxy",
    );
    row(
        "pair CPU s per 1000 req at max throughput",
        pair_cells(|s| &s.cpu_max),
        none(),
        vs_haproxy(|s| &s.cpu_max, false),
        "",
    );
    // The whole path's CPU (`cpu.rs`): the pair's hops also cost the apps that send
    // through them, and softirq work that no process is charged for.
    let whole: [(String, Field); 5] = [
        (format!("pods CPU s per 1000 req at {RATE} rps"), |s| {
            &s.pods_rate
        }),
        ("pods CPU s per 1000 req at max throughput".into(), |s| {
            &s.pods_max
        }),
        (format!("machine CPU s per 1000 req at {RATE} rps"), |s| {
            &s.machine_rate
        }),
        ("machine CPU s per 1000 req at max thr.".into(), |s| {
            &s.machine_max
        }),
        (
            format!("machine softirq s per 1000 req at {RATE} rps"),
            |s| &s.softirq_rate,
        ),
    ];
    for (name, f) in whole {
        row(&name, cells(f, 3), none(), String::new(), "");
    }
    let mb = |rss: &[Option<(u64, u64)>]| -> Vec<String> {
        rss.iter()
            .map(|r| match r {
                Some((a, b)) => format!("{:.1}/{:.1}", *a as f64 / 1024.0, *b as f64 / 1024.0),
                None => "-".into(),
            })
            .collect()
    };
    // Remora's A + B ÷ HAProxy's A + B.
    let rss_vs_haproxy = |rss: &[Option<(u64, u64)>]| -> String {
        let sum = |i: usize| rss.get(i).copied().flatten().map(|(a, b)| (a + b) as f64);
        match (sum(1), hap_index.and_then(sum)) {
            (Some(r), Some(h)) => format!("{:.2}", r / h),
            _ => "-".into(),
        }
    };
    row(
        "RSS idle, ready before traffic, A / B (MB)",
        mb(&rss_start),
        none(),
        rss_vs_haproxy(&rss_start),
        "remora <= 8",
    );
    row(
        "RSS idle after 1 s of new connections (MB)",
        mb(&rss_idle),
        none(),
        rss_vs_haproxy(&rss_idle),
        "",
    );
    row(
        "RSS after load, proxy A / B (MB)",
        mb(&rss_after),
        none(),
        rss_vs_haproxy(&rss_after),
        "remora <= 15, <= 0.6x haproxy",
    );
    // Same-build and same-run comparisons with the remora path (the first pair): a
    // change's cost (baseline) and the policy path's cost (policy), each as the median of
    // the per-round ratios, so a slow round skews both sides alike.
    let remora = &series[1];
    for (path, s) in paths.iter().zip(&series).skip(2) {
        let (target, what) = match path.name {
            "baseline" => ("remora within 3 % of baseline", "remora ÷ baseline"),
            "policy" => ("policy <= 1.05x remora CPU", "policy ÷ remora"),
            _ => continue,
        };
        let (num, den) = if path.name == "baseline" {
            (remora, s)
        } else {
            (s, remora)
        };
        let r = |f: Field| median(f(num).iter().zip(f(den)).map(|(n, d)| n / d).collect());
        println!(
            "{what}: throughput {:.3}x, CPU per request at {RATE} rps {:.3}x, at max throughput {:.3}x, new connections {:.3}x   target: {target}",
            r(|s| &s.max),
            r(|s| &s.cpu_rate),
            r(|s| &s.cpu_max),
            r(|s| &s.connect),
        );
    }
    for (i, path) in paths.iter().enumerate() {
        if let Some(node) = path.accel {
            println!("{}", node.check(path.client)?);
            println!("{}", accel_line(&series, &paths, i, node.mode));
        }
    }
    println!("failed requests across all phases: {errors:.0}");
    Ok(())
}

/// An accelerated pair against its plain twin (and the Remora ones against the floor),
/// each figure the median of the per-round ratios (issue 14's targets), CPU per request
/// by each measure.
fn accel_line(series: &[Series], paths: &[Path<'_>], accel: usize, mode: accel::Mode) -> String {
    let at = |name: &str| paths.iter().position(|p| p.name == name);
    let (direct, a) = (&series[0], &series[accel]);
    let Some(plain) = at(mode.plain()).map(|i| &series[i]) else {
        return format!(
            "{}: no {} pair in this run",
            paths[accel].name,
            mode.plain()
        );
    };
    let r = |f: Field, num: &Series, den: &Series| {
        median(f(num).iter().zip(f(den)).map(|(n, d)| n / d).collect())
    };
    let added_p50 = median(
        (0..a.p50.len().min(plain.p50.len()))
            .map(|i| (a.p50[i] - direct.p50[i]) / (plain.p50[i] - direct.p50[i]))
            .collect(),
    );
    // The floor's own twin says nothing new against the floor.
    let floor = at("floor").filter(|_| mode != accel::Mode::Floor);
    let measures: [(&str, Field); 5] = [
        ("pair (sidecars)", |s| &s.cpu_rate),
        ("pods (apps + sidecars)", |s| &s.pods_rate),
        ("machine", |s| &s.machine_rate),
        ("pods at max throughput", |s| &s.pods_max),
        ("machine at max throughput", |s| &s.machine_max),
    ];
    let cpu = measures
        .iter()
        .map(|(what, f)| {
            let vs_floor = floor.map_or(String::new(), |i| {
                format!(", {:.3}x floor", r(*f, a, &series[i]))
            });
            format!("{what} {:.3}x {}{vs_floor}", r(*f, a, plain), mode.plain())
        })
        .collect::<Vec<_>>()
        .join("; ");
    let (name, twin) = (paths[accel].name, mode.plain());
    let targets = if mode == accel::Mode::Floor {
        "control: what the hops cost a sidecar that does nothing else"
    } else {
        "target <= 0.7x remora, < 1.0x floor"
    };
    format!(
        "{name} ÷ {twin}: added p50 at {RATE} rps {added_p50:.3}x, HTTP/1.1 throughput {:.3}x ({})\n{name} CPU per request at {RATE} rps unless said ({targets}): {cpu}",
        r(|s| &s.max, a, plain),
        if mode == accel::Mode::Floor {
            "control"
        } else {
            "targets <= 0.7x, >= 1.3x"
        },
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}
