//! The pod annotations the injector reads: the opt-out `remora.dev/inject`, the
//! `remora.dev/injected` marker, and the per-pod knobs `config.remora.dev/<knob>`, parsed
//! and validated into [`PodOverrides`]. An invalid or unknown knob is an error naming the
//! annotation, so the webhook denies the pod instead of injecting it wrongly.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// Pod annotation that opts a pod in (`enabled`) or out (`disabled`).
pub const INJECT: &str = "remora.dev/inject";
/// Pod annotation set on injected pods; its value is the proxy version.
pub const INJECTED: &str = "remora.dev/injected";
/// Namespace label that enables injection.
pub const NAMESPACE_LABEL: &str = "remora.dev/inject";
/// Prefix of the per-pod knobs.
pub const CONFIG_PREFIX: &str = "config.remora.dev/";

/// `config.remora.dev/skip-inbound-ports`
pub const SKIP_INBOUND_PORTS: &str = "config.remora.dev/skip-inbound-ports";
/// `config.remora.dev/skip-outbound-ports`
pub const SKIP_OUTBOUND_PORTS: &str = "config.remora.dev/skip-outbound-ports";
/// `config.remora.dev/skip-outbound-cidrs`
pub const SKIP_OUTBOUND_CIDRS: &str = "config.remora.dev/skip-outbound-cidrs";
/// `config.remora.dev/opaque-ports`
pub const OPAQUE_PORTS: &str = "config.remora.dev/opaque-ports";
/// `config.remora.dev/proxy-cpu-request`
pub const PROXY_CPU_REQUEST: &str = "config.remora.dev/proxy-cpu-request";
/// `config.remora.dev/proxy-cpu-limit`
pub const PROXY_CPU_LIMIT: &str = "config.remora.dev/proxy-cpu-limit";
/// `config.remora.dev/proxy-memory-request`
pub const PROXY_MEMORY_REQUEST: &str = "config.remora.dev/proxy-memory-request";
/// `config.remora.dev/proxy-memory-limit`
pub const PROXY_MEMORY_LIMIT: &str = "config.remora.dev/proxy-memory-limit";
/// `config.remora.dev/log-level`
pub const LOG_LEVEL: &str = "config.remora.dev/log-level";
/// `config.remora.dev/native-sidecar`
pub const NATIVE_SIDECAR: &str = "config.remora.dev/native-sidecar";
/// `config.remora.dev/shutdown-grace-period`
pub const SHUTDOWN_GRACE_PERIOD: &str = "config.remora.dev/shutdown-grace-period";
/// `config.remora.dev/proxy-ready-timeout`: how long the app is held back for the proxy
/// to become ready (classic: the postStart hook's timeout; native: the startupProbe's
/// budget) before kubelet reports the failure with the proxy's reason.
pub const PROXY_READY_TIMEOUT: &str = "config.remora.dev/proxy-ready-timeout";
/// `config.remora.dev/access-log`: `"true"` turns on the proxy's JSON access log.
pub const ACCESS_LOG: &str = "config.remora.dev/access-log";
/// `config.remora.dev/weight`: the pod's endpoint weight for the `Weighted` algorithm,
/// read by the operator; checked here so a bad value is refused at creation.
pub const WEIGHT: &str = "config.remora.dev/weight";
/// The largest endpoint weight (as the derived config's `MAX_WEIGHT`).
pub const MAX_ENDPOINT_WEIGHT: u32 = remora_crds::proxy::MAX_WEIGHT;

/// Every knob the injector knows; any other `config.remora.dev/*` key is rejected.
pub const KNOWN_KNOBS: &[&str] = &[
    SKIP_INBOUND_PORTS,
    SKIP_OUTBOUND_PORTS,
    SKIP_OUTBOUND_CIDRS,
    OPAQUE_PORTS,
    PROXY_CPU_REQUEST,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_REQUEST,
    PROXY_MEMORY_LIMIT,
    LOG_LEVEL,
    NATIVE_SIDECAR,
    SHUTDOWN_GRACE_PERIOD,
    PROXY_READY_TIMEOUT,
    ACCESS_LOG,
    WEIGHT,
];

