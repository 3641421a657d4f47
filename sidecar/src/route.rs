//! Outbound routing: the original destination (a Service `VIP:port`, or a pod `IP:port`
//! for headless services) names a service; the service's split (if any) picks a backend
//! service; the backend's ready endpoints are balanced. Compiled once per config version
//! into lookup tables, so the per-connection and per-request work is a hash lookup and an
//! atomic increment.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue, uri::Authority};
use remora_crds::proxy::{Endpoint, OutboundConfig, OutboundService, Protocol};

/// One endpoint, prepared for the data path.
#[derive(Debug)]
pub struct Ep {
    pub addr: SocketAddr,
    /// `ip:port` as an HTTP authority, built once.
    pub authority: Authority,
    /// The SPIFFE ID the endpoint must present when `meshed`.
    pub identity: Option<Arc<str>>,
    pub meshed: bool,
}

impl Ep {
    fn new(ep: &Endpoint) -> Self {
        Self {
            addr: ep.address,
            authority: authority_of(ep.address),
            identity: ep.identity.as_deref().map(Arc::from),
            meshed: ep.meshed,
        }
    }
}

/// `addr` as an HTTP authority (`[v6]:port` for IPv6).
pub fn authority_of(addr: SocketAddr) -> Authority {
    // A socket address always formats as a valid authority.
    match Authority::try_from(addr.to_string()) {
        Ok(a) => a,
        Err(_) => Authority::from_static("invalid.authority"),
    }
}

/// Chooses one endpoint of a set. The seam for the load-balancing policies (least
/// request, consistent hash, locality) that a later issue brings.
pub trait Balance: Send + Sync + fmt::Debug {
    fn pick<'a>(&self, endpoints: &'a [Arc<Ep>]) -> Option<&'a Arc<Ep>>;
}

/// Round robin over the ready endpoints.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Balance for RoundRobin {
    fn pick<'a>(&self, endpoints: &'a [Arc<Ep>]) -> Option<&'a Arc<Ep>> {
        if endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len();
        endpoints.get(i)
    }
}

/// The ready endpoints of one service and their balancer.
#[derive(Debug)]
pub struct EndpointSet {
    pub service: Arc<str>,
    pub ready: Vec<Arc<Ep>>,
    balancer: Box<dyn Balance>,
}

impl EndpointSet {
    fn new(svc: &OutboundService) -> Self {
        Self {
            service: Arc::from(svc.name.as_str()),
            ready: svc
                .endpoints
                .iter()
                .filter(|e| e.ready && e.serving && !e.terminating)
                .map(|e| Arc::new(Ep::new(e)))
                .collect(),
            balancer: Box::new(RoundRobin::default()),
        }
    }

    pub fn pick(&self) -> Option<&Arc<Ep>> {
        self.balancer.pick(&self.ready)
    }
}

#[derive(Debug)]
struct HeaderMatch {
    headers: Vec<(HeaderName, HeaderValue)>,
    backend: usize,
}

/// A weighted split over backend services, with header routes that win over weights.
#[derive(Debug)]
struct SplitRoute {
    backends: Vec<(Arc<EndpointSet>, u64)>,
    total: u64,
    matches: Vec<HeaderMatch>,
    counter: AtomicU64,
}

