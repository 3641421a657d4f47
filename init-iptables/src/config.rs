//! The validated interception configuration: ports, UID/GID, port and CIDR lists.
//!
//! Everything here is pure: values are parsed from the strings the flags (or the
//! webhook's environment variables) carry, then checked against each other by
//! [`Config::new`], so that a bad combination is rejected before any rule is touched.
//! Every error names the flag it is about.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Default outbound capture port of the proxy (see DESIGN.md).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default inbound capture port of the proxy.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Default admin port of the proxy (`/ready`, `/live`, `/metrics`, ...).
pub const DEFAULT_ADMIN_PORT: u16 = 15020;
/// Default UID and GID the proxy runs as; its traffic is never captured.
pub const DEFAULT_PROXY_ID: u32 = 1337;

/// An IP address family; IPv4 and IPv6 rules are built and applied separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4 (`iptables-restore`).
    V4,
    /// IPv6 (`ip6tables-restore`).
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// A single TCP port or an inclusive range of ports (`8080` or `9000-9100`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// The first port of the range.
    pub fn first(&self) -> u16 {
        self.first
    }

    /// The last port of the range (inclusive).
    pub fn last(&self) -> u16 {
        self.last
    }

    /// A range of one port.
    pub fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }

    /// Whether two ranges share a port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// The range as iptables writes it after `--dport` (`8080` or `9000:9100`).
    pub fn iptables_arg(&self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}:{}", self.first, self.last)
        }
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

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("'{s}' is not a port number between 1 and 65535")),
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s.split_once('-') {
            None => parse_port(s).map(PortRange::single),
            Some((a, b)) => {
                let (first, last) = (parse_port(a.trim())?, parse_port(b.trim())?);
                if first > last {
                    return Err(format!("port range '{s}' ends before it starts"));
                }
                Ok(PortRange { first, last })
            }
        }
    }
}

/// An IPv4 or IPv6 network in CIDR notation; a bare address means a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network's address, host bits cleared.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The family of the network.
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    /// Whether `ip` lies in the network.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(*ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(*ip) & mask
            }
            _ => false,
        }
    }

    /// The first address after the network address (the network address itself for
    /// a host route): a stand-in destination inside the network.
    pub fn first_host(&self) -> IpAddr {
        let max_prefix = match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if self.prefix >= max_prefix - 1 {
            return self.addr;
        }
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr_s, prefix_s) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_s
            .parse()
            .map_err(|_| format!("'{s}' is not an IPv4 or IPv6 address or CIDR"))?;
        let max = match addr {
            IpAddr::V4(_) => 32u8,
            IpAddr::V6(_) => 128u8,
        };
        let prefix = match prefix_s {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("'{s}' has an invalid prefix length (0 to {max})")),
            },
        };
        let cidr = Cidr { addr, prefix };
        let network = cidr.network();
        if network != addr {
            return Err(format!(
                "'{s}' has host bits set; the network is {network}/{prefix}"
            ));
        }
        Ok(cidr)
    }
}

impl Cidr {
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }
}

/// Parses a comma-separated list, ignoring blanks around items and empty items, so
/// that an empty environment variable means an empty list.
fn parse_list<T: FromStr<Err = String>>(s: &str) -> Result<Vec<T>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(T::from_str)
        .collect()
}

/// A comma-separated list of ports and port ranges (`22,9000-9100`); empty is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<PortRange>);

impl FromStr for PortList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_list(s).map(PortList)
    }
}

/// A comma-separated list of CIDRs (`10.0.0.0/8,fd00::/8`); empty is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

impl FromStr for CidrList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_list(s).map(CidrList)
    }
}

/// Which inbound TCP ports are captured: `*` (every port) or an explicit list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundCapture {
    /// Every port except the skipped ones and the proxy's admin port.
    All,
    /// Only these ports.
    Ports(Vec<PortRange>),
}

impl FromStr for InboundCapture {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "*" {
            return Ok(InboundCapture::All);
        }
        let ports = parse_list(s)?;
        if ports.is_empty() {
            return Err("expected '*' (all ports) or a comma-separated list of ports".into());
        }
        Ok(InboundCapture::Ports(ports))
    }
}

