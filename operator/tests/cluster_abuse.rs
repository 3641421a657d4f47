//! The operator's TLS listener (config stream and certify on one port) against a real
//! kube-apiserver, under 1,000 misbehaving clients at once: 300 TCP connections that never
//! start TLS, 200 clients presenting a certificate of another CA, 200 garbage certify
//! requests and 300 slow readers (HTTP/2 windows of 1 KiB holding watches they never
//! read). Meanwhile a good client's watch gets its config and a good certify request (a
//! real service-account token, reviewed by the apiserver) gets a certificate; the figures
//! are printed.

#[path = "support/stream_client.rs"]
mod stream_client;
mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Secret, ServiceAccount},
};
use kube::{Api, Client, api::PostParams};
use remora_crds::wire::Message;
use remora_operator::ca::{CaMaterial, Issuer, TrustDomain};
use stream_client::{Options, client_cert, connect, http1_exchange};
use support::*;

const NS: &str = "shop";
const TARGET: &str = "/v1/watch/outbound?target=reviews.shop.svc.cluster.local:9080";

fn issuer_of(material: &CaMaterial) -> Issuer {
    Issuer::new(
        material,
        TrustDomain::new("cluster.local").expect("trust domain"),
        Duration::from_secs(3600),
        SystemTime::now(),
    )
    .expect("issuer")
}

async fn token(client: &Client, sa: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    accounts
        .create(
            &PostParams::default(),
            &from_json(serde_json::json!({"metadata": {"name": sa}})),
        )
        .await
        .expect("service account");
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["remora".to_owned()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    eventually("a token for the service account", || async {
        accounts
            .create_token_request(sa, &PostParams::default(), &req)
            .await
            .map_err(|e| e.to_string())?
            .status
            .map(|s| s.token)
            .ok_or_else(|| "no token yet".to_owned())
    })
    .await
}

/// A certify request for a fresh key with `token`.
fn certify_request(token: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let body = serde_json::json!({"csr": csr, "token": token}).to_string();
    format!(
        "POST /v1/certify HTTP/1.1\r\nHost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        stream_client::SERVER_NAME,
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_clients_are_served_among_1000_misbehaving_ones() {
    let (_cluster, client) = cluster().await;
    let [port] = remora_e2e::cluster::free_ports::<1>().expect("a free port");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let op = operator_with(
        &client,
        "op-abuse",
        &[format!("--ca-listen=127.0.0.1:{port}")],
    )
    .await;
    namespace(&client, NS).await;
    service(&client, NS, "reviews", &[9080]).await;
    reviews_slice(&client, NS, &["10.244.0.7"]).await;
    let token = token(&client, "a").await;
    op.index.wait_synced().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "remora-system");
    let secret = eventually("the CA Secret", || async {
        secrets.get("remora-ca").await.map_err(|e| e.to_string())
    })
    .await;
    let issuer = issuer_of(&CaMaterial::from_secret(&secret).expect("CA material"));
    let roots = issuer.trust_bundle().to_vec();
    let good = Options {
        cert: Some(client_cert(&issuer, NS, "a")),
        window: None,
    };
    eventually("the listener serves", || async {
        connect(addr, &roots, good.clone()).await.map(drop)
    })
    .await;

    // The misbehaving thousand, all at once.
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let stranger = issuer_of(
        &CaMaterial::generate(SystemTime::now(), Duration::from_secs(3600)).expect("root"),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (roots, cert) = (roots.clone(), client_cert(&stranger, NS, "a"));
        tasks.spawn(async move {
            let opts = Options {
                cert: Some(cert),
                window: None,
            };
            let refused = async {
                let mut c = connect(addr, &roots, opts).await?;
                let w = c.get(TARGET).await?;
                Err::<(), String>(format!("answered {}", w.status))
            };
            assert!(
                refused.await.is_err(),
                "a certificate of another CA was served"
            );
            "stranger"
        });
    }
    for _ in 0..200 {
        let roots = roots.clone();
        tasks.spawn(async move {
            let garbage = b"POST /v1/certify HTTP/1.1\r\nHost: x\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot json!";
            let (status, raw) = http1_exchange(addr, &roots, None, garbage, "\r\n\r\n")
                .await
                .expect("garbage answered");
            assert_eq!(status, "HTTP/1.1 400 Bad Request", "{raw}");
            "garbage"
        });
    }
    let mut slow = Vec::new();
    for _ in 0..300 {
        let opts = Options {
            window: Some(1024),
            ..good.clone()
        };
        let mut c = connect(addr, &roots, opts)
            .await
            .expect("slow reader connects");
        let w = c.get(TARGET).await.expect("slow reader's watch");
        assert_eq!(w.status, hyper::StatusCode::OK);
        slow.push((c, w));
    }

    // Good clients, while all of that is held.
    let t = Instant::now();
    let mut c = connect(addr, &roots, good.clone())
        .await
        .expect("good client connects");
    let mut w = c.get(TARGET).await.expect("good watch");
    let first = tokio::time::timeout(DEADLINE, w.message())
        .await
        .expect("the good watch gets its config");
    let watched = t.elapsed();
    assert!(
        matches!(&first, Message::Outbound { services, .. } if !services.is_empty()),
        "{first:?}"
    );
    let t = Instant::now();
    let (status, raw) = http1_exchange(addr, &roots, None, &certify_request(&token), "\"serial\"")
        .await
        .expect("good certify");
    let certified = t.elapsed();
    assert_eq!(status, "HTTP/1.1 200 OK", "{raw}");
    assert!(raw.contains("spiffe://cluster.local/ns/shop/sa/a"), "{raw}");

    let mut kinds = Vec::new();
    while let Some(done) = tasks.join_next().await {
        kinds.push(done.expect("a misbehaving client's outcome was as expected"));
    }
    assert_eq!(kinds.len(), 400);
    let (_, metrics) = http_get(op.addr, "/metrics").await.expect("metrics");
    let refused = r#"remora_ca_certificates_refused_total{reason="malformed_request"} 200"#;
    assert!(metrics.contains(refused), "{refused} in {metrics}");
    println!(
        "operator under 1,000 misbehaving clients (300 silent, 200 foreign certificates, 200 garbage certify, 300 slow readers; {:?} to set up): a good watch got its config in {watched:?}, a good certify its certificate in {certified:?}",
        started.elapsed()
    );
    drop((silent, slow));
    op.stop().await;
}
