//! The derived proxy config: everything one sidecar needs, computed by the operator from
//! cluster state and streamed to the proxy, or loaded from a YAML file in standalone mode
//! (`remora-proxy --config`). Plain serde types; no kube.
//!
//! [`ProxyConfig::from_yaml`] parses *and* validates ([`validate`]), so a config that
//! reaches the proxy's data path is coherent: ports in range, unique addresses, splits
//! that name known services with a non-zero total weight, well-formed identities, policy
//! values in range.

mod validate;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

pub use self::validate::{ConfigError, is_spiffe_id};
use crate::policy::{Authorization, MtlsMode, RateLimit, TrafficPolicy};

/// The largest weight of a split backend (same bound as the `TrafficSplit` CRD), and of
/// an endpoint.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// One proxy's whole config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Only grows; a proxy ignores a config older than the one it has.
    #[serde(default)]
    pub version: u64,
    /// Certificate files, in standalone mode only (in Kubernetes the proxy certifies itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityFiles>,
    /// Where this proxy runs (for locality-aware balancing).
    #[serde(default, skip_serializing_if = "ProxyLocality::is_empty")]
    pub locality: ProxyLocality,
    #[serde(default)]
    pub inbound: InboundConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
}

/// Where a proxy runs. In Kubernetes the operator sends it with the pod's inbound piece
/// (from Pod `spec.nodeName` → the Node's `topology.kubernetes.io/zone` label), so the
/// proxy has it before it turns ready; standalone files may set it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyLocality {
    /// The zone of the proxy's node; unknown when absent (locality preference then has
    /// no zone to prefer and balances over every zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

impl ProxyLocality {
    pub fn is_empty(&self) -> bool {
        self.zone.is_none()
    }
}

/// Where a standalone proxy reads its identity from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityFiles {
    pub spiffe_id: String,
    pub cert_chain: PathBuf,
    pub private_key: PathBuf,
    pub trust_bundle: PathBuf,
}

/// How the proxy treats the bytes of a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    /// Plain TCP: no detection, no HTTP features (server-speaks-first protocols).
    Opaque,
    /// Peek at the first bytes and decide (the default).
    #[default]
    Detect,
}

/// The inbound side of a pod: a default and per-port overrides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundConfig {
    #[serde(default = "InboundPolicy::workload_default")]
    pub default: InboundPolicy,
    /// Per target port; unset fields fall back to `default`. Keys may be written as
    /// numbers or as strings (`"9080"`), as YAML and JSON users do.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "port_keyed"
    )]
    pub ports: BTreeMap<u16, InboundPolicy>,
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self {
            default: InboundPolicy::workload_default(),
            ports: BTreeMap::new(),
        }
    }
}

/// Reads a map keyed by port, accepting `9080` and `"9080"` alike, rejecting 0 and
/// anything above 65535 with the offending key in the message.
fn port_keyed<'de, D, V>(de: D) -> Result<BTreeMap<u16, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    struct PortKey(u16);

    impl<'de> Deserialize<'de> for PortKey {
        fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = PortKey;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a port number 1..=65535")
                }
                fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortKey, E> {
                    match u16::try_from(v) {
                        Ok(p) if p != 0 => Ok(PortKey(p)),
                        _ => Err(E::custom(format_args!(
                            "port {v} is out of range 1..=65535"
                        ))),
                    }
                }
                fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortKey, E> {
                    match u64::try_from(v) {
                        Ok(v) => self.visit_u64(v),
                        Err(_) => Err(E::custom(format_args!(
                            "port {v} is out of range 1..=65535"
                        ))),
                    }
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortKey, E> {
                    match v.parse::<u64>() {
                        Ok(n) => self.visit_u64(n),
                        Err(_) => Err(E::custom(format_args!("{v:?} is not a port number"))),
                    }
                }
            }
            de.deserialize_any(Visitor)
        }
    }

    let raw = BTreeMap::<PortKey, V>::deserialize(de)?;
    Ok(raw.into_iter().map(|(k, v)| (k.0, v)).collect())
}

/// Inbound policy of one port (or the default of all ports).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

impl InboundPolicy {
    /// Permissive mTLS, allow all, detect the protocol: what a pod gets with no policy.
    pub fn workload_default() -> Self {
        Self {
            protocol: Some(Protocol::Detect),
            mtls: Some(MtlsMode::Permissive),
            authorization: Some(Authorization::default()),
            rate_limit: None,
        }
    }
}

/// The inbound policy in force on one port, every field resolved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EffectiveInbound<'a> {
    pub protocol: Protocol,
    pub mtls: MtlsMode,
    pub authorization: Option<&'a Authorization>,
    pub rate_limit: Option<&'a RateLimit>,
}

impl InboundConfig {
    /// The policy for `port`: the port's own fields, then the default's, then built-ins.
    pub fn for_port(&self, port: u16) -> EffectiveInbound<'_> {
        let p = self.ports.get(&port);
        let d = &self.default;
        EffectiveInbound {
            protocol: p
                .and_then(|p| p.protocol)
                .or(d.protocol)
                .unwrap_or_default(),
            mtls: p.and_then(|p| p.mtls).or(d.mtls).unwrap_or_default(),
            authorization: p
                .and_then(|p| p.authorization.as_ref())
                .or(d.authorization.as_ref()),
            rate_limit: p
                .and_then(|p| p.rate_limit.as_ref())
                .or(d.rate_limit.as_ref()),
        }
    }
}

