//! `serve`: HTTP/1.1 and h2c on one port, gRPC health on another.
//!
//! `/` (any path but the two below) answers JSON saying who answered: the pod name
//! (`POD_NAME`, else the hostname), its IP (`POD_IP`, else the connection's local
//! address), the version (`DEMO_VERSION`, e.g. from the pod's `version` label through
//! the downward API), the hostname, and the request's method, path, protocol and
//! headers, so scenarios can see what the proxies forwarded. `?delay=250ms`, `?fail=0.5`
//! and `?status=418` shape one answer. `/healthz` is liveness; `/readyz` fails from
//! SIGTERM on, while the app keeps serving for `--shutdown-delay` and then drains.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::args::{ServeArgs, parse_duration, parse_rate};

/// Who this server is, read once at start.
#[derive(Debug, Clone)]
pub struct Identity {
    pub pod: String,
    pub pod_ip: Option<String>,
    pub version: String,
    pub hostname: String,
}

impl Identity {
    pub fn from_env() -> Self {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            pod: var("POD_NAME").unwrap_or_else(|| hostname.clone()),
            pod_ip: var("POD_IP"),
            version: var("DEMO_VERSION").unwrap_or_else(|| "unknown".into()),
            hostname,
        }
    }
}

/// Shared by every connection.
#[derive(Debug)]
pub struct App {
    pub id: Identity,
    delay: Duration,
    failure_rate: f64,
    served: AtomicU64,
    ready: AtomicBool,
}

impl App {
    pub fn new(id: Identity, delay: Duration, failure_rate: f64) -> Self {
        Self {
            id,
            delay,
            failure_rate,
            served: AtomicU64::new(0),
            ready: AtomicBool::new(true),
        }
    }

    /// Whether the `n`th request (from 0) fails at `rate`: exactly ⌊n·rate⌋ of the first
    /// n fail, spread evenly, so a scenario's count is exact rather than random.
    pub fn fails(n: u64, rate: f64) -> bool {
        ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor()
    }

    pub async fn handle(&self, req: Request<Incoming>, local: SocketAddr) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        match path.as_str() {
            "/healthz" => return text(StatusCode::OK, "ok\n"),
            "/readyz" if self.ready.load(Ordering::Relaxed) => {
                return text(StatusCode::OK, "ready\n");
            }
            "/readyz" => return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
            _ => {}
        }
        let q = match Query::parse(req.uri().query().unwrap_or("")) {
            Ok(q) => q,
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        };
        let delay = q.delay.unwrap_or(self.delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let n = self.served.fetch_add(1, Ordering::Relaxed);
        let failed = Self::fails(n, q.fail.unwrap_or(self.failure_rate));
        let status = if failed {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            q.status.unwrap_or(StatusCode::OK)
        };
        let headers: BTreeMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = json!({
            "pod": self.id.pod,
            "ip": self.id.pod_ip.clone().unwrap_or_else(|| local.ip().to_string()),
            "version": self.id.version,
            "hostname": self.id.hostname,
            "method": req.method().as_str(),
            "path": path,
            "proto": format!("{:?}", req.version()),
            "headers": headers,
            "failed": failed,
        });
        let mut resp = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        resp
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r
}

/// The query parameters that shape one answer.
#[derive(Debug, Default, PartialEq)]
pub struct Query {
    pub delay: Option<Duration>,
    pub fail: Option<f64>,
    pub status: Option<StatusCode>,
}

impl Query {
    pub fn parse(q: &str) -> Result<Self, String> {
        let mut out = Query::default();
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "delay" => out.delay = Some(parse_duration(v)?),
                "fail" => out.fail = Some(parse_rate(v)?),
                "status" => {
                    let code = v
                        .parse::<u16>()
                        .ok()
                        .and_then(|c| StatusCode::from_u16(c).ok());
                    out.status = Some(code.ok_or_else(|| format!("invalid status '{v}'"))?);
                }
                _ => {} // other parameters are the caller's business
            }
        }
        Ok(out)
    }
}

