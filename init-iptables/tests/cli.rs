//! Command-line surface checks that need no network namespace (nothing is applied).

use std::process::Command;

const INIT: &str = env!("CARGO_BIN_EXE_remora-init");

#[test]
fn help_documents_exit_codes_and_env() {
    let out = Command::new(INIT)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "Exit codes:",
        "  5  --validate",
        "REMORA_INIT_SKIP_OUTBOUND_CIDRS",
        "REMORA_INIT_BACKEND",
        "REMORA_INIT_ACCEL_REGISTRATIONS",
        "Ignored with --dry-run, --cleanup and --validate",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}
