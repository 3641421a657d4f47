//! `--validate`: proves that the installed rules redirect outbound TCP to the proxy.
//!
//! It runs where the proxy will run, before the proxy starts: it listens on the
//! outbound capture port itself, connects as an ordinary process to a probe address that
//! the configuration captures (a documentation address such as `192.0.2.1:20001` by
//! default, which nothing on a real network answers), and requires that the connection
//! arrives at the listener carrying a fresh token and that `SO_ORIGINAL_DST` names the
//! probe address. It changes no rule.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{Config, Family, OutboundCapture};
use crate::orig_dst;

/// Default IPv4 probe destination (TEST-NET-1, RFC 5737).
pub const PROBE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Default IPv6 probe destination (documentation prefix, RFC 3849).
pub const PROBE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const PROBE_PORTS: [u16; 3] = [20001, 30001, 40001];

/// Validation failed.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// The listener could not be opened.
    #[error(
        "cannot listen on the outbound capture port {port}: {source} (validate runs before the proxy starts, with the port free)"
    )]
    Bind {
        /// The port.
        port: u16,
        /// Why.
        source: std::io::Error,
    },
    /// The probe connection did not reach the listener.
    #[error(
        "outbound TCP is not redirected: a probe connection to {dest} did not arrive at the outbound capture port {port}: {reason}"
    )]
    NotRedirected {
        /// The probe destination.
        dest: SocketAddr,
        /// The outbound port.
        port: u16,
        /// What happened instead.
        reason: String,
    },
    /// The connection arrived but its original destination is wrong or unreadable.
    #[error("a probe connection to {dest} arrived at port {port} but SO_ORIGINAL_DST says {got}")]
    WrongOriginalDst {
        /// The probe destination.
        dest: SocketAddr,
        /// The outbound port.
        port: u16,
        /// What the kernel answered.
        got: String,
    },
    /// No probe destination could be reached at all (no route for any family).
    #[error("no probe could be sent: {0}")]
    NoRoute(String),
    /// No probe destination is captured by the configuration.
    #[error("--validate-addr: {0}")]
    NotCaptured(String),
}

/// What one probe showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Redirected with the right original destination.
    Redirected(SocketAddr),
    /// The family has no route in this namespace; not checked.
    NoRoute(SocketAddr),
}

/// The probe destinations for a configuration: the given ones (each must be captured),
/// or one default per configured family that the configuration captures.
pub fn probe_addrs(cfg: &Config, given: &[SocketAddr]) -> Result<Vec<SocketAddr>, ValidateError> {
    if !given.is_empty() {
        if let Some(a) = given.iter().find(|a| !cfg.captures_outbound(a)) {
            return Err(ValidateError::NotCaptured(format!(
                "{a} is not captured by the configured rules (skipped, loopback, or outside the included CIDRs)"
            )));
        }
        return Ok(given.to_vec());
    }
    let mut out = Vec::new();
    for family in cfg.families() {
        let mut ips = vec![match family {
            Family::V4 => IpAddr::V4(PROBE_V4),
            Family::V6 => IpAddr::V6(PROBE_V6),
        }];
        if let OutboundCapture::Cidrs(cidrs) = &cfg.outbound {
            ips.extend(
                cidrs
                    .iter()
                    .filter(|c| c.family() == family)
                    .map(|c| c.first_host()),
            );
        }
        let found = ips
            .iter()
            .flat_map(|ip| PROBE_PORTS.iter().map(|p| SocketAddr::new(*ip, *p)))
            .find(|a| cfg.captures_outbound(a));
        out.extend(found);
    }
    if out.is_empty() {
        return Err(ValidateError::NotCaptured(
            "no default probe address is captured by the configured rules; pick one with --validate-addr".into(),
        ));
    }
    Ok(out)
}

fn bind(port: u16) -> Result<TcpListener, ValidateError> {
    // Dual-stack first (IPv4 arrives as ::ffff:a.b.c.d); IPv4 only when IPv6 is off.
    TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
        .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        .map_err(|source| ValidateError::Bind { port, source })
}

fn token() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("remora-validate {} {nanos}", std::process::id())
}

