//! `TrafficSplit`: send a Service's traffic to several backend Services by weight, by
//! header match, and mirror a share of it (SMI v1alpha4 shape, Gateway API weights).

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::PolicyStatus;

/// The largest weight a backend may have (Gateway API semantics: weights are relative).
pub const MAX_WEIGHT: u32 = 1_000_000;

/// A backend Service and its share of the traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SplitBackend {
    #[schemars(
        length(min = 1, max = 63),
        pattern(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    )]
    pub service: String,
    /// Relative weight; 0 sends no weighted traffic (header matches still may).
    #[schemars(range(min = 0, max = 1_000_000))]
    pub weight: u32,
}

/// Requests whose headers all match go to `backend`, ahead of the weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SplitMatch {
    /// Header name → exact value.
    #[schemars(length(min = 1))]
    pub headers: BTreeMap<String, String>,
    #[schemars(
        length(min = 1, max = 63),
        pattern(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    )]
    pub backend: String,
}

/// A copy of a share of the requests, sent fire-and-forget.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SplitMirror {
    #[schemars(
        length(min = 1, max = 63),
        pattern(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    )]
    pub service: String,
    #[schemars(range(min = 0, max = 100))]
    pub percent: u32,
}

/// Splits the traffic that clients send to `service` between `backends`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "remora.dev",
    version = "v1alpha1",
    kind = "TrafficSplit",
    plural = "trafficsplits",
    shortname = "ts",
    category = "remora",
    namespaced,
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSplitSpec {
    /// The Service clients call (the root service).
    #[schemars(
        length(min = 1, max = 63),
        pattern(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    )]
    pub service: String,
    #[schemars(length(min = 1, max = 64))]
    pub backends: Vec<SplitBackend>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<SplitMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<SplitMirror>,
}
