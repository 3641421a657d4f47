//! The reconcile loop shared by the `MeshPolicy` and `TrafficSplit` controllers: read the
//! resource's siblings and the Services it names, compute its conditions (pure, in
//! [`crate::conditions`]), and when they changed publish an Event and apply the status.
//!
//! Each kind plugs in through [`PolicyKind`]; the kube-runtime [`Controller`] is also
//! triggered by Services (a referenced Service appears or disappears) and by siblings (a
//! resource claiming the same target comes, goes or moves, so a `Conflicted` loser can
//! become the winner).

pub mod mesh_policy;
pub mod traffic_split;

use std::{fmt::Debug, future::Future, sync::Arc, time::Duration, time::Instant};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::Service, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use remora_crds::{PolicyStatus, status::CONDITION_ACCEPTED};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    conditions::{self, REASON_CONFLICTED, Verdicts},
    context::Context,
    status,
    validate::{ServiceInfo, Services},
};

/// How often a resource is reconciled again without any trigger (missed-event insurance).
pub const RESYNC: Duration = Duration::from_secs(600);

/// What one resource kind supplies to the shared loop.
pub trait PolicyKind:
    Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + Debug
    + Send
    + Sync
    + 'static
{
    /// The kind, for metrics, logs and Events.
    const KIND: &'static str;
    /// The current status, if any.
    fn policy_status(&self) -> Option<&PolicyStatus>;
    /// Names of the Services (in the same namespace) the resource refers to.
    fn referenced_services(&self) -> Vec<String>;
    /// Conditions, from the kind's siblings in the namespace and its Services.
    fn verdicts(&self, siblings: &[Self], services: &Services) -> Verdicts;
    /// Do `self` and `other` claim the same target?
    fn same_target(&self, other: &Self) -> bool;
}

/// Why a reconciliation failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {name} has no namespace")]
    NoNamespace { kind: &'static str, name: String },
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// A short class for the errors metric.
    pub fn class(&self) -> &'static str {
        match self {
            Self::NoNamespace { .. } => "no_namespace",
            Self::Kube { .. } => "kube",
        }
    }
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

fn key<K: PolicyKind>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::KIND,
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Reconciles one resource; see the module doc.
pub async fn reconcile<K: PolicyKind>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&*obj, &ctx).await;
    ctx.metrics.reconciled(K::KIND, started.elapsed());
    match &result {
        Ok(_) => ctx.reset_backoff(&key(&*obj)),
        Err(e) => ctx.metrics.failed(K::KIND, e.class()),
    }
    result
}

