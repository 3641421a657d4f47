//! The stream's messages: one JSON object per line (`application/x-ndjson`), each with
//! `type` and `version` (see `docs/stream.md`).

use remora_crds::proxy::{InboundConfig, OutboundService};
use serde::{Deserialize, Serialize};

/// One line of a watch stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Message {
    /// A Pod's inbound config; `null` once the Pod is gone.
    #[serde(rename_all = "camelCase")]
    Inbound {
        version: u64,
        /// `<namespace>/<name>`.
        pod: String,
        inbound: Option<InboundConfig>,
    },
    /// A destination's piece first, then those its split and mirror name; empty for a
    /// target that is not a mesh destination.
    #[serde(rename_all = "camelCase")]
    Outbound {
        version: u64,
        /// The target as requested.
        target: String,
        services: Vec<OutboundService>,
    },
    /// Nothing new; the last version sent.
    Heartbeat { version: u64 },
}

impl Message {
    pub fn version(&self) -> u64 {
        match self {
            Self::Inbound { version, .. }
            | Self::Outbound { version, .. }
            | Self::Heartbeat { version } => *version,
        }
    }

    /// The `type` field (also the metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Inbound { .. } => "inbound",
            Self::Outbound { .. } => "outbound",
            Self::Heartbeat { .. } => "heartbeat",
        }
    }

    /// The message as one ndjson line (with its `\n`).
    pub fn line(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut line = serde_json::to_vec(self)?;
        line.push(b'\n');
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_tagged_camel_case_json() {
        let m = Message::Heartbeat { version: 7 };
        assert_eq!(
            m.line().expect("json"),
            b"{\"type\":\"heartbeat\",\"version\":7}\n"
        );
        let m = Message::Inbound {
            version: 8,
            pod: "shop/reviews-1".to_owned(),
            inbound: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&m.line().expect("json")).expect("v");
        assert_eq!(
            v,
            serde_json::json!({"type": "inbound", "version": 8, "pod": "shop/reviews-1", "inbound": null})
        );
        let m = Message::Outbound {
            version: 9,
            target: "10.96.0.12:9080".to_owned(),
            services: vec![OutboundService {
                name: "reviews.shop".to_owned(),
                ..OutboundService::default()
            }],
        };
        let line = m.line().expect("json");
        let v: serde_json::Value = serde_json::from_slice(&line).expect("v");
        assert_eq!(v["type"], "outbound");
        assert_eq!(v["services"][0]["name"], "reviews.shop");
        assert_eq!(
            serde_json::from_slice::<Message>(&line).expect("round trip"),
            m
        );
        assert_eq!((m.version(), m.kind()), (9, "outbound"));
    }
}
