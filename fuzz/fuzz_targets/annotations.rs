//! Every `config.remora.dev/*` annotation parser of the webhook, and what the other
//! components make of the values the webhook accepts: the webhook writes its normalised
//! port lists and CIDRs into remora-init's and the proxy's environment, its durations
//! into the proxy's flags, and the operator reads `opaque-ports` and `weight` from the
//! pod itself.
//!
//! Asserted: [`parse_overrides`] accepts or names an offending `config.remora.dev/*`
//! key; an accepted port list prints to a list that parses back the same, that
//! remora-init and the proxy parse to the same ports, and that the operator reads to the
//! same ports from the raw value; an accepted CIDR list prints to CIDRs remora-init
//! accepts; a duration the webhook accepts is written in a form the proxy parses to the
//! same duration; a weight the webhook accepts is the weight the operator reads.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use remora_webhook::annotations::{
    CONFIG_PREFIX, KNOWN_KNOBS, PortList, format_duration, parse_cidr_list, parse_duration,
    parse_overrides, parse_port_list,
};

#[derive(Arbitrary, Debug)]
enum Key {
    Knob(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Input {
    annotations: Vec<(Key, String)>,
    value: String,
}

fn ports(list: &PortList) -> BTreeSet<u16> {
    (1..=u16::MAX).filter(|p| list.contains(*p)).collect()
}

fuzz_target!(|input: Input| {
    let annotations: BTreeMap<String, String> = input
        .annotations
        .iter()
        .map(|(k, v)| {
            let key = match k {
                Key::Knob(i) => KNOWN_KNOBS[usize::from(*i) % KNOWN_KNOBS.len()].to_owned(),
                Key::Other(s) => s.clone(),
            };
            (key, v.clone())
        })
        .collect();
    match parse_overrides(&annotations) {
        Ok(o) => {
            if let Some(w) = o.weight {
                let raw = annotations.get(remora_webhook::annotations::WEIGHT);
                assert_eq!(remora_operator::index::model::weight(raw), Ok(Some(w)));
            }
            if let Some(d) = o.shutdown_grace_period {
                passes_to_proxy(d);
            }
            if let Some(d) = o.ready_timeout {
                passes_to_proxy(d);
            }
        }
        Err(e) => {
            assert!(
                e.key.starts_with(CONFIG_PREFIX),
                "error for a foreign key {e}"
            );
            assert_eq!(annotations.get(&e.key), Some(&e.value));
            assert!(!e.reason.is_empty());
        }
    }

    let v = input.value.as_str();
    if let Ok(list) = parse_port_list("k", v) {
        let printed = list.to_string();
        assert_eq!(
            parse_port_list("k", &printed),
            Ok(list.clone()),
            "{printed:?}"
        );
        let want = ports(&list);
        let init: remora_init::config::PortList = printed
            .parse()
            .unwrap_or_else(|e| panic!("remora-init refuses {printed:?}: {e}"));
        let init_ports: BTreeSet<u16> = (1..=u16::MAX)
            .filter(|p| init.0.iter().any(|r| r.contains(*p)))
            .collect();
        assert_eq!(
            init_ports, want,
            "remora-init reads {printed:?} differently"
        );
        let proxy: remora_proxy::control::ports::PortSet = printed
            .parse()
            .unwrap_or_else(|e| panic!("the proxy refuses {printed:?}: {e}"));
        assert_eq!(proxy.iter().collect::<BTreeSet<_>>(), want);
        let operator = remora_operator::index::model::opaque_ports(Some(&v.to_owned()));
        assert_eq!(operator, want, "the operator reads {v:?} differently");
    }
    if let Ok(cidrs) = parse_cidr_list("k", v) {
        let printed = cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let init: remora_init::config::CidrList = printed
            .parse()
            .unwrap_or_else(|e| panic!("remora-init refuses {printed:?}: {e}"));
        assert_eq!(init.0.len(), cidrs.len());
        assert_eq!(parse_cidr_list("k", &printed), Ok(cidrs));
    }
    if let Some(d) = parse_duration(v) {
        passes_to_proxy(d);
    }
});

/// The webhook writes durations with [`format_duration`]; the proxy's flags read them
/// with the mesh's duration parser.
fn passes_to_proxy(d: std::time::Duration) {
    let text = format_duration(d);
    let read: remora_crds::duration::Duration = text
        .parse()
        .unwrap_or_else(|e| panic!("the proxy cannot read {text:?} (from {d:?}): {e}"));
    assert_eq!(read.get(), d, "{text:?}");
}
