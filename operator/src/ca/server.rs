//! `POST /v1/certify` over TLS: the thin HTTP and Kubernetes layer around
//! [`Issuer::certify`].
//!
//! Request: `{"csr": "<PEM CSR>", "token": "<projected service-account token>"}`; the token
//! may instead come as `Authorization: Bearer <token>` (not both). Response 200:
//! `{"spiffeId", "certificate", "chain", "trustBundle", "notBefore", "notAfter", "serial"}`
//! (PEM strings; times in Unix seconds). A refusal is a 4xx (503 when the TokenReview
//! cannot be made) with `{"error": "<reason>", "message": "<why>"}`; nothing is issued and
//! the refusal is counted by reason.

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use remora_crds::wire::{CertifyRequest, CertifyResponse, ErrorBody};
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};

use super::{
    current::CurrentIssuer,
    identity::{IdentityError, TrustDomain},
    issuer::{CertifyError, Issued, Issuer, IssuerError},
    metrics::{CaMetrics, Reason},
    root::{self, CaMaterial, RootError},
    tls::{self, ServingCert, TlsError, TlsListener},
    token::{TokenError, TokenReviewer},
};
use crate::stream::peer::Peer;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// Where the CA keeps its root and what it issues.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// The operator's namespace: the Secret lives there, and the serving certificate
    /// names `<service>.<namespace>.svc`.
    pub namespace: String,
    /// Name of the CA Secret.
    pub secret: String,
    /// The operator's Service name.
    pub service: String,
    pub trust_domain: TrustDomain,
    /// Lifetime of workload certificates.
    pub ttl: Duration,
}

impl CaOptions {
    /// `--pod-namespace`, `--ca-secret`, `--service-name`, `--trust-domain`, `--cert-ttl`.
    pub fn from_args(args: &crate::Args) -> Result<Self, IdentityError> {
        Ok(Self {
            namespace: args.pod_namespace.clone(),
            secret: args.ca_secret.clone(),
            service: args.service_name.clone(),
            trust_domain: TrustDomain::new(&args.trust_domain)?,
            ttl: args.cert_ttl.get(),
        })
    }
}

/// Why the CA could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("binding the CA listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA root: {0}")]
    Root(#[from] RootError),
    #[error("the CA Secret cannot issue: {0}")]
    Issuer(#[from] IssuerError),
    #[error("the CA's TLS listener: {0}")]
    Tls(#[from] TlsError),
    #[error("serving the CA: {0}")]
    Serve(#[source] std::io::Error),
}

/// The running CA: the issuer, the TokenReview client and the metrics.
#[derive(Debug)]
pub struct Ca {
    issuer: Arc<CurrentIssuer>,
    secrets: Api<Secret>,
    reviewer: TokenReviewer,
    metrics: CaMetrics,
    options: CaOptions,
}

/// A refused request: status, reason and message.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: Reason, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Self {
        let (status, reason) = match &e {
            TokenError::Missing => (StatusCode::UNAUTHORIZED, Reason::MissingToken),
            TokenError::TooLong | TokenError::Invalid(_) => {
                (StatusCode::UNAUTHORIZED, Reason::InvalidToken)
            }
            TokenError::Expired(_) => (StatusCode::UNAUTHORIZED, Reason::ExpiredToken),
            TokenError::WrongAudience(_) => (StatusCode::UNAUTHORIZED, Reason::WrongAudience),
            TokenError::NotServiceAccount(_) => (StatusCode::FORBIDDEN, Reason::NotServiceAccount),
            TokenError::Review(_) => (StatusCode::SERVICE_UNAVAILABLE, Reason::ReviewFailed),
        };
        Self::new(status, reason, e.to_string())
    }
}

impl From<CertifyError> for Refusal {
    fn from(e: CertifyError) -> Self {
        let (status, reason) = match &e {
            CertifyError::MalformedCsr(_) => (StatusCode::BAD_REQUEST, Reason::MalformedCsr),
            CertifyError::BadSignature(_) => (StatusCode::BAD_REQUEST, Reason::BadSignature),
            CertifyError::UnsupportedKey(_) => (StatusCode::BAD_REQUEST, Reason::UnsupportedKey),
            CertifyError::IssuerExpired | CertifyError::Sign(_) | CertifyError::Random => {
                (StatusCode::INTERNAL_SERVER_ERROR, Reason::Internal)
            }
        };
        Self::new(status, reason, e.to_string())
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl From<Issued> for CertifyResponse {
    fn from(i: Issued) -> Self {
        Self {
            spiffe_id: i.spiffe_id,
            certificate: i.cert_pem,
            chain: i.chain_pem,
            trust_bundle: i.trust_bundle_pem,
            not_before: unix_secs(i.not_before),
            not_after: unix_secs(i.not_after),
            serial: i.serial,
        }
    }
}

/// The CSR and the token of a request (pure): the body is JSON with `csr` and optionally
/// `token`; otherwise the token is the `Authorization: Bearer` credential.
pub fn parse_request(
    authorization: Option<&HeaderValue>,
    body: &[u8],
) -> Result<(String, String), Refusal> {
    let req: CertifyRequest = serde_json::from_slice(body).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            Reason::MalformedRequest,
            format!("the body must be JSON {{\"csr\": \"<PEM>\", \"token\": \"<JWT>\"}}: {e}"),
        )
    })?;
    let bearer = match authorization {
        None => None,
        Some(v) => {
            let v = v.to_str().unwrap_or_default();
            let token = v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    Refusal::new(
                        StatusCode::UNAUTHORIZED,
                        Reason::MissingToken,
                        "the Authorization header is not \"Bearer <token>\"",
                    )
                })?;
            Some(token.to_owned())
        }
    };
    let token = match (req.token.filter(|t| !t.is_empty()), bearer) {
        (Some(_), Some(_)) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                Reason::MalformedRequest,
                "the token is given twice (body and Authorization header); send one",
            ));
        }
        (Some(t), None) | (None, Some(t)) => t,
        (None, None) => return Err(TokenError::Missing.into()),
    };
    Ok((req.csr, token))
}

