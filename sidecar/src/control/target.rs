//! The names the proxy uses on the control plane: the operator's address (and the TLS
//! name its certificate must carry), the pod whose inbound config is watched, the
//! destinations whose outbound config is watched, and the request paths built from them.

use std::{fmt, net::SocketAddr, str::FromStr};

use rustls::pki_types::ServerName;

/// Why an operator address does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("{0:?} is not host:port (e.g. remora-operator.remora-system.svc:15012)")]
    Shape(String),
    #[error("{0:?} has no valid port")]
    Port(String),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// `host:port` of the operator's TLS listener (`--operator-addr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorAddr {
    host: String,
    port: u16,
}

impl OperatorAddr {
    /// The host part without IPv6 brackets: the default TLS server name.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What `TcpStream::connect` resolves.
    pub fn dial(&self) -> String {
        self.to_string()
    }
}

impl FromStr for OperatorAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, port) = rest
                .split_once("]:")
                .ok_or_else(|| AddrError::Shape(s.to_owned()))?;
            (host, port)
        } else {
            s.rsplit_once(':')
                .ok_or_else(|| AddrError::Shape(s.to_owned()))?
        };
        if host.is_empty() || (host.contains(':') && !s.starts_with('[')) {
            return Err(AddrError::Shape(s.to_owned()));
        }
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return Err(AddrError::Port(s.to_owned())),
        };
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for OperatorAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The name the operator's serving certificate must carry (`--operator-server-name`,
/// default the host of the operator address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorName(ServerName<'static>);

impl OperatorName {
    pub fn new(name: &str) -> Result<Self, AddrError> {
        ServerName::try_from(name.to_owned())
            .map(Self)
            .map_err(|_| AddrError::ServerName(name.to_owned()))
    }

    pub fn server_name(&self) -> ServerName<'static> {
        self.0.clone()
    }
}

/// The pod whose inbound config this proxy serves (`<namespace>/<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An outbound destination as the outbound listener saw it (`SO_ORIGINAL_DST`), the key
/// of one outbound subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target(pub SocketAddr);

impl fmt::Display for Target {
    /// `10.96.0.12:9080`, `[fd00::12]:9080`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A config version as the stream carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u64);

/// Percent-encodes a query value (RFC 3986 unreserved characters, `:` and `/` pass).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn since(v: Option<Version>) -> String {
    v.map(|v| format!("&since={}", v.0)).unwrap_or_default()
}

/// `/v1/watch/inbound?pod=<ns>/<name>[&since=<v>]`.
pub fn inbound_path(pod: &PodRef, after: Option<Version>) -> String {
    format!(
        "/v1/watch/inbound?pod={}{}",
        encode(&pod.to_string()),
        since(after)
    )
}

/// `/v1/watch/outbound?target=<ip:port>[&since=<v>]`.
pub fn outbound_path(target: Target, after: Option<Version>) -> String {
    format!(
        "/v1/watch/outbound?target={}{}",
        encode(&target.to_string()),
        since(after)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_addresses() {
        let a: OperatorAddr = "remora-operator.remora-system.svc:15012"
            .parse()
            .expect("dns");
        assert_eq!(
            (a.host(), a.port()),
            ("remora-operator.remora-system.svc", 15012)
        );
        assert_eq!(a.dial(), "remora-operator.remora-system.svc:15012");
        let v6: OperatorAddr = "[fd00::1]:15012".parse().expect("v6");
        assert_eq!(v6.host(), "fd00::1");
        assert_eq!(v6.to_string(), "[fd00::1]:15012");
        let v4: OperatorAddr = "127.0.0.1:1".parse().expect("v4");
        assert_eq!(v4.host(), "127.0.0.1");
        for bad in [
            "remora-operator",
            ":15012",
            "host:0",
            "host:http",
            "fd00::1:15012",
        ] {
            assert!(bad.parse::<OperatorAddr>().is_err(), "{bad}");
        }
        assert!(OperatorName::new("remora-operator.remora-system.svc").is_ok());
        assert!(OperatorName::new("127.0.0.1").is_ok());
        assert!(OperatorName::new("not a name").is_err());
    }

    #[test]
    fn watch_paths() {
        let pod = PodRef {
            namespace: "shop".into(),
            name: "reviews-1".into(),
        };
        assert_eq!(
            inbound_path(&pod, None),
            "/v1/watch/inbound?pod=shop/reviews-1"
        );
        let v4 = Target("10.96.0.12:9080".parse().expect("addr"));
        assert_eq!(
            outbound_path(v4, Some(Version(17))),
            "/v1/watch/outbound?target=10.96.0.12:9080&since=17"
        );
        let v6 = Target("[fd00::12]:9080".parse().expect("addr"));
        let path = outbound_path(v6, None);
        assert_eq!(path, "/v1/watch/outbound?target=%5Bfd00::12%5D:9080");
        assert!(path.parse::<http::Uri>().is_ok(), "a valid request target");
        assert_eq!(encode("a b&c=d"), "a%20b%26c%3Dd");
    }
}
