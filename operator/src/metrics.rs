//! The operator's Prometheus metrics, registered in a [`Registry`] that the caller owns
//! and passes on explicitly (no globals).

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Label set: the resource kind a controller reconciles.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// Label set: kind and a short error class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    pub error: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
}

/// Controller and leader-election metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    reconciles: Family<KindLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<KindLabels, Histogram>,
    status_writes: Family<KindLabels, Counter>,
    leader: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them under the `remora_operator` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            status_writes: Family::default(),
            leader: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("remora_operator");
        r.register(
            "reconciles",
            "Reconciliations run, by kind",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconciliations that failed, by kind and error class",
            m.errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation, by kind",
            m.duration.clone(),
        );
        r.register(
            "status_writes",
            "Status subresource writes (server-side apply), by kind",
            m.status_writes.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader Lease and writes status",
            m.leader.clone(),
        );
        m
    }

    fn kind(kind: &str) -> KindLabels {
        KindLabels {
            kind: kind.to_owned(),
        }
    }

    /// Counts one reconciliation and its duration.
    pub fn reconciled(&self, kind: &str, took: Duration) {
        self.reconciles.get_or_create(&Self::kind(kind)).inc();
        self.duration
            .get_or_create(&Self::kind(kind))
            .observe(took.as_secs_f64());
    }

    /// Counts one failed reconciliation.
    pub fn failed(&self, kind: &str, error: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_owned(),
                error: error.to_owned(),
            })
            .inc();
    }

    /// Counts one status write.
    pub fn status_written(&self, kind: &str) {
        self.status_writes.get_or_create(&Self::kind(kind)).inc();
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}

/// Discovery index metrics.
#[derive(Debug, Clone)]
pub struct IndexMetrics {
    version: Gauge,
    recomputes: Counter,
    change_to_version: Histogram,
    watch_errors: Family<KindLabels, Counter>,
}

impl IndexMetrics {
    /// Creates the metrics and registers them under `remora_operator_index`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            version: Gauge::default(),
            recomputes: Counter::default(),
            change_to_version: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            watch_errors: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("remora_operator_index");
        r.register(
            "version",
            "The latest derived-config version",
            m.version.clone(),
        );
        r.register(
            "recomputes",
            "Debounced recomputations of the derived config",
            m.recomputes.clone(),
        );
        r.register(
            "change_to_version_seconds",
            "Time from the first Kubernetes change of a burst to the recomputed version",
            m.change_to_version.clone(),
        );
        r.register(
            "watch_errors",
            "Watch failures (retried with backoff), by kind",
            m.watch_errors.clone(),
        );
        m
    }

    pub fn set_version(&self, version: u64) {
        self.version.set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    /// Counts one recomputation and how long its burst waited.
    pub fn recomputed(&self, waited: Option<Duration>) {
        self.recomputes.inc();
        if let Some(w) = waited {
            self.change_to_version.observe(w.as_secs_f64());
        }
    }

    pub fn watch_error(&self, kind: &str) {
        self.watch_errors
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_by_kind() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.reconciled("MeshPolicy", Duration::from_millis(3));
        m.failed("TrafficSplit", "kube");
        m.set_leader(true);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("remora_operator_reconciles_total{kind=\"MeshPolicy\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "remora_operator_reconcile_errors_total{kind=\"TrafficSplit\",error=\"kube\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("remora_operator_leader 1"), "{text}");
    }
}
