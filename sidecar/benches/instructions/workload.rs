//! The measured side of the instruction-count guard (`instructions --measure PATH VIA N`,
//! run under callgrind by `instructions.rs`): one process, one thread, one
//! current-thread Tokio runtime holding the client, the app server and — on the `pair`
//! side — proxy A (outbound) and proxy B (inbound) joined by mTLS on loopback, the way
//! `tests/mtls.rs` runs them (`OrigDstMode::Fixed`: no iptables in process).
//!
//! Everything runs on one thread so that the order of events, and with it the number of
//! instructions, is the same on every run: loopback delivers a write to the peer's queue
//! inside the `write` call, and a single scheduler polls the tasks in the same order each
//! time. The setup (certificates, proxies, config) and a warm-up are outside the counted
//! window: only `instructions_window` is counted (`--toggle-collect`), which drives the `N`
//! requests. The `direct` side runs the same client against the same server without the
//! proxies, so the pair's own cost is the difference.

use std::{
    convert::Infallible, future::Future, net::SocketAddr, path::Path as FsPath, pin::Pin,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_crds::proxy::ProxyConfig;
use remora_proxy::{Proxy, Settings, listen::OrigDstMode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
    task::JoinSet,
};

use crate::pki::{Ca, IdentityPaths};

/// Request and response bodies, and each TCP message: 1 KiB, as in the pair bench.
const BODY: usize = 1024;
/// A TCP message: binary from its first byte, so that B's detection (inside mTLS) calls it
/// opaque at once; a run of token characters could be the start of an HTTP/1 request line
/// and would wait for more, up to the detection timeout.
const MESSAGE: [u8; BODY] = [0; BODY];
/// Concurrent streams on the h2c connection (the pair bench's h2c phase has 16 per
/// connection).
const STREAMS: u64 = 16;
/// The service address proxy A's app calls (`OrigDstMode::Fixed`).
const VIP: &str = "10.96.0.80:8080";
const FRONTEND: &str = "spiffe://cluster.local/ns/bench/sa/client";
const BACKEND: &str = "spiffe://cluster.local/ns/bench/sa/server";
/// No config or identity poll falls in the counted window.
const POLL: Duration = Duration::from_secs(24 * 3600);

/// What one "request" of a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// `POST` 1 KiB → 1 KiB on one kept-alive HTTP/1.1 connection; HTTP/1.1 mTLS between
    /// the proxies (the default `--mesh-protocol`).
    Http1,
    /// The same on one HTTP/2 prior-knowledge connection, 16 streams at a time; HTTP/2
    /// between the proxies and to the app.
    H2c,
    /// A new client connection per request (`connection: close`): accept, original
    /// destination, detection, the pooled mTLS connection to B.
    Connect,
    /// A new opaque TCP connection per request: accept, a new mTLS connection (handshake)
    /// to B, B's connection to the app, 1 KiB echoed, both closed.
    Handshake,
    /// 1 KiB echoed on one long opaque TCP connection (mTLS between the proxies).
    Tcp,
}

impl Path {
    pub const ALL: [Path; 5] = [
        Path::Http1,
        Path::H2c,
        Path::Connect,
        Path::Handshake,
        Path::Tcp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Path::Http1 => "http1",
            Path::H2c => "h2c",
            Path::Connect => "connect",
            Path::Handshake => "handshake",
            Path::Tcp => "tcp",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown path {s:?}"))
    }

    /// Requests counted: enough that per-request figures do not move with the few
    /// instructions that depend on time (timer wheel, cached `date` header).
    pub fn requests(self) -> u64 {
        match self {
            Path::Http1 | Path::Tcp => 2000,
            Path::H2c => 2048,
            Path::Connect => 400,
            Path::Handshake => 100,
        }
    }

    /// Requests before the window: pools, buffers, session caches and tables settle.
    fn warmup(self) -> u64 {
        match self {
            Path::Handshake => 10,
            Path::H2c => 4 * STREAMS,
            _ => 50,
        }
    }

