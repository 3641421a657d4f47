//! remora-init's command line (the webhook sets the same flags through `REMORA_INIT_*`):
//! arguments split on NUL bytes, parsed by clap, validated into a [`Config`], and turned
//! into the iptables-restore input of each family.
//!
//! Asserted: bad flags are clap errors; a validated config gives a restore script made
//! only of `*nat`, chain declarations, `-A` rules and `COMMIT` (nothing from the input
//! can break a line or a comment); reading that script back as `iptables-save` output
//! finds exactly Remora's chains and jumps, so a second run replaces them in the same
//! transaction (idempotence); skipped CIDRs and ports are not captured; the dry run and
//! the cleanup preview render.

#![no_main]

use std::{ffi::OsString, net::SocketAddr, os::unix::ffi::OsStringExt};

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use remora_init::{
    flags::Flags,
    installed::{Installed, cleanup_preview},
    rules::{CHAINS, build, dry_run},
};

fuzz_target!(|data: &[u8]| {
    let args = std::iter::once(OsString::from("remora-init")).chain(
        data.split(|b| *b == 0)
            .map(|a| OsString::from_vec(a.to_vec())),
    );
    let Ok(flags) = Flags::try_parse_from(args) else {
        return;
    };
    let _ = flags.mode();
    let Ok(cfg) = flags.config() else {
        return;
    };
    for family in cfg.families() {
        let set = build(&cfg, family);
        let script = set.restore_script(&[]);
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines.first(), Some(&"*nat"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        assert_eq!(
            lines.len(),
            2 + CHAINS.len() + set.rules.len() + set.jumps.len()
        );
        for line in &lines[1..lines.len() - 1] {
            let ok =
                line.starts_with("-A ") || CHAINS.iter().any(|c| *line == format!(":{c} - [0:0]"));
            assert!(ok, "unexpected restore line {line:?}");
            assert!(!line.contains('\r'));
            if line.starts_with("-A ") {
                assert_eq!(line.matches('"').count(), 2, "comment quoting in {line:?}");
            }
        }
        // Read back as iptables-save shows it: exactly our chains and jumps.
        let installed = Installed::parse(&script);
        assert_eq!(installed.chains, CHAINS.map(String::from).to_vec());
        let jumps: Vec<String> = set
            .jumps
            .iter()
            .map(|j| format!("-A {}", j.spec()))
            .collect();
        assert_eq!(installed.jumps, jumps);
        let again = set.restore_script(&installed.jumps);
        for j in &set.jumps {
            assert!(again.contains(&format!("-D {}\n", j.spec())));
        }
        assert!(installed.cleanup_script().is_some());
    }
    for c in &cfg.skip_outbound_cidrs {
        let dest = SocketAddr::new(c.first_host(), 80);
        assert!(
            !cfg.captures_outbound(&dest),
            "{dest} in skipped {c} is captured"
        );
    }
    for r in &cfg.skip_outbound_ports {
        let port: u16 = r
            .to_string()
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a printed range starts with its first port");
        let dest = SocketAddr::from(([192, 0, 2, 1], port));
        assert!(
            !cfg.captures_outbound(&dest),
            "skipped port {port} is captured"
        );
    }
    assert!(dry_run(&cfg).lines().count() > 0);
    assert!(cleanup_preview(&cfg).contains("COMMIT"));
});