impl SplitRoute {
    fn pick_backend(&self, headers: Option<&HeaderMap>) -> Option<&Arc<EndpointSet>> {
        if let Some(h) = headers {
            for m in &self.matches {
                if m.headers.iter().all(|(k, v)| h.get(k) == Some(v)) {
                    return self.backends.get(m.backend).map(|(b, _)| b);
                }
            }
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

/// A service as the outbound side routes to it.
#[derive(Debug)]
pub struct ServiceRoute {
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub request_timeout: Option<Duration>,
    backends: Backends,
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service {service} has no ready endpoints")]
pub struct NoEndpoints {
    pub service: Arc<str>,
}

impl ServiceRoute {
    /// Picks an endpoint; `headers` enable the split's header routes (HTTP only).
    pub fn pick(&self, headers: Option<&HeaderMap>) -> Result<Arc<Ep>, NoEndpoints> {
        let set = match &self.backends {
            Backends::Endpoints(set) => Some(set),
            Backends::Split(split) => split.pick_backend(headers),
        };
        set.and_then(|s| s.pick())
            .cloned()
            .ok_or_else(|| NoEndpoints {
                service: self.name.clone(),
            })
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
        endpoint: Arc<Ep>,
    },
}

impl Target {
    pub fn service(&self) -> &Arc<ServiceRoute> {
        match self {
            Self::Service(s) | Self::Endpoint { service: s, .. } => s,
        }
    }

    /// The endpoint for one connection or request.
    pub fn pick(&self, headers: Option<&HeaderMap>) -> Result<Arc<Ep>, NoEndpoints> {
        match self {
            Self::Service(s) => s.pick(headers),
            Self::Endpoint { endpoint, .. } => Ok(endpoint.clone()),
        }
    }
}

/// The compiled outbound table of one config version.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_addr: HashMap<SocketAddr, Target>,
    sets: Vec<Arc<EndpointSet>>,
    /// The identity every meshed endpoint must present, ready or not.
    meshed: HashMap<SocketAddr, Arc<str>>,
}

impl RouteTable {
    /// Compiles a validated outbound config.
    pub fn new(cfg: &OutboundConfig) -> Self {
        let sets: HashMap<&str, Arc<EndpointSet>> = cfg
            .services
            .iter()
            .map(|s| (s.name.as_str(), Arc::new(EndpointSet::new(s))))
            .collect();
        let mut by_addr = HashMap::new();
        let mut routes = Vec::with_capacity(cfg.services.len());
        for svc in &cfg.services {
            let backends = match &svc.split {
                Some(split) => {
                    let backends: Vec<(Arc<EndpointSet>, u64)> = split
                        .backends
                        .iter()
                        .filter_map(|b| {
                            sets.get(b.service.as_str())
                                .map(|s| (s.clone(), u64::from(b.weight)))
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
                None => match sets.get(svc.name.as_str()) {
                    Some(s) => Backends::Endpoints(s.clone()),
                    None => continue,
                },
            };
            let timeouts = svc.policy.as_ref().and_then(|p| p.timeouts.as_ref());
            let route = Arc::new(ServiceRoute {
                name: Arc::from(svc.name.as_str()),
                protocol: svc.protocol,
                request_timeout: timeouts.and_then(|t| t.request.as_ref()).map(|d| d.get()),
                backends,
            });
            for addr in &svc.addresses {
                by_addr.insert(*addr, Target::Service(route.clone()));
            }
            routes.push(route);
        }
        // Endpoints addressed directly, unless an address is also a service address.
        for route in &routes {
            if let Some(set) = sets.get(&*route.name) {
                for ep in &set.ready {
                    by_addr.entry(ep.addr).or_insert_with(|| Target::Endpoint {
                        service: route.clone(),
                        endpoint: ep.clone(),
                    });
                }
            }
        }
        let meshed = cfg
            .services
            .iter()
            .flat_map(|s| &s.endpoints)
            .filter(|e| e.meshed)
            .filter_map(|e| Some((e.address, Arc::from(e.identity.as_deref()?))))
            .collect();
        Self {
            by_addr,
            sets: sets.into_values().collect(),
            meshed,
        }
    }

    /// The SPIFFE ID a meshed endpoint must present.
    pub fn meshed_identity(&self, addr: SocketAddr) -> Option<Arc<str>> {
        self.meshed.get(&addr).cloned()
    }

    /// The target of an original destination, if the config knows it.
    pub fn lookup(&self, dst: SocketAddr) -> Option<&Target> {
        self.by_addr.get(&dst)
    }

    /// Every service's ready endpoints (for `/endpoints`).
    pub fn endpoint_sets(&self) -> &[Arc<EndpointSet>] {
        &self.sets
    }
}

#[cfg(test)]
mod tests {
    use remora_crds::proxy::ProxyConfig;

    use super::*;

    const CONFIG: &str = r#"
outbound:
  services:
  - name: reviews.shop
    addresses: ["10.96.0.12:9080"]
    split:
      backends: [{service: reviews-v1.shop, weight: 3}, {service: reviews-v2.shop, weight: 1}]
      matches: [{headers: {x-canary: "true"}, backend: reviews-v2.shop}]
  - name: reviews-v1.shop
    endpoints:
    - {address: "10.244.0.7:9080"}
    - {address: "10.244.0.8:9080"}
    - {address: "10.244.0.9:9080", ready: false}
  - name: reviews-v2.shop
    endpoints:
    - {address: "10.244.1.1:9080"}
  - name: db.shop
    addresses: ["10.96.0.20:5432"]
    protocol: opaque
    endpoints: [{address: "10.244.2.1:5432", ready: false}]
"#;

    fn table() -> RouteTable {
        let cfg = ProxyConfig::from_yaml(CONFIG).expect("valid config");
        RouteTable::new(&cfg.outbound)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn round_robin_over_ready_endpoints_only() {
        let set = EndpointSet::new(&OutboundService {
            name: "a".into(),
            endpoints: vec![
                Endpoint {
                    address: addr("10.0.0.1:80"),
                    identity: None,
                    zone: None,
                    ready: true,
                    serving: true,
                    terminating: false,
                    meshed: false,
                },
                Endpoint {
                    address: addr("10.0.0.2:80"),
                    identity: None,
                    zone: None,
                    ready: false,
                    serving: true,
                    terminating: false,
                    meshed: false,
                },
                Endpoint {
                    address: addr("10.0.0.3:80"),
                    identity: None,
                    zone: None,
                    ready: true,
                    serving: true,
                    terminating: true,
                    meshed: false,
                },
                Endpoint {
                    address: addr("10.0.0.4:80"),
                    identity: None,
                    zone: None,
                    ready: true,
                    serving: true,
                    terminating: false,
                    meshed: false,
                },
            ],
            ..Default::default()
        });
        let picks: Vec<SocketAddr> = (0..4).map(|_| set.pick().expect("ready").addr).collect();
        assert_eq!(
            picks,
            vec![
                addr("10.0.0.1:80"),
                addr("10.0.0.4:80"),
                addr("10.0.0.1:80"),
                addr("10.0.0.4:80")
            ]
        );
    }

    #[test]
    fn vip_split_by_weight_and_header() {
        let t = table();
        let target = t.lookup(addr("10.96.0.12:9080")).expect("known VIP");
        assert_eq!(&*target.service().name, "reviews.shop");
        let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..8 {
            *counts
                .entry(target.pick(None).expect("endpoint").addr)
                .or_default() += 1;
        }
        // weights 3:1 over 8 picks → 6 to v1 (spread over two endpoints), 2 to v2.
        assert_eq!(counts.get(&addr("10.244.1.1:9080")), Some(&2));
        assert_eq!(
            counts.get(&addr("10.244.0.7:9080")).copied().unwrap_or(0)
                + counts.get(&addr("10.244.0.8:9080")).copied().unwrap_or(0),
            6
        );
        let mut h = HeaderMap::new();
        h.insert("x-canary", HeaderValue::from_static("true"));
        for _ in 0..4 {
            assert_eq!(
                target.pick(Some(&h)).expect("endpoint").addr,
                addr("10.244.1.1:9080")
            );
        }
    }

    #[test]
    fn pod_ip_routes_to_that_endpoint_and_unknown_is_none() {
        let t = table();
        let target = t.lookup(addr("10.244.0.8:9080")).expect("endpoint address");
        assert_eq!(&*target.service().name, "reviews-v1.shop");
        for _ in 0..3 {
            assert_eq!(
                target.pick(None).expect("endpoint").addr,
                addr("10.244.0.8:9080")
            );
        }
        assert!(
            t.lookup(addr("10.244.0.9:9080")).is_none(),
            "unready endpoints are not routable by address"
        );
        assert!(t.lookup(addr("1.2.3.4:80")).is_none());
    }

    #[test]
    fn no_ready_endpoints_is_an_error_naming_the_service() {
        let t = table();
        let target = t.lookup(addr("10.96.0.20:5432")).expect("known");
        assert_eq!(target.service().protocol, Protocol::Opaque);
        let err = target.pick(None).expect_err("no endpoints");
        assert_eq!(err.to_string(), "service db.shop has no ready endpoints");
    }
}