    fn protocol(self) -> &'static str {
        match self {
            Path::Handshake | Path::Tcp => "opaque",
            _ => "detect",
        }
    }
}

/// Through the proxy pair, or straight to the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Pair,
    Direct,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Pair => "pair",
            Via::Direct => "direct",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "pair" => Ok(Via::Pair),
            "direct" => Ok(Via::Direct),
            _ => anyhow::bail!("unknown side {s:?} (pair or direct)"),
        }
    }
}

/// `--measure PATH VIA N`: sets up, warms up, and runs `n` requests in the counted window.
pub fn measure(path: Path, via: Via, n: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        path != Path::H2c || n.is_multiple_of(STREAMS),
        "h2c requests come {STREAMS} at a time"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let (mut client, _proxies) = rt.block_on(setup(path, via, dir.path()))?;
    rt.block_on(client.run(path.warmup()))?;
    instructions_window(&rt, Box::pin(client.run(n)))
}

/// The only function callgrind counts in (`--toggle-collect=*instructions_window`): not
/// inlined, not generic, so that its symbol is there to match.
#[inline(never)]
fn instructions_window(
    rt: &Runtime,
    work: Pin<Box<dyn Future<Output = anyhow::Result<()>> + '_>>,
) -> anyhow::Result<()> {
    rt.block_on(work)
}

/// The app, the proxies (on the pair side) and a connected client.
async fn setup(path: Path, via: Via, dir: &FsPath) -> anyhow::Result<(Client, Vec<Proxy>)> {
    let app = match path {
        Path::Http1 | Path::Connect => serve(false).await?,
        Path::H2c => serve(true).await?,
        Path::Handshake | Path::Tcp => echo().await?,
    };
    let (target, proxies) = match via {
        Via::Direct => (app, Vec::new()),
        Via::Pair => {
            let (a, b) = pair(app, path.protocol(), dir).await?;
            (a.outbound_addrs[0], vec![a, b])
        }
    };
    let conn = match path {
        Path::Http1 => Conn::Http1(h1(target).await?.0),
        Path::H2c => {
            let s = TcpStream::connect(target).await?;
            s.set_nodelay(true)?;
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                    .await?;
            tokio::spawn(conn);
            Conn::H2(send)
        }
        Path::Tcp => {
            let s = TcpStream::connect(target).await?;
            s.set_nodelay(true)?;
            Conn::Tcp(s)
        }
        Path::Connect => Conn::NewHttp1,
        Path::Handshake => Conn::NewTcp,
    };
    Ok((Client { target, conn }, proxies))
}

fn settings(target: SocketAddr) -> anyhow::Result<Settings> {
    Ok(Settings {
        outbound_listen: vec!["127.0.0.1:0".parse()?],
        inbound_listen: vec!["127.0.0.1:0".parse()?],
        admin_listen: None,
        orig_dst: OrigDstMode::Fixed(target),
        config_poll_interval: POLL,
        ..Settings::default()
    })
}

/// Proxy A (outbound, the app calls `VIP`) and proxy B (inbound, strict mTLS, in front of
/// `app`), with certificates of one CA.
async fn pair(app: SocketAddr, protocol: &str, dir: &FsPath) -> anyhow::Result<(Proxy, Proxy)> {
    let ca = Ca::new("remora instructions CA");
    let b_id = IdentityPaths::write(dir, "server", BACKEND, &ca, &ca);
    let a_id = IdentityPaths::write(dir, "client", FRONTEND, &ca, &ca);
    let b_yaml = format!(
        "version: 1\n{}inbound:\n  default: {{mtls: Strict}}\n",
        b_id.yaml()
    );
    let b = start(settings(app)?, &b_yaml).await?;
    let b_in = b.inbound_addrs[0];
    let a_yaml = format!(
        "version: 1\n{}outbound:\n  services:\n  - name: server.bench\n    addresses: [\"{VIP}\"]\n    protocol: {protocol}\n    endpoints:\n    - {{address: \"{b_in}\", identity: \"{BACKEND}\", meshed: true}}\n",
        a_id.yaml()
    );
    let a = start(settings(VIP.parse()?)?, &a_yaml).await?;
    Ok((a, b))
}

