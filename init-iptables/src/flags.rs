//! The command line of `remora-init`: clap flags, each also read from a
//! `REMORA_INIT_*` environment variable (the webhook configures the init container
//! through its environment), turned into a validated [`Config`] and a [`Mode`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use clap::builder::{BoolishValueParser, OsStringValueParser, TypedValueParser as _};

use crate::backend::BackendChoice;
use crate::config::{
    CidrList, Config, ConfigError, DEFAULT_ADMIN_PORT, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT,
    DEFAULT_PROXY_ID, InboundCapture, OutboundCapture, PortList,
};

/// Exit codes, also printed by `--help`.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success (rules applied, removed, printed or validated)
  2  invalid flags or environment variables; no rule was touched
  3  no usable iptables backend (tools missing or failing); no rule was touched
  4  applying or removing the rules failed; no partial rule set is left
  5  --validate: outbound TCP is not redirected to the proxy as configured";

/// Installs the iptables rules that send a pod's TCP traffic through the Remora proxy.
///
/// Runs as the pod's init container with CAP_NET_ADMIN (and CAP_NET_RAW). Outbound TCP
/// goes to the proxy's outbound port, inbound TCP to its inbound port; the proxy's own
/// traffic (its UID/GID), loopback, skipped ports and skipped CIDRs are left alone, and
/// UDP (DNS included) is never touched. Rules are applied atomically with
/// iptables-restore, once per address family; running it twice is the same as once.
#[derive(Debug, Clone, Parser)]
#[command(name = "remora-init", version, after_help = EXIT_CODES)]
pub struct Flags {
    /// The proxy's outbound capture port.
    #[arg(long, env = "REMORA_INIT_OUTBOUND_PORT", default_value_t = DEFAULT_OUTBOUND_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,

    /// The proxy's inbound capture port.
    #[arg(long, env = "REMORA_INIT_INBOUND_PORT", default_value_t = DEFAULT_INBOUND_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,

    /// The proxy's admin port; inbound connections to it are never redirected.
    #[arg(long, env = "REMORA_INIT_ADMIN_PORT", default_value_t = DEFAULT_ADMIN_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub admin_port: u16,

    /// UID the proxy runs as; its connections are never captured (loop guard).
    #[arg(long, env = "REMORA_INIT_PROXY_UID", default_value_t = DEFAULT_PROXY_ID)]
    pub proxy_uid: u32,

    /// GID the proxy runs as; its connections are never captured (loop guard).
    #[arg(long, env = "REMORA_INIT_PROXY_GID", default_value_t = DEFAULT_PROXY_ID)]
    pub proxy_gid: u32,

    /// Inbound ports to capture: '*' for all, or a list such as '8080,9000-9100'.
    #[arg(
        long,
        env = "REMORA_INIT_INBOUND_PORTS",
        default_value = "*",
        value_name = "PORTS"
    )]
    pub inbound_ports: InboundCapture,

    /// Inbound ports never captured, e.g. '22,9000-9100' (with --inbound-ports '*').
    #[arg(
        long,
        env = "REMORA_INIT_SKIP_INBOUND_PORTS",
        default_value = "",
        value_name = "PORTS",
        hide_default_value = true
    )]
    pub skip_inbound_ports: PortList,

    /// Outbound destination ports never captured, e.g. '3306,5432'.
    #[arg(
        long,
        env = "REMORA_INIT_SKIP_OUTBOUND_PORTS",
        default_value = "",
        value_name = "PORTS",
        hide_default_value = true
    )]
    pub skip_outbound_ports: PortList,

    /// Outbound destination networks never captured, e.g. '169.254.169.254/32,fd00::/8'.
    #[arg(
        long,
        env = "REMORA_INIT_SKIP_OUTBOUND_CIDRS",
        default_value = "",
        value_name = "CIDRS",
        hide_default_value = true
    )]
    pub skip_outbound_cidrs: CidrList,

    /// Outbound destinations to capture: '*' for all, or only these networks.
    #[arg(
        long,
        env = "REMORA_INIT_INCLUDE_OUTBOUND_CIDRS",
        default_value = "*",
        value_name = "CIDRS"
    )]
    pub include_outbound_cidrs: OutboundCapture,

    /// Install IPv6 rules (ip6tables) as well as IPv4.
    #[arg(long, env = "REMORA_INIT_IPV6", default_value = "true", value_name = "BOOL",
          action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub ipv6: bool,

    /// iptables backend: auto (detect), nft or legacy.
    #[arg(
        long,
        env = "REMORA_INIT_BACKEND",
        default_value = "auto",
        value_name = "BACKEND"
    )]
    pub backend: BackendChoice,

    /// Print the rules that would be applied (with --cleanup: removed) and touch nothing.
    #[arg(long, env = "REMORA_INIT_DRY_RUN", value_parser = BoolishValueParser::new(),
          action = clap::ArgAction::SetTrue)]
    pub dry_run: bool,

    /// Remove exactly the chains and jumps remora-init added, nothing else.
    #[arg(long, env = "REMORA_INIT_CLEANUP", value_parser = BoolishValueParser::new(),
          action = clap::ArgAction::SetTrue, conflicts_with = "validate")]
    pub cleanup: bool,

    /// Change nothing; prove that installed rules redirect outbound TCP: a probe
    /// connection must arrive at a listener on the outbound port with the right
    /// original destination (run before the proxy starts).
    #[arg(long, env = "REMORA_INIT_VALIDATE", value_parser = BoolishValueParser::new(),
          action = clap::ArgAction::SetTrue, conflicts_with = "dry_run")]
    pub validate: bool,

    /// Probe destinations for --validate (default: 192.0.2.1:20001 and
    /// [2001:db8::1]:20001, or an address of the included CIDRs).
    #[arg(
        long,
        env = "REMORA_INIT_VALIDATE_ADDR",
        value_name = "ADDRS",
        default_value = "",
        hide_default_value = true
    )]
    pub validate_addr: AddrList,

    /// How long --validate waits for each probe connection, in milliseconds.
    #[arg(long, env = "REMORA_INIT_VALIDATE_TIMEOUT_MS", default_value_t = 3000,
          value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub validate_timeout_ms: u64,

    /// After applying the rules, register this pod with the node's remora-accel agent by
    /// writing <netns cookie>.json (the outbound capture settings) into DIR; empty: off.
    /// The rules stay installed as the fallback, and a failed write is only a warning.
    /// Ignored with --dry-run, --cleanup and --validate (nothing is written or removed).
    #[arg(
        long,
        env = "REMORA_INIT_ACCEL_REGISTRATIONS",
        default_value = "",
        value_name = "DIR",
        hide_default_value = true,
        // Empty is allowed (off), which clap's PathBuf parser refuses.
        value_parser = OsStringValueParser::new().map(PathBuf::from)
    )]
    pub accel_registrations: PathBuf,
}

