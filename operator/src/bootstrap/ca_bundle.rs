//! The `caBundle` of the injector's `MutatingWebhookConfiguration`: a strategic merge
//! patch that sets `webhooks[].clientConfig.caBundle` (merged by webhook `name`, so
//! nothing else of the object is touched) to the mesh trust bundle, or nothing when every
//! webhook already has it.

use k8s_openapi::{ByteString, api::admissionregistration::v1::MutatingWebhookConfiguration};

/// The patch setting every webhook's caBundle to `bundle_pem`; `None` when none differs.
pub fn patch(config: &MutatingWebhookConfiguration, bundle_pem: &str) -> Option<serde_json::Value> {
    let want = ByteString(bundle_pem.as_bytes().to_vec());
    let stale: Vec<serde_json::Value> = config
        .webhooks
        .iter()
        .flatten()
        .filter(|w| w.client_config.ca_bundle.as_ref() != Some(&want))
        .map(|w| {
            serde_json::json!({
                "name": w.name,
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
}
