//! Failure injection for the proxy's config-stream client (`control::stream`): an
//! in-test HTTP/2 + TLS server speaking `docs/stream.md` goes silent (the client must
//! declare the stream dead after three heartbeat intervals and resume with `since`), ends
//! the stream (the client reconnects with the newest version seen), and answers with an
//! error status. The real operator is exercised by `e2e/tests/cluster_control_plane.rs`;
//! this covers what it cannot be made to do on demand.

mod fake_operator;

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use fake_operator::{Body, Pki, pkcs8};
use http::{Response, StatusCode};
use http_body_util::channel::Channel as BodyChannel;
use rcgen::SanType;
use remora_proxy::{
    control::{
        message::Message,
        stream::Watch,
        target::{Target, outbound_path},
        transport::{Channel, OperatorEndpoint},
    },
    identity::Identity,
    metrics::Metrics,
    tls::IdentityStore,
};
use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
use tokio::sync::mpsc;

/// What the scripted server does on its n-th request.
async fn script(n: usize, mut tx: http_body_util::channel::Sender<Bytes>) {
    let line = |v: u64| {
        Bytes::from(format!(
            "{{\"type\":\"outbound\",\"version\":{v},\"target\":\"10.96.0.1:80\",\"services\":[]}}\n"
        ))
    };
    match n {
        // One message, then silence: the client must give up after three heartbeats.
        0 => {
            let _ = tx.send_data(line(5)).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        // A stale replay, a newer piece split across writes, then the end of the stream.
        1 => {
            let _ = tx.send_data(line(4)).await;
            let seven = line(7);
            let _ = tx.send_data(seven.slice(..10)).await;
            let _ = tx.send_data(seven.slice(10..)).await;
        }
        // Up to date: a heartbeat, and it stays open.
        _ => {
            let _ = tx
                .send_data(Bytes::from_static(
                    b"{\"type\":\"heartbeat\",\"version\":7}\n",
                ))
                .await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }
}

/// The scripted operator; returns its address and the request paths seen. The first
/// request gets `503 not_synced` (the index has not listed everything yet).
async fn scripted_operator(pki: &Pki) -> (String, Arc<Mutex<Vec<String>>>) {
    let paths = Arc::new(Mutex::new(Vec::new()));
    let seen = paths.clone();
    let addr = fake_operator::serve(pki, move |req| {
        let n = {
            let mut paths = seen.lock().expect("lock");
            paths.push(
                req.uri()
                    .path_and_query()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            );
            paths.len() - 1
        };
        async move {
            let (tx, body) = BodyChannel::<Bytes, Infallible>::new(4);
            let status = match n.checked_sub(1) {
                None => StatusCode::SERVICE_UNAVAILABLE,
                Some(n) => {
                    tokio::spawn(script(n, tx));
                    StatusCode::OK
                }
            };
            Response::builder()
                .status(status)
                .body(Body::new(body))
                .expect("response")
        }
    })
    .await;
    (addr, paths)
}

/// The watch channel, presenting a workload certificate from `pki`.
fn client(pki: &Pki, addr: &str, dir: &std::path::Path) -> (Arc<Channel>, OperatorEndpoint) {
    let id = "spiffe://cluster.local/ns/shop/sa/web";
    let (cert, key) = pki.leaf(SanType::URI(id.try_into().expect("uri")));
    let ca = CertificateDer::from_pem_slice(pki.pem.as_bytes()).expect("CA DER");
    let identity = Identity::from_parts(id, vec![cert], pkcs8(&key), vec![ca], UnixTime::now())
        .expect("identity");
    let store = Arc::new(IdentityStore::default());
    store.install(identity, &Metrics::new());
    let endpoint = pki.endpoint(addr, dir);
    (Arc::new(Channel::new(endpoint.clone(), store)), endpoint)
}

async fn next_version(rx: &mut mpsc::UnboundedReceiver<Message>) -> u64 {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a message in time")
        .expect("the watch runs")
        .version()
}

#[tokio::test]
async fn silence_ends_and_errors_reconnect_resuming_with_since() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, paths) = scripted_operator(&pki).await;
    let (channel, endpoint) = client(&pki, &addr, dir.path());
    let metrics = Arc::new(Metrics::new());
    let watch = Watch {
        channel,
        endpoint,
        heartbeat: Duration::from_millis(100),
        what: "test".to_owned(),
    };
    let target = Target("10.96.0.1:80".parse().expect("target"));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(watch.run(
        move |since| outbound_path(target, since),
        move |m: Message| {
            let _ = tx.send(m);
        },
        metrics.clone(),
        std::future::pending(),
    ));

    assert_eq!(
        next_version(&mut rx).await,
        5,
        "after the 503, the first piece"
    );
    assert_eq!(
        next_version(&mut rx).await,
        4,
        "handed over; the subscription ignores it"
    );
    assert_eq!(next_version(&mut rx).await, 7, "a line split across frames");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while paths.lock().expect("lock").len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "fourth request: {paths:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    let paths = paths.lock().expect("lock").clone();
    assert_eq!(
        paths,
        [
            "/v1/watch/outbound?target=10.96.0.1:80",
            "/v1/watch/outbound?target=10.96.0.1:80",
            "/v1/watch/outbound?target=10.96.0.1:80&since=5",
            "/v1/watch/outbound?target=10.96.0.1:80&since=7",
        ],
        "resumes with the newest version seen, never an older one"
    );
    let text = metrics.encode();
    for reason in ["not_synced", "heartbeat_timeout", "ended"] {
        assert!(
            text.contains(&format!(
                "remora_proxy_control_stream_reconnects_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {text}"
        );
    }
}
