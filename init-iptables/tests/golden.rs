//! Golden tests of the pure rule builder: flags in, the exact `--dry-run` text out.
//!
//! Each case's expected output is `tests/golden/<case>.rules`; after an intended change,
//! `UPDATE_GOLDEN=1 cargo test -p remora-init --test golden` rewrites them, and the diff
//! is reviewed like code.

use std::path::PathBuf;

use clap::Parser;
use remora_init::flags::Flags;
use remora_init::{installed, rules};

fn render(args: &[&str], cleanup: bool) -> String {
    let flags = Flags::try_parse_from(std::iter::once("remora-init").chain(args.iter().copied()))
        .expect("golden case flags parse");
    let cfg = flags.config().expect("golden case flags are valid");
    let body = if cleanup {
        installed::cleanup_preview(&cfg)
    } else {
        rules::dry_run(&cfg)
    };
    let shown = if args.is_empty() {
        "(defaults)".to_string()
    } else {
        args.join(" ")
    };
    format!("# flags: {shown}\n{body}")
}

fn check(case: &str, args: &[&str]) {
    check_text(case, &render(args, false));
}

fn check_text(case: &str, actual: &str) {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "golden",
        &format!("{case}.rules"),
    ]
    .iter()
    .collect();
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run UPDATE_GOLDEN=1 cargo test -p remora-init --test golden",
            path.display()
        )
    });
    pretty_assertions::assert_eq!(
        expected,
        actual,
        "{} differs; if intended, UPDATE_GOLDEN=1 cargo test -p remora-init --test golden",
        path.display()
    );
}

#[test]
fn defaults() {
    check("defaults", &[]);
}

#[test]
fn inbound_ports_list() {
    check("inbound_ports_list", &["--inbound-ports", "8080,9000-9100"]);
}

#[test]
fn skip_inbound_ports() {
    check("skip_inbound_ports", &["--skip-inbound-ports", "22,8443"]);
}

#[test]
fn skip_outbound_ports() {
    check(
        "skip_outbound_ports",
        &["--skip-outbound-ports", "3306,5432-5433"],
    );
}

#[test]
fn skip_outbound_cidrs() {
    check(
        "skip_outbound_cidrs",
        &[
            "--skip-outbound-cidrs",
            "169.254.169.254/32,10.0.0.0/8,fd00::/8",
        ],
    );
}

#[test]
fn include_outbound_cidrs() {
    check(
        "include_outbound_cidrs",
        &["--include-outbound-cidrs", "10.96.0.0/12,fd00:10:96::/112"],
    );
}

#[test]
fn include_outbound_cidrs_ipv4_only() {
    check(
        "include_outbound_cidrs_ipv4_only",
        &["--include-outbound-cidrs", "10.96.0.0/12"],
    );
}

#[test]
fn custom_proxy_uid_gid() {
    check(
        "custom_proxy_uid_gid",
        &["--proxy-uid", "2102", "--proxy-gid", "2103"],
    );
}

#[test]
fn custom_ports() {
    check(
        "custom_ports",
        &[
            "--outbound-port",
            "4140",
            "--inbound-port",
            "4143",
            "--admin-port",
            "4191",
        ],
    );
}

#[test]
fn ipv6_off() {
    check("ipv6_off", &["--ipv6", "false"]);
}

#[test]
fn everything_combined() {
    check(
        "combined",
        &[
            "--inbound-ports",
            "*",
            "--skip-inbound-ports",
            "22",
            "--skip-outbound-ports",
            "3306",
            "--skip-outbound-cidrs",
            "169.254.169.254/32,fd00::/8",
            "--include-outbound-cidrs",
            "10.0.0.0/8,fc00::/7",
            "--proxy-uid",
            "2102",
            "--proxy-gid",
            "2102",
        ],
    );
}

#[test]
fn cleanup_preview() {
    check_text("cleanup", &render(&[], true));
}
