//! Plaintext on Permissive ports, made visible: each plaintext connection a Permissive
//! port accepts is counted by client IP (`remora_proxy_inbound_plaintext_accepted_total
//! {peer}`), so an operator can see who still talks to a workload without mTLS before
//! switching it to Strict.
//!
//! Client IPs are unbounded input, so the label set is bounded: the first
//! [`MAX_PEERS`] distinct IPs get a series of their own, every later one counts under
//! `peer="other"`. A pod's plaintext callers are normally a handful of probes, ingress
//! and unmeshed clients; `other` growing says there are more than the cap.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use crate::metrics::{Metrics, Name, PeerIpLabels};

/// Distinct client IPs with a series of their own.
pub const MAX_PEERS: usize = 100;

/// The client IPs that have a series.
#[derive(Debug, Default)]
pub struct PeerLabels {
    seen: Mutex<HashSet<IpAddr>>,
}

impl PeerLabels {
    /// The label of `ip`: itself while there is room (or it already has a series),
    /// `other` after.
    pub fn label(&self, ip: IpAddr) -> Arc<str> {
        let ip = ip.to_canonical();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(&ip) || seen.len() < MAX_PEERS {
            seen.insert(ip);
            Arc::from(ip.to_string())
        } else {
            Arc::from("other")
        }
    }
}

/// Counts one plaintext connection accepted from `ip` on a Permissive port.
pub fn count(metrics: &Metrics, ip: IpAddr) {
    let peer = Name(metrics.abuse.plaintext_peers.label(ip));
    metrics
        .abuse
        .plaintext_accepted
        .get_or_create(&PeerIpLabels { peer })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_label_set_is_bounded() {
        let m = Metrics::new();
        for i in 0..(MAX_PEERS + 50) {
            let ip = IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]);
            count(&m, ip);
        }
        count(&m, "10.1.0.0".parse().expect("ip"));
        count(&m, "::ffff:10.1.0.1".parse().expect("ip"));
        let text = m.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("remora_proxy_inbound_plaintext_accepted_total{"))
            .count();
        assert_eq!(series, MAX_PEERS + 1, "{text}");
        assert!(
            text.contains(r#"remora_proxy_inbound_plaintext_accepted_total{peer="other"} 50"#),
            "{text}"
        );
        assert!(
            text.contains(r#"remora_proxy_inbound_plaintext_accepted_total{peer="10.1.0.0"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"remora_proxy_inbound_plaintext_accepted_total{peer="10.1.0.1"} 2"#),
            "a v4-mapped address is the IPv4 client: {text}"
        );
    }
}
