//! From the pieces of a message as received to the pieces held (pure).
//!
//! A message from the operator can still be inconsistent with this proxy: an algorithm a
//! newer operator knows and this proxy does not, a value out of range. Such a piece spoils
//! only itself ("keep the previous policy for that service"):
//! - a service whose **policy** does not parse or validate, while the rest of it does, is
//!   taken with its previous policy (none if it had none), so new endpoints still apply;
//! - a service that does not parse or validate beyond its policy keeps its previous
//!   version whole (and is left out when there is none);
//! - an **inbound** piece that does not parse or validate keeps the previous one; with
//!   none yet the proxy stays unready rather than guess a permissive default.
//!
//! Each replacement is a [`Rejection`]; the caller counts and logs them.

use remora_crds::{
    proxy::{InboundConfig, OutboundService},
    wire::Received,
};

/// Which piece was replaced by its previous version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// A service's `policy` (the rest of the service applied).
    Policy,
    /// A whole service.
    Service,
    /// The pod's inbound config.
    Inbound,
}

impl Part {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Service => "service",
            Self::Inbound => "inbound",
        }
    }
}

/// Why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Why {
    /// It is not the shape this proxy knows (serde's error).
    Unparsable,
    /// It parsed but breaks a rule of [`ProxyConfig::validate`](remora_crds::proxy::ProxyConfig::validate).
    Invalid,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unparsable => "unparsable",
            Self::Invalid => "invalid",
        }
    }
}

/// One piece replaced by its previous version (or dropped, with none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The service's name (`<unnamed>` when even that is unreadable), or the pod.
    pub name: String,
    pub part: Part,
    pub why: Why,
    /// The parser's or validator's message.
    pub detail: String,
    /// Whether a previous version took its place (otherwise it was left out).
    pub kept_previous: bool,
}

/// A service as received, before any fallback: parsed whole, parsed without its policy,
/// or not at all.
enum Reading {
    Whole(OutboundService),
    /// Everything but the policy, and why the policy is unusable.
    WithoutPolicy(OutboundService, Why, String),
    Unusable(Option<String>, Why, String),
}

fn read(received: Received<OutboundService>) -> Reading {
    let svc = match received {
        Received::Parsed(svc) => svc,
        Received::Unparsed { mut raw, error } => {
            let name = raw.get("name").and_then(|n| n.as_str()).map(str::to_owned);
            let had_policy = raw
                .as_object_mut()
                .and_then(|o| o.remove("policy"))
                .is_some();
            return match serde::Deserialize::deserialize(&raw) {
                Ok(rest) if had_policy => match rest_is_valid(&rest) {
                    Ok(()) => Reading::WithoutPolicy(rest, Why::Unparsable, error),
                    Err(e) => Reading::Unusable(name, Why::Invalid, e),
                },
                _ => Reading::Unusable(name, Why::Unparsable, error),
            };
        }
    };
    if let Err(e) = svc.validate_policy(&svc.name) {
        let mut rest = svc;
        rest.policy = None;
        return match rest_is_valid(&rest) {
            Ok(()) => Reading::WithoutPolicy(rest, Why::Invalid, e.to_string()),
            Err(e) => Reading::Unusable(Some(rest.name), Why::Invalid, e),
        };
    }
    match rest_is_valid(&svc) {
        Ok(()) => Reading::Whole(svc),
        Err(e) => Reading::Unusable(Some(svc.name), Why::Invalid, e),
    }
}

fn rest_is_valid(svc: &OutboundService) -> Result<(), String> {
    svc.validate(&svc.name).map_err(|e| e.to_string())
}

/// The services of an outbound message to hold, each unusable one replaced by its
/// version from `previous(name)`, and the replacements made.
pub fn services<'a>(
    received: Vec<Received<OutboundService>>,
    previous: impl Fn(&str) -> Option<&'a OutboundService>,
) -> (Vec<OutboundService>, Vec<Rejection>) {
    let mut held = Vec::with_capacity(received.len());
    let mut rejections = Vec::new();
    for piece in received {
        match read(piece) {
            Reading::Whole(svc) => held.push(svc),
            Reading::WithoutPolicy(mut svc, why, detail) => {
                let before = previous(&svc.name);
                svc.policy = before.and_then(|p| p.policy.clone());
                rejections.push(Rejection {
                    name: svc.name.clone(),
                    part: Part::Policy,
                    why,
                    detail,
                    kept_previous: before.is_some_and(|p| p.policy.is_some()),
                });
                held.push(svc);
            }
            Reading::Unusable(name, why, detail) => {
                let before = name.as_deref().and_then(&previous);
                rejections.push(Rejection {
                    name: name.unwrap_or_else(|| "<unnamed>".to_owned()),
                    part: Part::Service,
                    why,
                    detail,
                    kept_previous: before.is_some(),
                });
                held.extend(before.cloned());
            }
        }
    }
    (held, rejections)
}

/// The inbound piece to hold: the received one when usable, else `previous` (`Err` when
/// there is none; the caller then keeps what it has).
pub fn inbound(
    pod: &str,
    received: Received<InboundConfig>,
    previous: Option<&InboundConfig>,
) -> Result<(InboundConfig, Option<Rejection>), Rejection> {
    let (why, detail) = match received {
        Received::Parsed(config) => match config.validate() {
            Ok(()) => return Ok((config, None)),
            Err(e) => (Why::Invalid, e.to_string()),
        },
        Received::Unparsed { error, .. } => (Why::Unparsable, error),
    };
    let rejection = Rejection {
        name: pod.to_owned(),
        part: Part::Inbound,
        why,
        detail,
        kept_previous: previous.is_some(),
    };
    match previous {
        Some(p) => Ok((p.clone(), Some(rejection))),
        None => Err(rejection),
    }
}

