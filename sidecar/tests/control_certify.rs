//! Failure injection for the proxy's certify loop (`control::certify::run`) against a
//! scripted CA: the first attempt is refused with 503 (the TokenReview could not be made)
//! and retried after a backoff; the token file is re-read for every attempt; a key is
//! generated for every request; the certificate is renewed at 70 % of the lifetime the
//! answer states. The real CA is exercised by `e2e/tests/cluster_control_plane.rs`.

mod fake_operator;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use fake_operator::{Body, Pki};
use http::{Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use rcgen::{CertificateSigningRequestParams, PublicKeyData as _, SanType};
use remora_proxy::{
    control::certify::{CertifySettings, run},
    metrics::Metrics,
    tls::IdentityStore,
};

const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// What the scripted CA saw: the token and the CSR's public key of each request.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

fn json(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::new(Full::new(Bytes::from(body.to_string()))))
        .expect("response")
}

/// Refuses the first request, then signs every CSR for [`ID`], stating a 5-second
/// lifetime: the renewal comes 3 s after `notBefore` (whole seconds: 2–3 s after the
/// answer).
async fn scripted_ca(pki: Arc<Pki>) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let addr = fake_operator::serve(&pki.clone(), move |req| {
        let (pki, log) = (pki.clone(), log.clone());
        async move {
            let body = req.into_body().collect().await.expect("body").to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON request");
            let csr = body["csr"].as_str().expect("csr").to_owned();
            let token = body["token"].as_str().expect("token").to_owned();
            let mut csr = CertificateSigningRequestParams::from_pem(&csr).expect("a valid CSR");
            let n = {
                let mut log = log.lock().expect("lock");
                log.push((token, csr.public_key.der_bytes().to_vec()));
                log.len()
            };
            if n == 1 {
                return json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"error": "review_failed", "message": "apiserver down"}),
                );
            }
            csr.params.subject_alt_names = vec![SanType::URI(ID.try_into().expect("uri"))];
            let leaf = csr.signed_by(&pki.issuer).expect("signed").pem();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_secs();
            json(
                StatusCode::OK,
                serde_json::json!({
                    "spiffeId": ID, "certificate": leaf, "chain": leaf, "trustBundle": pki.pem,
                    "notBefore": now, "notAfter": now + 5, "serial": format!("{n:x}"),
                }),
            )
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test]
async fn refusals_back_off_tokens_are_reread_and_certificates_renew_at_seventy_percent() {
    let pki = Arc::new(Pki::new());
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, seen) = scripted_ca(pki.clone()).await;
    let token = dir.path().join("token");
    std::fs::write(&token, "token-1\n").expect("token");
    let settings = CertifySettings {
        endpoint: pki.endpoint(&addr, dir.path()),
        token_file: token.clone(),
        expected: Some(ID.to_owned()),
    };
    let store = Arc::new(IdentityStore::default());
    let metrics = Arc::new(Metrics::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(settings, store.clone(), metrics.clone(), async {
        let _ = stopped.await;
    }));

    let wait = |what: &str, n: usize| {
        let seen = seen.clone();
        let what = what.to_owned();
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            while seen.lock().expect("lock").len() < n {
                assert!(Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait("the first attempt", 1).await;
    assert!(store.current().is_none(), "refused: no identity yet");
    // The refusal is kept for /ready to name (the pod's events show it through the
    // postStart hook); it is recorded right after the answer, so allow a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let why = loop {
        if let Some(why) = store.last_failure() {
            break why;
        }
        assert!(Instant::now() < deadline, "the refusal is recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        why.starts_with("cannot certify with the operator: the operator refused: 503")
            && why.contains("apiserver down"),
        "{why}"
    );
    // The kubelet rotates the projected token; the next attempt must read the new one.
    std::fs::write(&token, "token-2\n").expect("token");
    wait("a retry after the backoff", 2).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.current().is_none() {
        assert!(
            Instant::now() < deadline,
            "the retry installs the certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = store.current().expect("identity");
    assert_eq!(&*first.spiffe_id, ID);
    assert!(store.last_failure().is_none(), "forgotten once certified");

    let issued = Instant::now();
    wait("the renewal", 3).await;
    let after = issued.elapsed();
    assert!(
        after >= Duration::from_millis(1500),
        "renewed at 70 % of 5 s, not at once: {after:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while store
        .current()
        .is_some_and(|current| Arc::ptr_eq(&current, &first))
    {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate is installed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    task.await.expect("the loop stops");

    let seen = seen.lock().expect("lock").clone();
    let tokens: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        tokens[..3],
        ["token-1", "token-2", "token-2"],
        "re-read, trimmed"
    );
    assert_ne!(seen[1].1, seen[2].1, "a new key for every request");
    let text = metrics.encode();
    for line in [
        r#"remora_proxy_certificate_renewals_total{reason="operator_error"} 1"#,
        r#"remora_proxy_certificate_renewals_total{reason="issued"} 2"#,
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
}
