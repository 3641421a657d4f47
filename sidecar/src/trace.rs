//! Request identity and trace context: `x-request-id` added when absent, and W3C
//! `traceparent` and B3 (multi-header and single `b3`) propagated with a new span id per
//! hop, the incoming span becoming the parent. The proxy does not start traces: requests
//! without trace headers get none.

use std::{
    cell::Cell,
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
};

use http::{HeaderMap, HeaderValue, header::HeaderName};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static B3: HeaderName = HeaderName::from_static("b3");
static B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
static B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let mut h = RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        h.finish() | 1
    });
}

/// A random, non-zero u64 (splitmix64 over a randomly seeded per-thread state).
pub fn random_u64() -> u64 {
    RNG.with(|state| {
        let mut z = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).max(1)
    })
}

fn hex16(v: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// A value that is new on every request (an id, a span): sent over HTTP/2 as a literal
/// that is never indexed. Indexed, each one would be inserted into both ends' HPACK
/// dynamic tables only to be evicted unused, pushing out the headers that do repeat.
fn per_request(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

/// Adds `x-request-id` (32 hex digits) when the request has none.
pub fn ensure_request_id(headers: &mut HeaderMap) {
    if headers.contains_key(&X_REQUEST_ID) {
        return;
    }
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(&hex16(random_u64()));
    id[16..].copy_from_slice(&hex16(random_u64()));
    if let Ok(v) = HeaderValue::from_bytes(&id) {
        headers.insert(X_REQUEST_ID.clone(), per_request(v));
    }
}

fn is_hex(s: &[u8]) -> bool {
    s.iter().all(|b| b.is_ascii_hexdigit())
}

/// Replaces the span ids of any trace context headers with a new one for this hop.
pub fn new_span(headers: &mut HeaderMap) {
    // One span id for every trace header of the request, drawn only if one is there.
    let mut drawn = None;
    let mut span = || *drawn.get_or_insert_with(|| hex16(random_u64()));
    if let Some(tp) = headers.get(&TRACEPARENT) {
        // version "-" trace-id(32) "-" parent-id(16) "-" flags(2)
        let b = tp.as_bytes();
        if b.len() >= 55 && b[2] == b'-' && b[35] == b'-' && b[52] == b'-' && is_hex(&b[36..52]) {
            let mut v = b.to_vec();
            v[36..52].copy_from_slice(&span());
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                headers.insert(TRACEPARENT.clone(), per_request(v));
            }
        }
    }
    if let Some(old) = headers.get(&B3_SPAN_ID).cloned()
        && let Ok(v) = HeaderValue::from_bytes(&span())
    {
        headers.insert(B3_SPAN_ID.clone(), per_request(v));
        headers.insert(B3_PARENT_SPAN_ID.clone(), per_request(old));
    }
    if let Some(b3) = headers.get(&B3) {
        // traceid-spanid[-sampled[-parentspanid]]
        let s = b3.as_bytes();
        let mut parts = s.split(|b| *b == b'-');
        if let (Some(trace), Some(old_span)) = (parts.next(), parts.next())
            && old_span.len() == 16
            && is_hex(old_span)
            && is_hex(trace)
        {
            let sampled = parts.next();
            let mut v = Vec::with_capacity(trace.len() + 40);
            v.extend_from_slice(trace);
            v.push(b'-');
            v.extend_from_slice(&span());
            v.push(b'-');
            v.extend_from_slice(sampled.unwrap_or(b"1"));
            v.push(b'-');
            v.extend_from_slice(old_span);
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                headers.insert(B3.clone(), per_request(v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_added_only_when_absent() {
        let mut h = HeaderMap::new();
        ensure_request_id(&mut h);
        let id = h
            .get(&X_REQUEST_ID)
            .expect("added")
            .to_str()
            .expect("ascii")
            .to_owned();
        assert_eq!(id.len(), 32);
        assert!(is_hex(id.as_bytes()));
        assert!(
            h.get(&X_REQUEST_ID).is_some_and(HeaderValue::is_sensitive),
            "a new id is never HPACK-indexed"
        );
        ensure_request_id(&mut h);
        assert_eq!(
            h.get(&X_REQUEST_ID).expect("kept").to_str().expect("ascii"),
            id
        );
        let mut other = HeaderMap::new();
        ensure_request_id(&mut other);
        assert_ne!(other.get(&X_REQUEST_ID), h.get(&X_REQUEST_ID));
    }

    #[test]
    fn traceparent_keeps_trace_and_flags_with_a_new_span() {
        let mut h = HeaderMap::new();
        let old = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        h.insert(&TRACEPARENT, HeaderValue::from_static(old));
        new_span(&mut h);
        let new = h.get(&TRACEPARENT).expect("kept").to_str().expect("ascii");
        assert_eq!(&new[..36], &old[..36]);
        assert_eq!(&new[52..], &old[52..]);
        assert_ne!(&new[36..52], &old[36..52]);
        assert!(is_hex(&new.as_bytes()[36..52]));
    }

    #[test]
    fn b3_multi_and_single() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-b3-traceid",
            HeaderValue::from_static("463ac35c9f6413ad48485a3953bb6124"),
        );
        h.insert(&B3_SPAN_ID, HeaderValue::from_static("a2fb4a1d1a96d312"));
        h.insert(
            &B3,
            HeaderValue::from_static("463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-1"),
        );
        new_span(&mut h);
        assert_eq!(
            h.get(&B3_PARENT_SPAN_ID).expect("parent"),
            "a2fb4a1d1a96d312"
        );
        let span = h
            .get(&B3_SPAN_ID)
            .expect("span")
            .to_str()
            .expect("ascii")
            .to_owned();
        assert_ne!(span, "a2fb4a1d1a96d312");
        assert_eq!(
            h.get(&B3).expect("b3").to_str().expect("ascii"),
            format!("463ac35c9f6413ad48485a3953bb6124-{span}-1-a2fb4a1d1a96d312")
        );
    }

    #[test]
    fn malformed_trace_headers_are_left_alone() {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static("garbage"));
        h.insert(&B3, HeaderValue::from_static("0"));
        new_span(&mut h);
        assert_eq!(h.get(&TRACEPARENT).expect("kept"), "garbage");
        assert_eq!(h.get(&B3).expect("kept"), "0");
    }
}
