//! HTTP upstreams (HTTP/1.1 and HTTP/2 prior knowledge on one port) that count what the
//! attacks put through: an endless response, a body counter, and one that tracks how many
//! requests it holds at once.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

use super::super::{Body, full};

/// Serves `handler` on a loopback port (HTTP/1.1 and h2c).
async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// What an [`endless`] upstream sent.
#[derive(Debug, Default)]
pub struct Endless {
    pub bytes: AtomicU64,
    pub started: AtomicU64,
    /// When each response stream stopped being read (its receiver dropped).
    pub ended: Mutex<Vec<Instant>>,
}

/// Answers `/endless` with a body that never ends (64 KiB chunks, sent as fast as they
/// are taken), anything else with a short 200.
pub async fn endless() -> (SocketAddr, Arc<Endless>) {
    let stats: Arc<Endless> = Arc::default();
    let s = stats.clone();
    let addr = serve(move |req: Request<Incoming>| {
        let s = s.clone();
        async move {
            if req.uri().path() != "/endless" {
                return Response::new(full("ok"));
            }
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(1);
            s.started.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                while tx.send_data(chunk.clone()).await.is_ok() {
                    s.bytes.fetch_add(chunk.len() as u64, Relaxed);
                }
                s.ended.lock().expect("ended").push(Instant::now());
            });
            Response::new(body.boxed())
        }
    })
    .await;
    (addr, stats)
}

/// Counts request body bytes; answers 200 with the count in `x-body-bytes`.
pub async fn counting() -> (SocketAddr, Arc<AtomicU64>) {
    let total: Arc<AtomicU64> = Arc::default();
    let t = total.clone();
    let addr = serve(move |req| {
        let t = t.clone();
        async move {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Some(d) = frame.data_ref() {
                    n += d.len() as u64;
                    t.fetch_add(d.len() as u64, Relaxed);
                }
            }
            let mut resp = Response::new(full("counted"));
            resp.headers_mut()
                .insert("x-body-bytes", http::HeaderValue::from(n));
            resp
        }
    })
    .await;
    (addr, total)
}

/// Requests held by a [`holding`] upstream.
#[derive(Debug, Default)]
pub struct Held {
    pub total: AtomicU64,
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
}

/// Holds `/hold` requests for `delay` before answering 200; answers anything else at once.
pub async fn holding(delay: Duration) -> (SocketAddr, Arc<Held>) {
    let held: Arc<Held> = Arc::default();
    let h = held.clone();
    let addr = serve(move |req: Request<Incoming>| {
        let h = h.clone();
        async move {
            if req.uri().path() == "/hold" {
                h.total.fetch_add(1, Relaxed);
                let now = h.in_flight.fetch_add(1, Relaxed) + 1;
                h.max_in_flight.fetch_max(now, Relaxed);
                // Counted out also when the proxy gives up on the request (drop).
                let _out = InFlight(h.clone());
                tokio::time::sleep(delay).await;
            }
            Response::new(full("ok"))
        }
    })
    .await;
    (addr, held)
}

struct InFlight(Arc<Held>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}
