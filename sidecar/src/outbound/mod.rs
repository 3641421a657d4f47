//! The outbound path: everything between the pod's app and the endpoints it calls.
//!
//! - [`route`]: the routing table of one config version: destination → service → split
//!   backend → [`EndpointSet`](route::EndpointSet) with its balancer, resolved once per
//!   connection (TCP) or request (HTTP) and handed down.
//! - [`endpoint`]: long-lived endpoints (pools, load, health) keyed by address and
//!   identity, that outlive config versions.
//! - [`service`]: long-lived per-service state (breaker, outlier detector, retry budget).
//! - [`policy`]: a service's traffic policy compiled for the data path.
//! - [`balance`], [`outlier`], [`breaker`], [`retry`]: the algorithms.
//! - [`dial`]: the one dialer (connect timeout, mesh mTLS to the expected identity).
//! - [`exchange`]: one HTTP request under its policy; [`tcp`]: one opaque connection.
//! - [`explain`]: the state and decisions above, in words, for the admin endpoints.

pub mod balance;
pub mod breaker;
pub mod dial;
pub mod endpoint;
pub mod exchange;
pub mod explain;
pub mod outlier;
pub mod policy;
pub mod retry;
pub mod route;
pub mod service;
pub mod tcp;

pub use route::{RouteTable, Target};
