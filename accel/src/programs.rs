//! Loading the eBPF object, attaching its programs and pinning what keeps them attached.
//!
//! The cgroup programs (connect4, connect6, sockops, getsockopt) are attached with BPF
//! links to one cgroup v2 and the links pinned under the pin directory; the sk_msg
//! program is attached to the pinned `sock_pairs` map, which holds it for as long as
//! the map lives. So the agent can exit (or crash) and the acceleration goes on; a new
//! agent finds the link pins, reopens the pinned maps and swaps its own build of the
//! programs into the links (`BPF_LINK_UPDATE`: never a moment without programs). `--cleanup` removes the
//! pins: the links go, so the programs are detached, and the maps go with them (a
//! sockhash drops its attached program when its last user reference goes).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{MapError, SockHash};
use aya::programs::links::ProgAttachLink;
use aya::programs::{CgroupSockAddr, CgroupSockopt, ProgramError, SkMsg, SockOps};
use aya::{Ebpf, EbpfError, EbpfLoader};

use crate::link::{self, AttachType};
use crate::maps::{self, Maps, PairKey, describe};
use crate::pins::PinDir;

/// The compiled programs (build.rs: `bpf/accel.c`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/accel.o"));

/// The programs attached to the cgroup, by their function names in `bpf/accel.c`, with
/// their attach types.
pub const CGROUP_PROGRAMS: [(&str, AttachType); 6] = [
    ("remora_connect4", AttachType::Inet4Connect),
    ("remora_connect6", AttachType::Inet6Connect),
    ("remora_getpeername4", AttachType::Inet4GetPeerName),
    ("remora_getpeername6", AttachType::Inet6GetPeerName),
    ("remora_sockops", AttachType::SockOps),
    ("remora_getsockopt", AttachType::GetSockopt),
];

/// The names of [`CGROUP_PROGRAMS`].
pub fn cgroup_program_names() -> [&'static str; 6] {
    CGROUP_PROGRAMS.map(|(name, _)| name)
}
/// The program attached to `sock_pairs`.
pub const SK_MSG_PROGRAM: &str = "remora_sk_msg";

/// A failure to load or attach.
#[derive(Debug, thiserror::Error)]
pub enum ProgramsError {
    #[error("loading the eBPF object (maps pinned in {dir}): {}", describe(source.as_ref()))]
    Object {
        dir: PathBuf,
        source: Box<EbpfError>,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("{name}: {}", describe(source.as_ref()))]
    Program {
        name: &'static str,
        source: Box<ProgramError>,
    },
    #[error("attaching {name} with a BPF link pinned at {path}: {source}")]
    Attach {
        name: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("map {name}: {}", describe(source.as_ref()))]
    Map {
        name: &'static str,
        source: Box<MapError>,
    },
    #[error("duplicating a program's or sock_pairs' fd: {0}")]
    Dup(std::io::Error),
    #[error("opening the cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("removing stale pins: {0}")]
    Stale(#[from] crate::pins::PinDirError),
}

/// How the agent found the programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Attached by an earlier run (all link pins present): left as they are.
    Reused,
    /// Loaded and attached now.
    Attached,
}

/// Loads the object with its maps pinned in (or reopened from) `pins`, attaches the
/// programs to `cgroup` unless an earlier run's links are all pinned, and returns the
/// maps the agent uses.
pub fn load_or_reuse(pins: &PinDir, cgroup: &Path) -> Result<(Maps, Start), ProgramsError> {
    let present = CGROUP_PROGRAMS
        .iter()
        .filter(|(p, _)| pins.link(p).exists())
        .count();
    if present > 0 && present < CGROUP_PROGRAMS.len() {
        // Half an attachment (an interrupted first start): start again from nothing
        // but the maps, which keep their entries.
        for (p, _) in CGROUP_PROGRAMS {
            let _ = std::fs::remove_file(pins.link(p));
        }
    }
    let mut bpf = EbpfLoader::new()
        .default_map_pin_directory(pins.dir())
        .load(OBJECT)
        .map_err(|source| ProgramsError::Object {
            dir: pins.dir().to_owned(),
            source: Box::new(source),
        })?;
    // sk_msg first: sockets sockops puts in sock_pairs must find it there. On a map that
    // has one already, the new program replaces it for the sockets added from now on.
    attach_sk_msg(&mut bpf)?;
    let start =
        if present == CGROUP_PROGRAMS.len() {
            // The links stay (no moment without programs); they get this build's programs.
            for (name, attach_type) in CGROUP_PROGRAMS {
                let prog = load_cgroup_program(&mut bpf, name, attach_type)?;
                let path = pins.link(name);
                link::update_pinned(prog.as_fd(), &path)
                    .map_err(|source| ProgramsError::Attach { name, path, source })?;
            }
            Start::Reused
        } else {
            let cg = File::open(cgroup).map_err(|source| ProgramsError::Cgroup {
                path: cgroup.to_owned(),
                source,
            })?;
            for (name, attach_type) in CGROUP_PROGRAMS {
                let prog = load_cgroup_program(&mut bpf, name, attach_type)?;
                let path = pins.link(name);
                link::attach_and_pin(prog.as_fd(), cg.as_fd(), attach_type, &path)
                    .map_err(|source| ProgramsError::Attach { name, path, source })?;
            }
            Start::Attached
        };
    Ok((take_maps(&mut bpf)?, start))
}

