//! Protocol detection on a fresh connection: a TLS ClientHello (with its SNI and ALPN, to
//! tell mesh mTLS from foreign TLS), the HTTP/2 connection preface, an HTTP/1 request
//! line (checked with httparse), or else opaque TCP.
//!
//! Detection reads (it does not peek) and hands back the bytes it consumed, which the
//! caller replays to whatever serves the connection ([`crate::io::PrefixedIo`] or a
//! write to the upstream). It reads more than once only while the bytes so far are an
//! incomplete prefix of something it recognises, and never longer than the detection
//! timeout: a server-speaks-first protocol (MySQL, SMTP, ...) whose client sends nothing
//! waits at most that long before the connection is proxied as opaque TCP.
//!
//! The default timeout (see [`DEFAULT_TIMEOUT`]) is 300 ms: a client that speaks first
//! sends its first bytes within one round trip of the handshake (well under a
//! millisecond inside a cluster), so a slow client misclassified as opaque is rare and
//! harmless (its bytes still flow, without HTTP features), while a server-speaks-first
//! connection pays the whole timeout once, on connect. Ports known to be opaque skip
//! detection altogether (`protocol: opaque` in the config).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The default detection timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(300);

/// The ALPN protocol that marks a connection between two Remora proxies.
pub const MESH_ALPN: &[u8] = b"remora/1";

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The most bytes detection reads before giving up: a full TLS record, or a long
/// HTTP/1 request line.
const MAX_DETECT_BYTES: usize = 16 * 1024 + 5;

/// What a connection speaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// A TLS ClientHello offering the mesh ALPN: mTLS between proxies.
    MeshTls(ClientHello),
    /// Any other TLS: passed through untouched.
    ForeignTls(ClientHello),
    /// Not recognised; proxied as bytes.
    Opaque(OpaqueReason),
}

/// Why a connection is treated as opaque.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpaqueReason {
    /// The first bytes are neither TLS nor HTTP.
    Unrecognised,
    /// The client sent nothing (or only an incomplete prefix) before the timeout.
    Timeout,
    /// The client closed its side before detection finished.
    Eof,
}

impl Protocol {
    /// The metric label of the outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::MeshTls(_) => "mesh_tls",
            Self::ForeignTls(_) => "foreign_tls",
            Self::Opaque(OpaqueReason::Unrecognised) => "opaque",
            Self::Opaque(OpaqueReason::Timeout) => "timeout",
            Self::Opaque(OpaqueReason::Eof) => "eof",
        }
    }
}

/// The parts of a ClientHello the proxy routes on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
}

/// The result of detection: the protocol and the bytes consumed to find it.
#[derive(Debug)]
pub struct Detection {
    pub protocol: Protocol,
    pub prefix: Bytes,
    pub elapsed: Duration,
}

/// Reads from `io` until the protocol is known, the timeout passes or the client closes.
pub async fn detect<I>(io: &mut I, timeout: Duration) -> std::io::Result<Detection>
where
    I: AsyncRead + Unpin,
{
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start) + timeout;
    let mut buf = BytesMut::with_capacity(2048);
    let protocol = loop {
        if buf.len() >= MAX_DETECT_BYTES {
            break classify_final(&buf);
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_elapsed) => {
                break if buf.is_empty() {
                    Protocol::Opaque(OpaqueReason::Timeout)
                } else {
                    match classify_final(&buf) {
                        Protocol::Opaque(_) => Protocol::Opaque(OpaqueReason::Timeout),
                        p => p,
                    }
                };
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => {
                break if buf.is_empty() {
                    Protocol::Opaque(OpaqueReason::Eof)
                } else {
                    classify_final(&buf)
                };
            }
            Ok(Ok(_)) => {
                if let Some(p) = classify(&buf) {
                    break p;
                }
            }
        }
    };
    Ok(Detection {
        protocol,
        prefix: buf.freeze(),
        elapsed: start.elapsed(),
    })
}

/// Classifies `buf`, or `None` when more bytes could change the answer.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        return classify_tls(buf);
    }
    if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return None;
    }
    if buf.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    classify_http1(buf)
}

/// Classifies `buf` when no more bytes will come: incomplete prefixes are opaque.
fn classify_final(buf: &[u8]) -> Protocol {
    classify(buf).unwrap_or(Protocol::Opaque(OpaqueReason::Unrecognised))
}

