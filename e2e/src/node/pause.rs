//! The sandbox ("pause") image: the kubernetes tree's `build/pause/linux/pause.c`, compiled
//! statically by `e2e/cluster/provision.sh`, in a one-file image written by
//! [`crate::image`]. containerd's `sandbox_image` and kubelet's
//! `--pod-infra-container-image` name it, so no pod ever needs a registry.

use std::path::{Path, PathBuf};

use crate::{HarnessError, image::Image};

/// The pause image's reference (a tag other than `latest`: never pulled).
pub const REFERENCE: &str = "remora.local/pause:1.20.2";

/// The pause image: `/pause` as entrypoint, nothing else.
pub fn image(pause_binary: &Path) -> Result<Image, HarnessError> {
    let mut image = Image::new(REFERENCE)
        .map_err(image_err)?
        .entrypoint(["/pause"]);
    image
        .file(pause_binary, "/pause", 0o755)
        .map_err(image_err)?;
    // The pause process needs no privileges (it only waits for signals).
    Ok(image.user("65535:65535"))
}

/// Writes the pause image tarball to `out`.
pub fn write(pause_binary: &Path, out: &Path) -> Result<PathBuf, HarnessError> {
    image(pause_binary)?
        .write(out)
        .map_err(image_err)
        .map(|w| w.path)
}

fn image_err(e: crate::image::ImageError) -> HarnessError {
    HarnessError::Command {
        command: "building the pause image".to_owned(),
        stderr: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_image_holds_only_the_static_binary_as_its_entrypoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("pause");
        std::fs::write(&bin, b"\x7fELF-not-really").expect("write");
        let image = image(&bin).expect("image");
        assert_eq!(image.reference(), REFERENCE);
        let files: Vec<&String> = image.entries().keys().collect();
        assert!(files.iter().any(|p| p.as_str() == "/pause"), "{files:?}");
        let tar = write(&bin, &dir.path().join("pause.tar")).expect("written");
        assert!(tar.is_file());
    }
}
