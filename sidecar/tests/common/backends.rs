//! Programmable HTTP/1.1 backends for policy tests: each answers with its name (body and
//! `x-backend`), counts its hits, and can be told to fail, slow down or hang.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// How a backend answers.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// Status of every answer (0: 200).
    pub status: AtomicU16,
    /// Every `fail_every`-th request (counting from 1) gets a 503; 0: never.
    pub fail_every: AtomicU32,
    pub delay_ms: AtomicU64,
    /// Never answer.
    pub hang: AtomicBool,
}

/// A running backend.
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    pub how: Arc<Behaviour>,
}

impl Backend {
    pub async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let backend = Self {
            name,
            addr,
            hits: Arc::default(),
            how: Arc::default(),
        };
        let b = backend.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let b = b.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let b = b.clone();
                        async move { Ok::<_, Infallible>(b.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        backend
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let n = self.hits.fetch_add(1, Relaxed) + 1;
        let _ = req.into_body().collect().await;
        if self.how.hang.load(Relaxed) {
            std::future::pending::<()>().await;
        }
        let delay = self.how.delay_ms.load(Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let every = u64::from(self.how.fail_every.load(Relaxed));
        let status = match self.how.status.load(Relaxed) {
            _ if every > 0 && n.is_multiple_of(every) => StatusCode::SERVICE_UNAVAILABLE,
            0 => StatusCode::OK,
            s => StatusCode::from_u16(s).unwrap_or(StatusCode::OK),
        };
        let mut resp = Response::new(Full::new(Bytes::from_static(self.name.as_bytes())));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert("x-backend", http::HeaderValue::from_static(self.name));
        resp
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Relaxed)
    }

    pub fn set_status(&self, s: u16) {
        self.how.status.store(s, Relaxed);
    }

    pub fn set_delay(&self, ms: u64) {
        self.how.delay_ms.store(ms, Relaxed);
    }
}

/// `n` backends named `b0`, `b1`, ...
pub async fn backends(n: usize) -> Vec<Backend> {
    const NAMES: [&str; 8] = ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"];
    let mut out = Vec::with_capacity(n);
    for name in NAMES.iter().take(n) {
        out.push(Backend::start(name).await);
    }
    out
}

/// The service address the policy tests route to (never dialled: the proxy's original
/// destination is faked to it).
pub const VIP: &str = "10.96.0.1:80";

pub fn vip() -> SocketAddr {
    VIP.parse().expect("addr")
}

/// One HTTP service `svc.test` at [`VIP`] with `policy` (YAML flow mapping) over `eps`,
/// each `address` plus extra endpoint fields (`, ready: false`); `extra` goes before the
/// `outbound:` section (e.g. a `locality:`).
pub fn service_config(policy: &str, eps: &[(&Backend, &str)], extra: &str) -> String {
    let eps: Vec<String> = eps
        .iter()
        .map(|(b, more)| format!("    - {{address: \"{}\"{more}}}", b.addr))
        .collect();
    format!(
        "{extra}outbound:\n  services:\n  - name: svc.test\n    addresses: [\"{VIP}\"]\n    protocol: http\n    policy: {policy}\n    endpoints:\n{}\n",
        eps.join("\n")
    )
}

/// `svc.test` at [`VIP`] split as `split` says (a YAML flow mapping: backends, matches,
/// mirror), and its backend services, each with a policy (or none: `""`) and endpoints (a
/// YAML flow sequence).
pub fn split_config(split: &str, services: &[(&str, &str, String)]) -> String {
    let mut cfg = format!(
        "outbound:\n  services:\n  - name: svc.test\n    addresses: [\"{VIP}\"]\n    protocol: http\n    split: {split}\n"
    );
    for (name, policy, endpoints) in services {
        cfg += &format!("  - name: {name}\n");
        if !policy.is_empty() {
            cfg += &format!("    policy: {policy}\n");
        }
        cfg += &format!("    endpoints: {endpoints}\n");
    }
    cfg
}

/// The 90/10 canary split of the tests: v1 and v2 by weight, `x-canary: "true"` to v2.
pub const CANARY_SPLIT: &str = r#"{backends: [{service: v1.test, weight: 90}, {service: v2.test, weight: 10}], matches: [{headers: {x-canary: "true"}, backend: v2.test}]}"#;

/// One endpoint as a YAML flow sequence.
pub fn only(b: &Backend) -> String {
    format!("[{{address: \"{}\"}}]", b.addr)
}