fn classify_http1(buf: &[u8]) -> Option<Protocol> {
    // Only the request line decides: parse up to the first line feed with no header
    // slots. Malformed headers after a valid request line are hyper's to reject (400).
    let line_end = buf.iter().position(|b| *b == b'\n');
    let line = line_end.map_or(buf, |i| &buf[..=i]);
    let mut req = httparse::Request::new(&mut []);
    match req.parse(line) {
        Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => {
            Some(Protocol::Http1)
        }
        Ok(httparse::Status::Partial) if req.version.is_some() => Some(Protocol::Http1),
        Ok(httparse::Status::Partial) if line_end.is_none() && buf.len() <= 8 * 1024 => None,
        Ok(httparse::Status::Partial) | Err(_) => {
            Some(Protocol::Opaque(OpaqueReason::Unrecognised))
        }
    }
}

fn classify_tls(buf: &[u8]) -> Option<Protocol> {
    // TLS record: type 0x16 (handshake), legacy version 0x03xx, 16-bit length.
    if buf.len() >= 2 && buf[1] != 0x03 {
        return Some(Protocol::Opaque(OpaqueReason::Unrecognised));
    }
    if buf.len() < 5 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len == 0 || len > 16 * 1024 + 256 {
        return Some(Protocol::Opaque(OpaqueReason::Unrecognised));
    }
    let record = buf.get(5..5 + len)?;
    match parse_client_hello(record) {
        Some(hello) if hello.alpn.iter().any(|p| p == MESH_ALPN) => Some(Protocol::MeshTls(hello)),
        Some(hello) => Some(Protocol::ForeignTls(hello)),
        // A handshake record that is not a ClientHello we can read: still TLS, pass it on.
        None => Some(Protocol::ForeignTls(ClientHello::default())),
    }
}

