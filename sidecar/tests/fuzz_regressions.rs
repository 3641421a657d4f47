//! Inputs the fuzz targets (`fuzz/`) found wrong, kept as plain tests.

use bytes::Bytes;
use http::{Request, uri::Authority};
use http_body_util::{Either, Full};
use remora_proxy::http::Shape;

/// `fuzz/corpus/http_rewrite`: `GET http://reviews.#shop:?0 HTTP/1.1` has an authority
/// but no path; the HTTP/1 shape sent an empty request target upstream.
#[test]
fn an_absolute_target_without_a_path_gets_one() {
    for target in [
        "http://reviews.#shop:?0",
        "http://reviews.?0",
        "http://reviews.shop",
    ] {
        let mut req = Request::get(target)
            .body(Either::Right(Full::new(Bytes::new())))
            .expect("request");
        Shape {
            h2: false,
            orig_h1: false,
        }
        .apply(&mut req, &Authority::from_static("10.0.0.1:80"))
        .expect("shaped");
        let path = req.uri().path().to_owned();
        assert!(
            path.starts_with('/'),
            "{target}: {} path {path:?}",
            req.uri()
        );
    }
}
