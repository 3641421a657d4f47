//! What a dynamically linked program needs at run time: its shared libraries and the
//! dynamic loader, as `ldd` reports them. Rust binaries built here link glibc
//! dynamically, so every image carries these next to its binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Image, ImageError};

/// The absolute paths `ldd` lists for `binary` (libraries and the loader), in its order.
/// A static binary has none.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let out = Command::new("ldd").arg(binary).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ImageError::Missing {
                what: "ldd".into(),
                how: "install it with: apt-get install -y libc-bin".into(),
            }
        } else {
            ImageError::Ldd {
                binary: binary.display().to_string(),
                message: e.to_string(),
            }
        }
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if is_static(&stdout) || is_static(&stderr) {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(ImageError::Ldd {
            binary: binary.display().to_string(),
            message: format!("{}: {}", out.status, stderr.trim()),
        });
    }
    parse_ldd(&stdout).map_err(|message| ImageError::Ldd {
        binary: binary.display().to_string(),
        message,
    })
}

fn is_static(text: &str) -> bool {
    text.contains("not a dynamic executable") || text.contains("statically linked")
}

/// Parses `ldd` output. The vDSO has no file and is skipped; a library that is
/// `not found` is an error (the image would not start).
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!("library {} not found", name.trim()));
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        // `linux-vdso.so.1 (0x...)` and `libfoo.so => (0x...)` have no file.
        if path.starts_with('/') {
            let p = PathBuf::from(path);
            if !libs.contains(&p) {
                libs.push(p);
            }
        } else if !line.contains("vdso") && !path.starts_with('(') {
            return Err(format!("unexpected line: {line}"));
        }
    }
    Ok(libs)
}

/// Adds `binary` at `dst` (mode 0755) and, at their host paths, every library it needs
/// and the loader.
pub fn add_binary(image: &mut Image, binary: &Path, dst: &str) -> Result<(), ImageError> {
    if !binary.is_file() {
        return Err(ImageError::Missing {
            what: binary.display().to_string(),
            how: "build it first (make images builds the release binaries)".into(),
        });
    }
    image.file(binary, dst, 0o755)?;
    add_libraries_of(image, binary)
}

/// Adds the libraries and loader that `binary` needs, at their host paths.
pub fn add_libraries_of(image: &mut Image, binary: &Path) -> Result<(), ImageError> {
    for lib in shared_libraries(binary)? {
        image.host_path(&lib)?;
    }
    Ok(())
}

/// The program interpreter (`PT_INTERP`, the dynamic loader) a 64-bit little-endian ELF
/// file names, or `None` for a static one.
pub fn interpreter(binary: &Path) -> Result<Option<PathBuf>, ImageError> {
    let data =
        std::fs::read(binary).map_err(super::io_ctx(format!("reading {}", binary.display())))?;
    let not_elf = || ImageError::Ldd {
        binary: binary.display().to_string(),
        message: "not a 64-bit little-endian ELF file".into(),
    };
    if data.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err(not_elf());
    }
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    let phoff = u64_at(0x20).ok_or_else(not_elf)? as usize;
    let phentsize = u16_at(0x36).ok_or_else(not_elf)? as usize;
    let phnum = u16_at(0x38).ok_or_else(not_elf)? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let kind = data.get(ph..ph + 4).ok_or_else(not_elf)?;
        if kind == 3u32.to_le_bytes() {
            let off = u64_at(ph + 8).ok_or_else(not_elf)? as usize;
            let size = u64_at(ph + 32).ok_or_else(not_elf)? as usize;
            let raw = data.get(off..off + size).ok_or_else(not_elf)?;
            let path = raw.split(|b| *b == 0).next().unwrap_or_default();
            return Ok(Some(PathBuf::from(
                String::from_utf8_lossy(path).into_owned(),
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_glibc_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc2a1f3000)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0e1c000000)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0e1be00000)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f0e1c2a0000)\n";
        assert_eq!(
            parse_ldd(text),
            Ok(vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ])
        );
    }

    #[test]
    fn a_missing_library_is_an_error() {
        let text = "\tlibxtables.so.12 => not found\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n";
        assert_eq!(
            parse_ldd(text),
            Err("library libxtables.so.12 not found".into())
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_ldd("what is this\n").is_err());
    }

    #[test]
    fn this_test_binary_needs_libc_and_the_loader() {
        let exe = std::env::current_exe().expect("current exe");
        let libs = shared_libraries(&exe).expect("ldd of the test binary");
        let names: Vec<String> = libs
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert!(names.iter().any(|n| n.starts_with("libc.so")), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("ld-linux")), "{names:?}");
        // ldd's loader line is the ELF interpreter.
        let interp = interpreter(&exe).expect("ELF").expect("dynamic");
        assert!(
            libs.contains(&interp),
            "{} not in {libs:?}",
            interp.display()
        );
    }

    #[test]
    fn a_non_elf_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("script");
        std::fs::write(&f, b"#!/bin/sh\n").expect("write");
        assert!(interpreter(&f).is_err());
    }
}
