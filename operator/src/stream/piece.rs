//! What a subscription carries, read from the index (pure): a destination's outbound
//! piece with the closure of the services its split and mirror name, or a Pod's inbound
//! piece, each with its version; and whether a new reading is worth a message.

use std::collections::BTreeSet;

use remora_crds::proxy::{InboundConfig, OutboundService, ProxyLocality};

use remora_crds::wire::Message;

use super::request::Target;
use crate::index::{
    Index,
    derive::{Destination, mesh_name},
    model::ObjKey,
};

/// The current content of a subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The highest version of the pieces carried; for an absent piece, the index's
    /// version at the time.
    pub version: u64,
    /// Whether the target/pod is in the index.
    pub present: bool,
    pub message: Message,
}

fn destination(index: &Index, target: &Target) -> Option<Destination> {
    match target {
        Target::Addr(a) => index.destination_of(*a).cloned(),
        Target::Name { service, port } => Some(Destination {
            service: service.clone(),
            port: *port,
        }),
    }
}

/// `<svc>.<ns>` → the Service key (mesh names have exactly one dot).
fn service_of(name: &str) -> Option<ObjKey> {
    let (svc, ns) = name.split_once('.')?;
    Some(ObjKey::new(ns, svc))
}

fn references(svc: &OutboundService) -> impl Iterator<Item = &str> {
    let split = svc.split.as_ref();
    split
        .into_iter()
        .flat_map(|s| s.backends.iter().map(|b| b.service.as_str()))
        .chain(
            split
                .and_then(|s| s.mirror.as_ref())
                .map(|m| m.service.as_str()),
        )
}

/// The destination's piece first, then every service its split and mirror name
/// (transitively, each once, on the same port), and the highest version among them.
/// `None` when the destination is not in the index.
pub fn outbound_closure(index: &Index, dest: &Destination) -> Option<(u64, Vec<OutboundService>)> {
    let root = index.outbound(dest)?;
    let mut version = root.version;
    let mut seen: BTreeSet<String> = BTreeSet::from([mesh_name(&dest.service)]);
    let mut services = vec![root.value.clone()];
    let mut next = 0;
    while let Some(svc) = services.get(next) {
        let found: Vec<_> = references(svc)
            .filter(|name| seen.insert((*name).to_owned()))
            .filter_map(|name| {
                let service = service_of(name)?;
                index.outbound(&Destination {
                    service,
                    port: dest.port,
                })
            })
            .collect();
        for piece in found {
            version = version.max(piece.version);
            services.push(piece.value.clone());
        }
        next += 1;
    }
    Some((version, services))
}

/// The outbound reading of `target` (`target_text` as the client wrote it).
pub fn outbound(index: &Index, target: &Target, target_text: &str) -> Reading {
    let found = destination(index, target).and_then(|d| outbound_closure(index, &d));
    let present = found.is_some();
    let (version, services) = found.unwrap_or_else(|| (index.version(), Vec::new()));
    Reading {
        version,
        present,
        message: Message::Outbound {
            version,
            target: target_text.to_owned(),
            services,
        },
    }
}

/// The inbound reading of `pod`, with the zone it runs in.
pub fn inbound(index: &Index, pod: &ObjKey) -> Reading {
    let piece = index.inbound(pod);
    let (version, inbound, locality): (u64, Option<InboundConfig>, ProxyLocality) = match piece {
        Some(p) => (
            p.version,
            Some(p.value.inbound.clone()),
            p.value.locality.clone(),
        ),
        None => (index.version(), None, ProxyLocality::default()),
    };
    Reading {
        version,
        present: piece.is_some(),
        message: Message::Inbound {
            version,
            pod: pod.to_string(),
            inbound,
            locality,
        },
    }
}

/// What a subscriber last sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub version: u64,
    pub present: bool,
}

/// Whether `now` is worth a message after `last` (`None`: nothing sent yet, the client
/// holds `since`). A present piece is sent when its version is newer; an absent one once
/// (its version is the index's, which moves with every unrelated change).
pub fn worth_sending(last: Option<Sent>, since: Option<u64>, now: &Reading) -> bool {
    let floor = last.map(|s| s.version).or(since);
    let newer = floor.is_none_or(|f| now.version > f);
    match last {
        Some(l) if !now.present => newer && l.present,
        _ => newer,
    }
}

#[cfg(test)]
mod tests {
    use remora_crds::{
        TrafficSplit, TrafficSplitSpec,
        traffic_split::{SplitBackend, SplitMirror},
    };

    use super::*;
    use crate::index::{derive::tests::shop, model::Snapshot, version::Versioner};

    fn dest(name: &str, port: u16) -> Destination {
        Destination {
            service: ObjKey::new("shop", name),
            port,
        }
    }