/// What the outbound proxy does with a destination the config does not know.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnknownDestinations {
    /// Connect to the original destination, as if there were no proxy.
    #[default]
    Passthrough,
    /// Refuse the connection.
    Deny,
}

/// Outbound destinations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundConfig {
    #[serde(default)]
    pub unknown_destinations: UnknownDestinations,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<OutboundService>,
}

/// A service as the client side sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundService {
    /// `<service>.<namespace>`, unique in the config.
    pub name: String,
    /// The `VIP:port`s (or headless pod `IP:port`s) that mean this service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<SocketAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<TrafficPolicy>,
    /// When present, requests go to the split's backends instead of `endpoints`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
}

/// A traffic split resolved to services of this config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Split {
    pub backends: Vec<WeightedBackend>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HeaderRoute>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

/// A split backend: a service name of this config and its relative weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedBackend {
    pub service: String,
    pub weight: u32,
}

/// Requests carrying all these headers (exact values) go to `backend`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderRoute {
    pub headers: BTreeMap<String, String>,
    pub backend: String,
}

/// A share of requests copied to another service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub service: String,
    pub percent: u32,
}

/// One endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// The SPIFFE ID the endpoint must present; required when `meshed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default = "yes")]
    pub ready: bool,
    #[serde(default = "yes")]
    pub serving: bool,
    #[serde(default)]
    pub terminating: bool,
    /// The endpoint runs a Remora proxy: talk mTLS to it.
    #[serde(default)]
    pub meshed: bool,
    /// Relative weight for the `Weighted` algorithm, 1..=1,000,000 (default 1; from the
    /// pod annotation `config.remora.dev/weight`).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub weight: u32,
}

/// An endpoint's weight when none is given.
pub const DEFAULT_ENDPOINT_WEIGHT: u32 = 1;

fn yes() -> bool {
    true
}

fn one() -> u32 {
    DEFAULT_ENDPOINT_WEIGHT
}

// serde's `skip_serializing_if` hands a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_one(w: &u32) -> bool {
    *w == DEFAULT_ENDPOINT_WEIGHT
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::policy::{AuthorizationDefault, LbAlgorithm};

    const SAMPLE: &str = include_str!("../../testdata/proxy-config.yaml");

    fn sample() -> ProxyConfig {
        match ProxyConfig::from_yaml(SAMPLE) {
            Ok(c) => c,
            Err(e) => panic!("sample config must load: {e}"),
        }
    }

    #[test]
    fn design_sample_loads_with_every_piece() {
        let c = sample();
        assert_eq!(c.version, 42);
        assert_eq!(
            c.identity.as_ref().map(|i| i.spiffe_id.as_str()),
            Some("spiffe://cluster.local/ns/shop/sa/frontend")
        );
        let p9080 = c.inbound.for_port(9080);
        assert_eq!(p9080.protocol, Protocol::Http);
        assert_eq!(p9080.mtls, MtlsMode::Strict);
        assert_eq!(
            p9080.authorization.map(|a| a.default),
            Some(AuthorizationDefault::Deny)
        );
        assert_eq!(p9080.rate_limit.map(|r| r.requests_per_second), Some(100));
        // 6379 overrides only the protocol; the rest comes from the default.
        let p6379 = c.inbound.for_port(6379);
        assert_eq!(p6379.protocol, Protocol::Opaque);
        assert_eq!(p6379.mtls, MtlsMode::Permissive);
        assert_eq!(c.inbound.for_port(1234).protocol, Protocol::Detect);
        let reviews = &c.outbound.services[0];
        assert_eq!(
            reviews.addresses,
            vec!["10.96.0.12:9080".parse::<SocketAddr>().expect("addr")]
        );
        let lb = reviews
            .policy
            .as_ref()
            .and_then(|p| p.load_balancer.as_ref())
            .map(|l| l.algorithm);
        assert_eq!(lb, Some(LbAlgorithm::LeastRequest));
        assert_eq!(reviews.split.as_ref().map(|s| s.backends.len()), Some(2));
        let ep = &c.outbound.services[1].endpoints[0];
        assert!(ep.ready && ep.serving && !ep.terminating && ep.meshed);
        assert_eq!(ep.weight, 1);
        assert_eq!(c.outbound.services[2].endpoints[0].weight, 3);
        assert_eq!(c.locality.zone.as_deref(), Some("zone-a"));
        assert!(p9080.rate_limit.is_some_and(|r| r.per_identity));
        let policy = reviews.policy.as_ref().expect("policy");
        assert_eq!(
            policy
                .fault
                .as_ref()
                .and_then(|f| f.abort.as_ref())
                .map(|a| a.http_status),
            Some(503)
        );
    }

    #[test]
    fn round_trips_through_yaml_and_json() {
        let c = sample();
        let yaml = serde_yaml::to_string(&c).expect("serializes");
        assert_eq!(ProxyConfig::from_yaml(&yaml).expect("reloads"), c);
        let json = serde_json::to_string(&c).expect("serializes");
        assert_eq!(
            serde_json::from_str::<ProxyConfig>(&json).expect("reloads"),
            c
        );
    }

    #[test]
    fn empty_config_means_permissive_passthrough() {
        let c = ProxyConfig::from_yaml("{}").expect("empty is valid");
        assert_eq!(c.version, 0);
        assert_eq!(
            c.outbound.unknown_destinations,
            UnknownDestinations::Passthrough
        );
        let eff = c.inbound.for_port(80);
        assert_eq!(
            (eff.protocol, eff.mtls),
            (Protocol::Detect, MtlsMode::Permissive)
        );
    }
}
