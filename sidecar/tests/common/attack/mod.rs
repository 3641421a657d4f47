//! Harness of the `attacks_*` tests: each proxy runs in a process of its own, so that its
//! memory (`VmRSS`) and CPU time can be read from `/proc/<pid>` apart from the attacker's.
//!
//! The process is this test binary run again with [`CHILD_ENV`] set and the name of the
//! test that asked for it: the test's first line, [`serve_if_child`], then starts the
//! proxy with the settings the environment describes (the original destination fixed, as
//! there are no iptables rules on loopback, which the release binary has no flag for) and
//! serves until its stdin closes, i.e. until the test that started it drops its
//! [`ProxyProc`] or dies. The child prints its listener addresses on one stdout line.
//!
//! The tests run on a two-worker runtime, so that a blocking helper (a process spawn, a
//! thread join) never starves the upstreams they start on it.
//!
//! [`Pair`] is the mesh as a pod sees it: client → proxy A (outbound, the client pod's
//! sidecar) → mTLS → proxy B (inbound, the server pod's sidecar) → the server.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use remora_crds::proxy::ProxyConfig;
use remora_proxy::Proxy;
use tempfile::TempDir;

use super::pki::{Ca, IdentityPaths};

pub mod h2raw;
pub mod raw_http;
pub mod upstreams;

/// Set (to the test's name) in the environment of a proxy child process.
pub const CHILD_ENV: &str = "REMORA_ATTACK_PROXY_CHILD";
const DST_ENV: &str = "REMORA_ATTACK_PROXY_DST";
const CONFIG_ENV: &str = "REMORA_ATTACK_PROXY_CONFIG";
const KNOBS_ENV: &str = "REMORA_ATTACK_PROXY_KNOBS";
const READY: &str = "REMORA_ATTACK_PROXY_READY";

pub const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
pub const REVIEWS: &str = "spiffe://cluster.local/ns/shop/sa/reviews";
/// The service address the client pod calls (never dialled: A's destination is fixed).
pub const VIP: &str = "10.96.0.12:9080";

/// The limits a test shortens; `None` keeps the proxy's default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Knobs {
    pub header_read_timeout: Option<Duration>,
    pub body_idle_timeout: Option<Duration>,
    pub write_stall_timeout: Option<Duration>,
}

impl Knobs {
    fn encode(&self) -> String {
        let ms = |d: Option<Duration>| d.map_or(String::new(), |d| d.as_millis().to_string());
        format!(
            "{},{},{}",
            ms(self.header_read_timeout),
            ms(self.body_idle_timeout),
            ms(self.write_stall_timeout)
        )
    }

    fn decode(s: &str) -> Self {
        let mut parts = s.split(',').map(|p| {
            (!p.is_empty()).then(|| Duration::from_millis(p.parse().expect("knob in ms")))
        });
        Self {
            header_read_timeout: parts.next().flatten(),
            body_idle_timeout: parts.next().flatten(),
            write_stall_timeout: parts.next().flatten(),
        }
    }
}

/// In a proxy child process: serves the proxy its environment describes until stdin
/// closes, then exits the process. Elsewhere: returns at once.
pub async fn serve_if_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // The proxy gets a single-threaded runtime of its own, as the binary gives it by
    // default, whatever runtime the test itself runs on.
    std::thread::spawn(run_child);
    std::future::pending::<()>().await;
}

fn run_child() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set for a child"));
    let dst: SocketAddr = var(DST_ENV).parse().expect("destination");
    let yaml = std::fs::read_to_string(var(CONFIG_ENV)).expect("read the child's config");
    let knobs = Knobs::decode(&var(KNOBS_ENV));
    let mut settings = super::settings(dst);
    if let Some(t) = knobs.header_read_timeout {
        settings.header_read_timeout = t;
    }
    if let Some(t) = knobs.body_idle_timeout {
        settings.http_limits.body_idle_timeout = t;
    }
    if let Some(t) = knobs.write_stall_timeout {
        settings.http_limits.write_stall_timeout = t;
    }
    let config = ProxyConfig::from_yaml(&yaml).expect("child config");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("child runtime");
    runtime.block_on(async move {
        let proxy = Proxy::start(settings, config, None)
            .await
            .expect("child proxy starts");
        println!(
            "\n{READY} {} {} {}",
            proxy.inbound_addrs[0],
            proxy.outbound_addrs[0],
            proxy.admin_addr.expect("admin")
        );
        std::io::stdout().flush().expect("flush");
        // The parent holds our stdin: EOF means it is done (or gone).
        std::thread::spawn(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            std::process::exit(0);
        });
        std::future::pending::<()>().await;
    });
}

/// The resident memory of process `pid` in KiB (`VmRSS`), while it runs.
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Samples the RSS of `pids` every 100 ms until `stop`; the highest of each.
pub fn peak_rss(
    pids: Vec<u32>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let mut peak = vec![0; pids.len()];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (p, pid) in peak.iter_mut().zip(&pids) {
                *p = (*p).max(rss_kib_of(*pid).unwrap_or(0));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    })
}

