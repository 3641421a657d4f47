//! `remora-images`: writes Remora's image tarballs (docker-archive) from the release
//! binaries, for `ctr images import`, `docker load` and `kind load image-archive`.
//! `make images` builds the binaries and runs this.
//!
//! ```text
//! remora-images [--bin-dir target/image] [--out target/images]
//!               [--registry ghcr.io/remora-mesh] [--tag 0.1.0] [NAME...]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use remora_e2e::image::inspect::inspect;
use remora_e2e::image::recipes::{DEFAULT_REGISTRY, DEFAULT_TAG, all_images, recipe, reference};

struct Args {
    bin_dir: PathBuf,
    out: PathBuf,
    registry: String,
    tag: String,
    names: Vec<String>,
}

const USAGE: &str = "usage: remora-images [--bin-dir DIR] [--out DIR] [--registry REGISTRY] [--tag TAG] [NAME...]\n\
    NAME is one of remora-operator, remora-webhook, remora-proxy, remora-init, remora-demo-app, remora-accel (default: all)";

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let mut a = Args {
        bin_dir: target.join("image"),
        out: target.join("images"),
        registry: DEFAULT_REGISTRY.to_owned(),
        tag: DEFAULT_TAG.to_owned(),
        names: Vec::new(),
    };
    while let Some(arg) = argv.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--bin-dir" => a.bin_dir = PathBuf::from(value()?),
            "--out" => a.out = PathBuf::from(value()?),
            "--registry" => a.registry = value()?,
            "--tag" => a.tag = value()?,
            "-h" | "--help" => return Err(String::new()),
            f if f.starts_with('-') => return Err(format!("unknown option {f}")),
            name if all_images().any(|n| n == name) => a.names.push(name.to_owned()),
            name => return Err(format!("unknown image '{name}'")),
        }
    }
    if a.names.is_empty() {
        a.names = all_images().map(str::to_owned).collect();
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("remora-images: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("remora-images: cannot create {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    println!(
        "{:<18} {:>9} {:>9} {:>6}  {:<19} reference",
        "image", "tarball", "layer", "ms", "id"
    );
    let mut total = 0;
    for name in &args.names {
        let started = Instant::now();
        let r = reference(&args.registry, name, &args.tag);
        let path = args.out.join(format!("{name}.tar"));
        let written = recipe(name, &args.bin_dir, &r)
            .and_then(|image| image.write(&path))
            .and_then(|w| inspect(&w.path).map(|_| w));
        match written {
            Ok(w) => {
                total += w.size;
                println!(
                    "{name:<18} {:>9} {:>9} {:>6}  {:<19} {}",
                    mib(w.size),
                    mib(w.layer_size),
                    started.elapsed().as_millis(),
                    &w.id[..19.min(w.id.len())],
                    w.reference
                );
            }
            Err(e) => {
                eprintln!("remora-images: {name}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("total {} in {}", mib(total), args.out.display());
    ExitCode::SUCCESS
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