/// Which outbound destinations are captured: `*` (all) or only those in some CIDRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundCapture {
    /// Every destination except the skipped CIDRs.
    All,
    /// Only destinations in these CIDRs (a family with none of them is not captured).
    Cidrs(Vec<Cidr>),
}

impl FromStr for OutboundCapture {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "*" {
            return Ok(OutboundCapture::All);
        }
        let cidrs = parse_list(s)?;
        if cidrs.is_empty() {
            return Err(
                "expected '*' (all destinations) or a comma-separated list of CIDRs".into(),
            );
        }
        Ok(OutboundCapture::Cidrs(cidrs))
    }
}

/// A configuration that cannot be applied, naming the flag at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Two of the proxy's ports are the same.
    #[error("{flag_a} and {flag_b} are both {port}; the proxy's ports must differ")]
    ProxyPortClash {
        /// First flag.
        flag_a: &'static str,
        /// Second flag.
        flag_b: &'static str,
        /// The shared port.
        port: u16,
    },
    /// A skipped (or listed) port is one the proxy itself uses.
    #[error(
        "{flag}: port {range} includes {port}, the proxy's {role} port ({role_flag}); the proxy's own ports cannot be {what}"
    )]
    ProxyPortListed {
        /// The list flag.
        flag: &'static str,
        /// The offending entry.
        range: PortRange,
        /// The proxy port it contains.
        port: u16,
        /// Which proxy port it is.
        role: &'static str,
        /// The flag that sets that proxy port.
        role_flag: &'static str,
        /// "skipped" or "captured".
        what: &'static str,
    },
    /// A port is both captured explicitly and skipped.
    #[error(
        "--skip-inbound-ports: {skipped} overlaps {captured} from --inbound-ports; a port cannot be both captured and skipped"
    )]
    CapturedAndSkipped {
        /// The skipped entry.
        skipped: PortRange,
        /// The captured entry.
        captured: PortRange,
    },
    /// An IPv6 CIDR given while IPv6 rules are disabled.
    #[error("{flag}: {cidr} is an IPv6 network but IPv6 is disabled (--ipv6=false)")]
    Ipv6Disabled {
        /// The list flag.
        flag: &'static str,
        /// The offending CIDR.
        cidr: Cidr,
    },
    /// The proxy UID is 0: root's own traffic (and remora-init's) would escape capture.
    #[error(
        "{flag}: 0 (root) cannot be the proxy's identity; everything root sends would bypass the proxy"
    )]
    RootProxyId {
        /// `--proxy-uid` or `--proxy-gid`.
        flag: &'static str,
    },
}

/// The complete, validated interception configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Port the proxy's outbound listener captures on.
    pub outbound_port: u16,
    /// Port the proxy's inbound listener captures on.
    pub inbound_port: u16,
    /// The proxy's admin port; never redirected inbound.
    pub admin_port: u16,
    /// UID the proxy runs as; its traffic is never captured.
    pub proxy_uid: u32,
    /// GID the proxy runs as; its traffic is never captured.
    pub proxy_gid: u32,
    /// Which inbound ports are captured.
    pub inbound: InboundCapture,
    /// Inbound ports never captured.
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound destination ports never captured.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound destinations never captured.
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// Which outbound destinations are captured.
    pub outbound: OutboundCapture,
    /// Whether IPv6 rules are installed too.
    pub ipv6: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            admin_port: DEFAULT_ADMIN_PORT,
            proxy_uid: DEFAULT_PROXY_ID,
            proxy_gid: DEFAULT_PROXY_ID,
            inbound: InboundCapture::All,
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
            outbound: OutboundCapture::All,
            ipv6: true,
        }
    }
}

