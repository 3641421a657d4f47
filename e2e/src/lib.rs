//! End-to-end harness for Remora's cluster tests.
//!
//! [`Cluster::start`] runs a real etcd, kube-apiserver and (optionally)
//! kube-controller-manager on loopback, with fresh PKI and a fresh data directory per run,
//! and hands tests a [`kube::Client`] and a kubeconfig path. Every process is stopped by
//! PID when the [`Cluster`] is dropped, also when a test panics.
//!
//! The binaries come from `e2e/cluster/provision.sh` (Debian's etcd, and kube-apiserver
//! built from Debian's kubernetes 1.20 source); a missing one is an error that says how to
//! get it, never a silent skip.

pub mod apply;
pub mod cluster;
pub mod components;
pub mod image;
pub mod mesh;
pub mod node;
pub mod pki;
pub mod prereqs;
pub mod scenario;
pub mod target;

pub use cluster::{Cluster, ClusterOptions};
pub use node::{Node, NodeOptions};

/// What can go wrong while bringing a cluster up or talking to it.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("missing prerequisite: {what}. {how}")]
    Missing { what: String, how: String },
    #[error("{process} exited during start-up ({status}); last lines of its log {log}:\n{tail}")]
    ProcessExited {
        process: String,
        status: String,
        log: String,
        tail: String,
    },
    #[error("{what} not ready after {secs}s; last error: {last}")]
    Timeout {
        what: String,
        secs: u64,
        last: String,
    },
    #[error("I/O error {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("YAML document {index} of {source_name}: {message}")]
    Yaml {
        source_name: String,
        index: usize,
        message: String,
    },
    #[error("command `{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}
