//! The proxy's own HTTP handling around hyper, on HTTP/1 bytes from a client (requests)
//! or an upstream (responses), parsed by hyper exactly as the proxy's server and client
//! configure it.
//!
//! Requests go through the proxy's `prepare` (hop-by-hop stripping, `x-request-id`, a
//! new trace span, the small-body buffering) and both upstream shapes ([`Shape::apply`],
//! HTTP/1 origin form with `Host`, HTTP/2 absolute form). Asserted: no hop-by-hop field
//! survives and nothing else changes but the trace and id headers (and, in the HTTP/1
//! shape, an added `Host` naming the request's authority); a well-formed `traceparent` keeps its trace id and flags; a body read
//! whole has exactly its `Content-Length`; the shaped URIs are well formed. Responses go
//! through [`read_small_body`] and the hop-by-hop stripping: a buffered body has its
//! length, and errors are the typed upstream error.

#![no_main]

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version, header, uri::Authority};
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use libfuzzer_sys::fuzz_target;
use remora_fuzz::block_on;
use remora_proxy::http::{
    ProxyError, Shape,
    headers::{buffered, is_upgrade, strip_hop_by_hop},
    prepare, read_small_body,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOP_BY_HOP: [&str; 4] = [
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "connection",
];
/// Headers the proxy sets or rewrites on every request.
const REWRITTEN: [&str; 6] = [
    "x-request-id",
    "traceparent",
    "b3",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "host",
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        block_on(requests(bytes));
    } else {
        block_on(response(bytes, mode & 2 != 0));
    }
});

/// Serves `bytes` as a client's HTTP/1 connection with the proxy's server settings.
async fn requests(bytes: &[u8]) {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .max_buf_size(64 * 1024)
        .keep_alive(true)
        .serve_connection(
            TokioIo::new(server),
            service_fn(|req| async move { Ok::<_, Infallible>(check_request(req).await) }),
        )
        .with_upgrades();
    let serve = async move {
        let _ = conn.await;
    };
    let talk = async move {
        let _ = client.write_all(bytes).await;
        let _ = client.shutdown().await;
        let mut answers = Vec::new();
        let _ = client.read_to_end(&mut answers).await;
    };
    tokio::join!(serve, talk);
}

async fn check_request(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let before = req.headers().clone();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let upgrade = is_upgrade(&before);
    let whole = !upgrade && buffered(&before);
    let mut stripped = before.clone();
    strip_hop_by_hop(&mut stripped, upgrade);
    check_stripped(&before, &stripped, upgrade);

    let (mut req, _upgrade, head) = match prepare(req, upgrade).await {
        Ok(p) => p,
        Err(e) => {
            assert!(matches!(e, ProxyError::ClientBody(_)), "unexpected {e:?}");
            return answer(StatusCode::BAD_REQUEST);
        }
    };
    assert_eq!(head, method == Method::HEAD);
    let after = req.headers().clone();
    check_rewritten(&stripped, &after);
    if whole {
        let length: u64 = before[header::CONTENT_LENGTH]
            .to_str()
            .expect("buffered implies a readable length")
            .parse()
            .expect("buffered implies a numeric length");
        match req.body() {
            Either::Right(full) => {
                assert_eq!(hyper::body::Body::size_hint(full).exact(), Some(length));
            }
            Either::Left(_) => panic!("a small body with a length was not read whole"),
        }
    }

    let fallback = Authority::from_static("10.0.0.1:8080");
    let mut h2 = Request::builder()
        .method(method)
        .uri(req.uri().clone())
        .version(req.version())
        .body(Either::Right(Full::new(Bytes::new())))
        .expect("parts of a valid request");
    *h2.headers_mut() = after;
    Shape {
        h2: false,
        orig_h1: false,
    }
    .apply(&mut req, &fallback)
    .expect("the HTTP/1 shape of a parsed request");
    assert_eq!(req.version(), Version::HTTP_11);
    assert!(req.uri().scheme().is_none() && req.uri().authority().is_none());
    assert!(req.uri().path().starts_with('/') || req.uri().path() == "*");
    assert!(
        req.headers().contains_key(header::HOST),
        "HTTP/1 without Host"
    );
    if !h2.headers().contains_key(header::HOST)
        && let Some(a) = uri.authority()
    {
        assert_eq!(req.headers()[header::HOST], a.as_str(), "Host is not the authority");
    }
    Shape {
        h2: true,
        orig_h1: true,
    }
    .apply(&mut h2, &fallback)
    .expect("the HTTP/2 shape of a parsed request");
    assert_eq!(h2.version(), Version::HTTP_2);
    assert!(h2.uri().scheme().is_some() && h2.uri().authority().is_some());
    answer(StatusCode::OK)
}

fn answer(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
    *r.status_mut() = status;
    r
}

fn tokens(h: &HeaderMap, name: header::HeaderName) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect()
}

