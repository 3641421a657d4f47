//! Classic-sidecar lifecycle hooks, run by kubelet inside the proxy container against the
//! running proxy's admin port: `wait-ready` (postStart: kubelet starts the app container
//! only once it returns, so the app starts behind a ready proxy) and `drain` (preStop:
//! start the same graceful shutdown as SIGTERM, then wait for the proxy to exit).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How often the admin port is polled.
const POLL: Duration = Duration::from_millis(100);
/// The longest a single admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a lifecycle hook failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("the proxy at {admin} is not ready after {timeout:?} (last answer: {last})")]
    NotReady {
        admin: SocketAddr,
        timeout: Duration,
        last: String,
    },
    #[error("the proxy at {admin} refused to drain: {status} {body}")]
    DrainRefused {
        admin: SocketAddr,
        status: StatusCode,
        body: String,
    },
}

/// What one admin request got: a status and body, or why there was none.
#[derive(Debug)]
enum Answer {
    Http(StatusCode, String),
    /// Nothing listens on the admin port (the proxy is not running).
    Refused,
    Failed(String),
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http(s, body) => write!(f, "{} {}", s.as_u16(), body.trim()),
            Self::Refused => f.write_str("connection refused"),
            Self::Failed(e) => f.write_str(e),
        }
    }
}

async fn request(admin: SocketAddr, method: Method, path: &str, limit: Duration) -> Answer {
    let attempt = async {
        let stream = match TcpStream::connect(admin).await {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Answer::Refused;
            }
            Err(e) => return Answer::Failed(format!("connect: {e}")),
        };
        let (mut send, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(h) => h,
                Err(e) => return Answer::Failed(format!("handshake: {e}")),
            };
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .body(Empty::<Bytes>::new());
        let req = match req {
            Ok(r) => r,
            Err(e) => return Answer::Failed(format!("request: {e}")),
        };
        let resp = match send.send_request(req).await {
            Ok(r) => r,
            Err(e) => return Answer::Failed(format!("request: {e}")),
        };
        let status = resp.status();
        let body = match resp.into_body().collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(e) => format!("(body: {e})"),
        };
        Answer::Http(status, body)
    };
    tokio::time::timeout(limit.min(REQUEST_TIMEOUT), attempt)
        .await
        .unwrap_or_else(|_| Answer::Failed("no answer in time".to_owned()))
}

/// Polls `GET /ready` on `admin` until it answers 200, or fails after `timeout`.
pub async fn wait_ready(admin: SocketAddr, timeout: Duration) -> Result<(), LifecycleError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = request(admin, Method::GET, "/ready", left.max(POLL)).await;
        if matches!(answer, Answer::Http(StatusCode::OK, _)) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LifecycleError::NotReady {
                admin,
                timeout,
                last: answer.to_string(),
            });
        }
        tokio::time::sleep(POLL.min(left)).await;
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// The proxy stopped (its admin port closed) within the grace period.
    Stopped,
    /// Nothing listened on the admin port: no proxy to drain.
    NotRunning,
    /// The grace period passed with the proxy still running (kubelet's SIGTERM and
    /// SIGKILL take it from here).
    GracePeriodOver,
}

/// Starts the proxy's graceful shutdown (`POST /shutdown`, the SIGTERM path: stop
/// accepting, HTTP/2 GOAWAY, in-flight requests finish), then waits until the proxy has
/// stopped or `grace` has passed.
pub async fn drain(admin: SocketAddr, grace: Duration) -> Result<Drained, LifecycleError> {
    let deadline = Instant::now() + grace;
    match request(admin, Method::POST, "/shutdown", grace.max(POLL)).await {
        Answer::Http(StatusCode::OK, _) => {}
        Answer::Refused => return Ok(Drained::NotRunning),
        Answer::Http(status, body) => {
            return Err(LifecycleError::DrainRefused {
                admin,
                status,
                body: body.trim().to_owned(),
            });
        }
        // The proxy may have closed the connection because it is already stopping.
        Answer::Failed(e) => tracing::debug!(error = %e, "shutdown request failed"),
    }
    loop {
        // The admin server lives exactly as long as the process.
        if let Err(e) = TcpStream::connect(admin).await
            && e.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return Ok(Drained::Stopped);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Drained::GracePeriodOver);
        }
        tokio::time::sleep(POLL.min(left)).await;
    }
}
