//! Application probes on the admin port. The webhook rewrites the app containers' HTTP,
//! TCP and gRPC probes to `/app-health/<container>/<livez|readyz|startupz>` (so kubelet
//! probes work under Strict mTLS) and hands the original targets to the proxy as JSON in
//! `REMORA_PROXY_APP_PROBES`, keyed by that path. The proxy runs the original check against
//! the app and answers 200 (healthy) or an error status, as kubelet would judge it.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// A header of an HTTP probe.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

/// An HTTP GET probe (Kubernetes `HTTPGetAction`, port resolved to a number).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGet {
    #[serde(default)]
    pub path: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub http_headers: Vec<ProbeHeader>,
}

/// A TCP connect probe.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct TcpSocket {
    pub port: u16,
    #[serde(default)]
    pub host: Option<String>,
}

/// A gRPC health-check probe (`grpc.health.v1.Health/Check`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Grpc {
    pub port: u16,
    #[serde(default)]
    pub service: Option<String>,
}

/// One rewritten probe's original target.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    #[serde(default)]
    pub http_get: Option<HttpGet>,
    #[serde(default)]
    pub tcp_socket: Option<TcpSocket>,
    #[serde(default)]
    pub grpc: Option<Grpc>,
    #[serde(default)]
    pub timeout_seconds: Option<u32>,
}

/// Probes keyed by their rewritten path (`/app-health/web/livez`).
pub type AppProbes = HashMap<String, AppProbe>;

/// Parses `REMORA_PROXY_APP_PROBES`.
pub fn parse(json: &str) -> Result<AppProbes, serde_json::Error> {
    serde_json::from_str(json)
}

/// The outcome of a probe: the status to answer kubelet with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: StatusCode,
    pub detail: String,
}

fn fail(detail: impl Into<String>) -> Outcome {
    Outcome {
        status: StatusCode::SERVICE_UNAVAILABLE,
        detail: detail.into(),
    }
}

fn ok(detail: impl Into<String>) -> Outcome {
    Outcome {
        status: StatusCode::OK,
        detail: detail.into(),
    }
}

/// Runs `probe` against the app at `default_host` (the pod IP, or loopback).
pub async fn check(probe: &AppProbe, default_host: IpAddr) -> Outcome {
    let timeout = Duration::from_secs(u64::from(probe.timeout_seconds.unwrap_or(1).max(1)));
    match tokio::time::timeout(timeout, run(probe, default_host)).await {
        Ok(outcome) => outcome,
        Err(_) => fail(format!("probe timed out after {timeout:?}")),
    }
}

fn target(host: Option<&str>, default_host: IpAddr, port: u16) -> String {
    match host {
        Some(h) if !h.is_empty() => format!("{h}:{port}"),
        _ => std::net::SocketAddr::new(default_host, port).to_string(),
    }
}

async fn run(probe: &AppProbe, default_host: IpAddr) -> Outcome {
    if let Some(h) = &probe.http_get {
        return http_probe(h, &target(h.host.as_deref(), default_host, h.port)).await;
    }
    if let Some(t) = &probe.tcp_socket {
        let addr = target(t.host.as_deref(), default_host, t.port);
        return match TcpStream::connect(&addr).await {
            Ok(_) => ok(format!("connected to {addr}")),
            Err(e) => fail(format!("cannot connect to {addr}: {e}")),
        };
    }
    if let Some(g) = &probe.grpc {
        return grpc_probe(g, &target(None, default_host, g.port)).await;
    }
    fail("the probe has no action")
}

/// Accepts any server certificate, as kubelet's HTTPS probes do (they skip verification);
/// handshake signatures are still checked.
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn probe_tls() -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

async fn http_probe(h: &HttpGet, addr: &str) -> Outcome {
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot connect to {addr}: {e}")),
    };
    if !h
        .scheme
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("https"))
    {
        return http_get(h, addr, stream).await;
    }
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = match ServerName::try_from(host.to_owned()) {
        Ok(n) => n,
        Err(e) => return fail(format!("invalid probe host {host:?}: {e}")),
    };
    let config = match probe_tls() {
        Ok(c) => c,
        Err(e) => return fail(format!("TLS setup failed: {e}")),
    };
    match tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
    {
        Ok(tls) => http_get(h, addr, tls).await,
        Err(e) => fail(format!("TLS handshake with {addr} failed: {e}")),
    }
}

async fn http_get<I>(h: &HttpGet, addr: &str, io: I) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok((mut send, conn)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io)).await
    else {
        return fail(format!("HTTP handshake with {addr} failed"));
    };
    tokio::spawn(conn);
    let path = h
        .path
        .as_deref()
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let mut req = Request::get(path)
        .header(header::HOST, addr)
        .header(header::USER_AGENT, "kube-probe/remora");
    for hd in &h.http_headers {
        req = req.header(hd.name.as_str(), hd.value.as_str());
    }
    let req = match req.body(Empty::new()) {
        Ok(r) => r,
        Err(e) => return fail(format!("invalid probe request: {e}")),
    };
    match send.send_request(req).await {
        // Kubelet's rule: 200..400 is success.
        Ok(resp) if (200..400).contains(&resp.status().as_u16()) => {
            ok(format!("GET {path}: {}", resp.status()))
        }
        Ok(resp) => Outcome {
            status: resp.status(),
            detail: format!("GET {path}: {}", resp.status()),
        },
        Err(e) => fail(format!("GET {path} failed: {e}")),
    }
}

