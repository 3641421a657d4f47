//! Kubernetes Events about injection decisions, recorded on the pod's controller (the
//! ReplicaSet, Job, StatefulSet, ...), so `kubectl describe` on the workload says why its
//! pods were or were not meshed. The pod itself does not exist yet at admission time.
//! Best effort: never for dry-run requests, at most one Event per owner and reason per
//! [`DEDUPE_WINDOW`], and a failure to record is logged, never fatal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};

use crate::admission::{Decision, Subject};
use crate::inject::SkipReason;

/// The `source.component` of the Events.
pub const COMPONENT: &str = "remora-webhook";
/// How long an (owner, reason) pair stays quiet after an Event.
pub const DEDUPE_WINDOW: Duration = Duration::from_secs(60);
/// Entries kept for de-duplication before old ones are pruned.
const DEDUPE_CAPACITY: usize = 4096;

/// The Event for a decision about a pod owned by `owner`, if the decision deserves one.
pub fn event_for(
    decision: &Decision,
    namespace: &str,
    pod: &str,
    owner: &OwnerReference,
    now: Time,
) -> Option<Event> {
    let (type_, reason, message) = match decision {
        Decision::Injected { native_sidecar } => (
            "Normal",
            "Injected",
            format!(
                "remora-proxy injected into pod {pod} as a {} sidecar",
                if *native_sidecar { "native" } else { "classic" }
            ),
        ),
        Decision::Skipped(SkipReason::AlreadyInjected | SkipReason::NamespaceNotEnabled) => {
            return None;
        }
        Decision::Skipped(reason) => (
            "Normal",
            "InjectionSkipped",
            format!("pod {pod} not injected: {}", skip_text(*reason)),
        ),
        Decision::Denied(message) => (
            "Warning",
            "InjectionDenied",
            format!("pod {pod}: {message}"),
        ),
        Decision::IgnoredOperation(_) | Decision::Error(_) => return None,
    };
    Some(Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", owner.name)),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some(owner.api_version.clone()),
            kind: Some(owner.kind.clone()),
            name: Some(owner.name.clone()),
            namespace: Some(namespace.to_owned()),
            uid: Some(owner.uid.clone()),
            ..Default::default()
        },
        type_: Some(type_.to_owned()),
        reason: Some(reason.to_owned()),
        message: Some(message),
        action: Some("Inject".to_owned()),
        source: Some(EventSource {
            component: Some(COMPONENT.to_owned()),
            host: None,
        }),
        reporting_component: Some(COMPONENT.to_owned()),
        reporting_instance: std::env::var("HOSTNAME").ok(),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    })
}

fn skip_text(reason: SkipReason) -> &'static str {
    match reason {
        SkipReason::OptedOut => "the pod has the annotation remora.dev/inject: disabled",
        SkipReason::HostNetwork => "the pod uses the host network",
        SkipReason::AlreadyInjected => "the pod already has the proxy",
        SkipReason::NamespaceNotEnabled => {
            "the namespace is not labelled remora.dev/inject=enabled"
        }
    }
}

/// Remembers which (owner, reason) pairs had an Event recently.
#[derive(Debug, Default)]
pub struct Dedupe {
    recent: Mutex<HashMap<(String, &'static str), Instant>>,
}

impl Dedupe {
    /// True the first time a pair is seen within [`DEDUPE_WINDOW`] of `now`.
    pub fn first(&self, owner_uid: &str, reason: &'static str, now: Instant) -> bool {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() >= DEDUPE_CAPACITY {
            recent.retain(|_, at| now.saturating_duration_since(*at) < DEDUPE_WINDOW);
        }
        match recent.get(&(owner_uid.to_owned(), reason)) {
            Some(at) if now.saturating_duration_since(*at) < DEDUPE_WINDOW => false,
            _ => {
                recent.insert((owner_uid.to_owned(), reason), now);
                true
            }
        }
    }
}

/// Records Events through the API server.
#[derive(Clone)]
pub struct EventRecorder {
    client: kube::Client,
    dedupe: Arc<Dedupe>,
}

impl std::fmt::Debug for EventRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRecorder").finish_non_exhaustive()
    }
}

impl EventRecorder {
    /// A recorder using `client`.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            dedupe: Arc::default(),
        }
    }

    /// Records the Event for a decision in the background, if it deserves one.
    pub fn record(&self, decision: &Decision, subject: &Subject) {
        if subject.dry_run {
            return;
        }
        let Some(owner) = &subject.owner else { return };
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let Some(event) = event_for(decision, &subject.namespace, &subject.name, owner, now) else {
            return;
        };
        let reason = match event.reason.as_deref() {
            Some("Injected") => "Injected",
            Some("InjectionSkipped") => "InjectionSkipped",
            _ => "InjectionDenied",
        };
        if !self.dedupe.first(&owner.uid, reason, Instant::now()) {
            return;
        }
        let api: kube::Api<Event> = kube::Api::namespaced(self.client.clone(), &subject.namespace);
        tokio::spawn(async move {
            if let Err(error) = api.create(&kube::api::PostParams::default(), &event).await {
                tracing::debug!(%error, "recording an Event failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: "web-7d9f8c".into(),
            uid: "6c1e3a1c".into(),
            controller: Some(true),
            ..Default::default()
        }
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn events_name_the_owner_and_the_reason() {
        let ev = event_for(
            &Decision::Injected {
                native_sidecar: true,
            },
            "shop",
            "web-7d9f8c-*",
            &owner(),
            now(),
        )
        .expect("event");
        assert_eq!(ev.involved_object.kind.as_deref(), Some("ReplicaSet"));
        assert_eq!(ev.involved_object.uid.as_deref(), Some("6c1e3a1c"));
        assert_eq!(ev.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(ev.reason.as_deref(), Some("Injected"));
        assert_eq!(
            ev.message.as_deref(),
            Some("remora-proxy injected into pod web-7d9f8c-* as a native sidecar")
        );

        let ev = event_for(
            &Decision::Denied("invalid annotation config.remora.dev/log-level".into()),
            "shop",
            "p",
            &owner(),
            now(),
        )
        .expect("event");
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.reason.as_deref(), Some("InjectionDenied"));

        let ev = event_for(
            &Decision::Skipped(SkipReason::HostNetwork),
            "shop",
            "p",
            &owner(),
            now(),
        )
        .expect("event");
        assert_eq!(
            ev.message.as_deref(),
            Some("pod p not injected: the pod uses the host network")
        );
    }

    #[test]
    fn dedupe_window() {
        let d = Dedupe::default();
        let t0 = Instant::now();
        assert!(d.first("uid", "Injected", t0));
        assert!(!d.first("uid", "Injected", t0 + Duration::from_secs(1)));
        assert!(d.first("uid", "InjectionDenied", t0));
        assert!(d.first("other", "Injected", t0));
        assert!(d.first(
            "uid",
            "Injected",
            t0 + DEDUPE_WINDOW + Duration::from_secs(1)
        ));
    }

    #[test]
    fn no_events_for_noise() {
        for d in [
            Decision::Skipped(SkipReason::AlreadyInjected),
            Decision::IgnoredOperation("UPDATE".into()),
            Decision::Error("bad".into()),
        ] {
            assert!(
                event_for(&d, "shop", "p", &owner(), now()).is_none(),
                "{d:?}"
            );
        }
    }
}
