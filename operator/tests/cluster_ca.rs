//! The certificate authority against a real kube-apiserver: tokens from the TokenRequest
//! API authenticate a service account through a TokenReview and yield its SPIFFE ID and
//! nothing else; invalid, expired, wrong-audience and revoked tokens are refused and
//! counted; bad CSRs are refused; the CA Secret is generated once and reused. The CA runs
//! in-process and is reached over its real TLS 1.3 listener.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Secret, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use prometheus_client::registry::Registry;
use rcgen::{CertificateParams, KeyPair, PublicKeyData, SanType};
use remora_crds::wire::CertifyResponse;
use remora_e2e::{Cluster, ClusterOptions};
use remora_operator::ca::{
    Ca, CaOptions, TrustDomain,
    metrics::{CaMetrics, Reason},
    server,
};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair},
};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};
use x509_parser::extensions::{GeneralName, ParsedExtension};

const OPERATOR_NS: &str = "remora-system";
const SECRET: &str = "remora-ca";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

async fn cluster() -> (Cluster, Client) {
    let cluster = Cluster::start_with(ClusterOptions {
        controller_manager: false,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let client = cluster.client().await.expect("client");
    namespace(&client, OPERATOR_NS).await;
    (cluster, client)
}

async fn namespace(client: &Client, name: &str) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
}

async fn service_account(client: &Client, ns: &str, name: &str) {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .expect("service account created");
}

/// A token for `ns/name` from the TokenRequest API.
async fn token(client: &Client, ns: &str, name: &str, audience: &str) -> String {
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(name, &PostParams::default(), &req)
        .await
        .expect("token request")
        .status
        .expect("token request status")
        .token
}

fn options() -> CaOptions {
    CaOptions {
        namespace: OPERATOR_NS.to_owned(),
        secret: SECRET.to_owned(),
        service: "remora-operator".to_owned(),
        trust_domain: TrustDomain::new("cluster.local").expect("trust domain"),
        ttl: Duration::from_secs(24 * 3600),
    }
}

/// The CA served on a loopback port; stopped when dropped.
struct Served {
    ca: Arc<Ca>,
    addr: std::net::SocketAddr,
    registry: Registry,
    _stop: oneshot::Sender<()>,
}

async fn serve(client: &Client) -> Served {
    let mut registry = Registry::default();
    let metrics = CaMetrics::new(&mut registry);
    let ca = Arc::new(
        Ca::load(client.clone(), options(), metrics)
            .await
            .expect("CA loads"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server::serve(listener, ca.clone(), async move {
        let _ = stopped.await;
    }));
    Served {
        ca,
        addr,
        registry,
        _stop: stop,
    }
}

/// One HTTP/1.1 request over TLS 1.3, trusting only the mesh bundle and checking the
/// serving certificate for `remora-operator.remora-system.svc`.
async fn post(served: &Served, bearer: Option<&str>, body: &str) -> (u16, Value) {
    post_to(served.addr, served.ca.issuer().trust_bundle(), bearer, body).await
}

async fn post_to(
    addr: std::net::SocketAddr,
    bundle: &[CertificateDer<'static>],
    bearer: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut roots = rustls::RootCertStore::empty();
    for r in bundle {
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
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("remora-operator.remora-system.svc").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the mesh-issued serving certificate");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /v1/certify HTTP/1.1\r\nHost: remora-operator.remora-system.svc\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{auth}\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8(out).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body {body:?}: {e}"));
    (status, json)
}

fn certify_body(csr: &str, token: &str) -> String {
    json!({"csr": csr, "token": token}).to_string()
}

/// A P-256 CSR that asks for names the CA must ignore.
fn csr(key: &KeyPair) -> String {
    let mut p = CertificateParams::new(vec!["evil.example".to_owned(), "localhost".to_owned()])
        .expect("params");
    p.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .expect("uri"),
    ));
    p.serialize_request(key).expect("csr").pem().expect("pem")
}

fn pem_certs(text: &str) -> Vec<CertificateDer<'static>> {
    x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .map(|p| CertificateDer::from(p.expect("PEM").contents))
        .collect()
}

