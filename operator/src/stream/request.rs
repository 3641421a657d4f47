//! Parsing a watch request's query string (pure): `target` (`IP:port`, `[v6]:port`,
//! `<svc>.<ns>[.svc[.cluster.local]]:port`), `pod` (`<namespace>/<name>`) and `since`.

use std::net::SocketAddr;

use crate::{
    ca::identity::{is_label, is_subdomain},
    index::model::ObjKey,
};

/// Why a request is malformed (answered `400 bad_request` with this message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the query parameter {0:?} is required")]
    Missing(&'static str),
    #[error("the query parameter {0:?} is given more than once")]
    Repeated(String),
    #[error("the query parameter {0:?} is not valid percent-encoding or UTF-8")]
    Encoding(String),
    #[error(
        "target {0:?} is not IP:port, [IPv6]:port or <service>.<namespace>[.svc[.cluster.local]]:port"
    )]
    Target(String),
    #[error("pod {0:?} is not <namespace>/<name>")]
    Pod(String),
    #[error("since {0:?} is not a version (an unsigned integer)")]
    Since(String),
}

/// What an outbound subscription watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A VIP:port or a headless Service's pod IP:port.
    Addr(SocketAddr),
    /// A Service port by name.
    Name { service: ObjKey, port: u16 },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Name { service, port } => {
                write!(f, "{}.{}:{port}", service.name, service.namespace)
            }
        }
    }
}

/// `GET /v1/watch/outbound?target=…[&since=…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRequest {
    pub target: Target,
    pub since: Option<u64>,
}

/// `GET /v1/watch/inbound?pod=<ns>/<name>[&since=…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRequest {
    pub pod: ObjKey,
    pub since: Option<u64>,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `application/x-www-form-urlencoded` decoding of one key or value.
fn decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hi = hex(*bytes.get(i + 1)?)?;
                let lo = hex(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The parameters of a query string, decoded; unknown ones are ignored, repeated known
/// ones refused.
fn params<'k>(
    query: Option<&str>,
    known: &[&'k str],
) -> Result<Vec<(&'k str, String)>, RequestError> {
    let mut found: Vec<(&'k str, String)> = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode(k).ok_or_else(|| RequestError::Encoding(k.to_owned()))?;
        let Some(key) = known.iter().find(|n| **n == k) else {
            continue;
        };
        if found.iter().any(|(f, _)| f == key) {
            return Err(RequestError::Repeated(k));
        }
        let v = decode(v).ok_or_else(|| RequestError::Encoding(k.clone()))?;
        found.push((key, v));
    }
    Ok(found)
}

fn take(found: &[(&str, String)], key: &str) -> Option<String> {
    found
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.clone())
}

fn since(found: &[(&str, String)]) -> Result<Option<u64>, RequestError> {
    take(found, "since")
        .map(|s| s.parse().map_err(|_| RequestError::Since(s)))
        .transpose()
}

/// Parses a `target`.
pub fn parse_target(s: &str) -> Result<Target, RequestError> {
    let bad = || RequestError::Target(s.to_owned());
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(Target::Addr(addr));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    let host = host.trim_end_matches('.');
    let host = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(host);
    let (name, namespace) = host.split_once('.').ok_or_else(bad)?;
    if !is_label(name) || !is_label(namespace) {
        return Err(bad());
    }
    Ok(Target::Name {
        service: ObjKey::new(namespace, name),
        port,
    })
}

/// Parses a `pod` (`<namespace>/<name>`).
pub fn parse_pod(s: &str) -> Result<ObjKey, RequestError> {
    match s.split_once('/') {
        Some((ns, name)) if is_label(ns) && is_subdomain(name) => Ok(ObjKey::new(ns, name)),
        _ => Err(RequestError::Pod(s.to_owned())),
    }
}

impl OutboundRequest {
    /// From the raw query string of the request URI.
    pub fn parse(query: Option<&str>) -> Result<Self, RequestError> {
        let found = params(query, &["target", "since"])?;
        let target = take(&found, "target").ok_or(RequestError::Missing("target"))?;
        Ok(Self {
            target: parse_target(&target)?,
            since: since(&found)?,
        })
    }
}

impl InboundRequest {
    /// From the raw query string of the request URI.
    pub fn parse(query: Option<&str>) -> Result<Self, RequestError> {
        let found = params(query, &["pod", "since"])?;
        let pod = take(&found, "pod").ok_or(RequestError::Missing("pod"))?;
        Ok(Self {
            pod: parse_pod(&pod)?,
            since: since(&found)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(ns: &str, svc: &str, port: u16) -> Target {
        Target::Name {
            service: ObjKey::new(ns, svc),
            port,
        }
    }

    #[test]
    fn targets_by_address_and_by_name() {
        for (raw, want) in [
            (
                "10.96.0.12:9080",
                Target::Addr("10.96.0.12:9080".parse().expect("addr")),
            ),
            (
                "[fd00::12]:9080",
                Target::Addr("[fd00::12]:9080".parse().expect("addr")),
            ),
            ("reviews.shop:9080", name("shop", "reviews", 9080)),
            ("reviews.shop.svc:9080", name("shop", "reviews", 9080)),
            (
                "reviews.shop.svc.cluster.local:80",
                name("shop", "reviews", 80),
            ),
        ] {
            assert_eq!(parse_target(raw), Ok(want.clone()), "{raw}");
        }
        assert_eq!(
            name("shop", "reviews", 9080).to_string(),
            "reviews.shop:9080"
        );
        for bad in [
            "",
            "10.96.0.12",
            "reviews:9080",
            "reviews.shop",
            "reviews.shop:0",
            "reviews.shop:70000",
            "reviews.shop:http",
            "Reviews.shop:80",
            "a.b.c:80",
            "-x.shop:80",
            "fd00::12:9080x",
        ] {
            assert_eq!(
                parse_target(bad),
                Err(RequestError::Target(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn queries_decode_and_refuse_what_is_malformed() {
        assert_eq!(
            OutboundRequest::parse(Some("target=%5Bfd00%3A%3A1%5D%3A80&since=42&x=y")),
            Ok(OutboundRequest {
                target: Target::Addr("[fd00::1]:80".parse().expect("addr")),
                since: Some(42),
            })
        );
        assert_eq!(
            InboundRequest::parse(Some("pod=shop%2Freviews-1")),
            Ok(InboundRequest {
                pod: ObjKey::new("shop", "reviews-1"),
                since: None,
            })
        );
        assert_eq!(
            InboundRequest::parse(None),
            Err(RequestError::Missing("pod"))
        );
        assert_eq!(
            OutboundRequest::parse(Some("since=1")),
            Err(RequestError::Missing("target"))
        );
        assert_eq!(
            OutboundRequest::parse(Some("target=a.b:1&target=a.b:2")),
            Err(RequestError::Repeated("target".to_owned()))
        );
        assert_eq!(
            OutboundRequest::parse(Some("target=a.b:1&since=-1")),
            Err(RequestError::Since("-1".to_owned()))
        );
        assert_eq!(
            OutboundRequest::parse(Some("target=%ZZ")),
            Err(RequestError::Encoding("target".to_owned()))
        );
        assert_eq!(
            OutboundRequest::parse(Some("target=%FF")),
            Err(RequestError::Encoding("target".to_owned()))
        );
        for bad in ["shop", "shop/", "/x", "Shop/x", "shop/x/y"] {
            assert_eq!(
                parse_pod(bad),
                Err(RequestError::Pod(bad.to_owned())),
                "{bad}"
            );
        }
        assert!(
            RequestError::Target("x".into())
                .to_string()
                .contains("IP:port")
        );
    }
}
