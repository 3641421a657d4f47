//! The derived-config stream against a real kube-apiserver, with the operator running
//! in-process and reached over its real TLS listener by HTTP/2 clients holding mesh
//! certificates: an EndpointSlice change reaches a subscriber within a second; only a
//! Pod's own identity reads its inbound config (401/403/404 otherwise); `since` is
//! honoured; versions keep growing across an operator restart; a client that stops
//! reading during a burst gets the latest state afterwards, not every intermediate one.

#[path = "support/stream_client.rs"]
mod stream_client;
mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use hyper::StatusCode;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{Api, Client, api::PostParams};
use remora_crds::wire::Message;
use remora_operator::ca::{CaMaterial, Issuer, TrustDomain};
use stream_client::{ClientCert, Conn, Options, Watch, client_cert, connect};
use support::*;

const NS: &str = "shop";

/// The operator with its stream port known (`--ca-listen` on a free loopback port).
async fn start(client: &Client, identity: &str, port: u16) -> Running {
    operator_with(client, identity, &[format!("--ca-listen=127.0.0.1:{port}")]).await
}

fn free_port() -> u16 {
    let [port] = remora_e2e::cluster::free_ports::<1>().expect("a free port");
    port
}

/// The mesh issuer, from the CA Secret the operator generated.
async fn issuer(client: &Client) -> Issuer {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "remora-system");
    let secret = eventually("the CA Secret", || async {
        secrets.get("remora-ca").await.map_err(|e| e.to_string())
    })
    .await;
    let material = CaMaterial::from_secret(&secret).expect("CA material");
    Issuer::new(
        &material,
        TrustDomain::new("cluster.local").expect("trust domain"),
        Duration::from_secs(3600),
        SystemTime::now(),
    )
    .expect("issuer")
}

/// Waits for `/readyz` (index synced, controllers started).
async fn ready(op: &Running) {
    eventually("the operator is ready", || async {
        match http_get(op.addr, "/readyz").await? {
            (200, _) => Ok(()),
            (code, body) => Err(format!("{code} {body}")),
        }
    })
    .await;
}

/// Connects once the operator's listener answers.
async fn conn(
    addr: SocketAddr,
    issuer: &Issuer,
    cert: Option<ClientCert>,
    window: Option<u32>,
) -> Conn {
    eventually("the stream port accepts HTTP/2", || async {
        connect(
            addr,
            issuer.trust_bundle(),
            Options {
                cert: cert.clone(),
                window,
            },
        )
        .await
    })
    .await
}

async fn pod(client: &Client, name: &str, sa: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    pods.create(
        &PostParams::default(),
        &from_json(serde_json::json!({
            "metadata": {"name": name, "labels": {"app": "reviews"},
                         "annotations": {"remora.dev/injected": "test"}},
            "spec": {"serviceAccountName": sa, "containers": [
                {"name": "app", "image": "reviews", "ports": [{"containerPort": 8080}]}
            ]},
        })),
    )
    .await
    .expect("pod created");
}

/// `(version, endpoint count, first service name)` of an outbound message.
fn outbound(m: &Message) -> (u64, usize, Option<String>) {
    match m {
        Message::Outbound {
            version, services, ..
        } => (
            *version,
            services.first().map_or(0, |s| s.endpoints.len()),
            services.first().map(|s| s.name.clone()),
        ),
        other => panic!("expected an outbound message, got {other:?}"),
    }
}

/// One endpoint, with its Pod's identity.
fn converged(m: &Message) -> bool {
    matches!(m, Message::Outbound { services, .. }
        if services.first().is_some_and(|s| s.endpoints.len() == 1 && s.endpoints[0].identity.is_some()))
}

