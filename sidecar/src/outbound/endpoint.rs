//! Long-lived endpoints: one [`Endpoint`] per (address, expected identity), owning what
//! must survive config versions: its connection pools, its load (in-flight requests and
//! latency estimate) and its health (consecutive failures, ejections). The [`Registry`]
//! hands the same `Arc<Endpoint>` to every config version that still lists the endpoint,
//! so a new version (an unrelated service changed, a split weight moved) never resets
//! them; a version that drops an endpoint drops its state with it.
//!
//! Destinations outside the config (the local app behind the inbound side, passthrough
//! destinations) get endpoints too, kept while requests use them and forgotten after a
//! while idle ([`Registry::prune`]), so endpoint churn never grows the maps forever.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use http::uri::Authority;

use super::{
    balance::{HasLoad, Load},
    dial::{DEFAULT_IDLE_TIMEOUT, DialTarget, Dialer},
    outlier::Health,
};
use crate::http::upstream::Pools;

/// `addr` as an HTTP authority (`[v6]:port` for IPv6).
pub fn authority_of(addr: SocketAddr) -> Authority {
    // A socket address always formats as a valid authority.
    match Authority::try_from(addr.to_string()) {
        Ok(a) => a,
        Err(_) => Authority::from_static("invalid.authority"),
    }
}

/// What identifies an endpoint across config versions.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub addr: SocketAddr,
    /// The SPIFFE ID a meshed endpoint must present; `None` for plain endpoints.
    pub identity: Option<Arc<str>>,
}

/// One upstream endpoint and its long-lived state.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `addr` as an HTTP authority, built once.
    pub authority: Authority,
    /// The SPIFFE ID the endpoint must present; `Some` means it is meshed.
    pub identity: Option<Arc<str>>,
    pub load: Load,
    pub health: Health,
    /// Plain and mTLS dial targets, sharing the connect timeout in force.
    plain: Arc<DialTarget>,
    mtls: Option<Arc<DialTarget>>,
    /// Pools, created on first use: `[plain, mtls]`.
    pools: [OnceLock<Pools>; 2],
    /// Seconds since the registry's epoch when a request last used it (ad-hoc endpoints).
    last_used: AtomicU64,
}

impl Endpoint {
    fn new(key: &EndpointKey, connect_timeout: Duration) -> Self {
        Self {
            addr: key.addr,
            authority: authority_of(key.addr),
            identity: key.identity.clone(),
            load: Load::default(),
            health: Health::default(),
            plain: Arc::new(DialTarget::new(key.addr, None, connect_timeout)),
            mtls: key
                .identity
                .clone()
                .map(|id| Arc::new(DialTarget::new(key.addr, Some(id), connect_timeout))),
            pools: [OnceLock::new(), OnceLock::new()],
            last_used: AtomicU64::new(0),
        }
    }

    /// Whether connections to it are mesh mTLS: it is meshed and this proxy has a
    /// workload identity to present.
    pub fn use_mtls(&self, dialer: &Dialer) -> bool {
        self.mtls.is_some() && dialer.has_identity()
    }

    /// How connections to it are dialed (mTLS when `mtls` and the endpoint is meshed).
    pub fn dial_target(&self, mtls: bool) -> &Arc<DialTarget> {
        match (&self.mtls, mtls) {
            (Some(t), true) => t,
            _ => &self.plain,
        }
    }

    /// Applies the connect and pooled-connection idle timeouts of the policy in force.
    pub fn set_timeouts(&self, connect: Duration, idle: Duration) {
        for t in std::iter::once(&self.plain).chain(&self.mtls) {
            t.set_connect_timeout(connect);
            t.set_idle_timeout(idle);
        }
    }

    /// Its HTTP pools (plain or mTLS), created on first use.
    pub fn pools(&self, dialer: &Dialer, mtls: bool) -> &Pools {
        let mtls = mtls && self.mtls.is_some();
        self.pools[usize::from(mtls)]
            .get_or_init(|| Pools::new(dialer.clone(), self.dial_target(mtls).clone()))
    }

    /// Closes idle pooled connections past their idle timeout.
    fn evict_idle(&self) {
        for p in self.pools.iter().filter_map(OnceLock::get) {
            p.evict_idle();
        }
    }
}

impl HasLoad for Endpoint {
    fn load(&self) -> &Load {
        &self.load
    }
}

