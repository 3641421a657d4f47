//! `load`: an open-loop client. A request is due every 1/rps seconds whether or not the
//! earlier ones have answered (so a slow backend shows up as latency, not as a lower
//! rate); when `concurrency` requests are already pending the due one is skipped and
//! counted. Every answer's JSON `pod` field is counted, so the summary shows how traffic
//! spread over the backends.
//!
//! Output: with `--interval`, a JSON line `{"kind":"interval",...}` per interval on
//! stdout (and a human line on stderr); at the end a human summary on stderr and one
//! JSON line `{"kind":"summary",...}` on stdout, for scenario tests to parse.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::{Semaphore, watch};

use crate::args::LoadArgs;
use crate::stats::{Outcome, Stats, Summary};

/// The largest answer body read (the demo app's is well under 4 KiB).
const MAX_BODY: usize = 64 * 1024;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Runs the load and returns the final summary.
pub async fn run(args: LoadArgs, mut stop: watch::Receiver<bool>) -> Result<Summary, String> {
    let uri: Uri = args
        .url
        .parse()
        .map_err(|e| format!("invalid --url '{}': {e}", args.url))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!(
            "invalid --url '{}': expected http://host[:port]/path (plain HTTP: the mesh adds TLS)",
            args.url
        ));
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(args.timeout));
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(args.h2)
        .pool_max_idle_per_host(args.concurrency)
        .build(connector);

    let window = Arc::new(Mutex::new(Stats::default()));
    let mut total = Stats::default();
    let slots = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rps));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut report = (!args.interval.is_zero()).then(|| {
        let mut i =
            tokio::time::interval_at(tokio::time::Instant::now() + args.interval, args.interval);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let end = (!args.duration.is_zero()).then(|| tokio::time::Instant::now() + args.duration);
    let sleep_until_end = async {
        match end {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep_until_end);

    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    lock(&window).skipped += 1;
                    continue;
                };
                let (client, window, uri) = (client.clone(), window.clone(), uri.clone());
                let headers = args.headers.clone();
                let timeout = args.timeout;
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    let outcome = one(&client, uri, &headers, timeout).await;
                    lock(&window).record(&outcome, t0.elapsed());
                    drop(permit);
                });
            }
            _ = async { match report.as_mut() { Some(r) => r.tick().await, None => std::future::pending().await } } => {
                let w = std::mem::take(&mut *lock(&window));
                total.merge(&w);
                let s = w.summary();
                eprintln!("[{:>6.1}s] {}", started.elapsed().as_secs_f64(), s.line());
                println!("{}", json!({"kind": "interval", "t": started.elapsed().as_secs_f64(), "summary": s}));
            }
            _ = &mut sleep_until_end => break,
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // Let the requests in flight finish (each is bounded by the timeout).
    let _ = tokio::time::timeout(
        args.timeout + Duration::from_secs(1),
        slots.acquire_many(u32::try_from(args.concurrency.max(1)).unwrap_or(u32::MAX)),
    )
    .await;
    total.merge(&lock(&window));
    let summary = total.summary();
    eprintln!(
        "remora-demo-app load: {} over {:.1}s to {}: {}",
        summary.requests,
        started.elapsed().as_secs_f64(),
        args.url,
        summary.line()
    );
    println!(
        "{}",
        json!({"kind": "summary", "url": args.url, "seconds": started.elapsed().as_secs_f64(), "summary": summary})
    );
    Ok(summary)
}

fn lock(m: &Mutex<Stats>) -> std::sync::MutexGuard<'_, Stats> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn one(
    client: &HttpClient,
    uri: Uri,
    headers: &[(String, String)],
    timeout: Duration,
) -> Outcome {
    let mut req = Request::get(uri);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let req = match req.body(Empty::<Bytes>::new()) {
        Ok(r) => r,
        Err(e) => return Outcome::Error(format!("request: {e}")),
    };
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| {
            if e.is_connect() {
                "connect".to_owned()
            } else {
                "reset".to_owned()
            }
        })?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|_| "body".to_owned())?
            .to_bytes();
        Ok::<_, String>(Outcome::Answer {
            status,
            pod: pod_of(&body),
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(o)) => o,
        Ok(Err(class)) => Outcome::Error(class),
        Err(_) => Outcome::Error("timeout".into()),
    }
}

/// The `pod` field of a JSON answer, if it is one.
pub fn pod_of(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("pod")?
        .as_str()
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_field_is_read_from_json_answers_only() {
        assert_eq!(
            pod_of(br#"{"pod":"reviews-v1-abc","ip":"10.244.0.5"}"#),
            Some("reviews-v1-abc".into())
        );
        assert_eq!(pod_of(b"upstream connect error"), None);
        assert_eq!(pod_of(br#"{"pod":5}"#), None);
    }
}
