//! [`ProxyConfig::validate`]: what serde cannot check. Per service
//! ([`OutboundService::validate`], usable on one piece of a stream message alone) and
//! across services (unique names and addresses, split references). Policy values go
//! through the rules the operator applies too ([`crate::check`]).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use super::{
    InboundConfig, InboundPolicy, MAX_WEIGHT, OutboundConfig, OutboundService, ProxyConfig, Split,
};
use crate::check;

/// A config file or message that cannot be used. The path names the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config is not valid YAML for the proxy config model: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

pub(crate) fn invalid(path: impl Into<String>, reason: impl Into<String>) -> ConfigError {
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
        if self
            .locality
            .zone
            .as_deref()
            .is_some_and(|z| z.trim().is_empty())
        {
            return Err(invalid("locality.zone", "must not be empty when set"));
        }
        self.inbound.validate()?;
        self.outbound.validate()
    }
}

impl InboundConfig {
    /// Checks the inbound block alone (field paths start with `inbound.`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_inbound("inbound.default", &self.default)?;
        for (port, policy) in &self.ports {
            let path = format!("inbound.ports.{port}");
            if *port == 0 {
                return Err(invalid(path, "port 0 is not a valid port (1..=65535)"));
            }
            validate_inbound(&path, policy)?;
        }
        Ok(())
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
    if let Some(p) = policy
        .rate_limit
        .as_ref()
        .and_then(|rl| check::rate_limit(rl).into_iter().next())
    {
        return Err(invalid(format!("{path}.{}", p.path), p.reason));
    }
    Ok(())
}

impl OutboundService {
    /// Checks what this service alone must satisfy (everything but the references of its
    /// split to other services): a non-empty name, ports, endpoint identities and
    /// weights, and policy values. `path` prefixes the field names in the error.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(invalid(format!("{path}.name"), "must not be empty"));
        }
        if let Some(addr) = self.addresses.iter().find(|a| a.port() == 0) {
            return Err(invalid(
                format!("{path}.addresses"),
                format!("{addr} has port 0"),
            ));
        }
        for (j, ep) in self.endpoints.iter().enumerate() {
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
            if !(1..=MAX_WEIGHT).contains(&ep.weight) {
                return Err(invalid(
                    format!("{ep_path}.weight"),
                    format!("{} is outside 1..={MAX_WEIGHT}", ep.weight),
                ));
            }
        }
        self.validate_policy(path)
    }

    /// Checks the service's policy values alone (see [`crate::check`]).
    pub fn validate_policy(&self, path: &str) -> Result<(), ConfigError> {
        match self
            .policy
            .as_ref()
            .and_then(|p| check::traffic_policy(p).into_iter().next())
        {
            Some(p) => Err(invalid(format!("{path}.policy.{}", p.path), p.reason)),
            None => Ok(()),
        }
    }
}

impl OutboundConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut owners: HashMap<SocketAddr, &str> = HashMap::new();
        for (i, svc) in self.services.iter().enumerate() {
            let path = format!("outbound.services[{i}]");
            svc.validate(&path)?;
            if !names.insert(svc.name.as_str()) {
                return Err(invalid(
                    format!("{path}.name"),
                    format!("service {:?} is listed twice", svc.name),
                ));
            }
            for addr in &svc.addresses {
                if let Some(other) = owners.insert(*addr, &svc.name) {
                    return Err(invalid(
                        format!("{path}.addresses"),
                        format!("{addr} already belongs to service {other:?}"),
                    ));
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
    use super::*;

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
    fn new_policy_fields_are_checked_with_their_path() {
        rejects(
            "outbound: {services: [{name: a, policy: {fault: {abort: {httpStatus: 99, percent: 5}}}}]}",
            "outbound.services[0].policy.fault.abort.httpStatus: 99 is not an HTTP status",
        );
        rejects(
            "outbound: {services: [{name: a, policy: {fault: {}}}]}",
            "outbound.services[0].policy.fault: needs a delay, an abort or both",
        );
        rejects(
            "outbound: {services: [{name: a, policy: {fault: {delay: {fixed: 10ms, percent: 101}}}}]}",
            "outbound.services[0].policy.fault.delay.percent: is 101, more than 100",
        );
        rejects(
            "outbound: {services: [{name: a, policy: {loadBalancer: {locality: {preferSameZone: true, minHealthyPercent: 120}}}}]}",
            "outbound.services[0].policy.loadBalancer.locality.minHealthyPercent",
        );
        rejects(
            "outbound: {services: [{name: a, policy: {loadBalancer: {algorithm: ConsistentHash, consistentHash: {cookie: {name: sid, path: x}}}}}]}",
            "outbound.services[0].policy.loadBalancer.consistentHash.cookie.path",
        );
        rejects(
            "outbound: {services: [{name: a, policy: {loadBalancer: {algorithm: ConsistentHash}}}]}",
            "ConsistentHash needs loadBalancer.consistentHash",
        );
        rejects(
            "outbound: {services: [{name: a, endpoints: [{address: '10.0.0.1:80', weight: 0}]}]}",
            "outbound.services[0].endpoints[0].weight: 0 is outside 1..=1000000",
        );
        rejects(
            "outbound: {services: [{name: a, endpoints: [{address: '10.0.0.1:80', weight: 1000001}]}]}",
            "outbound.services[0].endpoints[0].weight",
        );
        rejects(
            "inbound: {ports: {\"80\": {rateLimit: {requestsPerSecond: 0}}}}",
            "inbound.ports.80.rateLimit.requestsPerSecond: is 0, less than 1",
        );
        rejects("locality: {zone: ''}", "locality.zone: must not be empty");
        rejects("locality: {region: x}", "unknown field `region`");
    }

    #[test]
    fn new_fields_load_with_their_defaults() {
        let c = ProxyConfig::from_yaml(
            "locality: {zone: zone-a}
inbound: {default: {rateLimit: {requestsPerSecond: 10, perIdentity: true}}}
outbound:
  services:
  - name: a
    policy:
      loadBalancer: {algorithm: Weighted, locality: {preferSameZone: true}}
      fault: {delay: {fixed: 100ms, percent: 10}, abort: {httpStatus: 503, percent: 5}}
    endpoints: [{address: '10.0.0.1:80', weight: 3}, {address: '10.0.0.2:80'}]
",
        )
        .expect("valid");
        assert_eq!(c.locality.zone.as_deref(), Some("zone-a"));
        assert!(
            c.inbound
                .for_port(80)
                .rate_limit
                .is_some_and(|r| r.per_identity)
        );
        let svc = &c.outbound.services[0];
        let weights: Vec<u32> = svc.endpoints.iter().map(|e| e.weight).collect();
        assert_eq!(weights, [3, 1]);
        let policy = svc.policy.as_ref().expect("policy");
        let locality = policy
            .load_balancer
            .as_ref()
            .and_then(|l| l.locality.as_ref())
            .expect("locality");
        assert_eq!(locality.min_healthy_percent, 70);
        assert!(policy.fault.as_ref().is_some_and(|f| f.abort.is_some()));
        // Defaults stay off the wire: a default weight and an unknown zone are not written.
        let json = serde_json::to_value(&c).expect("json");
        assert_eq!(
            json["outbound"]["services"][0]["endpoints"][1].get("weight"),
            None
        );
        assert_eq!(json["outbound"]["services"][0]["endpoints"][0]["weight"], 3);
        let empty = serde_json::to_value(ProxyConfig::default()).expect("json");
        assert_eq!(empty.get("locality"), None);
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