/// Checks a successful answer: only the expected URI SAN, the CSR's key, chained to the
/// bundle.
fn check_issued(resp: &Value, key: &KeyPair, want: &str) {
    let resp: CertifyResponse = serde_json::from_value(resp.clone()).expect("certify response");
    assert_eq!(resp.spiffe_id, want);
    assert_eq!(
        resp.not_after - resp.not_before,
        24 * 3600 + 60,
        "24 h (+1 min backdate)"
    );
    let chain = pem_certs(&resp.chain);
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).expect("x509");
    assert_eq!(&*cert.public_key().subject_public_key.data, key.der_bytes());
    let names: Vec<_> = cert
        .extensions()
        .iter()
        .filter_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(names, vec![GeneralName::URI(want)], "exactly the SPIFFE ID");
    assert!(cert.subject().iter().next().is_none(), "no subject names");

    assert!(
        accepts(&pem_certs(&resp.trust_bundle), &chain),
        "the chain verifies against the trust bundle"
    );
}

/// Whether a proxy trusting `bundle` accepts `chain` from a peer.
fn accepts(bundle: &[CertificateDer<'static>], chain: &[CertificateDer<'static>]) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    for r in bundle {
        roots.add(r.clone()).expect("root");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    let now = rustls::pki_types::UnixTime::since_unix_epoch(
        SystemTime::now().duration_since(UNIX_EPOCH).expect("clock"),
    );
    verifier
        .verify_client_cert(&chain[0], &chain[1..], now)
        .is_ok()
}

fn refused(status: u16, body: &Value, want_status: u16, reason: Reason) {
    assert_eq!(
        (status, body["error"].as_str()),
        (want_status, Some(reason.as_str())),
        "{body}"
    );
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// `token` re-signed with the cluster's service-account key after `edit` changed its
/// claims (header, `kid` included, kept as is).
fn resign(token: &str, sa_key_pem: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut parts = token.split('.');
    let (header, payload) = (
        parts.next().expect("header"),
        parts.next().expect("payload"),
    );
    let mut claims: Value =
        serde_json::from_slice(&B64.decode(payload).expect("base64url claims")).expect("claims");
    edit(&mut claims);
    let signing_input = format!(
        "{header}.{}",
        B64.encode(serde_json::to_vec(&claims).expect("claims"))
    );
    let (_, pem) = x509_parser::pem::parse_x509_pem(sa_key_pem.as_bytes()).expect("SA key PEM");
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pem.contents, &rng)
        .expect("the SA key is a P-256 PKCS #8 key");
    let sig = key.sign(&rng, signing_input.as_bytes()).expect("signature");
    format!("{signing_input}.{}", B64.encode(sig.as_ref()))
}

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    )
    .expect("seconds")
}