impl Ca {
    /// Reads (or on first start generates) the CA Secret and prepares the issuer.
    pub async fn load(
        client: Client,
        options: CaOptions,
        metrics: CaMetrics,
    ) -> Result<Self, CaError> {
        let now = SystemTime::now();
        let (material, generated) =
            root::load_or_create(client.clone(), &options.namespace, &options.secret, now).await?;
        let issuer = Issuer::new(&material, options.trust_domain.clone(), options.ttl, now)?;
        tracing::info!(
            secret = %format!("{}/{}", options.namespace, options.secret),
            generated,
            roots = issuer.trust_bundle().len(),
            "certificate authority ready"
        );
        Ok(Self {
            issuer: Arc::new(CurrentIssuer::new(material, issuer)),
            secrets: Api::namespaced(client.clone(), &options.namespace),
            reviewer: TokenReviewer::new(client),
            metrics,
            options,
        })
    }

    /// The issuer in use now.
    pub fn issuer(&self) -> Arc<Issuer> {
        self.issuer.get()
    }

    /// The CA Secret contents in use now (they passed the issuer's checks).
    pub fn material(&self) -> CaMaterial {
        self.issuer.material()
    }

    /// Re-reads the CA Secret and switches to its contents when they changed and can issue
    /// (`Ok(true)`). A Secret that was deleted or cannot issue is an error and the current
    /// issuer stays: a root is never regenerated behind the proxies' backs.
    pub async fn reload(&self) -> Result<bool, CaError> {
        let (namespace, name) = (&self.options.namespace, &self.options.secret);
        let secret = self
            .secrets
            .get(name)
            .await
            .map_err(|source| RootError::Kube {
                action: "re-reading",
                namespace: namespace.clone(),
                name: name.clone(),
                source: Box::new(source),
            })?;
        let material = CaMaterial::from_secret(&secret)?;
        let switched = self.issuer.update(material, |m| {
            Issuer::new(
                m,
                self.options.trust_domain.clone(),
                self.options.ttl,
                SystemTime::now(),
            )
        })?;
        if switched {
            tracing::info!(
                roots = self.issuer.get().trust_bundle().len(),
                "the CA Secret changed: new trust bundle and issuer in use"
            );
        }
        Ok(switched)
    }

    pub fn metrics(&self) -> &CaMetrics {
        &self.metrics
    }

