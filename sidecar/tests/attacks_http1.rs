//! HTTP/1 request smuggling and oversized heads against the real proxy pair, each proxy a
//! process of its own on loopback (see `common::attack`): client → proxy A (outbound) →
//! mTLS → proxy B (inbound) → a raw TCP upstream that records every byte it receives.
//! Each attack also goes straight to B's inbound port, as a client outside the mesh would
//! reach a pod in permissive mode.
//!
//! The invariant, checked on the recorded bytes rather than assumed: a smuggling attempt
//! gets a 400, or it reaches the upstream as exactly the one request the client sent;
//! the upstream never parses a request the client got no response for, and never holds
//! bytes it cannot parse as whole requests.

mod common;

use std::time::Duration;

use common::attack::{
    Knobs, Pair,
    raw_http::{Recorder, parse_request, raw_exchange, statuses},
};

/// How long a client waits for more response bytes on a kept-alive connection.
const IDLE: Duration = Duration::from_millis(700);

/// A smuggling attempt: the raw request, and whether a strict proxy must refuse it (a
/// `false` one may also be normalised into one request).
struct Case {
    name: &'static str,
    path: &'static str,
    bytes: Vec<u8>,
    must_refuse: bool,
    /// The body the upstream must see when the request is forwarded.
    body: &'static [u8],
}

fn case(
    name: &'static str,
    path: &'static str,
    head: &str,
    rest: &[u8],
    must_refuse: bool,
    body: &'static [u8],
) -> Case {
    let mut bytes = format!("POST {path} HTTP/1.1\r\nHost: app.test\r\n{head}\r\n").into_bytes();
    bytes.extend_from_slice(rest);
    Case {
        name,
        path,
        bytes,
        must_refuse,
        body,
    }
}

/// A second request hidden in the first one's body: it must never reach the upstream.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0\r\n\r\n";

fn cases() -> Vec<Case> {
    let hidden_chunk = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    vec![
        // CL.TE: a front end that trusted the length would pass the `0` chunk's end and
        // the smuggled request on as the body; chunked wins and the rest is not a request.
        case(
            "CL+TE",
            "/cl-te",
            "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
            format!("0\r\n\r\n{SMUGGLED}").as_bytes(),
            false,
            b"",
        ),
        // TE.CL: the length would cut the chunked body short and leave the smuggled request.
        case(
            "TE+CL",
            "/te-cl",
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
            hidden_chunk.as_bytes(),
            false,
            SMUGGLED.as_bytes(),
        ),
        case(
            "two different Content-Length",
            "/cl-cl",
            "Content-Length: 5\r\nContent-Length: 60\r\n",
            format!("hello{SMUGGLED}").as_bytes(),
            true,
            b"",
        ),
        case(
            "the same Content-Length twice",
            "/cl-same",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            b"hello",
            false,
            b"hello",
        ),
        case(
            "Content-Length: +5",
            "/cl-plus",
            "Content-Length: +5\r\n",
            b"hello",
            true,
            b"",
        ),
        case(
            "Transfer-Encoding: chunked, identity",
            "/te-identity",
            "Transfer-Encoding: chunked, identity\r\n",
            hidden_chunk.as_bytes(),
            true,
            b"",
        ),
        case(
            "Transfer-Encoding chunked then identity on two lines",
            "/te-two-lines",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            hidden_chunk.as_bytes(),
            true,
            b"",
        ),
        case(
            "Transfer-Encoding: xchunked",
            "/te-xchunked",
            "Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n",
            b"hello",
            true,
            b"",
        ),
        case(
            "obs-fold",
            "/obs-fold",
            "Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n",
            b"hello",
            true,
            b"",
        ),
        case(
            "space before the colon",
            "/space-colon",
            "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n",
            b"hello",
            true,
            b"",
        ),
        case(
            "NUL in a header value",
            "/nul",
            "X-Note: a\0Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            b"hello",
            true,
            b"",
        ),
        case(
            "bare CR in a header value",
            "/cr",
            "X-Note: a\rTransfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            b"hello",
            true,
            b"",
        ),
        // A bare LF ends a line for the proxy's parser: the upstream must then see the
        // same two fields, framed the same way (normalised), or the request is refused.
        case(
            "bare LF in a header value",
            "/lf",
            "X-Note: a\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            b"0\r\n\r\n",
            false,
            b"",
        ),
        Case {
            name: "Transfer-Encoding in HTTP/1.0",
            path: "/te-http10",
            bytes: format!("POST /te-http10 HTTP/1.0\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n{hidden_chunk}").into_bytes(),
            must_refuse: true,
            body: b"",
        },
    ]
}