/// The longest `proxy-ready-timeout` accepted.
pub const MAX_READY_TIMEOUT: Duration = Duration::from_secs(3600);

/// The proxy's own ports (outbound capture, inbound capture, admin): remora-init refuses
/// a skip list naming them, so the injector refuses such a pod at admission instead of
/// letting its init container fail.
pub const PROXY_PORTS: [(u16, &str); 3] = [
    (15001, "outbound capture"),
    (15006, "inbound capture"),
    (15020, "admin"),
];

/// A skip list must not name the proxy's own ports (remora-init would refuse it).
fn without_proxy_ports(
    key: &str,
    value: &str,
    list: PortList,
) -> Result<PortList, AnnotationError> {
    for (port, role) in PROXY_PORTS {
        if list.contains(port) {
            return Err(AnnotationError::new(
                key,
                value,
                format!(
                    "port {port} is the proxy's {role} port, which is never captured and cannot be skipped"
                ),
            ));
        }
    }
    Ok(list)
}

/// The log levels the proxy accepts.
pub const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// An annotation the injector cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid annotation {key}={value:?}: {reason}")]
pub struct AnnotationError {
    /// The annotation key.
    pub key: String,
    /// Its value as found on the pod.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl AnnotationError {
    fn new(key: &str, value: &str, reason: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

/// What `remora.dev/inject` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectMode {
    /// No annotation: the namespace label decides.
    Default,
    /// `enabled`: inject.
    Enabled,
    /// `disabled`: never inject.
    Disabled,
}

/// Reads `remora.dev/inject`.
pub fn inject_mode(annotations: &BTreeMap<String, String>) -> Result<InjectMode, AnnotationError> {
    match annotations.get(INJECT).map(String::as_str) {
        None => Ok(InjectMode::Default),
        Some("enabled") => Ok(InjectMode::Enabled),
        Some("disabled") => Ok(InjectMode::Disabled),
        Some(other) => Err(AnnotationError::new(
            INJECT,
            other,
            "expected \"enabled\" or \"disabled\"",
        )),
    }
}

/// An inclusive TCP port range; a single port has `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (inclusive).
    pub last: u16,
}

impl PortRange {
    /// A single port.
    pub fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// Whether `port` falls inside the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A sorted, de-duplicated list of ports and port ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub BTreeSet<PortRange>);

impl PortList {
    /// Adds a range.
    pub fn insert(&mut self, range: PortRange) {
        self.0.insert(range);
    }

    /// Whether a port is covered by one of the ranges.
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(port))
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for PortList {
    /// Comma-separated, no spaces: `80,443,8000-8080`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 is not a valid port".to_owned()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

/// Parses `80, 443,8000-8080` (commas, optional spaces, inclusive ranges).
pub fn parse_port_list(key: &str, value: &str) -> Result<PortList, AnnotationError> {
    let mut list = PortList::default();
    for item in value.split(',').map(str::trim) {
        if item.is_empty() {
            if value.trim().is_empty() {
                break;
            }
            return Err(AnnotationError::new(key, value, "empty item in port list"));
        }
        let range = match item.split_once('-') {
            Some((a, b)) => {
                let first =
                    parse_port(a.trim()).map_err(|e| AnnotationError::new(key, value, e))?;
                let last = parse_port(b.trim()).map_err(|e| AnnotationError::new(key, value, e))?;
                if first > last {
                    return Err(AnnotationError::new(
                        key,
                        value,
                        format!("range {item:?} is reversed"),
                    ));
                }
                PortRange { first, last }
            }
            None => PortRange::single(
                parse_port(item).map_err(|e| AnnotationError::new(key, value, e))?,
            ),
        };
        list.insert(range);
    }
    Ok(list)
}

/// An IPv4 or IPv6 network in CIDR notation, normalised (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= max => p,
            _ => return Err(format!("{s:?} has an invalid prefix length (0-{max})")),
        },
    };
    let addr = match addr {
        IpAddr::V4(v4) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    };
    Ok(Cidr { addr, prefix })
}

