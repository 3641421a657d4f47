//! The Remora mesh API.
//!
//! - [`MeshPolicy`] and [`TrafficSplit`] (`remora.dev/v1alpha1`): the custom resources users
//!   keep in their GitOps repositories, with schemas that carry their validation (feature
//!   `kube`, on by default).
//! - [`proxy`]: the derived proxy config, the model the operator streams to each sidecar
//!   and that `remora-proxy --config` loads from a file. It, [`policy`], [`check`] and
//!   [`wire`] compile without kube, so the proxy stays small.
//! - [`wire`]: the operator↔proxy contract (stream messages, certify), one definition
//!   for both ends.
//! - [`check`]: policy rules beyond serde, applied by the operator (status) and the proxy
//!   (config validation) alike.

pub mod check;
pub mod duration;
pub mod policy;
pub mod proxy;
pub mod wire;

#[cfg(feature = "kube")]
pub mod mesh_policy;
#[cfg(feature = "kube")]
pub mod status;
#[cfg(feature = "kube")]
pub mod traffic_split;

#[cfg(feature = "kube")]
pub use mesh_policy::{MeshPolicy, MeshPolicySpec};
#[cfg(feature = "kube")]
pub use status::PolicyStatus;
#[cfg(feature = "kube")]
pub use traffic_split::{TrafficSplit, TrafficSplitSpec};

/// The API group of the mesh's custom resources.
pub const API_GROUP: &str = "remora.dev";

#[cfg(feature = "kube")]
pub mod crdgen;
