//! The proxy's Prometheus metrics, created once and passed explicitly (no globals), and
//! encoded in the text exposition format for `/metrics` on the admin port.

use std::{fmt::Write as _, sync::Arc};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::addr::Direction;

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// A static label value (reasons, outcomes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Static(pub &'static str);

impl EncodeLabelValue for Static {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0)
    }
}

/// A peer's SPIFFE identity, or empty when the peer is not authenticated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Peer(pub Option<Arc<str>>);

impl EncodeLabelValue for Peer {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.as_deref().unwrap_or(""))
    }
}

/// A service name as a label value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: Name,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceOutcomeLabels {
    pub service: Name,
    pub outcome: Static,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub direction: Direction,
    pub outcome: Static,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: Direction,
    /// `from_client` or `to_client`.
    pub flow: Static,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub status: u16,
    pub peer_identity: Peer,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: Static,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RejectedLabels {
    /// `policy` (a service's policy), `service` (a whole service piece) or `inbound`.
    pub piece: Static,
    /// `unparsable` or `invalid`.
    pub reason: Static,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~3.3 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

fn detect_histogram() -> Histogram {
    // 10 µs .. ~10 s: detection is normally one read, a timeout is the tail.
    Histogram::new(exponential_buckets(0.000_01, 4.0, 11))
}

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Accepted connections by direction and what became of them (`accepted`,
    /// `not_redirected`, `loop_refused`, `unknown_denied`, `connect_failed`, ...).
    pub connections: Family<OutcomeLabels, Counter>,
    /// Connections being served now.
    pub open_connections: Family<DirLabels, Gauge>,
    /// Protocol detection outcomes (`http1`, `http2`, `mesh_tls`, `foreign_tls`, `opaque`,
    /// `timeout`, `eof`, `skipped_opaque_port`).
    pub detect: Family<OutcomeLabels, Counter>,
    /// How long detection took.
    pub detect_duration: HistogramFamily<DirLabels>,
    /// Opaque TCP bytes.
    pub tcp_bytes: Family<BytesLabels, Counter>,
    /// HTTP requests by direction, response status and peer identity.
    pub requests: Family<RequestLabels, Counter>,
    /// HTTP request latency (until response headers).
    pub request_duration: HistogramFamily<DirLabels>,
    /// Responses the proxy generated itself because it could not forward (`connect_refused`,
    /// `connect_timeout`, `no_endpoints`, ...).
    pub proxy_errors: Family<OutcomeLabels, Counter>,
    /// Outbound destinations not in the config (`passthrough` or `denied`).
    pub unknown_destinations: Family<ReasonLabels, Counter>,
    /// Version of the config being served.
    pub config_version: Gauge,
    /// Config reloads: `applied`, or the reason a file was rejected.
    pub config_reloads: Family<ReasonLabels, Counter>,
    /// mTLS handshakes by direction and outcome (`ok` or the failure reason).
    pub tls_handshakes: Family<OutcomeLabels, Counter>,
    /// Expiry of the workload certificate in force (unix seconds).
    pub cert_expiry: Gauge,
    /// Identity (certificate) loads: `applied` or the reason the files were rejected.
    pub identity_reloads: Family<ReasonLabels, Counter>,
    /// Inbound authorization decisions (`allow`, `deny`) by direction.
    pub authz: Family<OutcomeLabels, Counter>,
    /// Certify attempts with the operator (Kubernetes mode): `issued`, or why one failed
    /// (`token_file`, `connect`, `tls`, `refused`, `operator_error`, `bad_certificate`, ...).
    pub certificate_renewals: Family<ReasonLabels, Counter>,
    /// Config streams interrupted and reconnected, by why (`heartbeat_timeout`, `ended`,
    /// `connect`, `not_found`, `not_synced`, `denied`, ...).
    pub control_stream_reconnects: Family<ReasonLabels, Counter>,
    /// Outbound subscriptions held now.
    pub control_subscriptions: Gauge,
    /// Pieces of the operator's messages that did not parse or validate; the previous
    /// version of each was kept.
    pub config_rejected: Family<RejectedLabels, Counter>,
    /// Retry decisions by service: `retried`, `budget_exhausted`, `body_not_replayable`.
    pub retries: Family<ServiceOutcomeLabels, Counter>,
    /// Requests and connections refused by a service's circuit breaker, by cause
    /// (`max-connections`, `max-pending-requests`, `max-requests`, `circuit-open`).
    pub breaker_refusals: Family<ServiceOutcomeLabels, Counter>,
    /// Endpoints ejected by outlier detection.
    pub ejections: Family<ServiceLabels, Counter>,
    /// Error-rate breaker state by service (0 closed, 1 open, 2 half-open), at scrape time.
    pub breaker_state: Family<ServiceLabels, Gauge>,
    /// Endpoints ejected now, by service, at scrape time.
    pub ejected_endpoints: Family<ServiceLabels, Gauge>,
    /// Injected faults (`abort`, `delay`).
    pub faults: Family<ReasonLabels, Counter>,
    /// Mirrored requests: `sent`, `failed`, `timed_out`, `no_endpoints`,
    /// `skipped_streamed_body`.
    pub mirror: Family<ReasonLabels, Counter>,
    /// Inbound requests (`http`) and connections (`tcp`) refused by the rate limit.
    pub rate_limited: Family<OutcomeLabels, Counter>,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// Limits and refusals under abuse (see `listen`, `tls`, `inbound::plaintext`).
    pub abuse: Abuse,
}

/// Inbound refusals by reason, accept errors, and Permissive ports' plaintext clients.
#[derive(Debug, Default)]
pub struct Abuse {
    /// Inbound connections refused before reaching the app: `plaintext` (on a Strict
    /// port), or why the mTLS handshake failed (`no_client_certificate`, `untrusted`,
    /// `expired`, `foreign_trust_domain`, `bad_spiffe_id`, `timeout`, `handshake_limit`...).
    pub inbound_refused: Family<ReasonLabels, Counter>,
    /// Failed `accept` calls on the capture listeners (`emfile`, `enfile`, `nomem`,
    /// `connection`, `other`).
    pub accept_errors: Family<ReasonLabels, Counter>,
    /// Plaintext connections accepted on Permissive ports, by client IP (bounded).
    pub plaintext_accepted: Family<PeerIpLabels, Counter>,
    /// Which client IPs have a series of their own.
    pub plaintext_peers: crate::inbound::plaintext::PeerLabels,
    /// HTTP connections cut off by a limit (`header_timeout`, `write_stall`; see `http`).
    pub http_cutoffs: Family<OutcomeLabels, Counter>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PeerIpLabels {
    /// The client's IP, or `other` once the label set is full.
    pub peer: Name,
}

impl Abuse {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "inbound_refused",
            "Inbound connections refused before reaching the app, by reason",
            self.inbound_refused.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts on the capture listeners, by reason",
            self.accept_errors.clone(),
        );
        registry.register(
            "inbound_plaintext_accepted",
            "Plaintext connections accepted on Permissive ports, by client IP (at most 100 IPs, then other)",
            self.plaintext_accepted.clone(),
        );
        registry.register(
            "http_cutoffs",
            "HTTP connections cut off: header_timeout (a request head not complete in time, or a kept-alive connection idle that long), write_stall (a client taking none of the proxy's writes)",
            self.http_cutoffs.clone(),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `remora_proxy` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("remora_proxy");
        let m = Self {
            registry: Registry::default(),
            connections: Family::default(),
            open_connections: Family::default(),
            detect: Family::default(),
            detect_duration: Family::new_with_constructor(detect_histogram),
            tcp_bytes: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            proxy_errors: Family::default(),
            unknown_destinations: Family::default(),
            config_version: Gauge::default(),
            config_reloads: Family::default(),
            tls_handshakes: Family::default(),
            cert_expiry: Gauge::default(),
            identity_reloads: Family::default(),
            authz: Family::default(),
            certificate_renewals: Family::default(),
            control_stream_reconnects: Family::default(),
            control_subscriptions: Gauge::default(),
            config_rejected: Family::default(),
            retries: Family::default(),
            breaker_refusals: Family::default(),
            ejections: Family::default(),
            breaker_state: Family::default(),
            ejected_endpoints: Family::default(),
            faults: Family::default(),
            mirror: Family::default(),
            rate_limited: Family::default(),
            access_log_dropped: Counter::default(),
            abuse: Abuse::default(),
        };
        m.abuse.register(&mut registry);
        for (name, help, metric) in [
            ("retries", "Retry decisions by service", &m.retries),
            (
                "breaker_refusals",
                "Requests and connections refused by circuit breakers, by cause",
                &m.breaker_refusals,
            ),
        ] {
            registry.register(name, help, metric.clone());
        }
        registry.register(
            "ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        registry.register(
            "breaker_state",
            "Error-rate breaker state (0 closed, 1 open, 2 half-open)",
            m.breaker_state.clone(),
        );
        registry.register(
            "ejected_endpoints",
            "Endpoints ejected now",
            m.ejected_endpoints.clone(),
        );
        registry.register("faults", "Injected faults", m.faults.clone());
        registry.register("mirror", "Mirrored requests by outcome", m.mirror.clone());
        registry.register(
            "rate_limited",
            "Inbound requests and connections refused by the rate limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "connections",
            "Accepted connections by outcome",
            m.connections.clone(),
        );
        registry.register(
            "open_connections",
            "Connections being served",
            m.open_connections.clone(),
        );
        registry.register("detect", "Protocol detection outcomes", m.detect.clone());
        registry.register(
            "detect_duration_seconds",
            "Time spent detecting the protocol",
            m.detect_duration.clone(),
        );
        registry.register(
            "tcp_bytes",
            "Bytes proxied on opaque TCP connections",
            m.tcp_bytes.clone(),
        );
        registry.register(
            "requests",
            "HTTP requests by status and peer identity",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "HTTP request latency until response headers",
            m.request_duration.clone(),
        );
        registry.register(
            "proxy_errors",
            "Responses generated by the proxy because forwarding failed",
            m.proxy_errors.clone(),
        );
        registry.register(
            "unknown_destinations",
            "Outbound destinations missing from the config",
            m.unknown_destinations.clone(),
        );
        registry.register(
            "config_version",
            "Version of the config being served",
            m.config_version.clone(),
        );
        registry.register(
            "config_reloads",
            "Config loads by result",
            m.config_reloads.clone(),
        );
        registry.register(
            "tls_handshakes",
            "mTLS handshakes by outcome",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "cert_expiry_timestamp_seconds",
            "Expiry of the workload certificate in force",
            m.cert_expiry.clone(),
        );
        registry.register(
            "identity_reloads",
            "Identity loads by result",
            m.identity_reloads.clone(),
        );
        registry.register("authz", "Inbound authorization decisions", m.authz.clone());
        registry.register(
            "certificate_renewals",
            "Certify attempts with the operator by result",
            m.certificate_renewals.clone(),
        );
        registry.register(
            "control_stream_reconnects",
            "Config streams interrupted and reconnected, by reason",
            m.control_stream_reconnects.clone(),
        );
        registry.register(
            "control_subscriptions",
            "Outbound config subscriptions held",
            m.control_subscriptions.clone(),
        );
        registry.register(
            "config_rejected",
            "Config pieces from the operator rejected (the previous version kept), by piece and reason",
            m.config_rejected.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts a connection outcome.
    pub fn connection(&self, direction: Direction, outcome: &'static str) {
        self.connections
            .get_or_create(&OutcomeLabels {
                direction,
                outcome: Static(outcome),
            })
            .inc();
    }

    /// Counts an inbound connection refused before reaching the app.
    pub fn inbound_refused(&self, reason: &'static str) {
        self.abuse
            .inbound_refused
            .get_or_create(&ReasonLabels {
                reason: Static(reason),
            })
            .inc();
    }

    /// Counts a retry decision.
    pub fn count_retry(&self, service: &Arc<str>, outcome: &'static str) {
        self.retries
            .get_or_create(&ServiceOutcomeLabels {
                service: Name(service.clone()),
                outcome: Static(outcome),
            })
            .inc();
    }

    /// Counts a breaker refusal.
    pub fn count_overflow(&self, service: &Arc<str>, cause: &'static str) {
        self.breaker_refusals
            .get_or_create(&ServiceOutcomeLabels {
                service: Name(service.clone()),
                outcome: Static(cause),
            })
            .inc();
    }

    /// Counts an ejection.
    pub fn count_ejection(&self, service: &Arc<str>) {
        self.ejections
            .get_or_create(&ServiceLabels {
                service: Name(service.clone()),
            })
            .inc();
    }

    /// Counts an injected fault.
    pub fn count_fault(&self, kind: &'static str) {
        self.faults
            .get_or_create(&ReasonLabels {
                reason: Static(kind),
            })
            .inc();
    }

    /// Counts a mirrored request's outcome.
    pub fn count_mirror(&self, outcome: &'static str) {
        self.mirror
            .get_or_create(&ReasonLabels {
                reason: Static(outcome),
            })
            .inc();
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
            let _ = writeln!(out, "# metrics encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_registered_metrics_with_labels() {
        let m = Metrics::new();
        m.connection(Direction::Outbound, "loop_refused");
        m.requests
            .get_or_create(&RequestLabels {
                direction: Direction::Inbound,
                status: 200,
                peer_identity: Peer(Some("spiffe://cluster.local/ns/a/sa/b".into())),
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains(
                r#"remora_proxy_connections_total{direction="outbound",outcome="loop_refused"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"remora_proxy_requests_total{direction="inbound",status="200",peer_identity="spiffe://cluster.local/ns/a/sa/b"} 1"#),
            "{text}"
        );
        assert!(text.contains("remora_proxy_config_version"), "{text}");
    }
}
