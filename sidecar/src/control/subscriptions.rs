//! The pieces the proxy holds from the operator and the served config built from them:
//! one inbound piece, and outbound pieces keyed by [`Target`], created lazily by the first
//! connection that finds no route ([`Subscriptions::discover`] waits for the first answer,
//! at most the discovery timeout) and dropped when no connection used them for the idle
//! timeout.
//!
//! Version rules: within a piece only strictly newer versions are applied (an older or
//! equal one — a replayed message, another replica behind — is ignored). Every change is
//! re-assembled ([`assemble`](super::assemble)) and validated before it replaces the
//! served config; a piece whose assembly fails is rolled back (counted as an `invalid`
//! config reload) and the last good config keeps serving. The served version is the max
//! of the pieces' versions, so it may *go down* when the subscription holding the max is
//! dropped; the store's "strictly newer" rule of the standalone file therefore does not
//! apply here ([`ConfigStore::install`]): the per-piece rule is what keeps stale data out.
//!
//! Before that, each piece of a message is checked on its own ([`received`]): a service
//! (or its policy) or an inbound piece this proxy cannot use keeps its previous version,
//! is counted in `remora_proxy_config_rejected_total{piece,reason}` and logged once per
//! (name, reason); the rest of the message applies.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use remora_crds::{
    proxy::{InboundConfig, OutboundService, ProxyLocality},
    wire::Received,
};
use tokio::{sync::watch, task::AbortHandle};

use super::{
    assemble::{self, InboundPiece, LocalRules, OutboundPiece},
    received::{self, Rejection},
    target::{Target, Version},
};
use crate::{
    config::{ConfigStore, RejectReason},
    metrics::{Metrics, RejectedLabels, Static},
};

/// Distinct rejections remembered for logging once; past this the memory starts afresh
/// (a reason may then be logged once more).
const MAX_LOGGED_REJECTIONS: usize = 1024;

/// One outbound subscription.
#[derive(Debug)]
struct Subscription {
    piece: Option<OutboundPiece>,
    /// Turns true at the first answer.
    answered: watch::Sender<bool>,
    /// Until when a connection waits for the first answer.
    deadline: Instant,
    /// Milliseconds since [`Subscriptions::epoch`] of the last connection that used it.
    last_used: AtomicU64,
    task: AbortHandle,
}

/// What a message did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Installed (the served config is now at this version).
    Installed(Version),
    /// Older than or equal to the piece held, or for a subscription since dropped.
    Ignored,
    /// The assembly did not validate; the piece was rolled back.
    Rejected(String),
}

/// The pieces and what to do with them.
#[derive(Debug)]
pub struct Subscriptions {
    rules: LocalRules,
    discovery_timeout: Duration,
    store: Arc<ConfigStore>,
    metrics: Arc<Metrics>,
    epoch: Instant,
    inbound: Mutex<Option<InboundPiece>>,
    inbound_received: AtomicBool,
    outbound: RwLock<HashMap<Target, Subscription>>,
    /// Serialises assemble + install, so the last install reflects the latest pieces.
    assembling: Mutex<()>,
    /// (name, reason) of the rejections logged already.
    logged: Mutex<HashSet<(String, String)>>,
}

