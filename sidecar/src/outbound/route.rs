//! Outbound routing, compiled once per config version: the original destination (a
//! Service `VIP:port`, or a pod `IP:port` for headless services) names a service; the
//! service's split (if any) picks a backend service per request (header routes first,
//! then weights); the backend's [`EndpointSet`] balances over its routable endpoints.
//!
//! Compiling is where every policy field turns into data-path state, so each field is
//! read here or in [`super::policy`]; the endpoints themselves come from the
//! [`Registry`](super::endpoint::Registry) and outlive the version.
//!
//! Which policy applies where: request-level settings (request timeout, retries, fault
//! injection, mirroring) come from the service the app addressed; endpoint-level settings
//! (balancing, locality, outlier detection, circuit breaking, connect and idle timeouts)
//! come from the backend service the request lands on, and from the addressed service
//! when the backend has no policy of its own. That is how a `MeshPolicy` on `reviews`
//! still governs `reviews-v1` and `reviews-v2` behind a `TrafficSplit`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use http::{HeaderMap, HeaderName, HeaderValue};
use remora_crds::proxy::{Endpoint as EndpointConfig, OutboundConfig, OutboundService, Protocol};

use super::{
    balance::{self, Balancer, Candidate, HasLoad, Load},
    endpoint::{Endpoint, EndpointKey, Generation},
    policy::{HashKey, ServicePolicy},
    service::{ServiceRegistry, ServiceState},
};

/// One routable endpoint of a set: the long-lived endpoint and what this config version
/// says of it.
#[derive(Debug)]
pub struct Member {
    pub ep: Arc<Endpoint>,
    pub weight: u32,
    pub zone: Option<Arc<str>>,
    hash_id: u64,
}

impl HasLoad for Member {
    fn load(&self) -> &Load {
        &self.ep.load
    }
}

impl Candidate for Member {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn hash_id(&self) -> u64 {
        self.hash_id
    }
    fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }
    fn ramp(&self, now: Instant) -> f64 {
        self.ep.health.ramp_factor(now)
    }
}

/// Why a listed endpoint takes no traffic in this version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unroutable {
    NotReady,
    NotServing,
    Terminating,
}

impl Unroutable {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotReady => "not ready",
            Self::NotServing => "not serving",
            Self::Terminating => "terminating",
        }
    }
}

/// The endpoints of one backend service under one policy, and their balancer.
#[derive(Debug)]
pub struct EndpointSet {
    pub service: Arc<str>,
    /// Ready, serving, non-terminating endpoints, in the order the balancer indexes.
    pub members: Vec<Member>,
    /// Listed endpoints that take no traffic, and why (for `/endpoints` and explain).
    pub unroutable: Vec<(Arc<Endpoint>, Option<Arc<str>>, Unroutable)>,
    balancer: Balancer,
    /// The endpoint-level policy in force.
    pub policy: Arc<ServicePolicy>,
    /// Long-lived per-service state: breaker, limits, outlier detector.
    pub state: Arc<ServiceState>,
}

impl EndpointSet {
    /// The endpoint for the next request or connection, skipping ejected endpoints.
    pub fn pick(&self, key: Option<u64>, now: Instant) -> Option<&Member> {
        let i = self
            .balancer
            .pick(&self.members, key, now, |m| m.ep.health.is_available(now))?;
        self.members.get(i)
    }

    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// The consistent-hash key of a request (headers, cookie, source IP), when the
    /// policy hashes.
    pub fn hash_key(&self, headers: Option<&HeaderMap>, client: IpAddr) -> Option<u64> {
        let hash = self.policy.hash.as_ref()?;
        hash.key(headers, client)
    }
}

#[derive(Debug)]
struct HeaderMatch {
    headers: Vec<(HeaderName, HeaderValue)>,
    backend: usize,
}

/// A weighted split over backend sets, with header routes that win over weights.
#[derive(Debug)]
struct SplitRoute {
    backends: Vec<(Arc<EndpointSet>, u64)>,
    total: u64,
    matches: Vec<HeaderMatch>,
    counter: AtomicU64,
}

impl SplitRoute {
    fn pick_backend(&self, headers: Option<&HeaderMap>) -> Option<&Arc<EndpointSet>> {
        if let Some(h) = headers
            && let Some(m) = self
                .matches
                .iter()
                .find(|m| m.headers.iter().all(|(k, v)| h.get(k) == Some(v)))
        {
            return self.backends.get(m.backend).map(|(b, _)| b);
        }
        // Deterministic weighted rotation: over `total` picks each backend gets exactly
        // its weight; cheap and even for small windows.
        let mut n = self.counter.fetch_add(1, Ordering::Relaxed) % self.total.max(1);
        for (b, w) in &self.backends {
            if n < *w {
                return Some(b);
            }
            n -= w;
        }
        None
    }
}

#[derive(Debug)]
enum Backends {
    Endpoints(Arc<EndpointSet>),
    Split(SplitRoute),
}

/// A share of requests copied to another service's endpoints.
#[derive(Debug)]
pub struct MirrorRoute {
    pub set: Arc<EndpointSet>,
    pub percent: u32,
}