impl Config {
    /// Checks a configuration for contradictions; every error names the flag at fault.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let proxy_ports = [
            (self.outbound_port, "outbound capture", "--outbound-port"),
            (self.inbound_port, "inbound capture", "--inbound-port"),
            (self.admin_port, "admin", "--admin-port"),
        ];
        for (i, (a, _, flag_a)) in proxy_ports.iter().enumerate() {
            for (b, _, flag_b) in &proxy_ports[i + 1..] {
                if a == b {
                    return Err(ConfigError::ProxyPortClash {
                        flag_a,
                        flag_b,
                        port: *a,
                    });
                }
            }
        }
        if self.proxy_uid == 0 {
            return Err(ConfigError::RootProxyId {
                flag: "--proxy-uid",
            });
        }
        if self.proxy_gid == 0 {
            return Err(ConfigError::RootProxyId {
                flag: "--proxy-gid",
            });
        }
        let captured: &[PortRange] = match &self.inbound {
            InboundCapture::All => &[],
            InboundCapture::Ports(p) => p,
        };
        let lists = [
            (
                "--skip-inbound-ports",
                &self.skip_inbound_ports[..],
                "skipped",
            ),
            (
                "--skip-outbound-ports",
                &self.skip_outbound_ports[..],
                "skipped",
            ),
            ("--inbound-ports", captured, "captured"),
        ];
        for (flag, list, what) in lists {
            for range in list {
                for (port, role, role_flag) in proxy_ports {
                    if range.contains(port) {
                        return Err(ConfigError::ProxyPortListed {
                            flag,
                            range: *range,
                            port,
                            role,
                            role_flag,
                            what,
                        });
                    }
                }
            }
        }
        for skipped in &self.skip_inbound_ports {
            if let Some(c) = captured.iter().find(|c| c.overlaps(skipped)) {
                return Err(ConfigError::CapturedAndSkipped {
                    skipped: *skipped,
                    captured: *c,
                });
            }
        }
        if !self.ipv6 {
            let included: &[Cidr] = match &self.outbound {
                OutboundCapture::All => &[],
                OutboundCapture::Cidrs(c) => c,
            };
            for (flag, list) in [
                ("--skip-outbound-cidrs", &self.skip_outbound_cidrs[..]),
                ("--include-outbound-cidrs", included),
            ] {
                if let Some(cidr) = list.iter().find(|c| c.family() == Family::V6) {
                    return Err(ConfigError::Ipv6Disabled { flag, cidr: *cidr });
                }
            }
        }
        Ok(self)
    }

    /// The families rules are installed for.
    pub fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            Family::ALL.to_vec()
        } else {
            vec![Family::V4]
        }
    }

    /// Whether an outbound TCP connection from an ordinary app process (not the proxy)
    /// to `dest` leaving through a non-loopback interface would be redirected.
    pub fn captures_outbound(&self, dest: &std::net::SocketAddr) -> bool {
        let ip = dest.ip();
        if ip.is_loopback() || (Family::of(&ip) == Family::V6 && !self.ipv6) {
            return false;
        }
        if self
            .skip_outbound_ports
            .iter()
            .any(|r| r.contains(dest.port()))
        {
            return false;
        }
        if self.skip_outbound_cidrs.iter().any(|c| c.contains(&ip)) {
            return false;
        }
        match &self.outbound {
            OutboundCapture::All => true,
            OutboundCapture::Cidrs(c) => c.iter().any(|c| c.contains(&ip)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(s: &str) -> Vec<PortRange> {
        s.parse::<PortList>().expect("valid port list").0
    }

    #[test]
    fn parses_ports_and_ranges() {
        assert_eq!(
            ports(" 22, 9000-9100 ,,"),
            vec![
                PortRange::single(22),
                PortRange {
                    first: 9000,
                    last: 9100
                }
            ]
        );
        assert_eq!(ports(""), vec![]);
        assert_eq!(ports("9000-9100")[0].iptables_arg(), "9000:9100");
        for bad in ["0", "65536", "http", "10-5", "-3", "1-"] {
            assert!(bad.parse::<PortList>().is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn parses_cidrs() {
        let c: Cidr = "10.0.0.0/8".parse().expect("valid");
        assert!(c.contains(&"10.1.2.3".parse().expect("ip")));
        assert!(!c.contains(&"11.0.0.1".parse().expect("ip")));
        let host: Cidr = "192.0.2.7".parse().expect("valid");
        assert_eq!(host.to_string(), "192.0.2.7/32");
        let v6: Cidr = "fd00::/8".parse().expect("valid");
        assert_eq!(v6.family(), Family::V6);
        assert!(v6.contains(&"fd12::1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("valid");
        assert!(all.contains(&"8.8.8.8".parse().expect("ip")));
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>(),
            Err("'10.0.0.1/8' has host bits set; the network is 10.0.0.0/8".into())
        );
        for bad in ["10.0.0.0/33", "fd00::/129", "10.0.0", "x/8", "10.0.0.0/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} must be rejected");
        }
        assert_eq!(
            "10.96.0.0/12".parse::<Cidr>().expect("valid").first_host(),
            "10.96.0.1".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn inbound_capture_star_or_list() {
        assert_eq!("*".parse(), Ok(InboundCapture::All));
        assert_eq!(
            "80,443".parse(),
            Ok(InboundCapture::Ports(vec![
                PortRange::single(80),
                PortRange::single(443)
            ]))
        );
        assert!("".parse::<InboundCapture>().is_err());
        assert!("".parse::<OutboundCapture>().is_err());
    }

    #[test]
    fn rejects_skipping_proxy_ports() {
        let cfg = Config {
            skip_outbound_ports: ports("15000-15002"),
            ..Config::default()
        };
        let err = cfg.validate().expect_err("must be rejected");
        assert_eq!(
            err.to_string(),
            "--skip-outbound-ports: port 15000-15002 includes 15001, the proxy's outbound capture \
             port (--outbound-port); the proxy's own ports cannot be skipped"
        );
        let cfg = Config {
            skip_inbound_ports: ports("15020"),
            ..Config::default()
        };
        assert!(
            cfg.validate()
                .expect_err("rejected")
                .to_string()
                .starts_with("--skip-inbound-ports:")
        );
        let cfg = Config {
            inbound: InboundCapture::Ports(ports("15006")),
            ..Config::default()
        };
        assert!(
            cfg.validate()
                .expect_err("rejected")
                .to_string()
                .starts_with("--inbound-ports:")
        );
    }

    #[test]
    fn rejects_contradictions() {
        let cfg = Config {
            inbound_port: 15001,
            ..Config::default()
        };
        assert!(
            cfg.validate()
                .expect_err("rejected")
                .to_string()
                .contains("--outbound-port and --inbound-port")
        );
        let cfg = Config {
            inbound: InboundCapture::Ports(ports("80,8080")),
            skip_inbound_ports: ports("8000-8100"),
            ..Config::default()
        };
        assert!(
            cfg.validate()
                .expect_err("rejected")
                .to_string()
                .starts_with("--skip-inbound-ports:")
        );
        let cfg = Config {
            ipv6: false,
            skip_outbound_cidrs: vec!["fd00::/8".parse().expect("valid")],
            ..Config::default()
        };
        assert!(
            cfg.validate()
                .expect_err("rejected")
                .to_string()
                .starts_with("--skip-outbound-cidrs:")
        );
        let cfg = Config {
            proxy_uid: 0,
            ..Config::default()
        };
        assert!(
            cfg.validate()
                .expect_err("rejected")
                .to_string()
                .starts_with("--proxy-uid:")
        );
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn predicts_capture() {
        let cfg = Config {
            skip_outbound_ports: ports("20001"),
            skip_outbound_cidrs: vec!["192.0.2.0/24".parse().expect("valid")],
            ..Config::default()
        };
        assert!(cfg.captures_outbound(&"198.51.100.1:80".parse().expect("addr")));
        assert!(!cfg.captures_outbound(&"198.51.100.1:20001".parse().expect("addr")));
        assert!(!cfg.captures_outbound(&"192.0.2.1:80".parse().expect("addr")));
        assert!(!cfg.captures_outbound(&"127.0.0.1:80".parse().expect("addr")));
        let cfg = Config {
            outbound: OutboundCapture::Cidrs(vec!["10.96.0.0/12".parse().expect("valid")]),
            ..Config::default()
        };
        assert!(cfg.captures_outbound(&"10.96.0.10:53".parse().expect("addr")));
        assert!(!cfg.captures_outbound(&"[2001:db8::1]:80".parse().expect("addr")));
    }
}
