//! Keeps the injector reachable: issues (and renews) Secret `remora-webhook-tls` in the
//! operator's namespace with the mesh issuer, and sets the `caBundle` of its
//! `MutatingWebhookConfiguration` and `ValidatingWebhookConfiguration` (both named
//! `--webhook-configuration`) to the mesh trust bundle. The leader only; the decisions
//! are in [`super::serving_cert`] and [`super::ca_bundle`]. The webhook reloads its files
//! when the kubelet refreshes the Secret volume, so a renewal needs no restart.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{
    admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
    core::v1::Secret,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::sync::watch;

use super::{Published, Settings, ca_bundle, serving_cert};
use crate::{
    ca::{CertifyError, tls::serving_names},
    context::FIELD_MANAGER,
};

/// Both objects are checked at least this often (a deleted Secret or a re-applied
/// configuration with an empty caBundle is repaired within it).
const RESYNC: Duration = Duration::from_secs(60);
/// Longest wait between two attempts after an error.
const MAX_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{action} {what}: {source}")]
    Kube {
        action: &'static str,
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("issuing the webhook's serving certificate: {0}")]
    Issue(#[from] CertifyError),
}

fn kube_err(action: &'static str, what: String) -> impl FnOnce(kube::Error) -> WebhookError {
    move |source| WebhookError::Kube {
        action,
        what,
        source: Box::new(source),
    }
}

/// One pass: the Secret, then the caBundle. Returns when to look again.
pub async fn sync(
    client: &Client,
    settings: &Settings,
    published: &Published,
    now: SystemTime,
) -> Result<Duration, WebhookError> {
    let ns = &settings.namespace;
    let name = &settings.webhook_secret;
    let what = format!("Secret {ns}/{name}");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let names = serving_names(&settings.webhook_service, ns);
    let existing = secrets
        .get_opt(name)
        .await
        .map_err(kube_err("reading", what.clone()))?;
    let data = existing.as_ref().and_then(|s| s.data.as_ref());
    let renew_at = match serving_cert::decide(data, &names, &published.issuer_der, now) {
        serving_cert::Decision::Keep { renew_at } => renew_at,
        serving_cert::Decision::Issue(reason) => {
            let (chain, key, not_after) = published.issuer.serving(&names, now)?;
            secrets
                .patch(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(serving_cert::secret(ns, name, &chain, &key)),
                )
                .await
                .map_err(kube_err("applying", what))?;
            tracing::info!(secret = %format!("{ns}/{name}"), ?reason, ?names, "issued the webhook's serving certificate");
            now + not_after
                .duration_since(now)
                .unwrap_or_default()
                .mul_f64(serving_cert::RENEW_AT)
        }
    };

    let cfg_name = &settings.webhook_configuration;
    fill_ca_bundle::<MutatingWebhookConfiguration>(client, cfg_name, &published.bundle_pem).await?;
    fill_ca_bundle::<ValidatingWebhookConfiguration>(client, cfg_name, &published.bundle_pem)
        .await?;
    Ok(renew_at.duration_since(now).unwrap_or_default().min(RESYNC))
}

/// Sets the caBundle of the webhook configuration `name` of kind `K`, if it exists.
async fn fill_ca_bundle<K>(
    client: &Client,
    name: &str,
    bundle_pem: &str,
) -> Result<(), WebhookError>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
        + ca_bundle::WebhookConfiguration
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let configs: Api<K> = Api::all(client.clone());
    let what = format!("{} {name}", K::kind(&()));
    match configs
        .get_opt(name)
        .await
        .map_err(kube_err("reading", what.clone()))?
    {
        None => tracing::debug!("{what} does not exist (yet); its caBundle is set once it does"),
        Some(cfg) => {
            if let Some(p) = ca_bundle::patch(&cfg, bundle_pem) {
                configs
                    .patch(
                        name,
                        &PatchParams {
                            field_manager: Some(FIELD_MANAGER.to_owned()),
                            ..PatchParams::default()
                        },
                        &Patch::Strategic(p),
                    )
                    .await
                    .map_err(kube_err("patching the caBundle of", what.clone()))?;
                tracing::info!("{what}: caBundle set to the mesh trust bundle");
            }
        }
    }
    Ok(())
}

/// Runs [`sync`] whenever the CA material changes, when a renewal is due and every
/// [`RESYNC`], until `shutdown` resolves; errors are logged and retried with backoff.
pub async fn run(
    client: Client,
    settings: Arc<Settings>,
    mut published: watch::Receiver<Option<Arc<Published>>>,
    shutdown: impl Future<Output = ()> + Clone,
) {
    let mut delay = Duration::from_secs(1);
    loop {
        let current = published.borrow_and_update().clone();
        let wait = match current {
            None => RESYNC,
            Some(p) => match sync(&client, &settings, &p, SystemTime::now()).await {
                Ok(next) => {
                    delay = Duration::from_secs(1);
                    next
                }
                Err(e) => {
                    tracing::warn!("webhook certificate: {e} (retrying in {delay:?})");
                    let d = delay;
                    delay = (delay * 2).min(MAX_RETRY);
                    d
                }
            },
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = published.changed() => if changed.is_err() { return },
            _ = shutdown.clone() => return,
        }
    }
}
