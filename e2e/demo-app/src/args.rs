//! Command line: `serve` and `load`, every flag also settable from the environment so a
//! pod spec can set it with `env:`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "remora-demo-app",
    version,
    about = "Remora's demo workload: a server that says which pod answered, and a load client"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// HTTP/1.1 + h2c on --listen (`/` answers JSON naming the pod, `/healthz`, `/readyz`),
    /// gRPC health on --grpc-listen.
    Serve(ServeArgs),
    /// Sends --rps requests per second to --url and counts the answers per pod.
    Load(LoadArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[arg(long, env = "DEMO_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// gRPC (grpc.health.v1) address; `off` disables it.
    #[arg(long, env = "DEMO_GRPC_LISTEN", default_value = "0.0.0.0:9090", value_parser = parse_optional_addr)]
    pub grpc_listen: OptionalAddr,
    /// Delay before every answer (a request's `?delay=` overrides it).
    #[arg(long, env = "DEMO_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub delay: Duration,
    /// Fraction (0..=1) of requests answered 503 (a request's `?fail=` overrides it).
    #[arg(long, env = "DEMO_FAILURE_RATE", default_value = "0", value_parser = parse_rate)]
    pub failure_rate: f64,
    /// After SIGTERM: keep serving (with /readyz failing) this long, then stop accepting.
    #[arg(long, env = "DEMO_SHUTDOWN_DELAY", default_value = "1s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// After that: how long open connections may take to finish.
    #[arg(long, env = "DEMO_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// A socket address or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// `http://host:port/path` (plain HTTP: the mesh adds TLS).
    #[arg(long, env = "DEMO_URL")]
    pub url: String,
    #[arg(long, env = "DEMO_RPS", default_value_t = 50.0, value_parser = parse_rps)]
    pub rps: f64,
    /// How long to send; `0s` means until SIGINT/SIGTERM.
    #[arg(long, env = "DEMO_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Requests in flight at most; a request due while this many are pending is skipped
    /// (and counted), so the rate stays fixed instead of queueing.
    #[arg(long, env = "DEMO_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Per-request timeout.
    #[arg(long, env = "DEMO_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print a JSON line (and a human line on stderr) every interval; `0s` for none.
    #[arg(long, env = "DEMO_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Extra request header `name: value` (repeatable).
    #[arg(long = "header", short = 'H', value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    #[arg(long, env = "DEMO_H2")]
    pub h2: bool,
    /// Exit with status 1 when the success rate (percent) ends below this.
    #[arg(long, env = "DEMO_MIN_SUCCESS_RATE")]
    pub min_success_rate: Option<f64>,
    /// When done, tell the pod's classic sidecar to drain and exit (`POST /shutdown` on
    /// its admin port), so a Job's pod completes.
    #[arg(long, env = "DEMO_STOP_PROXY")]
    pub stop_proxy: bool,
    /// The proxy's admin address for --stop-proxy.
    #[arg(long, env = "DEMO_PROXY_ADMIN", default_value = crate::sidecar::DEFAULT_ADMIN)]
    pub proxy_admin: SocketAddr,
}

/// `250ms`, `5s`, `1m30s`, `1h`, or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || format!("invalid duration '{s}': expected e.g. 250ms, 5s, 1m30s, 1h");
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 || digits > 9 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => return Err(bad()),
        };
        total += unit;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "invalid failure rate '{s}': expected a number from 0 to 1"
        )),
    }
}

fn parse_rps(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1_000_000.0 => Ok(r),
        _ => Err(format!(
            "invalid rate '{s}': expected requests per second, > 0"
        )),
    }
}

fn parse_optional_addr(s: &str) -> Result<OptionalAddr, String> {
    if s.trim() == "off" {
        return Ok(OptionalAddr(None));
    }
    s.trim()
        .parse()
        .map(|a| OptionalAddr(Some(a)))
        .map_err(|_| format!("invalid address '{s}': expected ip:port or off"))
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("invalid header '{s}': expected 'name: value'"))?;
    let name = name.trim();
    http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("invalid header name '{name}'"))?;
    http::HeaderValue::from_str(value.trim())
        .map_err(|_| format!("invalid header value in '{s}'"))?;
    Ok((name.to_owned(), value.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "5", "s", "5x", "-1s", "1.5s", "1234567890s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rates_headers_and_addresses() {
        assert_eq!(parse_rate("0.1"), Ok(0.1));
        assert!(parse_rate("1.5").is_err());
        assert!(parse_rate("nope").is_err());
        assert!(parse_rps("0").is_err());
        assert_eq!(
            parse_header("x-canary: true"),
            Ok(("x-canary".into(), "true".into()))
        );
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: x").is_err());
        assert_eq!(parse_optional_addr("off"), Ok(OptionalAddr(None)));
        assert!(parse_optional_addr("9090").is_err());
    }

    #[test]
    fn the_command_line_parses() {
        let cli = Cli::try_parse_from([
            "remora-demo-app",
            "load",
            "--url",
            "http://10.96.0.10:9080/api/x",
            "--rps",
            "200",
            "--duration",
            "5s",
            "-H",
            "x-canary: true",
            "--h2",
            "--stop-proxy",
        ])
        .expect("parse");
        let Cmd::Load(l) = cli.cmd else {
            panic!("not load");
        };
        assert!(l.stop_proxy);
        assert_eq!(l.proxy_admin, "127.0.0.1:15020".parse().expect("addr"));
        assert_eq!(l.rps, 200.0);
        assert_eq!(l.duration, Duration::from_secs(5));
        assert_eq!(l.headers, vec![("x-canary".to_owned(), "true".to_owned())]);
        assert!(l.h2);
        assert!(Cli::try_parse_from(["remora-demo-app", "serve", "--failure-rate", "2"]).is_err());
    }
}