/// Reads messages until one satisfies `want` (within the test deadline).
async fn until(w: &mut Watch, what: &str, mut want: impl FnMut(&Message) -> bool) -> Message {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let m = w.message().await;
            if want(&m) {
                return m;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not within {DEADLINE:?}"))
}

async fn watch(c: &mut Conn, path: &str) -> Watch {
    let w = c.get(path).await.expect("request sent");
    assert_eq!(w.status, StatusCode::OK, "{path}");
    w
}

#[tokio::test]
async fn outbound_changes_arrive_within_a_second_latest_first_and_versions_survive_a_restart() {
    let (_cluster, client) = cluster().await;
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let op = start(&client, "op-stream", port).await;
    namespace(&client, NS).await;
    let svc = service(&client, NS, "reviews", &[9080]).await;
    let vip = svc.spec.and_then(|s| s.cluster_ip).expect("cluster IP");
    pod(&client, "reviews-1", "a").await;
    reviews_slice(&client, NS, &["10.244.0.7"]).await;
    op.index.wait_synced().await;

    let issuer = issuer(&client).await;
    let cert = client_cert(&issuer, NS, "a");
    let mut c = conn(addr, &issuer, Some(cert.clone()), None).await;

    // By VIP: the current state at once.
    let target = format!("{vip}:9080");
    let mut w = watch(&mut c, &format!("/v1/watch/outbound?target={target}")).await;
    // The Pod and EndpointSlice watches are separate streams: wait for the endpoint with
    // the identity its Pod gives it, so nothing changes until the next write.
    let m = until(&mut w, "reviews with its endpoint and identity", converged).await;
    let (v1, _, name) = outbound(&m);
    assert_eq!(name.as_deref(), Some("reviews.shop"));
    assert!(matches!(&m, Message::Outbound { target: t, .. } if *t == target));

    // By name, on the same connection: the same services.
    let mut by_name = watch(
        &mut c,
        "/v1/watch/outbound?target=reviews.shop.svc.cluster.local:9080",
    )
    .await;
    let named = until(&mut by_name, "reviews by name", converged).await;
    match (&m, &named) {
        (Message::Outbound { services: a, .. }, Message::Outbound { services: b, .. }) => {
            assert_eq!(a, b)
        }
        other => panic!("{other:?}"),
    }

    // Up to date: a heartbeat first (carrying `since`), then the next change.
    let mut current = watch(
        &mut c,
        &format!("/v1/watch/outbound?target={target}&since={v1}"),
    )
    .await;
    assert_eq!(current.message().await, Message::Heartbeat { version: v1 });

    // Not a mesh destination: an empty list.
    let mut unknown = watch(&mut c, "/v1/watch/outbound?target=192.0.2.1:80").await;
    match unknown.message().await {
        Message::Outbound { services, .. } => assert!(services.is_empty()),
        other => panic!("{other:?}"),
    }

    // An EndpointSlice change reaches the subscriber within a second of the write.
    let written = Instant::now();
    reviews_slice(&client, NS, &["10.244.0.7", "10.244.0.9"]).await;
    let applied = Instant::now();
    let m = until(&mut w, "the second endpoint", |m| outbound(m).1 == 2).await;
    let took = applied.elapsed();
    eprintln!(
        "EndpointSlice write returned in {:?}; the line arrived {took:?} after",
        applied - written
    );
    assert!(took < Duration::from_secs(1), "change → line took {took:?}");
    let (v2, _, _) = outbound(&m);
    assert!(v2 > v1);
    let next = until(&mut current, "the change after `since`", |m| {
        outbound(m).1 == 2
    })
    .await;
    assert_eq!(outbound(&next).0, v2);

    // A slow client: small HTTP/2 windows, and no reading during a burst of changes.
    let mut slow_conn = conn(addr, &issuer, Some(cert.clone()), Some(1024)).await;
    let mut slow = watch(
        &mut slow_conn,
        &format!("/v1/watch/outbound?target={target}"),
    )
    .await;
    assert_eq!(outbound(&slow.message().await).1, 2);
    let burst = 12;
    let ips: Vec<String> = (1..=burst).map(|i| format!("10.244.1.{i}")).collect();
    for n in 1..=burst {
        let now: Vec<&str> = ips[..n].iter().map(String::as_str).collect();
        reviews_slice(&client, NS, &now).await;
        // Each its own version (the debounce window is 50 ms).
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // The fast subscriber sees the end state…
    let last = until(&mut w, "the end of the burst", |m| outbound(m).1 == burst).await;
    // …and so does the slow one, having skipped most intermediate versions.
    let mut read = 0;
    let end = until(&mut slow, "the slow client's end state", |m| {
        read += 1;
        outbound(m).1 == burst
    })
    .await;
    assert_eq!(outbound(&end).0, outbound(&last).0);
    assert!(
        read < burst / 2,
        "the slow client read {read} messages for {burst} versions"
    );
    eprintln!("slow client: {read} messages for {burst} versions");

    let (_, metrics) = http_get(op.addr, "/metrics").await.expect("metrics");
    for want in [
        "remora_operator_stream_subscribers{kind=\"outbound\"} 5",
        "remora_operator_stream_messages_total{kind=\"outbound\"}",
        "remora_operator_stream_messages_total{kind=\"heartbeat\"}",
        "remora_operator_index_change_to_version_seconds",
    ] {
        assert!(metrics.contains(want), "{want} in {metrics}");
    }

    // Restart: the streams end, a new operator answers `since` with a newer version.
    let before = outbound(&last).0;
    drop((w, by_name, current, unknown, slow));
    op.stop().await;
    let op = start(&client, "op-stream-2", port).await;
    op.index.wait_synced().await;
    let mut c = conn(addr, &issuer, Some(cert), None).await;
    let mut again = watch(
        &mut c,
        &format!("/v1/watch/outbound?target={target}&since={before}"),
    )
    .await;
    let m = until(&mut again, "the state after the restart", |m| {
        outbound(m).1 == burst
    })
    .await;
    assert!(
        outbound(&m).0 > before,
        "version {} after the restart is not above {before}",
        outbound(&m).0
    );
    drop(again);
    // (Stopping an operator while its controllers are still starting can hang: wait for
    // them, as the first operator did implicitly.)
    ready(&op).await;
    op.stop().await;
}

#[tokio::test]
async fn inbound_config_is_for_the_pods_own_identity_only() {
    let (_cluster, client) = cluster().await;
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let op = start(&client, "op-inbound", port).await;
    namespace(&client, NS).await;
    service(&client, NS, "reviews", &[9080]).await;
    pod(&client, "reviews-1", "a").await;
    pod(&client, "ratings-1", "b").await;
    reviews_slice(&client, NS, &["10.244.0.7"]).await;
    op.index.wait_synced().await;
    eventually("both pods' inbound pieces derived", || async {
        let index = op.index.read();
        let keys =
            ["reviews-1", "ratings-1"].map(|n| remora_operator::index::model::ObjKey::new(NS, n));
        if keys.iter().all(|k| index.inbound(k).is_some()) {
            Ok(())
        } else {
            Err(format!(
                "{:?}",
                index.snapshot().pods.keys().collect::<Vec<_>>()
            ))
        }
    })
    .await;

    let issuer = issuer(&client).await;
    let mut c = conn(addr, &issuer, Some(client_cert(&issuer, NS, "a")), None).await;

    let mut own = watch(&mut c, "/v1/watch/inbound?pod=shop/reviews-1").await;
    match own.message().await {
        Message::Inbound {
            pod,
            inbound,
            version,
            ..
        } => {
            assert_eq!(pod, "shop/reviews-1");
            assert!(inbound.is_some());
            assert!(version > 0);
        }
        other => panic!("{other:?}"),
    }

    for (path, status, reason) in [
        (
            "/v1/watch/inbound?pod=shop/ratings-1",
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "/v1/watch/inbound?pod=shop/nope",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/watch/inbound?pod=nope",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/watch/outbound?target=reviews",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ] {
        let w = c.get(path).await.expect("request sent");
        assert_eq!(w.status, status, "{path}");
        let body = w.error().await;
        assert_eq!(body["error"], reason, "{path}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }

    // No client certificate: the TLS handshake succeeds (certify needs none), the watch
    // does not.
    let mut anonymous = conn(addr, &issuer, None, None).await;
    for path in [
        "/v1/watch/inbound?pod=shop/reviews-1",
        "/v1/watch/outbound?target=reviews.shop:9080",
    ] {
        let w = anonymous.get(path).await.expect("request sent");
        assert_eq!(w.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(w.error().await["error"], "unauthenticated");
    }

    // A certificate from another CA does not even complete the handshake's verification.
    let stranger_root =
        CaMaterial::generate(SystemTime::now(), Duration::from_secs(3600)).expect("another root");
    let stranger = Issuer::new(
        &stranger_root,
        TrustDomain::new("cluster.local").expect("td"),
        Duration::from_secs(3600),
        SystemTime::now(),
    )
    .expect("another issuer");
    let refused = async {
        let mut c = connect(
            addr,
            issuer.trust_bundle(),
            Options {
                cert: Some(client_cert(&stranger, NS, "a")),
                window: None,
            },
        )
        .await?;
        // TLS 1.3: the server's verdict on the client certificate arrives after the
        // client's handshake completes, with the first exchange.
        let w = c.get("/v1/watch/inbound?pod=shop/reviews-1").await?;
        Err::<(), String>(format!("answered {}", w.status))
    };
    assert!(refused.await.is_err());

    let (_, metrics) = http_get(op.addr, "/metrics").await.expect("metrics");
    for want in [
        "remora_operator_stream_refusals_total{reason=\"forbidden\"} 1",
        "remora_operator_stream_refusals_total{reason=\"unauthenticated\"} 2",
        "remora_operator_stream_subscribers{kind=\"inbound\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} in {metrics}");
    }
    // HTTP/1.1 (curl): the same stream, chunked.
    let (status, raw) = stream_client::http1_get(
        addr,
        issuer.trust_bundle(),
        client_cert(&issuer, NS, "a"),
        "/v1/watch/inbound?pod=shop%2Freviews-1",
        r#""inbound":{"#,
    )
    .await
    .expect("HTTP/1.1 watch");
    assert_eq!(status, "HTTP/1.1 200 OK", "{raw}");
    assert!(raw.contains("application/x-ndjson"), "{raw}");
    assert!(raw.contains(r#"{"type":"inbound","#), "{raw}");

    drop(own);
    ready(&op).await;
    op.stop().await;
}
