//! The pinned maps shared with the eBPF programs, with their values' layouts: each type
//! here is the `#[repr(C)]` twin of a struct in `bpf/accel.h`; the tests pin the sizes
//! and offsets so that the two cannot drift apart silently.
//!
//! IP addresses are in network order (an IPv4 address as its IPv4-mapped IPv6 form in
//! the keys), ports in host order except inside [`OrigDst`].

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockHash};

/// How many port ranges and CIDRs of each family a registration may carry
/// (`MAX_PORT_RANGES`, `MAX_CIDRS`).
pub const MAX_PORT_RANGES: usize = 8;
pub const MAX_CIDRS: usize = 8;

/// `pod_config.flags`: IPv6 destinations are captured.
pub const POD_IPV6: u8 = 1;
/// `pod_config.flags`: only the include CIDRs are captured.
pub const POD_INCLUDE_LIST: u8 = 2;

/// `struct port_range`, host order, inclusive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// `struct cidr4`: address and mask as the kernel compares them (network order in
/// memory, so `u32::from_ne_bytes(octets)`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Cidr4 {
    pub addr: u32,
    pub mask: u32,
}

/// `struct cidr6`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Cidr6 {
    pub addr: [u32; 4],
    pub mask: [u32; 4],
}

/// `struct pod_config`: the value of `meshed_pods` (key: the pod's netns cookie).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PodConfig {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub flags: u8,
    pub n_skip_ports: u8,
    pub n_skip4: u8,
    pub n_skip6: u8,
    pub n_include4: u8,
    pub n_include6: u8,
    pub skip_ports: [PortRange; MAX_PORT_RANGES],
    pub skip4: [Cidr4; MAX_CIDRS],
    pub skip6: [Cidr6; MAX_CIDRS],
    pub include4: [Cidr4; MAX_CIDRS],
    pub include6: [Cidr6; MAX_CIDRS],
}

/// `struct pair_key`: a socket of `sock_pairs`, seen from its own side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PairKey {
    pub netns: u64,
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
}

/// `struct endpoint_key`: the app's end of a connection redirected by connect4/6.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct EndpointKey {
    pub netns: u64,
    pub ip: [u32; 4],
    pub port: u32,
    pub pad: u32,
}

/// `struct orig_dst`: what the app passed to connect().
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct OrigDst {
    pub ip: [u32; 4],
    pub port: u16,
    pub family: u16,
}

// SAFETY: plain `#[repr(C)]` integer structs and arrays without padding (the layout tests
// below check every size), so every bit pattern is a valid value and no uninitialised
// byte is ever copied to or from the kernel.
#[allow(unsafe_code)]
mod pod_impls {
    unsafe impl aya::Pod for super::PodConfig {}
    unsafe impl aya::Pod for super::PairKey {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::Settings {}
}

/// `struct settings`: the agent's choices for the programs (`settings[0]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Settings {
    pub flags: u32,
}

/// `settings.flags`: sends of the proxy are handed to app sockets too.
pub const SETTING_REDIRECT_TO_APP: u32 = 1;

/// The counters of the per-CPU `stats` array (`enum stat` in `bpf/accel.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stat {
    ConnectRedirected = 0,
    ConnectNoListener = 1,
    ConnectNotCaptured = 2,
    SocketAdded = 3,
    SocketAddFailed = 4,
    MsgRedirected = 5,
    MsgFallback = 6,
    OrigDstServed = 7,
    UnreadLimit = 8,
}

/// Number of entries of `stats`.
pub const STAT_COUNT: usize = 9;

/// The names of the pinned maps (also their pin file names).
pub const MESHED_PODS: &str = "meshed_pods";
pub const SOCK_PAIRS: &str = "sock_pairs";
pub const MSG_PASSTHROUGH: &str = "msg_passthrough";
pub const CONNECT_ORIG: &str = "connect_orig";
pub const ORIG_DST: &str = "orig_dst";
pub const STATS: &str = "stats";
pub const PROXY_SIDE: &str = "proxy_side";
pub const PROXY_CONNECTS: &str = "proxy_connects";
pub const SETTINGS: &str = "settings";
pub const UNREAD: &str = "unread";
/// Every map the programs pin, in the order `--cleanup` removes them.
pub const ALL: [&str; 10] = [
    MESHED_PODS,
    SOCK_PAIRS,
    MSG_PASSTHROUGH,
    UNREAD,
    PROXY_SIDE,
    PROXY_CONNECTS,
    CONNECT_ORIG,
    ORIG_DST,
    STATS,
    SETTINGS,
];