/// A service as the outbound side routes to it.
#[derive(Debug)]
pub struct ServiceRoute {
    pub name: Arc<str>,
    pub protocol: Protocol,
    /// The request-level policy in force (timeouts, retries, fault).
    pub policy: Arc<ServicePolicy>,
    /// Long-lived request-level state (the retry budget).
    pub state: Arc<ServiceState>,
    pub mirror: Option<MirrorRoute>,
    backends: Backends,
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service {service} has no ready endpoints")]
pub struct NoEndpoints {
    pub service: Arc<str>,
}

impl ServiceRoute {
    /// The backend set a request goes to; `headers` enable the split's header routes.
    pub fn backend(&self, headers: Option<&HeaderMap>) -> Result<&Arc<EndpointSet>, NoEndpoints> {
        match &self.backends {
            Backends::Endpoints(set) => Some(set),
            Backends::Split(split) => split.pick_backend(headers),
        }
        .ok_or_else(|| NoEndpoints {
            service: self.name.clone(),
        })
    }

    /// Every backend set (for explain).
    pub fn backend_sets(&self) -> Vec<(&Arc<EndpointSet>, Option<u64>)> {
        match &self.backends {
            Backends::Endpoints(set) => vec![(set, None)],
            Backends::Split(split) => split.backends.iter().map(|(s, w)| (s, Some(*w))).collect(),
        }
    }

    /// The backend a header route of the split sends `headers` to, if one matches.
    pub fn header_match(&self, headers: &HeaderMap) -> Option<&Arc<EndpointSet>> {
        let Backends::Split(split) = &self.backends else {
            return None;
        };
        split
            .matches
            .iter()
            .find(|m| m.headers.iter().all(|(k, v)| headers.get(k) == Some(v)))
            .and_then(|m| split.backends.get(m.backend))
            .map(|(b, _)| b)
    }
}

/// Where an original destination leads.
#[derive(Debug, Clone)]
pub enum Target {
    /// A service address: balance over its endpoints.
    Service(Arc<ServiceRoute>),
    /// A known endpoint addressed directly (headless services, pod IPs).
    Endpoint {
        service: Arc<ServiceRoute>,
        set: Arc<EndpointSet>,
        index: usize,
    },
}

impl Target {
    pub fn service(&self) -> &Arc<ServiceRoute> {
        match self {
            Self::Service(s) | Self::Endpoint { service: s, .. } => s,
        }
    }
}

/// The compiled outbound table of one config version.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_addr: HashMap<SocketAddr, Target>,
    sets: Vec<Arc<EndpointSet>>,
}

/// Compiles one config version's outbound side.
struct Compiler<'a, 'g> {
    cfg: &'a OutboundConfig,
    by_name: HashMap<&'a str, &'a OutboundService>,
    own_zone: Option<&'a str>,
    generation: &'a mut Generation<'g>,
    services: &'a ServiceRegistry,
    now: Instant,
    /// Sets by (backend, whose policy), shared by the routes that use them.
    sets: HashMap<(&'a str, &'a str), Arc<EndpointSet>>,
}

