//! The pure rule builder: a [`Config`] and a [`Family`] in, `iptables-restore` text out.
//!
//! The rules live in four chains of Remora's own in the `nat` table, reached by one jump
//! from `PREROUTING` and one from `OUTPUT`, both for TCP only (UDP, and so DNS, never
//! enters them):
//!
//! - `REMORA_INBOUND`: RETURN for the proxy's admin port and skipped ports, then the
//!   captured ports go to `REMORA_IN_REDIRECT`, which redirects to the inbound port.
//! - `REMORA_OUTPUT`: RETURN for the proxy's UID and GID (the loop guard), for loopback
//!   destinations, skipped ports and skipped CIDRs; the app calling its own pod address
//!   through `lo` and everything else (or only the included CIDRs) go to
//!   `REMORA_REDIRECT`, which redirects to the outbound port.
//!
//! Every rule carries a `remora: ...` comment saying why it exists. The text is applied
//! with `--noflush`: declaring a chain creates or empties it, so re-applying replaces the
//! chains' contents in the same transaction instead of appending twice.

use std::fmt::Write as _;

use crate::config::{Config, Family, InboundCapture, OutboundCapture};

/// Inbound entry chain, jumped to from `nat PREROUTING`.
pub const CHAIN_INBOUND: &str = "REMORA_INBOUND";
/// Redirects captured inbound TCP to the proxy's inbound port.
pub const CHAIN_IN_REDIRECT: &str = "REMORA_IN_REDIRECT";
/// Outbound entry chain, jumped to from `nat OUTPUT`.
pub const CHAIN_OUTPUT: &str = "REMORA_OUTPUT";
/// Redirects captured outbound TCP to the proxy's outbound port.
pub const CHAIN_REDIRECT: &str = "REMORA_REDIRECT";
/// All chains remora-init owns, in the order they are declared.
pub const CHAINS: [&str; 4] = [
    CHAIN_INBOUND,
    CHAIN_IN_REDIRECT,
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
];

/// One `-A` rule: a chain, its matches, a comment and a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The chain the rule is appended to.
    pub chain: &'static str,
    /// Match arguments (may be empty).
    pub matches: String,
    /// Why the rule exists; rendered as `-m comment --comment "remora: ..."`.
    pub comment: String,
    /// The target with its arguments (`RETURN`, `REDIRECT --to-ports 15001`, a chain).
    pub target: String,
}

impl Rule {
    fn new(
        chain: &'static str,
        matches: impl Into<String>,
        comment: impl Into<String>,
        target: impl Into<String>,
    ) -> Self {
        Self {
            chain,
            matches: matches.into(),
            comment: comment.into(),
            target: target.into(),
        }
    }

    /// The rule's body after `-A`/`-D` (chain included).
    pub fn spec(&self) -> String {
        let mut s = String::from(self.chain);
        if !self.matches.is_empty() {
            s.push(' ');
            s.push_str(&self.matches);
        }
        // Comments are generated here and never contain a double quote.
        let _ = write!(
            s,
            " -m comment --comment \"remora: {}\" -j {}",
            self.comment, self.target
        );
        s
    }
}

/// The rules of one family: the contents of Remora's chains and the two jumps to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// The address family.
    pub family: Family,
    /// Rules inside Remora's chains, in order.
    pub rules: Vec<Rule>,
    /// The jumps from `PREROUTING` and `OUTPUT`.
    pub jumps: Vec<Rule>,
}

impl RuleSet {
    /// The `iptables-restore --noflush` input that installs this rule set.
    ///
    /// `existing_jumps` are `-A ...` lines for jumps to Remora's chains already present
    /// (from `iptables-save`); they are deleted in the same transaction before the jumps
    /// are added again, so applying twice leaves exactly one of each.
    pub fn restore_script(&self, existing_jumps: &[String]) -> String {
        let mut out = String::from("*nat\n");
        for chain in CHAINS {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for rule in &self.rules {
            let _ = writeln!(out, "-A {}", rule.spec());
        }
        for line in existing_jumps {
            if let Some(spec) = line.strip_prefix("-A ") {
                let _ = writeln!(out, "-D {spec}");
            }
        }
        for jump in &self.jumps {
            let _ = writeln!(out, "-A {}", jump.spec());
        }
        out.push_str("COMMIT\n");
        out
    }
}

fn loopback_net(family: Family) -> &'static str {
    match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1/128",
    }
}

