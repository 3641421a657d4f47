//! Header rules of a proxy in the middle: which HTTP/1 messages are read whole, which
//! requests switch protocols, and the hop-by-hop fields (RFC 9110 §7.6.1) that never cross.

use http::{
    HeaderMap, HeaderValue,
    header::{self, HeaderName},
};

/// HTTP/1 bodies of a known length up to this size are read whole before they are sent on
/// (requests) or answered with (responses). A proxied message then crosses from the
/// connection that read it to the one that writes it in one step, instead of a body
/// channel handing over each chunk between two tasks: fewer task wake-ups per request,
/// which is most of what a small request costs the proxy above its syscalls. It is also
/// the replay limit: only bodies read whole can be retried or mirrored.
pub const BUFFER_LIMIT: u64 = 16 * 1024;

/// An HTTP/1.1 request asking to switch protocols (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// An HTTP/1 message whose body is read whole: one `Content-Length` of at most
/// [`BUFFER_LIMIT`] and no `Transfer-Encoding` (so no chunked framing, no trailers, nothing
/// streamed, and the read is bounded), and no `Expect: 100-continue` (that client waits
/// for the upstream's word before it sends).
pub fn buffered(h: &HeaderMap) -> bool {
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    let small = match (lengths.next(), lengths.next()) {
        (Some(v), None) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n <= BUFFER_LIMIT),
        _ => false,
    };
    small && !h.contains_key(header::EXPECT) && !h.contains_key(header::TRANSFER_ENCODING)
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1: `Connection` and the fields it
/// names, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade` (kept, with
/// `Connection: upgrade`, when `upgrade`), and `TE` except `trailers` (which gRPC needs).
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(upgrade && n == header::UPGRADE))
            .collect();
        for n in named {
            if n != header::TE {
                h.remove(n);
            }
        }
        h.remove(header::CONNECTION);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    if let Some(te) = h.get(header::TE) {
        let trailers = te
            .to_str()
            .map(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
            .unwrap_or(false);
        if trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            h.remove(header::TE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["te", "x-end-to-end"]);
        assert_eq!(h.get(header::TE).expect("te"), "trailers");
    }

    #[test]
    fn only_small_known_length_bodies_are_read_whole() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert!(buffered(&h(&[("content-length", "1024")])));
        assert!(buffered(&h(&[("content-length", "16384")])));
        assert!(!buffered(&h(&[("content-length", "16385")])), "too big");
        assert!(!buffered(&h(&[])), "no length: streamed");
        assert!(!buffered(&h(&[("transfer-encoding", "chunked")])));
        assert!(
            !buffered(&h(&[
                ("content-length", "5"),
                ("transfer-encoding", "chunked")
            ])),
            "chunked wins over a length"
        );
        assert!(!buffered(&h(&[
            ("content-length", "5"),
            ("content-length", "5")
        ])));
        assert!(!buffered(&h(&[("content-length", "five")])));
        assert!(
            !buffered(&h(&[("content-length", "5"), ("expect", "100-continue")])),
            "the client waits for the upstream's 100 before it sends"
        );
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::CONNECTION).expect("connection"), "upgrade");
        assert_eq!(h.get(header::UPGRADE).expect("upgrade"), "websocket");
    }
}
