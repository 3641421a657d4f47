//! Raw HTTP/1 at both ends of the smuggling tests, so that what crossed the proxy is
//! checked byte for byte, never assumed: a [`Recorder`] upstream keeps every byte it
//! receives and parses it as a strict server would (one `Content-Length` or a final
//! `chunked`, nothing else), answering each request it parsed; the client side writes
//! raw bytes and counts the responses it got back.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// One request as the upstream parsed it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

/// A complete message and the bytes it took, or `None` while incomplete.
type Parsed<T> = Result<Option<(T, usize)>, String>;

/// Parses one request from the front of `buf`.
pub fn parse_request(buf: &[u8]) -> Parsed<Seen> {
    let mut headers = vec![httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad request head: {e}")),
    };
    let seen_headers: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    let Some((body, used)) = parse_body(&buf[head..], &seen_headers)? else {
        return Ok(None);
    };
    Ok(Some((
        Seen {
            method: req.method.unwrap_or_default().to_owned(),
            path: req.path.unwrap_or_default().to_owned(),
            headers: seen_headers,
            body,
        },
        head + used,
    )))
}

/// The body after a head with `headers`: chunked, by length, or empty.
fn parse_body(buf: &[u8], headers: &[(String, Vec<u8>)]) -> Parsed<Vec<u8>> {
    let values = |name: &str| -> Vec<&[u8]> {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    };
    let te = values("transfer-encoding");
    let cl = values("content-length");
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err("both Transfer-Encoding and Content-Length".into());
        }
        let last = te
            .last()
            .map(|v| String::from_utf8_lossy(v).to_ascii_lowercase());
        if last
            .as_deref()
            .map(|v| v.rsplit(',').next().unwrap_or("").trim())
            != Some("chunked")
        {
            return Err(format!("Transfer-Encoding without a final chunked: {te:?}"));
        }
        return parse_chunked(buf);
    }
    match cl.as_slice() {
        [] => Ok(Some((Vec::new(), 0))),
        [one] => {
            let n: usize = std::str::from_utf8(one)
                .ok()
                .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad Content-Length {:?}", String::from_utf8_lossy(one)))?;
            Ok((buf.len() >= n).then(|| (buf[..n].to_vec(), n)))
        }
        _ => Err(format!("{} Content-Length fields", cl.len())),
    }
}

fn parse_chunked(buf: &[u8]) -> Parsed<Vec<u8>> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = find_crlf(&buf[at..]) else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[at..at + eol]).map_err(|e| e.to_string())?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {line:?}"))?;
        at += eol + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(eol) = find_crlf(&buf[at..]) else {
                    return Ok(None);
                };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        at += size + 2;
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// What a recording upstream has received.
#[derive(Debug, Default)]
pub struct Record {
    /// Every byte, per connection.
    pub bytes: Vec<Vec<u8>>,
    /// Every request parsed, in order of arrival.
    pub requests: Vec<Seen>,
    /// Bytes a strict server could not parse, per connection.
    pub errors: Vec<String>,
}

/// A raw TCP upstream that records and parses what it receives and answers every request
/// it parsed with `200`, `x-upstream-path` naming the path.
#[derive(Clone, Debug)]
pub struct Recorder {
    pub addr: SocketAddr,
    record: Arc<Mutex<Record>>,
}

impl Recorder {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let record: Arc<Mutex<Record>> = Arc::default();
        let r = record.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let r = r.clone();
                let idx = {
                    let mut rec = r.lock().expect("record");
                    rec.bytes.push(Vec::new());
                    rec.bytes.len() - 1
                };
                tokio::spawn(serve_recorded(s, idx, r));
            }
        });
        Self { addr, record }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.record.lock().expect("record").requests.clone()
    }

    pub fn errors(&self) -> Vec<String> {
        self.record.lock().expect("record").errors.clone()
    }

    /// Bytes received and not (yet) parsed into a request, over all connections.
    pub fn unparsed(&self) -> usize {
        let rec = self.record.lock().expect("record");
        rec.bytes
            .iter()
            .map(|b| {
                let mut at = 0;
                while let Ok(Some((_, n))) = parse_request(&b[at..]) {
                    at += n;
                }
                b.len() - at
            })
            .sum()
    }
}

async fn serve_recorded(mut s: TcpStream, idx: usize, record: Arc<Mutex<Record>>) {
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        record.lock().expect("record").bytes[idx].extend_from_slice(&buf[..n]);
        loop {
            match parse_request(&pending) {
                Ok(Some((seen, used))) => {
                    pending.drain(..used);
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-upstream-path: {}\r\n\r\nok",
                        seen.path
                    );
                    record.lock().expect("record").requests.push(seen);
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    record.lock().expect("record").errors.push(e);
                    return;
                }
            }
        }
    }
}

/// Writes `bytes` on a new connection and reads until the proxy closes it or sends
/// nothing more for `idle`.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], idle: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(idle, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// The statuses of the complete responses in `bytes`, in order.
pub fn statuses(bytes: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = resp.parse(&bytes[at..]) else {
            return out;
        };
        let code = resp.code.unwrap_or(0);
        let hs: Vec<(String, Vec<u8>)> = resp
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect();
        out.push(code);
        at += head;
        if (100..200).contains(&code) || code == 204 || code == 304 {
            continue;
        }
        match parse_body(&bytes[at..], &hs) {
            Ok(Some((_, n))) => at += n,
            _ => return out,
        }
    }
}
