//! Why the proxy answered a request itself, and how each reason becomes a response: a
//! status and an `x-remora-proxy-error` header naming the reason, never a hang.

use std::{sync::Arc, time::Duration};

use http::{HeaderValue, Response, StatusCode, header, uri::Authority};

use super::{
    PROXY_ERROR, ProxyBody, full,
    idle::{BodyIdle, find_body_idle},
    upstream::UpstreamError,
};
use crate::{access_log::Flags, addr::OrigDstAddr, inbound::Refusal, outbound::dial::DialError};

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("service {0} has no ready endpoints")]
    NoEndpoints(Arc<str>),
    #[error("destination {0} is not in the config and unknown destinations are denied")]
    UnknownDenied(OrigDstAddr),
    #[error("upstream {0} refused the connection")]
    ConnectRefused(Authority),
    #[error("timed out connecting to upstream {0}")]
    ConnectTimeout(Authority),
    #[error("cannot connect to upstream {0}: {1}")]
    Connect(Authority, String),
    #[error("upstream {0} did not answer within {1:?}")]
    RequestTimeout(Arc<str>, Duration),
    #[error("upstream {0} failed: {1}")]
    Upstream(Authority, String),
    #[error("cannot read the request body: {0}")]
    ClientBody(String),
    #[error("the request body stalled: {0}")]
    ClientBodyTimeout(BodyIdle),
    #[error("{0}")]
    Refused(Refusal),
    #[error("circuit breaker of {service} is open: retry after {retry_after:?}")]
    CircuitOpen {
        service: Arc<str>,
        retry_after: Duration,
    },
    #[error("{service} is over its {limit} limit")]
    Overflow {
        service: Arc<str>,
        limit: &'static str,
    },
    #[error("fault injected by policy: {0}")]
    FaultAbort(StatusCode),
}

impl From<Refusal> for ProxyError {
    fn from(r: Refusal) -> Self {
        Self::Refused(r)
    }
}