impl<'a> Compiler<'a, '_> {
    fn policy_owner(
        &self,
        backend: &'a OutboundService,
        apex: &'a OutboundService,
    ) -> &'a OutboundService {
        if backend.policy.is_some() {
            backend
        } else {
            apex
        }
    }

    fn set(&mut self, backend: &'a OutboundService, apex: &'a OutboundService) -> Arc<EndpointSet> {
        let owner = self.policy_owner(backend, apex);
        let key = (backend.name.as_str(), owner.name.as_str());
        if let Some(s) = self.sets.get(&key) {
            return s.clone();
        }
        let policy = Arc::new(ServicePolicy::compile(owner.policy.as_ref(), self.own_zone));
        let ready = backend
            .endpoints
            .iter()
            .filter(|e| routable(e).is_ok())
            .count();
        let state = self.services.state(
            &format!("{}|{}", key.0, key.1),
            owner.policy.as_ref(),
            ready,
        );
        let mut members = Vec::new();
        let mut unroutable = Vec::new();
        for e in &backend.endpoints {
            let ep = self.endpoint(e, &policy);
            let zone = e.zone.as_deref().map(Arc::from);
            match routable(e) {
                Ok(()) => members.push(Member {
                    hash_id: balance::hash::endpoint_id(e.address),
                    weight: e.weight,
                    zone,
                    ep,
                }),
                Err(why) => unroutable.push((ep, zone, why)),
            }
        }
        let (balancer, fell_back) = Balancer::new_or_fallback(&policy.balance, &members, self.now);
        if let Some(e) = fell_back {
            tracing::warn!(service = %backend.name, error = %e, "consistent hashing off for this service: balancing by least request");
        }
        let set = Arc::new(EndpointSet {
            service: Arc::from(backend.name.as_str()),
            members,
            unroutable,
            balancer,
            policy,
            state,
        });
        self.sets.insert(key, set.clone());
        set
    }

    fn endpoint(&mut self, e: &EndpointConfig, policy: &ServicePolicy) -> Arc<Endpoint> {
        let identity = e
            .meshed
            .then(|| e.identity.as_deref().map(Arc::from))
            .flatten();
        self.generation.endpoint(
            EndpointKey {
                addr: e.address,
                identity,
            },
            policy.connect_timeout,
            policy.idle_timeout,
        )
    }

    fn route(&mut self, svc: &'a OutboundService) -> Option<Arc<ServiceRoute>> {
        let backends = match &svc.split {
            Some(split) => {
                let backends: Vec<(Arc<EndpointSet>, u64)> = split
                    .backends
                    .iter()
                    .filter_map(|b| {
                        let backend = *self.by_name.get(b.service.as_str())?;
                        Some((self.set(backend, svc), u64::from(b.weight)))
                    })
                    .collect();
                let matches = split
                    .matches
                    .iter()
                    .filter_map(|m| {
                        let backend = backends
                            .iter()
                            .position(|(s, _)| *s.service == *m.backend)?;
                        let headers = m
                            .headers
                            .iter()
                            .map(|(k, v)| {
                                Some((
                                    HeaderName::try_from(k.as_str()).ok()?,
                                    HeaderValue::try_from(v.as_str()).ok()?,
                                ))
                            })
                            .collect::<Option<Vec<_>>>()?;
                        Some(HeaderMatch { headers, backend })
                    })
                    .collect();
                let total = backends.iter().map(|(_, w)| w).sum();
                Backends::Split(SplitRoute {
                    backends,
                    total,
                    matches,
                    counter: AtomicU64::new(0),
                })
            }
            None => Backends::Endpoints(self.set(svc, svc)),
        };
        let mirror = svc
            .split
            .as_ref()
            .and_then(|s| s.mirror.as_ref())
            .and_then(|m| {
                let shadow = *self.by_name.get(m.service.as_str())?;
                Some(MirrorRoute {
                    set: self.set(shadow, shadow),
                    percent: m.percent,
                })
            });
        Some(Arc::new(ServiceRoute {
            name: Arc::from(svc.name.as_str()),
            protocol: svc.protocol,
            policy: Arc::new(ServicePolicy::compile(svc.policy.as_ref(), self.own_zone)),
            state: self.services.state(&svc.name, svc.policy.as_ref(), 0),
            mirror,
            backends,
        }))
    }
}

fn routable(e: &EndpointConfig) -> Result<(), Unroutable> {
    if e.terminating {
        Err(Unroutable::Terminating)
    } else if !e.ready {
        Err(Unroutable::NotReady)
    } else if !e.serving {
        Err(Unroutable::NotServing)
    } else {
        Ok(())
    }
}

impl RouteTable {
    /// Compiles a validated outbound config. Endpoints come from `generation` (the caller
    /// commits it), per-service state from `services`.
    pub fn new(
        cfg: &OutboundConfig,
        own_zone: Option<&str>,
        generation: &mut Generation<'_>,
        services: &ServiceRegistry,
    ) -> Self {
        let mut c = Compiler {
            cfg,
            by_name: cfg.services.iter().map(|s| (s.name.as_str(), s)).collect(),
            own_zone,
            generation,
            services,
            now: Instant::now(),
            sets: HashMap::new(),
        };
        let mut by_addr = HashMap::new();
        let mut routes = Vec::with_capacity(c.cfg.services.len());
        for svc in &cfg.services {
            let Some(route) = c.route(svc) else { continue };
            for addr in &svc.addresses {
                by_addr.insert(*addr, Target::Service(route.clone()));
            }
            routes.push((svc, route));
        }
        // Endpoints addressed directly, unless an address is also a service address.
        for (svc, route) in &routes {
            let set = c.set(svc, svc);
            for (index, m) in set.members.iter().enumerate() {
                by_addr
                    .entry(m.ep.addr)
                    .or_insert_with(|| Target::Endpoint {
                        service: route.clone(),
                        set: set.clone(),
                        index,
                    });
            }
        }
        services.retain_used();
        let mut sets: Vec<Arc<EndpointSet>> = c.sets.into_values().collect();
        sets.sort_by(|a, b| a.service.cmp(&b.service));
        Self { by_addr, sets }
    }

    /// The target of an original destination, if the config knows it.
    pub fn lookup(&self, dst: SocketAddr) -> Option<&Target> {
        self.by_addr.get(&dst)
    }

    /// Every endpoint set (for `/endpoints`).
    pub fn endpoint_sets(&self) -> &[Arc<EndpointSet>] {
        &self.sets
    }
}

/// How a request's consistent-hash key is found.
impl HashKey {
    pub fn key(&self, headers: Option<&HeaderMap>, client: IpAddr) -> Option<u64> {
        if let (Some(name), Some(h)) = (&self.header, headers)
            && let Some(k) = balance::hash::header_key(h, name)
        {
            return Some(k);
        }
        if let (Some(cookie), Some(h)) = (&self.cookie, headers)
            && let Some(k) = balance::hash::cookie_key(h, &cookie.name)
        {
            return Some(k);
        }
        self.source_ip.then(|| balance::hash::source_ip_key(client))
    }
}
