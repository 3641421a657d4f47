//! A minimal client of the derived-config stream for the cluster tests and the
//! benchmark: HTTP/2 over TLS 1.3 (ALPN `h2`) trusting the mesh bundle, with an optional
//! mesh client certificate signed directly by an [`Issuer`], and the body read as
//! ndjson [`Message`]s.

#![allow(dead_code)]

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use http_body_util::{BodyExt, Empty};
use hyper::{
    Request, StatusCode,
    body::{Bytes, Incoming},
    client::conn::http2::SendRequest,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::KeyPair;
use remora_crds::wire::Message;
use remora_operator::ca::{Issuer, ServiceAccountId};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// The name the operator's serving certificate carries (default flags).
pub const SERVER_NAME: &str = "remora-operator.remora-system.svc";

/// A client certificate chain and its key.
#[derive(Debug)]
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ClientCert {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

pub fn pem_certs(text: &str) -> Vec<CertificateDer<'static>> {
    x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .map(|p| CertificateDer::from(p.expect("PEM").contents))
        .collect()
}

/// A certificate for service account `ns/sa` from `issuer`, on a fresh P-256 key.
pub fn client_cert(issuer: &Issuer, ns: &str, sa: &str) -> ClientCert {
    let key = KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("csr pem");
    let id = ServiceAccountId::new(ns, sa).expect("service account");
    let issued = issuer
        .certify(&csr, &id, SystemTime::now())
        .expect("certificate issued");
    ClientCert {
        chain: pem_certs(&issued.chain_pem),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// Connection settings.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub cert: Option<ClientCert>,
    /// HTTP/2 stream and connection receive windows (small ones make a client slow).
    pub window: Option<u32>,
}

/// One HTTP/2 connection to the stream port.
#[derive(Debug, Clone)]
pub struct Conn {
    send: SendRequest<Empty<Bytes>>,
}

/// A TLS 1.3 connection to the operator, trusting `roots`, with ALPN `alpn`.
async fn tls(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    cert: Option<ClientCert>,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| e.to_string())?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .with_root_certificates(store);
    let mut config = match cert {
        Some(c) => builder
            .with_client_auth_cert(c.chain, c.key)
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))
}

/// Connects to `addr`, checking the operator's certificate against `roots`.
pub async fn connect(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    options: Options,
) -> Result<Conn, String> {
    let tls = tls(addr, roots, options.cert, b"h2").await?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if alpn.as_deref() != Some(b"h2") {
        return Err(format!("ALPN {alpn:?}, not h2"));
    }
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    if let Some(w) = options.window {
        builder
            .initial_stream_window_size(w)
            .initial_connection_window_size(w);
    }
    let (send, conn) = builder
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(Conn { send })
}

/// A watch answer: its status and its body, read line by line.
#[derive(Debug)]
pub struct Watch {
    pub status: StatusCode,
    body: Incoming,
    buf: Vec<u8>,
}

impl Conn {
    /// `GET path` (e.g. `/v1/watch/outbound?target=…`).
    pub async fn get(&mut self, path: &str) -> Result<Watch, String> {
        self.send.ready().await.map_err(|e| e.to_string())?;
        let req = Request::get(format!("https://{SERVER_NAME}{path}"))
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let resp = self
            .send
            .send_request(req)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        Ok(Watch {
            status: resp.status(),
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }
}

impl Watch {
    /// The next line, `None` at the end of the body.
    pub async fn line(&mut self) -> Result<Option<Vec<u8>>, String> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let rest = self.buf.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                return Ok(Some(line));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The next message (panics on a malformed line or the end of the stream).
    pub async fn message(&mut self) -> Message {
        let line = self
            .line()
            .await
            .expect("reading the stream")
            .expect("the stream goes on");
        serde_json::from_slice(&line).unwrap_or_else(|e| {
            panic!("{:?} is not a message: {e}", String::from_utf8_lossy(&line))
        })
    }

    /// The whole body of a refusal, as JSON.
    pub async fn error(mut self) -> serde_json::Value {
        let mut all = Vec::new();
        while let Ok(Some(line)) = self.line().await {
            all.extend(line);
        }
        all.append(&mut self.buf);
        serde_json::from_slice(&all).expect("a JSON refusal")
    }
}

/// `GET path` over HTTP/1.1 (ALPN `http/1.1`, as curl would): the status line and the raw
/// bytes read until `until` appears in them (or the connection ends).
pub async fn http1_get(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    cert: ClientCert,
    path: &str,
    until: &str,
) -> Result<(String, String), String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\n\r\n");
    http1_exchange(addr, roots, Some(cert), request.as_bytes(), until).await
}

/// Sends the raw HTTP/1.1 `request` over TLS (ALPN `http/1.1`, `cert` if any): the status
/// line and the raw bytes read until `until` appears in them (or the connection ends).
pub async fn http1_exchange(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    cert: Option<ClientCert>,
    request: &[u8],
    until: &str,
) -> Result<(String, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls(addr, roots, cert, b"http/1.1").await?;
    tls.write_all(request).await.map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&raw).contains(until) {
        let n = tls.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.lines().next().unwrap_or_default().to_owned();
    Ok((status, text))
}