    fn names(services: &[OutboundService]) -> Vec<&str> {
        services.iter().map(|s| s.name.as_str()).collect()
    }

    /// shop with reviews split 90/10 over v1 and v2 (v2 also mirrored to v1: named once).
    fn split_shop() -> Snapshot {
        let mut s = shop();
        let backend = |service: &str, weight| SplitBackend {
            service: service.to_owned(),
            weight,
        };
        let mut ts = TrafficSplit::new(
            "canary",
            TrafficSplitSpec {
                service: "reviews".to_owned(),
                backends: vec![backend("reviews-v1", 90), backend("reviews-v2", 10)],
                matches: Vec::new(),
                mirror: Some(SplitMirror {
                    service: "reviews-v1".to_owned(),
                    percent: 5,
                }),
            },
        );
        ts.metadata.namespace = Some("shop".to_owned());
        s.splits.insert(ObjKey::new("shop", "canary"), ts);
        s
    }

    #[test]
    fn the_closure_follows_split_backends_and_mirror_on_the_same_port() {
        let mut index = Index::new(split_shop(), Versioner::default());
        index.recompute(1_000);
        let (version, services) =
            outbound_closure(&index, &dest("reviews", 9080)).expect("reviews");
        assert_eq!(version, 1_000);
        assert_eq!(
            names(&services),
            ["reviews.shop", "reviews-v1.shop", "reviews-v2.shop"]
        );
        assert!(services[1..].iter().all(|s| s.split.is_none()));
        assert!(outbound_closure(&index, &dest("nope", 9080)).is_none());

        // A backend's endpoints change: the closure's version is the newest piece's.
        index
            .snapshot_mut()
            .services
            .remove(&ObjKey::new("shop", "reviews-v2"));
        index.recompute(2_000);
        let (version, services) =
            outbound_closure(&index, &dest("reviews", 9080)).expect("reviews");
        assert_eq!(version, 2_000);
        assert_eq!(names(&services), ["reviews.shop", "reviews-v1.shop"]);
    }

    #[test]
    fn readings_by_address_and_name_and_unknown_targets() {
        let mut index = Index::new(shop(), Versioner::default());
        index.recompute(1_000);
        let by_addr = outbound(
            &index,
            &Target::Addr("10.96.0.12:9080".parse().expect("addr")),
            "10.96.0.12:9080",
        );
        assert!(by_addr.present);
        let by_name = outbound(
            &index,
            &Target::Name {
                service: ObjKey::new("shop", "reviews"),
                port: 9080,
            },
            "reviews.shop:9080",
        );
        match (&by_addr.message, &by_name.message) {
            (
                Message::Outbound {
                    services: a,
                    target,
                    ..
                },
                Message::Outbound { services: b, .. },
            ) => {
                assert_eq!(a, b);
                assert_eq!(target, "10.96.0.12:9080");
            }
            other => panic!("{other:?}"),
        }
        let unknown = outbound(
            &index,
            &Target::Addr("192.0.2.1:80".parse().expect("addr")),
            "192.0.2.1:80",
        );
        assert!(!unknown.present);
        assert_eq!(unknown.version, index.version());
        assert!(matches!(
            unknown.message,
            Message::Outbound { ref services, .. } if services.is_empty()
        ));
        let pod = inbound(&index, &ObjKey::new("shop", "reviews-1"));
        assert!(pod.present);
        let gone = inbound(&index, &ObjKey::new("shop", "nope"));
        assert!(matches!(
            gone.message,
            Message::Inbound { inbound: None, .. }
        ));
    }

    #[test]
    fn only_newer_versions_and_one_absence_are_sent() {
        let reading = |version, present| Reading {
            version,
            present,
            message: Message::Heartbeat { version },
        };
        let sent = |version, present| Some(Sent { version, present });
        assert!(worth_sending(None, None, &reading(5, true)));
        assert!(worth_sending(None, None, &reading(5, false)));
        assert!(worth_sending(None, Some(4), &reading(5, true)));
        assert!(
            !worth_sending(None, Some(5), &reading(5, true)),
            "up to date"
        );
        assert!(!worth_sending(None, Some(6), &reading(5, true)));
        assert!(worth_sending(sent(5, true), Some(1), &reading(6, true)));
        assert!(!worth_sending(sent(5, true), None, &reading(5, true)));
        assert!(
            worth_sending(sent(5, true), None, &reading(7, false)),
            "it went away"
        );
        assert!(
            !worth_sending(sent(7, false), None, &reading(9, false)),
            "still absent: unrelated index versions are not news"
        );
        assert!(worth_sending(sent(7, false), None, &reading(9, true)));
    }
}
