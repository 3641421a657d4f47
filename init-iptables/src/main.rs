//! The `remora-init` init container: parses flags (and `REMORA_INIT_*` environment
//! variables) and runs [`remora_init::app::run`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    remora_init::app::run(&remora_init::flags::Flags::parse())
}
