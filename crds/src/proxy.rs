//! The derived proxy config: everything one sidecar needs, computed by the operator from
//! cluster state and streamed to the proxy, or loaded from a YAML file in standalone mode
//! (`remora-proxy --config`). Plain serde types; no kube.
//!
//! [`ProxyConfig::from_yaml`] parses *and* validates, so a config that reaches the proxy's
//! data path is coherent: ports in range, unique addresses, splits that name known
//! services with a non-zero total weight, well-formed identities.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::policy::{Authorization, MtlsMode, RateLimit, TrafficPolicy};

/// The largest weight of a split backend (same bound as the `TrafficSplit` CRD).
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
    #[serde(default)]
    pub inbound: InboundConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
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
}

fn yes() -> bool {
    true
}

/// A config file or message that cannot be used. The path names the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config is not valid YAML for the proxy config model: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

fn invalid(path: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Is `id` a SPIFFE ID of the shape the mesh issues (`spiffe://<domain>/<path>`)?
pub fn is_spiffe_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let Some((domain, path)) = rest.split_once('/') else {
        return false;
    };
    !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && !path.is_empty()
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| b.is_ascii_graphic())
        })
}

impl ProxyConfig {
    /// Parse and validate a standalone config file's contents.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_yaml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Check what serde cannot: cross references, ranges and identities.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = self
            .identity
            .as_ref()
            .filter(|id| !is_spiffe_id(&id.spiffe_id))
        {
            return Err(invalid(
                "identity.spiffeId",
                format!(
                    "{:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)",
                    id.spiffe_id
                ),
            ));
        }
        validate_inbound("inbound.default", &self.inbound.default)?;
        for (port, policy) in &self.inbound.ports {
            let path = format!("inbound.ports.{port}");
            if *port == 0 {
                return Err(invalid(path, "port 0 is not a valid port (1..=65535)"));
            }
            validate_inbound(&path, policy)?;
        }
        self.outbound.validate()
    }
}

fn validate_inbound(path: &str, policy: &InboundPolicy) -> Result<(), ConfigError> {
    if let Some(authz) = &policy.authorization {
        for (i, rule) in authz.rules.iter().enumerate() {
            let rule_path = format!("{path}.authorization.rules[{i}]");
            if let Some(from) = &rule.from {
                for id in &from.identities {
                    if id != "*" && !is_spiffe_id(id) {
                        return Err(invalid(
                            format!("{rule_path}.from.identities"),
                            format!("{id:?} is neither a SPIFFE ID nor \"*\""),
                        ));
                    }
                }
            }
            if let Some(to) = &rule.to {
                if to.ports.contains(&0) {
                    return Err(invalid(
                        format!("{rule_path}.to.ports"),
                        "port 0 is not a valid port (1..=65535)",
                    ));
                }
                for p in &to.paths {
                    if !p.starts_with('/') {
                        return Err(invalid(
                            format!("{rule_path}.to.paths"),
                            format!("{p:?} must start with '/'"),
                        ));
                    }
                }
            }
        }
    }
    if policy
        .rate_limit
        .as_ref()
        .is_some_and(|rl| rl.requests_per_second == 0)
    {
        return Err(invalid(
            format!("{path}.rateLimit.requestsPerSecond"),
            "must be at least 1",
        ));
    }
    Ok(())
}

impl OutboundConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut owners: HashMap<SocketAddr, &str> = HashMap::new();
        for (i, svc) in self.services.iter().enumerate() {
            let path = format!("outbound.services[{i}]");
            if svc.name.is_empty() {
                return Err(invalid(format!("{path}.name"), "must not be empty"));
            }
            if !names.insert(svc.name.as_str()) {
                return Err(invalid(
                    format!("{path}.name"),
                    format!("service {:?} is listed twice", svc.name),
                ));
            }
            for addr in &svc.addresses {
                if addr.port() == 0 {
                    return Err(invalid(
                        format!("{path}.addresses"),
                        format!("{addr} has port 0"),
                    ));
                }
                if let Some(other) = owners.insert(*addr, &svc.name) {
                    return Err(invalid(
                        format!("{path}.addresses"),
                        format!("{addr} already belongs to service {other:?}"),
                    ));
                }
            }
            for (j, ep) in svc.endpoints.iter().enumerate() {
                let ep_path = format!("{path}.endpoints[{j}]");
                if ep.address.port() == 0 {
                    return Err(invalid(
                        format!("{ep_path}.address"),
                        format!("{} has port 0", ep.address),
                    ));
                }
                match &ep.identity {
                    Some(id) if !is_spiffe_id(id) => {
                        return Err(invalid(
                            format!("{ep_path}.identity"),
                            format!("{id:?} is not a SPIFFE ID"),
                        ));
                    }
                    None if ep.meshed => {
                        return Err(invalid(
                            format!("{ep_path}.identity"),
                            "a meshed endpoint needs the identity it must present",
                        ));
                    }
                    _ => {}
                }
            }
        }
        for (i, svc) in self.services.iter().enumerate() {
            if let Some(split) = &svc.split {
                validate_split(&format!("outbound.services[{i}].split"), split, &names)?;
            }
        }
        Ok(())
    }
}