/// Runs every probe; fails on the first that is not redirected correctly. Families
/// without a route are reported as [`Outcome::NoRoute`], but at least one probe must
/// succeed.
pub fn validate(
    port: u16,
    probes: &[SocketAddr],
    timeout: Duration,
) -> Result<Vec<Outcome>, ValidateError> {
    let listener = bind(port)?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ValidateError::Bind { port, source })?;
    let mut outcomes = Vec::new();
    let mut unreachable = Vec::new();
    for dest in probes {
        match probe(&listener, port, *dest, timeout) {
            Ok(o) => {
                if let Outcome::NoRoute(a) = &o {
                    unreachable.push(a.to_string());
                }
                outcomes.push(o);
            }
            Err(e) => return Err(e),
        }
    }
    if outcomes.iter().all(|o| matches!(o, Outcome::NoRoute(_))) {
        return Err(ValidateError::NoRoute(format!(
            "no route to {} (the namespace needs a default route)",
            unreachable.join(", ")
        )));
    }
    Ok(outcomes)
}

fn probe(
    listener: &TcpListener,
    port: u16,
    dest: SocketAddr,
    timeout: Duration,
) -> Result<Outcome, ValidateError> {
    let not_redirected = |reason: String| ValidateError::NotRedirected { dest, port, reason };
    let mut client = match TcpStream::connect_timeout(&dest, timeout) {
        Ok(c) => c,
        Err(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => {
            return Ok(Outcome::NoRoute(dest));
        }
        Err(e) if e.kind() == ErrorKind::TimedOut => {
            return Err(not_redirected(format!(
                "the connection timed out after {timeout:?}, so it left the pod"
            )));
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            return Err(not_redirected(
                "the connection was refused, so it was sent somewhere nothing listens".into(),
            ));
        }
        Err(e) => return Err(not_redirected(format!("connect failed: {e}"))),
    };
    let token = token();
    client
        .write_all(format!("{token}\n").as_bytes())
        .map_err(|e| not_redirected(format!("writing the probe token failed: {e}")))?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                if read_token(&conn, deadline).as_deref() != Some(token.as_str()) {
                    continue; // someone else's connection
                }
                return match orig_dst::original_dst(&conn) {
                    Ok(got) if orig_dst::canonical(got) == orig_dst::canonical(dest) => {
                        Ok(Outcome::Redirected(dest))
                    }
                    Ok(got) => Err(ValidateError::WrongOriginalDst {
                        dest,
                        port,
                        got: got.to_string(),
                    }),
                    Err(e) => Err(ValidateError::WrongOriginalDst {
                        dest,
                        port,
                        got: format!("nothing ({e})"),
                    }),
                };
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(not_redirected(format!(
                        "the connection was accepted elsewhere and nothing arrived within {timeout:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(not_redirected(format!("accept failed: {e}"))),
        }
    }
}

fn read_token(conn: &TcpStream, deadline: Instant) -> Option<String> {
    let left = deadline.saturating_duration_since(Instant::now());
    conn.set_nonblocking(false).ok()?;
    conn.set_read_timeout(Some(left.max(Duration::from_millis(10))))
        .ok()?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).ok()?;
    Some(line.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_probes_follow_the_configuration() {
        let cfg = Config::default();
        assert_eq!(
            probe_addrs(&cfg, &[]).expect("probes"),
            vec![
                "192.0.2.1:20001".parse::<SocketAddr>().expect("addr"),
                "[2001:db8::1]:20001".parse().expect("addr"),
            ]
        );
        let cfg = Config {
            ipv6: false,
            skip_outbound_ports: vec!["20001".parse().expect("port")],
            outbound: OutboundCapture::Cidrs(vec!["10.96.0.0/12".parse().expect("cidr")]),
            ..Config::default()
        };
        assert_eq!(
            probe_addrs(&cfg, &[]).expect("probes"),
            vec!["10.96.0.1:30001".parse::<SocketAddr>().expect("addr")]
        );
        let err =
            probe_addrs(&cfg, &["192.0.2.1:80".parse().expect("addr")]).expect_err("not captured");
        assert!(
            err.to_string()
                .starts_with("--validate-addr: 192.0.2.1:80 is not captured")
        );
    }
}
