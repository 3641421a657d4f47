//! Stable hashes for consistent hashing: an endpoint's id (from its address) and a
//! request's key (a header value, a cookie value or the source IP).
//!
//! Every proxy of the mesh must map a key to the same endpoint, and a Maglev table must be
//! the same in every proxy, so the hash is fixed here — not `std`'s `DefaultHasher`, whose
//! algorithm may change between Rust releases. It is a multiply-fold hash in the family of
//! wyhash/foldhash (8 bytes per step, a 128-bit multiply folded to 64 bits, a murmur
//! finalizer): fast on short inputs and well mixed in every output bit, which Maglev needs
//! because it takes the hash modulo a prime.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, header::COOKIE};

const K0: u64 = 0x9E37_79B9_7F4A_7C15;
const K1: u64 = 0xBF58_476D_1CE4_E5B9;
const K2: u64 = 0x94D0_49BB_1331_11EB;

#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = u128::from(a).wrapping_mul(u128::from(b));
    (p as u64) ^ ((p >> 64) as u64)
}

/// The murmur3 64-bit finalizer: every input bit affects every output bit.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^ (x >> 33)
}

/// A stable 64-bit hash of `bytes` under `seed` (the same in every process and build).
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed ^ K0 ^ (bytes.len() as u64).wrapping_mul(K1);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = fold_mul(h ^ u64::from_le_bytes(w), K2);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = fold_mul(h ^ u64::from_le_bytes(w) ^ K1, K2);
    }
    mix64(h)
}

/// Seeds that keep the kinds of key apart (a header equal to an IP's bytes is another key).
const SEED_ENDPOINT: u64 = 0x656e_6470_6f69_6e74;
const SEED_HEADER: u64 = 0x6865_6164_6572_0000;
const SEED_COOKIE: u64 = 0x636f_6f6b_6965_0000;
const SEED_IP: u64 = 0x0000_0000_0073_7263;

fn ip_bytes(ip: IpAddr, out: &mut [u8; 18]) -> usize {
    // An IPv4-mapped IPv6 address is the same client as its IPv4 form.
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            out[..16].copy_from_slice(&v6.octets());
            16
        }
    }
}

/// The stable id of an endpoint: a hash of its address.
pub fn endpoint_id(addr: SocketAddr) -> u64 {
    let mut buf = [0u8; 18];
    let n = ip_bytes(addr.ip(), &mut buf);
    buf[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
    hash_bytes(SEED_ENDPOINT, &buf[..n + 2])
}

/// The key of a client by its source IP (the port is ignored: one client, many
/// connections).
pub fn source_ip_key(ip: IpAddr) -> u64 {
    let mut buf = [0u8; 18];
    let n = ip_bytes(ip, &mut buf);
    hash_bytes(SEED_IP, &buf[..n])
}

/// The key from the first value of header `name`, if present.
pub fn header_key(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    headers
        .get(name)
        .map(|v| hash_bytes(SEED_HEADER, v.as_bytes()))
}

/// The value of cookie `name` in the request's `Cookie` headers (RFC 6265 §5.4: pairs
/// separated by `;`, possibly in several headers under HTTP/2).
pub fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers.get_all(COOKIE).iter().find_map(|v| {
        v.as_bytes().split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (k, v) = pair.split_at(eq);
            (k.trim_ascii() == name.as_bytes()).then(|| strip_quotes(v[1..].trim_ascii()))
        })
    })
}

fn strip_quotes(v: &[u8]) -> &[u8] {
    match v {
        [b'"', inner @ .., b'"'] => inner,
        _ => v,
    }
}

/// The key from cookie `name`, if the request carries it with a non-empty value.
pub fn cookie_key(headers: &HeaderMap, name: &str) -> Option<u64> {
    cookie_value(headers, name)
        .filter(|v| !v.is_empty())
        .map(|v| hash_bytes(SEED_COOKIE, v))
}

/// A fresh cookie value for a client that has none: 16 hex digits (64 random bits), a
/// valid `cookie-value` (RFC 6265 §4.1.1) that needs no quoting.
pub fn new_cookie_value() -> String {
    format!("{:016x}", fastrand::u64(..))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn fixed_values_do_not_change_between_builds() {
        // Other proxies of the mesh (maybe another build) must agree on these.
        assert_eq!(hash_bytes(0, b""), hash_bytes(0, b""));
        let a = endpoint_id("10.0.0.1:80".parse().expect("addr"));
        assert_eq!(a, endpoint_id("10.0.0.1:80".parse().expect("addr")));
        assert_ne!(a, endpoint_id("10.0.0.1:81".parse().expect("addr")));
        assert_eq!(
            source_ip_key("10.0.0.1".parse().expect("ip")),
            source_ip_key("::ffff:10.0.0.1".parse().expect("ip")),
            "an IPv4-mapped client is the same client"
        );
        // Pinned so that a change of the function is a deliberate, reviewed change.
        assert_eq!(hash_bytes(0, b"remora"), 9_752_588_165_475_179_187_u64);
    }

    #[test]
    fn every_length_and_byte_matters() {
        let mut seen = std::collections::HashSet::new();
        let data = b"abcdefghijklmnopqrstuvwxyz0123456789";
        for len in 0..data.len() {
            assert!(seen.insert(hash_bytes(1, &data[..len])), "length {len}");
        }
        let mut x = *b"0123456789abcdef0";
        for i in 0..x.len() {
            x[i] ^= 1;
            assert!(seen.insert(hash_bytes(1, &x)), "byte {i}");
            x[i] ^= 1;
        }
    }

    #[test]
    fn buckets_are_even() {
        // 100,000 sequential keys into 16 buckets (low and high bits): each within ±5 %.
        for shift in [0u32, 60] {
            let mut b = [0u32; 16];
            for i in 0..100_000u32 {
                let h = hash_bytes(7, format!("user-{i}").as_bytes());
                b[((h >> shift) & 15) as usize] += 1;
            }
            for (i, n) in b.iter().enumerate() {
                assert!((5937..=6563).contains(n), "bucket {i} (shift {shift}): {n}");
            }
        }
    }

    #[test]
    fn cookies_are_parsed_as_browsers_send_them() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1; sid=\"xyz\"; b=2"));
        assert_eq!(cookie_value(&h, "sid"), Some(&b"xyz"[..]));
        assert_eq!(cookie_value(&h, "b"), Some(&b"2"[..]));
        assert_eq!(cookie_value(&h, "s"), None);
        let mut h2 = HeaderMap::new();
        h2.append(COOKIE, HeaderValue::from_static("a=1"));
        h2.append(COOKIE, HeaderValue::from_static("sid=xyz"));
        assert_eq!(cookie_key(&h2, "sid"), cookie_key(&h, "sid"));
        h2.insert(COOKIE, HeaderValue::from_static("sid="));
        assert_eq!(cookie_key(&h2, "sid"), None, "an empty value is no key");
        let v = new_cookie_value();
        assert_eq!(v.len(), 16);
        assert!(v.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn header_keys() {
        let name = HeaderName::from_static("x-user");
        let mut h = HeaderMap::new();
        assert_eq!(header_key(&h, &name), None);
        h.insert(name.clone(), HeaderValue::from_static("alice"));
        let a = header_key(&h, &name);
        h.insert(name.clone(), HeaderValue::from_static("bob"));
        assert!(a.is_some() && a != header_key(&h, &name));
    }
}