fn program<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProgramsError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    bpf.program_mut(name)
        .ok_or(ProgramsError::Missing(name))?
        .try_into()
        .map_err(|source| ProgramsError::Program {
            name,
            source: Box::new(source),
        })
}

/// Attaches sk_msg to `sock_pairs` before sockops can put any socket there.
fn attach_sk_msg(bpf: &mut Ebpf) -> Result<(), ProgramsError> {
    let name = SK_MSG_PROGRAM;
    let map_fd = {
        let map = bpf
            .map(maps::SOCK_PAIRS)
            .ok_or(ProgramsError::Missing(maps::SOCK_PAIRS))?;
        let hash: SockHash<&aya::maps::MapData, PairKey> =
            map.try_into().map_err(|source| ProgramsError::Map {
                name: maps::SOCK_PAIRS,
                source: Box::new(source),
            })?;
        hash.fd().try_clone().map_err(ProgramsError::Dup)?
    };
    let err = |source| ProgramsError::Program {
        name,
        source: Box::new(source),
    };
    let prog: &mut SkMsg = program(bpf, name)?;
    prog.load().map_err(err)?;
    let id = prog.attach(&map_fd).map_err(err)?;
    // Dropped as a plain ProgAttachLink, the attachment is not undone: the map keeps
    // the program after this process is gone.
    let link: ProgAttachLink = prog.take_link(id).map_err(err)?.into();
    drop(link);
    Ok(())
}

/// Loads one cgroup program (verifier included) and returns its fd.
fn load_cgroup_program(
    bpf: &mut Ebpf,
    name: &'static str,
    attach_type: AttachType,
) -> Result<OwnedFd, ProgramsError> {
    let err = |source| ProgramsError::Program {
        name,
        source: Box::new(source),
    };
    let fd = match attach_type {
        AttachType::SockOps => {
            let p: &mut SockOps = program(bpf, name)?;
            p.load().map_err(err)?;
            p.fd().map_err(err)?.as_fd().try_clone_to_owned()
        }
        AttachType::GetSockopt => {
            let p: &mut CgroupSockopt = program(bpf, name)?;
            p.load().map_err(err)?;
            p.fd().map_err(err)?.as_fd().try_clone_to_owned()
        }
        AttachType::Inet4Connect
        | AttachType::Inet6Connect
        | AttachType::Inet4GetPeerName
        | AttachType::Inet6GetPeerName => {
            let p: &mut CgroupSockAddr = program(bpf, name)?;
            p.load().map_err(err)?;
            p.fd().map_err(err)?.as_fd().try_clone_to_owned()
        }
    };
    fd.map_err(ProgramsError::Dup)
}

fn take_maps(bpf: &mut Ebpf) -> Result<Maps, ProgramsError> {
    fn take<T>(bpf: &mut Ebpf, name: &'static str) -> Result<T, ProgramsError>
    where
        T: TryFrom<aya::maps::Map, Error = MapError>,
    {
        bpf.take_map(name)
            .ok_or(ProgramsError::Missing(name))?
            .try_into()
            .map_err(|source| ProgramsError::Map {
                name,
                source: Box::new(source),
            })
    }
    Ok(Maps {
        meshed_pods: take(bpf, maps::MESHED_PODS)?,
        sock_pairs: take(bpf, maps::SOCK_PAIRS)?,
        orig_dst: take(bpf, maps::ORIG_DST)?,
        stats: take(bpf, maps::STATS)?,
        settings: take(bpf, maps::SETTINGS)?,
    })
}

/// Detaches and unpins everything under `pins`; see [`PinDir::remove_all`].
pub fn cleanup(pins: &PinDir) -> Result<Vec<PathBuf>, crate::pins::PinDirError> {
    pins.remove_all(&cgroup_program_names())
}
