//! Assembly of the served config from the stream's pieces (pure): the inbound piece of
//! this pod, the outbound pieces of every live subscription, and the proxy's local rules.
//!
//! - **Outbound services** are the union of the subscriptions' `services`. A service that
//!   several pieces carry (a split backend shared by two destinations) is taken from the
//!   newest piece; ties go to the lowest target, so the result does not depend on map
//!   order. An address claimed by a service of a newer piece is removed from an older
//!   piece's service (a VIP that moved between Services), so two pieces that were each
//!   valid when sent can never make the union invalid.
//! - **Inbound** is the operator's piece (`null` or not yet received → the workload
//!   default). The local opaque ports (`REMORA_PROXY_OPAQUE_PORTS`, from the pod's
//!   `config.remora.dev/opaque-ports` annotation) get `protocol: opaque` **unless the
//!   operator's piece sets a protocol for that port**: the operator reads the same
//!   annotation plus the Services' `appProtocol`, so where it has an opinion it is the
//!   better informed; where it has none (an older operator, a piece not yet received) the
//!   local list keeps server-speaks-first protocols from stalling in detection.
//! - **`unknownDestinations`** comes from the proxy's flag (the operator's pieces do not
//!   carry it).
//! - **Locality** (the proxy's zone) comes with the inbound piece (unknown before it).
//! - **Version** is the largest version among the pieces (0 with none).
//!
//! The result is validated ([`ProxyConfig::validate`]) before it is returned.

use std::collections::HashSet;

use remora_crds::proxy::{
    ConfigError, InboundConfig, OutboundConfig, OutboundService, Protocol, ProxyConfig,
    ProxyLocality, UnknownDestinations,
};

use super::{
    ports::PortSet,
    target::{Target, Version},
};

/// The inbound piece as last received.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InboundPiece {
    pub version: Version,
    /// `None` when the operator says the pod is gone.
    pub inbound: Option<InboundConfig>,
    /// Where the pod runs, sent beside the inbound config.
    pub locality: ProxyLocality,
}

/// One outbound subscription's piece as last received.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboundPiece {
    pub version: Version,
    pub services: Vec<OutboundService>,
}

/// What the proxy decides locally, from its flags.
#[derive(Debug, Clone, Default)]
pub struct LocalRules {
    pub unknown_destinations: UnknownDestinations,
    pub opaque_ports: PortSet,
}

/// The operator's inbound config with the local opaque ports applied where the operator
/// set no protocol.
pub fn inbound(piece: Option<&InboundPiece>, opaque_ports: &PortSet) -> InboundConfig {
    let mut inbound = piece.and_then(|p| p.inbound.clone()).unwrap_or_default();
    for port in opaque_ports.iter() {
        let entry = inbound.ports.entry(port).or_default();
        entry.protocol.get_or_insert(Protocol::Opaque);
    }
    inbound
}

/// The union of the outbound pieces (see the module docs for the rules).
pub fn outbound_services<'a>(
    pieces: impl IntoIterator<Item = (Target, &'a OutboundPiece)>,
) -> Vec<OutboundService> {
    let mut pieces: Vec<(Target, &OutboundPiece)> = pieces.into_iter().collect();
    pieces.sort_by(|(ta, a), (tb, b)| b.version.cmp(&a.version).then(ta.cmp(tb)));
    let mut names = HashSet::new();
    let mut claimed = HashSet::new();
    let mut out = Vec::new();
    for (_, piece) in pieces {
        for svc in &piece.services {
            if !names.insert(svc.name.as_str()) {
                continue;
            }
            let mut svc = svc.clone();
            svc.addresses.retain(|a| claimed.insert(*a));
            out.push(svc);
        }
    }
    out
}

