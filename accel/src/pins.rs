//! The agent's directory on a BPF filesystem: the pinned maps (by their names, as the
//! programs declare them with `LIBBPF_PIN_BY_NAME`) and the pinned cgroup links
//! (`link_<program>`). Pins are what keeps the programs attached and the maps filled
//! while no agent runs; removing them is what `--cleanup` does.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::fsmagic::{self, FsKind};
use crate::maps;

/// A pin directory that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error(
        "{path} is not on a BPF filesystem: mount one first (`mount -t bpf bpf /sys/fs/bpf`) \
         or point --bpffs (REMORA_ACCEL_BPFFS) into one"
    )]
    NotBpffs { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinDirError + '_ {
    move |source| PinDirError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The directory holding the agent's pins.
#[derive(Debug, Clone)]
pub struct PinDir {
    dir: PathBuf,
}

impl PinDir {
    /// The pin directory `dir`, without touching the filesystem.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Checks that `dir` is (or can be created) on a bpffs, and creates it.
    pub fn prepare(dir: impl Into<PathBuf>) -> Result<Self, PinDirError> {
        let pins = Self::new(dir);
        let dir = &pins.dir;
        // The directory itself when it exists (it may be the mount point), else its
        // parent, which must be the mounted bpffs.
        let probe = if dir.exists() {
            dir.clone()
        } else {
            dir.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_owned)
        };
        // A missing parent is not a bpffs either: the message says what to mount.
        if !fsmagic::is(&probe, FsKind::Bpf).unwrap_or(false) {
            return Err(PinDirError::NotBpffs { path: probe });
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(pins)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the link attaching `program` to the cgroup is pinned.
    pub fn link(&self, program: &str) -> PathBuf {
        self.dir.join(format!("link_{program}"))
    }

    /// Where a map is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Removes every pin the agent makes (links first, so the programs are detached
    /// before their maps go), then the directory unless it is a mount point or holds
    /// files of someone else. Returns the pins removed; a missing pin or directory is
    /// not an error, so this can run any number of times.
    pub fn remove_all(&self, programs: &[&str]) -> Result<Vec<PathBuf>, PinDirError> {
        let mut removed = Vec::new();
        let pins = programs
            .iter()
            .map(|p| self.link(p))
            .chain(maps::ALL.iter().map(|m| self.map(m)));
        for pin in pins {
            match fs::remove_file(&pin) {
                Ok(()) => removed.push(pin),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&pin)(e)),
            }
        }
        let is_mount_point = match (fs::metadata(&self.dir), self.dir.parent()) {
            (Ok(d), Some(parent)) => fs::metadata(parent).is_ok_and(|p| p.dev() != d.dev()),
            _ => false,
        };
        if !is_mount_point {
            match fs::remove_dir(&self.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                    tracing::warn!(dir = %self.dir.display(), "left in place: it holds files that are not the agent's pins");
                }
                Err(e) => return Err(io_err(&self.dir)(e)),
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_outside_a_bpffs_is_refused_with_the_mount_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = PinDir::prepare(dir.path().join("remora")).err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("mount -t bpf bpf /sys/fs/bpf"), "{msg}");
        assert!(!dir.path().join("remora").exists());
    }

    #[test]
    fn removing_nothing_is_fine_and_foreign_files_stay() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let pins = PinDir::new(dir.path().join("remora"));
        assert!(
            pins.remove_all(&["remora_connect4"])
                .is_ok_and(|r| r.is_empty())
        );
        fs::create_dir(pins.dir())?;
        fs::write(pins.link("remora_connect4"), "")?;
        fs::write(pins.map(maps::STATS), "")?;
        fs::write(pins.dir().join("other"), "")?;
        let removed = pins
            .remove_all(&["remora_connect4"])
            .map_err(io::Error::other)?;
        assert_eq!(removed.len(), 2);
        assert!(pins.dir().join("other").exists());
        fs::remove_file(pins.dir().join("other"))?;
        assert!(pins.remove_all(&["remora_connect4"]).is_ok());
        assert!(!pins.dir().exists());
        Ok(())
    }
}
