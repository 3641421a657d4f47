//! One run of `remora-init`: flags in, side effects and an exit code out.

use std::path::Path;
use std::process::ExitCode;

use crate::accel::{self, Registration};
use crate::backend;
use crate::config::Config;
use crate::exec::Executor;
use crate::flags::{Flags, Mode};
use crate::installed;
use crate::rules;
use crate::validate::{self, Outcome};

/// Exit code: invalid flags or environment; nothing touched.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit code: no usable iptables backend; nothing touched.
pub const EXIT_BACKEND: u8 = 3;
/// Exit code: applying or removing failed; no partial rule set left.
pub const EXIT_APPLY: u8 = 4;
/// Exit code: `--validate` found outbound TCP is not redirected.
pub const EXIT_VALIDATE: u8 = 5;

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("remora-init: error: {msg}");
    ExitCode::from(code)
}

/// Runs `remora-init` with parsed flags. Diagnostics go to stderr, `--dry-run` output
/// to stdout.
pub fn run(flags: &Flags) -> ExitCode {
    let cfg = match flags.config() {
        Ok(c) => c,
        Err(e) => return fail(EXIT_BAD_INPUT, e),
    };
    let mode = flags.mode();
    match mode {
        Mode::DryRun => {
            print!("{}", rules::dry_run(&cfg));
            return ExitCode::SUCCESS;
        }
        Mode::DryRunCleanup => {
            print!("{}", installed::cleanup_preview(&cfg));
            return ExitCode::SUCCESS;
        }
        Mode::Validate => return run_validate(flags, &cfg),
        Mode::Apply | Mode::Cleanup => {}
    }
    // The backend must work for every family written (cleanup also tries IPv6 when
    // --ipv6=false, but tolerates its absence then).
    let backend = match backend::resolve(flags.backend, &cfg.families()) {
        Ok(b) => b,
        Err(e) => return fail(EXIT_BACKEND, e),
    };
    let exec = Executor::new(backend);
    if mode == Mode::Cleanup {
        return match exec.cleanup(&cfg) {
            Ok(()) => {
                eprintln!("remora-init: removed Remora's rules ({backend} backend)");
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_APPLY, e),
        };
    }
    match exec.apply(&cfg) {
        Ok(()) => {
            let families: Vec<String> = cfg.families().iter().map(ToString::to_string).collect();
            eprintln!(
                "remora-init: applied the rules for {} ({backend} backend)",
                families.join(" and ")
            );
            if let Some(dir) = flags.accel_registrations() {
                register_with_accel(dir, &cfg);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_APPLY, e),
    }
}

/// Tells the node's `remora-accel` agent about this pod. Never fails the run: the rules
/// just applied carry the pod's traffic whether or not the agent ever reads the file.
fn register_with_accel(dir: &Path, cfg: &Config) {
    let written = accel::current_netns_cookie()
        .map_err(|e| format!("cannot read this network namespace's cookie: {e}"))
        .and_then(|cookie| {
            Registration::new(cookie, cfg)
                .write_into(dir)
                .map_err(|e| e.to_string())
        });
    match written {
        Ok(path) => eprintln!(
            "remora-init: registered with remora-accel: {}",
            path.display()
        ),
        Err(e) => eprintln!(
            "remora-init: warning: not registered with remora-accel ({e}); \
             the pod's traffic goes through the iptables rules"
        ),
    }
}

fn run_validate(flags: &Flags, cfg: &Config) -> ExitCode {
    let probes = match validate::probe_addrs(cfg, &flags.validate_addr.0) {
        Ok(p) => p,
        Err(e) => return fail(EXIT_BAD_INPUT, e),
    };
    match validate::validate(cfg.outbound_port, &probes, flags.validate_timeout()) {
        Ok(outcomes) => {
            for o in outcomes {
                match o {
                    Outcome::Redirected(a) => eprintln!(
                        "remora-init: validated: a connection to {a} arrived at port {} with its original destination",
                        cfg.outbound_port
                    ),
                    Outcome::NoRoute(a) => {
                        eprintln!("remora-init: not validated: no route to {a} in this namespace")
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_VALIDATE, e),
    }
}