#[cfg(test)]
mod tests {
    use remora_crds::{
        policy::LbAlgorithm,
        wire::{Message, ReceivedMessage},
    };

    use super::*;

    fn outbound(json: serde_json::Value) -> Vec<Received<OutboundService>> {
        let line = serde_json::json!({"type": "outbound", "version": 2, "services": json});
        match ReceivedMessage::parse(line.to_string().as_bytes()).expect("envelope") {
            Message::Outbound { services, .. } => services,
            other => panic!("{other:?}"),
        }
    }

    fn service(json: serde_json::Value) -> OutboundService {
        serde_json::from_value(json).expect("service")
    }

    fn algorithm(svc: &OutboundService) -> Option<LbAlgorithm> {
        svc.policy
            .as_ref()
            .and_then(|p| p.load_balancer.as_ref())
            .map(|l| l.algorithm)
    }

    #[test]
    fn an_unknown_algorithm_keeps_the_previous_policy_and_takes_the_new_endpoints() {
        let before = service(serde_json::json!({
            "name": "a.ns", "policy": {"loadBalancer": {"algorithm": "RoundRobin"}},
            "endpoints": [{"address": "10.0.0.1:80"}]}));
        let received = outbound(serde_json::json!([
            {"name": "a.ns", "policy": {"loadBalancer": {"algorithm": "Maglev"}},
             "endpoints": [{"address": "10.0.0.2:80"}]},
            {"name": "b.ns", "policy": {"loadBalancer": {"algorithm": "Random"}}},
        ]));
        let (held, rejected) = services(received, |n| (n == "a.ns").then_some(&before));
        assert_eq!(held.len(), 2, "the rest of the message applies");
        assert_eq!(
            algorithm(&held[0]),
            Some(LbAlgorithm::RoundRobin),
            "previous policy"
        );
        assert_eq!(
            held[0].endpoints[0].address.to_string(),
            "10.0.0.2:80",
            "new endpoints"
        );
        assert_eq!(algorithm(&held[1]), Some(LbAlgorithm::Random));
        assert_eq!(rejected.len(), 1);
        let r = &rejected[0];
        assert_eq!(
            (r.name.as_str(), r.part, r.why),
            ("a.ns", Part::Policy, Why::Unparsable)
        );
        assert!(
            r.detail.contains("unknown variant `Maglev`"),
            "{}",
            r.detail
        );
        assert!(r.kept_previous);
    }

    #[test]
    fn an_invalid_policy_value_is_replaced_too() {
        let received = outbound(serde_json::json!([
            {"name": "a.ns", "policy": {"fault": {"abort": {"httpStatus": 99, "percent": 5}}}},
        ]));
        let (held, rejected) = services(received, |_| None);
        assert_eq!(held[0].name, "a.ns");
        assert_eq!(held[0].policy, None, "no previous policy: none");
        assert_eq!(
            (rejected[0].part, rejected[0].why),
            (Part::Policy, Why::Invalid)
        );
        assert!(
            rejected[0]
                .detail
                .contains("a.ns.policy.fault.abort.httpStatus")
        );
        assert!(!rejected[0].kept_previous);
    }

    #[test]
    fn a_broken_service_keeps_its_previous_version_or_is_left_out() {
        let before = service(serde_json::json!({
            "name": "a.ns", "endpoints": [{"address": "10.0.0.1:80"}]}));
        let received = outbound(serde_json::json!([
            {"name": "a.ns", "endpoints": [{"address": "10.0.0.2:80", "weight": 0}]},
            {"name": "b.ns", "protocol": "quic"},
            {"protocol": "http"},
        ]));
        let (held, rejected) = services(received, |n| (n == "a.ns").then_some(&before));
        assert_eq!(held, vec![before.clone()]);
        let got: Vec<(&str, Part, Why, bool)> = rejected
            .iter()
            .map(|r| (r.name.as_str(), r.part, r.why, r.kept_previous))
            .collect();
        assert_eq!(
            got,
            [
                ("a.ns", Part::Service, Why::Invalid, true),
                ("b.ns", Part::Service, Why::Unparsable, false),
                ("<unnamed>", Part::Service, Why::Unparsable, false),
            ]
        );
        assert!(
            rejected[0].detail.contains("weight"),
            "{}",
            rejected[0].detail
        );
    }

    #[test]
    fn inbound_pieces() {
        let good: InboundConfig =
            serde_json::from_value(serde_json::json!({"default": {"mtls": "Strict"}})).expect("ok");
        let bad = |json| -> Received<InboundConfig> {
            let line = serde_json::json!({"type": "inbound", "version": 1, "inbound": json});
            match ReceivedMessage::parse(line.to_string().as_bytes()).expect("envelope") {
                Message::Inbound {
                    inbound: Some(r), ..
                } => r,
                other => panic!("{other:?}"),
            }
        };
        let (held, none) = inbound("a/b", good.clone().into(), None).expect("usable");
        assert_eq!((held, none), (good.clone(), None));
        let (held, rejection) = inbound(
            "a/b",
            bad(serde_json::json!({"default": {"mtls": "Sometimes"}})),
            Some(&good),
        )
        .expect("the previous one");
        assert_eq!(held, good);
        let rejection = rejection.expect("counted");
        assert_eq!(
            (rejection.part, rejection.why),
            (Part::Inbound, Why::Unparsable)
        );
        let err = inbound(
            "a/b",
            bad(serde_json::json!({"default": {"rateLimit": {"requestsPerSecond": 0}}})),
            None,
        )
        .expect_err("nothing to fall back to");
        assert_eq!(err.why, Why::Invalid);
        assert!(
            err.detail
                .contains("inbound.default.rateLimit.requestsPerSecond")
        );
    }
}