impl Subscriptions {
    pub fn new(
        rules: LocalRules,
        discovery_timeout: Duration,
        store: Arc<ConfigStore>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            rules,
            discovery_timeout,
            store,
            metrics,
            epoch: Instant::now(),
            inbound: Mutex::new(None),
            inbound_received: AtomicBool::new(false),
            outbound: RwLock::new(HashMap::new()),
            assembling: Mutex::new(()),
            logged: Mutex::new(HashSet::new()),
        }
    }

    /// Counts a rejected piece, and logs it the first time its (name, reason) comes up.
    fn rejected(&self, r: &Rejection) {
        self.metrics
            .config_rejected
            .get_or_create(&RejectedLabels {
                piece: Static(r.part.as_str()),
                reason: Static(r.why.as_str()),
            })
            .inc();
        let first = {
            let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
            if logged.len() >= MAX_LOGGED_REJECTIONS {
                logged.clear();
            }
            logged.insert((r.name.clone(), r.detail.clone()))
        };
        if first {
            tracing::warn!(
                name = %r.name,
                piece = r.part.as_str(),
                reason = r.why.as_str(),
                kept_previous = r.kept_previous,
                "a config piece from the operator is unusable here ({}); {}",
                r.detail,
                if r.kept_previous { "keeping its previous version" } else { "it has no previous version to keep" },
            );
        }
    }

    /// Whether the first inbound piece has been installed.
    pub fn inbound_received(&self) -> bool {
        self.inbound_received.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Assembles the current pieces and installs the result if it validates.
    fn reassemble(&self) -> Result<Version, String> {
        let _serial = self.assembling.lock().unwrap_or_else(|p| p.into_inner());
        let inbound = self
            .inbound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let outbound = self.outbound.read().unwrap_or_else(|p| p.into_inner());
        let pieces: Vec<(Target, &OutboundPiece)> = outbound
            .iter()
            .filter_map(|(t, s)| s.piece.as_ref().map(|p| (*t, p)))
            .collect();
        match assemble::assemble(inbound.as_ref(), pieces.iter().copied(), &self.rules) {
            Ok(config) => {
                let version = Version(config.version);
                self.store.install(config, &self.metrics);
                Ok(version)
            }
            Err(e) => {
                let reason = RejectReason::Invalid(e);
                self.store.reject(&reason, &self.metrics);
                Err(reason.to_string())
            }
        }
    }

    /// The initial config: no pieces, the local rules alone.
    pub fn initial(&self) -> remora_crds::proxy::ProxyConfig {
        remora_crds::proxy::ProxyConfig {
            inbound: assemble::inbound(None, &self.rules.opaque_ports),
            outbound: remora_crds::proxy::OutboundConfig {
                unknown_destinations: self.rules.unknown_destinations,
                services: Vec::new(),
            },
            ..Default::default()
        }
    }

    /// Applies the inbound piece of `pod` at `version` (`None`: the pod is gone), with
    /// the proxy's locality. An unusable piece keeps the previous one; with none yet it
    /// is rejected (the proxy stays unready rather than guess).
    pub fn apply_inbound(
        &self,
        version: Version,
        pod: &str,
        inbound: Option<Received<InboundConfig>>,
        locality: ProxyLocality,
    ) -> Applied {
        let previous = {
            let mut held = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
            if held.as_ref().is_some_and(|p| p.version >= version) {
                return Applied::Ignored;
            }
            let inbound = match inbound {
                None => None,
                Some(r) => {
                    let before = held.as_ref().and_then(|p| p.inbound.as_ref());
                    match received::inbound(pod, r, before) {
                        Ok((config, rejection)) => {
                            if let Some(r) = rejection {
                                self.rejected(&r);
                            }
                            Some(config)
                        }
                        Err(r) => {
                            self.rejected(&r);
                            return Applied::Rejected(format!("{}: {}", r.name, r.detail));
                        }
                    }
                }
            };
            held.replace(InboundPiece {
                version,
                inbound,
                locality,
            })
        };
        match self.reassemble() {
            Ok(v) => {
                self.inbound_received.store(true, Ordering::Release);
                Applied::Installed(v)
            }
            Err(e) => {
                *self.inbound.lock().unwrap_or_else(|p| p.into_inner()) = previous;
                Applied::Rejected(e)
            }
        }
    }

    /// Applies the outbound piece of `target` at `version`.
    /// Each unusable service (or policy) keeps its previous version: from this target's
    /// last piece, else from the config served now.
    pub fn apply_outbound(
        &self,
        target: Target,
        version: Version,
        services: Vec<Received<OutboundService>>,
    ) -> Applied {
        let (previous, rejections) = {
            let mut subs = self.outbound.write().unwrap_or_else(|p| p.into_inner());
            let Some(sub) = subs.get_mut(&target) else {
                return Applied::Ignored;
            };
            if sub.piece.as_ref().is_some_and(|p| p.version >= version) {
                return Applied::Ignored;
            }
            let served = self.store.load();
            let before = sub.piece.as_ref();
            let (services, rejections) = received::services(services, |name| {
                before
                    .and_then(|p| p.services.iter().find(|s| s.name == name))
                    .or_else(|| {
                        served
                            .config
                            .outbound
                            .services
                            .iter()
                            .find(|s| s.name == name)
                    })
            });
            (
                sub.piece.replace(OutboundPiece { version, services }),
                rejections,
            )
        };
        for r in &rejections {
            self.rejected(r);
        }
        let result = match self.reassemble() {
            Ok(v) => Applied::Installed(v),
            Err(e) => {
                let mut subs = self.outbound.write().unwrap_or_else(|p| p.into_inner());
                if let Some(sub) = subs.get_mut(&target) {
                    sub.piece = previous;
                }
                Applied::Rejected(e)
            }
        };
        // Even a rejected answer is an answer: the waiting connection falls back to the
        // unknown-destination rule instead of waiting out the timeout.
        if let Some(sub) = self
            .outbound
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&target)
        {
            sub.answered.send_replace(true);
        }
        result
    }

    /// Marks `target`'s subscription used now (a connection was routed with it).
    pub fn touch(&self, target: Target) {
        if let Some(sub) = self
            .outbound
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&target)
        {
            sub.last_used.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Ensures a subscription for `target` exists (calling `spawn` to start its watch when
    /// it is new) and waits for its first answer until the discovery deadline. Returns
    /// whether an answer is in.
    pub async fn discover(&self, target: Target, spawn: impl FnOnce() -> AbortHandle) -> bool {
        let (mut answered, deadline) = self.waiter(target, spawn);
        if *answered.borrow() {
            return true;
        }
        let wait = answered.wait_for(|a| *a);
        matches!(
            tokio::time::timeout_at(deadline.into(), wait).await,
            Ok(Ok(_))
        )
    }

    /// The first-answer signal and deadline of `target`'s subscription, marked used now;
    /// created (and its watch spawned) if missing. An existing subscription — every
    /// connection to a destination the mesh does not know — costs a read lock only.
    fn waiter(
        &self,
        target: Target,
        spawn: impl FnOnce() -> AbortHandle,
    ) -> (watch::Receiver<bool>, Instant) {
        let now_ms = self.now_ms();
        let found = |s: &Subscription| {
            s.last_used.store(now_ms, Ordering::Relaxed);
            (s.answered.subscribe(), s.deadline)
        };
        if let Some(sub) = self
            .outbound
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&target)
        {
            return found(sub);
        }
        let mut subs = self.outbound.write().unwrap_or_else(|p| p.into_inner());
        if let Some(sub) = subs.get(&target) {
            return found(sub);
        }
        let (answered, rx) = watch::channel(false);
        let deadline = Instant::now() + self.discovery_timeout;
        subs.insert(
            target,
            Subscription {
                piece: None,
                answered,
                deadline,
                last_used: AtomicU64::new(now_ms),
                task: spawn(),
            },
        );
        self.metrics
            .control_subscriptions
            .set(i64::try_from(subs.len()).unwrap_or(i64::MAX));
        (rx, deadline)
    }

    /// Drops the subscriptions no connection used for `idle`, stopping their watches, and
    /// re-assembles without them. Returns the targets dropped.
    pub fn drop_idle(&self, idle: Duration) -> Vec<Target> {
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let now = self.now_ms();
        let dropped: Vec<Target> = {
            let mut subs = self.outbound.write().unwrap_or_else(|p| p.into_inner());
            let stale: Vec<Target> = subs
                .iter()
                .filter(|(_, s)| now.saturating_sub(s.last_used.load(Ordering::Relaxed)) >= idle_ms)
                .map(|(t, _)| *t)
                .collect();
            for t in &stale {
                if let Some(sub) = subs.remove(t) {
                    sub.task.abort();
                }
            }
            self.metrics
                .control_subscriptions
                .set(i64::try_from(subs.len()).unwrap_or(i64::MAX));
            stale
        };
        if !dropped.is_empty()
            && let Err(e) = self.reassemble()
        {
            // Removing pieces cannot make a valid union invalid; logged in case it did.
            tracing::error!(error = %e, "the config without the idle subscriptions does not validate");
        }
        dropped
    }

    /// The targets subscribed now.
    pub fn targets(&self) -> Vec<Target> {
        let mut t: Vec<Target> = self
            .outbound
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        t.sort();
        t
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use remora_crds::proxy::{Endpoint, UnknownDestinations};

    use super::*;

    fn subs(timeout: Duration) -> (Arc<Subscriptions>, Arc<ConfigStore>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let rules = LocalRules {
            unknown_destinations: UnknownDestinations::Deny,
            opaque_ports: "6379".parse().expect("ports"),
        };
        let registry = Arc::new(crate::outbound::endpoint::Registry::new(
            crate::outbound::dial::Dialer::new(
                Arc::new(crate::tls::IdentityStore::default()),
                metrics.clone(),
            ),
            Duration::from_secs(1),
        ));
        let store = Arc::new(ConfigStore::new(Default::default(), &metrics, registry));
        let s = Arc::new(Subscriptions::new(
            rules,
            timeout,
            store.clone(),
            metrics.clone(),
        ));
        store.install(s.initial(), &metrics);
        (s, store, metrics)
    }

    fn target(s: &str) -> Target {
        Target(s.parse().expect("addr"))
    }

    fn service(name: &str, vip: &str, ep: &str) -> OutboundService {
        OutboundService {
            name: name.into(),
            addresses: vec![vip.parse().expect("vip")],
            endpoints: vec![
                serde_json::from_value::<Endpoint>(serde_json::json!({ "address": ep }))
                    .expect("endpoint"),
            ],
            ..Default::default()
        }
    }

    const POD: &str = "shop/web-1";

    fn recv(services: Vec<OutboundService>) -> Vec<Received<OutboundService>> {
        services.into_iter().map(Received::from).collect()
    }

    fn idle_task() -> AbortHandle {
        tokio::spawn(std::future::pending::<()>()).abort_handle()
    }

    #[tokio::test]
    async fn pieces_apply_only_when_newer_and_build_the_served_config() {
        let (s, store, _) = subs(Duration::from_secs(1));
        assert_eq!(
            store.load().config.outbound.unknown_destinations,
            UnknownDestinations::Deny
        );
        assert!(!s.inbound_received());
        assert_eq!(
            s.apply_inbound(
                Version(5),
                POD,
                Some(InboundConfig::default().into()),
                ProxyLocality::default()
            ),
            Applied::Installed(Version(5))
        );
        assert!(s.inbound_received());
        assert_eq!(
            s.apply_inbound(Version(5), POD, None, ProxyLocality::default()),
            Applied::Ignored
        );
        assert_eq!(
            s.apply_inbound(Version(4), POD, None, ProxyLocality::default()),
            Applied::Ignored
        );

        let t = target("10.96.0.1:80");
        assert_eq!(
            s.apply_outbound(t, Version(9), recv(vec![])),
            Applied::Ignored,
            "no subscription"
        );
        let s2 = s.clone();
        let waiting = tokio::spawn(async move { s2.discover(t, idle_task).await });
        while s.targets().is_empty() {
            tokio::task::yield_now().await;
        }
        let svc = service("a.ns", "10.96.0.1:80", "127.0.0.1:8080");
        assert_eq!(
            s.apply_outbound(t, Version(9), recv(vec![svc.clone()])),
            Applied::Installed(Version(9))
        );
        assert!(
            waiting.await.expect("joins"),
            "the first answer wakes the waiter"
        );
        let addr: SocketAddr = "10.96.0.1:80".parse().expect("addr");
        assert!(store.load().routes.lookup(addr).is_some());
        assert_eq!(
            s.apply_outbound(t, Version(8), recv(vec![])),
            Applied::Ignored
        );
        assert!(store.load().routes.lookup(addr).is_some(), "stale ignored");
        assert_eq!(
            store.load().config.inbound.for_port(6379).protocol,
            remora_crds::proxy::Protocol::Opaque
        );
    }

    #[tokio::test]
    async fn an_invalid_piece_is_rolled_back_and_the_last_good_config_serves() {
        let (s, store, metrics) = subs(Duration::from_millis(50));
        let t1 = target("10.96.0.1:80");
        let t2 = target("10.96.0.2:80");
        assert!(!s.discover(t1, idle_task).await, "no answer: timed out");
        s.discover(t2, idle_task).await;
        s.apply_outbound(
            t1,
            Version(3),
            recv(vec![service("a.ns", "10.96.0.1:80", "127.0.0.1:1")]),
        );
        let mut broken = service("b.ns", "10.96.0.2:80", "127.0.0.1:2");
        broken.split = Some(remora_crds::proxy::Split {
            backends: vec![remora_crds::proxy::WeightedBackend {
                service: "nowhere.ns".into(),
                weight: 1,
            }],
            ..Default::default()
        });
        assert!(matches!(
            s.apply_outbound(t2, Version(4), recv(vec![broken])),
            Applied::Rejected(_)
        ));
        assert_eq!(store.load().version(), 3);
        assert!(
            metrics
                .encode()
                .contains(r#"remora_proxy_config_reloads_total{reason="invalid"} 1"#)
        );
        assert!(
            s.discover(t2, idle_task).await,
            "a rejected answer is still an answer"
        );
        assert_eq!(
            s.apply_outbound(
                t2,
                Version(4),
                recv(vec![service("b.ns", "10.96.0.2:80", "127.0.0.1:2")])
            ),
            Applied::Installed(Version(4)),
            "the rolled-back version may come again, valid"
        );
    }

    fn received(services: serde_json::Value) -> Vec<Received<OutboundService>> {
        let line = serde_json::json!({"type": "outbound", "version": 1, "services": services});
        match remora_crds::wire::ReceivedMessage::parse(line.to_string().as_bytes())
            .expect("envelope")
        {
            remora_crds::wire::Message::Outbound { services, .. } => services,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unusable_policy_keeps_the_previous_one_counted_and_logged_once() {
        let (s, store, metrics) = subs(Duration::from_millis(10));
        let t = target("10.96.0.1:80");
        s.discover(t, idle_task).await;
        let piece = |algorithm: &str, ep: &str| {
            received(serde_json::json!([{
                "name": "a.ns", "addresses": ["10.96.0.1:80"],
                "policy": {"loadBalancer": {"algorithm": algorithm}},
                "endpoints": [{"address": ep}]}]))
        };
        assert_eq!(
            s.apply_outbound(t, Version(1), piece("RoundRobin", "127.0.0.1:1")),
            Applied::Installed(Version(1))
        );
        assert_eq!(
            s.apply_outbound(t, Version(2), piece("Maglev", "127.0.0.1:2")),
            Applied::Installed(Version(2)),
            "the rest of the message applies"
        );
        let served = store.load();
        let svc = &served.config.outbound.services[0];
        assert_eq!(
            svc.policy
                .as_ref()
                .and_then(|p| p.load_balancer.as_ref())
                .map(|l| l.algorithm),
            Some(remora_crds::policy::LbAlgorithm::RoundRobin),
            "the previous policy"
        );
        assert_eq!(svc.endpoints[0].address.to_string(), "127.0.0.1:2");
        s.apply_outbound(t, Version(3), piece("Maglev", "127.0.0.1:3"));
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"remora_proxy_config_rejected_total{piece="policy",reason="unparsable"} 2"#
            ),
            "{text}"
        );
        assert_eq!(
            s.logged.lock().expect("lock").len(),
            1,
            "logged once per (service, reason)"
        );
        // The previous policy survives as the new previous one.
        let served = store.load();
        assert!(served.config.outbound.services[0].policy.is_some());
        assert_eq!(served.version(), 3);
    }

    #[tokio::test]
    async fn an_unusable_first_inbound_piece_keeps_the_proxy_unready() {
        let (s, _, metrics) = subs(Duration::from_millis(10));
        let line = br#"{"type":"inbound","version":4,"pod":"shop/web-1","inbound":{"default":{"mtls":"Sometimes"}},"locality":{"zone":"zone-a"}}"#;
        let remora_crds::wire::Message::Inbound {
            version,
            pod,
            inbound,
            locality,
        } = remora_crds::wire::ReceivedMessage::parse(line).expect("envelope")
        else {
            panic!("inbound");
        };
        assert!(matches!(
            s.apply_inbound(Version(version), &pod, inbound, locality.clone()),
            Applied::Rejected(_)
        ));
        assert!(!s.inbound_received());
        assert!(metrics.encode().contains(
            r#"remora_proxy_config_rejected_total{piece="inbound",reason="unparsable"} 1"#
        ));
        assert_eq!(
            s.apply_inbound(
                Version(5),
                &pod,
                Some(InboundConfig::default().into()),
                locality
            ),
            Applied::Installed(Version(5))
        );
        assert!(s.inbound_received());
    }

    #[tokio::test]
    async fn idle_subscriptions_are_dropped_and_the_version_may_go_down() {
        let (s, store, metrics) = subs(Duration::from_millis(10));
        let (t1, t2) = (target("10.96.0.1:80"), target("10.96.0.2:80"));
        let task = tokio::spawn(std::future::pending::<()>());
        let handle = task.abort_handle();
        s.discover(t1, || handle).await;
        s.discover(t2, idle_task).await;
        s.apply_inbound(Version(2), POD, None, ProxyLocality::default());
        s.apply_outbound(
            t1,
            Version(7),
            recv(vec![service("a.ns", "10.96.0.1:80", "127.0.0.1:1")]),
        );
        s.apply_outbound(
            t2,
            Version(5),
            recv(vec![service("b.ns", "10.96.0.2:80", "127.0.0.1:2")]),
        );
        assert_eq!(store.load().version(), 7);
        assert!(
            metrics
                .encode()
                .contains("remora_proxy_control_subscriptions 2")
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        s.touch(t2);
        assert_eq!(s.drop_idle(Duration::from_millis(20)), [t1]);
        assert!(task.await.expect_err("aborted").is_cancelled());
        assert_eq!(store.load().version(), 5, "the max of what is left");
        assert!(
            store
                .load()
                .routes
                .lookup("10.96.0.1:80".parse().expect("a"))
                .is_none()
        );
        assert!(
            metrics
                .encode()
                .contains("remora_proxy_control_subscriptions 1")
        );
        assert_eq!(s.targets(), [t2]);
    }
}
