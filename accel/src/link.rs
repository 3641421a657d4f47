//! Cgroup BPF links created and pinned with the `bpf(2)` syscall directly.
//!
//! aya 0.14 creates BPF links for cgroup programs but cannot hand out the link of a
//! `cgroup/getsockopt` program for pinning, and a link that is not pinned is detached
//! when the agent exits. So the agent loads the programs with aya and creates, pins and
//! (at a restart) updates all the cgroup links here, the same way for each.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `enum bpf_cmd` values (linux/bpf.h).
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `enum bpf_attach_type` values (linux/bpf.h) of the programs attached to the cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    SockOps = 3,
    Inet4Connect = 10,
    Inet6Connect = 11,
    GetSockopt = 21,
    Inet4GetPeerName = 29,
    Inet6GetPeerName = 30,
}

/// `union bpf_attr` for BPF_LINK_CREATE (the fields used, zero-padded: the kernel
/// requires every byte past the ones it knows to be zero).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    rest: [u64; 4],
}

/// `union bpf_attr` for BPF_LINK_UPDATE.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `union bpf_attr` for BPF_OBJ_PIN and BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` bpf_attr prefix of exactly the
    // size passed; the kernel reads (and for some commands writes) only that many bytes.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn raw_fd(f: BorrowedFd<'_>) -> io::Result<u32> {
    u32::try_from(f.as_raw_fd()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn owned(raw: libc::c_long) -> io::Result<OwnedFd> {
    let raw = i32::try_from(raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // SAFETY: the bpf(2) command returned a new file descriptor that nothing else owns.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Replaces the program of the link pinned at `path` with `prog`, atomically: the
/// cgroup never runs without one of the two (`BPF_LINK_UPDATE`, Linux 5.7).
pub fn update_pinned(prog: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let name = c_path(path)?;
    let mut get = ObjPinAttr {
        pathname: name.as_ptr() as u64,
        ..ObjPinAttr::default()
    };
    let link = owned(bpf(BPF_OBJ_GET, &mut get)?)?;
    let mut update = LinkUpdateAttr {
        link_fd: raw_fd(std::os::fd::AsFd::as_fd(&link))?,
        new_prog_fd: raw_fd(prog)?,
        ..LinkUpdateAttr::default()
    };
    bpf(BPF_LINK_UPDATE, &mut update)?;
    Ok(())
}

/// Attaches `prog` to `cgroup` with a new BPF link and pins the link at `path`; the
/// link (and so the attachment) lives as long as the pin.
pub fn attach_and_pin(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: AttachType,
    path: &Path,
) -> io::Result<()> {
    let mut create = LinkCreateAttr {
        prog_fd: raw_fd(prog)?,
        target_fd: raw_fd(cgroup)?,
        attach_type: attach_type as u32,
        ..LinkCreateAttr::default()
    };
    let link = owned(bpf(BPF_LINK_CREATE, &mut create)?)?;
    let name = c_path(path)?;
    let mut pin = ObjPinAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: raw_fd(std::os::fd::AsFd::as_fd(&link))?,
        ..ObjPinAttr::default()
    };
    bpf(BPF_OBJ_PIN, &mut pin)?;
    // Closing our fd leaves the pinned link attached.
    drop(link);
    Ok(())
}
