//! remora-accel: the node agent of Remora's optional eBPF socket accelerator.
//!
//! A meshed request crosses the kernel's TCP stack three times where a direct call
//! crosses it once; two of those crossings are loopback hops inside the pod (app →
//! proxy, proxy → app). The programs in `bpf/accel.c` take them out: `sockops` records
//! the established loopback sockets of meshed pods in a `SOCKHASH`, and `sk_msg` hands
//! each send straight to the peer socket's receive queue. Because iptables' REDIRECT
//! leaves the app's socket with its pre-NAT addresses, `connect4`/`connect6` send the
//! app's connect to the proxy themselves, `getsockopt` serves the original destination
//! to the proxy's unchanged `SO_ORIGINAL_DST` call and `getpeername4`/`6` show it to the
//! app. By default only the app's sends are handed over (see the README for why: a
//! blocking read on a socket that receives through a sockmap can fail with EAGAIN). The pod's iptables rules
//! stay: they are the path whenever the accelerator is absent or declines.
//!
//! See `accel/README.md` for the design, the kernel features and their versions.
//!
//! Modules: [`cli`] (flags), [`agent`] (the run loop), [`cgroup`] (the attach point),
//! [`programs`] (load, attach, pin), [`link`] (pinned cgroup links), [`pins`] (the bpffs
//! directory), [`fsmagic`] (path checks), [`maps`] (the shared layouts), [`pod_config`]
//! (registration → map value), [`registrations`] (the directory), [`metrics`],
//! [`server`] (/metrics, /ready).

pub mod agent;
pub mod cgroup;
pub mod cli;
pub mod fsmagic;
pub mod link;
pub mod maps;
pub mod metrics;
pub mod pins;
pub mod pod_config;
pub mod programs;
pub mod registrations;
pub mod server;
