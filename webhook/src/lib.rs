//! The Remora injector: a mutating admission webhook and an offline `inject` command that
//! add remora-init and the remora-proxy sidecar to pods.
//!
//! The pure builder ([`inject::inject`]) turns a pod into a skip reason or an injected pod
//! plus a JSON patch; [`admission`] wraps it in the AdmissionReview protocol, [`server`]
//! serves it over TLS, and [`offline`] applies it to manifests; [`accel`] is what the
//! optional socket accelerator adds. [`namespace`] validates
//! the mesh's namespace label (`/validate-namespace`).

pub mod accel;
pub mod admission;
pub mod annotations;
pub mod cli;
pub mod events;
pub mod inject;
pub mod metrics;
pub mod namespace;
pub mod native;
pub mod offline;
pub mod patch;
pub mod probes;
pub mod server;
pub mod tls;
