//! Telling a classic sidecar that the app is done: `POST /shutdown` on the proxy's admin
//! port (loopback only), which drains the proxy and makes it exit 0. Without it a Job's
//! pod never completes on clusters without native sidecars, because its proxy container
//! keeps running after the app has exited. `load --stop-proxy` does this at the end, as a
//! user's Job would (`curl -fsS -X POST http://127.0.0.1:15020/shutdown`, or Istio's
//! `/quitquitquit`).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The proxy's admin address inside the pod.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15020";

/// How long the request may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Why the proxy could not be told.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("no proxy listens on {0} (a native sidecar stops by itself; no mesh, nothing to stop)")]
    NoProxy(SocketAddr),
    #[error("asking the proxy at {admin} to stop: {reason}")]
    Failed { admin: SocketAddr, reason: String },
    #[error("the proxy at {admin} answered {status}: {body}")]
    Refused {
        admin: SocketAddr,
        status: StatusCode,
        body: String,
    },
}

/// Asks the proxy at `admin` to drain and exit.
pub async fn stop(admin: SocketAddr) -> Result<(), StopError> {
    let failed = |reason: String| StopError::Failed { admin, reason };
    let exchange = async {
        let stream = match TcpStream::connect(admin).await {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(StopError::NoProxy(admin));
            }
            Err(e) => return Err(failed(format!("connect: {e}"))),
        };
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(format!("handshake: {e}")))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::POST)
            .uri("/shutdown")
            .header(http::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(format!("request: {e}")))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| failed(format!("request: {e}")))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        if status == StatusCode::OK {
            Ok(())
        } else {
            Err(StopError::Refused {
                admin,
                status,
                body,
            })
        }
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(failed(format!("no answer within {TIMEOUT:?}"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A one-shot HTTP/1.1 server on loopback answering `status`; returns what it read.
    async fn one_shot(status: &'static str) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.expect("read");
            let body = "shutting down\n";
            s.write_all(
                format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .expect("write");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn posts_shutdown_to_the_admin_port() {
        let (addr, seen) = one_shot("200 OK").await;
        stop(addr).await.expect("stopped");
        let request = seen.await.expect("server");
        assert!(
            request.starts_with("POST /shutdown HTTP/1.1\r\n"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn failures_say_what_happened() {
        let (addr, _seen) = one_shot("403 Forbidden").await;
        let err = stop(addr).await.expect_err("refused").to_string();
        assert!(
            err.contains("answered 403 Forbidden: shutting down"),
            "{err}"
        );

        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let free = l.local_addr().expect("addr");
        drop(l);
        let err = stop(free).await.expect_err("nothing listens");
        assert!(matches!(err, StopError::NoProxy(a) if a == free), "{err}");
    }
}