/// The sizes of the maps reported as `remora_accel_map_entries{map}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapSizes {
    pub meshed_pods: u64,
    pub sock_pairs: u64,
    pub orig_dst: u64,
}

/// The agent's handles on the maps it reads and writes.
pub struct Maps {
    pub(crate) meshed_pods: HashMap<MapData, u64, PodConfig>,
    pub(crate) sock_pairs: SockHash<MapData, PairKey>,
    pub(crate) orig_dst: HashMap<MapData, EndpointKey, OrigDst>,
    pub(crate) stats: PerCpuArray<MapData, u64>,
    pub(crate) settings: Array<MapData, Settings>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Maps")
    }
}

impl Maps {
    /// Registers (or re-registers) a meshed pod.
    pub fn insert_pod(&mut self, netns_cookie: u64, config: &PodConfig) -> Result<(), MapError> {
        self.meshed_pods.insert(netns_cookie, config, 0)
    }

    /// Applies the agent's settings (at every start: a restart may change them).
    pub fn set_settings(&mut self, settings: Settings) -> Result<(), MapError> {
        self.settings.set(0, settings, 0)
    }

    /// Forgets a pod (a refused re-registration must not leave the old lists applied).
    /// Absent is fine.
    pub fn remove_pod(&mut self, netns_cookie: u64) -> Result<(), MapError> {
        match self.meshed_pods.remove(&netns_cookie) {
            Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
                Ok(())
            }
            other => other,
        }
    }

    /// The pod registered under `netns_cookie`, if any.
    pub fn pod(&self, netns_cookie: u64) -> Result<Option<PodConfig>, MapError> {
        match self.meshed_pods.get(&netns_cookie, 0) {
            Ok(c) => Ok(Some(c)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every counter of `stats`, summed over the CPUs.
    pub fn stats(&self) -> Result<[u64; STAT_COUNT], MapError> {
        let mut out = [0u64; STAT_COUNT];
        for (i, slot) in (0u32..).zip(out.iter_mut()) {
            *slot = self.stats.get(&i, 0)?.iter().sum();
        }
        Ok(out)
    }

    /// The number of entries of the maps worth watching.
    pub fn sizes(&self) -> Result<MapSizes, MapError> {
        Ok(MapSizes {
            meshed_pods: count(self.meshed_pods.keys())?,
            sock_pairs: count(self.sock_pairs.keys())?,
            orig_dst: count(self.orig_dst.keys())?,
        })
    }
}

/// More entries than any of the maps holds: a walk that gets this far has been restarted
/// by deletions (the kernel starts a hash map walk again when the previous key is gone).
const COUNT_LIMIT: usize = 1 << 17;

/// An error with its causes (aya's messages name the syscall, their sources say why).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn count<K>(keys: impl Iterator<Item = Result<K, MapError>>) -> Result<u64, MapError> {
    let mut n = 0;
    for k in keys.take(COUNT_LIMIT) {
        // An entry deleted while iterating is not an error: the walk restarts past it.
        match k {
            Ok(_) | Err(MapError::KeyNotFound) => n += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// The offsets of `struct pod_config` as clang lays it out for the bpf target
    /// (naturally aligned, no padding): any change to `bpf/accel.h` must change this.
    #[test]
    fn layouts_match_the_c_structs() {
        assert_eq!(size_of::<PortRange>(), 4);
        assert_eq!(size_of::<Cidr4>(), 8);
        assert_eq!(size_of::<Cidr6>(), 32);
        assert_eq!(offset_of!(PodConfig, outbound_port), 8);
        assert_eq!(offset_of!(PodConfig, flags), 10);
        assert_eq!(offset_of!(PodConfig, n_include6), 15);
        assert_eq!(offset_of!(PodConfig, skip_ports), 16);
        assert_eq!(offset_of!(PodConfig, skip4), 48);
        assert_eq!(offset_of!(PodConfig, skip6), 112);
        assert_eq!(offset_of!(PodConfig, include4), 368);
        assert_eq!(offset_of!(PodConfig, include6), 432);
        assert_eq!(size_of::<PodConfig>(), 688);
        assert_eq!(size_of::<PairKey>(), 48);
        assert_eq!(size_of::<EndpointKey>(), 32);
        assert_eq!(size_of::<OrigDst>(), 20);
        assert_eq!(size_of::<Settings>(), 4);
        assert_eq!(Stat::UnreadLimit as usize + 1, STAT_COUNT);
    }
}
