//! Protocol detection on the first bytes of a connection, and the ClientHello's SNI and
//! ALPN, against rustls's own ClientHello parser as the oracle.
//!
//! Asserted: the answer agrees with the bytes (`Http2` starts with the preface, mesh TLS
//! offers the mesh ALPN, HTTP/1 is not a TLS record); detection only waits for more
//! bytes while a bounded prefix is incomplete; when rustls accepts a ClientHello that
//! fits in the first record, the proxy reads the same ALPN list and (where rustls reads
//! one) the same server name; and [`detect`] over the same bytes cut into chunks hands
//! back exactly the bytes it consumed, classified as [`classify`] says.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_fuzz::{block_on, chunked_reader};
use remora_proxy::detect::{MESH_ALPN, OpaqueReason, Protocol, classify, detect};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Detection never waits on more than a full TLS record (16 KiB + 256 + header).
const LONGEST_UNDECIDED: usize = 5 + 16 * 1024 + 256;
/// What [`detect`] reads at most before it decides anyway.
const MAX_DETECT_BYTES: usize = 16 * 1024 + 5;

fuzz_target!(|data: &[u8]| {
    let got = classify(data);
    match &got {
        None => assert!(
            data.len() < LONGEST_UNDECIDED,
            "undecided after {} bytes",
            data.len()
        ),
        Some(Protocol::Http2) => assert!(data.starts_with(H2_PREFACE)),
        Some(Protocol::Http1) => assert_ne!(data.first(), Some(&0x16)),
        Some(Protocol::MeshTls(h)) => {
            assert_eq!(data[0], 0x16);
            assert!(h.alpn.iter().any(|p| p == MESH_ALPN));
        }
        Some(Protocol::ForeignTls(h)) => {
            assert_eq!(data[0], 0x16);
            assert!(!h.alpn.iter().any(|p| p == MESH_ALPN));
        }
        Some(Protocol::Opaque(why)) => assert_eq!(*why, OpaqueReason::Unrecognised),
    }
    if let Some(Protocol::MeshTls(h) | Protocol::ForeignTls(h)) = &got {
        compare_with_rustls(data, h);
    }
    detect_in_chunks(data);
});

/// When rustls accepts the ClientHello and it fits in the first record, the proxy must
/// read the same ALPN protocols and server name.
fn compare_with_rustls(data: &[u8], ours: &remora_proxy::detect::ClientHello) {
    let record_len = usize::from(u16::from_be_bytes([data[3], data[4]]));
    let record = &data[5..5 + record_len];
    let fits = record.len() >= 4
        && record[0] == 1
        && 4 + (usize::from(record[1]) << 16
            | usize::from(record[2]) << 8
            | usize::from(record[3]))
            <= record.len();
    if !fits {
        return;
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = data;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let Ok(Some(accepted)) = acceptor.accept() else {
        return;
    };
    let hello = accepted.client_hello();
    let alpn: Vec<Vec<u8>> = hello
        .alpn()
        .map(|it| it.map(<[u8]>::to_vec).collect())
        .unwrap_or_default();
    assert_eq!(ours.alpn, alpn, "ALPN differs from rustls's reading");
    if let Some(name) = hello.server_name() {
        assert!(
            ours.sni
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case(name)),
            "SNI {:?} differs from rustls's {name:?}",
            ours.sni
        );
    }
}

/// Runs the async detection over the bytes delivered in chunks (sizes taken from the
/// input itself), then end of stream.
fn detect_in_chunks(data: &[u8]) {
    let chunk = usize::from(data.last().copied().unwrap_or(1) % 7) + 1;
    let mut io = chunked_reader(data, chunk);
    let d =
        block_on(detect(&mut io, std::time::Duration::from_secs(3600))).expect("in-memory read");
    assert!(
        data.starts_with(&d.prefix),
        "the prefix is not what was read"
    );
    match classify(&d.prefix) {
        Some(p) => assert_eq!(d.protocol, p, "detection stopped on a different answer"),
        None if d.prefix.is_empty() => {
            assert_eq!(d.protocol, Protocol::Opaque(OpaqueReason::Eof));
        }
        None => {
            assert!(
                d.prefix.len() == data.len() || d.prefix.len() >= MAX_DETECT_BYTES,
                "stopped while undecided"
            );
            assert_eq!(d.protocol, Protocol::Opaque(OpaqueReason::Unrecognised));
        }
    }
}
