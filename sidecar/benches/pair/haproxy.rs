//! The HAProxy comparison of the pair bench: Debian's HAProxy (2.6) configured as the same
//! transparent sidecar pair as Remora, in each pod an outbound frontend on 15001 and an
//! inbound frontend on 15006, run as UID 1337 so the capture rules leave its own
//! connections alone.
//!
//! - `mode http`, one thread (`nbthread 1`), `http-reuse always`;
//! - outbound: plaintext frontend (HAProxy detects an HTTP/2 preface by itself) → `server
//!   … 0.0.0.0`, whose address is each connection's original destination (HAProxy reads
//!   `SO_ORIGINAL_DST` on Linux), with TLS 1.3 and the pod's certificate, verified against
//!   the mesh CA; HTTP/1 requests to a backend with ALPN `http/1.1`, HTTP/2 ones
//!   (`req.ver 2.0`) to one with ALPN `h2`, so each keeps its version between the proxies;
//! - inbound: TLS 1.3 terminated, client certificate required from the mesh CA, then to
//!   the original destination in the request's version (`proto h2` for HTTP/2).
//!
//! HAProxy 2.6 has no URI-SAN fetch, so the peer's SPIFFE ID is not matched (the CA is);
//! that is less work than Remora and Envoy do per handshake, in HAProxy's favour.
//! Its counters, read from the stats socket (`check`), prove the traffic went through it
//! with TLS and in both versions.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Command,
};

use crate::pki::IdentityPaths;

/// Opts out of the comparison (documented in the README).
pub const SKIP_ENV: &str = "REMORA_BENCH_SKIP_HAPROXY";

/// The HAProxy binary: `REMORA_HAPROXY`, else `haproxy` on the PATH (`make bench` installs
/// Debian's). `None` when opted out.
pub fn binary() -> anyhow::Result<Option<PathBuf>> {
    if std::env::var(SKIP_ENV).is_ok_and(|v| !v.is_empty()) {
        return Ok(None);
    }
    let bin = std::env::var_os("REMORA_HAPROXY").map_or_else(|| "haproxy".into(), PathBuf::from);
    let install = format!(
        "the pair bench compares against HAProxy: run it with `make bench` (apt-get install -y haproxy), or point REMORA_HAPROXY at a haproxy binary, or opt out with {SKIP_ENV}=1"
    );
    let out = Command::new(&bin)
        .arg("-v")
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}; {install}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} -v failed; {install}",
        bin.display()
    );
    Ok(Some(bin))
}

/// `HAProxy version 2.6.12-1+deb12u4 2025/...` → `2.6.12`.
pub fn version(bin: &str) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let v = text.split_whitespace().nth(2)?;
            Some(v.split('-').next().unwrap_or(v).to_owned())
        })
        .unwrap_or_else(|| "?".into())
}

/// A pod's HAProxy files: its config, the certificate and key in one PEM, and the stats
/// socket, in a directory of UID 1337's own.
#[derive(Debug)]
pub struct Files {
    pub config: PathBuf,
    pub stats: PathBuf,
}

/// Writes the config of one pod's HAProxy under `dir/<name>`.
pub fn write(dir: &Path, name: &str, id: &IdentityPaths) -> anyhow::Result<Files> {
    let own = dir.join(name);
    std::fs::create_dir_all(&own)?;
    std::os::unix::fs::chown(&own, Some(1337), Some(1337))?;
    let pem = own.join("identity.pem");
    let text = std::fs::read_to_string(&id.cert)? + &std::fs::read_to_string(&id.key)?;
    std::fs::write(&pem, text)?;
    std::os::unix::fs::chown(&pem, Some(1337), Some(1337))?;
    let stats = own.join("stats.sock");
    let config = own.join("haproxy.cfg");
    std::fs::write(&config, config_text(&pem, &id.bundle, &stats))?;
    std::os::unix::fs::chown(&config, Some(1337), Some(1337))?;
    Ok(Files { config, stats })
}

