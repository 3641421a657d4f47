//! The mesh API's values as users write them: durations (`250ms`, `1m30s`), the proxy's
//! port lists, and `MeshPolicy` / `TrafficSplit` specs through the operator's validation
//! ([`remora_operator::validate`]) and into the proxy's compiled policy.
//!
//! Asserted: the duration parser accepts exactly the language of the CRD schema's
//! pattern (the API server and the proxy agree on what a duration is), keeps the text as
//! written, and survives serde; a port list prints to one that parses back the same;
//! a spec's problems are sentences; a spec the operator accepts re-serialises to an
//! equal spec that it still accepts, its client policy passes the proxy's own check,
//! compiles for the data path, and its authorization evaluates.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use remora_crds::{
    duration::{DURATION_PATTERN, Duration, DurationError},
    mesh_policy::MeshPolicySpec,
    proxy::OutboundService,
    traffic_split::TrafficSplitSpec,
};
use remora_operator::validate::{mesh_policy_spec, traffic_split_spec};
use remora_proxy::{
    control::ports::PortSet,
    inbound::authz::{Access, allowed},
    outbound::policy::ServicePolicy,
};

fn pattern() -> &'static regex::Regex {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(DURATION_PATTERN).expect("the schema pattern compiles"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match mode % 4 {
        0 => duration(text),
        1 => ports(text),
        2 => mesh_policy(rest),
        _ => traffic_split(rest),
    }
});

fn duration(s: &str) {
    let parsed = s.parse::<Duration>();
    let admitted = pattern().is_match(s);
    match &parsed {
        Ok(d) => {
            assert!(admitted, "{s:?} parses but the schema refuses it");
            assert_eq!(d.as_str(), s);
            let json = serde_json::to_string(d).expect("serialises");
            let back: Duration = serde_json::from_str(&json).expect("parses back");
            assert_eq!(&back, d);
        }
        Err(DurationError::Overflow(_)) => assert!(admitted),
        Err(e) => assert!(
            !admitted,
            "{s:?} is admitted by the schema but refused: {e}"
        ),
    }
}

fn ports(s: &str) {
    let Ok(set) = s.parse::<PortSet>() else {
        return;
    };
    let printed = set.to_string();
    let again: PortSet = printed.parse().expect("a printed port list parses");
    assert_eq!(again, set, "{printed:?}");
}

fn mesh_policy(json: &[u8]) {
    let Ok(spec) = serde_json::from_slice::<MeshPolicySpec>(json) else {
        return;
    };
    let problems = mesh_policy_spec(&spec);
    assert!(problems.iter().all(|p| !p.is_empty()));
    if !problems.is_empty() {
        return;
    }
    let again: MeshPolicySpec =
        serde_json::from_str(&serde_json::to_string(&spec).expect("serialises")).expect("parses");
    assert_eq!(again, spec);
    assert!(mesh_policy_spec(&again).is_empty());

    let policy = spec.traffic_policy();
    let svc = OutboundService {
        name: "reviews.shop".into(),
        policy: Some(policy.clone()),
        ..Default::default()
    };
    svc.validate_policy("policy")
        .unwrap_or_else(|e| panic!("the operator accepts what the proxy refuses: {e}"));
    let _ = ServicePolicy::compile(Some(&policy), Some("zone-a"));
    if let Some(authz) = &spec.authorization {
        for (peer, method, path) in [
            (
                Some("spiffe://cluster.local/ns/shop/sa/frontend"),
                "GET",
                "/api/x",
            ),
            (None, "POST", "/"),
        ] {
            let _ = allowed(
                Some(authz),
                peer,
                Access {
                    port: 9080,
                    http: Some((method, path)),
                },
            );
        }
    }
}

fn traffic_split(json: &[u8]) {
    let Ok(spec) = serde_json::from_slice::<TrafficSplitSpec>(json) else {
        return;
    };
    let problems = traffic_split_spec(&spec);
    assert!(problems.iter().all(|p| !p.is_empty()));
    if !problems.is_empty() {
        return;
    }
    assert!(spec.backends.iter().any(|b| b.weight > 0));
    let again: TrafficSplitSpec =
        serde_json::from_str(&serde_json::to_string(&spec).expect("serialises")).expect("parses");
    assert_eq!(again, spec);
    assert!(traffic_split_spec(&again).is_empty());
}
