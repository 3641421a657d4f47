//! The stream's wire format (docs/stream.md): ndjson, one message per line, each with a
//! `type` and a `version`. Parsing only; what a message does to the served config is
//! decided by `subscriptions` and `assemble`.

use bytes::{Buf as _, BytesMut};
use remora_crds::proxy::{InboundConfig, OutboundService};
use serde::Deserialize;

use super::target::Version;

/// Longest line accepted (an outbound piece with many endpoints is a few hundred KiB).
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// One message of a watch stream. Unknown fields are ignored (newer operators may add
/// some); an unknown `type` is an error the client logs and skips.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Message {
    Inbound {
        version: u64,
        #[serde(default)]
        pod: String,
        /// `null` when the pod is gone.
        inbound: Option<InboundConfig>,
    },
    Outbound {
        version: u64,
        #[serde(default)]
        target: String,
        #[serde(default)]
        services: Vec<OutboundService>,
    },
    Heartbeat {
        version: u64,
    },
}

impl Message {
    pub fn version(&self) -> Version {
        match self {
            Self::Inbound { version, .. }
            | Self::Outbound { version, .. }
            | Self::Heartbeat { version } => Version(*version),
        }
    }

    pub fn parse(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

/// Why the line splitter gave up on a stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a stream line exceeds {MAX_LINE} bytes")]
pub struct LineTooLong;

/// Splits a byte stream into lines across arbitrary chunk boundaries.
#[derive(Debug, Default)]
pub struct Lines {
    buf: BytesMut,
}

impl Lines {
    /// Adds a chunk and returns the complete, non-blank lines it finished.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<BytesMut>, LineTooLong> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line = self.buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                out.push(line);
            }
        }
        if self.buf.len() > MAX_LINE {
            self.buf.advance(self.buf.len());
            return Err(LineTooLong);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use remora_crds::proxy::Protocol;

    use super::*;

    #[test]
    fn parses_the_documented_messages() {
        let m = Message::parse(br#"{"type":"inbound","version":7,"pod":"shop/r-1","inbound":{"ports":{"6379":{"protocol":"opaque"}}}}"#).expect("inbound");
        let Message::Inbound {
            version,
            pod,
            inbound: Some(inbound),
        } = m
        else {
            panic!("an inbound message: {m:?}");
        };
        assert_eq!((version, pod.as_str()), (7, "shop/r-1"));
        assert_eq!(inbound.for_port(6379).protocol, Protocol::Opaque);
        let gone =
            Message::parse(br#"{"type":"inbound","version":8,"pod":"shop/r-1","inbound":null}"#)
                .expect("null inbound");
        assert!(matches!(gone, Message::Inbound { inbound: None, .. }));
        let out = Message::parse(br#"{"type":"outbound","version":9,"target":"10.96.0.1:80","services":[{"name":"a.b","addresses":["10.96.0.1:80"]}],"extra":1}"#).expect("outbound");
        assert_eq!(out.version(), Version(9));
        let Message::Outbound { services, .. } = out else {
            panic!("outbound");
        };
        assert_eq!(services[0].name, "a.b");
        assert_eq!(
            Message::parse(br#"{"type":"heartbeat","version":3}"#).expect("heartbeat"),
            Message::Heartbeat { version: 3 }
        );
        assert!(Message::parse(br#"{"type":"gossip","version":3}"#).is_err());
        assert!(Message::parse(br#"{"type":"heartbeat"}"#).is_err());
    }

    #[test]
    fn lines_survive_any_chunking() {
        let text = b"{\"a\":1}\n\n{\"b\":2}\r\n{\"c\":3}\n";
        for split in 0..text.len() {
            let mut lines = Lines::default();
            let mut got = lines.push(&text[..split]).expect("fits");
            got.extend(lines.push(&text[split..]).expect("fits"));
            let got: Vec<&[u8]> = got.iter().map(|l| &l[..]).collect();
            assert_eq!(
                got,
                [&b"{\"a\":1}"[..], b"{\"b\":2}", b"{\"c\":3}"],
                "split at {split}"
            );
        }
        let mut lines = Lines::default();
        assert!(lines.push(b"partial").expect("fits").is_empty());
    }
}