impl ProxyError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoEndpoints(_) => "no_endpoints",
            Self::UnknownDenied(_) => "unknown_denied",
            Self::ConnectRefused(_) => "connect_refused",
            Self::ConnectTimeout(_) => "connect_timeout",
            Self::Connect(..) => "connect_error",
            Self::RequestTimeout(..) => "request_timeout",
            Self::Upstream(..) => "upstream_error",
            Self::ClientBody(_) => "client_body_error",
            Self::ClientBodyTimeout(_) => "client_body_timeout",
            Self::Refused(Refusal::Unauthorized { .. }) => "unauthorized",
            Self::Refused(Refusal::RateLimited { .. }) => "rate_limited",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::Overflow { .. } => "overflow",
            Self::FaultAbort(_) => "fault_abort",
        }
    }

    /// What the access log flags for this error.
    pub fn flags(&self) -> Flags {
        match self {
            Self::RequestTimeout(..) | Self::ClientBodyTimeout(_) => Flags::TIMEOUT,
            Self::Refused(Refusal::RateLimited { .. }) => Flags::RATE_LIMITED,
            Self::CircuitOpen { .. } | Self::Overflow { .. } => Flags::CIRCUIT_OPEN,
            Self::FaultAbort(_) => Flags::FAULT,
            Self::NoEndpoints(_) => Flags::NO_ENDPOINTS,
            _ => Flags::empty(),
        }
    }

    /// How long the client should wait before trying again, when the proxy knows.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::CircuitOpen { retry_after, .. }
            | Self::Refused(Refusal::RateLimited { retry_after, .. }) => Some(*retry_after),
            _ => None,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::NoEndpoints(_) | Self::ConnectTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UnknownDenied(_) | Self::Refused(Refusal::Unauthorized { .. }) => {
                StatusCode::FORBIDDEN
            }
            Self::Refused(Refusal::RateLimited { .. }) => StatusCode::TOO_MANY_REQUESTS,
            Self::CircuitOpen { .. } | Self::Overflow { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::FaultAbort(status) => *status,
            Self::ClientBody(_) => StatusCode::BAD_REQUEST,
            Self::ClientBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::RequestTimeout(..) => StatusCode::GATEWAY_TIMEOUT,
            Self::ConnectRefused(_) | Self::Connect(..) | Self::Upstream(..) => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// Why reading the client's body failed.
    pub fn from_client_body(e: &(dyn std::error::Error + 'static)) -> Self {
        match find_body_idle(e) {
            Some(idle) => Self::ClientBodyTimeout(BodyIdle(idle.0)),
            None => Self::ClientBody(e.to_string()),
        }
    }

    pub fn from_upstream(authority: Authority, e: &UpstreamError) -> Self {
        // The chain below the pool's own wrapper: what failed, down to the I/O error.
        let (is_connect, top, mut source): (bool, &(dyn std::error::Error + 'static), _) =
            (e.is_connect(), e, Some(e.cause()));
        // The client's body stopped, not the upstream: the client is told (408).
        if let Some(idle) = find_body_idle(top).or_else(|| source.and_then(find_body_idle)) {
            return Self::ClientBodyTimeout(BodyIdle(idle.0));
        }
        let mut detail = String::new();
        let mut io_kind = None;
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                io_kind.get_or_insert(io.kind());
            }
            match s.downcast_ref::<DialError>() {
                Some(DialError::Refused) => {
                    io_kind.get_or_insert(std::io::ErrorKind::ConnectionRefused);
                }
                Some(DialError::Timeout(_)) => {
                    io_kind.get_or_insert(std::io::ErrorKind::TimedOut);
                }
                _ => {}
            }
            if !detail.is_empty() {
                detail.push_str(": ");
            }
            detail.push_str(&s.to_string());
            source = s.source();
        }
        if is_connect {
            match io_kind {
                Some(std::io::ErrorKind::ConnectionRefused) => Self::ConnectRefused(authority),
                Some(std::io::ErrorKind::TimedOut) => Self::ConnectTimeout(authority),
                _ => Self::Connect(authority, detail),
            }
        } else {
            Self::Upstream(
                authority,
                if detail.is_empty() {
                    top.to_string()
                } else {
                    detail
                },
            )
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let msg = self.to_string();
        let reason =
            HeaderValue::from_str(&msg).unwrap_or_else(|_| HeaderValue::from_static(self.label()));
        let mut resp = Response::new(full(format!("{msg}\n")));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(&PROXY_ERROR, reason);
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(after) = self.retry_after() {
            // Whole seconds, rounded up: `retry-after: 0` would invite an instant retry.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_errors_map_to_statuses_with_a_reason() {
        let a = Authority::from_static("10.0.0.1:80");
        let resp = ProxyError::ConnectRefused(a.clone()).into_response();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            resp.headers().get(&PROXY_ERROR).expect("reason"),
            "upstream 10.0.0.1:80 refused the connection"
        );
        assert_eq!(
            ProxyError::NoEndpoints("a.b".into())
                .into_response()
                .status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ProxyError::ConnectTimeout(a.clone())
                .into_response()
                .status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ProxyError::RequestTimeout("reviews.shop".into(), Duration::from_secs(1))
                .into_response()
                .status(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }

    #[test]
    fn breaker_and_rate_limit_answers_say_when_to_come_back() {
        let open = ProxyError::CircuitOpen {
            service: "reviews.shop".into(),
            retry_after: Duration::from_millis(2500),
        }
        .into_response();
        assert_eq!(open.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            open.headers()
                .get(header::RETRY_AFTER)
                .expect("retry-after"),
            "3"
        );
        let limited = ProxyError::from(Refusal::RateLimited {
            port: 9080,
            retry_after: Duration::from_millis(10),
        })
        .into_response();
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            limited
                .headers()
                .get(header::RETRY_AFTER)
                .expect("retry-after"),
            "1"
        );
        let overflow = ProxyError::Overflow {
            service: "reviews.shop".into(),
            limit: "maxRequests",
        }
        .into_response();
        assert_eq!(overflow.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            overflow.headers().get(&PROXY_ERROR).expect("reason"),
            "reviews.shop is over its maxRequests limit"
        );
        assert_eq!(
            ProxyError::FaultAbort(StatusCode::IM_A_TEAPOT)
                .into_response()
                .status(),
            StatusCode::IM_A_TEAPOT
        );
    }
}
