//! The trust bundle ConfigMap (`remora-trust-bundle`, key `ca.crt`) in every namespace
//! labelled `remora.dev/inject=enabled`: the injector mounts it into every meshed pod so
//! the proxy can verify the CA before it has a certificate (as Istio's
//! `istio-ca-root-cert`). A kube-runtime controller over the labelled namespaces applies it
//! (server-side apply, field manager `remora-operator`) when a namespace gets the label,
//! when the ConfigMap is changed or deleted, and in every namespace when the bundle changes.
//!
//! A namespace that loses the label keeps its ConfigMap: its running pods still mount it,
//! and deleting it would break their restarts and volume refreshes. Nothing here deletes.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{Controller, controller::Action, reflector::ObjectRef, watcher},
};
use tokio::sync::watch;

use super::Published;
use crate::context::FIELD_MANAGER;

/// The namespace label that turns injection on (the webhook's namespaceSelector).
pub const INJECT_LABEL: &str = "remora.dev/inject";
/// Its value.
pub const INJECT_ENABLED: &str = "enabled";
/// The ConfigMap key the injector mounts.
pub const BUNDLE_KEY: &str = "ca.crt";

/// Safety net on top of the watches: each namespace is re-applied this often.
const RESYNC: Duration = Duration::from_secs(600);
/// Retry delay while the CA has not loaded its Secret yet, or after a failed apply.
const RETRY: Duration = Duration::from_secs(2);

/// The label selector of meshed namespaces.
pub fn selector() -> String {
    format!("{INJECT_LABEL}={INJECT_ENABLED}")
}

/// Whether `ns` is meshed and not being deleted (a terminating namespace refuses new
/// objects).
pub fn wants_bundle(ns: &Namespace) -> bool {
    let labelled = ns.labels().get(INJECT_LABEL).map(String::as_str) == Some(INJECT_ENABLED);
    let terminating = ns
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Terminating")
        || ns.metadata.deletion_timestamp.is_some();
    labelled && !terminating
}

/// The server-side apply body of ConfigMap `namespace/name` holding `bundle_pem`.
pub fn config_map(namespace: &str, name: &str, bundle_pem: &str) -> serde_json::Value {
    let labels = BTreeMap::from([
        ("app.kubernetes.io/managed-by", "remora-operator"),
        ("app.kubernetes.io/part-of", "remora"),
    ]);
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "data": {BUNDLE_KEY: bundle_pem},
    })
}

struct Ctx {
    client: Client,
    name: String,
    published: watch::Receiver<Option<Arc<Published>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("applying ConfigMap {namespace}/{name}: {source}")]
struct ApplyError {
    namespace: String,
    name: String,
    #[source]
    source: kube::Error,
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action, ApplyError> {
    if !wants_bundle(&ns) {
        return Ok(Action::await_change());
    }
    let bundle = match ctx.published.borrow().as_ref() {
        Some(p) => p.bundle_pem.clone(),
        // The CA has not loaded its Secret yet; the first bundle triggers every namespace.
        None => return Ok(Action::requeue(RETRY)),
    };
    let namespace = ns.name_any();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    api.patch(
        &ctx.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(config_map(&namespace, &ctx.name, &bundle)),
    )
    .await
    .map_err(|source| ApplyError {
        namespace: namespace.clone(),
        name: ctx.name.clone(),
        source,
    })?;
    tracing::debug!(%namespace, name = %ctx.name, "trust bundle published");
    Ok(Action::requeue(RESYNC))
}

fn error_policy(_ns: Arc<Namespace>, err: &ApplyError, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!("{err} (retrying in {RETRY:?})");
    Action::requeue(RETRY)
}

/// Publishes ConfigMap `name` until `shutdown` resolves (the leader only).
pub async fn run(
    client: Client,
    name: String,
    published: watch::Receiver<Option<Arc<Published>>>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let changes = futures::stream::unfold(published.clone(), |mut rx| async move {
        rx.changed().await.ok().map(|()| ((), rx))
    });
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let config_maps: Api<ConfigMap> = Api::all(client.clone());
    let by_name = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let ctx = Arc::new(Ctx {
        client,
        name,
        published,
    });
    Controller::new(namespaces, watcher::Config::default().labels(&selector()))
        .watches(config_maps, by_name, |cm: ConfigMap| {
            cm.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns))
        })
        .reconcile_all_on(changes)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok(_)
                | Err(kube::runtime::controller::Error::ObjectNotFound(_))
                | Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(e) => tracing::warn!("trust bundle publisher: {e}"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::NamespaceStatus;
    use kube::api::ObjectMeta;

    use super::*;

    fn ns(labels: &[(&str, &str)], phase: Option<&str>) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some("shop".to_owned()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            status: phase.map(|p| NamespaceStatus {
                phase: Some(p.to_owned()),
                ..NamespaceStatus::default()
            }),
            ..Namespace::default()
        }
    }

    #[test]
    fn only_labelled_live_namespaces_get_the_bundle() {
        assert!(wants_bundle(&ns(
            &[(INJECT_LABEL, "enabled")],
            Some("Active")
        )));
        assert!(!wants_bundle(&ns(&[(INJECT_LABEL, "disabled")], None)));
        assert!(!wants_bundle(&ns(&[("other", "enabled")], None)));
        assert!(!wants_bundle(&ns(
            &[(INJECT_LABEL, "enabled")],
            Some("Terminating")
        )));
        assert_eq!(selector(), "remora.dev/inject=enabled");
    }

    #[test]
    fn the_config_map_carries_the_bundle_under_ca_crt() {
        let cm = config_map("shop", "remora-trust-bundle", "PEM");
        assert_eq!(
            cm,
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": "remora-trust-bundle",
                    "namespace": "shop",
                    "labels": {
                        "app.kubernetes.io/managed-by": "remora-operator",
                        "app.kubernetes.io/part-of": "remora",
                    },
                },
                "data": {"ca.crt": "PEM"},
            })
        );
        let parsed: ConfigMap = serde_json::from_value(cm).expect("a valid ConfigMap");
        assert_eq!(
            parsed
                .data
                .and_then(|d| d.get("ca.crt").cloned())
                .as_deref(),
            Some("PEM")
        );
    }
}