/// Parses a comma-separated CIDR list; bare addresses become host routes.
pub fn parse_cidr_list(key: &str, value: &str) -> Result<Vec<Cidr>, AnnotationError> {
    let mut out = BTreeSet::new();
    for item in value.split(',').map(str::trim) {
        if item.is_empty() {
            if value.trim().is_empty() {
                break;
            }
            return Err(AnnotationError::new(key, value, "empty item in CIDR list"));
        }
        out.insert(parse_cidr(item).map_err(|e| AnnotationError::new(key, value, e))?);
    }
    Ok(out.into_iter().collect())
}

/// Parses a Kubernetes resource quantity (`100m`, `0.5`, `64Mi`, `1e3`) into its value in
/// base units, to validate it and compare requests with limits.
pub fn parse_quantity(s: &str) -> Option<f64> {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let s = s.trim();
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    if num.is_empty() || num.starts_with('-') || num.chars().filter(|c| *c == '.').count() > 1 {
        return None;
    }
    let digits = num.trim_start_matches('+');
    if digits.is_empty() || digits == "." || digits.contains(['+', '-']) {
        return None;
    }
    let n: f64 = digits.parse().ok()?;
    let factor = if suffix.is_empty() {
        1.0
    } else if let Some(exp) = suffix.strip_prefix(['e', 'E']) {
        10f64.powi(exp.parse::<i32>().ok()?)
    } else {
        SUFFIXES.iter().find(|(sfx, _)| *sfx == suffix)?.1
    };
    Some(n * factor)
}

fn quantity(key: &str, value: &str) -> Result<(String, f64), AnnotationError> {
    parse_quantity(value)
        .map(|v| (value.trim().to_owned(), v))
        .ok_or_else(|| {
            AnnotationError::new(key, value, "not a Kubernetes quantity (e.g. 100m, 64Mi)")
        })
}

/// Parses `250ms`, `5s`, `1m`, `1h`, `1m30s`: the mesh's duration language, the same one
/// the CRDs accept ([`remora_crds::duration::Duration`]).
pub fn parse_duration(s: &str) -> Option<Duration> {
    s.trim()
        .parse::<remora_crds::duration::Duration>()
        .ok()
        .map(|d| d.get())
}

/// Formats a duration the way the annotations write it (`90s`, `250ms`), in a form the
/// proxy's duration parser reads back: it takes at most 9 digits per group, so a longer
/// value is written as several groups (`999999999h` is `999999999h`, not 13 digits of s).
pub fn format_duration(d: Duration) -> String {
    const MAX_GROUP: u128 = 999_999_999;
    let (n, unit) = if d.subsec_millis() == 0 {
        (u128::from(d.as_secs()), "s")
    } else {
        (d.as_millis(), "ms")
    };
    if n <= MAX_GROUP {
        return format!("{n}{unit}");
    }
    let mut out = String::new();
    let mut hours = u128::from(d.as_secs() / 3600);
    while hours > 0 {
        let g = hours.min(MAX_GROUP);
        out.push_str(&format!("{g}h"));
        hours -= g;
    }
    for (v, u) in [
        (d.as_secs() % 3600 / 60, "m"),
        (d.as_secs() % 60, "s"),
        (u64::from(d.subsec_millis()), "ms"),
    ] {
        if v > 0 {
            out.push_str(&format!("{v}{u}"));
        }
    }
    out
}

/// A resource quantity as written on the pod, with its parsed value for comparisons.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity {
    /// The text, passed through to the container spec.
    pub text: String,
    /// Value in base units (cores or bytes).
    pub value: f64,
}

