//! The config stream's messages (docs/stream.md): ndjson, one object per line, each with
//! a `type` and a `version`.
//!
//! [`Message`] is generic over how its pieces are held. The operator writes
//! `Message<OutboundService, InboundConfig>` (the default parameters); the proxy reads
//! [`ReceivedMessage`], where every piece is a [`Received`]: a piece that does not parse
//! (an enum variant from a newer operator, say) spoils only itself, not the message, so
//! the proxy can keep its previous version of that one piece and apply the rest.

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::DeserializeOwned};

use crate::proxy::{InboundConfig, OutboundService, ProxyLocality};

/// One line of a watch stream. Unknown fields are ignored (newer operators may add some);
/// an unknown `type` does not parse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    // `#[serde(default)]` fields would otherwise ask for `O: Default`.
    bound(deserialize = "O: Deserialize<'de>, I: Deserialize<'de>")
)]
pub enum Message<O = OutboundService, I = InboundConfig> {
    /// A Pod's inbound config; `null` once the Pod is gone.
    #[serde(rename_all = "camelCase")]
    Inbound {
        version: u64,
        /// `<namespace>/<name>`.
        #[serde(default)]
        pod: String,
        inbound: Option<I>,
        /// Where the Pod runs (its node's zone); absent when unknown. Outside `inbound`
        /// so that proxies that predate it ignore it.
        #[serde(default, skip_serializing_if = "ProxyLocality::is_empty")]
        locality: ProxyLocality,
    },
    /// A destination's piece first, then those its split and mirror name; empty for a
    /// target that is not a mesh destination.
    #[serde(rename_all = "camelCase")]
    Outbound {
        version: u64,
        /// The target as requested, in canonical form.
        #[serde(default)]
        target: String,
        #[serde(default)]
        services: Vec<O>,
    },
    /// Nothing new; the last version sent.
    Heartbeat { version: u64 },
}

/// A message as the proxy reads it: each piece parsed on its own.
pub type ReceivedMessage = Message<Received<OutboundService>, Received<InboundConfig>>;

impl<O, I> Message<O, I> {
    pub fn version(&self) -> u64 {
        match self {
            Self::Inbound { version, .. }
            | Self::Outbound { version, .. }
            | Self::Heartbeat { version } => *version,
        }
    }

    /// The `type` field (also a metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Inbound { .. } => "inbound",
            Self::Outbound { .. } => "outbound",
            Self::Heartbeat { .. } => "heartbeat",
        }
    }
}

impl<O: Serialize, I: Serialize> Message<O, I> {
    /// The message as one ndjson line (with its `\n`).
    pub fn line(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut line = serde_json::to_vec(self)?;
        line.push(b'\n');
        Ok(line)
    }
}

