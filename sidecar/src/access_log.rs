//! The optional access log (`--access-log`, or the pod annotation
//! `config.remora.dev/access-log: "true"`): one JSON line per HTTP request and per opaque
//! TCP connection, on stdout, next to the proxy's own logs, in the spirit of Envoy's and
//! Linkerd's access logs. Lines are formatted on the request's task and written by one
//! writer task; when the writer falls behind, lines are dropped and counted rather than
//! ever slowing a request down.

use std::{
    fmt,
    io::Write as _,
    net::SocketAddr,
    ops::{BitOr, BitOrAssign},
    time::{Duration, SystemTime},
};

use http::{Request, Response, header};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::{
    addr::{ClientAddr, Direction, OrigDstAddr},
    http::{ConnMeta, Exchange, ProxyBody},
    metrics::{Metrics, Peer},
    trace::X_REQUEST_ID,
};

/// Response flags, as in Envoy's `%RESPONSE_FLAGS%`: what the proxy did to a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags(u16);

impl Flags {
    pub const RETRIED: Self = Self(1);
    pub const EJECTED: Self = Self(1 << 1);
    pub const CIRCUIT_OPEN: Self = Self(1 << 2);
    pub const RATE_LIMITED: Self = Self(1 << 3);
    pub const TIMEOUT: Self = Self(1 << 4);
    pub const FAULT: Self = Self(1 << 5);
    pub const NO_ENDPOINTS: Self = Self(1 << 6);
    pub const MIRRORED: Self = Self(1 << 7);

    const NAMES: [(Self, &'static str); 8] = [
        (Self::RETRIED, "retried"),
        (Self::EJECTED, "ejected"),
        (Self::CIRCUIT_OPEN, "circuit_open"),
        (Self::RATE_LIMITED, "rate_limited"),
        (Self::TIMEOUT, "timeout"),
        (Self::FAULT, "fault"),
        (Self::NO_ENDPOINTS, "no_endpoints"),
        (Self::MIRRORED, "mirrored"),
    ];

    pub const fn empty() -> Self {
        Self(0)
    }

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The names of the flags set.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(f, _)| self.contains(*f))
            .map(|(_, n)| *n)
            .collect()
    }
}

impl BitOr for Flags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

/// What the log needs from a request before it is consumed.
#[derive(Debug)]
pub struct RequestFacts {
    method: String,
    authority: Option<String>,
    path: String,
    trace_id: Option<String>,
}

impl RequestFacts {
    pub fn of<B>(req: &Request<B>) -> Self {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        Self {
            method: req.method().as_str().to_owned(),
            authority,
            path: req.uri().path().to_owned(),
            trace_id: trace_id(req.headers()),
        }
    }
}

/// The trace id of a W3C `traceparent`, else the B3 trace id, else `x-request-id`.
fn trace_id(h: &http::HeaderMap) -> Option<String> {
    if let Some(tp) = h.get("traceparent").and_then(|v| v.to_str().ok())
        && let Some(id) = tp.split('-').nth(1)
    {
        return Some(id.to_owned());
    }
    h.get("x-b3-traceid")
        .or_else(|| h.get(&X_REQUEST_ID))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// One line of the log.
#[derive(Debug, Serialize)]
struct Line<'a> {
    start_time: String,
    duration_ms: f64,
    kind: &'static str,
    direction: &'static str,
    client: String,
    destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authority: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_received: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_identity: Option<&'a str>,
    attempts: u32,
    response_flags: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
}

/// Bounded so a stalled stdout costs memory up to this many lines, then drops lines.
const QUEUE: usize = 4096;

/// The writer side of the access log.
pub struct AccessLog {
    tx: mpsc::Sender<String>,
    metrics: std::sync::Arc<Metrics>,
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog").finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Starts the writer task, writing to stdout.
    pub fn stdout(metrics: std::sync::Arc<Metrics>) -> Self {
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        tokio::task::spawn_blocking(move || {
            let stdout = std::io::stdout();
            while let Some(line) = rx.blocking_recv() {
                let mut out = stdout.lock();
                let _ = out.write_all(line.as_bytes());
                // Write whatever else is queued before flushing once.
                while let Ok(more) = rx.try_recv() {
                    let _ = out.write_all(more.as_bytes());
                }
                let _ = out.flush();
            }
        });
        Self { tx, metrics }
    }