/// Runs until `shutdown` turns true, then fails readiness, waits the shutdown delay,
/// stops accepting and lets open connections finish (up to the drain timeout).
pub async fn run(args: ServeArgs, mut shutdown: watch::Receiver<bool>) -> Result<(), String> {
    let app = Arc::new(App::new(
        Identity::from_env(),
        args.delay,
        args.failure_rate,
    ));
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let grpc = args
        .grpc_listen
        .0
        .map(|addr| tokio::spawn(grpc(addr, shutdown.clone())));
    eprintln!(
        "remora-demo-app: serving HTTP on {} (pod {}, version {})",
        args.listen, app.id.pod, app.id.version
    );
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("remora-demo-app: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                spawn_conn(&app, &builder, &graceful, stream, args.listen);
            }
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    app.ready.store(false, Ordering::Relaxed);
    eprintln!(
        "remora-demo-app: shutting down: serving {:?} more, then draining",
        args.shutdown_delay
    );
    // Endpoints and proxies learn of the pod's removal concurrently with SIGTERM: keep
    // answering new connections meanwhile.
    let deadline = tokio::time::Instant::now() + args.shutdown_delay;
    while let Ok(Ok((stream, _))) = tokio::time::timeout_at(deadline, listener.accept()).await {
        spawn_conn(&app, &builder, &graceful, stream, args.listen);
    }
    drop(listener);
    if tokio::time::timeout(args.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!(
            "remora-demo-app: connections still open after {:?}; exiting",
            args.drain_timeout
        );
    }
    if let Some(g) = grpc {
        match g.await {
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(format!("gRPC server task: {e}")),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}

fn spawn_conn(
    app: &Arc<App>,
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    stream: TcpStream,
    listen: SocketAddr,
) {
    let local = stream.local_addr().unwrap_or(listen);
    // Small answers: without this, Nagle and delayed ACKs add ~10 ms per HTTP/2 exchange.
    let _ = stream.set_nodelay(true);
    let app = app.clone();
    let svc = hyper::service::service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.handle(req, local).await) }
    });
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .into_owned();
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        let _ = conn.await;
    });
}

/// `grpc.health.v1.Health` answering SERVING for "" and `remora.demo.Demo` until shutdown.
async fn grpc(addr: SocketAddr, mut shutdown: watch::Receiver<bool>) -> Result<(), String> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("remora.demo.Demo", tonic_health::ServingStatus::Serving)
        .await;
    eprintln!("remora-demo-app: serving gRPC health on {addr}");
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_shutdown(addr, async move {
            let _ = shutdown.wait_for(|s| *s).await;
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        })
        .await
        .map_err(|e| format!("gRPC server on {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_spread_exactly() {
        let fails = |rate: f64, n: u64| (0..n).filter(|i| App::fails(*i, rate)).count();
        assert_eq!(fails(0.1, 1000), 100);
        assert_eq!(fails(0.0, 1000), 0);
        assert_eq!(fails(1.0, 1000), 1000);
        assert_eq!(fails(0.5, 10), 5);
        // Evenly: never two in a row at 10 %.
        assert!(!(0..1000).any(|i| App::fails(i, 0.1) && App::fails(i + 1, 0.1)));
    }

    #[test]
    fn query_parameters() {
        assert_eq!(
            Query::parse("delay=250ms&fail=0.5&status=418&other=x"),
            Ok(Query {
                delay: Some(Duration::from_millis(250)),
                fail: Some(0.5),
                status: Some(StatusCode::IM_A_TEAPOT),
            })
        );
        assert_eq!(Query::parse(""), Ok(Query::default()));
        assert!(Query::parse("delay=soon").is_err());
        assert!(Query::parse("fail=2").is_err());
        assert!(Query::parse("status=99").is_err());
    }
}