#[tokio::test]
async fn a_token_yields_exactly_its_spiffe_id_and_bad_requests_are_refused() {
    let (cluster, client) = cluster().await;
    namespace(&client, "shop").await;
    service_account(&client, "shop", "a").await;
    service_account(&client, "shop", "gone").await;
    let served = serve(&client).await;
    let metrics = served.ca.metrics().clone();
    let want = "spiffe://cluster.local/ns/shop/sa/a";
    let key = KeyPair::generate().expect("key");
    let good = token(&client, "shop", "a", "remora").await;

    // The token in the body, then in the Authorization header.
    let (status, body) = post(&served, None, &certify_body(&csr(&key), &good)).await;
    assert_eq!(status, 200, "{body}");
    check_issued(&body, &key, want);
    let (status, body) = post(&served, Some(&good), &json!({"csr": csr(&key)}).to_string()).await;
    assert_eq!(status, 200, "{body}");
    check_issued(&body, &key, want);
    assert_eq!(metrics.issued_count(), 2);

    // Tokens the apiserver does not accept for audience "remora".
    let default_audience = token(
        &client,
        "shop",
        "a",
        "https://kubernetes.default.svc.cluster.local",
    )
    .await;
    let (status, body) = post(&served, None, &certify_body(&csr(&key), &default_audience)).await;
    refused(status, &body, 401, Reason::WrongAudience);

    let (status, body) = post(&served, None, &certify_body(&csr(&key), "not-a-jwt")).await;
    refused(status, &body, 401, Reason::InvalidToken);
    // Change a signature character well before the end (the last one carries padding
    // bits a decoder may ignore).
    let at = good.len() - 10;
    let swap = if &good[at..=at] == "A" { "B" } else { "A" };
    let tampered = format!("{}{swap}{}", &good[..at], &good[at + 1..]);
    let (status, body) = post(&served, None, &certify_body(&csr(&key), &tampered)).await;
    refused(status, &body, 401, Reason::InvalidToken);

    // Expired: a real token's claims, re-signed with the cluster's service-account key
    // with every time an hour or more in the past. The same claims re-signed with current
    // times are accepted, so the refusal is the expiry and nothing else.
    let sa_key = std::fs::read_to_string(&cluster.pki().sa_key).expect("SA key");
    let now = unix_now();
    let expired = resign(&good, &sa_key, |c| {
        c["iat"] = json!(now - 7200);
        c["nbf"] = json!(now - 7200);
        c["exp"] = json!(now - 3600);
    });
    let (status, body) = post(&served, None, &certify_body(&csr(&key), &expired)).await;
    refused(status, &body, 401, Reason::ExpiredToken);
    let fresh = resign(&good, &sa_key, |c| {
        c["iat"] = json!(now);
        c["nbf"] = json!(now);
        c["exp"] = json!(now + 600);
    });
    let (status, body) = post(&served, None, &certify_body(&csr(&key), &fresh)).await;
    assert_eq!(status, 200, "control: the re-signed token is valid: {body}");
    check_issued(&body, &key, want);

    // Revoked: the service account was deleted after its token was issued.
    let gone = token(&client, "shop", "gone", "remora").await;
    Api::<ServiceAccount>::namespaced(client.clone(), "shop")
        .delete("gone", &DeleteParams::default())
        .await
        .expect("service account deleted");
    let (status, body) = post(&served, None, &certify_body(&csr(&key), &gone)).await;
    refused(status, &body, 401, Reason::InvalidToken);

    // Bad requests and bad CSRs, with a valid token.
    let (status, body) = post(&served, None, "{not json").await;
    refused(status, &body, 400, Reason::MalformedRequest);
    let (status, body) = post(&served, None, &json!({"csr": csr(&key)}).to_string()).await;
    refused(status, &body, 401, Reason::MissingToken);
    let (status, body) = post(&served, None, &certify_body("-----BEGIN nonsense", &good)).await;
    refused(status, &body, 400, Reason::MalformedCsr);
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384 key");
    let (status, body) = post(&served, None, &certify_body(&csr(&p384), &good)).await;
    refused(status, &body, 400, Reason::UnsupportedKey);
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr(&key).as_bytes()).expect("pem");
    let mut der = pem.contents.clone();
    if let Some(last) = der.last_mut() {
        *last ^= 0x01;
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let tampered_csr =
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n");
    let (status, body) = post(&served, None, &certify_body(&tampered_csr, &good)).await;
    refused(status, &body, 400, Reason::BadSignature);

    // Nothing more was issued, and every refusal was counted by reason.
    assert_eq!(metrics.issued_count(), 3);
    for (reason, n) in [
        (Reason::WrongAudience, 1),
        (Reason::InvalidToken, 3),
        (Reason::ExpiredToken, 1),
        (Reason::MalformedRequest, 1),
        (Reason::MissingToken, 1),
        (Reason::MalformedCsr, 1),
        (Reason::UnsupportedKey, 1),
        (Reason::BadSignature, 1),
        (Reason::NotServiceAccount, 0),
    ] {
        assert_eq!(metrics.refused_count(reason), n, "{}", reason.as_str());
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &served.registry).expect("encode");
    assert!(
        text.contains("remora_ca_certificates_issued_total 3"),
        "{text}"
    );
    assert!(
        text.contains("remora_ca_certificates_refused_total{reason=\"expired_token\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn the_root_is_generated_once_and_reused() {
    let (_cluster, client) = cluster().await;
    let load = || async {
        let mut registry = Registry::default();
        Ca::load(client.clone(), options(), CaMetrics::new(&mut registry))
            .await
            .expect("CA loads")
    };

    // Two replicas starting at once: one creates the Secret, the other reads it.
    let (a, b) = tokio::join!(load(), load());
    let bundle = a.issuer().trust_bundle_pem().to_owned();
    assert_eq!(
        b.issuer().trust_bundle_pem(),
        bundle,
        "racing replicas share one root"
    );
    assert_eq!(a.issuer().trust_bundle().len(), 1);

    let secret = Api::<Secret>::namespaced(client.clone(), OPERATOR_NS)
        .get(SECRET)
        .await
        .expect("the CA Secret exists");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.as_ref().expect("data");
    let mut keys: Vec<_> = data.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
    assert_eq!(data["ca.crt"].0, bundle.as_bytes());
    let version = secret.metadata.resource_version.clone();

    // A restart reads the same root and leaves the Secret alone.
    drop((a, b));
    let c = load().await;
    assert_eq!(
        c.issuer().trust_bundle_pem(),
        bundle,
        "same root after a restart"
    );
    let again = Api::<Secret>::namespaced(client.clone(), OPERATOR_NS)
        .get(SECRET)
        .await
        .expect("the CA Secret exists");
    assert_eq!(again.metadata.resource_version, version, "not rewritten");

    // A Secret the user supplies (here: cert-manager's layout with two roots in ca.crt
    // during a rotation) is used as is.
    let first = remora_operator::ca::CaMaterial::generate(
        SystemTime::now(),
        Duration::from_secs(86400 * 365),
    )
    .expect("root");
    let second = remora_operator::ca::CaMaterial::generate(
        SystemTime::now(),
        Duration::from_secs(86400 * 365),
    )
    .expect("root");
    let supplied = remora_operator::ca::CaMaterial {
        bundle_pem: format!("{}{}", first.bundle_pem, second.bundle_pem),
        ..second.clone()
    };
    namespace(&client, "user-ca").await;
    Api::<Secret>::namespaced(client.clone(), "user-ca")
        .create(
            &PostParams::default(),
            &supplied.to_secret("user-ca", SECRET),
        )
        .await
        .expect("user Secret created");
    let mut registry = Registry::default();
    let user = Ca::load(
        client.clone(),
        CaOptions {
            namespace: "user-ca".to_owned(),
            ..options()
        },
        CaMetrics::new(&mut registry),
    )
    .await
    .expect("CA loads the user's Secret");
    assert_eq!(user.issuer().trust_bundle_pem(), supplied.bundle_pem);
    assert_eq!(user.issuer().trust_bundle().len(), 2);

    // A Secret that cannot issue is an error, not a silent regeneration.
    namespace(&client, "broken-ca").await;
    let broken = remora_operator::ca::CaMaterial {
        key_pem: first.key_pem.clone(),
        ..second
    };
    Api::<Secret>::namespaced(client.clone(), "broken-ca")
        .create(
            &PostParams::default(),
            &broken.to_secret("broken-ca", SECRET),
        )
        .await
        .expect("broken Secret created");
    let err = Ca::load(
        client.clone(),
        CaOptions {
            namespace: "broken-ca".to_owned(),
            ..options()
        },
        CaMetrics::new(&mut registry),
    )
    .await
    .expect_err("a key that does not match is refused");
    assert!(err.to_string().contains("does not match"), "{err}");
}

/// The CA as the operator runs it: `Operator::run` serves certify on `--ca-listen` with the
/// root it generated into the Secret, and exports the CA metrics on `/metrics`.
#[tokio::test]
async fn the_operator_serves_certify_on_ca_listen() {
    let (_cluster, client) = cluster().await;
    remora_e2e::apply::install_crds(&client)
        .await
        .expect("CRDs installed");
    namespace(&client, "shop").await;
    service_account(&client, "shop", "a").await;
    let [port] = remora_e2e::cluster::free_ports::<1>().expect("a free port");
    let args = <remora_operator::Args as clap::Parser>::try_parse_from([
        "remora-operator".to_owned(),
        "--metrics-listen=127.0.0.1:0".to_owned(),
        "--leader-elect=false".to_owned(),
        "--pod-name=op-ca".to_owned(),
        format!("--ca-listen=127.0.0.1:{port}"),
    ])
    .expect("flags");
    let operator = remora_operator::Operator::bind(args, client.clone())
        .await
        .expect("operator binds");
    let admin = operator.local_addr().expect("admin address");
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(operator.run(async move {
        let _ = stopped.await;
    }));

    // The trust bundle as a proxy gets it: from the Secret the operator generated.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), OPERATOR_NS);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let bundle = loop {
        if let Some(s) = secrets.get_opt(SECRET).await.expect("get Secret")
            && let Some(b) = s.data.as_ref().and_then(|d| d.get("ca.crt"))
        {
            break pem_certs(std::str::from_utf8(&b.0).expect("PEM"));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the operator created no CA Secret"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CA never listened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let key = KeyPair::generate().expect("key");
    let good = token(&client, "shop", "a", "remora").await;
    let (status, body) = post_to(addr, &bundle, None, &certify_body(&csr(&key), &good)).await;
    assert_eq!(status, 200, "{body}");
    check_issued(&body, &key, "spiffe://cluster.local/ns/shop/sa/a");
    let (status, body) = post_to(addr, &bundle, None, &certify_body(&csr(&key), "bad")).await;
    refused(status, &body, 401, Reason::InvalidToken);

    let mut conn = TcpStream::connect(admin).await.expect("admin connect");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut text = String::new();
    conn.read_to_string(&mut text).await.expect("read");
    assert!(
        text.contains("remora_ca_certificates_issued_total 1"),
        "{text}"
    );
    assert!(
        text.contains("remora_ca_certificates_refused_total{reason=\"invalid_token\"} 1"),
        "{text}"
    );

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the operator stops")
        .expect("no panic")
        .expect("the operator ran without error");
}

/// The rotation procedure of docs/ca.md, step by step, against a running CA that re-reads
/// its Secret (no restart): proxies holding only the old root keep reaching the CA while
/// the bundle grows; after the switch, certificates and the serving certificate come from
/// the new root; a broken edit keeps the current issuer; finally the old root goes.
#[tokio::test]
async fn a_root_rotation_needs_no_restart() {
    use remora_operator::ca::CaMaterial;

    let (_cluster, client) = cluster().await;
    namespace(&client, "shop").await;
    service_account(&client, "shop", "a").await;
    let served = serve(&client).await;
    let key = KeyPair::generate().expect("key");
    let good = token(&client, "shop", "a", "remora").await;
    let body = certify_body(&csr(&key), &good);
    let want = "spiffe://cluster.local/ns/shop/sa/a";

    let secrets: Api<Secret> = Api::namespaced(client.clone(), OPERATOR_NS);
    let old = CaMaterial::from_secret(&secrets.get(SECRET).await.expect("Secret"))
        .expect("generated material");
    let new = CaMaterial::generate(SystemTime::now(), Duration::from_secs(86400 * 365))
        .expect("new root");
    let (old_only, new_only) = (pem_certs(&old.bundle_pem), pem_certs(&new.bundle_pem));
    let both = format!("{}{}", old.bundle_pem, new.bundle_pem);
    let write = |m: CaMaterial| {
        let secrets = secrets.clone();
        async move {
            let current = secrets.get(SECRET).await.expect("Secret");
            let mut next = m.to_secret(OPERATOR_NS, SECRET);
            next.metadata.resource_version = current.metadata.resource_version;
            secrets
                .replace(SECRET, &PostParams::default(), &next)
                .await
                .expect("Secret updated");
        }
    };
    let issued = |v: &Value| -> (CertifyResponse, Vec<CertificateDer<'static>>) {
        let r: CertifyResponse = serde_json::from_value(v.clone()).expect("response");
        let chain = pem_certs(&r.chain);
        (r, chain)
    };

    // 1. Add the new root to the bundle; the old root still issues.
    write(CaMaterial {
        bundle_pem: both.clone(),
        ..old.clone()
    })
    .await;
    assert!(served.ca.reload().await.expect("reload"), "switched");
    let (status, v) = post_to(served.addr, &old_only, None, &body).await;
    assert_eq!(status, 200, "an old-only proxy still reaches the CA: {v}");
    check_issued(&v, &key, want);
    let (r, chain) = issued(&v);
    assert_eq!(r.trust_bundle, both, "proxies now receive both roots");
    assert!(accepts(&old_only, &chain) && !accepts(&new_only, &chain));

    // 3. Switch the issuer to the new root.
    write(CaMaterial {
        bundle_pem: both.clone(),
        ..new.clone()
    })
    .await;
    assert!(served.ca.reload().await.expect("reload"));
    let (status, v) = post_to(served.addr, &new_only, None, &body).await;
    assert_eq!(
        status, 200,
        "the serving certificate is from the new root: {v}"
    );
    check_issued(&v, &key, want);
    let (r, chain) = issued(&v);
    assert_eq!(r.trust_bundle, both);
    assert!(accepts(&new_only, &chain) && !accepts(&old_only, &chain));
    assert!(accepts(&pem_certs(&both), &chain));

    // A broken edit (key of another root) is refused; the new issuer stays in use.
    write(CaMaterial {
        bundle_pem: both.clone(),
        key_pem: old.key_pem.clone(),
        ..new.clone()
    })
    .await;
    let err = served
        .ca
        .reload()
        .await
        .expect_err("a key that does not match");
    assert!(err.to_string().contains("does not match"), "{err}");
    let (status, v) = post_to(served.addr, &new_only, None, &body).await;
    assert_eq!(status, 200, "{v}");
    assert!(accepts(&new_only, &issued(&v).1));

    // 4. Remove the old root.
    write(new.clone()).await;
    assert!(served.ca.reload().await.expect("reload"));
    assert!(!served.ca.reload().await.expect("reload"), "unchanged");
    let (status, v) = post_to(served.addr, &new_only, None, &body).await;
    assert_eq!(status, 200, "{v}");
    let (r, chain) = issued(&v);
    assert_eq!(r.trust_bundle, new.bundle_pem, "only the new root is left");
    assert!(accepts(&new_only, &chain));
}