    /// A log whose lines go to `tx` (tests).
    pub fn to_channel(tx: mpsc::Sender<String>, metrics: std::sync::Arc<Metrics>) -> Self {
        Self { tx, metrics }
    }

    fn emit(&self, line: &Line<'_>) {
        let Ok(mut text) = serde_json::to_string(line) else {
            return;
        };
        text.push('\n');
        if self.tx.try_send(text).is_err() {
            self.metrics.access_log_dropped.inc();
        }
    }

    /// Logs one HTTP request.
    pub fn request(
        &self,
        meta: &ConnMeta,
        facts: RequestFacts,
        resp: &Response<ProxyBody>,
        x: &Exchange,
        start: SystemTime,
        elapsed: Duration,
    ) {
        self.emit(&Line {
            start_time: rfc3339(start),
            duration_ms: elapsed.as_secs_f64() * 1e3,
            kind: "http",
            direction: meta.direction.as_str(),
            client: meta.client.to_string(),
            destination: meta.orig_dst.to_string(),
            method: Some(&facts.method),
            authority: facts.authority.as_deref(),
            path: Some(&facts.path),
            status: Some(resp.status().as_u16()),
            bytes_received: x.request_bytes,
            bytes_sent: x
                .response_bytes
                .or_else(|| hyper::body::Body::size_hint(resp.body()).exact()),
            upstream: x.upstream.map(|a| a.to_string()),
            peer_identity: x.peer.0.as_deref(),
            attempts: x.attempts,
            response_flags: x.flags.names(),
            trace_id: facts.trace_id.as_deref(),
        });
    }

    /// Logs one opaque TCP connection once it ends.
    #[allow(clippy::too_many_arguments)]
    pub fn connection(
        &self,
        direction: Direction,
        client: ClientAddr,
        orig_dst: OrigDstAddr,
        upstream: Option<SocketAddr>,
        peer: &Peer,
        bytes: (u64, u64),
        flags: Flags,
        start: SystemTime,
        elapsed: Duration,
    ) {
        self.emit(&Line {
            start_time: rfc3339(start),
            duration_ms: elapsed.as_secs_f64() * 1e3,
            kind: "tcp",
            direction: direction.as_str(),
            client: client.to_string(),
            destination: orig_dst.to_string(),
            method: None,
            authority: None,
            path: None,
            status: None,
            bytes_received: Some(bytes.0),
            bytes_sent: Some(bytes.1),
            upstream: upstream.map(|a| a.to_string()),
            peer_identity: peer.0.as_deref(),
            attempts: u32::from(upstream.is_some()),
            response_flags: flags.names(),
            trace_id: None,
        });
    }
}

/// `t` as RFC 3339 UTC with milliseconds (`2026-12-05T09:30:00.123Z`).
fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{:03}Z",
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_463_000_123);
        assert_eq!(rfc3339(t), "2026-12-05T09:30:00.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn flags_name_what_happened() {
        let mut f = Flags::empty();
        assert!(f.names().is_empty());
        f |= Flags::RETRIED;
        f |= Flags::TIMEOUT;
        assert_eq!(f.names(), vec!["retried", "timeout"]);
        assert!(f.contains(Flags::RETRIED));
        assert!(!f.contains(Flags::FAULT));
    }

    #[test]
    fn trace_ids_come_from_traceparent_then_b3_then_request_id() {
        let mut h = http::HeaderMap::new();
        h.insert("x-request-id", "rid".parse().expect("value"));
        assert_eq!(trace_id(&h).as_deref(), Some("rid"));
        h.insert("x-b3-traceid", "b3id".parse().expect("value"));
        assert_eq!(trace_id(&h).as_deref(), Some("b3id"));
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .expect("value"),
        );
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }
}
