//! The inbound side's admission, in one place for HTTP requests and opaque TCP
//! connections alike: authorization ([`authz`]: who may reach which port, method and
//! path) and the local rate limit ([`rate_limit`]: a token bucket per port, optionally per
//! caller identity). Callers only turn the answer into a 403/429 or a closed connection.
//! [`plaintext`] counts what Permissive ports accept without mTLS.

pub mod authz;
pub mod plaintext;
pub mod rate_limit;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use remora_crds::{policy::RateLimit, proxy::InboundConfig};

use self::{authz::Access, rate_limit::RateLimiter};
use crate::{
    Context,
    addr::{ClientAddr, Direction},
    metrics::{OutcomeLabels, Peer, Static},
};

/// What admission decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    Refused(Refusal),
}

/// Why a request or connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unauthorized: {peer} may not {what} on port {port}")]
    Unauthorized {
        peer: String,
        /// `GET /path`, or `connect` for TCP.
        what: String,
        port: u16,
    },
    #[error("rate limited on port {port}: retry after {retry_after:?}")]
    RateLimited { port: u16, retry_after: Duration },
}

/// Admits (or not) one HTTP request (`http` = method and path) or one TCP connection.
/// Counts and logs every refusal.
pub fn admit(
    ctx: &Context,
    direction: Direction,
    client: ClientAddr,
    port: u16,
    peer: &Peer,
    http: Option<(&str, &str)>,
) -> Admission {
    let snap = ctx.config.load();
    let policy = snap.config.inbound.for_port(port);
    let peer_id = peer.0.as_deref();
    let allowed = authz::allowed(policy.authorization, peer_id, Access { port, http });
    ctx.metrics
        .authz
        .get_or_create(&OutcomeLabels {
            direction,
            outcome: Static(if allowed { "allow" } else { "deny" }),
        })
        .inc();
    if !allowed {
        let peer = peer_id.unwrap_or("an unauthenticated client").to_owned();
        let what = match http {
            Some((method, path)) => format!("{method} {path}"),
            None => "connect".to_owned(),
        };
        ctx.metrics.inbound_refused("unauthorized");
        tracing::info!(%client, %peer, %what, port, "denied by authorization policy");
        return Admission::Refused(Refusal::Unauthorized { peer, what, port });
    }
    if let Some(limiter) = snap.limiters.get(port)
        && let Err(after) = limiter.try_acquire(peer_id, Instant::now())
    {
        ctx.metrics
            .rate_limited
            .get_or_create(&OutcomeLabels {
                direction,
                outcome: Static(if http.is_some() { "http" } else { "tcp" }),
            })
            .inc();
        ctx.metrics.inbound_refused("rate_limited");
        tracing::debug!(%client, port, retry_after = ?after.0, "rate limited");
        return Admission::Refused(Refusal::RateLimited {
            port,
            retry_after: after.0,
        });
    }
    Admission::Admitted
}

/// The rate limiters of one config version, by port. Limiters whose port and settings
/// stay the same are carried over from version to version, buckets and all: a config
/// change elsewhere never refills them.
#[derive(Debug, Default)]
pub struct Limiters {
    by_port: HashMap<u16, Arc<RateLimiter>>,
    default: Option<Arc<RateLimiter>>,
}

impl Limiters {
    /// The limiter in force on `port`, if any.
    pub fn get(&self, port: u16) -> Option<&Arc<RateLimiter>> {
        match self.by_port.get(&port) {
            Some(l) => Some(l),
            None => self.default.as_ref(),
        }
    }
}

/// A limiter's port (`None`: the default's) and settings.
type LimiterKey = (Option<u16>, u32, Option<u32>, bool);

fn key(port: Option<u16>, rl: &RateLimit) -> LimiterKey {
    let RateLimit {
        requests_per_second,
        burst,
        per_identity,
    } = rl;
    (port, *requests_per_second, *burst, *per_identity)
}

/// Keeps the live limiters across config versions.
#[derive(Debug, Default)]
pub struct LimiterRegistry {
    live: Mutex<HashMap<LimiterKey, Arc<RateLimiter>>>,
}

impl LimiterRegistry {
    /// The limiters `cfg` asks for, reusing live ones with the same settings.
    pub fn compile(&self, cfg: &InboundConfig) -> Limiters {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = HashMap::new();
        let now = Instant::now();
        let mut take = |port: Option<u16>, rl: &RateLimit| {
            let key = key(port, rl);
            let limiter = live
                .remove(&key)
                .or_else(|| next.get(&key).cloned())
                .unwrap_or_else(|| Arc::new(RateLimiter::from_policy(rl, now)));
            next.insert(key, limiter.clone());
            limiter
        };
        // The default's limiter is shared by every port without its own: a bucket per port
        // would multiply the limit by the number of ports.
        let default = cfg.default.rate_limit.as_ref().map(|rl| take(None, rl));
        let by_port = cfg
            .ports
            .iter()
            .filter_map(|(port, p)| Some((*port, take(Some(*port), p.rate_limit.as_ref()?))))
            .collect();
        *live = next;
        Limiters { by_port, default }
    }
}

#[cfg(test)]
mod tests {
    use remora_crds::proxy::ProxyConfig;

    use super::*;

    #[test]
    fn limiters_survive_unrelated_config_changes() {
        let registry = LimiterRegistry::default();
        let cfg = |extra: &str| {
            ProxyConfig::from_yaml(&format!(
                "inbound:\n  ports:\n    \"9080\": {{rateLimit: {{requestsPerSecond: 5}}}}\n{extra}"
            ))
            .expect("valid")
            .inbound
        };
        let first = registry.compile(&cfg(""));
        let a = first.get(9080).expect("limited").clone();
        assert!(first.get(80).is_none(), "no default limit");
        let second = registry.compile(&cfg("    \"80\": {protocol: opaque}\n"));
        assert!(Arc::ptr_eq(&a, second.get(9080).expect("limited")));
        let third = registry.compile(&ProxyConfig::default().inbound);
        assert!(third.get(9080).is_none());
    }
}
