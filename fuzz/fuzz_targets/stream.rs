//! The config stream as the proxy reads it: ndjson framing across arbitrary chunk
//! boundaries, each line parsed piece by piece ([`Message::parse`]), unusable pieces
//! replaced by their previous version ([`received`]), and the served config assembled
//! and validated ([`assemble`]) — the same steps the proxy's subscriptions take.
//!
//! Asserted: the framing does not depend on where the bytes were cut; a message whose
//! pieces all parsed writes back (`Message::line`) to the same message; every service
//! and inbound piece the proxy holds validates on its own; an assembled config
//! validates and survives a JSON round trip.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_crds::{
    proxy::{InboundConfig, OutboundService, ProxyConfig, UnknownDestinations},
    wire::{Message as Wire, Received},
};
use remora_proxy::control::{
    assemble::{InboundPiece, LocalRules, OutboundPiece, assemble},
    message::{Lines, Message},
    received,
    target::{Target, Version},
};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let lines = Lines::default()
        .push(stream)
        .expect("input below the line limit");
    let mut chunked = Lines::default();
    let mut again = Vec::new();
    for chunk in stream.chunks(usize::from(cut).max(1)) {
        again.extend(chunked.push(chunk).expect("input below the line limit"));
    }
    assert_eq!(lines, again, "framing depends on chunk boundaries");

    let rules = LocalRules {
        unknown_destinations: UnknownDestinations::Deny,
        opaque_ports: "6379,9000-9002".parse().expect("ports"),
    };
    let target = Target("10.96.0.1:80".parse().expect("addr"));
    let mut held_services: Vec<OutboundService> = Vec::new();
    let mut held_inbound: Option<InboundPiece> = None;
    for line in &lines {
        let Ok(msg) = Message::parse(line) else {
            continue;
        };
        round_trip(&msg);
        match msg {
            Message::Outbound {
                version, services, ..
            } => {
                let (held, _rejections) = received::services(services, |name| {
                    held_services.iter().find(|s| s.name == name)
                });
                for s in &held {
                    s.validate(&s.name)
                        .unwrap_or_else(|e| panic!("held service {} is invalid: {e}", s.name));
                }
                let piece = OutboundPiece {
                    version: Version(version),
                    services: held.clone(),
                };
                check_assembled(held_inbound.as_ref(), Some((target, &piece)), &rules);
                held_services = held;
            }
            Message::Inbound {
                version,
                pod,
                inbound,
                locality,
            } => {
                let inbound = match inbound {
                    None => None,
                    Some(r) => {
                        let before = held_inbound.as_ref().and_then(|p| p.inbound.as_ref());
                        match received::inbound(&pod, r, before) {
                            Ok((config, _)) => {
                                config.validate().expect("a held inbound piece validates");
                                Some(config)
                            }
                            Err(rejection) => {
                                assert!(!rejection.kept_previous);
                                continue;
                            }
                        }
                    }
                };
                let piece = InboundPiece {
                    version: Version(version),
                    inbound,
                    locality,
                };
                check_assembled(Some(&piece), None, &rules);
                held_inbound = Some(piece);
            }
            Message::Heartbeat { .. } => {}
        }
    }
});

fn check_assembled(
    inbound: Option<&InboundPiece>,
    outbound: Option<(Target, &OutboundPiece)>,
    rules: &LocalRules,
) {
    let Ok(cfg) = assemble(inbound, outbound, rules) else {
        return;
    };
    cfg.validate().expect("an assembled config validates");
    for port in rules.opaque_ports.iter() {
        assert!(
            cfg.inbound.ports.contains_key(&port),
            "local opaque port {port} lost"
        );
    }
    let json = serde_json::to_string(&cfg).expect("serialises");
    let back: ProxyConfig = serde_json::from_str(&json).expect("parses back");
    assert_eq!(back, cfg);
}

fn parsed<T: Clone>(r: &Received<T>) -> Option<T> {
    match r {
        Received::Parsed(t) => Some(t.clone()),
        Received::Unparsed { .. } => None,
    }
}

/// A message whose pieces all parsed is written back to the same line content.
fn round_trip(msg: &Message) {
    let written: Wire<OutboundService, InboundConfig> = match msg {
        Message::Outbound {
            version,
            target,
            services,
        } => {
            let Some(services) = services.iter().map(parsed).collect::<Option<Vec<_>>>() else {
                return;
            };
            Wire::Outbound {
                version: *version,
                target: target.clone(),
                services,
            }
        }
        Message::Inbound {
            version,
            pod,
            inbound,
            locality,
        } => {
            let inbound = match inbound {
                None => None,
                Some(r) => match parsed(r) {
                    Some(i) => Some(i),
                    None => return,
                },
            };
            Wire::Inbound {
                version: *version,
                pod: pod.clone(),
                inbound,
                locality: locality.clone(),
            }
        }
        Message::Heartbeat { version } => Wire::Heartbeat { version: *version },
    };
    let line = written.line().expect("a parsed message serialises");
    assert_eq!(line.last(), Some(&b'\n'));
    assert!(
        !line[..line.len() - 1].contains(&b'\n'),
        "one message, one line"
    );
    let back = Message::parse(&line).expect("a written message parses");
    assert_eq!(&back, msg, "the message changed in a round trip");
}
