//! Helpers of the abuse and limit tests: mesh TLS clients that present chosen
//! certificates (or none), from chosen loopback source addresses, and metric reads.
#![allow(dead_code)]

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use remora_proxy::{Proxy, Settings, detect::MESH_ALPN, identity::provider};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::common::{backends::Backend, pki::*};

pub const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
pub const REVIEWS: &str = "spiffe://cluster.local/ns/shop/sa/reviews";

/// The server pod: its proxy (identity `REVIEWS`, file certificates) in front of a
/// counting app.
pub struct Server {
    pub dir: TempDir,
    pub ca: Ca,
    pub proxy: Proxy,
    pub app: Backend,
}

/// A [`Server`] whose proxy has the `inbound:` block `inbound` and settings `tweak`ed.
pub async fn server(inbound: &str, tweak: impl FnOnce(&mut Settings)) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("remora test CA");
    let ids = IdentityPaths::write(dir.path(), "reviews", REVIEWS, &ca, &ca);
    let app = Backend::start("app").await;
    let mut settings = crate::common::settings(app.addr);
    tweak(&mut settings);
    let proxy = crate::common::start(
        settings,
        &format!("version: 1\n{}inbound:\n{inbound}", ids.yaml()),
    )
    .await;
    Server {
        dir,
        ca,
        proxy,
        app,
    }
}

impl Server {
    /// A client config presenting a valid mesh certificate for `id`.
    pub fn client(&self, id: &str) -> Arc<ClientConfig> {
        let (cert, key) = self.ca.issue(id, false);
        client_config(Some((&cert, &key)))
    }
}

/// Accepts any server certificate: these clients test the server's checks, not their own.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A mesh TLS client config (TLS 1.3, ALPN `remora/1`) presenting `cert` (PEM certificate
/// and key), or no certificate.
pub fn client_config(cert: Option<(&str, &str)>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match cert {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("certificate PEM");
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    Arc::new(config)
}

/// A TCP connection to `addr` from `from` (any 127/8 address is this host's).
pub async fn connect_from(from: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// Mesh TLS to `addr` from `from`.
pub async fn mesh_tls(
    config: Arc<ClientConfig>,
    from: IpAddr,
    addr: SocketAddr,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = connect_from(from, addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    TlsConnector::from(config).connect(name, tcp).await
}

/// Over mesh TLS, one HTTP/1.1 GET; the response's status line, or why there was none.
/// (In TLS 1.3 the server checks the client's certificate after the client has finished
/// its handshake: a refusal shows on the first read.)
pub async fn mesh_get(
    config: Arc<ClientConfig>,
    from: IpAddr,
    addr: SocketAddr,
) -> Result<String, String> {
    let exchange = async {
        let mut tls = mesh_tls(config, from, addr).await?;
        tls.write_all(b"GET /hello HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await?;
        Ok::<_, io::Error>(out)
    };
    status_line(tokio::time::timeout(Duration::from_secs(10), exchange).await)
}

/// The value of the metric line that starts with `prefix` (0 when absent).
pub fn metric(p: &Proxy, prefix: &str) -> u64 {
    p.context()
        .metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `remora_proxy_inbound_refused_total{reason="<reason>"}`.
pub fn refused(p: &Proxy, reason: &str) -> u64 {
    metric(
        p,
        &format!("remora_proxy_inbound_refused_total{{reason=\"{reason}\"}}"),
    )
}

pub const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
/// Another loopback address: a second client host.
pub const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// One plaintext HTTP/1.1 GET from `from` to `addr`; the response's status line.
pub async fn plain_get(from: IpAddr, addr: SocketAddr) -> Result<String, String> {
    let exchange = async {
        let mut c = connect_from(from, addr).await?;
        c.write_all(b"GET /hello HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        c.read_to_end(&mut out).await?;
        Ok::<_, io::Error>(out)
    };
    status_line(tokio::time::timeout(Duration::from_secs(10), exchange).await)
}

fn status_line(
    r: Result<io::Result<Vec<u8>>, tokio::time::error::Elapsed>,
) -> Result<String, String> {
    match r {
        Err(_) => Err("no answer within 10 s".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(out)) if out.is_empty() => Err("closed without an answer".to_owned()),
        Ok(Ok(out)) => Ok(String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()),
    }
}
