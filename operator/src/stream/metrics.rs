//! The stream server's metrics: subscribers by kind, messages sent by type, refusals by
//! reason. (The index's version and its change-to-version latency are
//! [`crate::metrics::IndexMetrics`].)

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::metrics::KindLabels;

/// Label set: why a watch was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Stream metrics, cheap to clone.
#[derive(Debug, Clone)]
pub struct StreamMetrics {
    subscribers: Family<KindLabels, Gauge>,
    messages: Family<KindLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
}

fn kind(kind: &str) -> KindLabels {
    KindLabels {
        kind: kind.to_owned(),
    }
}

impl StreamMetrics {
    /// Creates the metrics and registers them under `remora_operator_stream`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::unregistered();
        let r = registry.sub_registry_with_prefix("remora_operator_stream");
        r.register(
            "subscribers",
            "Open watch streams, by kind (inbound, outbound)",
            m.subscribers.clone(),
        );
        r.register(
            "messages",
            "Messages sent on watch streams, by type (inbound, outbound, heartbeat)",
            m.messages.clone(),
        );
        r.register(
            "refusals",
            "Watch requests refused, by reason (bad_request, unauthenticated, forbidden, not_found, not_synced)",
            m.refusals.clone(),
        );
        m
    }

    /// Metrics nobody scrapes (benchmarks, tests).
    pub fn unregistered() -> Self {
        Self {
            subscribers: Family::default(),
            messages: Family::default(),
            refusals: Family::default(),
        }
    }

    /// Counts a subscriber of `kind` until the returned guard drops.
    pub fn subscribed(&self, kind_: &'static str) -> SubscriberGuard {
        let gauge = self.subscribers.get_or_create(&kind(kind_)).clone();
        gauge.inc();
        SubscriberGuard(gauge)
    }

    pub fn sent(&self, type_: &str) {
        self.messages.get_or_create(&kind(type_)).inc();
    }

    pub fn refused(&self, reason: &str) {
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Open subscribers of `kind` (tests, benchmarks).
    pub fn subscribers(&self, kind_: &str) -> i64 {
        self.subscribers.get_or_create(&kind(kind_)).get()
    }
}

/// One open subscriber; decrements the gauge when dropped.
#[derive(Debug)]
pub struct SubscriberGuard(Gauge);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_are_counted_while_open() {
        let mut registry = Registry::default();
        let m = StreamMetrics::new(&mut registry);
        let a = m.subscribed("outbound");
        let b = m.subscribed("outbound");
        m.sent("heartbeat");
        m.refused("forbidden");
        assert_eq!(m.subscribers("outbound"), 2);
        drop(a);
        assert_eq!(m.subscribers("outbound"), 1);
        drop(b);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for want in [
            "remora_operator_stream_subscribers{kind=\"outbound\"} 0",
            "remora_operator_stream_messages_total{kind=\"heartbeat\"} 1",
            "remora_operator_stream_refusals_total{reason=\"forbidden\"} 1",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }
}