fn validate_split(path: &str, split: &Split, services: &HashSet<&str>) -> Result<(), ConfigError> {
    if split.backends.is_empty() {
        return Err(invalid(
            format!("{path}.backends"),
            "a split needs at least one backend",
        ));
    }
    let known = |name: &str, field: String| {
        if services.contains(name) {
            Ok(())
        } else {
            Err(invalid(
                field,
                format!("service {name:?} is not in outbound.services"),
            ))
        }
    };
    let mut total: u64 = 0;
    for (i, b) in split.backends.iter().enumerate() {
        known(&b.service, format!("{path}.backends[{i}].service"))?;
        if b.weight > MAX_WEIGHT {
            return Err(invalid(
                format!("{path}.backends[{i}].weight"),
                format!("{} exceeds the maximum weight {MAX_WEIGHT}", b.weight),
            ));
        }
        total += u64::from(b.weight);
    }
    if total == 0 {
        return Err(invalid(format!("{path}.backends"), "weights are all zero"));
    }
    for (i, m) in split.matches.iter().enumerate() {
        if !split.backends.iter().any(|b| b.service == m.backend) {
            return Err(invalid(
                format!("{path}.matches[{i}].backend"),
                format!("{:?} is not one of the split's backends", m.backend),
            ));
        }
    }
    if let Some(mirror) = &split.mirror {
        known(&mirror.service, format!("{path}.mirror.service"))?;
        if mirror.percent > 100 {
            return Err(invalid(
                format!("{path}.mirror.percent"),
                format!("{} is more than 100", mirror.percent),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::policy::{AuthorizationDefault, LbAlgorithm};

    const SAMPLE: &str = include_str!("../testdata/proxy-config.yaml");

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

    fn rejects(yaml: &str, expected: &str) {
        match ProxyConfig::from_yaml(yaml) {
            Ok(_) => panic!("accepted a bad config; expected an error containing {expected:?}"),
            Err(e) => assert!(
                e.to_string().contains(expected),
                "error {e:?} should mention {expected:?}"
            ),
        }
    }

    #[test]
    fn bad_configs_name_the_field() {
        rejects("versoin: 3", "unknown field `versoin`");
        rejects(
            "inbound: {ports: {\"0\": {protocol: opaque}}}",
            "port 0 is out of range",
        );
        rejects(
            "inbound: {ports: {http: {protocol: opaque}}}",
            "\"http\" is not a port number",
        );
        rejects("inbound: {ports: {\"70000\": {protocol: opaque}}}", "70000");
        rejects(
            "inbound: {default: {protocol: smtp}}",
            "unknown variant `smtp`",
        );
        rejects(
            "outbound: {services: [{name: a}, {name: a}]}",
            "outbound.services[1].name",
        );
        rejects(
            "outbound: {services: [{name: a, addresses: ['10.0.0.1:80']}, {name: b, addresses: ['10.0.0.1:80']}]}",
            "already belongs to service \"a\"",
        );
        rejects(
            "outbound: {services: [{name: a, split: {backends: [{service: nope, weight: 1}]}}]}",
            "outbound.services[0].split.backends[0].service",
        );
        rejects(
            "outbound: {services: [{name: a, split: {backends: [{service: a, weight: 0}]}}]}",
            "weights are all zero",
        );
        rejects(
            "outbound: {services: [{name: a, endpoints: [{address: '10.0.0.1:80', meshed: true}]}]}",
            "needs the identity",
        );
        rejects(
            "outbound: {services: [{name: a, endpoints: [{address: '10.0.0.1:80', identity: 'spiffe://x'}]}]}",
            "not a SPIFFE ID",
        );
        rejects(
            "inbound: {default: {authorization: {rules: [{from: {identities: [bob]}}]}}}",
            "inbound.default.authorization.rules[0].from.identities",
        );
        rejects(
            "outbound: {services: [{name: a, policy: {timeouts: {request: soon}}}]}",
            "invalid duration",
        );
    }

    #[test]
    fn spiffe_ids() {
        assert!(is_spiffe_id("spiffe://cluster.local/ns/a/sa/b"));
        for bad in [
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://Cluster/x",
            "spiffe://a/b//c",
            "https://a/b",
            "spiffe://a/../b",
        ] {
            assert!(!is_spiffe_id(bad), "{bad}");
        }
    }
}
