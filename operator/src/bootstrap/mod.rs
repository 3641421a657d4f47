//! What `kubectl apply -k config/default` needs besides the controllers, published by the
//! leader from the CA's current material (see [`crate::ca::server::run`]):
//!
//! - [`trust_bundle`]: ConfigMap `remora-trust-bundle` (`ca.crt`) in every namespace
//!   labelled `remora.dev/inject=enabled`, which the injector mounts into meshed pods;
//! - [`webhook`]: the injector's serving certificate (Secret `remora-webhook-tls`,
//!   decided in [`serving_cert`]) and the `caBundle` of its
//!   MutatingWebhookConfiguration ([`ca_bundle`]); off with
//!   `--manage-webhook-certificate=false` (cert-manager does it instead).

pub mod ca_bundle;
pub mod serving_cert;
pub mod trust_bundle;
pub mod webhook;

use std::{future::Future, sync::Arc, time::SystemTime};

use futures::FutureExt;
use kube::Client;
use tokio::sync::watch;

use crate::ca::{CaMaterial, Issuer, TrustDomain, issuer::IssuerError};

/// The names and switches of what is published (from the flags).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The operator's (and the webhook's) namespace.
    pub namespace: String,
    pub trust_domain: String,
    pub trust_bundle_configmap: String,
    pub manage_webhook_certificate: bool,
    pub webhook_service: String,
    pub webhook_secret: String,
    pub webhook_configuration: String,
}

impl Settings {
    pub fn from_args(args: &crate::Args) -> Self {
        Self {
            namespace: args.pod_namespace.clone(),
            trust_domain: args.trust_domain.clone(),
            trust_bundle_configmap: args.trust_bundle_configmap.clone(),
            manage_webhook_certificate: args.manage_webhook_certificate,
            webhook_service: args.webhook_service.clone(),
            webhook_secret: args.webhook_secret.clone(),
            webhook_configuration: args.webhook_configuration.clone(),
        }
    }
}

/// What is published from one version of the CA Secret.
#[derive(Debug)]
pub struct Published {
    /// Every trusted root, PEM, as the CA hands it out.
    pub bundle_pem: String,
    /// The mesh issuer, issuing [`serving_cert::LIFETIME`]-long certificates.
    pub issuer: Issuer,
    /// The issuer's certificate, DER (to tell whether a certificate is its own).
    pub issuer_der: Vec<u8>,
}

impl Published {
    pub fn new(
        material: &CaMaterial,
        trust_domain: TrustDomain,
        now: SystemTime,
    ) -> Result<Self, IssuerError> {
        let issuer = Issuer::new(material, trust_domain, serving_cert::LIFETIME, now)?;
        let issuer_der = x509_parser::pem::Pem::iter_from_buffer(material.cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .map(|p| p.contents)
            .ok_or(IssuerError::Empty("tls.crt"))?;
        Ok(Self {
            bundle_pem: issuer.trust_bundle_pem().to_owned(),
            issuer,
            issuer_der,
        })
    }
}

/// Publishes until `shutdown` resolves; the caller runs it only while leading.
pub async fn run(
    client: Client,
    settings: Settings,
    mut material: watch::Receiver<Option<CaMaterial>>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let trust_domain = match TrustDomain::new(&settings.trust_domain) {
        Ok(td) => td,
        Err(e) => {
            tracing::error!("not publishing the trust bundle: {e}");
            return;
        }
    };
    let shutdown = shutdown.shared();
    let (tx, rx) = watch::channel::<Option<Arc<Published>>>(None);
    let derive = {
        let shutdown = shutdown.clone();
        async move {
            loop {
                let current = material.borrow_and_update().clone();
                if let Some(m) = current {
                    match Published::new(&m, trust_domain.clone(), SystemTime::now()) {
                        Ok(p) => {
                            tx.send_replace(Some(Arc::new(p)));
                        }
                        Err(e) => tracing::error!("not publishing this CA material: {e}"),
                    }
                }
                tokio::select! {
                    changed = material.changed() => if changed.is_err() { return },
                    _ = shutdown.clone() => return,
                }
            }
        }
    };
    let settings = Arc::new(settings);
    let bundles = trust_bundle::run(
        client.clone(),
        settings.trust_bundle_configmap.clone(),
        rx.clone(),
        shutdown.clone(),
    );
    let webhook = async {
        if settings.manage_webhook_certificate {
            webhook::run(client, settings.clone(), rx, shutdown).await;
        }
    };
    futures::join!(derive, bundles, webhook);
}