/// What `strip_hop_by_hop` leaves: no hop-by-hop field, `TE` only as `trailers`, the
/// fields `Connection` names gone, everything else untouched.
fn check_stripped(before: &HeaderMap, after: &HeaderMap, upgrade: bool) {
    for name in HOP_BY_HOP {
        if upgrade && name == "connection" {
            assert_eq!(after.get_all(name).iter().count(), 1);
            assert_eq!(after[name], "upgrade");
        } else {
            assert!(!after.contains_key(name), "{name} crossed the proxy");
        }
    }
    assert_eq!(after.contains_key(header::UPGRADE), upgrade);
    if let Some(te) = after.get(header::TE) {
        assert_eq!(te, "trailers");
        assert_eq!(after.get_all(header::TE).iter().count(), 1);
    }
    let named = tokens(before, header::CONNECTION);
    for t in &named {
        let kept = t == "te" || (upgrade && t == "upgrade") || (upgrade && t == "connection");
        if !kept {
            assert!(
                !after.contains_key(t.as_str()),
                "{t} named in Connection crossed"
            );
        }
    }
    for (name, value) in after {
        let s = name.as_str();
        if HOP_BY_HOP.contains(&s) || s == "te" || s == "upgrade" {
            continue;
        }
        assert!(
            before.get_all(name).iter().any(|v| v == value),
            "{s} was changed"
        );
    }
    for name in before.keys() {
        let s = name.as_str();
        let gone =
            HOP_BY_HOP.contains(&s) || s == "te" || s == "upgrade" || named.iter().any(|t| t == s);
        if !gone {
            assert_eq!(
                before.get_all(name).iter().collect::<Vec<_>>(),
                after.get_all(name).iter().collect::<Vec<_>>(),
                "{s} was changed"
            );
        }
    }
}

fn is_hex(b: &[u8]) -> bool {
    b.iter().all(u8::is_ascii_hexdigit)
}

/// What `prepare` adds to the stripped headers: an id when there was none, a new span
/// in well-formed trace headers; nothing else.
fn check_rewritten(stripped: &HeaderMap, after: &HeaderMap) {
    for (name, _) in after {
        if !REWRITTEN.contains(&name.as_str()) {
            assert_eq!(
                stripped.get_all(name).iter().collect::<Vec<_>>(),
                after.get_all(name).iter().collect::<Vec<_>>(),
                "{name} changed after stripping"
            );
        }
    }
    for name in stripped.keys() {
        assert!(after.contains_key(name), "{name} was dropped");
    }
    match stripped.get("x-request-id") {
        Some(id) => assert_eq!(after.get("x-request-id"), Some(id)),
        None => {
            let id = after.get("x-request-id").expect("x-request-id added");
            assert!(id.len() == 32 && is_hex(id.as_bytes()));
        }
    }
    if let Some(old) = stripped.get("traceparent") {
        let new = after.get("traceparent").expect("traceparent kept");
        let b = old.as_bytes();
        let well_formed =
            b.len() >= 55 && b[2] == b'-' && b[35] == b'-' && b[52] == b'-' && is_hex(&b[36..52]);
        if well_formed {
            let n = new.as_bytes();
            assert_eq!(n.len(), b.len());
            assert_eq!(&n[..36], &b[..36], "trace id changed");
            assert_eq!(&n[52..], &b[52..], "flags changed");
            assert!(is_hex(&n[36..52]));
        } else {
            assert_eq!(new, old, "a malformed traceparent was rewritten");
        }
    }
    if let Some(old) = stripped.get("x-b3-spanid") {
        assert_eq!(after.get("x-b3-parentspanid"), Some(old));
    }
    // `Host` is the HTTP/1 shape's (checked after `Shape::apply`), never prepare's.
    assert_eq!(stripped.get(header::HOST), after.get(header::HOST));
}

/// Reads `bytes` as an upstream's answer to a GET (or HEAD), with hyper's client as the
/// proxy uses it, then the proxy's small-body read and hop-by-hop stripping.
async fn response(bytes: &[u8], head: bool) {
    let (client_io, mut server_io) = tokio::io::duplex(1 << 16);
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client_io)).await
    else {
        return;
    };
    let drive = async move {
        let _ = conn.await;
    };
    let upstream = async {
        let _ = server_io.write_all(bytes).await;
        let _ = server_io.shutdown().await;
    };
    let exchange = async move {
        let method = if head { Method::HEAD } else { Method::GET };
        let req = Request::builder()
            .method(method)
            .uri("/")
            .header(header::HOST, "upstream")
            .body(Empty::new())
            .expect("a valid request");
        let Ok(resp) = sender.send_request(req).await else {
            return;
        };
        let whole = resp.version() == Version::HTTP_11
            && !head
            && !matches!(
                resp.status(),
                StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
            )
            && !resp.status().is_informational()
            && buffered(resp.headers());
        let length = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let resp = resp.map(|b| b.boxed());
        let authority = Authority::from_static("10.0.0.2:80");
        match read_small_body(resp, head, &authority).await {
            Ok(mut resp) => {
                if whole {
                    let got = hyper::body::Body::size_hint(resp.body()).exact();
                    assert_eq!(got, length, "a buffered body lost its length");
                }
                strip_hop_by_hop(resp.headers_mut(), false);
                for name in HOP_BY_HOP {
                    assert!(!resp.headers().contains_key(name));
                }
                assert!(!resp.headers().contains_key(header::UPGRADE));
            }
            Err(e) => assert!(matches!(e, ProxyError::Upstream(..)), "unexpected {e:?}"),
        }
    };
    tokio::join!(drive, upstream, exchange);
    drop(server_io);
}