/// The validated `config.remora.dev/*` knobs of one pod. `None` means "use the default".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodOverrides {
    /// Inbound ports that bypass the proxy.
    pub skip_inbound_ports: PortList,
    /// Outbound ports that bypass the proxy.
    pub skip_outbound_ports: PortList,
    /// Outbound networks that bypass the proxy.
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// Ports the proxy treats as opaque TCP (no protocol detection).
    pub opaque_ports: PortList,
    /// Proxy CPU request.
    pub cpu_request: Option<Quantity>,
    /// Proxy CPU limit.
    pub cpu_limit: Option<Quantity>,
    /// Proxy memory request.
    pub memory_request: Option<Quantity>,
    /// Proxy memory limit.
    pub memory_limit: Option<Quantity>,
    /// Proxy log level.
    pub log_level: Option<String>,
    /// Native sidecar (`true`) or classic sidecar (`false`), overriding the cluster default.
    pub native_sidecar: Option<bool>,
    /// How long the proxy drains on shutdown.
    pub shutdown_grace_period: Option<Duration>,
    /// How long the app waits for the proxy to be ready.
    pub ready_timeout: Option<Duration>,
    /// The proxy's JSON access log on (`true`) or off (`false`).
    pub access_log: Option<bool>,
    /// The pod's endpoint weight (the operator applies it; validated here).
    pub weight: Option<u32>,
}

fn boolean(key: &str, v: &str) -> Result<bool, AnnotationError> {
    match v.trim() {
        "true" | "enabled" => Ok(true),
        "false" | "disabled" => Ok(false),
        _ => Err(AnnotationError::new(
            key,
            v,
            "expected \"true\" or \"false\"",
        )),
    }
}