impl ReceivedMessage {
    /// Parses one line. Fails only when the envelope is wrong (not JSON, an unknown
    /// `type`, no `version`); a piece that does not parse is a [`Received::Unparsed`].
    pub fn parse(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

/// A piece as received: parsed, or kept as JSON with the reason it did not parse.
#[derive(Debug, Clone, PartialEq)]
pub enum Received<T> {
    Parsed(T),
    Unparsed {
        /// The piece's JSON, for a second, partial reading (its `name`, say).
        raw: serde_json::Value,
        /// serde's message (`unknown variant `Maglev`, expected one of ...`).
        error: String,
    },
}

impl<T> Received<T> {
    /// The parsed piece, if it parsed.
    pub fn parsed(self) -> Option<T> {
        match self {
            Self::Parsed(t) => Some(t),
            Self::Unparsed { .. } => None,
        }
    }
}

impl<T> From<T> for Received<T> {
    fn from(t: T) -> Self {
        Self::Parsed(t)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Received<T> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        // Anything that is JSON at all is accepted here; whether it is a `T` is decided
        // on its own, so one bad piece leaves the message (and the other pieces) intact.
        let raw = serde_json::Value::deserialize(de)?;
        Ok(match T::deserialize(&raw) {
            Ok(t) => Self::Parsed(t),
            Err(e) => Self::Unparsed {
                raw,
                error: e.to_string(),
            },
        })
    }
}

impl<T: Serialize> Serialize for Received<T> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Parsed(t) => t.serialize(ser),
            Self::Unparsed { raw, .. } => raw.serialize(ser),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Protocol;

    #[test]
    fn lines_are_tagged_camel_case_json() {
        let m: Message = Message::Heartbeat { version: 7 };
        assert_eq!(
            m.line().expect("json"),
            b"{\"type\":\"heartbeat\",\"version\":7}\n"
        );
        let m: Message = Message::Inbound {
            version: 8,
            pod: "shop/reviews-1".to_owned(),
            inbound: None,
            locality: ProxyLocality::default(),
        };
        let v: serde_json::Value = serde_json::from_slice(&m.line().expect("json")).expect("v");
        assert_eq!(
            v,
            serde_json::json!({"type": "inbound", "version": 8, "pod": "shop/reviews-1", "inbound": null})
        );
        let m: Message = Message::Outbound {
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

    #[test]
    fn the_zone_rides_beside_the_inbound_piece() {
        let m: Message = Message::Inbound {
            version: 3,
            pod: "shop/r-1".to_owned(),
            inbound: Some(InboundConfig::default()),
            locality: ProxyLocality {
                zone: Some("zone-a".to_owned()),
            },
        };
        let v: serde_json::Value = serde_json::from_slice(&m.line().expect("json")).expect("v");
        assert_eq!(v["locality"], serde_json::json!({"zone": "zone-a"}));
        let back = ReceivedMessage::parse(&m.line().expect("json")).expect("parses");
        let ReceivedMessage::Inbound { locality, .. } = back else {
            panic!("inbound: {back:?}");
        };
        assert_eq!(locality.zone.as_deref(), Some("zone-a"));
    }

    #[test]
    fn parses_the_documented_messages() {
        let m = ReceivedMessage::parse(br#"{"type":"inbound","version":7,"pod":"shop/r-1","inbound":{"ports":{"6379":{"protocol":"opaque"}}}}"#).expect("inbound");
        let ReceivedMessage::Inbound {
            version,
            pod,
            inbound: Some(Received::Parsed(inbound)),
            ..
        } = m
        else {
            panic!("an inbound message: {m:?}");
        };
        assert_eq!((version, pod.as_str()), (7, "shop/r-1"));
        assert_eq!(inbound.for_port(6379).protocol, Protocol::Opaque);
        let gone = ReceivedMessage::parse(
            br#"{"type":"inbound","version":8,"pod":"shop/r-1","inbound":null}"#,
        )
        .expect("null inbound");
        assert!(matches!(gone, Message::Inbound { inbound: None, .. }));
        let out = ReceivedMessage::parse(br#"{"type":"outbound","version":9,"target":"10.96.0.1:80","services":[{"name":"a.b","addresses":["10.96.0.1:80"]}],"extra":1}"#).expect("outbound");
        assert_eq!(out.version(), 9);
        let Message::Outbound { services, .. } = out else {
            panic!("outbound");
        };
        assert!(matches!(&services[0], Received::Parsed(s) if s.name == "a.b"));
        assert_eq!(
            ReceivedMessage::parse(br#"{"type":"heartbeat","version":3}"#).expect("heartbeat"),
            Message::Heartbeat { version: 3 }
        );
        assert!(ReceivedMessage::parse(br#"{"type":"gossip","version":3}"#).is_err());
        assert!(ReceivedMessage::parse(br#"{"type":"heartbeat"}"#).is_err());
    }

    #[test]
    fn one_bad_piece_spoils_only_itself() {
        let line = br#"{"type":"outbound","version":4,"target":"10.96.0.1:80","services":[
            {"name":"a.b","policy":{"loadBalancer":{"algorithm":"Maglev"}}},
            {"name":"c.b","endpoints":[{"address":"10.0.0.1:80","weight":2}]}]}"#;
        let Message::Outbound { services, .. } = ReceivedMessage::parse(line).expect("parses")
        else {
            panic!("outbound");
        };
        match &services[0] {
            Received::Unparsed { raw, error } => {
                assert_eq!(raw["name"], "a.b");
                assert!(error.contains("unknown variant `Maglev`"), "{error}");
            }
            other => panic!("should not parse: {other:?}"),
        }
        let Received::Parsed(c) = &services[1] else {
            panic!("should parse: {:?}", services[1]);
        };
        assert_eq!(c.endpoints[0].weight, 2);
        let inbound = ReceivedMessage::parse(
            br#"{"type":"inbound","version":5,"pod":"a/b","inbound":{"default":{"mtls":"Sometimes"}}}"#,
        )
        .expect("the envelope parses");
        assert!(matches!(
            inbound,
            Message::Inbound {
                inbound: Some(Received::Unparsed { .. }),
                ..
            }
        ));
        // Written back, an unparsed piece is its JSON as received.
        let again = serde_json::to_value(&services[0]).expect("json");
        assert_eq!(again["policy"]["loadBalancer"]["algorithm"], "Maglev");
    }
}