/// Builds the rule set of one family from a validated configuration.
pub fn build(cfg: &Config, family: Family) -> RuleSet {
    let mut rules = Vec::new();

    // Inbound.
    rules.push(Rule::new(
        CHAIN_INBOUND,
        format!("-p tcp --dport {}", cfg.admin_port),
        format!(
            "the proxy admin port {} is never redirected",
            cfg.admin_port
        ),
        "RETURN",
    ));
    match &cfg.inbound {
        InboundCapture::All => {
            for p in &cfg.skip_inbound_ports {
                rules.push(Rule::new(
                    CHAIN_INBOUND,
                    format!("-p tcp --dport {}", p.iptables_arg()),
                    format!("skipped inbound port {p}"),
                    "RETURN",
                ));
            }
            rules.push(Rule::new(
                CHAIN_INBOUND,
                "-p tcp",
                "capture inbound TCP to every other port",
                CHAIN_IN_REDIRECT,
            ));
        }
        InboundCapture::Ports(ports) => {
            for p in ports {
                rules.push(Rule::new(
                    CHAIN_INBOUND,
                    format!("-p tcp --dport {}", p.iptables_arg()),
                    format!("capture inbound TCP to port {p}"),
                    CHAIN_IN_REDIRECT,
                ));
            }
        }
    }
    rules.push(Rule::new(
        CHAIN_IN_REDIRECT,
        "-p tcp",
        format!(
            "redirect captured inbound TCP to the proxy inbound port {}",
            cfg.inbound_port
        ),
        format!("REDIRECT --to-ports {}", cfg.inbound_port),
    ));

    // Outbound.
    rules.push(Rule::new(
        CHAIN_OUTPUT,
        format!("-m owner --uid-owner {}", cfg.proxy_uid),
        format!(
            "loop guard: traffic of the proxy (uid {}) is not captured",
            cfg.proxy_uid
        ),
        "RETURN",
    ));
    rules.push(Rule::new(
        CHAIN_OUTPUT,
        format!("-m owner --gid-owner {}", cfg.proxy_gid),
        format!(
            "loop guard: traffic of the proxy (gid {}) is not captured",
            cfg.proxy_gid
        ),
        "RETURN",
    ));
    rules.push(Rule::new(
        CHAIN_OUTPUT,
        format!("-d {} -o lo", loopback_net(family)),
        "loopback traffic bypasses the proxy",
        "RETURN",
    ));
    for p in &cfg.skip_outbound_ports {
        rules.push(Rule::new(
            CHAIN_OUTPUT,
            format!("-p tcp --dport {}", p.iptables_arg()),
            format!("skipped outbound port {p}"),
            "RETURN",
        ));
    }
    for c in cfg
        .skip_outbound_cidrs
        .iter()
        .filter(|c| c.family() == family)
    {
        rules.push(Rule::new(
            CHAIN_OUTPUT,
            format!("-d {c}"),
            format!("skipped outbound CIDR {c}"),
            "RETURN",
        ));
    }
    match &cfg.outbound {
        OutboundCapture::All => {
            rules.push(Rule::new(
                CHAIN_OUTPUT,
                "-o lo",
                "the app calling its own pod address through lo is captured",
                CHAIN_REDIRECT,
            ));
            rules.push(Rule::new(
                CHAIN_OUTPUT,
                "",
                "capture all other outbound TCP",
                CHAIN_REDIRECT,
            ));
        }
        OutboundCapture::Cidrs(cidrs) => {
            for c in cidrs.iter().filter(|c| c.family() == family) {
                rules.push(Rule::new(
                    CHAIN_OUTPUT,
                    format!("-d {c}"),
                    format!("capture outbound TCP to included CIDR {c}"),
                    CHAIN_REDIRECT,
                ));
            }
            rules.push(Rule::new(
                CHAIN_OUTPUT,
                "",
                format!("{family} destinations outside the included CIDRs bypass the proxy"),
                "RETURN",
            ));
        }
    }
    rules.push(Rule::new(
        CHAIN_REDIRECT,
        "-p tcp",
        format!(
            "redirect captured outbound TCP to the proxy outbound port {}",
            cfg.outbound_port
        ),
        format!("REDIRECT --to-ports {}", cfg.outbound_port),
    ));

    let jumps = vec![
        Rule::new(
            "PREROUTING",
            "-p tcp",
            format!("inbound TCP goes through {CHAIN_INBOUND}"),
            CHAIN_INBOUND,
        ),
        Rule::new(
            "OUTPUT",
            "-p tcp",
            format!("outbound TCP goes through {CHAIN_OUTPUT}"),
            CHAIN_OUTPUT,
        ),
    ];
    RuleSet {
        family,
        rules,
        jumps,
    }
}

