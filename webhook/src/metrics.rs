//! The webhook's Prometheus metrics, held in one [`Metrics`] value that is passed around
//! explicitly (no globals) and rendered in the text exposition format on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the admissions counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `injected`, `skipped`, `denied` or `error`.
    pub decision: String,
    /// Low-cardinality reason.
    pub reason: String,
}

/// Labels of the certificate reload counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `failure`.
    pub result: String,
}

/// All metrics of the webhook.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Admission reviews by decision and reason.
    pub admissions: Family<DecisionLabels, Counter>,
    /// Time spent handling one review.
    pub admission_duration: Histogram,
    /// 1 when pods get native sidecars by default, 0 for classic.
    pub native_sidecar: Gauge,
    /// Serving certificate reloads by result.
    pub cert_reloads: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("remora_webhook");
        let admissions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "admissions",
            "Admission reviews handled, by decision and reason",
            admissions.clone(),
        );
        let admission_duration =
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]);
        registry.register(
            "admission_duration_seconds",
            "Time to handle one admission review",
            admission_duration.clone(),
        );
        let native_sidecar = Gauge::default();
        registry.register(
            "native_sidecar",
            "1 when the proxy is injected as a native sidecar by default",
            native_sidecar.clone(),
        );
        let cert_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cert_reloads",
            "Serving certificate reloads, by result",
            cert_reloads.clone(),
        );
        Self {
            registry,
            admissions,
            admission_duration,
            native_sidecar,
            cert_reloads,
        }
    }

    /// Counts one decision.
    pub fn count_decision(&self, decision: &str, reason: &str) {
        self.admissions
            .get_or_create(&DecisionLabels {
                decision: decision.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one certificate reload.
    pub fn count_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.cert_reloads
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counted_decisions() {
        let m = Metrics::new();
        m.count_decision("skipped", "opted-out");
        m.count_reload(false);
        let text = m.render();
        assert!(
            text.contains(
                r#"remora_webhook_admissions_total{decision="skipped",reason="opted-out"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"remora_webhook_cert_reloads_total{result="failure"} 1"#),
            "{text}"
        );
    }
}