/// A proxy process, killed on drop.
pub struct ProxyProc {
    child: Child,
    _stdin: ChildStdin,
    /// The config and certificates of a proxy started alone.
    _dir: Option<TempDir>,
    pub pid: u32,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ProxyProc {
    /// Runs the test `test` of this binary as a proxy with `yaml`, every connection going
    /// to `dst`.
    pub fn spawn(test: &str, dst: SocketAddr, yaml: &str, dir: &Path, knobs: Knobs) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config = dir.join(format!("proxy-{n}.yaml"));
        std::fs::write(&config, yaml).expect("write the child's config");
        let exe = std::env::current_exe().expect("test binary");
        let mut child = Command::new(exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, test)
            .env(DST_ENV, dst.to_string())
            .env(CONFIG_ENV, &config)
            .env(KNOBS_ENV, knobs.encode())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the proxy child");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Drained to the end so the child never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest may have begun the line ("test name ... ").
                if let Some(at) = line.find(READY) {
                    let _ = tx.send(line[at + READY.len()..].trim().to_owned());
                }
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            panic!("the proxy child for test {test} did not start (is serve_if_child() the first line of that test?)")
        });
        let addrs: Vec<SocketAddr> = line
            .split(' ')
            .map(|a| a.parse().expect("child address"))
            .collect();
        Self {
            pid: child.id(),
            child,
            _stdin: stdin,
            inbound: addrs[0],
            outbound: addrs[1],
            admin: addrs[2],
            _dir: None,
        }
    }

    /// One proxy without an identity (plaintext HTTP/1 and h2c), every connection going
    /// to `dst`: what a client outside the mesh reaches at a pod in permissive mode.
    pub fn alone(test: &str, dst: SocketAddr, knobs: Knobs) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = Self::spawn(test, dst, "version: 1\n", dir.path(), knobs);
        p._dir = Some(dir);
        p
    }

    /// Resident memory in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        rss_kib_of(self.pid).expect("the proxy process runs")
    }

    /// User + system CPU time, in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).expect("stat");
        // The command name may hold spaces; fields resume after its closing parenthesis.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state): utime is field 14, stime field 15.
        let utime: u64 = fields[11].parse().expect("utime");
        let stime: u64 = fields[12].parse().expect("stime");
        utime + stime
    }

    /// The process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Client → A (outbound) → mTLS → B (inbound) → `server`.
pub struct Pair {
    pub a: ProxyProc,
    pub b: ProxyProc,
    _dir: TempDir,
}

impl Pair {
    /// The pair for test `test`, B's app at `server`; A's service has `protocol`.
    pub fn start(test: &str, server: SocketAddr, knobs: Knobs, protocol: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new("remora attack CA");
        let b_ids = IdentityPaths::write(dir.path(), "reviews", REVIEWS, &ca, &ca);
        let a_ids = IdentityPaths::write(dir.path(), "frontend", FRONTEND, &ca, &ca);
        let b = ProxyProc::spawn(
            test,
            server,
            &format!("version: 1\n{}", b_ids.yaml()),
            dir.path(),
            knobs,
        );
        let a_yaml = format!(
            "version: 1\n{}outbound:\n  services:\n  - name: reviews.shop\n    addresses: [\"{VIP}\"]\n    protocol: {protocol}\n    endpoints:\n    - {{address: \"{}\", identity: \"{REVIEWS}\", meshed: true}}\n",
            a_ids.yaml(),
            b.inbound
        );
        let a = ProxyProc::spawn(test, VIP.parse().expect("vip"), &a_yaml, dir.path(), knobs);
        Self { a, b, _dir: dir }
    }

    /// Both proxies' RSS in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        (self.a.rss_kib(), self.b.rss_kib())
    }
}

/// The value of the metric series `series` (name and labels, as exposed) on a proxy's
/// admin port; 0 while it has no such series.
pub async fn metric(admin: SocketAddr, series: &str) -> u64 {
    let (status, text) = super::admin_get(admin, "/metrics").await;
    assert_eq!(status, http::StatusCode::OK, "/metrics");
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Latencies of plain requests a well-behaved client sends while an attack runs.
#[derive(Debug, Default)]
pub struct Latencies(pub Vec<Duration>);

impl Latencies {
    pub fn max(&self) -> Duration {
        self.0.iter().copied().max().unwrap_or_default()
    }

    pub fn p50(&self) -> Duration {
        let mut v = self.0.clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} requests, p50 {:?}, max {:?}",
            self.0.len(),
            self.p50(),
            self.max()
        )
    }
}

/// Sends a `GET path` on a new HTTP/1.1 connection to `addr` every `every` until `stop`
/// fires; each must answer 200. Runs on a thread with its own runtime, so that an attacker
/// busy on the test's runtime cannot delay it.
pub fn probe_latency(
    addr: SocketAddr,
    path: &'static str,
    every: Duration,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<Latencies>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("probe runtime");
        rt.block_on(async move {
            let mut out = Latencies::default();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let mut send = super::h1(addr).await;
                let resp = tokio::time::timeout(
                    Duration::from_secs(20),
                    send.send_request(super::get(path)),
                )
                .await
                .expect("the proxy answers another client within 20 s")
                .expect("a response");
                assert_eq!(resp.status(), http::StatusCode::OK, "probe {path}");
                out.0.push(started.elapsed());
                tokio::time::sleep(every).await;
            }
            out
        })
    });
    (stop, handle)
}

/// Stops a [`probe_latency`] and returns what it measured. (The wait for its thread runs
/// off the test's runtime, whose upstreams may be answering the probe's last request.)
pub async fn stop_probe(
    (stop, handle): (
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<Latencies>,
    ),
) -> Latencies {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::task::spawn_blocking(move || handle.join())
        .await
        .expect("join the probe")
        .expect("the probe did not panic")
}