fn list_or<T: std::fmt::Display>(items: &[T], none: &str) -> String {
    if items.is_empty() {
        none.to_string()
    } else {
        items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A comment header summarising the configuration, for audit.
pub fn summary(cfg: &Config) -> String {
    let inbound = match &cfg.inbound {
        InboundCapture::All => "* (all)".to_string(),
        InboundCapture::Ports(p) => list_or(p, "none"),
    };
    let outbound = match &cfg.outbound {
        OutboundCapture::All => "* (all)".to_string(),
        OutboundCapture::Cidrs(c) => list_or(c, "none"),
    };
    let mut s = String::new();
    s.push_str("# remora-init: rules for the pod's network namespace (table nat)\n");
    let _ = writeln!(
        s,
        "#   proxy uid {} gid {}; outbound capture port {}; inbound capture port {}; admin port {}",
        cfg.proxy_uid, cfg.proxy_gid, cfg.outbound_port, cfg.inbound_port, cfg.admin_port
    );
    let _ = writeln!(
        s,
        "#   inbound ports captured: {inbound}; skipped: {}",
        list_or(&cfg.skip_inbound_ports, "none")
    );
    let _ = writeln!(
        s,
        "#   outbound CIDRs captured: {outbound}; skipped CIDRs: {}; skipped ports: {}",
        list_or(&cfg.skip_outbound_cidrs, "none"),
        list_or(&cfg.skip_outbound_ports, "none")
    );
    let _ = writeln!(s, "#   IPv6: {}", if cfg.ipv6 { "on" } else { "off" });
    s
}

/// The restore program for a family, as named in the dry-run output.
fn restore_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables-restore --noflush",
        Family::V6 => "ip6tables-restore --noflush",
    }
}

/// What `--dry-run` prints: the summary, then each family's restore input as it would be
/// applied to a namespace without Remora's rules.
pub fn dry_run(cfg: &Config) -> String {
    let mut out = summary(cfg);
    for family in cfg.families() {
        let _ = write!(
            out,
            "\n# {family}: applied atomically with `{}`\n{}",
            restore_name(family),
            build(cfg, family).restore_script(&[])
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_jumps_are_replaced_in_the_same_transaction() {
        let set = build(&Config::default(), Family::V4);
        let existing = vec![
            "-A OUTPUT -p tcp -j REMORA_OUTPUT".to_string(),
            "-A PREROUTING -p tcp -j REMORA_INBOUND".to_string(),
        ];
        let script = set.restore_script(&existing);
        let lines: Vec<&str> = script.lines().collect();
        let del = lines
            .iter()
            .position(|l| *l == "-D OUTPUT -p tcp -j REMORA_OUTPUT")
            .expect("stale jump deleted");
        let add = lines
            .iter()
            .position(|l| l.starts_with("-A OUTPUT "))
            .expect("jump added");
        assert!(del < add, "delete before add:\n{script}");
        assert_eq!(lines.last(), Some(&"COMMIT"));
    }

    #[test]
    fn udp_never_enters_remora_chains() {
        for family in Family::ALL {
            for jump in build(&Config::default(), family).jumps {
                assert!(jump.matches.contains("-p tcp"), "{jump:?}");
            }
        }
    }
}