/// A cursor over a byte slice that returns `None` instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// Parses the SNI and ALPN of a ClientHello handshake message (RFC 8446 §4.1.2). A hello
/// split over several records yields what the first record holds.
fn parse_client_hello(record: &[u8]) -> Option<ClientHello> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let _len = r.take(3)?;
    let _legacy_version = r.take(2)?;
    let _random = r.take(32)?;
    let _session_id = r.vec8()?;
    let _cipher_suites = r.vec16()?;
    let _compression = r.vec8()?;
    let mut hello = ClientHello::default();
    let Some(exts) = r.vec16() else {
        return Some(hello);
    };
    let mut exts = Reader(exts);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        match ty {
            0 => {
                // server_name: list of (type, name); type 0 is host_name.
                let mut list = Reader(Reader(data).vec16()?);
                while !list.0.is_empty() {
                    // Only host_name (0) has a known encoding; after any other type the
                    // rest of the list cannot be framed, so it ends there (as rustls reads it).
                    if list.u8()? != 0 {
                        break;
                    }
                    let name = list.vec16()?;
                    hello.sni = std::str::from_utf8(name).ok().map(str::to_owned);
                }
            }
            16 => {
                let mut list = Reader(Reader(data).vec16()?);
                while !list.0.is_empty() {
                    hello.alpn.push(list.vec8()?.to_vec());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello record with the given SNI and ALPN protocols.
    pub(crate) fn client_hello(sni: Option<&str>, alpn: &[&[u8]]) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(sni) = sni {
            let name = sni.as_bytes();
            let mut list = vec![0u8];
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(name);
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            exts.extend(0u16.to_be_bytes());
            exts.extend((data.len() as u16).to_be_bytes());
            exts.extend(data);
        }
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for p in alpn {
                list.push(p.len() as u8);
                list.extend(*p);
            }
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            exts.extend(16u16.to_be_bytes());
            exts.extend((data.len() as u16).to_be_bytes());
            exts.extend(data);
        }
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![1u8];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn tls_client_hello_mesh_and_foreign() {
        let mesh = client_hello(Some("reviews.shop"), &[MESH_ALPN]);
        match classify(&mesh) {
            Some(Protocol::MeshTls(h)) => {
                assert_eq!(h.sni.as_deref(), Some("reviews.shop"));
                assert_eq!(h.alpn, vec![MESH_ALPN.to_vec()]);
            }
            other => panic!("expected mesh TLS, got {other:?}"),
        }
        let foreign = client_hello(Some("example.com"), &[b"h2", b"http/1.1"]);
        assert!(
            matches!(classify(&foreign), Some(Protocol::ForeignTls(h)) if h.sni.as_deref() == Some("example.com"))
        );
        // Incomplete record: wait for more.
        assert_eq!(classify(&mesh[..mesh.len() - 1]), None);
        assert_eq!(classify(&mesh[..3]), None);
    }

    /// Found by the `detect` fuzz target: an SNI list whose second entry has an unknown
    /// name type. rustls reads the host_name and ignores the rest; the proxy gave up on
    /// the whole ClientHello and classified a mesh client as foreign TLS.
    #[test]
    fn sni_list_with_an_unknown_name_type_keeps_the_alpn() {
        let mut rec = client_hello(Some("reviews.shop"), &[MESH_ALPN]);
        // Append a name of type 0x6f with a truncated length to the server_name list and
        // grow every enclosing length by 2.
        let ext_start = 5 + 4 + 2 + 32 + 1 + 4 + 2;
        let sni_list_len = ext_start + 2 + 4; // server_name's list length
        let bump = |rec: &mut Vec<u8>, at: usize, width: usize| {
            let mut v = 0usize;
            for b in &rec[at..at + width] {
                v = v << 8 | usize::from(*b);
            }
            let v = (v + 2).to_be_bytes();
            rec[at..at + width].copy_from_slice(&v[v.len() - width..]);
        };
        let insert_at = sni_list_len + 2 + 3 + "reviews.shop".len();
        rec.splice(insert_at..insert_at, [0x6f, 0x6d]);
        bump(&mut rec, sni_list_len, 2); // ServerNameList
        bump(&mut rec, ext_start + 2 + 2, 2); // extension data
        bump(&mut rec, ext_start, 2); // extensions
        bump(&mut rec, 6, 3); // handshake
        bump(&mut rec, 3, 2); // record
        match classify(&rec) {
            Some(Protocol::MeshTls(h)) => {
                assert_eq!(h.sni.as_deref(), Some("reviews.shop"));
                assert_eq!(h.alpn, vec![MESH_ALPN.to_vec()]);
            }
            other => panic!("expected mesh TLS, got {other:?}"),
        }
    }

    #[test]
    fn http2_preface_and_prefixes() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        let mut more = H2_PREFACE.to_vec();
        more.extend([0, 0, 0, 4]);
        assert_eq!(classify(&more), Some(Protocol::Http2));
    }

    #[test]
    fn http1_request_lines() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"POST /x?y=1 HTTP/1.0\r\n"), Some(Protocol::Http1));
        // Malformed headers after a valid request line are still HTTP: hyper answers 400.
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nbad header\r\n\r\n"),
            Some(Protocol::Http1)
        );
        // Incomplete request line: wait.
        assert_eq!(classify(b"GET /index.ht"), None);
        // Redis inline commands and other text protocols are not HTTP.
        assert_eq!(
            classify(b"SET a b\r\n"),
            Some(Protocol::Opaque(OpaqueReason::Unrecognised))
        );
        assert_eq!(
            classify(b"PING\r\n"),
            Some(Protocol::Opaque(OpaqueReason::Unrecognised))
        );
        assert_eq!(
            classify(b"\x00\x01binary"),
            Some(Protocol::Opaque(OpaqueReason::Unrecognised))
        );
        assert_eq!(
            classify_final(b"GET /index.ht"),
            Protocol::Opaque(OpaqueReason::Unrecognised)
        );
    }

    #[tokio::test]
    async fn silent_client_times_out_as_opaque() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let d = detect(&mut server, Duration::from_millis(50))
            .await
            .expect("detect");
        assert_eq!(d.protocol, Protocol::Opaque(OpaqueReason::Timeout));
        assert!(d.prefix.is_empty());
        assert!(d.elapsed >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn split_request_line_is_reassembled() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            client.write_all(b"GET /a").await.expect("write");
            tokio::time::sleep(Duration::from_millis(20)).await;
            client
                .write_all(b"b HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            client
        });
        let d = detect(&mut server, Duration::from_secs(5))
            .await
            .expect("detect");
        assert_eq!(d.protocol, Protocol::Http1);
        assert!(d.prefix.starts_with(b"GET /ab HTTP/1.1"));
        drop(task.await.expect("join"));
    }

    #[tokio::test]
    async fn eof_before_any_byte() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let d = detect(&mut server, Duration::from_secs(5))
            .await
            .expect("detect");
        assert_eq!(d.protocol, Protocol::Opaque(OpaqueReason::Eof));
    }
}
