//! The agent's Prometheus metrics (`/metrics`, text format).
//!
//! The eBPF counters live in the kernel (the per-CPU `stats` map) and outlive the agent,
//! so they are read at each scrape and exported as they are (summed over the CPUs), not
//! accumulated here: a restarted agent reports the same totals. The registrations it
//! handled are its own counters.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::maps::{MapSizes, Maps, STAT_COUNT, Stat, describe};
use crate::registrations::Outcome;

/// What the kernel side says at one scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub stats: [u64; STAT_COUNT],
    pub sizes: MapSizes,
}

impl Snapshot {
    /// Reads the counters and the map sizes.
    pub fn read(maps: &Maps) -> Result<Self, aya::maps::MapError> {
        Ok(Self {
            stats: maps.stats()?,
            sizes: maps.sizes()?,
        })
    }

    fn stat(&self, s: Stat) -> u64 {
        self.stats.get(s as usize).copied().unwrap_or(0)
    }
}

/// Where the collector gets its snapshot from.
type Source = Box<dyn Fn() -> Option<Snapshot> + Send + Sync>;

struct KernelCollector(Source);

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for KernelCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        // A map that cannot be read (logged by the source) leaves these metrics out for
        // that scrape rather than reporting zeros.
        let Some(s) = (self.0)() else {
            return Ok(());
        };
        counter(
            &mut enc,
            "remora_accel_connects_redirected",
            "App connections sent straight to their proxy by connect4/connect6.",
            s.stat(Stat::ConnectRedirected),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "remora_accel_connect_fallbacks",
                "Connections of meshed pods left to the kernel (and iptables): no proxy listener, or a destination the pod does not capture.",
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (reason, stat) in [
                ("no_listener", Stat::ConnectNoListener),
                ("not_captured", Stat::ConnectNotCaptured),
            ] {
                ConstCounter::new(s.stat(stat)).encode(m.encode_family(&[("reason", reason)])?)?;
            }
        }
        counter(
            &mut enc,
            "remora_accel_sockets_accelerated",
            "Loopback TCP sockets of meshed pods added to sock_pairs.",
            s.stat(Stat::SocketAdded),
        )?;
        counter(
            &mut enc,
            "remora_accel_socket_add_failures",
            "Sockets that could not be added to sock_pairs (they use plain TCP).",
            s.stat(Stat::SocketAddFailed),
        )?;
        counter(
            &mut enc,
            "remora_accel_messages_redirected",
            "Sends handed straight to the peer socket.",
            s.stat(Stat::MsgRedirected),
        )?;
        counter(
            &mut enc,
            "remora_accel_message_fallbacks",
            "Sends that went through TCP because the peer socket was not in sock_pairs.",
            s.stat(Stat::MsgFallback),
        )?;
        counter(
            &mut enc,
            "remora_accel_unread_limit_fallbacks",
            "Sockets whose sends went back to TCP because their peer had over 4 MiB handed to it unread (sockmap applies no backpressure).",
            s.stat(Stat::UnreadLimit),
        )?;
        counter(
            &mut enc,
            "remora_accel_orig_dst_served",
            "SO_ORIGINAL_DST answers given by the getsockopt program.",
            s.stat(Stat::OrigDstServed),
        )?;
        let mut m = enc.encode_descriptor(
            "remora_accel_map_entries",
            "Entries in the accelerator's maps.",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (map, n) in [
            ("meshed_pods", s.sizes.meshed_pods),
            ("sock_pairs", s.sizes.sock_pairs),
            ("orig_dst", s.sizes.orig_dst),
        ] {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            ConstGauge::new(n).encode(m.encode_family(&[("map", map)])?)?;
        }
        Ok(())
    }
}

/// The agent's registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    registrations: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Metrics {
    /// Metrics reading the kernel side through `source` at each scrape.
    pub fn new(source: impl Fn() -> Option<Snapshot> + Send + Sync + 'static) -> Self {
        let mut registry = Registry::default();
        let registrations = Family::default();
        registry.register(
            "remora_accel_registrations",
            // `register` ends the help text with a period itself (the collector's
            // descriptors do not).
            "Registration files handled, by outcome (loaded, invalid, refused: lists too long for the map, error: map update failed)",
            registrations.clone(),
        );
        registry.register_collector(Box::new(KernelCollector(Box::new(source))));
        for o in [
            Outcome::Loaded,
            Outcome::Invalid,
            Outcome::Refused,
            Outcome::Error,
        ] {
            // Every outcome is listed from the start, at zero.
            drop(registrations.get_or_create(&[("outcome", o.label())]));
        }
        Self {
            registry,
            registrations,
        }
    }

    /// Metrics over the agent's maps.
    pub fn over(maps: Arc<Mutex<Maps>>) -> Self {
        Self::new(move || {
            let maps = maps.lock().ok()?;
            Snapshot::read(&maps)
                .map_err(|e| tracing::warn!("reading the accelerator's maps: {}", describe(&e)))
                .ok()
        })
    }

    /// Counts one handled registration file.
    pub fn registration(&self, outcome: Outcome) {
        self.registrations
            .get_or_create(&[("outcome", outcome.label())])
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_kernel_counters_and_registrations() -> Result<(), std::fmt::Error> {
        let snapshot = Snapshot {
            stats: [5, 1, 2, 10, 0, 300, 4, 5, 1],
            sizes: MapSizes {
                meshed_pods: 2,
                sock_pairs: 6,
                orig_dst: 3,
            },
        };
        let m = Metrics::new(move || Some(snapshot));
        m.registration(Outcome::Loaded);
        m.registration(Outcome::Loaded);
        m.registration(Outcome::Invalid);
        let text = m.render()?;
        for line in [
            "remora_accel_connects_redirected_total 5",
            "remora_accel_connect_fallbacks_total{reason=\"no_listener\"} 1",
            "remora_accel_connect_fallbacks_total{reason=\"not_captured\"} 2",
            "remora_accel_sockets_accelerated_total 10",
            "remora_accel_socket_add_failures_total 0",
            "remora_accel_messages_redirected_total 300",
            "remora_accel_message_fallbacks_total 4",
            "remora_accel_orig_dst_served_total 5",
            "remora_accel_unread_limit_fallbacks_total 1",
            "remora_accel_map_entries{map=\"meshed_pods\"} 2",
            "remora_accel_map_entries{map=\"sock_pairs\"} 6",
            "remora_accel_map_entries{map=\"orig_dst\"} 3",
            "remora_accel_registrations_total{outcome=\"loaded\"} 2",
            "remora_accel_registrations_total{outcome=\"invalid\"} 1",
            "remora_accel_registrations_total{outcome=\"refused\"} 0",
            "# TYPE remora_accel_map_entries gauge",
            "# TYPE remora_accel_connects_redirected counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
        let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
        assert_eq!(helps.len(), 10, "{text}");
        for help in helps {
            assert!(
                help.ends_with('.') && !help.ends_with(".."),
                "a help text must end with exactly one period: {help}"
            );
        }
        Ok(())
    }

    #[test]
    fn unreadable_maps_leave_the_kernel_metrics_out() -> Result<(), std::fmt::Error> {
        let text = Metrics::new(|| None).render()?;
        assert!(!text.contains("remora_accel_map_entries"), "{text}");
        assert!(text.contains("remora_accel_registrations_total{outcome=\"error\"} 0"));
        Ok(())
    }
}