/// Parses and validates every `config.remora.dev/*` annotation of a pod.
pub fn parse_overrides(
    annotations: &BTreeMap<String, String>,
) -> Result<PodOverrides, AnnotationError> {
    let mut o = PodOverrides::default();
    for (key, value) in annotations {
        if !key.starts_with(CONFIG_PREFIX) {
            continue;
        }
        let v = value.as_str();
        match key.as_str() {
            SKIP_INBOUND_PORTS => {
                o.skip_inbound_ports = without_proxy_ports(key, v, parse_port_list(key, v)?)?;
            }
            SKIP_OUTBOUND_PORTS => {
                o.skip_outbound_ports = without_proxy_ports(key, v, parse_port_list(key, v)?)?;
            }
            SKIP_OUTBOUND_CIDRS => o.skip_outbound_cidrs = parse_cidr_list(key, v)?,
            OPAQUE_PORTS => o.opaque_ports = parse_port_list(key, v)?,
            PROXY_CPU_REQUEST | PROXY_CPU_LIMIT | PROXY_MEMORY_REQUEST | PROXY_MEMORY_LIMIT => {
                let (text, value) = quantity(key, v)?;
                let q = Some(Quantity { text, value });
                match key.as_str() {
                    PROXY_CPU_REQUEST => o.cpu_request = q,
                    PROXY_CPU_LIMIT => o.cpu_limit = q,
                    PROXY_MEMORY_REQUEST => o.memory_request = q,
                    _ => o.memory_limit = q,
                }
            }
            LOG_LEVEL => {
                let level = v.trim().to_ascii_lowercase();
                if !LOG_LEVELS.contains(&level.as_str()) {
                    return Err(AnnotationError::new(
                        key,
                        v,
                        format!("expected one of {}", LOG_LEVELS.join(", ")),
                    ));
                }
                o.log_level = Some(level);
            }
            NATIVE_SIDECAR => o.native_sidecar = Some(boolean(key, v)?),
            ACCESS_LOG => o.access_log = Some(boolean(key, v)?),
            WEIGHT => {
                o.weight = Some(
                    v.trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|w| (1..=MAX_ENDPOINT_WEIGHT).contains(w))
                        .ok_or_else(|| {
                            AnnotationError::new(
                                key,
                                v,
                                format!("expected an integer from 1 to {MAX_ENDPOINT_WEIGHT}"),
                            )
                        })?,
                );
            }
            SHUTDOWN_GRACE_PERIOD => {
                o.shutdown_grace_period = Some(parse_duration(v).ok_or_else(|| {
                    AnnotationError::new(key, v, "not a duration (e.g. 250ms, 5s, 1m)")
                })?);
            }
            PROXY_READY_TIMEOUT => {
                o.ready_timeout = Some(
                    parse_duration(v)
                        .filter(|d| {
                            (Duration::from_secs(1)..=MAX_READY_TIMEOUT).contains(d)
                                && d.subsec_nanos() == 0
                        })
                        .ok_or_else(|| {
                            AnnotationError::new(
                                key,
                                v,
                                "expected whole seconds from 1s to 1h (e.g. 30s, 5m)",
                            )
                        })?,
                );
            }
            _ => {
                return Err(AnnotationError::new(
                    key,
                    v,
                    format!(
                        "unknown knob; known: {}",
                        KNOWN_KNOBS
                            .iter()
                            .map(|k| k.trim_start_matches(CONFIG_PREFIX))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn port_lists_parse_sort_and_dedupe() {
        let l = parse_port_list(SKIP_INBOUND_PORTS, " 443, 80,8000-8080,80").expect("valid");
        assert_eq!(l.to_string(), "80,443,8000-8080");
        assert!(l.contains(8042));
        assert!(!l.contains(81));
        assert!(
            parse_port_list(SKIP_INBOUND_PORTS, "")
                .expect("empty")
                .is_empty()
        );
    }

    #[test]
    fn bad_port_lists_name_the_annotation() {
        for bad in ["80,abc", "0", "70000", "90-80", "80,,81", "-5"] {
            let err = parse_port_list(SKIP_INBOUND_PORTS, bad).expect_err(bad);
            assert_eq!(err.key, SKIP_INBOUND_PORTS);
            assert!(
                err.to_string()
                    .contains("config.remora.dev/skip-inbound-ports"),
                "{err}"
            );
        }
    }

    #[test]
    fn cidrs_normalise_and_reject_garbage() {
        let l = parse_cidr_list(
            SKIP_OUTBOUND_CIDRS,
            "10.1.2.3/8, 169.254.169.254, fd00::1/8",
        )
        .expect("valid");
        let s: Vec<String> = l.iter().map(ToString::to_string).collect();
        assert_eq!(s, ["10.0.0.0/8", "169.254.169.254/32", "fd00::/8"]);
        for bad in ["10.0.0.0/33", "abc", "10.0.0.0/x", "::/129"] {
            assert!(parse_cidr_list(SKIP_OUTBOUND_CIDRS, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("100m"), Some(0.1));
        assert_eq!(parse_quantity("64Mi"), Some(67_108_864.0));
        assert_eq!(parse_quantity("1"), Some(1.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("0.5"), Some(0.5));
        for bad in ["", "abc", "10 Mi", "10mb", "-1", "1.2.3", "Mi"] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        for bad in ["", "5", "s", "5d", "-5s", "5 s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn overrides_parse_every_knob() {
        let o = parse_overrides(&ann(&[
            (SKIP_INBOUND_PORTS, "9090"),
            (SKIP_OUTBOUND_PORTS, "5432"),
            (SKIP_OUTBOUND_CIDRS, "10.0.0.0/8"),
            (OPAQUE_PORTS, "3306"),
            (PROXY_CPU_REQUEST, "50m"),
            (PROXY_CPU_LIMIT, "1"),
            (PROXY_MEMORY_REQUEST, "32Mi"),
            (PROXY_MEMORY_LIMIT, "128Mi"),
            (LOG_LEVEL, "Debug"),
            (NATIVE_SIDECAR, "false"),
            (SHUTDOWN_GRACE_PERIOD, "10s"),
            (PROXY_READY_TIMEOUT, "5m"),
            (ACCESS_LOG, "true"),
            (WEIGHT, "25"),
            ("unrelated.example.com/x", "whatever"),
        ]))
        .expect("valid");
        assert_eq!((o.access_log, o.weight), (Some(true), Some(25)));
        assert_eq!(o.skip_inbound_ports.to_string(), "9090");
        assert_eq!(o.log_level.as_deref(), Some("debug"));
        assert_eq!(o.native_sidecar, Some(false));
        assert_eq!(o.shutdown_grace_period, Some(Duration::from_secs(10)));
        assert_eq!(o.ready_timeout, Some(Duration::from_secs(300)));
        assert_eq!(o.cpu_request.map(|q| q.text), Some("50m".to_owned()));
    }

    #[test]
    fn unknown_and_invalid_knobs_are_errors() {
        let err = parse_overrides(&ann(&[("config.remora.dev/skip-inbound-port", "80")]))
            .expect_err("typo");
        assert_eq!(err.key, "config.remora.dev/skip-inbound-port");
        assert!(err.reason.contains("unknown knob"));
        let err = parse_overrides(&ann(&[(NATIVE_SIDECAR, "maybe")])).expect_err("mode");
        assert_eq!(err.key, NATIVE_SIDECAR);
        let err = parse_overrides(&ann(&[(LOG_LEVEL, "loud")])).expect_err("level");
        assert_eq!(err.key, LOG_LEVEL);
        let err = parse_overrides(&ann(&[(PROXY_MEMORY_LIMIT, "lots")])).expect_err("quantity");
        assert_eq!(err.key, PROXY_MEMORY_LIMIT);
        let err = parse_overrides(&ann(&[(ACCESS_LOG, "yes")])).expect_err("access log");
        assert_eq!(err.key, ACCESS_LOG);
        for bad in ["0", "1000001", "-1", "2.5", "heavy", ""] {
            let err = parse_overrides(&ann(&[(WEIGHT, bad)])).expect_err(bad);
            assert_eq!(err.key, WEIGHT);
            assert!(err.reason.contains("1 to 1000000"), "{err}");
        }
        for bad in ["0s", "500ms", "1500ms", "2h", "soon"] {
            let err = parse_overrides(&ann(&[(PROXY_READY_TIMEOUT, bad)])).expect_err(bad);
            assert_eq!(err.key, PROXY_READY_TIMEOUT);
        }
        let o =
            parse_overrides(&ann(&[(ACCESS_LOG, "false"), (WEIGHT, "1000000")])).expect("bounds");
        assert_eq!((o.access_log, o.weight), (Some(false), Some(1_000_000)));
    }

    #[test]
    fn skip_lists_naming_the_proxy_ports_are_refused() {
        for (key, value, port) in [
            (SKIP_INBOUND_PORTS, "8080,15006", 15006),
            (SKIP_OUTBOUND_PORTS, "15001", 15001),
            (SKIP_INBOUND_PORTS, "15000-15030", 15001),
            (SKIP_OUTBOUND_PORTS, "15020", 15020),
        ] {
            let err = parse_overrides(&ann(&[(key, value)])).expect_err(value);
            assert_eq!(err.key, key);
            assert!(
                err.reason.contains(&format!("port {port} is the proxy's")),
                "{err}"
            );
        }
        let o = parse_overrides(&ann(&[(SKIP_OUTBOUND_PORTS, "15000,15002-15005,15021")]))
            .expect("neighbours are fine");
        assert_eq!(o.skip_outbound_ports.to_string(), "15000,15002-15005,15021");
    }

    #[test]
    fn inject_annotation_values() {
        assert_eq!(inject_mode(&ann(&[])), Ok(InjectMode::Default));
        assert_eq!(
            inject_mode(&ann(&[(INJECT, "disabled")])),
            Ok(InjectMode::Disabled)
        );
        assert_eq!(
            inject_mode(&ann(&[(INJECT, "enabled")])),
            Ok(InjectMode::Enabled)
        );
        assert!(inject_mode(&ann(&[(INJECT, "disable")])).is_err());
    }
}
