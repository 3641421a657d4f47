//! The standalone proxy config file (`remora-proxy --config`), parsed and validated as the
//! proxy's file watcher does ([`ProxyConfig::from_yaml`]), then applied to a running
//! config store.
//!
//! Asserted: a refused file is a typed [`ConfigError`] with a message; an accepted config
//! re-serialises (YAML and JSON) to text that parses and validates to the same config;
//! it compiles for the data path (routes, inbound limiters); every inbound port resolves
//! to an effective policy; and the store applies it exactly when its version is newer.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use remora_crds::proxy::{ConfigError, ProxyConfig};
use remora_proxy::{
    config::{ConfigStore, RejectReason},
    metrics::Metrics,
    outbound::endpoint::Registry,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = match ProxyConfig::from_yaml(text) {
        Ok(cfg) => cfg,
        Err(e @ (ConfigError::Parse(_) | ConfigError::Invalid { .. })) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let yaml = serde_yaml::to_string(&cfg).expect("a valid config serialises");
    let again = ProxyConfig::from_yaml(&yaml)
        .unwrap_or_else(|e| panic!("re-serialised config refused: {e}\n{yaml}"));
    assert_eq!(again, cfg, "YAML round trip changed the config");
    let json = serde_json::to_string(&cfg).expect("a valid config serialises to JSON");
    let from_json: ProxyConfig = serde_json::from_str(&json).expect("JSON round trip parses");
    from_json.validate().expect("JSON round trip validates");
    assert_eq!(from_json, cfg, "JSON round trip changed the config");

    for port in cfg.inbound.ports.keys() {
        let eff = cfg.inbound.for_port(*port);
        if let Some(p) = cfg.inbound.ports[port].protocol {
            assert_eq!(eff.protocol, p);
        }
    }

    let metrics = Arc::new(Metrics::new());
    let registry = Registry::without_identity(metrics.clone());
    let compiled = ConfigStore::new(cfg.clone(), &metrics, registry.clone());
    let snap = compiled.load();
    for svc in &cfg.outbound.services {
        for addr in &svc.addresses {
            assert!(
                snap.routes.lookup(*addr).is_some(),
                "{addr} of {} has no route",
                svc.name
            );
        }
    }

    let store = ConfigStore::new(ProxyConfig::default(), &metrics, registry);
    let version = cfg.version;
    match store.apply(cfg.clone(), &metrics) {
        Ok(v) => {
            assert!(version > 0);
            assert_eq!(v, version);
            assert_eq!(store.load().config, cfg);
        }
        Err(RejectReason::Stale { new, current }) => assert_eq!((new, current), (0, 0)),
        Err(e) => panic!("a validated config was refused by the store: {e}"),
    }
});
