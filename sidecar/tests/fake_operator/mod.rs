//! A stand-in for the operator's TLS listener in the proxy's control-plane tests: a test
//! CA, a serving certificate for the operator's Service name, and an HTTP/2 + HTTP/1.1
//! server whose answers the test scripts. Used for failure injection the real operator
//! cannot be made to produce on demand (`e2e/tests/cluster_control_plane.rs` runs the
//! real one).

#![allow(dead_code)]

use std::{convert::Infallible, future::Future, path::Path, sync::Arc};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use remora_proxy::control::{
    target::{OperatorAddr, OperatorName},
    transport::OperatorEndpoint,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The name the operator's serving certificate carries.
pub const SERVER_NAME: &str = "remora-operator.remora-system.svc";

pub type Body = BoxBody<Bytes, Infallible>;

/// A test CA.
pub struct Pki {
    pub issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Pki {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `san` (server and client auth) and its key.
    pub fn leaf(&self, san: SanType) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = vec![san];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (cert.der().clone(), key)
    }

    /// Writes the bundle into `dir` and returns the endpoint of a server at `addr`.
    pub fn endpoint(&self, addr: &str, dir: &Path) -> OperatorEndpoint {
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, &self.pem).expect("bundle");
        OperatorEndpoint {
            addr: addr.parse::<OperatorAddr>().expect("addr"),
            name: OperatorName::new(SERVER_NAME).expect("name"),
            trust_bundle: bundle,
        }
    }
}

pub fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// Serves `handler` over TLS 1.3 (h2 and http/1.1) with a certificate for
/// [`SERVER_NAME`]; returns `127.0.0.1:<port>`.
pub async fn serve<F, Fut>(pki: &Pki, handler: F) -> String
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let (cert, key) = pki.leaf(SanType::DnsName(SERVER_NAME.try_into().expect("dns")));
    let mut config = ServerConfig::builder_with_provider(remora_proxy::identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![cert], pkcs8(&key))
        .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let handler = handler.clone();
            let service = service_fn(move |req| {
                let answer = handler(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}