    /// Authenticates the request's token, then issues; every refusal is counted.
    pub async fn handle(
        &self,
        authorization: Option<&HeaderValue>,
        body: &[u8],
    ) -> Result<Issued, Refusal> {
        let result = self.handle_uncounted(authorization, body).await;
        match &result {
            Ok(issued) => {
                self.metrics.issued();
                tracing::info!(spiffe_id = %issued.spiffe_id, serial = %issued.serial, "issued");
            }
            Err(r) => {
                self.metrics.refused(r.reason);
                tracing::info!(reason = r.reason.as_str(), "certify refused: {}", r.message);
            }
        }
        result
    }

    async fn handle_uncounted(
        &self,
        authorization: Option<&HeaderValue>,
        body: &[u8],
    ) -> Result<Issued, Refusal> {
        let (csr, token) = parse_request(authorization, body)?;
        let started = Instant::now();
        let reviewed = self.reviewer.review(&token).await;
        self.metrics.observe_review(started.elapsed().as_secs_f64());
        let id = reviewed?;
        let started = Instant::now();
        let issued = self.issuer.get().certify(&csr, &id, SystemTime::now());
        self.metrics.observe_sign(started.elapsed().as_secs_f64());
        Ok(issued?)
    }
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn certify(State(ca): State<Arc<Ca>>, headers: HeaderMap, body: Body) -> Response {
    let bytes: Bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            ca.metrics.refused(Reason::MalformedRequest);
            let msg = format!("reading the body (at most {MAX_BODY} bytes): {e}");
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                &ErrorBody {
                    error: Reason::MalformedRequest.as_str().to_owned(),
                    message: msg,
                },
            );
        }
    };
    match ca.handle(headers.get(header::AUTHORIZATION), &bytes).await {
        Ok(issued) => json(StatusCode::OK, &CertifyResponse::from(issued)),
        Err(r) => json(
            r.status,
            &ErrorBody {
                error: r.reason.as_str().to_owned(),
                message: r.message,
            },
        ),
    }
}

/// `POST /v1/certify`.
pub fn router(ca: Arc<Ca>) -> Router {
    Router::new()
        .route("/v1/certify", post(certify))
        .with_state(ca)
}

