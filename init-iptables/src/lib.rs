//! remora-init: installs the iptables rules that send a pod's TCP traffic through the sidecar.
//!
//! The crate separates a pure rule builder ([`config`] → [`rules`]), tested against
//! golden files, from a thin executor ([`backend`], [`exec`]) that applies the rules
//! atomically with `iptables-restore`. [`validate`] proves a redirect works, and
//! [`orig_dst`] reads a redirected connection's original destination — the proxy uses
//! it too. [`probe`] is the listener/client behind the `remora-probe` debugging tool
//! and the network-namespace tests.

pub mod accel;
pub mod app;
pub mod backend;
pub mod config;
pub mod exec;
pub mod flags;
pub mod installed;
pub mod orig_dst;
pub mod probe;
pub mod rules;
pub mod validate;