/// A comma-separated list of socket addresses (`192.0.2.1:20001,[2001:db8::1]:20001`);
/// empty is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrList(pub Vec<SocketAddr>);

impl std::str::FromStr for AddrList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.parse()
                    .map_err(|_| format!("'{a}' is not an address:port such as 192.0.2.1:20001"))
            })
            .collect::<Result<_, _>>()
            .map(AddrList)
    }
}

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Install the rules.
    Apply,
    /// Remove the rules.
    Cleanup,
    /// Print what `Apply` would install.
    DryRun,
    /// Print what `Cleanup` would remove at most.
    DryRunCleanup,
    /// Check that the installed rules redirect.
    Validate,
}

impl Flags {
    /// The validated configuration the flags describe.
    pub fn config(&self) -> Result<Config, ConfigError> {
        Config {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            admin_port: self.admin_port,
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            inbound: self.inbound_ports.clone(),
            skip_inbound_ports: self.skip_inbound_ports.0.clone(),
            skip_outbound_ports: self.skip_outbound_ports.0.clone(),
            skip_outbound_cidrs: self.skip_outbound_cidrs.0.clone(),
            outbound: self.include_outbound_cidrs.clone(),
            ipv6: self.ipv6,
        }
        .validate()
    }

    /// The mode the flags select.
    pub fn mode(&self) -> Mode {
        match (self.dry_run, self.cleanup, self.validate) {
            (true, true, _) => Mode::DryRunCleanup,
            (true, false, _) => Mode::DryRun,
            (false, true, _) => Mode::Cleanup,
            (false, false, true) => Mode::Validate,
            (false, false, false) => Mode::Apply,
        }
    }

    /// The accelerator's registration directory, if `--accel-registrations` is set.
    pub fn accel_registrations(&self) -> Option<&Path> {
        let dir = self.accel_registrations.as_path();
        (!dir.as_os_str().is_empty()).then_some(dir)
    }

    /// `--validate-timeout-ms` as a duration.
    pub fn validate_timeout(&self) -> Duration {
        Duration::from_millis(self.validate_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Flags::command().debug_assert();
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        let cmd = Flags::command();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{id} has no environment variable"));
            let expected = format!("REMORA_INIT_{}", id.to_uppercase());
            assert_eq!(env.to_str(), Some(expected.as_str()), "--{id}");
        }
    }

    #[test]
    fn defaults() {
        let flags = Flags::try_parse_from(["remora-init"]).expect("defaults parse");
        assert_eq!(flags.config().expect("valid"), Config::default());
        assert_eq!(flags.mode(), Mode::Apply);
    }

    #[test]
    fn accel_registrations_is_off_by_default_and_set_by_its_flag() {
        let off = Flags::try_parse_from(["remora-init"]).expect("defaults parse");
        assert_eq!(off.accel_registrations(), None);
        let on =
            Flags::try_parse_from(["remora-init", "--accel-registrations", "/run/remora/accel"])
                .expect("flag parses");
        assert_eq!(
            on.accel_registrations(),
            Some(Path::new("/run/remora/accel"))
        );
        // The registration never changes the rules.
        assert_eq!(on.config().expect("valid"), Config::default());
        let empty = Flags::try_parse_from(["remora-init", "--accel-registrations="])
            .expect("an empty value parses");
        assert_eq!(empty.accel_registrations(), None);
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (args, flag) in [
            (
                vec!["--skip-inbound-ports", "22,abc"],
                "--skip-inbound-ports",
            ),
            (
                vec!["--skip-outbound-cidrs", "10.0.0.0/33"],
                "--skip-outbound-cidrs",
            ),
            (vec!["--outbound-port", "0"], "--outbound-port"),
            (vec!["--backend", "iptables"], "--backend"),
            (vec!["--inbound-ports", ""], "--inbound-ports"),
        ] {
            let err = Flags::try_parse_from(std::iter::once("remora-init").chain(args.clone()))
                .expect_err("must be rejected");
            assert!(err.to_string().contains(flag), "{args:?}: {err}");
        }
    }
}
