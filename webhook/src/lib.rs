//! The Remora injector: a mutating admission webhook and an offline `inject` command that add remora-init and the remora-proxy sidecar to pods.