async fn start(settings: Settings, yaml: &str) -> anyhow::Result<Proxy> {
    let config = ProxyConfig::from_yaml(yaml)?;
    Ok(Proxy::start(settings, config, None).await?)
}

async fn listener() -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    Ok((l, addr))
}

/// The app: every request's body read, answered with 1 KiB; HTTP/2 prior knowledge when
/// `h2`, else HTTP/1.1.
async fn serve(h2: bool) -> anyhow::Result<SocketAddr> {
    let (l, addr) = listener().await?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(&[b'x'; BODY]))))
                });
                let io = TokioIo::new(s);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await
                };
            });
        }
    });
    Ok(addr)
}

/// A TCP echo app; a half-close is answered with one.
async fn echo() -> anyhow::Result<SocketAddr> {
    let (l, addr) = listener().await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An HTTP/1.1 connection and the task driving it (done once the connection is closed).
async fn h1(addr: SocketAddr) -> anyhow::Result<(H1, tokio::task::JoinHandle<()>)> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, task))
}

fn request(close: bool) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut b = Request::post("http://app.bench/instructions").header("host", "app.bench");
    if close {
        b = b.header("connection", "close");
    }
    Ok(b.body(Full::new(Bytes::from_static(&[b'y'; BODY])))?)
}

/// A response's body, checked to be the app's 1 KiB.
async fn check(resp: Response<Incoming>) -> anyhow::Result<()> {
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success() && body.len() == BODY,
        "bad response: {status}, {} bytes",
        body.len()
    );
    Ok(())
}

enum Conn {
    Http1(H1),
    H2(H2),
    Tcp(TcpStream),
    /// A new HTTP/1.1 connection for every request.
    NewHttp1,
    /// A new TCP connection for every request.
    NewTcp,
}

struct Client {
    target: SocketAddr,
    conn: Conn,
}

impl Client {
    async fn run(&mut self, n: u64) -> anyhow::Result<()> {
        let target = self.target;
        match &mut self.conn {
            Conn::Http1(send) => {
                for _ in 0..n {
                    send.ready().await?;
                    check(send.send_request(request(false)?).await?).await?;
                }
            }
            Conn::H2(send) => {
                for _ in 0..n / STREAMS {
                    let mut streams = JoinSet::new();
                    for _ in 0..STREAMS {
                        let mut send = send.clone();
                        streams.spawn(async move {
                            send.ready().await?;
                            check(send.send_request(request(false)?).await?).await
                        });
                    }
                    while let Some(done) = streams.join_next().await {
                        done??;
                    }
                }
            }
            Conn::Tcp(s) => {
                let mut buf = [0u8; BODY];
                for _ in 0..n {
                    s.write_all(&MESSAGE).await?;
                    s.read_exact(&mut buf).await?;
                }
            }
            Conn::NewTcp => {
                let mut buf = [0u8; BODY];
                for _ in 0..n {
                    let mut s = TcpStream::connect(target).await?;
                    s.set_nodelay(true)?;
                    s.write_all(&MESSAGE).await?;
                    s.read_exact(&mut buf).await?;
                    // Closed both ways inside the request, so its teardown is counted
                    // with it and not with a later one.
                    s.shutdown().await?;
                    anyhow::ensure!(s.read(&mut buf).await? == 0, "echo after half-close");
                }
            }
            Conn::NewHttp1 => {
                for _ in 0..n {
                    let (mut send, task) = h1(target).await?;
                    check(send.send_request(request(true)?).await?).await?;
                    drop(send);
                    task.await?;
                }
            }
        }
        Ok(())
    }
}
