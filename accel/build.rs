//! Compiles the eBPF programs (`bpf/*.c`) with clang for the `bpf` target into
//! `$OUT_DIR/<name>.o`, which the agent embeds (`include_bytes_aligned!`).
//!
//! Needs clang and libbpf's headers (`<bpf/bpf_helpers.h>`), plus the kernel UAPI
//! headers (`<linux/bpf.h>`, linux-libc-dev): on Debian
//! `apt-get install clang libbpf-dev`. `CLANG` names another clang binary.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL: &str = "apt-get install clang libbpf-dev";

fn main() {
    if let Err(e) = build() {
        // A build script reports failure by panicking; the message is what users see.
        #[allow(clippy::panic)]
        {
            panic!("\n\nremora-accel: cannot build the eBPF programs: {e}\n\n");
        }
    }
}

fn build() -> Result<(), String> {
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed=bpf");

    let version = Command::new(&clang)
        .arg("--version")
        .output()
        .map_err(|e| {
            format!("{clang} is not runnable ({e}); install it with `{INSTALL}` (or set CLANG)")
        })?;
    if !version.status.success() {
        return Err(format!(
            "`{clang} --version` failed; install clang with `{INSTALL}`"
        ));
    }
    for header in ["/usr/include/bpf/bpf_helpers.h", "/usr/include/linux/bpf.h"] {
        if !Path::new(header).exists() {
            return Err(format!("{header} is missing; install it with `{INSTALL}`"));
        }
    }
    // <linux/types.h> includes <asm/types.h>, which Debian keeps under the multiarch
    // directory; clang -target bpf does not search it by itself.
    let multiarch = Command::new(&clang)
        .arg("-print-multiarch")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());

    let mut sources: Vec<PathBuf> = std::fs::read_dir("bpf")
        .map_err(|e| format!("reading bpf/: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .collect();
    sources.sort();
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("{}: bad file name", src.display()))?;
        let obj = out.join(format!("{stem}.o"));
        let mut cmd = Command::new(&clang);
        cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"]);
        if let Some(m) = &multiarch {
            cmd.arg(format!("-I/usr/include/{m}"));
        }
        cmd.arg("-c").arg(&src).arg("-o").arg(&obj);
        let res = cmd
            .output()
            .map_err(|e| format!("running {clang}: {e}; `{INSTALL}`"))?;
        if !res.status.success() {
            return Err(format!(
                "{clang} failed on {}:\n{}\n(missing headers? `{INSTALL}`)",
                src.display(),
                String::from_utf8_lossy(&res.stderr)
            ));
        }
    }
    Ok(())
}
