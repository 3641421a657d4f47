//! The `caBundle` of the injector's `MutatingWebhookConfiguration` (pods) and
//! `ValidatingWebhookConfiguration` (the namespace label): a strategic merge patch that
//! sets `webhooks[].clientConfig.caBundle` (merged by webhook `name`, so nothing else of
//! the object is touched) to the mesh trust bundle, or nothing when every webhook already
//! has it.

use k8s_openapi::{
    ByteString,
    api::admissionregistration::v1::{
        MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
    },
};

/// A webhook configuration whose webhooks' caBundles the operator keeps.
pub trait WebhookConfiguration {
    /// Each webhook's name and client config.
    fn hooks(&self) -> Vec<(&str, &WebhookClientConfig)>;
}

impl WebhookConfiguration for MutatingWebhookConfiguration {
    fn hooks(&self) -> Vec<(&str, &WebhookClientConfig)> {
        self.webhooks
            .iter()
            .flatten()
            .map(|w| (w.name.as_str(), &w.client_config))
            .collect()
    }
}

impl WebhookConfiguration for ValidatingWebhookConfiguration {
    fn hooks(&self) -> Vec<(&str, &WebhookClientConfig)> {
        self.webhooks
            .iter()
            .flatten()
            .map(|w| (w.name.as_str(), &w.client_config))
            .collect()
    }
}

/// The patch setting every webhook's caBundle to `bundle_pem`; `None` when none differs.
pub fn patch(config: &impl WebhookConfiguration, bundle_pem: &str) -> Option<serde_json::Value> {
    let want = ByteString(bundle_pem.as_bytes().to_vec());
    let stale: Vec<serde_json::Value> = config
        .hooks()
        .into_iter()
        .filter(|(_, c)| c.ca_bundle.as_ref() != Some(&want))
        .map(|(name, _)| {
            serde_json::json!({
                "name": name,
                "clientConfig": {"caBundle": want},
            })
        })
        .collect();
    (!stale.is_empty()).then(|| serde_json::json!({"webhooks": stale}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(bundles: &[Option<&str>]) -> MutatingWebhookConfiguration {
        let webhooks: Vec<serde_json::Value> = bundles
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut cc = serde_json::json!({"service": {"name": "remora-webhook", "namespace": "remora-system"}});
                if let Some(b) = b {
                    cc["caBundle"] = serde_json::to_value(ByteString(b.as_bytes().to_vec()))
                        .expect("bytes");
                }
                serde_json::json!({
                    "name": format!("w{i}.remora.dev"),
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "clientConfig": cc,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "remora-webhook"},
            "webhooks": webhooks,
        }))
        .expect("a valid configuration")
    }

    #[test]
    fn only_stale_webhooks_are_patched_by_name() {
        let pem = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pem);
        assert_eq!(
            patch(&config(&[None, Some(pem), Some("old")]), pem),
            Some(serde_json::json!({"webhooks": [
                {"name": "w0.remora.dev", "clientConfig": {"caBundle": b64}},
                {"name": "w2.remora.dev", "clientConfig": {"caBundle": b64}},
            ]}))
        );
        assert_eq!(patch(&config(&[Some(pem), Some(pem)]), pem), None);
        assert_eq!(patch(&config(&[]), pem), None);
    }

    #[test]
    fn the_validating_configuration_is_patched_the_same_way() {
        let pem = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pem);
        let vwc: ValidatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "remora-webhook"},
            "webhooks": [{
                "name": "namespace.remora.dev",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "clientConfig": {"service": {"name": "remora-webhook", "namespace": "remora-system"}},
            }],
        }))
        .expect("a valid configuration");
        assert_eq!(
            patch(&vwc, pem),
            Some(serde_json::json!({"webhooks": [
                {"name": "namespace.remora.dev", "clientConfig": {"caBundle": b64}},
            ]}))
        );
    }
}