async fn reconcile_inner<K: PolicyKind>(obj: &K, ctx: &Context) -> Result<Action, Error> {
    let name = obj.name_any();
    let ns = obj.namespace().ok_or_else(|| Error::NoNamespace {
        kind: K::KIND,
        name: name.clone(),
    })?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let siblings = api
        .list(&ListParams::default())
        .await
        .map_err(kube_err(format!("listing {} in namespace {ns}", K::KIND)))?
        .items;
    // The listed copy is at least as fresh as the cached trigger.
    let current = siblings
        .iter()
        .find(|s| s.uid() == obj.uid())
        .unwrap_or(obj);

    let svc_api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let mut services = Services::new();
    for svc_name in current.referenced_services() {
        if services.contains_key(&svc_name) {
            continue;
        }
        if let Some(svc) = svc_api
            .get_opt(&svc_name)
            .await
            .map_err(kube_err(format!("reading Service {ns}/{svc_name}")))?
        {
            services.insert(svc_name, ServiceInfo::from_service(&svc));
        }
    }

    let verdicts = current.verdicts(&siblings, &services);
    let previous = current.policy_status();
    let now = Time(Timestamp::now());
    let next = conditions::status(&verdicts, current.meta().generation, previous, &now);
    if previous == Some(&next) {
        return Ok(Action::requeue(RESYNC));
    }

    let spec = verdicts.event();
    tracing::info!(
        kind = K::KIND,
        namespace = %ns,
        name = %name,
        accepted = verdicts.accepted.reason,
        resolved_refs = verdicts.resolved_refs.reason,
        "status changed"
    );
    let event = Event {
        type_: if spec.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: spec.reason.to_owned(),
        note: Some(spec.note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    // An Event is a courtesy: failing to publish it must not keep the status stale.
    if let Err(e) = ctx.recorder.publish(&event, &current.object_ref(&())).await {
        tracing::warn!(kind = K::KIND, namespace = %ns, name = %name, "publishing an Event failed: {e}");
        ctx.metrics.failed(K::KIND, "event");
    }
    status::apply(&api, current, &next)
        .await
        .map_err(kube_err(format!(
            "applying the status of {} {ns}/{name}",
            K::KIND
        )))?;
    ctx.metrics.status_written(K::KIND);
    Ok(Action::requeue(RESYNC))
}

/// Retries a failed reconciliation with per-object exponential backoff.
pub fn error_policy<K: PolicyKind>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.next_backoff(&key(&*obj));
    tracing::warn!(kind = K::KIND, object = %key(&*obj), retry_in = ?delay, "reconcile failed: {err}");
    Action::requeue(delay)
}

fn is_conflicted<K: PolicyKind>(obj: &K) -> bool {
    obj.policy_status()
        .and_then(|s| s.condition(CONDITION_ACCEPTED))
        .is_some_and(|c| c.reason == REASON_CONFLICTED)
}

/// Resources of the store that must be reconciled when `changed` (a sibling) changes:
/// those claiming the same target, and every `Conflicted` one of its namespace (its old
/// target is unknown once it moved or was deleted).
pub fn siblings_to_requeue<K: PolicyKind>(store: &Store<K>, changed: &K) -> Vec<ObjectRef<K>> {
    let ns = changed.namespace();
    let name = changed.name_any();
    store
        .state()
        .iter()
        .filter(|o| o.namespace() == ns && o.name_any() != name)
        .filter(|o| o.same_target(changed) || is_conflicted(&***o))
        .map(|o| ObjectRef::from_obj(&**o))
        .collect()
}

/// Resources of the store that name `svc`.
pub fn referring_to<K: PolicyKind>(store: &Store<K>, svc: &Service) -> Vec<ObjectRef<K>> {
    let ns = svc.namespace();
    let name = svc.name_any();
    store
        .state()
        .iter()
        .filter(|o| o.namespace() == ns && o.referenced_services().contains(&name))
        .map(|o| ObjectRef::from_obj(&**o))
        .collect()
}

/// Builds the controller for `K` (watching all namespaces), returns its cache and the
/// future that runs it until `shutdown` resolves.
pub fn controller<K: PolicyKind>(
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> (Store<K>, impl Future<Output = ()> + Send) {
    let api: Api<K> = Api::all(ctx.client.clone());
    let ctrl = Controller::new(api.clone(), watcher::Config::default());
    let store = ctrl.store();
    let for_services = store.clone();
    let for_siblings = store.clone();
    let run = ctrl
        .watches(
            Api::<Service>::all(ctx.client.clone()),
            watcher::Config::default(),
            move |svc| referring_to(&for_services, &svc),
        )
        .watches(api, watcher::Config::default(), move |changed: K| {
            siblings_to_requeue(&for_siblings, &changed)
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<K>, error_policy::<K>, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(kind = K::KIND, object = %obj, "reconciled"),
                Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
                    tracing::debug!(kind = K::KIND, object = %obj, "gone before reconcile")
                }
                // Already logged (with its retry delay) by `error_policy`.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                // Watch failures are retried with backoff by kube-runtime.
                Err(e) => tracing::warn!(kind = K::KIND, "controller: {e}"),
            }
        });
    (store, run)
}