/// The config to serve, validated.
pub fn assemble<'a>(
    inbound_piece: Option<&InboundPiece>,
    outbound: impl IntoIterator<Item = (Target, &'a OutboundPiece)> + Clone,
    local: &LocalRules,
) -> Result<ProxyConfig, ConfigError> {
    let version = outbound
        .clone()
        .into_iter()
        .map(|(_, p)| p.version)
        .chain(inbound_piece.map(|p| p.version))
        .max()
        .unwrap_or_default();
    let config = ProxyConfig {
        version: version.0,
        identity: None,
        locality: inbound_piece
            .map(|p| p.locality.clone())
            .unwrap_or_default(),
        inbound: inbound(inbound_piece, &local.opaque_ports),
        outbound: OutboundConfig {
            unknown_destinations: local.unknown_destinations,
            services: outbound_services(outbound),
        },
    };
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use remora_crds::{
        policy::MtlsMode,
        proxy::{InboundPolicy, Split, WeightedBackend},
    };

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn svc(name: &str, addrs: &[&str]) -> OutboundService {
        OutboundService {
            name: name.into(),
            addresses: addrs.iter().map(|a| addr(a)).collect(),
            ..Default::default()
        }
    }

    fn piece(version: u64, services: Vec<OutboundService>) -> OutboundPiece {
        OutboundPiece {
            version: Version(version),
            services,
        }
    }

    fn t(s: &str) -> Target {
        Target(addr(s))
    }

    #[test]
    fn union_dedupes_by_name_newest_wins() {
        let mut old_b = svc("b.ns", &[]);
        old_b.protocol = Protocol::Http;
        let mut new_b = svc("b.ns", &[]);
        new_b.protocol = Protocol::Grpc;
        let mut a = svc("a.ns", &["10.0.0.1:80"]);
        a.split = Some(Split {
            backends: vec![WeightedBackend {
                service: "b.ns".into(),
                weight: 1,
            }],
            ..Default::default()
        });
        let p1 = piece(5, vec![a, old_b]);
        let p2 = piece(9, vec![svc("c.ns", &["10.0.0.3:80"]), new_b]);
        let config = assemble(
            None,
            [(t("10.0.0.1:80"), &p1), (t("10.0.0.3:80"), &p2)],
            &LocalRules::default(),
        )
        .expect("valid");
        assert_eq!(config.version, 9);
        let names: Vec<&str> = config
            .outbound
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["c.ns", "b.ns", "a.ns"]);
        assert_eq!(config.outbound.services[1].protocol, Protocol::Grpc);
    }

    #[test]
    fn a_moved_address_belongs_to_the_newer_piece() {
        let p_old = piece(3, vec![svc("old.ns", &["10.0.0.9:80", "10.0.0.8:80"])]);
        let p_new = piece(4, vec![svc("new.ns", &["10.0.0.9:80"])]);
        let config = assemble(
            None,
            [(t("10.0.0.8:80"), &p_old), (t("10.0.0.9:80"), &p_new)],
            &LocalRules::default(),
        )
        .expect("the union of valid pieces is valid");
        let old = config
            .outbound
            .services
            .iter()
            .find(|s| s.name == "old.ns")
            .expect("kept");
        assert_eq!(old.addresses, [addr("10.0.0.8:80")]);
    }

    #[test]
    fn ties_do_not_depend_on_input_order() {
        let p1 = piece(3, vec![svc("x.ns", &["10.0.0.1:80"])]);
        let mut other = svc("x.ns", &["10.0.0.2:80"]);
        other.protocol = Protocol::Opaque;
        let p2 = piece(3, vec![other]);
        let a = outbound_services([(t("10.0.0.1:80"), &p1), (t("10.0.0.2:80"), &p2)]);
        let b = outbound_services([(t("10.0.0.2:80"), &p2), (t("10.0.0.1:80"), &p1)]);
        assert_eq!(a, b);
        assert_eq!(a[0].addresses, [addr("10.0.0.1:80")]);
    }

    #[test]
    fn version_is_the_max_of_the_pieces() {
        let rules = LocalRules::default();
        assert_eq!(
            assemble(None, [], &rules).expect("empty").version,
            0,
            "nothing received yet"
        );
        let inbound = InboundPiece {
            version: Version(12),
            inbound: Some(InboundConfig::default()),
            locality: ProxyLocality {
                zone: Some("zone-b".to_owned()),
            },
        };
        let p = piece(7, vec![]);
        let config = assemble(Some(&inbound), [(t("10.0.0.1:80"), &p)], &rules).expect("valid");
        assert_eq!(config.version, 12);
        assert_eq!(
            config.locality.zone.as_deref(),
            Some("zone-b"),
            "the zone rides with the inbound piece"
        );
    }

    #[test]
    fn opaque_ports_apply_where_the_operator_is_silent() {
        let mut from_operator = InboundConfig::default();
        from_operator.ports.insert(
            3306,
            InboundPolicy {
                protocol: Some(Protocol::Http),
                ..Default::default()
            },
        );
        from_operator.ports.insert(
            6379,
            InboundPolicy {
                mtls: Some(MtlsMode::Strict),
                ..Default::default()
            },
        );
        let piece = InboundPiece {
            version: Version(1),
            inbound: Some(from_operator),
            ..Default::default()
        };
        let rules = LocalRules {
            unknown_destinations: UnknownDestinations::Deny,
            opaque_ports: "3306,6379,5432".parse().expect("ports"),
        };
        let config = assemble(Some(&piece), [], &rules).expect("valid");
        let inbound = &config.inbound;
        assert_eq!(
            inbound.for_port(3306).protocol,
            Protocol::Http,
            "operator wins"
        );
        assert_eq!(inbound.for_port(6379).protocol, Protocol::Opaque);
        assert_eq!(inbound.for_port(6379).mtls, MtlsMode::Strict, "kept");
        assert_eq!(inbound.for_port(5432).protocol, Protocol::Opaque);
        assert_eq!(
            inbound.for_port(5432).mtls,
            MtlsMode::Permissive,
            "the rest from the default"
        );
        assert_eq!(inbound.for_port(80).protocol, Protocol::Detect);
        assert_eq!(
            config.outbound.unknown_destinations,
            UnknownDestinations::Deny
        );
        let before = assemble(None, [], &rules).expect("no piece yet");
        assert_eq!(before.inbound.for_port(5432).protocol, Protocol::Opaque);
    }

    #[test]
    fn an_invalid_union_is_rejected() {
        let mut broken = svc("a.ns", &["10.0.0.1:80"]);
        broken.split = Some(Split {
            backends: vec![WeightedBackend {
                service: "missing.ns".into(),
                weight: 1,
            }],
            ..Default::default()
        });
        let p = piece(2, vec![broken]);
        let err = assemble(None, [(t("10.0.0.1:80"), &p)], &LocalRules::default())
            .expect_err("a split to an unknown service");
        assert!(err.to_string().contains("missing.ns"), "{err}");
    }
}
