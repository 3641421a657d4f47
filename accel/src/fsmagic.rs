//! Which filesystem a path is on (`statfs`'s magic number): the pin directory must be on
//! a BPF filesystem and the attach point must be a cgroup v2 directory, and both are
//! checked before anything is loaded, so that a wrong path gets a clear message instead
//! of a syscall's EBADF.

use std::io;
use std::path::Path;

/// The filesystems the agent checks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// `BPF_FS_MAGIC` (linux/magic.h).
    Bpf,
    /// `CGROUP2_SUPER_MAGIC`.
    Cgroup2,
}

impl FsKind {
    fn magic(self) -> u32 {
        match self {
            Self::Bpf => 0xcafe_4a11,
            Self::Cgroup2 => 0x6367_7270,
        }
    }
}

/// Whether `path` lives on a filesystem of `kind`.
pub fn is(path: &Path, kind: FsKind) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `statfs` only writes into `buf`, a zeroed, properly sized and aligned
    // `libc::statfs`, and reads the NUL-terminated path `c`, both alive for the call.
    #[allow(unsafe_code)]
    let (rc, buf) = unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut buf), buf)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type's integer type differs between libc targets.
    #[allow(clippy::unnecessary_cast)]
    Ok(buf.f_type as u32 == kind.magic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temporary_directory_is_neither() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        assert!(!is(dir.path(), FsKind::Bpf)?);
        assert!(!is(dir.path(), FsKind::Cgroup2)?);
        assert!(is(&dir.path().join("missing"), FsKind::Bpf).is_err());
        Ok(())
    }
}