/// Sends `case` to `entry`; returns the statuses the client got and the requests the
/// upstream parsed meanwhile.
async fn attempt(
    entry: std::net::SocketAddr,
    up: &Recorder,
    case: &Case,
) -> (Vec<u16>, Vec<common::attack::raw_http::Seen>) {
    let before = up.requests().len();
    let got = raw_exchange(entry, &case.bytes, IDLE).await;
    let seen = up.requests().split_off(before);
    (statuses(&got), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_gets_400_or_reaches_the_upstream_as_exactly_one_request() {
    common::attack::serve_if_child().await;
    let up = Recorder::start().await;
    let pair = Pair::start(
        "smuggling_gets_400_or_reaches_the_upstream_as_exactly_one_request",
        up.addr,
        Knobs::default(),
        "http",
    );
    // A control: two pipelined requests are two responses and two upstream requests.
    let pipelined = format!("{SMUGGLED}{SMUGGLED}");
    for (entry, via) in [(pair.a.outbound, "pair"), (pair.b.inbound, "inbound")] {
        let got = raw_exchange(entry, pipelined.as_bytes(), IDLE).await;
        assert_eq!(statuses(&got), vec![200, 200], "{via}: pipelined control");
    }
    assert_eq!(up.requests().len(), 4, "the control reached the upstream");
    let mut table = Vec::new();
    for c in cases() {
        for (entry, via) in [
            (pair.a.outbound, "client → A → B"),
            (pair.b.inbound, "client → B"),
        ] {
            let (got, seen) = attempt(entry, &up, &c).await;
            let outcome = match (got.as_slice(), seen.as_slice()) {
                ([400], []) => "400, nothing upstream".to_owned(),
                ([200], [one]) if !c.must_refuse => {
                    assert_eq!(one.path, c.path, "{} via {via}: the one request", c.name);
                    assert_eq!(one.body, c.body, "{} via {via}: its body", c.name);
                    assert!(
                        one.header("transfer-encoding").len() + one.header("content-length").len()
                            <= 1,
                        "{} via {via}: one framing upstream: {:?}",
                        c.name,
                        one.headers
                    );
                    "normalised: 200, exactly one request upstream".to_owned()
                }
                _ => panic!(
                    "{} via {via}: the client got {got:?} and the upstream parsed {:?}",
                    c.name,
                    seen.iter().map(|s| &s.path).collect::<Vec<_>>()
                ),
            };
            table.push(format!("{:<55} {via:<15} {outcome}", c.name));
        }
    }
    for line in &table {
        println!("{line}");
    }
    assert!(
        up.requests()
            .iter()
            .all(|r| r.path != "/smuggled" || r.body.is_empty()),
        "no smuggled request beyond the controls"
    );
    assert_eq!(
        up.requests()
            .iter()
            .filter(|r| r.path == "/smuggled")
            .count(),
        4,
        "the only /smuggled requests upstream are the four control ones"
    );
    assert_eq!(
        up.errors(),
        Vec::<String>::new(),
        "the upstream parsed everything"
    );
    assert_eq!(up.unparsed(), 0, "no bytes left over at the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431() {
    common::attack::serve_if_child().await;
    let up = Recorder::start().await;
    let pair = Pair::start("oversized_heads_get_431", up.addr, Knobs::default(), "http");
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: app.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut many = String::from("GET /many HTTP/1.1\r\nHost: app.test\r\n");
    for i in 0..10_000 {
        many += &format!("X-H{i}: v\r\n");
    }
    many += "\r\n";
    for (what, bytes) in [
        ("a 64 KiB header", big.as_bytes()),
        ("10,000 headers", many.as_bytes()),
    ] {
        for (entry, via) in [
            (pair.a.outbound, "client → A → B"),
            (pair.b.inbound, "client → B"),
        ] {
            let got = raw_exchange(entry, bytes, IDLE).await;
            println!("{what:<16} {via:<15} {:?}", statuses(&got));
            assert_eq!(statuses(&got), vec![431], "{what} via {via}");
        }
    }
    assert!(up.requests().is_empty(), "nothing reached the upstream");
}

#[test]
fn the_recorder_parses_strictly() {
    let two = b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi";
    let (first, n) = parse_request(two).expect("ok").expect("complete");
    assert_eq!(first.body, b"abc");
    let (second, m) = parse_request(&two[n..]).expect("ok").expect("complete");
    assert_eq!(
        (second.path.as_str(), second.body.as_slice()),
        ("/b", &b"hi"[..])
    );
    assert_eq!(n + m, two.len());
    assert!(
        parse_request(b"GET / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx")
            .is_err()
    );
    assert!(
        parse_request(b"GET / HTTP/1.1\r\ncontent-length: 5\r\n\r\nab")
            .expect("ok")
            .is_none()
    );
    assert_eq!(
        statuses(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        vec![400, 200]
    );
}
