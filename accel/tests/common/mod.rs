//! Harness of the accelerator's namespace tests (`netns_accel*`, root):
//!
//! - [`mesh`]: the proxy tests' own harness (`sidecar/tests/common`), reused as is: pods in
//!   network namespaces joined by a veth with `remora-init`'s rules, the real `remora-proxy`
//!   (UID 1337) with file certificates, echo servers and clients, process guards;
//! - [`node`]: what the accelerator adds on the node: a cgroup v2 of the test's own (the
//!   test process moves into it, so every process it starts is under it), a bpffs mount of
//!   its own, the pods' registrations, and the `remora-accel` agent attached to that cgroup
//!   and pinning under that bpffs; all removed on drop, also on failure;
//! - [`pair`]: the accelerated Remora pair (both pods registered with the agent), and the
//!   Python peers of `peers.py` (blocking, non-blocking and `http.client` clients and
//!   servers: the sockets the issue saw break, with EAGAIN or a short read at the end of a
//!   redirected stream).
#![allow(dead_code)]

#[path = "../../../sidecar/tests/common/mod.rs"]
pub mod mesh;
pub mod node;
pub mod pair;