/// Every endpoint the proxy talks to.
#[derive(Debug)]
pub struct Registry {
    dialer: Dialer,
    default_connect_timeout: Duration,
    /// Endpoints the config lists, replaced as a whole per config version.
    configured: Mutex<HashMap<EndpointKey, Arc<Endpoint>>>,
    /// Endpoints outside the config, by (address, mTLS identity).
    adhoc: ArcSwap<HashMap<EndpointKey, Arc<Endpoint>>>,
    epoch: Instant,
    /// Seconds since `epoch` at the last [`Registry::prune`], stamped on used ad-hoc
    /// endpoints so the per-request path reads an atomic instead of the clock.
    tick: AtomicU64,
}

impl Registry {
    pub fn new(dialer: Dialer, default_connect_timeout: Duration) -> Self {
        Self {
            dialer,
            default_connect_timeout,
            configured: Mutex::default(),
            adhoc: ArcSwap::default(),
            epoch: Instant::now(),
            tick: AtomicU64::new(0),
        }
    }

    /// A registry with no workload identity (plain connections only): for standalone
    /// tools and tests.
    pub fn without_identity(metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        Arc::new(Self::new(
            Dialer::new(Arc::default(), metrics),
            Duration::from_secs(1),
        ))
    }

    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    pub fn default_connect_timeout(&self) -> Duration {
        self.default_connect_timeout
    }

    /// Starts the endpoint set of a new config version; see [`Generation`].
    pub fn generation(&self) -> Generation<'_> {
        Generation {
            previous: self.lock_configured(),
            next: HashMap::new(),
            default_connect_timeout: self.default_connect_timeout,
            committed: false,
        }
    }

    fn lock_configured(&self) -> std::sync::MutexGuard<'_, HashMap<EndpointKey, Arc<Endpoint>>> {
        // Each step under the lock is one whole map operation: consistent after a panic.
        self.configured.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many endpoints the config lists.
    pub fn configured_len(&self) -> usize {
        self.lock_configured().len()
    }

    /// The endpoint of a destination outside the config (inbound app, passthrough).
    pub fn adhoc(&self, addr: SocketAddr) -> Arc<Endpoint> {
        let key = EndpointKey {
            addr,
            identity: None,
        };
        let now = self.tick.load(Ordering::Relaxed);
        let stamp = |ep: &Arc<Endpoint>| {
            // A plain store: the sweep only needs "used since the last sweep".
            if ep.last_used.load(Ordering::Relaxed) != now {
                ep.last_used.store(now, Ordering::Relaxed);
            }
            ep.clone()
        };
        if let Some(ep) = self.adhoc.load().get(&key) {
            return stamp(ep);
        }
        let fresh = Arc::new(Endpoint::new(&key, self.default_connect_timeout));
        fresh.last_used.store(now, Ordering::Relaxed);
        let mut chosen = fresh.clone();
        self.adhoc.rcu(|current| {
            let mut next = HashMap::clone(current);
            chosen = next
                .entry(key.clone())
                .or_insert_with(|| fresh.clone())
                .clone();
            next
        });
        stamp(&chosen)
    }

    /// How many ad-hoc endpoints are kept.
    pub fn adhoc_len(&self) -> usize {
        self.adhoc.load().len()
    }

    /// Closes idle pooled connections everywhere and forgets the ad-hoc endpoints no
    /// request used for `idle` or longer (to within the time between two calls).
    /// Requests in flight hold their own handle and finish. Returns how many.
    pub fn prune(&self, idle: Duration) -> usize {
        let now = self.epoch.elapsed().as_secs();
        self.tick.store(now, Ordering::Relaxed);
        self.lock_configured().values().for_each(|e| e.evict_idle());
        let stale = |e: &Endpoint| {
            now.saturating_sub(e.last_used.load(Ordering::Relaxed)) >= idle.as_secs()
        };
        let adhoc = self.adhoc.load();
        adhoc.values().for_each(|e| e.evict_idle());
        if !adhoc.values().any(|e| stale(e)) {
            return 0;
        }
        let mut removed = 0;
        self.adhoc.rcu(|current| {
            let next: HashMap<_, _> = current
                .iter()
                .filter(|(_, e)| !stale(e))
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect();
            removed = current.len() - next.len();
            next
        });
        removed
    }
}

/// The endpoints of one config version being compiled: endpoints the previous version
/// had keep their state; the ones it no longer lists are dropped when it is committed.
/// It holds the registry's lock, so two config versions never compile at once.
#[derive(Debug)]
pub struct Generation<'a> {
    previous: std::sync::MutexGuard<'a, HashMap<EndpointKey, Arc<Endpoint>>>,
    next: HashMap<EndpointKey, Arc<Endpoint>>,
    default_connect_timeout: Duration,
    committed: bool,
}

