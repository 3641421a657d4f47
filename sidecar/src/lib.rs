//! The Remora sidecar proxy: transparent interception, protocol detection, HTTP and TCP proxying, mutual TLS with SPIFFE identities.