/// A gRPC message frame holding `HealthCheckRequest { service }`.
pub fn health_check_request(service: &str) -> Bytes {
    let mut msg = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(msg.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    Bytes::from(frame)
}

/// Is a gRPC response body a `HealthCheckResponse { status: SERVING }`?
pub fn is_serving(body: &[u8]) -> bool {
    // One uncompressed frame whose message holds field 1 (varint) = 1.
    body.len() >= 5 && body[0] == 0 && body[5..].windows(2).any(|w| w == [0x08, 0x01])
}

async fn grpc_probe(g: &Grpc, addr: &str) -> Outcome {
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot connect to {addr}: {e}")),
    };
    let Ok((mut send, conn)) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    else {
        return fail(format!("HTTP/2 handshake with {addr} failed"));
    };
    tokio::spawn(conn);
    let req = Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .body(Full::new(health_check_request(
            g.service.as_deref().unwrap_or(""),
        )));
    let req = match req {
        Ok(r) => r,
        Err(e) => return fail(format!("invalid probe request: {e}")),
    };
    let resp = match send.send_request(req).await {
        Ok(r) => r,
        Err(e) => return fail(format!("gRPC health check failed: {e}")),
    };
    let header_status = resp.headers().get("grpc-status").cloned();
    let collected = match resp.into_body().collect().await {
        Ok(c) => c,
        Err(e) => return fail(format!("gRPC health check failed: {e}")),
    };
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(header_status);
    let body = collected.to_bytes();
    match status.as_ref().map(|s| s.as_bytes()) {
        Some(b"0") if is_serving(&body) => ok("SERVING"),
        Some(b"0") => fail("NOT_SERVING"),
        Some(other) => fail(format!("grpc-status {}", String::from_utf8_lossy(other))),
        None => fail("no grpc-status in the response"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_webhook_writes() {
        let json = r#"{
            "/app-health/web/livez": {"httpGet": {"path": "/healthz", "port": 8080, "httpHeaders": [{"name": "x-probe", "value": "1"}]}, "timeoutSeconds": 3},
            "/app-health/web/readyz": {"tcpSocket": {"port": 8080}},
            "/app-health/api/startupz": {"grpc": {"port": 9090, "service": "api"}}
        }"#;
        let probes = parse(json).expect("valid");
        assert_eq!(
            probes["/app-health/web/livez"]
                .http_get
                .as_ref()
                .map(|h| h.port),
            Some(8080)
        );
        assert_eq!(probes["/app-health/web/livez"].timeout_seconds, Some(3));
        assert_eq!(
            probes["/app-health/web/readyz"]
                .tcp_socket
                .as_ref()
                .map(|t| t.port),
            Some(8080)
        );
        assert_eq!(
            probes["/app-health/api/startupz"]
                .grpc
                .as_ref()
                .and_then(|g| g.service.as_deref()),
            Some("api")
        );
        assert!(
            parse(r#"{"/app-health/a/livez": {"httpGet": {"port": "http"}}}"#).is_err(),
            "ports arrive resolved"
        );
    }

    #[test]
    fn grpc_health_messages() {
        assert_eq!(&health_check_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &health_check_request("api")[..],
            &[0, 0, 0, 0, 5, 0x0a, 3, b'a', b'p', b'i']
        );
        assert!(is_serving(&[0, 0, 0, 0, 2, 0x08, 0x01]));
        assert!(!is_serving(&[0, 0, 0, 0, 2, 0x08, 0x02]));
        assert!(!is_serving(&[]));
    }

    #[tokio::test]
    async fn https_probes_skip_certificate_verification_like_kubelet() {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let cert =
            rcgen::generate_simple_self_signed(vec!["app.local".to_owned()]).expect("self-signed");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let status = if req.uri().path() == "/ok" {
                                StatusCode::OK
                            } else {
                                StatusCode::NOT_FOUND
                            };
                            let mut resp = http::Response::new(Empty::<Bytes>::new());
                            *resp.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(resp)
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        let probe = |path: &str| AppProbe {
            http_get: Some(HttpGet {
                path: Some(path.to_owned()),
                port,
                host: None,
                scheme: Some("HTTPS".to_owned()),
                http_headers: vec![],
            }),
            tcp_socket: None,
            grpc: None,
            timeout_seconds: Some(5),
        };
        let localhost = IpAddr::from([127, 0, 0, 1]);
        assert_eq!(check(&probe("/ok"), localhost).await.status, StatusCode::OK);
        assert_eq!(
            check(&probe("/missing"), localhost).await.status,
            StatusCode::NOT_FOUND
        );
    }
}