impl Generation<'_> {
    /// The endpoint for `key`, the same one as in the previous version if it had it.
    pub fn endpoint(
        &mut self,
        key: EndpointKey,
        connect_timeout: Option<Duration>,
        idle_timeout: Option<Duration>,
    ) -> Arc<Endpoint> {
        let timeout = connect_timeout.unwrap_or(self.default_connect_timeout);
        let idle = idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        if let Some(ep) = self.next.get(&key) {
            return ep.clone();
        }
        let ep = self
            .previous
            .remove(&key)
            .unwrap_or_else(|| Arc::new(Endpoint::new(&key, timeout)));
        ep.set_timeouts(timeout, idle);
        self.next.insert(key, ep.clone());
        ep
    }

    /// Makes this version's endpoints the registry's.
    pub fn commit(mut self) {
        *self.previous = std::mem::take(&mut self.next);
        self.committed = true;
    }
}

impl Drop for Generation<'_> {
    fn drop(&mut self) {
        // Not committed (a compile that bailed out): the previous version's endpoints stay.
        if !self.committed {
            let next = std::mem::take(&mut self.next);
            self.previous.extend(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn registry() -> Registry {
        Registry::new(
            Dialer::new(Arc::default(), Arc::new(Metrics::new())),
            Duration::from_secs(1),
        )
    }

    fn key(addr: &str, id: Option<&str>) -> EndpointKey {
        EndpointKey {
            addr: addr.parse().expect("addr"),
            identity: id.map(Arc::from),
        }
    }

    #[test]
    fn endpoints_that_stay_keep_their_state_and_removed_ones_go() {
        let r = registry();
        let mut g = r.generation();
        let a = g.endpoint(key("10.0.0.1:80", None), None, None);
        let b = g.endpoint(
            key("10.0.0.2:80", Some("spiffe://td/ns/a/sa/b")),
            None,
            None,
        );
        g.commit();
        assert_eq!(r.configured_len(), 2);

        let mut g = r.generation();
        assert_eq!(a.dial_target(false).idle_timeout(), DEFAULT_IDLE_TIMEOUT);
        let a2 = g.endpoint(
            key("10.0.0.1:80", None),
            Some(Duration::from_millis(50)),
            Some(Duration::from_secs(7)),
        );
        g.commit();
        assert!(
            Arc::ptr_eq(&a, &a2),
            "an endpoint that stays is the same one"
        );
        assert_eq!(
            a2.dial_target(false).connect_timeout(),
            Duration::from_millis(50)
        );
        assert_eq!(
            a2.dial_target(false).idle_timeout(),
            Duration::from_secs(7),
            "the policy's timeouts.idle reaches the pools"
        );
        assert_eq!(r.configured_len(), 1, "b is gone");
        drop(b);

        // The same address with another identity is another endpoint.
        let mut g = r.generation();
        let a3 = g.endpoint(
            key("10.0.0.1:80", Some("spiffe://td/ns/a/sa/c")),
            None,
            None,
        );
        g.commit();
        assert!(!Arc::ptr_eq(&a, &a3));
        assert!(a3.dial_target(true).mtls.is_some());
    }

    #[test]
    fn an_abandoned_generation_keeps_the_previous_endpoints() {
        let r = registry();
        let mut g = r.generation();
        let a = g.endpoint(key("10.0.0.1:80", None), None, None);
        g.commit();
        {
            let mut g = r.generation();
            let _ = g.endpoint(key("10.0.0.1:80", None), None, None);
        }
        assert_eq!(r.configured_len(), 1);
        let mut g = r.generation();
        let again = g.endpoint(key("10.0.0.1:80", None), None, None);
        assert!(Arc::ptr_eq(&a, &again));
    }

    #[test]
    fn idle_adhoc_endpoints_are_pruned() {
        let r = registry();
        let a = r.adhoc("10.0.0.1:80".parse().expect("addr"));
        let _ = r.adhoc("10.0.0.2:80".parse().expect("addr"));
        assert!(Arc::ptr_eq(
            &a,
            &r.adhoc("10.0.0.1:80".parse().expect("addr"))
        ));
        assert_eq!(r.adhoc_len(), 2);
        assert_eq!(r.prune(Duration::from_secs(3600)), 0);
        assert_eq!(r.prune(Duration::ZERO), 2);
        assert_eq!(r.adhoc_len(), 0);
    }
}
