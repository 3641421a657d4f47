//! Certify latency of the mesh CA (issue target: p99 ≤ 20 ms excluding the TokenReview
//! round trip, which is reported separately). Starts a real kube-apiserver (remora-e2e),
//! runs the CA in-process on loopback and prints one table:
//!
//! - `certify (in-process)`: CSR parse + signature check + signing, no I/O;
//! - `TLS 1.3 + HTTP, no review`: a new connection and a request refused before the
//!   TokenReview (the transport's share);
//! - `TokenReview`: the apiserver round trip alone;
//! - `POST /v1/certify`: everything, on a new TLS connection per request, as a proxy does.
//!
//! `cargo bench -p remora-operator --bench certify` (`BENCH_N` overrides the 300 requests
//! per networked row; the in-process row runs 10×).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use prometheus_client::registry::Registry;
use rcgen::{CertificateParams, KeyPair};
use remora_e2e::{Cluster, ClusterOptions};
use remora_operator::ca::{
    Ca, CaOptions, ServiceAccountId, TrustDomain, metrics::CaMetrics, server, token::TokenReviewer,
};
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn row(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| {name:<28} | {:>6} | {:>8.3} | {:>8.3} | {:>8.3} |",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(percentile(&samples, 1.0)),
    );
}

async fn post(connector: &tokio_rustls::TlsConnector, addr: SocketAddr, body: &str) -> u16 {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = ServerName::try_from("remora-operator.remora-system.svc").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let req = format!(
        "POST /v1/certify HTTP/1.1\r\nHost: remora-operator\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status")
}

async fn setup(client: &Client) -> String {
    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    };
    for ns in ["remora-system", "bench"] {
        let ns = Namespace {
            metadata: meta(ns),
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace");
    }
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "bench");
    let sa = ServiceAccount {
        metadata: meta("a"),
        ..ServiceAccount::default()
    };
    sas.create(&PostParams::default(), &sa).await.expect("sa");
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["remora".to_owned()],
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    sas.create_token_request("a", &PostParams::default(), &req)
        .await
        .expect("token")
        .status
        .expect("status")
        .token
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let cluster = Cluster::start_with(ClusterOptions {
        controller_manager: false,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let client = cluster.client().await.expect("client");
    let token = setup(&client).await;

    let mut registry = Registry::default();
    let options = CaOptions {
        namespace: "remora-system".to_owned(),
        secret: "remora-ca".to_owned(),
        service: "remora-operator".to_owned(),
        trust_domain: TrustDomain::new("cluster.local").expect("td"),
        ttl: Duration::from_secs(24 * 3600),
    };
    let ca = Arc::new(
        Ca::load(client.clone(), options, CaMetrics::new(&mut registry))
            .await
            .expect("CA"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(server::serve(listener, ca.clone(), std::future::pending()));

    let key = KeyPair::generate().expect("key");
    let csr = CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let id = ServiceAccountId::new("bench", "a").expect("id");

    // Warm up, then measure.
    let mut pure = Vec::with_capacity(10 * n);
    for i in 0..(10 * n + 100) {
        let t = Instant::now();
        ca.issuer()
            .certify(&csr, &id, SystemTime::now())
            .expect("certify");
        if i >= 100 {
            pure.push(t.elapsed());
        }
    }

    let mut roots = rustls::RootCertStore::empty();
    for r in ca.issuer().trust_bundle() {
        roots.add(r.clone()).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));

    let mut transport = Vec::with_capacity(n);
    for i in 0..(n + 20) {
        let t = Instant::now();
        assert_eq!(post(&connector, addr, "{").await, 400);
        if i >= 20 {
            transport.push(t.elapsed());
        }
    }

    let reviewer = TokenReviewer::new(client.clone());
    let mut review = Vec::with_capacity(n);
    for i in 0..(n + 20) {
        let t = Instant::now();
        reviewer.review(&token).await.expect("review");
        if i >= 20 {
            review.push(t.elapsed());
        }
    }

    let body = json!({"csr": csr, "token": token}).to_string();
    let mut full = Vec::with_capacity(n);
    for i in 0..(n + 20) {
        let t = Instant::now();
        assert_eq!(post(&connector, addr, &body).await, 200);
        if i >= 20 {
            full.push(t.elapsed());
        }
    }

    println!();
    println!("certify latency, ms (target: p99 ≤ 20 ms excluding the TokenReview)");
    println!(
        "| {:<28} | {:>6} | {:>8} | {:>8} | {:>8} |",
        "", "n", "p50", "p99", "max"
    );
    println!(
        "|{:-<30}|{:->8}|{:->10}|{:->10}|{:->10}|",
        "", "", "", "", ""
    );
    row("certify (in-process)", pure);
    row("TLS 1.3 + HTTP, no review", transport);
    row("TokenReview", review);
    row("POST /v1/certify (all)", full);
    println!();
    println!(
        "issued: {}; apiserver on loopback, one request at a time, a new TLS connection each",
        ca.metrics().issued_count()
    );
}