fn config_text(pem: &Path, bundle: &Path, stats: &Path) -> String {
    let (pem, bundle, stats) = (pem.display(), bundle.display(), stats.display());
    let tls = format!("ssl crt {pem} ca-file {bundle} verify required ssl-min-ver TLSv1.3");
    format!(
        r#"global
    nbthread 1
    maxconn 4096
    stats socket {stats} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always
frontend outbound
    bind 0.0.0.0:15001
    use_backend mesh_h2 if {{ req.ver 2.0 }}
    default_backend mesh_h1
backend mesh_h1
    server peer 0.0.0.0 {tls} alpn http/1.1
backend mesh_h2
    server peer 0.0.0.0 {tls} alpn h2
frontend inbound
    bind 0.0.0.0:15006 {tls} alpn h2,http/1.1
    use_backend app_h2 if {{ req.ver 2.0 }}
    default_backend app_h1
backend app_h1
    server app 0.0.0.0
backend app_h2
    server app 0.0.0.0 proto h2
"#
    )
}

/// Checks a config with `haproxy -c`: a bad one fails at once, with HAProxy's reason.
pub fn validate(bin: &str, config: &Path) -> anyhow::Result<()> {
    let out = Command::new(bin).arg("-c").arg("-f").arg(config).output()?;
    anyhow::ensure!(
        out.status.success(),
        "haproxy rejects {}: {}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The sidecar's arguments after the binary: foreground, no daemon.
pub fn args(config: &Path) -> Vec<String> {
    vec!["-db".into(), "-f".into(), config.display().to_string()]
}

/// One command on the stats socket; its answer.
fn ask(socket: &Path, command: &str) -> anyhow::Result<String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| anyhow::anyhow!("stats socket {}: {e}", socket.display()))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// The `field` of `proxy`/`server` in `show stat`'s CSV.
fn stat(csv: &str, proxy: &str, server: &str, field: &str) -> anyhow::Result<u64> {
    let mut lines = csv.lines();
    let head = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| anyhow::anyhow!("no `show stat` header"))?;
    let col = head
        .split(',')
        .position(|c| c == field)
        .ok_or_else(|| anyhow::anyhow!("no {field} in `show stat`"))?;
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|c| c.first() == Some(&proxy) && c.get(1) == Some(&server))
        .and_then(|c| c.get(col)?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {proxy}/{server} {field} in `show stat`"))
}

/// `CumSslConns` of `show info`: TLS connections made or accepted.
fn tls_connections(socket: &Path) -> anyhow::Result<u64> {
    ask(socket, "show info")?
        .lines()
        .find_map(|l| l.strip_prefix("CumSslConns: "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no CumSslConns in `show info`"))
}

/// Proof that the HAProxy path is the pair it should be: A's outgoing connections were TLS
/// (its only TLS side) in both versions that ran (`h2` when an HTTP/2 phase ran), and B
/// accepted TLS and answered requests.
pub fn check(a: &Files, b: &Files, h2: bool) -> anyhow::Result<()> {
    let fail = |what: &str, v: u64| anyhow::anyhow!("haproxy: {what} is {v}");
    let a_stats = ask(&a.stats, "show stat")?;
    let b_stats = ask(&b.stats, "show stat")?;
    let mut counters = vec![
        ("A's TLS connections", tls_connections(&a.stats)?),
        ("B's TLS connections", tls_connections(&b.stats)?),
        (
            "A's HTTP/1.1 sessions to B",
            stat(&a_stats, "mesh_h1", "BACKEND", "stot")?,
        ),
        (
            "B's inbound requests",
            stat(&b_stats, "inbound", "FRONTEND", "req_tot")?,
        ),
    ];
    if h2 {
        counters.push((
            "A's HTTP/2 sessions to B",
            stat(&a_stats, "mesh_h2", "BACKEND", "stot")?,
        ));
        counters.push((
            "B's HTTP/2 sessions to the app",
            stat(&b_stats, "app_h2", "BACKEND", "stot")?,
        ));
    }
    for (what, v) in counters {
        if v == 0 {
            return Err(fail(what, v));
        }
    }
    Ok(())
}