/// Serves [`router`] over TLS 1.3 on `listener` until `shutdown` completes, with a
/// serving certificate for the operator's Service issued by the mesh issuer.
pub async fn serve(
    listener: TcpListener,
    ca: Arc<Ca>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CaError> {
    serve_with(listener, ca, Router::new(), shutdown).await
}

/// [`serve`] with more routes on the same listener (the config stream): HTTP/1.1 and
/// HTTP/2, each request knowing its [`Peer`] (address, client certificate's SPIFFE ID).
pub async fn serve_with(
    listener: TcpListener,
    ca: Arc<Ca>,
    routes: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CaError> {
    let names = tls::serving_names(&ca.options.service, &ca.options.namespace);
    let cert = ServingCert::new(ca.issuer.clone(), names, SystemTime::now())?;
    let tls = TlsListener::new(listener, tls::server_config(cert)?).map_err(CaError::Serve)?;
    let app = router(ca).merge(routes);
    axum::serve(tls, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(CaError::Serve)
}

/// Longest wait between two attempts to start the CA.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// How often a running CA re-reads its Secret (root rotation steps need no restart).
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// The CA as part of the operator: binds `--ca-listen`, loads (or generates) the root and
/// serves until `stop` turns true. Every replica runs it (no leader needed). While the
/// apiserver is unreachable, the port is taken or the Secret cannot issue, it logs the
/// reason and retries with backoff (1 s doubling to 30 s), so fixing the Secret needs no
/// restart; the rest of the operator is unaffected. Once serving, it re-reads the Secret
/// every [`RELOAD_EVERY`] and switches to a changed bundle or issuer. The material in use
/// is published on `material` once loaded and after every switch (for the trust bundle
/// and webhook certificate publishers in `bootstrap`). `routes` are served on the same
/// listener (the config stream).
pub async fn run(
    client: Client,
    args: crate::Args,
    metrics: CaMetrics,
    material: watch::Sender<Option<CaMaterial>>,
    mut stop: watch::Receiver<bool>,
    routes: Router,
) {
    let options = match CaOptions::from_args(&args) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("certificate authority disabled: {e}");
            return;
        }
    };
    let listen = args.ca_listen;
    let started = async {
        let mut delay = Duration::from_secs(1);
        loop {
            let attempt = async {
                let listener = TcpListener::bind(listen)
                    .await
                    .map_err(|source| CaError::Bind {
                        addr: listen,
                        source,
                    })?;
                let ca = Ca::load(client.clone(), options.clone(), metrics.clone()).await?;
                Ok::<_, CaError>((listener, ca))
            };
            match attempt.await {
                Ok(started) => return started,
                Err(e) => {
                    tracing::error!(
                        "certificate authority not started (retrying in {delay:?}): {e}"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY);
                }
            }
        }
    };
    let (listener, ca) = tokio::select! {
        started = started => started,
        _ = stop.wait_for(|s| *s) => return,
    };
    tracing::info!(%listen, "certificate authority listening");
    let ca = Arc::new(ca);
    material.send_replace(Some(ca.material()));
    let reload = {
        let ca = ca.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RELOAD_EVERY) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                match ca.reload().await {
                    Ok(true) => {
                        material.send_replace(Some(ca.material()));
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!("keeping the current CA issuer: {e}"),
                }
            }
        })
    };
    let done = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = serve_with(listener, ca, routes, done).await {
        tracing::error!("certificate authority stopped: {e}");
    }
    let _ = reload.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_defaults() {
        let args =
            <crate::Args as clap::Parser>::try_parse_from(["remora-operator"]).expect("defaults");
        assert_eq!(
            args.ca_listen,
            "0.0.0.0:15012".parse::<SocketAddr>().expect("addr")
        );
        let o = CaOptions::from_args(&args).expect("options");
        assert_eq!(
            (
                o.namespace.as_str(),
                o.secret.as_str(),
                o.service.as_str(),
                o.trust_domain.as_str()
            ),
            (
                "remora-system",
                "remora-ca",
                "remora-operator",
                "cluster.local"
            )
        );
        assert_eq!(o.ttl, Duration::from_secs(24 * 3600));

        let args = <crate::Args as clap::Parser>::try_parse_from([
            "remora-operator",
            "--ca-listen=127.0.0.1:0",
            "--ca-secret=mesh-root",
            "--cert-ttl=1h",
            "--trust-domain=example.org",
        ])
        .expect("flags");
        let o = CaOptions::from_args(&args).expect("options");
        assert_eq!(
            (o.secret.as_str(), o.ttl),
            ("mesh-root", Duration::from_secs(3600))
        );
        assert_eq!(o.trust_domain.as_str(), "example.org");
        for bad in [
            "--trust-domain=Not/Valid",
            "--cert-ttl=forever",
            "--ca-listen=nowhere",
        ] {
            assert!(
                <crate::Args as clap::Parser>::try_parse_from(["remora-operator", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn token_in_body_or_header_not_both() {
        let body = br#"{"csr": "x", "token": "t1"}"#;
        let (csr, token) = parse_request(None, body).expect("body token");
        assert_eq!((csr.as_str(), token.as_str()), ("x", "t1"));

        let auth = HeaderValue::from_static("Bearer t2");
        let (_, token) = parse_request(Some(&auth), br#"{"csr": "x"}"#).expect("header token");
        assert_eq!(token, "t2");

        let r = parse_request(Some(&auth), body).expect_err("twice");
        assert_eq!(
            (r.status, r.reason),
            (StatusCode::BAD_REQUEST, Reason::MalformedRequest)
        );
    }

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        for (auth, body, status, reason) in [
            (
                None,
                &b"not json"[..],
                StatusCode::BAD_REQUEST,
                Reason::MalformedRequest,
            ),
            (
                None,
                br#"{"token": "t"}"#,
                StatusCode::BAD_REQUEST,
                Reason::MalformedRequest,
            ),
            (
                None,
                br#"{"csr": 5}"#,
                StatusCode::BAD_REQUEST,
                Reason::MalformedRequest,
            ),
            (
                None,
                br#"{"csr": "x"}"#,
                StatusCode::UNAUTHORIZED,
                Reason::MissingToken,
            ),
            (
                None,
                br#"{"csr": "x", "token": ""}"#,
                StatusCode::UNAUTHORIZED,
                Reason::MissingToken,
            ),
            (
                Some(HeaderValue::from_static("Basic abc")),
                br#"{"csr": "x"}"#,
                StatusCode::UNAUTHORIZED,
                Reason::MissingToken,
            ),
        ] {
            let r = parse_request(auth.as_ref(), body).expect_err("refused");
            assert_eq!(
                (r.status, r.reason),
                (status, reason),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert!(!r.message.is_empty());
        }
    }
}
